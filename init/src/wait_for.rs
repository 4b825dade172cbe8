//! `boot --wait-for UNIT,...`: the agent's unit starts with the basic system, and the agent waits
//! for the units it used to be ordered after (`network-online.target`, `supervisor.service`)
//! itself, once it has started what needs no network: the warm salt-call
//! ([`crate::salt::warm`]) imports salt meanwhile.
//!
//! The wait is systemd's own, not a poll: `systemctl start UNITS` joins the start jobs the boot
//! already queued for them and returns when they are done, as `After=` would have. The unit
//! `Wants=` the units it names, so a job is queued already and `systemctl start` starts nothing
//! the unit did not ask for. It talks to systemd on its private socket, so it needs no D-Bus
//! daemon (minimal images have none; `systemd-run --wait` does need one). Without systemd (a
//! container, the tests' root) there is nothing to wait for. The wait never fails the boot: if
//! a unit fails or the deadline passes, the agent goes on, and IMDS has its own deadline.

use crate::process::{self, Deadline};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Where systemd, when it is PID 1, says so (sd_booted(3)).
const SYSTEMD_RUNTIME: &str = "/run/systemd/system";

/// Unit names as `--wait-for` takes them: comma-separated, no empty names.
pub fn parse(list: &str) -> Result<Vec<String>, String> {
    let units: Vec<String> = list.split(',').map(|u| u.trim().to_string()).collect();
    for u in &units {
        if u.is_empty() || u.starts_with('-') || !u.contains('.') || u.contains(char::is_whitespace)
        {
            return Err(format!(
                "--wait-for {list:?}: expected unit names separated by commas, such as \
                 network-online.target,supervisor.service"
            ));
        }
    }
    Ok(units)
}

/// Waits until systemd has started `units`, at most `deadline`. Returns what happened, for the
/// boot's timeline.
pub fn wait(units: &[String], deadline: Duration) -> String {
    wait_with(units, deadline, Path::new(SYSTEMD_RUNTIME), "systemctl")
}

fn wait_with(units: &[String], deadline: Duration, runtime: &Path, systemctl: &str) -> String {
    if units.is_empty() {
        return "nothing to wait for".into();
    }
    let names = units.join(", ");
    if !runtime.is_dir() {
        tracing::debug!(units = names, "not waiting: systemd is not running here");
        return format!("not waited for {names}: no systemd");
    }
    let started = Instant::now();
    let what = format!("waiting for {names}");
    let out = process::run(
        Command::new(systemctl).args(["start", "--"]).args(units),
        &what,
        Deadline::new(deadline, "--imds-deadline"),
    );
    let secs = started.elapsed().as_secs_f64();
    match out {
        Ok(o) if o.status.success() => format!("{names} up after {secs:.1} s"),
        Ok(o) => {
            tracing::warn!(
                "{what}: {systemctl} {}: {}; going on",
                process::describe(o.status),
                o.tail(3)
            );
            format!("{names}: not all started ({systemctl} failed); went on")
        }
        Err(e) => {
            tracing::warn!("{e:#}; going on");
            format!("{names}: not waited ({e:#}); went on after {secs:.0} s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::testing::script;

    #[test]
    fn parses_unit_lists() {
        assert_eq!(
            parse("network-online.target,supervisor.service").unwrap(),
            ["network-online.target", "supervisor.service"]
        );
        for bad in ["", "a.target,", "network", "--now", "a b.service"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn starts_the_units_and_waits() {
        let dir = tempfile::tempdir().unwrap();
        let args = dir.path().join("args");
        let fake = script(
            dir.path(),
            "systemctl",
            &format!("sleep 0.2; printf '%s\\n' \"$@\" > {}\n", args.display()),
        );
        let units = vec!["network-online.target".into(), "supervisor.service".into()];
        let d = wait_with(
            &units,
            Duration::from_secs(10),
            dir.path(),
            fake.to_str().unwrap(),
        );
        assert!(
            d.starts_with("network-online.target, supervisor.service up after "),
            "{d}"
        );
        assert_eq!(
            std::fs::read_to_string(&args).unwrap(),
            "start\n--\nnetwork-online.target\nsupervisor.service\n"
        );
    }

    #[test]
    fn never_fails_the_boot() {
        let dir = tempfile::tempdir().unwrap();
        let units = vec!["network-online.target".to_string()];
        // No systemd here.
        let d = wait_with(
            &units,
            Duration::from_secs(10),
            &dir.path().join("none"),
            "systemctl",
        );
        assert_eq!(d, "not waited for network-online.target: no systemd");
        // systemctl fails (a masked unit), or hangs past the deadline.
        let failing = script(
            dir.path(),
            "failing",
            "echo 'Unit is masked.' >&2; exit 1\n",
        );
        let d = wait_with(
            &units,
            Duration::from_secs(10),
            dir.path(),
            failing.to_str().unwrap(),
        );
        assert!(d.contains("not all started"), "{d}");
        let hung = script(dir.path(), "hung", "exec sleep 60\n");
        let t = Instant::now();
        let d = wait_with(
            &units,
            Duration::from_millis(300),
            dir.path(),
            hung.to_str().unwrap(),
        );
        assert!(d.contains("did not finish within 300ms"), "{d}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
