//! The AWS seed's user-data run for real in a debootstrapped Debian root (the local target's cached
//! base, through its chroot communicator): the SSM agent is installed when absent, left alone when
//! present, refused when its signature does not match, and the failure line it prints is the one
//! the builder picks up from the console. The agent is a tiny package the test builds with
//! dpkg-deb and signs with a throwaway key it trusts in place of AWS's; both are served from
//! loopback. The rendered generalize.sh then removes the agent (or keeps it, when told to). The
//! chroot has no metadata service (169.254.169.254 is not routed here), so the region is given
//! there; the script's IMDSv2 function is run on its own against a stand-in on loopback.
//!
//! Needs root (chroot, mounts), debootstrap, dpkg-deb and gpg; skipped otherwise. The first run
//! debootstraps the base (minutes), later runs unpack it from ~/.cache/stackless.

use super::base::{self, BaseSpec};
use super::mounts::{remove_tree, Mounts};
use crate::communicator::chroot::ChrootCommunicator;
use crate::communicator::{CommandOutput, Communicator};
use crate::platform::aws::console::seed_failure;
use crate::render::{self, RenderInputs, SSM_AGENT_KEY};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const REGION: &str = "us-test-1";
const MARKER: &str = "var/lib/stackless-seed/installed-ssm-agent";
const ENABLED: &str = "etc/systemd/system/multi-user.target.wants/amazon-ssm-agent.service";

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sh(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Files served from loopback by path, with a count of requests per path.
struct Server {
    port: u16,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    hits: Arc<Mutex<BTreeMap<String, usize>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let files: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
        let hits: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let (s, f, h) = (server.clone(), files.clone(), hits.clone());
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                let path = req.url().to_string();
                *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                let body = f.lock().unwrap().get(&path).cloned();
                let _ = match body {
                    Some(b) => req.respond(tiny_http::Response::from_data(b)),
                    None => req.respond(tiny_http::Response::empty(404)),
                };
            }
        });
        Server {
            port,
            files,
            hits,
            server,
            thread: Some(thread),
        }
    }
    fn put(&self, path: &str, body: Vec<u8>) {
        self.files.lock().unwrap().insert(path.into(), body);
    }
    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A throwaway signing key in its own GNUPGHOME; its agent is stopped when dropped.
struct TestKey {
    home: tempfile::TempDir,
}

impl TestKey {
    fn new(uid: &str) -> TestKey {
        let home = tempfile::tempdir().unwrap();
        let k = TestKey { home };
        sh(
            "generating a test key",
            k.gpg().args([
                "--passphrase",
                "",
                "--quick-gen-key",
                uid,
                "default",
                "sign",
                "never",
            ]),
        );
        k
    }
    fn gpg(&self) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", self.home.path()).arg("--batch");
        c
    }
    fn armored(&self) -> String {
        sh(
            "exporting the test key",
            self.gpg().args(["--armor", "--export"]),
        )
    }
    fn sign(&self, file: &Path) -> Vec<u8> {
        let sig = file.with_extension("sig-tmp");
        sh(
            "signing",
            self.gpg()
                .arg("--detach-sign")
                .arg("-o")
                .arg(&sig)
                .arg(file),
        );
        let b = std::fs::read(&sig).unwrap();
        std::fs::remove_file(&sig).unwrap();
        b
    }
}

