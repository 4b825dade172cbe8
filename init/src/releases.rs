//! Release verdicts: which release of a repository is good (what a revert goes back to),
//! which commit is quarantined (reverted, not applied again until upstream moves on), which
//! release is pinned by hand. All of it lives in the state record, so it survives restarts of
//! the agent and reboots. Commits and the agent's own words only go in: never file contents
//! or program output.
//!
//! `stackless-init releases` lists a repository's releases with their verdicts; `pin` and
//! `unpin` are the operator's escape hatch, through the same lock as every sync.

use crate::lock::SyncLock;
use crate::paths::Layout;
use crate::repos::{self, short, Policy};
use crate::state::{now_rfc3339, ReleasesRecord, State, Verdict, MAX_VERDICTS};
use anyhow::{bail, Result};
use std::fmt::Write;
use std::time::Duration;

/// The record of repository `name`, created empty.
pub fn record<'a>(state: &'a mut State, name: &str) -> &'a mut ReleasesRecord {
    state.releases.entry(name.to_string()).or_default()
}

/// What the verdicts ask of the next sync of `name`.
pub fn policy(state: &State, name: &str) -> Policy {
    let r = state.releases.get(name);
    Policy {
        skip: r
            .and_then(|r| r.quarantined.as_ref())
            .map(|q| q.commit.clone()),
        keep: r.and_then(|r| r.good.clone()),
    }
}

/// The last good release of `name`.
pub fn good(state: &State, name: &str) -> Option<String> {
    state.releases.get(name).and_then(|r| r.good.clone())
}

/// The pinned release of `name`.
pub fn pinned(state: &State, name: &str) -> Option<String> {
    state.releases.get(name).and_then(|r| r.pinned.clone())
}

fn push_verdict(r: &mut ReleasesRecord, commit: &str, verdict: &str, reason: Option<String>) {
    r.verdicts.retain(|v| v.commit != commit);
    r.verdicts.push(Verdict {
        commit: commit.to_string(),
        verdict: verdict.to_string(),
        at: now_rfc3339(),
        reason,
        ..Default::default()
    });
    if verdict == "bad" && r.quarantined.as_ref().is_some_and(|q| q.commit == commit) {
        // The quarantine is the verdict itself (kept when older verdicts roll out).
        r.quarantined = r.verdicts.last().cloned();
    }
    let extra = r.verdicts.len().saturating_sub(MAX_VERDICTS);
    r.verdicts.drain(..extra);
}

/// Everything `commit` triggered succeeded: it is what a revert goes back to from now on.
pub fn mark_good(state: &mut State, name: &str, commit: &str) {
    let r = record(state, name);
    if r.good.as_deref() == Some(commit) {
        return;
    }
    tracing::info!("{name} release {} is good", short(commit));
    r.good = Some(commit.to_string());
    push_verdict(r, commit, "good", None);
}

/// Something `commit` triggered failed. With `quarantine` the commit is not applied again
/// until upstream moves to another commit.
pub fn mark_bad(state: &mut State, name: &str, commit: &str, reason: &str, quarantine: bool) {
    let r = record(state, name);
    push_verdict(r, commit, "bad", Some(reason.to_string()));
    if quarantine {
        r.quarantined = r.verdicts.last().cloned();
    }
}

/// A revert from `from` to `to` happened `ms` after `from` was published.
pub fn record_revert(state: &mut State, name: &str, from: &str, to: &str, reason: &str, ms: u64) {
    let r = record(state, name);
    r.reverts += 1;
    let revert = Verdict {
        commit: from.to_string(),
        verdict: "reverted".into(),
        at: now_rfc3339(),
        reason: Some(reason.to_string()),
        to: Some(to.to_string()),
        ms: Some(ms),
    };
    // On the console as it happens (the boot's report is long printed by then).
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(crate::status::revert_report(name, &revert).as_bytes());
    let _ = out.flush();
    r.last_revert = Some(revert);
}

/// Upstream moved to a commit other than the quarantined one: the quarantine ends.
pub fn lift_quarantine(state: &mut State, name: &str, tip: &str) {
    let Some(r) = state.releases.get_mut(name) else {
        return;
    };
    if r.quarantined.as_ref().is_some_and(|q| q.commit != tip) {
        let q = r.quarantined.take().expect("checked");
        tracing::info!(
            "{name}: upstream moved on to {}; the quarantine of {} ends",
            short(tip),
            short(&q.commit)
        );
    }
}

