//! systemd units, through `systemctl` (the stable interface; D-Bus would need a bus library in
//! the static binary).

use super::{Backend, Done};
use crate::process::{self, Deadline};
use crate::userdata::Timeouts;
use anyhow::{bail, Result};
use std::process::Command;
use std::time::Duration;

pub struct SystemdBackend {
    /// `systemctl`, or another path (tests).
    pub systemctl: Option<String>,
    /// Deadline of each call (`[timeouts] systemctl`): a hung systemctl would block the
    /// resident loop for good.
    pub timeout: Duration,
}

impl SystemdBackend {
    pub fn new(timeout: Duration) -> Self {
        Self {
            systemctl: None,
            timeout,
        }
    }

    /// `systemctl ARGS -- UNIT`: the `--` keeps a unit name from being read as an option.
    fn call(&self, args: &[&str], unit: &str) -> Result<process::Output> {
        let program = self.systemctl.as_deref().unwrap_or("systemctl");
        let shown = format!("{program} {} -- {unit}", args.join(" "));
        process::run(
            Command::new(program).args(args).arg("--").arg(unit),
            &shown,
            Deadline::new(self.timeout, Timeouts::SYSTEMCTL),
        )
    }

    fn run(&self, args: &[&str], unit: &str) -> Result<String> {
        let out = self.call(args, unit)?;
        if !out.status.success() {
            bail!(
                "{} {} -- {unit} failed ({}): {}",
                self.systemctl.as_deref().unwrap_or("systemctl"),
                args.join(" "),
                out.status,
                out.tail(5).replace('\n', " | ")
            );
        }
        Ok(out.stdout_text())
    }

    fn main_pid(&self, unit: &str) -> Option<u32> {
        self.run(&["show", "--property=MainPID", "--value"], unit)
            .ok()?
            .parse()
            .ok()
            .filter(|p| *p != 0)
    }

    pub fn confirm_active(&self, unit: &str) -> Result<()> {
        // `is-active` prints the state and exits non-zero unless it is active.
        let state = self.call(&["is-active"], unit)?.stdout_text();
        if state != "active" {
            bail!("{unit} is {state} after the action; see `journalctl -u {unit}`");
        }
        Ok(())
    }
}

impl Backend for SystemdBackend {
    fn restart(&self, unit: &str) -> Result<Done> {
        self.run(&["restart"], unit)?;
        self.confirm_active(unit)?;
        let pid = self.main_pid(unit);
        Ok(Done {
            pid,
            detail: format!("restarted {unit}"),
        })
    }

    fn signal(&self, unit: &str, signal: &str) -> Result<Done> {
        self.run(
            &["kill", "--kill-whom=main", &format!("--signal=SIG{signal}")],
            unit,
        )?;
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
            timeout: Duration::from_secs(60),
        };
        assert_eq!(b.restart("nginx.service").unwrap().pid, Some(4242));
        b.signal("nginx.service", "HUP").unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        // `--` before every unit name, so no name is read as an option.
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            [
                "restart -- nginx.service",
                "is-active -- nginx.service",
                "show --property=MainPID --value -- nginx.service",
                "kill --kill-whom=main --signal=SIGHUP -- nginx.service",
                "is-active -- nginx.service",
                "show --property=MainPID --value -- nginx.service",
            ]
        );
    }

    #[test]
    fn an_inactive_unit_after_restart_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let b = SystemdBackend {
            systemctl: Some(fake_systemctl(dir.path(), "failed")),
            timeout: Duration::from_secs(60),
        };
        let e = b.restart("app.service").unwrap_err().to_string();
        assert!(
            e.contains("app.service is failed") && e.contains("journalctl -u app.service"),
            "{e}"
        );
    }

    #[test]
    fn a_hung_systemctl_is_killed_with_its_processes() {
        use crate::process::testing::{assert_dead, hang_with_grandchild, pidfile, script};
        let dir = tempfile::tempdir().unwrap();
        let pids = pidfile(dir.path());
        let b = SystemdBackend {
            systemctl: Some(
                script(dir.path(), "systemctl", &hang_with_grandchild(&pids))
                    .display()
                    .to_string(),
            ),
            timeout: Duration::from_millis(500),
        };
        let started = std::time::Instant::now();
        let e = format!("{:#}", b.restart("app.service").unwrap_err());
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            e.contains("restart -- app.service did not finish within 500ms; killed")
                && e.contains("raise [timeouts] systemctl"),
            "{e}"
        );
        assert_dead(&pids);
    }
}
