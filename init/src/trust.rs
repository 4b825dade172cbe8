//! Extra certificate authorities from user-data (`ca_certificates`, like cloud-init's
//! `ca_certs`), trusted before anything reaches the network: salt's pip install at a first boot
//! and git over https. Fleets behind a TLS-intercepting proxy need this.
//!
//! Each certificate goes into its own file (the first `stackless-user-data.crt`, then
//! `stackless-user-data-2.crt`, ...: `openssl rehash` skips files holding several certificates)
//! in the folder the system's tool reads, and the tool rebuilds the system bundle:
//! `update-ca-certificates` (Debian, Ubuntu) from `/usr/local/share/ca-certificates`, else
//! `update-ca-trust extract` (RHEL family, Amazon Linux) from `/etc/pki/ca-trust/source/anchors`.
//! Files are rewritten, and the tool run, only when the certificates changed; removing the key
//! from user-data removes the files and refreshes once more.

use crate::fsutil::write_if_changed;
use crate::paths::Layout;
use crate::process::{self, Deadline};
pub use crate::userdata::pem::{split_certificates, PemError, BEGIN, END};
use crate::userdata::Timeouts;
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Stem of the files the agent owns in the trust folders.
pub const FILE_STEM: &str = "stackless-user-data";
/// Where `update-ca-certificates` reads local certificates.
pub const DEBIAN_DIR: &str = "/usr/local/share/ca-certificates";
/// Where `update-ca-trust` reads extra anchors.
pub const RHEL_DIR: &str = "/etc/pki/ca-trust/source/anchors";
/// The bundles the two tools produce (OpenSSL's, hence Python's and git's, default CA file).
pub const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];
/// Where the tools are looked for besides `PATH` (a unit's `PATH` may lack the sbin folders).
const TOOL_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The tool that rebuilds the system's trust store, and how to call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tool {
    /// `update-ca-certificates` (Debian, Ubuntu), reading [`DEBIAN_DIR`].
    Debian(PathBuf),
    /// `update-ca-trust` (RHEL family, Amazon Linux), reading [`RHEL_DIR`].
    Rhel(PathBuf),
}

impl Tool {
    /// Finds the tool. On the system root: `PATH`, then the usual bin and sbin folders. Under
    /// another root (`--root`, tests) only inside that root, never the host's tools: they would
    /// change the host's trust store.
    pub fn discover(layout: &Layout) -> Option<Tool> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if layout.is_system_root() {
            if let Some(path) = std::env::var_os("PATH") {
                dirs.extend(std::env::split_paths(&path).filter(|d| d.is_absolute()));
            }
        }
        dirs.extend(TOOL_DIRS.iter().map(|d| layout.join(d)));
        let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| is_executable(p));
        find("update-ca-certificates")
            .map(Tool::Debian)
            .or_else(|| find("update-ca-trust").map(Tool::Rhel))
    }

    /// The folder this tool reads extra certificates from.
    pub fn dir(&self, layout: &Layout) -> PathBuf {
        match self {
            Tool::Debian(_) => layout.join(DEBIAN_DIR),
            Tool::Rhel(_) => layout.join(RHEL_DIR),
        }
    }

    fn command(&self, layout: &Layout) -> Command {
        match self {
            Tool::Debian(p) => {
                let mut c = Command::new(p);
                if !layout.is_system_root() {
                    // Keep every file the tool reads and writes under the root.
                    for (flag, dir) in [
                        ("--certsconf", "/etc/ca-certificates.conf"),
                        ("--certsdir", "/usr/share/ca-certificates"),
                        ("--localcertsdir", DEBIAN_DIR),
                        ("--etccertsdir", "/etc/ssl/certs"),
                        ("--hooksdir", "/etc/ca-certificates/update.d"),
                    ] {
                        c.arg(flag).arg(layout.join(dir));
                    }
                }
                c
            }
            Tool::Rhel(p) => {
                let mut c = Command::new(p);
                c.arg("extract");
                c
            }
        }
    }

    fn run(&self, layout: &Layout, timeout: Duration) -> Result<()> {
        if matches!(self, Tool::Debian(_)) && !layout.is_system_root() {
            // The tool changes into this folder first; a bare test root lacks it.
            let certs = layout.join("/etc/ssl/certs");
            fs::create_dir_all(&certs).with_context(|| format!("creating {}", certs.display()))?;
        }
        let mut cmd = self.command(layout);
        let shown = format!("{cmd:?}").replace('"', "");
        let out = process::run(
            &mut cmd,
            &format!("`{shown}`"),
            Deadline::new(timeout, Timeouts::TRUST),
        )
        .with_context(|| format!("running `{shown}` to refresh the trusted certificates"))?;
        if !out.status.success() {
            let said = out.tail(10);
            bail!("`{shown}` failed ({}); the trusted certificates were not refreshed and are retried at the next boot:\n{said}", out.status);
        }
        Ok(())
    }
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The system CA bundle under the layout, if the trust tool has produced one. pip upgraded from
/// PyPI trusts its own certifi bundle, not this one, unless told (`--cert`).
pub fn system_bundle(layout: &Layout) -> Option<PathBuf> {
    SYSTEM_BUNDLES
        .iter()
        .map(|b| layout.join(b))
        .find(|p| p.is_file())
}