impl Drop for TestKey {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", self.home.path())
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

/// A fake `amazon-ssm-agent` package: a script and a systemd unit.
fn fake_agent_deb(dir: &Path) -> PathBuf {
    let root = dir.join("pkg");
    for (path, mode, text) in [
        (
            "DEBIAN/control",
            0o644,
            "Package: amazon-ssm-agent\nVersion: 3.3.0.0-1\nArchitecture: all\n\
             Maintainer: stackless tests <test@stackless.invalid>\n\
             Description: a stand-in for the SSM agent, built by the seed test\n",
        ),
        (
            "usr/bin/amazon-ssm-agent",
            0o755,
            "#!/bin/sh\necho \"fake amazon-ssm-agent\"\nexec sleep infinity\n",
        ),
        (
            "lib/systemd/system/amazon-ssm-agent.service",
            0o644,
            "[Unit]\nDescription=fake amazon-ssm-agent\n[Service]\nExecStart=/usr/bin/amazon-ssm-agent\n\
             [Install]\nWantedBy=multi-user.target\n",
        ),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let deb = dir.join("amazon-ssm-agent.deb");
    sh(
        "building the fake agent package",
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&root)
            .arg(&deb),
    );
    deb
}

/// Renders the seed's user-data and generalize.sh for a definition pointing at `url`, trusting
/// the key in `templates`.
fn render_for(url: &str, keep: bool, templates: &Path) -> render::Rendered {
    let defs = tempfile::tempdir().unwrap();
    std::fs::write(
        defs.path().join("seed.toml"),
        format!(
            "[source]\nami = \"ami-0123456789abcdef0\"\n[instance]\nlease_minutes = 30\n\
             ssm_agent_url = \"{url}\"\n[provision]\nkeep_ssm_agent = {keep}\n"
        ),
    )
    .unwrap();
    let def = crate::definition::load(defs.path(), "seed").unwrap();
    let r = render::render(
        &def,
        &RenderInputs {
            templates: Some(templates),
            init_binary: b"x",
            bootstrap: None,
            build_id: "b-seedtest",
            build_ca: false,
        },
    )
    .unwrap();
    render::check_seed_user_data("seed-user-data.sh", &r.seed_user_data, 30).unwrap();
    r
}

struct Root {
    dir: tempfile::TempDir,
    mounts: Option<Mounts>,
    comm: ChrootCommunicator,
}

impl Root {
    fn path(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn has(&self, p: &str) -> bool {
        self.path().join(p).symlink_metadata().is_ok()
    }
    async fn run(&self, what: &str, cmd: &str) -> CommandOutput {
        self.comm
            .run(what, cmd, Duration::from_secs(300))
            .await
            .unwrap()
    }
    /// Runs the seed's user-data as cloud-init would (`sh`), the region given (no IMDS here) and
    /// the console a file.
    async fn seed(&self, script: &str) -> (CommandOutput, String) {
        std::fs::write(self.path().join("var/tmp/seed-user-data.sh"), script).unwrap();
        let _ = std::fs::remove_file(self.path().join("var/tmp/console"));
        let out = self
            .run(
                "the seed's user-data",
                &format!(
                    "STACKLESS_SEED_REGION={REGION} STACKLESS_SEED_CONSOLE=/var/tmp/console \
                     sh /var/tmp/seed-user-data.sh"
                ),
            )
            .await;
        let console =
            std::fs::read_to_string(self.path().join("var/tmp/console")).unwrap_or_default();
        (out, console)
    }
    async fn agent_installed(&self) -> bool {
        self.run("dpkg -s", "dpkg -s amazon-ssm-agent >/dev/null 2>&1")
            .await
            .exit_code
            == 0
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Some(mut m) = self.mounts.take() {
            m.unmount().unwrap();
        }
        remove_tree(&self.dir.path().join("root")).unwrap();
    }
}

fn log(o: &CommandOutput) -> String {
    format!("exit {}\n{}{}", o.exit_code, o.stdout, o.stderr)
}

#[tokio::test]
async fn the_seed_installs_the_ssm_agent_in_a_debian_root_only_when_absent_and_signed() {
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = ["debootstrap", "dpkg-deb", "gpg", "gpgconf", "chroot"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    if !root_user || !missing.is_empty() {
        let why = format!(
            "needs root and debootstrap, dpkg-deb, gpg, chroot (root: {root_user}, missing: {missing:?})"
        );
        // CI installs all of it (scripts/install-*-deps.sh): there, a skip would hide a test.
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let deb = fake_agent_deb(work.path());
    let aws = TestKey::new("stackless seed test <seed@stackless.invalid>");
    let other = TestKey::new("someone else <else@stackless.invalid>");
    let templates = work.path().join("templates");
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(templates.join(SSM_AGENT_KEY), aws.armored()).unwrap();

    let server = Server::start();
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let path = format!("/ssm-{REGION}/debian_{arch}/amazon-ssm-agent.deb");
    server.put(&path, std::fs::read(&deb).unwrap());
    let url = format!("http://127.0.0.1:{}/ssm-{{region}}", server.port);

    // The Debian base the local target bakes from.
    let dir = tempfile::tempdir().unwrap();
    let spec = BaseSpec {
        release: "bookworm".into(),
        mirror: "http://deb.debian.org/debian".into(),
    };
    base::prepare(
        &spec,
        &dir.path().join("root"),
        &base::default_cache_dir(),
        Duration::from_secs(7 * 24 * 3600),
    )
    .await
    .unwrap();
    let mut root = Root {
        comm: ChrootCommunicator::new(dir.path().join("root"), false),
        dir,
        mounts: None,
    };
    root.mounts = Some(Mounts::mount(&root.path()).unwrap());
    assert!(root.has("usr/bin/gpgv"), "gpgv comes with apt in minbase");

    // Nothing to download from: the failure line names the URL and the missing route.
    let closed = render_for("http://127.0.0.1:9/ssm-{region}", false, &templates);
    let (out, console) = root.seed(&closed.seed_user_data).await;
    assert_ne!(out.exit_code, 0, "{}", log(&out));
    let line = seed_failure(&console).unwrap_or_else(|| panic!("no failure line: {console:?}"));
    assert!(
        line.contains(&format!(
            "downloading the SSM agent from http://127.0.0.1:9/ssm-{REGION}/debian_{arch}/amazon-ssm-agent.deb"
        )) && line.contains("NAT or internet gateway") && line.contains("S3 gateway endpoint"),
        "{line}"
    );
    assert_eq!(console.lines().count(), 1, "one line: {console:?}");
    assert!(!root.agent_installed().await && !root.has(MARKER));

    // A signature that does not match (the right key, another file): refused, not installed.
    let r = render_for(&url, false, &templates);
    let decoy = work.path().join("decoy");
    std::fs::write(&decoy, "not the agent").unwrap();
    server.put(&format!("{path}.sig"), aws.sign(&decoy));
    let (out, console) = root.seed(&r.seed_user_data).await;
    assert_ne!(out.exit_code, 0, "{}", log(&out));
    let line = seed_failure(&console).unwrap_or_else(|| panic!("no failure line: {console:?}"));
    eprintln!("the seed's user-data, bad signature:\n{}", log(&out));
    assert!(
        line.contains("verifying the SSM agent from")
            && line.contains("does not match AWS's signing key")
            && line.contains("not installed"),
        "{line}"
    );
    assert!(
        seed_failure(&out.stderr).as_deref() == Some(line.as_str()),
        "the same line on stderr (cloud-init's output): {}",
        log(&out)
    );
    assert!(!root.agent_installed().await && !root.has(MARKER));
    // Signed by a key the seed does not trust: refused too.
    server.put(&format!("{path}.sig"), other.sign(&deb));
    let (out, console) = root.seed(&r.seed_user_data).await;
    assert_ne!(out.exit_code, 0, "{}", log(&out));
    assert!(
        seed_failure(&console).is_some_and(|l| l.contains("does not match")),
        "{console}"
    );
    assert!(!root.agent_installed().await);

    // Signed: installed and enabled (systemd is not running in a chroot: it starts at boot).
    server.put(&format!("{path}.sig"), aws.sign(&deb));
    let (out, console) = root.seed(&r.seed_user_data).await;
    eprintln!("the seed's user-data, signed package:\n{}", log(&out));
    assert_eq!(out.exit_code, 0, "{}", log(&out));
    assert_eq!(console, "", "no failure line");
    assert!(
        out.stdout.contains("the signature of") && out.stdout.contains("starts at the next boot"),
        "{}",
        log(&out)
    );
    assert!(root.agent_installed().await);
    assert!(root.has(ENABLED), "enabled: {}", log(&out));
    assert!(
        root.has(MARKER),
        "the seed records that it installed the agent"
    );
    let fetched = server.hits(&path);

    // Present: untouched, nothing downloaded.
    let (out, _) = root.seed(&r.seed_user_data).await;
    assert_eq!(out.exit_code, 0, "{}", log(&out));
    assert!(
        out.stdout
            .contains("the image has the SSM agent; nothing installed"),
        "{}",
        log(&out)
    );
    assert_eq!(server.hits(&path), fetched, "nothing downloaded");

    // generalize.sh with keep_ssm_agent = true keeps it and drops the marker.
    let kept = render_for(&url, true, &templates);
    let out = root
        .comm
        .run(
            "generalize.sh (keep)",
            &kept.generalize,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", log(&out));
    assert!(
        root.agent_installed().await && !root.has(MARKER),
        "{}",
        log(&out)
    );

    // And by default removes what the seed installed: here at once (no systemd running, so
    // nothing runs the agent); on EC2 when the seed stops for the snapshot.
    root.run(
        "marking it installed again",
        &format!("mkdir -p /var/lib/stackless-seed && echo deb > /{MARKER}"),
    )
    .await;
    let out = root
        .comm
        .run("generalize.sh", &r.generalize, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", log(&out));
    assert!(
        out.stdout
            .contains("removed the SSM agent the seed installed for the bake"),
        "{}",
        log(&out)
    );
    assert!(!root.agent_installed().await, "{}", log(&out));
    for gone in [MARKER, ENABLED, "usr/bin/amazon-ssm-agent"] {
        assert!(!root.has(gone), "{gone} is left: {}", log(&out));
    }
    assert!(
        !root.has("usr/local/sbin/stackless-remove-ssm-agent"),
        "the remover removes itself"
    );

    // An image that has the agent and no marker: generalize leaves it alone.
    server.put(&format!("{path}.sig"), aws.sign(&deb));
    root.seed(&r.seed_user_data).await;
    std::fs::remove_file(root.path().join(MARKER)).unwrap();
    let out = root
        .comm
        .run("generalize.sh", &r.generalize, Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", log(&out));
    assert!(
        root.agent_installed().await,
        "not the seed's to remove: {}",
        log(&out)
    );
}

/// IMDSv2 on loopback: a token for a PUT, the region only for a GET that carries it.
fn imds() -> (Arc<tiny_http::Server>, u16, std::thread::JoinHandle<()>) {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let port = server.server_addr().to_ip().unwrap().port();
    let s = server.clone();
    let t = std::thread::spawn(move || {
        for req in s.incoming_requests() {
            let header = |name: &'static str| {
                req.headers()
                    .iter()
                    .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                    .map(|h| h.value.as_str().to_string())
            };
            let (code, body) = match (req.method(), req.url()) {
                (tiny_http::Method::Put, "/latest/api/token")
                    if header("X-aws-ec2-metadata-token-ttl-seconds").is_some() =>
                {
                    (200, "the-token")
                }
                (tiny_http::Method::Get, "/latest/meta-data/placement/region")
                    if header("X-aws-ec2-metadata-token").as_deref() == Some("the-token") =>
                {
                    (200, "eu-central-1")
                }
                _ => (401, ""),
            };
            let _ = req.respond(tiny_http::Response::from_string(body).with_status_code(code));
        }
    });
    (server, port, t)
}

#[test]
fn the_seed_asks_imdsv2_for_its_region_with_curl_or_python3() {
    let r = render_for(
        "https://example.invalid/{region}",
        false,
        Path::new("/nonexistent"),
    );
    let ud = &r.seed_user_data;
    // The script's own function, run on its own.
    let start = ud.find("imds_region() {").expect("imds_region");
    let end = start + ud[start..].find("\n}\n").unwrap() + 3;
    let function = &ud[start..end];
    let (server, port, thread) = imds();
    let run = |path: &str| {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!(
                "{function}imds=http://127.0.0.1:{port}\nimds_region"
            ))
            .env("PATH", path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mut tried = 0;
    if have("curl") {
        let (ok, region, err) = run(&std::env::var("PATH").unwrap());
        assert!(ok && region == "eu-central-1", "curl: {region} {err}");
        tried += 1;
    }
    // Only python3 on the PATH (cloud-init's own, on any image that runs user-data).
    let python = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output();
    if let Some(p) = python.ok().filter(|o| o.status.success()) {
        let bin = tempfile::tempdir().unwrap();
        let exe = String::from_utf8_lossy(&p.stdout).trim().to_string();
        std::os::unix::fs::symlink(exe, bin.path().join("python3")).unwrap();
        let (ok, region, err) = run(&bin.path().to_string_lossy());
        assert!(ok && region == "eu-central-1", "python3: {region} {err}");
        tried += 1;
        // Neither: it says so.
        let empty = tempfile::tempdir().unwrap();
        let (ok, _, err) = run(&empty.path().to_string_lossy());
        assert!(!ok && err.contains("no curl or python3"), "{err}");
    }
    server.unblock();
    thread.join().unwrap();
    if tried == 0 {
        eprintln!("skipped: neither curl nor python3 here");
    }
}