/// `stackless-init releases`: each repository's releases on disk, newest first, with their
/// verdicts.
pub fn render(layout: &Layout, state: &State) -> String {
    let mut out = String::new();
    for name in ["salt", "config"] {
        let on_disk = repos::releases(layout, name);
        let rec = state.releases.get(name).cloned().unwrap_or_default();
        if on_disk.is_empty() && rec.verdicts.is_empty() {
            continue;
        }
        let current = repos::current_commit(layout, name);
        let _ = writeln!(out, "{name}");
        for c in &on_disk {
            let mut marks = Vec::new();
            if current.as_deref() == Some(c.as_str()) {
                marks.push("current".to_string());
            }
            if rec.good.as_deref() == Some(c.as_str()) {
                marks.push("last good".into());
            }
            if rec.pinned.as_deref() == Some(c.as_str()) {
                marks.push("pinned".into());
            }
            if rec.quarantined.as_ref().is_some_and(|q| &q.commit == c) {
                marks.push("quarantined".into());
            }
            let v = rec.verdicts.iter().find(|v| &v.commit == c);
            let verdict = v.map_or("-", |v| v.verdict.as_str());
            let _ = write!(out, "  {c}  {verdict:<6}");
            if let Some(v) = v {
                let _ = write!(out, " {}", v.at);
            }
            if !marks.is_empty() {
                let _ = write!(out, "  [{}]", marks.join(", "));
            }
            out.push('\n');
            if let Some(reason) = v.and_then(|v| v.reason.as_deref()) {
                let _ = writeln!(out, "      {reason}");
            }
        }
    }
    if out.is_empty() {
        out.push_str("no releases yet\n");
    }
    out
}

/// `stackless-init releases --pin REPO COMMIT`: publishes a release the repository still has
/// and keeps it there (syncs do not follow the ref) until `--unpin`. A prefix of the commit is
/// enough when it names one release.
pub fn pin(layout: &Layout, name: &str, commit: &str, lock_wait: Duration) -> Result<String> {
    check_name(name)?;
    let _lock = SyncLock::acquire(layout, lock_wait)?;
    let matches: Vec<String> = repos::releases(layout, name)
        .into_iter()
        .filter(|c| c.starts_with(&commit.to_ascii_lowercase()))
        .collect();
    let full = match matches.as_slice() {
        [one] => one.clone(),
        [] => bail!("repository {name} has no release {commit} (see `stackless-init releases`)"),
        _ => bail!("{commit} names several releases of {name}; give more of the commit"),
    };
    let mut state = State::load(layout)?.unwrap_or_default();
    repos::publish(layout, name, &full)?;
    let r = record(&mut state, name);
    r.pinned = Some(full.clone());
    push_verdict(r, &full, "pinned", Some("pinned by hand".into()));
    // A release pinned by hand is one the operator trusts: it is what a revert goes back to.
    r.good = Some(full.clone());
    if r.quarantined.as_ref().is_some_and(|q| q.commit == full) {
        r.quarantined = None;
    }
    state.save(layout)?;
    tracing::info!("{name} pinned at {full}");
    Ok(full)
}

/// `stackless-init releases --unpin REPO`: syncs follow the ref again.
pub fn unpin(layout: &Layout, name: &str, lock_wait: Duration) -> Result<Option<String>> {
    check_name(name)?;
    let _lock = SyncLock::acquire(layout, lock_wait)?;
    let mut state = State::load(layout)?.unwrap_or_default();
    let was = record(&mut state, name).pinned.take();
    state.save(layout)?;
    Ok(was)
}

fn check_name(name: &str) -> Result<()> {
    if name != "salt" && name != "config" {
        bail!("no repository {name:?}: give salt or config");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_quarantine_and_policy() {
        let mut st = State::default();
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        mark_good(&mut st, "config", &a);
        mark_bad(&mut st, "config", &b, "app is FATAL", true);
        assert_eq!(
            policy(&st, "config"),
            Policy {
                skip: Some(b.clone()),
                keep: Some(a.clone())
            }
        );
        // Upstream still at the bad commit: quarantined still.
        lift_quarantine(&mut st, "config", &b);
        assert!(st.releases["config"].quarantined.is_some());
        lift_quarantine(&mut st, "config", &c);
        assert_eq!(policy(&st, "config").skip, None);
        let verdicts: Vec<&str> = st.releases["config"]
            .verdicts
            .iter()
            .map(|v| v.verdict.as_str())
            .collect();
        assert_eq!(verdicts, ["good", "bad"]);
        for i in 0..(MAX_VERDICTS + 5) {
            mark_good(&mut st, "config", &format!("{i:040}"));
        }
        assert_eq!(st.releases["config"].verdicts.len(), MAX_VERDICTS);
    }
}
