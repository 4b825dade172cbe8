//! Salt on the machine: found where it already is, or installed by the image's method.
//!
//! `preseeded` images carry salt already; `bare` images install it at the first boot of an
//! instance, either into a virtualenv with pip (`pip`, the default) or with the official
//! salt-bootstrap script in onedir mode (`onedir`), whose download is checked against a pinned
//! sha256 before anything runs. `none` means the image promises salt and a missing salt is an error.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::aws::sigv4::{hex, sha256};
use crate::paths::Layout;
use crate::process::{self, Deadline};
pub use crate::userdata::specs::{
    InstallMethod, InstallSpec, DEFAULT_BOOTSTRAP_SHA256, DEFAULT_BOOTSTRAP_URL, DEFAULT_PYTHON,
    DEFAULT_SALT_VERSION,
};
use crate::userdata::Timeouts;

/// Where the onedir packages put `salt-call`.
const SYSTEM_SALT_CALLS: [&str; 2] = ["/opt/saltstack/salt/salt-call", "/usr/bin/salt-call"];

/// What [`ensure_installed`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    AlreadyPresent(PathBuf),
    Installed(PathBuf),
}

impl InstallOutcome {
    /// The `salt-call` to use either way.
    pub fn salt_call(&self) -> &Path {
        match self {
            InstallOutcome::AlreadyPresent(p) | InstallOutcome::Installed(p) => p,
        }
    }
}

/// Where to look for `salt-call`; the public functions use the process's `PATH` and the
/// system locations, tests substitute their own.
#[derive(Debug, Clone)]
struct Search {
    path_env: Option<OsString>,
    system: Vec<PathBuf>,
}

impl Search {
    fn from_env() -> Self {
        Self {
            path_env: std::env::var_os("PATH"),
            system: SYSTEM_SALT_CALLS.iter().map(PathBuf::from).collect(),
        }
    }
}

/// The pip method's `salt-call`.
pub fn venv_salt_call(layout: &Layout) -> PathBuf {
    layout.salt_venv().join("bin/salt-call")
}

/// Where salt-call is: `configured` if given (it must exist: `None` otherwise), else the pip
/// virtualenv's `bin/salt-call` under the layout, else `salt-call` on `PATH`, else the onedir
/// locations `/opt/saltstack/salt/salt-call` and `/usr/bin/salt-call`.
pub fn find_salt_call(layout: &Layout, configured: Option<&Path>) -> Option<PathBuf> {
    find_with(layout, configured, &Search::from_env())
}

