//! Whether programs restarted for a new release stay up: watched through `[config] grace`
//! after their restart (which already waited for supervisord's `startsecs`). A program that
//! leaves RUNNING, changes pid (supervisord restarted it) or a unit that is no longer active
//! fails its release.

use super::{Backends, Target};
use crate::supervisor::{ProcessState, Supervisor};
use std::time::{Duration, Instant};

/// How often the programs are looked at during the grace.
const POLL: Duration = Duration::from_millis(200);
/// Units are asked less often: each look runs `systemctl`.
const UNIT_EVERY: u32 = 5;
/// Deadline of one look at supervisord: the grace must stay bounded.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a program's own output goes to the log after it failed.
pub const OUTPUT_TAIL: usize = 2048;

/// What one target looked like right after its action.
#[derive(Debug, Clone)]
enum Seen {
    /// supervisord processes: full name and pid.
    Processes(Vec<(String, u32)>),
    /// A systemd unit (its state is asked again at each look).
    Unit,
}

/// Watches `targets` for `grace`; returns the ones that failed, with why (supervisord's and
/// systemd's words only: never the program's output, which may hold secrets).
pub fn hold(backends: &Backends, targets: &[String], grace: Duration) -> Vec<(String, String)> {
    let started = Instant::now();
    let deadline = started + grace;
    let sup = Supervisor::new(backends.supervisord.client().socket(), CALL_TIMEOUT);
    let mut failed: Vec<(String, String)> = Vec::new();
    let mut seen: Vec<(String, Seen)> = Vec::new();
    for t in targets {
        match first_look(&sup, t) {
            Ok(s) => seen.push((t.clone(), s)),
            Err(why) => failed.push((t.clone(), why)),
        }
    }
    let mut round = 0u32;
    loop {
        let last = Instant::now() + POLL >= deadline;
        seen.retain(|(t, s)| {
            if matches!(s, Seen::Unit) && !round.is_multiple_of(UNIT_EVERY) && !last {
                return true;
            }
            match look(backends, &sup, t, s) {
                Ok(()) => true,
                Err(why) => {
                    let after = started.elapsed().as_secs_f64();
                    failed.push((t.clone(), format!("{why}, {after:.1} s after its restart")));
                    false
                }
            }
        });
        round += 1;
        let now = Instant::now();
        if seen.is_empty() || now >= deadline {
            break;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
    failed
}

fn first_look(sup: &Supervisor, target: &str) -> Result<Seen, String> {
    match Target::parse(target) {
        Target::Systemd(_) => Ok(Seen::Unit),
        Target::Supervisord(name) => {
            let members = sup.members(name).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for m in members {
                if m.state != ProcessState::Running {
                    return Err(describe(&m));
                }
                out.push((m.full_name(), m.pid));
            }
            Ok(Seen::Processes(out))
        }
    }
}

fn look(backends: &Backends, sup: &Supervisor, target: &str, seen: &Seen) -> Result<(), String> {
    match (Target::parse(target), seen) {
        (Target::Systemd(unit), _) => backends
            .systemd
            .confirm_active(unit)
            .map_err(|e| format!("{e:#}")),
        (Target::Supervisord(_), Seen::Processes(procs)) => {
            for (name, pid) in procs {
                let info = sup.process_info(name).map_err(|e| e.to_string())?;
                if info.state != ProcessState::Running {
                    return Err(describe(&info));
                }
                if info.pid != *pid {
                    return Err(format!(
                        "{name} was restarted by supervisord (pid {pid}, now {})",
                        info.pid
                    ));
                }
            }
            Ok(())
        }
        (Target::Supervisord(_), Seen::Unit) => Ok(()),
    }
}

fn describe(info: &crate::supervisor::ProcessInfo) -> String {
    let mut s = format!("{} is {}", info.full_name(), info.state);
    if info.state == ProcessState::Exited {
        s.push_str(&format!(" (exit status {})", info.exitstatus));
    }
    if !info.spawnerr.is_empty() {
        s.push_str(&format!(": {}", info.spawnerr));
    }
    s
}

/// The program's own last lines (stderr then stdout, bounded) for the log alone.
pub fn last_output(backends: &Backends, target: &str) -> String {
    let name = match Target::parse(target) {
        Target::Systemd(unit) => return format!("(see journalctl -u {unit})"),
        Target::Supervisord(n) => n,
    };
    let sup = Supervisor::new(backends.supervisord.client().socket(), CALL_TIMEOUT);
    let names: Vec<String> = match sup.members(name) {
        Ok(m) => m.iter().map(|m| m.full_name()).collect(),
        Err(_) => vec![name.to_string()],
    };
    let mut out = String::new();
    for n in names {
        for (stderr, label) in [(true, "stderr"), (false, "stdout")] {
            match sup.tail_log(&n, stderr, OUTPUT_TAIL) {
                Ok(t) if t.trim().is_empty() => {}
                Ok(t) => {
                    // The tail starts mid-line: drop the partial first line.
                    let t = if t.len() >= OUTPUT_TAIL {
                        t.split_once('\n').map_or(t.as_str(), |(_, r)| r)
                    } else {
                        t.as_str()
                    };
                    out.push_str(&format!("--- {n} {label} ---\n{}\n", t.trim_end()));
                }
                Err(e) => out.push_str(&format!("--- {n} {label}: {e}\n")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::{SupervisordBackend, SystemdBackend};
    use crate::supervisor::test_support::Supervisord;
    use std::os::unix::fs::PermissionsExt;

    fn backends(socket: &std::path::Path, systemctl: Option<String>) -> Backends {
        Backends {
            supervisord: SupervisordBackend::new(socket),
            systemd: SystemdBackend {
                systemctl,
                timeout: Duration::from_secs(30),
            },
        }
    }

    #[test]
    fn a_program_that_dies_within_the_grace_fails_and_its_output_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisord::start(
            dir.path(),
            &[
                ("steady", "sleep 1000"),
                ("late", "sh -c 'sleep 0.5; echo late-words >&2; exit 3'"),
            ],
        );
        let b = backends(&sup.socket(), None);
        for p in ["steady", "late"] {
            b.act(p, None).unwrap();
        }
        let started = Instant::now();
        let failed = hold(
            &b,
            &["steady".into(), "late".into()],
            Duration::from_secs(2),
        );
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "steady is watched to the end"
        );
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, "late");
        assert!(
            failed[0].1.contains("late is EXITED (exit status 3)"),
            "{failed:?}"
        );
        assert!(
            !failed[0].1.contains("late-words"),
            "no program output in the reason"
        );
        let out = last_output(&b, "late");
        assert!(out.contains("--- late stderr ---\nlate-words"), "{out}");
    }

    #[test]
    fn a_unit_that_fails_within_the_grace_fails() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in systemctl (no systemd here): active for the first two looks, then failed.
        let count = dir.path().join("count");
        let script = dir.path().join("systemctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho x >> {c}\nn=$(wc -l < {c})\nif [ $n -le 2 ]; then echo active; else echo failed; exit 3; fi\n",
                c = count.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let b = backends(
            &dir.path().join("no.sock"),
            Some(script.display().to_string()),
        );
        let failed = hold(&b, &["systemd:app.service".into()], Duration::from_secs(3));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].1.contains("app.service is failed"), "{failed:?}");
    }
}
