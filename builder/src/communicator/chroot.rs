//! The local communicator: the same command stream the SSM communicator sends, run by bash
//! inside the build root with `chroot(8)`, with a clean environment.

use crate::communicator::{CommandOutput, Communicator};
use crate::platform::local::process::KillGroupOnDrop;
use anyhow::{anyhow, Context, Result};
use async_trait::async_trait;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Where the host's CA bundle is, and where the build root trusts it (removed when generalising).
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const BUILD_CA_IN_ROOT: &str = "usr/local/share/ca-certificates/stackless-build-host.crt";

pub struct ChrootCommunicator {
    root: PathBuf,
    /// Point pip, requests and OpenSSL at the root's bundle (which holds the host's CAs while
    /// building): a pip upgraded from PyPI carries its own bundle otherwise.
    trust_system_bundle: bool,
    /// `PIP_CACHE_DIR` inside the root, where the builder mounted its pip cache.
    pip_cache: Option<String>,
}

impl ChrootCommunicator {
    pub fn new(root: PathBuf, trust_system_bundle: bool) -> Self {
        Self {
            root,
            trust_system_bundle,
            pip_cache: None,
        }
    }

    /// pip inside the root keeps its cache at `dir` (built wheels, downloads).
    pub fn with_pip_cache(mut self, dir: &str) -> Self {
        self.pip_cache = Some(dir.to_owned());
        self
    }

    fn command(&self, command: &str) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.root)
            .args(["/bin/bash", "-c", command])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive");
        if let Some(dir) = &self.pip_cache {
            c.env("PIP_CACHE_DIR", dir);
        }
        if self.trust_system_bundle {
            for var in ["SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"] {
                c.env(var, HOST_CA_BUNDLE);
            }
        }
        c
    }
}

#[async_trait]
impl Communicator for ChrootCommunicator {
    async fn run(&self, what: &str, command: &str, timeout: Duration) -> Result<CommandOutput> {
        let child = self
            .command(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout or an interrupt stops apt, dpkg and pip too,
            // not just the shell.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("{what}: starting chroot {}", self.root.display()))?;
        let group = KillGroupOnDrop(child.id().map(|p| p as i32));
        let out = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                anyhow!(
                    "{what}: did not finish within {timeout:?} in {}",
                    self.describe()
                )
            })?
            .with_context(|| format!("{what}: waiting for the chroot"))?;
        drop(group);
        Ok(CommandOutput {
            // Killed by a signal: no code; report it as failed.
            exit_code: out.status.code().unwrap_or(128),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            truncated: false,
        })
    }

    fn describe(&self) -> String {
        format!("chroot {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::communicator::run_checked;

    /// A root with a static-enough shell: the host's bash and its libraries, copied.
    fn minimal_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ldd = std::process::Command::new("ldd")
            .arg("/bin/bash")
            .output()
            .unwrap();
        let mut files = vec!["/bin/bash".to_string(), "/usr/bin/env".to_string()];
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(p.to_string());
            }
        }
        let ldd_env = std::process::Command::new("ldd")
            .arg("/usr/bin/env")
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&ldd_env.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(p.to_string());
            }
        }
        for f in files {
            let to = root.join(f.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&f, &to).unwrap();
        }
        dir
    }

    // Needs root (chroot); CI runs as root.
    #[tokio::test]
    async fn runs_inside_the_root_with_a_clean_environment() {
        let root = minimal_root();
        std::fs::write(root.path().join("marker"), "inside").unwrap();
        let c = ChrootCommunicator::new(root.path().to_path_buf(), true);
        std::env::set_var("STACKLESS_LEAK_TEST", "leaked");
        let out = run_checked(
            &c,
            "probe",
            "read -r m < /marker; echo \"$m $HOME ${STACKLESS_LEAK_TEST:-clean} $PIP_CERT\"",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(
            out.stdout.trim(),
            "inside /root clean /etc/ssl/certs/ca-certificates.crt"
        );
        let out = c
            .run("failing", "echo oops >&2; exit 7", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!((out.exit_code, out.stderr.trim()), (7, "oops"));
        let e = c
            .run("slow", "while :; do :; done", Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish"), "{e}");
    }
}
