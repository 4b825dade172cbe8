//! Real AWS client code for tests: a Python with botocore (and moto). `STACKLESS_PYTHON`, else
//! the `python` next to `moto_server` on PATH, else the repository's `.venv/bin/python`
//! (scripts/install-test-deps.sh installs moto, which brings botocore). Tests fail, never skip,
//! without it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn python_with_botocore() -> PathBuf {
    if let Some(p) = std::env::var_os("STACKLESS_PYTHON") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("moto_server").is_file() && dir.join("python").is_file() {
                return dir.join("python");
            }
        }
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.is_file(),
        "these tests need a Python with botocore and moto: set STACKLESS_PYTHON, put the venv's \
         bin (with moto_server) on PATH, or run scripts/install-test-deps.sh ({} is missing)",
        venv.display()
    );
    venv
}

/// `python -c SCRIPT` with `input` on stdin; its stdout. Panics with stderr when it fails.
pub fn run_python(python: &Path, script: &str, input: &[u8]) -> Vec<u8> {
    run_python_args(python, script, &[], input)
}

/// A real `moto_server` on a free loopback port, killed when dropped.
pub struct Moto {
    pub endpoint: String,
    child: std::process::Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Credentials from a moto STS AssumeRole.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AssumedRole {
    pub role: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    pub expiration: String,
}

impl AssumedRole {
    pub fn role_config(&self) -> crate::imds::emulator::RoleConfig {
        crate::imds::emulator::RoleConfig {
            name: self.role.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            token: self.token.clone(),
            expiration: self.expiration.clone(),
        }
    }
}

/// What `Moto::start_with_roles` set up.
pub struct MotoSetup {
    pub moto: Moto,
    /// May call ssm:GetParameter and kms:Decrypt on everything.
    pub reader: AssumedRole,
    /// May do nothing with SSM.
    pub outsider: AssumedRole,
}

/// Creates the roles and parameters (`name -> SecureString value`), assumes both roles, then
/// switches moto's IAM authentication on, so from then on moto verifies every signature and
/// every permission.
const MOTO_SETUP: &str = r#"
import json, sys, boto3
endpoint, params = sys.argv[1], json.loads(sys.stdin.read())
kw = dict(endpoint_url=endpoint, region_name="eu-west-1",
          aws_access_key_id="AKIASETUPSETUPSETUP1", aws_secret_access_key="setup")
iam, sts, ssm = (boto3.client(s, **kw) for s in ("iam", "sts", "ssm"))
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
         "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
def role(name, actions):
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName=name, PolicyName="p", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    c = sts.assume_role(RoleArn=arn, RoleSessionName="i-0123456789abcdef0")["Credentials"]
    return {"role": name, "access_key_id": c["AccessKeyId"], "secret_access_key": c["SecretAccessKey"],
            "token": c["SessionToken"], "expiration": c["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")}
for name, value in params.items():
    ssm.put_parameter(Name=name, Value=value, Type="SecureString")
out = {"reader": role("stackless-reader", ["ssm:GetParameter", "kms:Decrypt"]),
       "outsider": role("stackless-outsider", ["s3:ListBucket"])}
import urllib.request
urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                              headers={"Content-Type": "text/plain"})).read()
json.dump(out, sys.stdout)
"#;

impl Moto {
    pub fn start() -> Moto {
        let python = python_with_botocore();
        let moto_server = python.with_file_name("moto_server");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&moto_server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", moto_server.display()));
        let moto = Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        };
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "moto_server did not listen on {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        moto
    }

    /// moto with two assumed roles and the given SecureString parameters; IAM auth on.
    pub fn start_with_roles(params: &[(&str, &str)]) -> MotoSetup {
        let moto = Moto::start();
        let params: std::collections::BTreeMap<&str, &str> = params.iter().copied().collect();
        let out = run_python_args(
            &python_with_botocore(),
            MOTO_SETUP,
            &[&moto.endpoint],
            serde_json::to_vec(&params).unwrap().as_slice(),
        );
        #[derive(serde::Deserialize)]
        struct Out {
            reader: AssumedRole,
            outsider: AssumedRole,
        }
        let out: Out = serde_json::from_slice(&out).expect("setup JSON");
        MotoSetup {
            moto,
            reader: out.reader,
            outsider: out.outsider,
        }
    }
}

/// Like [`run_python`], with arguments after the script.
pub fn run_python_args(python: &Path, script: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
