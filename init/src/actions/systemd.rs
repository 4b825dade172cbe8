//! systemd units, through `systemctl` (the stable interface; D-Bus would need a bus library in
//! the static binary).

use super::{Backend, Done};
use anyhow::{bail, Context, Result};
use std::process::Command;

#[derive(Default)]
pub struct SystemdBackend {
    /// `systemctl`, or another path (tests).
    pub systemctl: Option<String>,
}

impl SystemdBackend {
    fn run(&self, args: &[&str]) -> Result<String> {
        let program = self.systemctl.as_deref().unwrap_or("systemctl");
        let out = Command::new(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn main_pid(&self, unit: &str) -> Option<u32> {
        self.run(&["show", "--property=MainPID", "--value", unit])
            .ok()?
            .parse()
            .ok()
            .filter(|p| *p != 0)
    }

    fn confirm_active(&self, unit: &str) -> Result<()> {
        // `is-active` prints the state and exits non-zero unless it is active.
        let program = self.systemctl.as_deref().unwrap_or("systemctl");
        let out = Command::new(program)
            .args(["is-active", unit])
            .output()
            .with_context(|| format!("running {program} is-active {unit}"))?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state != "active" {
            bail!("{unit} is {state} after the action; see `journalctl -u {unit}`");
        }
        Ok(())
    }
}

impl Backend for SystemdBackend {
    fn restart(&self, unit: &str) -> Result<Done> {
        self.run(&["restart", unit])?;
        self.confirm_active(unit)?;
        let pid = self.main_pid(unit);
        Ok(Done {
            pid,
            detail: format!("restarted {unit}"),
        })
    }

    fn signal(&self, unit: &str, signal: &str) -> Result<Done> {
        self.run(&[
            "kill",
            "--kill-whom=main",
            &format!("--signal=SIG{signal}"),
            unit,
        ])?;
        self.confirm_active(unit)?;
        Ok(Done {
            pid: self.main_pid(unit),
            detail: format!("sent SIG{signal} to {unit}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in `systemctl` that logs its arguments: there is no systemd in the test machine,
    /// so this checks the exact command lines the agent would run.
    fn fake_systemctl(dir: &std::path::Path, active: &str) -> String {
        let log = dir.join("calls");
        let script = dir.join("systemctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$1\" in\n  is-active) echo {active}; [ {active} = active ];;\n  show) echo 4242;;\nesac\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script.display().to_string()
    }

    #[test]
    fn restart_and_signal_run_systemctl() {
        let dir = tempfile::tempdir().unwrap();
        let b = SystemdBackend {
            systemctl: Some(fake_systemctl(dir.path(), "active")),
        };
        assert_eq!(b.restart("nginx.service").unwrap().pid, Some(4242));
        b.signal("nginx.service", "HUP").unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert!(calls.contains("restart nginx.service\n"), "{calls}");
        assert!(
            calls.contains("kill --kill-whom=main --signal=SIGHUP nginx.service\n"),
            "{calls}"
        );
    }

    #[test]
    fn an_inactive_unit_after_restart_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let b = SystemdBackend {
            systemctl: Some(fake_systemctl(dir.path(), "failed")),
        };
        let e = b.restart("app.service").unwrap_err().to_string();
        assert!(
            e.contains("app.service is failed") && e.contains("journalctl -u app.service"),
            "{e}"
        );
    }
}
