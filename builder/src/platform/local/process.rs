//! Running host programs (debootstrap, mount, mke2fs, qemu-img) with a deadline, failing with
//! what was being done and the program's last words. Each runs in its own process group, killed
//! whole at its deadline (debootstrap's dpkg, a wrapper's children).

use crate::communicator::last_lines as tail;
use anyhow::{anyhow, bail, Context, Result};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Kills a whole process group when dropped: on a timeout, or when the bake is interrupted and
/// the future is dropped. Harmless once the group has ended.
pub(crate) struct KillGroupOnDrop(pub(crate) Option<i32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: kill(2) on our own child's process group.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Runs `program args` and fails unless it exits 0 within `timeout`. Returns stdout.
pub async fn run(what: &str, program: &str, args: &[&str], timeout: Duration) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("{what}: `{program}` is not installed; run scripts/install-local-deps.sh")
        } else {
            anyhow!("{what}: starting `{program}`: {e}")
        }
    })?;
    // Dropped on every way out: the deadline, an error, or the future dropped on Ctrl-C.
    let _group = KillGroupOnDrop(child.id().map(|p| p as i32));
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("{what}: waiting for `{program}`"))?,
        Err(_) => bail!(
            "{what}: `{program}` did not finish within {timeout:?}; killed it and its children"
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = if stderr.trim().is_empty() {
            tail(&stdout, 15)
        } else {
            tail(&stderr, 15)
        };
        bail!(
            "{what}: `{program} {}` failed ({}):\n{said}",
            args.join(" "),
            out.status
        );
    }
    Ok(stdout)
}

/// The blocking twin of [`run`], for `Drop` and other places with no runtime.
pub fn run_blocking(what: &str, program: &str, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: starting `{program}`"))?;
    if !out.status.success() {
        bail!(
            "{what}: `{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 5)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_program_names_what_was_done_and_what_it_said() {
        let e = run(
            "probing",
            "sh",
            &["-c", "echo one >&2; echo two >&2; exit 3"],
            Duration::from_secs(10),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("probing: `sh -c"), "{e}");
        assert!(
            e.contains("exit status: 3") && e.ends_with("one\ntwo"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_missing_program_points_at_the_setup_script() {
        let e = run("baking", "no-such-program-xyz", &[], Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("install-local-deps.sh"), "{e}");
    }

    #[tokio::test]
    async fn a_program_past_its_deadline_is_killed() {
        let e = run("waiting", "sleep", &["30"], Duration::from_millis(200))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish within"), "{e}");
    }

    #[tokio::test]
    async fn a_program_past_its_deadline_dies_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let e = run(
            "waiting",
            "sh",
            &["-c", &script],
            Duration::from_millis(500),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("killed it and its children"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Gone, or a zombie waiting for its new parent to reap it: never still sleeping.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
            if stat.is_empty() || state == Some('Z') {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the grandchild {pid} outlived the deadline: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
