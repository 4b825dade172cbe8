//! Handing a repository's secret to git without argv, the URL, `.git/config` or any file outside
//! `/run`.
//!
//! - HTTPS token: `GIT_ASKPASS` points at the agent itself (`stackless-init askpass`), which
//!   answers git's username prompt with the configured user name and its password prompt with
//!   the token, read from a 0600 file in a 0700 folder under `/run/stackless` (a tmpfs) that is
//!   removed when the git command ends. The environment carries only the file's path: a secret
//!   in the environment would sit in `/proc/PID/environ` of git and every helper for their whole
//!   life. `credential.helper` is emptied so no helper stores it, `GIT_TERMINAL_PROMPT=0`.
//! - SSH deploy key: the key and the known hosts as 0600 files in the same kind of folder, and
//!   `GIT_SSH_COMMAND` with `-i KEY -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes
//!   -o UserKnownHostsFile=FILE` (no agent, no user or system ssh config, no other known hosts).

use crate::aws::ssm::Secret;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where `stackless-init askpass` finds the secret file (a path, never the secret).
pub const ASKPASS_FILE_ENV: &str = "STACKLESS_ASKPASS_FILE";

/// The secret material of one sync, in a private folder removed on drop.
#[derive(Debug)]
pub struct GitAuth {
    dir: PathBuf,
    env: Vec<(&'static str, OsString)>,
    config: Vec<String>,
}

impl GitAuth {
    /// HTTPS basic auth through `askpass` (normally this very program, `stackless-init`).
    pub fn https_token(
        run_dir: &Path,
        username: &str,
        token: &Secret,
        askpass: &Path,
    ) -> Result<GitAuth> {
        if token.expose().contains(['\n', '\r']) || token.expose().trim().is_empty() {
            bail!("the token is empty or has a line break; store the token alone in the parameter");
        }
        let dir = private_dir(run_dir)?;
        let mut auth = GitAuth {
            dir,
            env: Vec::new(),
            config: vec!["credential.helper=".to_string()],
        };
        let file = auth.dir.join("askpass");
        write_private(
            &file,
            format!("{username}\n{}\n", token.expose().trim()).as_bytes(),
        )?;
        auth.env = vec![
            ("GIT_ASKPASS", askpass.as_os_str().to_owned()),
            ("SSH_ASKPASS", OsString::new()),
            (ASKPASS_FILE_ENV, file.into_os_string()),
        ];
        Ok(auth)
    }

    /// SSH with a deploy key, trusting only `known_hosts`.
    pub fn ssh_key(run_dir: &Path, key: &Secret, known_hosts: &str) -> Result<GitAuth> {
        if !key.expose().contains("PRIVATE KEY-----") {
            bail!("the parameter does not hold a private key in PEM/OpenSSH form");
        }
        let dir = private_dir(run_dir)?;
        let mut auth = GitAuth {
            dir,
            env: Vec::new(),
            config: Vec::new(),
        };
        let key_file = auth.dir.join("key");
        let mut text = key.expose().replace("\r\n", "\n");
        if !text.ends_with('\n') {
            // ssh refuses a key without its final newline ("invalid format").
            text.push('\n');
        }
        write_private(&key_file, text.as_bytes())?;
        let hosts_file = auth.dir.join("known_hosts");
        write_private(&hosts_file, format!("{}\n", known_hosts.trim()).as_bytes())?;
        let command = format!(
            "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o IdentityAgent=none \
             -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} \
             -o GlobalKnownHostsFile=/dev/null -o BatchMode=yes -o UpdateHostKeys=no",
            shell_quote(&key_file),
            shell_quote(&hosts_file)
        );
        auth.env = vec![
            ("GIT_SSH_COMMAND", command.into()),
            ("GIT_SSH_VARIANT", "ssh".into()),
        ];
        Ok(auth)
    }

    /// Adds the environment and `-c` settings to a git command (before its subcommand).
    pub fn apply(&self, cmd: &mut Command) {
        for c in &self.config {
            cmd.arg("-c").arg(c);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for GitAuth {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}

/// A fresh 0700 folder `git-auth-PID-N` under `run_dir` (itself created 0700 when missing).
fn private_dir(run_dir: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .with_context(|| format!("creating {}", run_dir.display()))?;
    remove_orphans(run_dir);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = run_dir.join(format!("git-auth-{}-{n}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Secret folders of agents that died without cleaning up (SIGKILL at a stop timeout, a panic
/// under panic=abort): removed before a new one is made, so no secret outlives its sync for long.
fn remove_orphans(run_dir: &Path) {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("git-auth-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::debug!("removing {}: its agent is gone", entry.path().display());
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Single-quoted for the shell git runs `GIT_SSH_COMMAND` with.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// `stackless-init askpass PROMPT`: what git's askpass protocol wants on stdout. The user name
/// for a prompt starting `Username`, the token for one starting `Password`; anything else is an
/// error (git then fails instead of hanging).
pub fn askpass_answer(prompt: &str, file_contents: &str) -> Result<String> {
    let mut lines = file_contents.lines();
    let (Some(username), Some(token)) = (lines.next(), lines.next()) else {
        bail!("the askpass file is incomplete");
    };
    if prompt.starts_with("Username") {
        Ok(username.to_string())
    } else if prompt.starts_with("Password") {
        Ok(token.to_string())
    } else {
        bail!("unexpected askpass prompt (only Username and Password are answered)")
    }
}

/// The `askpass` subcommand: reads [`ASKPASS_FILE_ENV`], prints the answer.
pub fn askpass_main(prompt: &str) -> Result<()> {
    let Some(file) = std::env::var_os(ASKPASS_FILE_ENV) else {
        bail!(
            "{ASKPASS_FILE_ENV} is not set: `stackless-init askpass` is for git, run by the agent"
        );
    };
    let text = fs::read_to_string(&file)
        .with_context(|| format!("reading {}", Path::new(&file).display()))?;
    let answer = askpass_answer(prompt, &text)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{answer}")?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests;
