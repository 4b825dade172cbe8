//! Private repositories against real servers: git's `http-backend` behind lighttpd with TLS (a
//! test CA) and basic auth, and OpenSSH's `sshd` on loopback with `git-shell` and a deploy key.
//! Each: the fetch works, a wrong secret keeps the last release and names the parameter, an
//! unknown server (CA or host key) is refused, and the secret is in no file left behind.
//!
//! The secrets come from a [`SecretSource`] standing in for SSM (the SSM client itself is tested
//! against moto in `aws::ssm`). The agent's own binary answers git's askpass prompts.
//! Needs `lighttpd`, `lighttpd-mod-openssl`, `openssh-server`, `openssl` (scripts/install-test-deps.sh).

use stackless_init::aws::ssm::Secret;
use stackless_init::paths::Layout;
use stackless_init::private::{self, SecretSource, ASKPASS_ENV};
use stackless_init::repos::{self, SyncOutcome};
use stackless_init::userdata::{self, RepoSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

struct Source(HashMap<String, String>);

impl SecretSource for Source {
    fn get(&mut self, parameter: &str) -> anyhow::Result<Secret> {
        match self.0.get(parameter) {
            Some(v) => Ok(Secret::new(v.clone())),
            None => anyhow::bail!("SSM parameter {parameter} does not exist"),
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=T",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1"))
}

/// A bare repository `upstream.git` under `dir` and a work tree pushing to it.
fn upstream(dir: &Path) -> (PathBuf, PathBuf) {
    let bare = dir.join("upstream.git");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(dir, &["init", "-q", "--bare", bare.to_str().unwrap()]);
    git(&bare, &["config", "http.receivepack", "false"]);
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
    commit(&work, "one");
    (bare, work)
}

fn commit(work: &Path, content: &str) -> String {
    std::fs::write(work.join("top.sls"), content).unwrap();
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", content]);
    git(work, &["push", "-q", "origin", "HEAD:main"]);
    git(work, &["rev-parse", "HEAD"])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                let bytes = std::fs::read(&p).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(p);
                }
            }
        }
    }
    found
}

fn spec_from_user_data(text: &str, section: &str) -> (RepoSpec, userdata::Settings) {
    let doc = userdata::parse("user-data", text).unwrap_or_else(|e| panic!("{e}"));
    let settings = userdata::resolve(
        &userdata::Document::default(),
        &doc,
        &stackless_init::imds::Identity::example(),
    )
    .unwrap();
    let spec = if section == "salt" {
        settings.salt.repo.clone().unwrap()
    } else {
        settings.config.clone().unwrap()
    };
    (spec, settings)
}

fn sync(
    layout: &Layout,
    name: &str,
    spec: &RepoSpec,
    secrets: &[(&str, &str)],
) -> anyhow::Result<SyncOutcome> {
    let mut source = Source(
        secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    private::sync_with_source(
        layout,
        name,
        spec,
        spec.credentials.as_ref().unwrap(),
        T,
        &mut source,
    )
}

fn openssl_cert(dir: &Path, name: &str, ca: Option<&str>) {
    let key = dir.join(format!("{name}.key"));
    let pem = dir.join(format!("{name}.pem"));
    let subj = format!("/CN={name}");
    match ca {
        None => {
            run(Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &subj,
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&pem));
        }
        Some(ca) => {
            let csr = dir.join(format!("{name}.csr"));
            let ext = dir.join(format!("{name}.ext"));
            std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
            run(Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                ])
                .arg(&key)
                .arg("-out")
                .arg(&csr));
            run(Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-in"])
                .arg(&csr)
                .arg("-CA")
                .arg(dir.join(format!("{ca}.pem")))
                .arg("-CAkey")
                .arg(dir.join(format!("{ca}.key")))
                .arg("-CAcreateserial")
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&pem));
        }
    }
}