fn find_with(layout: &Layout, configured: Option<&Path>, search: &Search) -> Option<PathBuf> {
    if let Some(c) = configured {
        return is_executable(c).then(|| c.to_path_buf());
    }
    let venv = venv_salt_call(layout);
    if is_executable(&venv) {
        return Some(venv);
    }
    if let Some(path) = &search.path_env {
        for dir in std::env::split_paths(path) {
            if dir.as_os_str().is_empty() {
                continue;
            }
            let candidate = dir.join("salt-call");
            if is_executable(&candidate) {
                return Some(candidate);
            }
        }
    }
    search.system.iter().find(|p| is_executable(p)).cloned()
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Makes sure salt is there. If `salt-call` is found ([`find_salt_call`]) nothing is done;
/// otherwise salt is installed by `spec.method`, and the `salt-call` it produced is returned.
/// `ca_bundle` is the system CA bundle pip must trust (`--cert`) when user-data added CAs: a pip
/// upgraded from PyPI otherwise trusts only its own certifi bundle.
/// `timeout` bounds each program the install runs (`[timeouts] salt_install`).
pub fn ensure_installed(
    layout: &Layout,
    spec: &InstallSpec,
    configured: Option<&Path>,
    ca_bundle: Option<&Path>,
    timeout: Duration,
) -> Result<InstallOutcome> {
    ensure_with(
        layout,
        spec,
        configured,
        ca_bundle,
        &Search::from_env(),
        timeout,
    )
}

fn ensure_with(
    layout: &Layout,
    spec: &InstallSpec,
    configured: Option<&Path>,
    ca_bundle: Option<&Path>,
    search: &Search,
    timeout: Duration,
) -> Result<InstallOutcome> {
    let deadline = Deadline::new(timeout, Timeouts::SALT_INSTALL);
    if let Some(found) = find_with(layout, configured, search) {
        return Ok(InstallOutcome::AlreadyPresent(found));
    }
    let wanted = configured
        .map(|c| format!(" (configured salt_call {} does not exist)", c.display()))
        .unwrap_or_default();
    match spec.method {
        InstallMethod::None => bail!(
            "salt is missing: no salt-call found{wanted} under {}, on PATH, or in {}, and the image's \
             salt install method is `none`; bake salt into the image or set the install method to `pip` or `onedir`",
            layout.salt_venv().display(),
            SYSTEM_SALT_CALLS.join(" or ")
        ),
        InstallMethod::Pip => install_pip(layout, spec, ca_bundle, deadline)?,
        // curl (salt-bootstrap's download) uses the system bundle already.
        InstallMethod::Onedir => install_onedir(layout, spec, deadline)?,
    }
    match find_with(layout, configured, search) {
        Some(p) => Ok(InstallOutcome::Installed(p)),
        None => bail!(
            "installed salt {} with the {:?} method, but still no salt-call{wanted}",
            spec.version,
            spec.method
        ),
    }
}

/// `python -m venv VENV`, then `VENV/bin/python -m pip install [--cert BUNDLE] salt==VERSION`.
fn install_pip(
    layout: &Layout,
    spec: &InstallSpec,
    ca_bundle: Option<&Path>,
    deadline: Deadline,
) -> Result<()> {
    check_version(&spec.version)?;
    let venv = layout.salt_venv();
    tracing::info!(venv = %venv.display(), version = %spec.version, "installing salt with pip");
    if let Some(parent) = venv.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let out = process::run(
        Command::new(&spec.python).arg("-m").arg("venv").arg(&venv),
        &format!("`{} -m venv {}`", spec.python, venv.display()),
        deadline,
    )
    .with_context(|| {
            format!(
                "running `{} -m venv {}` to install salt: is `{}` installed? Set the salt `python` to an installed interpreter",
                spec.python,
                venv.display(),
                spec.python
            )
        })?;
    if !out.status.success() {
        bail!(
            "`{} -m venv {}` failed ({}); is the venv module installed (python3-venv)?\n{}",
            spec.python,
            venv.display(),
            out.status,
            out.tail(15)
        );
    }
    let python = venv.join("bin/python");
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
    ]);
    if let Some(bundle) = ca_bundle {
        pip.arg("--cert").arg(bundle);
    }
    pip.arg(format!("salt=={}", spec.version));
    let out = process::run(
        &mut pip,
        &format!("`pip install salt=={}`", spec.version),
        deadline,
    )?;
    if !out.status.success() {
        bail!(
            "`pip install salt=={}` into {} failed ({}); salt builds native modules (timelib), so the \
             machine needs gcc and the Python headers (python3-dev); pip said:\n{}",
            spec.version,
            venv.display(),
            out.status,
            out.tail(15)
        );
    }
    Ok(())
}

/// A version goes on a command line; keep it to what salt versions look like.
fn check_version(v: &str) -> Result<()> {
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
        bail!("salt version {v:?} is not a version like {DEFAULT_SALT_VERSION}");
    }
    Ok(())
}