/// The agent's files in `dir`: `stackless-user-data.crt` and `stackless-user-data-N.crt`.
fn owned_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(FILE_STEM) && name.ends_with(".crt") {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(index: usize) -> String {
    if index == 0 {
        format!("{FILE_STEM}.crt")
    } else {
        format!("{FILE_STEM}-{}.crt", index + 1)
    }
}

/// Makes the system trust exactly the certificates of `bundle` (besides its own), or none of
/// ours when `bundle` is `None`. `tool` is [`Tool::discover`]'s answer (tests pass a fake);
/// `timeout` bounds its run (`[timeouts] trust`). Returns a detail line for the boot timeline.
pub fn apply(
    layout: &Layout,
    bundle: Option<&str>,
    tool: Option<&Tool>,
    timeout: Duration,
) -> Result<String> {
    let certs = match bundle {
        Some(b) => split_certificates(b).map_err(|e| {
            anyhow::anyhow!("ca_certificates: {} (at byte {})", e.message, e.offset)
        })?,
        None => Vec::new(),
    };
    let no_tool = || {
        anyhow::anyhow!(
            "neither update-ca-certificates (Debian, Ubuntu) nor update-ca-trust (RHEL, Amazon Linux) \
             was found{}; install the ca-certificates package in the image, or remove ca_certificates from the user-data",
            if layout.is_system_root() {
                " on PATH or in /usr/sbin".to_string()
            } else {
                format!(" under {}", layout.root().display())
            }
        )
    };
    let mut changed = false;
    if certs.is_empty() {
        // Removed from user-data: take our files out of both folders (the image may have
        // changed families), and refresh if there were any.
        for dir in [layout.join(DEBIAN_DIR), layout.join(RHEL_DIR)] {
            for f in owned_files(&dir)? {
                fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
                changed = true;
            }
        }
        if !changed {
            return Ok("none".into());
        }
        tool.ok_or_else(no_tool)?.run(layout, timeout)?;
        return Ok("removed the user-data certificates".into());
    }
    let tool = tool.ok_or_else(no_tool)?;
    let dir = tool.dir(layout);
    let wanted: Vec<PathBuf> = (0..certs.len()).map(|i| dir.join(file_name(i))).collect();
    for (path, cert) in wanted.iter().zip(&certs) {
        changed |= write_if_changed(path, cert.as_bytes(), 0o644)
            .with_context(|| format!("writing the user-data certificate {}", path.display()))?;
    }
    for f in owned_files(&dir)? {
        if !wanted.contains(&f) {
            fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
            changed = true;
        }
    }
    let n = certs.len();
    if !changed {
        return Ok(format!("{n} certificate(s) unchanged"));
    }
    if let Err(e) = tool.run(layout, timeout) {
        // Without the files, the next boot writes them again and retries the refresh.
        for f in &wanted {
            let _ = fs::remove_file(f);
        }
        return Err(e);
    }
    Ok(format!("{n} certificate(s) trusted in {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B64: &str = "MIIBszCCAVmgAwIBAgIUQ2Vy";
    const T: Duration = Duration::from_secs(60);

    fn cert(body: &str) -> String {
        format!("{BEGIN}\n{body}\n{END}\n")
    }

    /// A stand-in trust tool that appends its arguments to `calls`.
    fn fake_tool(dir: &Path, name: &str) -> PathBuf {
        let script = dir.join("bin").join(name);
        fs::create_dir_all(script.parent().unwrap()).unwrap();
        fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"{name} $*\" >> '{}'\n",
                dir.join("calls").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn calls(dir: &Path) -> Vec<String> {
        fs::read_to_string(dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn writes_refreshes_keeps_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let tool = Tool::Debian(fake_tool(dir.path(), "update-ca-certificates"));
        let one = cert(B64);
        let two = format!("{one}{}", cert("QUJD"));

        let detail = apply(&layout, Some(&one), Some(&tool), T).unwrap();
        assert!(detail.contains("1 certificate(s) trusted"), "{detail}");
        let file = layout.join(DEBIAN_DIR).join("stackless-user-data.crt");
        assert_eq!(fs::read_to_string(&file).unwrap(), one);
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let c = calls(dir.path());
        assert_eq!(c.len(), 1);
        // Under a test root the real tool would stay inside it too.
        assert!(
            c[0].contains(&format!(
                "--localcertsdir {}",
                layout.join(DEBIAN_DIR).display()
            )),
            "{c:?}"
        );

        // Unchanged: no write, no refresh.
        let mtime = fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(apply(&layout, Some(&one), Some(&tool), T)
            .unwrap()
            .contains("unchanged"));
        assert_eq!(fs::metadata(&file).unwrap().modified().unwrap(), mtime);
        assert_eq!(calls(dir.path()).len(), 1);

        // Two certificates: one file each.
        apply(&layout, Some(&two), Some(&tool), T).unwrap();
        assert!(layout
            .join(DEBIAN_DIR)
            .join("stackless-user-data-2.crt")
            .is_file());
        assert_eq!(calls(dir.path()).len(), 2);
        // Back to one: the second file goes.
        apply(&layout, Some(&one), Some(&tool), T).unwrap();
        assert!(!layout
            .join(DEBIAN_DIR)
            .join("stackless-user-data-2.crt")
            .exists());
        assert_eq!(calls(dir.path()).len(), 3);

        // Key removed: files gone, one refresh; then nothing more to do.
        assert!(apply(&layout, None, Some(&tool), T)
            .unwrap()
            .contains("removed"));
        assert!(!file.exists());
        assert_eq!(calls(dir.path()).len(), 4);
        assert_eq!(apply(&layout, None, Some(&tool), T).unwrap(), "none");
        assert_eq!(apply(&layout, None, None, T).unwrap(), "none");
        assert_eq!(calls(dir.path()).len(), 4);
    }

    #[test]
    fn rhel_uses_the_anchors_folder_and_extract() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let tool = Tool::Rhel(fake_tool(dir.path(), "update-ca-trust"));
        apply(&layout, Some(&cert(B64)), Some(&tool), T).unwrap();
        assert!(layout
            .join(RHEL_DIR)
            .join("stackless-user-data.crt")
            .is_file());
        assert_eq!(
            calls(dir.path()),
            vec!["update-ca-trust extract".to_string()]
        );
    }

    #[test]
    fn no_tool_or_a_failing_tool_is_a_clear_error_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let e = format!(
            "{:#}",
            apply(&layout, Some(&cert(B64)), None, T).unwrap_err()
        );
        assert!(
            e.contains("update-ca-certificates") && e.contains("ca-certificates package"),
            "{e}"
        );

        let failing = dir.path().join("failing");
        fs::write(&failing, "#!/bin/sh\necho 'no openssl' >&2\nexit 3\n").unwrap();
        fs::set_permissions(&failing, fs::Permissions::from_mode(0o755)).unwrap();
        let e = format!(
            "{:#}",
            apply(&layout, Some(&cert(B64)), Some(&Tool::Debian(failing)), T).unwrap_err()
        );
        assert!(e.contains("no openssl") && e.contains("next boot"), "{e}");
        // The file is gone again, so the next boot writes it and refreshes.
        assert!(!layout
            .join(DEBIAN_DIR)
            .join("stackless-user-data.crt")
            .exists());
    }

    #[test]
    fn a_hung_trust_tool_is_killed_with_its_processes() {
        use crate::process::testing::{assert_dead, hang_with_grandchild, pidfile, script};
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("root"));
        let pids = pidfile(dir.path());
        for tool in [
            Tool::Debian(script(
                &dir.path().join("deb"),
                "update-ca-certificates",
                &hang_with_grandchild(&pids),
            )),
            Tool::Rhel(script(
                &dir.path().join("rhel"),
                "update-ca-trust",
                &hang_with_grandchild(&pids),
            )),
        ] {
            let _ = fs::remove_file(&pids);
            let started = std::time::Instant::now();
            let e = format!(
                "{:#}",
                apply(
                    &layout,
                    Some(&cert(B64)),
                    Some(&tool),
                    Duration::from_millis(500)
                )
                .unwrap_err()
            );
            assert!(started.elapsed() < Duration::from_secs(10));
            assert!(
                e.contains("did not finish within 500ms; killed")
                    && e.contains("raise [timeouts] trust"),
                "{e}"
            );
            assert_dead(&pids);
        }
    }

    #[test]
    fn discovery_under_a_root_looks_only_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert_eq!(Tool::discover(&layout), None);
        let rhel = layout.join("/usr/bin/update-ca-trust");
        fs::create_dir_all(rhel.parent().unwrap()).unwrap();
        fs::write(&rhel, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&rhel, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(Tool::discover(&layout), Some(Tool::Rhel(rhel)));
        let deb = layout.join("/usr/sbin/update-ca-certificates");
        fs::create_dir_all(deb.parent().unwrap()).unwrap();
        fs::write(&deb, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&deb, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(Tool::discover(&layout), Some(Tool::Debian(deb)));
        assert_eq!(system_bundle(&layout), None);
    }
}
