//! Real servers for the private-repository tests: git's `http-backend` behind lighttpd with TLS
//! (certificates from a test CA made with openssl) and basic auth. Needs `lighttpd`,
//! `lighttpd-mod-openssl` and `openssl` (scripts/install-test-deps.sh).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a command that must succeed; its trimmed stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_listening(port: u16, child: &mut Child, what: &str) {
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

pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
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

/// A test CA (`test-ca`), a second one nobody trusts (`other-ca`), and a server certificate for
/// localhost/127.0.0.1 signed by the first, as `NAME.pem`/`NAME.key` in `dir`.
pub fn test_certificates(dir: &Path) {
    openssl_cert(dir, "test-ca", None);
    openssl_cert(dir, "other-ca", None);
    openssl_cert(dir, "server", Some("test-ca"));
}

pub fn openssl_cert(dir: &Path, name: &str, ca: Option<&str>) {
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

/// lighttpd serving the bare repositories under `root` at `https://localhost:PORT/git/NAME.git`,
/// with `server.pem` from [`test_certificates`] and basic auth for one user.
pub struct HttpsGit {
    pub port: u16,
    _server: Killed,
}

impl HttpsGit {
    pub fn start(root: &Path, user: &str, password: &str) -> HttpsGit {
        std::fs::write(root.join("users"), format!("{user}:{password}\n")).unwrap();
        let port = free_port();
        let conf = root.join("lighttpd.conf");
        std::fs::create_dir_all(root.join("www")).unwrap();
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
                d = root.display()
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
        HttpsGit {
            port,
            _server: Killed(child),
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("https://localhost:{}/git/{name}.git", self.port)
    }
}

/// Whether the unprivileged user `nobody` can read `file` (`runuser -u nobody -- cat FILE`).
pub fn nobody_reads(file: &Path) -> bool {
    Command::new("runuser")
        .args(["-u", "nobody", "--", "cat"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("runuser")
        .success()
}
