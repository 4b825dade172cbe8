use super::*;
use crate::aws::test_support::{role_config, start_with_roles, Moto, MotoSetup};
use crate::imds::emulator::{Emulator, EmulatorConfig};
use crate::imds::Identity;

const CANARY: &str = "ghp_canaryCANARY0123456789abcdefSECRET";
const PARAM: &str = "/stackless/web/git-token";
const LONG: Duration = Duration::from_secs(30);

fn reader(emu: &Emulator, moto: &Moto) -> ParameterReader {
    ParameterReader::new(
        ImdsClient::new(&emu.endpoint(), LONG),
        Some(&moto.endpoint),
        Duration::from_secs(20),
    )
    .expect("identity")
}

fn moto_and_emulator() -> (MotoSetup, Emulator) {
    let setup = start_with_roles(&[(PARAM, CANARY), ("/other/param", "x")]);
    let emu = Emulator::start(
        EmulatorConfig::new(Identity::example()).with_role(role_config(&setup.reader)),
    )
    .expect("emulator");
    (setup, emu)
}

/// moto verifies the signature and the role's permissions (IAM auth on), with a session token
/// from moto's own STS AssumeRole served by the IMDS emulator.
#[test]
fn reads_a_secure_string_from_moto_with_iam_auth_on() {
    let (setup, emu) = moto_and_emulator();
    let mut reader = reader(&emu, &setup.moto);
    assert_eq!(reader.role.region, "eu-west-1");
    let secret = reader.get(PARAM).expect("the parameter");
    assert_eq!(secret.expose(), CANARY);
    assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");

    // The proof that moto checks signatures: the same call with a wrong secret key is refused.
    let mut wrong = reader.role.credentials().unwrap().credentials;
    wrong.secret_access_key.push('x');
    let call = GetParameter {
        endpoint: &setup.moto.endpoint,
        region: "eu-west-1",
        account: "123456789012",
        role: "stackless-reader",
        deadline: Instant::now() + Duration::from_secs(10),
        tls: crate::aws::tls::client_config(),
    };
    let err = call.run(PARAM, &wrong).expect_err("a bad signature");
    assert!(
        matches!(err, SsmError::CredentialsRefused { .. }),
        "{err:?}: {err}"
    );
}

#[test]
fn access_denied_names_the_action_and_the_arn() {
    let (setup, emu) = moto_and_emulator();
    emu.set_role(Some(role_config(&setup.outsider)));
    let err = reader(&emu, &setup.moto)
        .get(PARAM)
        .expect_err("not allowed");
    let text = err.to_string();
    assert!(matches!(err, SsmError::AccessDenied { .. }), "{err:?}");
    assert!(
        text.contains("ssm:GetParameter")
            && text
                .contains("arn:aws:ssm:eu-west-1:123456789012:parameter/stackless/web/git-token")
            && text.contains("stackless-outsider"),
        "{text}"
    );
    assert!(!text.contains(CANARY));
}