/// Downloads salt-bootstrap, checks its sha256, runs `sh FILE -X onedir VERSION`.
fn install_onedir(layout: &Layout, spec: &InstallSpec, deadline: Deadline) -> Result<()> {
    check_version(&spec.version)?;
    let expected = spec.bootstrap_sha256.trim().to_ascii_lowercase();
    if expected.is_empty() {
        bail!(
            "refusing to run salt-bootstrap from {} without a checksum: set bootstrap_sha256 to the sha256 of that script",
            spec.bootstrap_url
        );
    }
    if expected.len() != 64 || !expected.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "bootstrap_sha256 {:?} is not a sha256 (64 hex digits)",
            spec.bootstrap_sha256
        );
    }
    let dir = layout.state_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join(format!(".bootstrap-salt.{}.sh", std::process::id()));
    let result = (|| -> Result<()> {
        tracing::info!(url = %spec.bootstrap_url, "downloading salt-bootstrap");
        let out = process::run(
            Command::new("curl")
                .args(["-fsSL", "--retry", "3", "-o"])
                .arg(&script)
                .arg(&spec.bootstrap_url),
            &format!("the download of salt-bootstrap from {}", spec.bootstrap_url),
            deadline,
        )
        .context("running curl to download salt-bootstrap: is curl installed?")?;
        if !out.status.success() {
            bail!(
                "downloading salt-bootstrap from {} failed ({}): {}",
                spec.bootstrap_url,
                out.status,
                out.tail(5)
            );
        }
        let data = fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
        let actual = hex(sha256(&data).as_ref());
        if actual != expected {
            bail!(
                "salt-bootstrap from {} has sha256 {actual}, expected {expected}; not running it \
                 (if the release changed on purpose, update bootstrap_url and bootstrap_sha256 together)",
                spec.bootstrap_url
            );
        }
        tracing::info!(version = %spec.version, "running salt-bootstrap -X onedir");
        let out = process::run(
            Command::new("sh")
                .arg(&script)
                .args(["-X", "onedir", &spec.version]),
            &format!("salt-bootstrap -X onedir {}", spec.version),
            deadline,
        )
        .context("running sh for salt-bootstrap")?;
        if !out.status.success() {
            bail!(
                "salt-bootstrap -X onedir {} failed ({}):\n{}",
                spec.version,
                out.status,
                out.tail(15)
            );
        }
        Ok(())
    })();
    let _ = fs::remove_file(&script);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    const T: Duration = Duration::from_secs(60);

    fn no_search() -> Search {
        Search {
            path_env: Some(OsString::new()),
            system: vec![],
        }
    }

    fn write_exe(p: &Path, body: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, body).unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Serves `body` for every request on a loopback port, in a thread, until the test ends.
    fn serve(body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            }
        });
        format!("http://127.0.0.1:{port}/bootstrap-salt.sh")
    }

    /// A fake salt-bootstrap: records its arguments and "installs" salt-call at `salt_call`.
    fn fake_bootstrap(marker: &Path, salt_call: &Path) -> Vec<u8> {
        format!(
            "#!/bin/sh\necho \"$@\" > '{}'\nmkdir -p '{}'\nprintf '#!/bin/sh\\n' > '{}'\nchmod 755 '{}'\n",
            marker.display(),
            salt_call.parent().unwrap().display(),
            salt_call.display(),
            salt_call.display()
        )
        .into_bytes()
    }

    #[test]
    fn finds_configured_then_venv_then_path_then_system() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let bin = dir.path().join("bin");
        let system = dir.path().join("opt/saltstack/salt/salt-call");
        let search = Search {
            path_env: Some(bin.clone().into_os_string()),
            system: vec![system.clone()],
        };
        assert_eq!(find_with(&layout, None, &search), None);
        write_exe(&system, "#!/bin/sh\n");
        assert_eq!(find_with(&layout, None, &search), Some(system.clone()));
        write_exe(&bin.join("salt-call"), "#!/bin/sh\n");
        assert_eq!(
            find_with(&layout, None, &search),
            Some(bin.join("salt-call"))
        );
        write_exe(&venv_salt_call(&layout), "#!/bin/sh\n");
        assert_eq!(
            find_with(&layout, None, &search),
            Some(venv_salt_call(&layout))
        );
        // An explicit path wins, and must exist.
        assert_eq!(
            find_with(&layout, Some(&system), &search),
            Some(system.clone())
        );
        assert_eq!(
            find_with(&layout, Some(&dir.path().join("nope")), &search),
            None
        );
        // A file that is not executable is not salt-call.
        fs::set_permissions(&system, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!is_executable(&system));
    }

    #[test]
    fn already_present_does_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let sc = dir.path().join("salt-call");
        write_exe(&sc, "#!/bin/sh\n");
        let spec = InstallSpec {
            method: InstallMethod::None,
            ..Default::default()
        };
        assert_eq!(
            ensure_with(&layout, &spec, Some(&sc), None, &no_search(), T).unwrap(),
            InstallOutcome::AlreadyPresent(sc)
        );
    }

    #[test]
    fn method_none_errors_when_salt_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let spec = InstallSpec {
            method: InstallMethod::None,
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            ensure_with(&layout, &spec, None, None, &no_search(), T).unwrap_err()
        );
        assert!(
            err.contains("salt is missing") && err.contains("`none`"),
            "{err}"
        );
    }

    #[test]
    fn pip_with_a_missing_python_errors_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let spec = InstallSpec {
            python: "python-that-does-not-exist-3".into(),
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            ensure_with(&layout, &spec, None, None, &no_search(), T).unwrap_err()
        );
        assert!(
            err.contains("python-that-does-not-exist-3 -m venv"),
            "{err}"
        );
        assert!(!venv_salt_call(&layout).exists());
    }

    #[test]
    fn pip_trusts_the_system_bundle_when_given() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let log = dir.path().join("pip-args");
        // A fake interpreter: `-m venv DIR` makes DIR/bin/python, which logs the pip arguments
        // and "installs" salt-call.
        let python = dir.path().join("python3");
        write_exe(
            &python,
            &format!(
                "#!/bin/sh\nmkdir -p \"$3/bin\"\nprintf '#!/bin/sh\\necho \"$*\" > {log}\\nprintf \"#!/bin/sh\\\\n\" > %s/bin/salt-call\\nchmod 755 %s/bin/salt-call\\n' \"$3\" \"$3\" > \"$3/bin/python\"\nchmod 755 \"$3/bin/python\"\n",
                log = log.display()
            ),
        );
        let spec = InstallSpec {
            python: python.display().to_string(),
            ..Default::default()
        };
        let bundle = layout.join("etc/ssl/certs/ca-certificates.crt");
        let outcome = ensure_with(&layout, &spec, None, Some(&bundle), &no_search(), T).unwrap();
        assert_eq!(outcome, InstallOutcome::Installed(venv_salt_call(&layout)));
        let args = fs::read_to_string(&log).unwrap();
        assert!(
            args.contains(&format!("--cert {} salt==", bundle.display())),
            "{args}"
        );
    }

    /// Runs an install that must be killed at `deadline`; returns its error.
    fn killed_install(layout: &Layout, spec: &InstallSpec, deadline: Duration) -> String {
        let started = std::time::Instant::now();
        let err = ensure_with(layout, spec, None, None, &no_search(), deadline).unwrap_err();
        assert!(started.elapsed() < deadline + Duration::from_secs(10));
        let err = format!("{err:#}");
        assert!(
            err.contains(&format!(
                "did not finish within {}; killed",
                humantime::format_duration(deadline)
            )) && err.contains("raise [timeouts] salt_install"),
            "{err}"
        );
        err
    }

    #[test]
    fn a_hung_venv_or_pip_is_killed_with_its_processes() {
        use crate::process::testing::{assert_dead, hang_with_grandchild, pidfile};
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let pids = pidfile(dir.path());
        // First `python -m venv` hangs; then a venv whose python (pip) hangs.
        let hung_venv = dir.path().join("python-venv-hangs");
        write_exe(
            &hung_venv,
            &format!("#!/bin/sh\n{}\n", hang_with_grandchild(&pids)),
        );
        let hung_pip = dir.path().join("python-pip-hangs");
        write_exe(
            &hung_pip,
            &format!(
                "#!/bin/sh\nmkdir -p \"$3/bin\"\ncp '{}' \"$3/bin/python\"\n",
                hung_venv.display()
            ),
        );
        for (python, what) in [(&hung_venv, "-m venv"), (&hung_pip, "`pip install salt==")] {
            let _ = fs::remove_file(&pids);
            let spec = InstallSpec {
                python: python.display().to_string(),
                ..Default::default()
            };
            let err = killed_install(&layout, &spec, Duration::from_millis(500));
            assert!(err.contains(what), "{err}");
            assert_dead(&pids);
        }
    }

    #[test]
    fn a_hung_bootstrap_download_is_killed() {
        // A server that accepts and never answers; curl has no deadline of its own.
        let (port, closed) = crate::process::testing::silent_server();
        let dir = tempfile::tempdir().unwrap();
        let spec = InstallSpec {
            method: InstallMethod::Onedir,
            bootstrap_url: format!("http://127.0.0.1:{port}/bootstrap-salt.sh"),
            ..Default::default()
        };
        let err = killed_install(&Layout::new(dir.path()), &spec, Duration::from_millis(500));
        assert!(
            err.contains("the download of salt-bootstrap from http://127.0.0.1"),
            "{err}"
        );
        closed
            .recv_timeout(Duration::from_secs(5))
            .expect("the killed curl still holds its connection");
    }

    #[test]
    fn a_hung_salt_bootstrap_is_killed_with_its_processes() {
        use crate::process::testing::{assert_dead, hang_with_grandchild, pidfile};
        let dir = tempfile::tempdir().unwrap();
        let pids = pidfile(dir.path());
        let script = format!("#!/bin/sh\n{}\n", hang_with_grandchild(&pids)).into_bytes();
        let spec = InstallSpec {
            method: InstallMethod::Onedir,
            bootstrap_url: serve(script.clone()),
            bootstrap_sha256: hex(sha256(&script).as_ref()),
            ..Default::default()
        };
        let layout = Layout::new(dir.path().join("root"));
        let err = killed_install(&layout, &spec, Duration::from_secs(2));
        assert!(
            err.contains("salt-bootstrap -X onedir 3008.4 did not finish"),
            "{err}"
        );
        assert_dead(&pids);
    }

    #[test]
    fn onedir_runs_bootstrap_with_a_good_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let marker = dir.path().join("bootstrap-ran");
        let system = dir.path().join("opt/saltstack/salt/salt-call");
        let script = fake_bootstrap(&marker, &system);
        let spec = InstallSpec {
            method: InstallMethod::Onedir,
            version: "3008.4".into(),
            bootstrap_url: serve(script.clone()),
            bootstrap_sha256: hex(sha256(&script).as_ref()).to_uppercase(),
            python: "python3".into(),
        };
        let search = Search {
            path_env: Some(OsString::new()),
            system: vec![system.clone()],
        };
        let outcome = ensure_with(&layout, &spec, None, None, &search, T).unwrap();
        assert_eq!(outcome, InstallOutcome::Installed(system));
        assert_eq!(
            fs::read_to_string(&marker).unwrap().trim(),
            "-X onedir 3008.4"
        );
        // The downloaded script does not linger.
        let leftovers: Vec<_> = fs::read_dir(layout.state_dir()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn onedir_refuses_a_bad_or_missing_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let marker = dir.path().join("bootstrap-ran");
        let system = dir.path().join("opt/saltstack/salt/salt-call");
        let script = fake_bootstrap(&marker, &system);
        let actual = hex(sha256(&script).as_ref());
        let wrong = "0".repeat(64);
        let mut spec = InstallSpec {
            method: InstallMethod::Onedir,
            bootstrap_url: serve(script),
            bootstrap_sha256: wrong.clone(),
            ..Default::default()
        };
        let search = Search {
            path_env: Some(OsString::new()),
            system: vec![system.clone()],
        };
        let err = format!(
            "{:#}",
            ensure_with(&layout, &spec, None, None, &search, T).unwrap_err()
        );
        assert!(err.contains(&actual) && err.contains(&wrong), "{err}");
        assert!(!marker.exists() && !system.exists());

        spec.bootstrap_sha256 = String::new();
        let err = format!(
            "{:#}",
            ensure_with(&layout, &spec, None, None, &search, T).unwrap_err()
        );
        assert!(err.contains("set bootstrap_sha256"), "{err}");
        assert!(!marker.exists());
    }

    #[test]
    fn onedir_download_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        // A port nothing listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = InstallSpec {
            method: InstallMethod::Onedir,
            bootstrap_url: format!("http://127.0.0.1:{port}/bootstrap-salt.sh"),
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            ensure_with(&layout, &spec, None, None, &no_search(), T).unwrap_err()
        );
        assert!(err.contains("downloading salt-bootstrap"), "{err}");
    }

    #[test]
    fn spec_defaults_and_serde() {
        let spec: InstallSpec = toml::from_str("method = \"onedir\"").unwrap();
        assert_eq!(spec.method, InstallMethod::Onedir);
        assert_eq!(spec.version, DEFAULT_SALT_VERSION);
        assert_eq!(spec.bootstrap_sha256.len(), 64);
        assert!(DEFAULT_BOOTSTRAP_URL
            .starts_with("https://github.com/saltstack/salt-bootstrap/releases/download/v"));
        assert!(check_version("3008.4").is_ok());
        assert!(check_version("3008; rm -rf /").is_err());
    }
}