#[test]
fn https_token_through_askpass() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (_bare, work) = upstream(base);
    let first = git(&work, &["rev-parse", "HEAD"]);
    openssl_cert(base, "test-ca", None);
    openssl_cert(base, "other-ca", None);
    openssl_cert(base, "server", Some("test-ca"));
    let good = "ghp_GOODtoken0123456789";
    std::fs::write(base.join("users"), format!("x-access-token:{good}\n")).unwrap();
    let port = free_port();
    let conf = base.join("lighttpd.conf");
    std::fs::create_dir_all(base.join("www")).unwrap();
    std::fs::write(
        &conf,
        format!(
            r#"server.document-root = "{d}/www"
server.port = {port}
server.bind = "127.0.0.1"
server.errorlog = "{d}/lighttpd.log"
server.modules = ("mod_auth", "mod_authn_file", "mod_alias", "mod_setenv", "mod_cgi", "mod_openssl")
ssl.engine = "enable"
ssl.pemfile = "{d}/server.pem"
ssl.privkey = "{d}/server.key"
alias.url = ("/git" => "/usr/lib/git-core/git-http-backend")
$HTTP["url"] =~ "^/git" {{
    cgi.assign = ("" => "")
    setenv.add-environment = ("GIT_PROJECT_ROOT" => "{d}", "GIT_HTTP_EXPORT_ALL" => "1")
}}
auth.backend = "plain"
auth.backend.plain.userfile = "{d}/users"
auth.require = ("/git" => ("method" => "basic", "realm" => "git", "require" => "valid-user"))
"#,
            d = base.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("/usr/sbin/lighttpd")
        .arg("-D")
        .arg("-f")
        .arg(&conf)
        .stdin(Stdio::null())
        .spawn()
        .expect("lighttpd (apt-get install lighttpd lighttpd-mod-openssl)");
    wait_listening(port, &mut child, "lighttpd");
    let _server = Killed(child);

    // The CA comes the way users give it: user-data's ca_certificates, checked by the agent's
    // parser. (The agent installs it into the system trust store, trust.rs; a test must not
    // touch this machine's store, so git gets the parsed bundle through GIT_SSL_CAINFO.)
    let ca = std::fs::read_to_string(base.join("test-ca.pem")).unwrap();
    let user_data = format!(
        "ca_certificates = '''\n{ca}'''\n[salt]\nrepo = \"https://localhost:{port}/git/upstream.git\"\n\
         [salt.credentials]\ntoken_parameter = \"/stackless/git-token\"\n"
    );
    let (spec, settings) = spec_from_user_data(&user_data, "salt");
    std::fs::write(
        base.join("trusted.pem"),
        settings.ca_certificates.as_deref().unwrap(),
    )
    .unwrap();
    std::env::set_var("GIT_SSL_CAINFO", base.join("trusted.pem"));
    std::env::set_var(ASKPASS_ENV, env!("CARGO_BIN_EXE_stackless-init"));
    let layout = Layout::new(base.join("root"));

    // The right token: published.
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", good)]).expect("sync");
    assert_eq!(
        out,
        SyncOutcome::Updated {
            commit: first.clone(),
            previous: None
        }
    );

    // A wrong (revoked) token: the last release stays, the error names the parameter only.
    let second = commit(&work, "two");
    let wrong = "ghp_WRONGcanary999";
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", wrong)]).expect("kept");
    match &out {
        SyncOutcome::KeptLast { commit, error } => {
            assert_eq!(commit, &first);
            assert!(error.contains("/stackless/git-token"), "{error}");
            assert!(!error.contains(wrong) && !error.contains(good), "{error}");
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }
    // A missing parameter: the same, with SSM's message.
    let out = sync(&layout, "salt", &spec, &[]).expect("kept");
    assert!(
        matches!(&out, SyncOutcome::KeptLast { error, .. } if error.contains("does not exist")),
        "{out:?}"
    );

    // A server whose certificate no trusted CA signed is refused, even with the right token.
    std::env::set_var("GIT_SSL_CAINFO", base.join("other-ca.pem"));
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", good)]).expect("kept");
    match &out {
        SyncOutcome::KeptLast { error, .. } => {
            assert!(error.to_lowercase().contains("certificate"), "{error}")
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }
    std::env::set_var("GIT_SSL_CAINFO", base.join("trusted.pem"));
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", good)]).expect("sync");
    assert_eq!(
        out,
        SyncOutcome::Updated {
            commit: second,
            previous: Some(first)
        }
    );

    // No token anywhere under the agent's root (.git/config included), nothing left in /run.
    for secret in [good, wrong] {
        let found = files_containing(layout.root(), secret);
        assert!(found.is_empty(), "{secret} in {found:?}");
    }
    let left: Vec<_> = std::fs::read_dir(layout.run_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the run folder: {left:?}");
    assert!(repos::current_commit(&layout, "salt").is_some());
}

#[test]
fn ssh_deploy_key_with_known_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (bare, work) = upstream(base);
    let first = git(&work, &["rev-parse", "HEAD"]);
    let keygen = |name: &str| {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(base.join(name)));
        std::fs::read_to_string(base.join(format!("{name}.pub"))).unwrap()
    };
    let host_pub = keygen("host_key");
    let other_host_pub = keygen("other_host_key");
    let deploy_pub = keygen("deploy_key");
    keygen("wrong_key");
    std::fs::write(
        base.join("authorized_keys"),
        format!("restrict,command=\"git-shell -c \\\"$SSH_ORIGINAL_COMMAND\\\"\" {deploy_pub}"),
    )
    .unwrap();
    let port = free_port();
    let conf = base.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nAllowUsers root\n",
            d = base.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(base.join("sshd.log")).unwrap())
        .spawn()
        .expect("sshd (apt-get install openssh-server)");
    wait_listening(port, &mut child, "sshd");
    let _server = Killed(child);

    let host_line = |public: &str| {
        let mut fields = public.split_whitespace();
        format!(
            "[127.0.0.1]:{port} {} {}",
            fields.next().unwrap(),
            fields.next().unwrap()
        )
    };
    let user_data = |known_hosts: &str| {
        format!(
            "[config]\nrepo = \"ssh://root@127.0.0.1:{port}{}\"\n[config.credentials]\n\
             ssh_key_parameter = \"/stackless/deploy-key\"\nknown_hosts = \"{known_hosts}\"\n",
            bare.display()
        )
    };
    let (spec, _) = spec_from_user_data(&user_data(&host_line(&host_pub)), "config");
    let key = std::fs::read_to_string(base.join("deploy_key")).unwrap();
    let wrong_key = std::fs::read_to_string(base.join("wrong_key")).unwrap();
    let layout = Layout::new(base.join("root"));

    let out = sync(&layout, "config", &spec, &[("/stackless/deploy-key", &key)]).expect("sync");
    assert_eq!(
        out,
        SyncOutcome::Updated {
            commit: first.clone(),
            previous: None
        }
    );

    commit(&work, "two");
    let out = sync(
        &layout,
        "config",
        &spec,
        &[("/stackless/deploy-key", &wrong_key)],
    )
    .expect("kept");
    match &out {
        SyncOutcome::KeptLast { commit, error } => {
            assert_eq!(commit, &first);
            assert!(error.contains("/stackless/deploy-key"), "{error}");
            assert!(error.contains("Permission denied"), "{error}");
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }

    // A host key other than the one given: refused, never learned.
    let (spec_other, _) = spec_from_user_data(&user_data(&host_line(&other_host_pub)), "config");
    let out = sync(
        &layout,
        "config",
        &spec_other,
        &[("/stackless/deploy-key", &key)],
    )
    .expect("kept");
    match &out {
        SyncOutcome::KeptLast { error, .. } => {
            assert!(error.contains("Host key verification failed"), "{error}")
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }

    let key_body: String = key.lines().nth(1).unwrap().to_string();
    let found = files_containing(layout.root(), &key_body);
    assert!(found.is_empty(), "the key is in {found:?}");
    let left: Vec<_> = std::fs::read_dir(layout.run_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the run folder: {left:?}");
}