#[test]
fn missing_parameter_and_missing_role_have_their_own_messages() {
    let (setup, emu) = moto_and_emulator();
    let err = reader(&emu, &setup.moto)
        .get("/stackless/nope")
        .expect_err("no such parameter");
    assert!(matches!(err, SsmError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("does not exist"), "{err}");

    emu.set_role(None);
    let err = reader(&emu, &setup.moto).get(PARAM).expect_err("no role");
    assert!(matches!(err, SsmError::Credentials { .. }), "{err:?}");
    assert!(err.to_string().contains("no IAM role"), "{err}");
}

/// A server answering with canned AWS errors (moto does not model KMS permissions or
/// throttling); counts the requests it got.
fn canned(answers: Vec<(u16, &'static str)>) -> (String, std::thread::JoinHandle<usize>) {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("server");
    let endpoint = format!("http://{}", server.server_addr().to_ip().unwrap());
    let thread = std::thread::spawn(move || {
        let mut count = 0;
        for (status, body) in answers {
            let Ok(request) = server.recv() else { break };
            count += 1;
            let _ = request.respond(
                tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(
                        tiny_http::Header::from_bytes("Content-Type", "application/x-amz-json-1.1")
                            .unwrap(),
                    ),
            );
        }
        count
    });
    (endpoint, thread)
}

/// Answers `answers` in order, then accepts requests and never answers them.
fn canned_then_silent(answers: Vec<(u16, &'static str)>) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("server");
    let endpoint = format!("http://{}", server.server_addr().to_ip().unwrap());
    std::thread::spawn(move || {
        for (status, body) in answers {
            let Ok(request) = server.recv() else { return };
            let _ =
                request.respond(tiny_http::Response::from_string(body).with_status_code(status));
        }
        let mut held = Vec::new();
        while let Ok(request) = server.recv() {
            held.push(request);
        }
    });
    endpoint
}

fn creds() -> Credentials {
    Credentials {
        access_key_id: "ASIAEXAMPLE".into(),
        secret_access_key: "secret".into(),
        session_token: Some("token".into()),
    }
}

#[test]
fn throttling_and_5xx_are_retried() {
    let ok = r#"{"Parameter":{"Name":"/p","Type":"SecureString","Value":"v4lue","Version":1}}"#;
    let (endpoint, server) = canned(vec![
        (
            400,
            r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
        ),
        (503, ""),
        (200, ok),
    ]);
    let call = GetParameter {
        endpoint: &endpoint,
        region: "eu-west-1",
        account: "123456789012",
        role: "r",
        deadline: Instant::now() + Duration::from_secs(10),
        tls: crate::aws::tls::client_config(),
    };
    assert_eq!(call.run("/p", &creds()).expect("value").expose(), "v4lue");
    assert_eq!(server.join().unwrap(), 3);
}

#[test]
fn retries_end_at_the_deadline() {
    let (endpoint, _server) = canned(vec![(500, ""); 100]);
    let call = GetParameter {
        endpoint: &endpoint,
        region: "eu-west-1",
        account: "123456789012",
        role: "r",
        deadline: Instant::now() + Duration::from_millis(800),
        tls: crate::aws::tls::client_config(),
    };
    let start = Instant::now();
    let err = call.run("/p", &creds()).expect_err("always 500");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(matches!(err, SsmError::Deadline { .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP 500"), "{err}");
}

/// The last attempt, cut short by the deadline itself, does not hide what SSM answered before.
#[test]
fn the_deadline_cutting_an_attempt_keeps_the_answer_before_it() {
    let endpoint = canned_then_silent(vec![(500, "")]);
    let call = GetParameter {
        endpoint: &endpoint,
        region: "eu-west-1",
        account: "123456789012",
        role: "r",
        deadline: Instant::now() + Duration::from_millis(1500),
        tls: crate::aws::tls::client_config(),
    };
    let err = call.run("/p", &creds()).expect_err("a 500, then silence");
    assert!(matches!(err, SsmError::Deadline { .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP 500"), "{err}");
}

#[test]
fn kms_denial_has_its_own_message() {
    for body in [
        r#"{"__type":"AccessDeniedException","message":"User: arn:aws:sts::123456789012:assumed-role/r/i-1 is not authorized to perform: kms:Decrypt on resource: arn:aws:kms:eu-west-1:123456789012:key/1234 because no identity-based policy allows the kms:Decrypt action (Service: AWSKMS; Status Code: 400; Error Code: AccessDeniedException)"}"#,
        r#"{"__type":"KMS.AccessDeniedException","message":"denied"}"#,
    ] {
        let (endpoint, _server) = canned(vec![(400, body)]);
        let call = GetParameter {
            endpoint: &endpoint,
            region: "eu-west-1",
            account: "123456789012",
            role: "web",
            deadline: Instant::now() + Duration::from_secs(5),
            tls: crate::aws::tls::client_config(),
        };
        let err = call.run("/p", &creds()).expect_err("KMS denied");
        assert!(matches!(err, SsmError::KmsDenied { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("kms:Decrypt")
                && text.contains("kms:ViaService = ssm.eu-west-1.amazonaws.com")
                && text.contains("arn:aws:ssm:eu-west-1:123456789012:parameter/p"),
            "{text}"
        );
    }
}

#[test]
fn endpoints_and_arns() {
    assert_eq!(
        endpoint_from(None, None, None, "eu-west-1"),
        "https://ssm.eu-west-1.amazonaws.com"
    );
    assert_eq!(
        endpoint_from(None, None, None, "cn-north-1"),
        "https://ssm.cn-north-1.amazonaws.com.cn"
    );
    assert_eq!(
        endpoint_from(None, None, Some("https://vpce-1.ssm.example/"), "eu-west-1"),
        "https://vpce-1.ssm.example"
    );
    assert_eq!(
        endpoint_from(
            None,
            Some("http://127.0.0.1:5000"),
            Some("https://x"),
            "eu-west-1"
        ),
        "http://127.0.0.1:5000"
    );
    assert_eq!(
        endpoint_from(
            Some("https://ssm-fips.us-east-1.amazonaws.com"),
            Some("http://127.0.0.1:5000"),
            None,
            "us-east-1"
        ),
        "https://ssm-fips.us-east-1.amazonaws.com"
    );
    assert_eq!(
        parameter_arn("/a/b", "us-gov-west-1", "1"),
        "arn:aws-us-gov:ssm:us-gov-west-1:1:parameter/a/b"
    );
    assert_eq!(
        parameter_arn("plain", "eu-west-1", "1"),
        "arn:aws:ssm:eu-west-1:1:parameter/plain"
    );
    assert_eq!(
        request::host_of("http://127.0.0.1:5000/x"),
        "127.0.0.1:5000"
    );
    assert_eq!(
        request::host_of("https://ssm.eu-west-1.amazonaws.com"),
        "ssm.eu-west-1.amazonaws.com"
    );
}

#[test]
fn https_endpoints_are_spoken_to_over_tls() {
    // A TLS server whose self-signed certificate no trust store holds: the handshake must
    // happen (the agent speaks TLS) and then be refused (it checks what it is talking to).
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/install-test-deps.sh installs it)");
    assert!(made.status.success(), "{made:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = format!(
        "import http.server,ssl\n\
         s=http.server.HTTPServer(('127.0.0.1',{port}),http.server.BaseHTTPRequestHandler)\n\
         c=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain('{}','{}')\n\
         s.socket=c.wrap_socket(s.socket,server_side=True)\n\
         s.serve_forever()\n",
        cert.display(),
        key.display()
    );
    let mut server = std::process::Command::new("python3")
        .args(["-c", &script])
        .spawn()
        .expect("python3");
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "the TLS server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let endpoint = format!("https://127.0.0.1:{port}");
    let call = GetParameter {
        endpoint: &endpoint,
        region: "eu-west-1",
        account: "123456789012",
        role: "r",
        deadline: Instant::now() + Duration::from_secs(2),
        tls: crate::aws::tls::client_config(),
    };
    let err = call
        .run("/p", &creds())
        .expect_err("an untrusted certificate");
    let _ = server.kill();
    let _ = server.wait();
    let text = err.to_string();
    assert!(!text.contains("no TLS backend"), "{text}");
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
}

/// A CA the system trusts only after the agent started (the boot's trust step installs the
/// user-data's `ca_certificates` after the IMDS client exists) is trusted by the next reader:
/// the trust store is read when a reader is made, not once per process as ureq's default is.
#[test]
fn a_ca_trusted_after_start_is_trusted() {
    let early = crate::aws::tls::client_config(); // what the process had before the CA
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .expect("openssl (scripts/install-test-deps.sh installs it)");
        assert!(o.status.success(), "openssl {args:?}: {o:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=late-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "1",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Any HTTP answer will do: what matters is that the handshake is accepted.
    let script = format!(
        "import http.server,ssl\n\
         s=http.server.HTTPServer(('127.0.0.1',{port}),http.server.BaseHTTPRequestHandler)\n\
         c=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain('{0}/server.pem','{0}/server.key')\n\
         s.socket=c.wrap_socket(s.socket,server_side=True)\n\
         s.serve_forever()\n",
        d.display()
    );
    let mut server = std::process::Command::new("python3")
        .args(["-c", &script])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "the TLS server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let endpoint = format!("https://127.0.0.1:{port}");
    let call = |tls| GetParameter {
        endpoint: &endpoint,
        region: "eu-west-1",
        account: "123456789012",
        role: "r",
        deadline: Instant::now() + Duration::from_secs(2),
        tls,
    };
    let before = call(early)
        .run("/p", &creds())
        .expect_err("not trusted yet")
        .to_string();
    // The trust step's effect, in this process: the system bundle now holds the CA.
    std::env::set_var("SSL_CERT_FILE", d.join("ca.pem"));
    let after = call(crate::aws::tls::client_config()).run("/p", &creds());
    std::env::remove_var("SSL_CERT_FILE");
    let _ = server.kill();
    let _ = server.wait();
    assert!(before.contains("UnknownIssuer"), "{before}");
    let after = after.expect_err("the server is no SSM").to_string();
    assert!(
        !after.contains("UnknownIssuer") && !after.to_lowercase().contains("certificate"),
        "the CA trusted after start was not used: {after}"
    );
}
