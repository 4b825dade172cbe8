//! Telling the world how the boot went: systemd's notify protocol (`READY=1`, `STATUS=`), a
//! ready marker under `/run/stackless/`, and `stackless-init wait`, which blocks on that marker.

use crate::fsutil::write_atomic;
use crate::paths::Layout;
use crate::state::{now_rfc3339, Outcome};
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// `STATUS=` for `systemctl status`; a no-op outside systemd.
pub fn status(line: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(line)]);
}

/// `READY=1` with a status line. The unit is `Type=notify`; systemd starts what is ordered after
/// it once this arrives, whatever the outcome (a failed boot still leaves the machine usable).
pub fn ready(line: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(line),
        ],
    );
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

/// Removes a marker left by an earlier boot (tests and chroots keep `/run`).
pub fn clear_marker(layout: &Layout) -> Result<()> {
    match std::fs::remove_file(layout.ready_marker()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", layout.ready_marker().display()))
        }
        _ => Ok(()),
    }
}

/// Writes the marker: the outcome on the first line, then when, then the reason.
pub fn write_marker(layout: &Layout, outcome: Outcome, reason: Option<&str>) -> Result<()> {
    let text = format!(
        "{}\n{}\n{}\n",
        outcome.as_str(),
        now_rfc3339(),
        reason.unwrap_or("")
    );
    write_atomic(&layout.ready_marker(), text.as_bytes(), 0o644)
}

/// Reads the marker's outcome, if the boot has finished.
pub fn read_marker(layout: &Layout) -> Option<(Outcome, String)> {
    let text = std::fs::read_to_string(layout.ready_marker()).ok()?;
    let mut lines = text.lines();
    let outcome = match lines.next()? {
        "ready" => Outcome::Ready,
        "degraded" => Outcome::Degraded,
        "failed" => Outcome::Failed,
        _ => return None,
    };
    let reason = lines.nth(1).unwrap_or("").to_string();
    Some((outcome, reason))
}

/// What `wait` found.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitResult {
    Done(Outcome, String),
    TimedOut,
}

/// Blocks until the boot has finished (the marker exists) or `timeout` passes.
pub fn wait(layout: &Layout, timeout: Option<Duration>) -> WaitResult {
    let start = Instant::now();
    loop {
        if let Some((outcome, reason)) = read_marker(layout) {
            return WaitResult::Done(outcome, reason);
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            return WaitResult::TimedOut;
        }
        // A short sleep: `wait` runs once per deploy, not resident, so this costs nothing.
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trip_and_wait() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert_eq!(
            wait(&layout, Some(Duration::from_millis(120))),
            WaitResult::TimedOut
        );
        write_marker(&layout, Outcome::Degraded, Some("highstate: 1 failed")).unwrap();
        assert_eq!(
            wait(&layout, Some(Duration::from_secs(1))),
            WaitResult::Done(Outcome::Degraded, "highstate: 1 failed".into())
        );
        clear_marker(&layout).unwrap();
        clear_marker(&layout).unwrap();
        assert_eq!(read_marker(&layout), None);
        let l2 = layout.clone();
        let t = std::thread::spawn(move || wait(&l2, Some(Duration::from_secs(10))));
        std::thread::sleep(Duration::from_millis(100));
        write_marker(&layout, Outcome::Ready, None).unwrap();
        assert_eq!(
            t.join().unwrap(),
            WaitResult::Done(Outcome::Ready, String::new())
        );
    }
}
