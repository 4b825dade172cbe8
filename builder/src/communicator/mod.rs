//! How commands reach the machine being baked: SSM Run Command on AWS, a chroot locally. Both
//! run the very same command stream (see `transfer`), so the local build exercises the AWS path.

pub mod chroot;
pub mod ssm;

use anyhow::{bail, Result};
use async_trait::async_trait;
use std::time::Duration;

/// What a command printed and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The transport cut the output (SSM returns at most 24,000 characters of stdout).
    pub truncated: bool,
}

#[async_trait]
pub trait Communicator: Send + Sync {
    /// Runs one bash command as root on the machine, within `timeout`.
    async fn run(&self, what: &str, command: &str, timeout: Duration) -> Result<CommandOutput>;
    /// For messages: "i-0abc over SSM", "chroot /tmp/x".
    fn describe(&self) -> String;
}

/// The last `n` lines of `s`, for error messages.
pub fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a command and fails, with its output, unless it exits 0.
pub async fn run_checked(
    c: &dyn Communicator,
    what: &str,
    command: &str,
    timeout: Duration,
) -> Result<CommandOutput> {
    let out = c.run(what, command, timeout).await?;
    if out.exit_code != 0 {
        let tail = |s: &str| last_lines(s, 20);
        bail!(
            "{what} failed on {} (exit {}){}\n--- stdout (last lines) ---\n{}\n--- stderr (last lines) ---\n{}",
            c.describe(),
            out.exit_code,
            if out.truncated { "; output was cut by the transport" } else { "" },
            tail(&out.stdout),
            tail(&out.stderr)
        );
    }
    Ok(out)
}
