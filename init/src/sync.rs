//! One sync: fetch both repositories, run highstate when the salt repository moved (or as
//! `[sync] highstate` says), record it. The boot, the schedule and `stackless-init sync` all
//! run this; the caller holds the sync lock, so runs never overlap.

use crate::paths::Layout;
use crate::releases;
use crate::repos::{self, short, RepoSpec, SyncOutcome};
use crate::salt::highstate;
use crate::salt::warm::WarmSaltCall;
use crate::state::{now_rfc3339, HighstateRecord, Outcome, RepoRecord, State, SyncRecord};
use crate::timeline::Timeline;
use crate::userdata::{HighstateMode, SaltOnFailure, Settings};
use anyhow::{Context, Result};
use std::cell::Cell;
use std::path::Path;
use std::time::Duration;

/// Why a sync runs; it decides when highstate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// At boot highstate always runs (unless `never`): the instance must converge.
    Boot,
    Schedule,
    Manual,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Boot => "boot",
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
        }
    }
}

/// What a sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncSummary {
    pub salt_changed: bool,
    pub config_changed: bool,
    pub highstate_ran: bool,
    /// `Some(false)` when highstate ran and did not converge.
    pub highstate_ok: Option<bool>,
    /// The salt commit reverted (`[salt] on_failure = "revert"`), when one was.
    pub salt_reverted: Option<String>,
}

/// What every sync of one agent shares.
#[derive(Clone, Copy)]
pub struct SyncContext<'a> {
    pub layout: &'a Layout,
    pub settings: &'a Settings,
    /// `None` when no highstate is wanted (no salt repository, or `highstate = never`).
    pub salt_call: Option<&'a Path>,
    /// The salt-call warmed since the boot began ([`crate::salt::warm`]); the first highstate
    /// takes it.
    pub warm: Option<&'a Cell<Option<WarmSaltCall>>>,
}

/// Runs one sync, recording repositories and highstate into `state` and its steps into `tl`.
/// `retry_highstate` asks for a highstate even without a new commit (the last one failed).
/// Errors only when a repository has no release at all to run from.
pub fn run(
    ctx: SyncContext<'_>,
    state: &mut State,
    tl: &mut Timeline,
    trigger: Trigger,
    retry_highstate: bool,
) -> Result<SyncSummary> {
    let SyncContext {
        layout,
        settings,
        salt_call,
        ..
    } = ctx;
    let mut summary = SyncSummary::default();
    let mut salt_commit = None;
    for (name, spec) in [("salt", &settings.salt.repo), ("config", &settings.config)] {
        let Some(spec) = spec else { continue };
        if let Some(pin) = releases::pinned(state, name) {
            if repos::current_commit(layout, name).as_deref() == Some(pin.as_str()) {
                // Pinned by hand: the ref is not followed until `stackless-init releases --unpin`.
                if name == "salt" {
                    salt_commit = Some(pin.clone());
                }
                record_repo(state, name, spec, Some(pin), "pinned", None);
                continue;
            }
        }
        let policy = releases::policy(state, name);
        let outcome = tl.step(&format!("sync-{name}"), || {
            let o = crate::private::sync(layout, name, spec, settings, &policy)
                .with_context(|| format!("syncing the {name} repository"))?;
            let d = describe(&o);
            Ok((o, Some(d)))
        });
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                // The repositories are independent: the other one still syncs. With no release
                // to run from, the instance is degraded and the schedule retries.
                let msg = format!("{e:#}");
                tl.degrade(format!("{msg} (no release yet; retried at every sync)"));
                record_repo(state, name, spec, None, "failed", Some(msg));
                continue;
            }
        };
        let (result, error) = match &outcome {
            SyncOutcome::Updated { commit, .. } | SyncOutcome::Unchanged { commit } => {
                releases::lift_quarantine(state, name, commit);
                let r = if matches!(outcome, SyncOutcome::Updated { .. }) {
                    "updated"
                } else {
                    "unchanged"
                };
                (r, None)
            }
            SyncOutcome::Quarantined { commit, skipped } => {
                // Logged loudly once, at the revert (and shown by status); each skip is a debug line.
                let msg = format!(
                    "{name}: upstream is at the quarantined {}; keeping the release {}",
                    short(skipped),
                    short(commit)
                );
                tracing::debug!("{msg}");
                ("quarantined", None)
            }
            SyncOutcome::KeptLast { error, commit } => {
                tl.degrade(format!(
                    "{name} repository: update failed, kept the last good release {}: {error}",
                    short(commit)
                ));
                ("kept-last", Some(error.clone()))
            }
        };
        let changed = matches!(outcome, SyncOutcome::Updated { .. });
        if name == "salt" {
            summary.salt_changed = changed;
            salt_commit = Some(outcome.commit().to_string());
        } else {
            summary.config_changed = changed;
        }
        record_repo(
            state,
            name,
            spec,
            Some(outcome.commit().to_string()),
            result,
            error,
        );
    }

    let (Some(salt_call), Some(commit)) = (salt_call, salt_commit) else {
        return Ok(summary);
    };
    let wanted = match (settings.sync.highstate, trigger) {
        (HighstateMode::Never, _) => false,
        (_, Trigger::Boot) | (HighstateMode::Always, _) => true,
        (HighstateMode::OnChange, _) => summary.salt_changed || retry_highstate,
    };
    if !wanted {
        return Ok(summary);
    }
    let at = now_rfc3339();
    summary.highstate_ran = true;
    let report = highstate_step(tl, "highstate", ctx, salt_call);
    let failure = record_highstate(state, &mut summary, report, &commit, at);
    let Some(reason) = failure else {
        releases::mark_good(state, "salt", &commit);
        return Ok(summary);
    };
    // `[salt] on_failure = "revert"`: a new commit that fails goes back to the last good tree.
    let good = releases::good(state, "salt").filter(|g| *g != commit);
    let revert = settings.releases.salt_on_failure == SaltOnFailure::Revert
        && summary.salt_changed
        && good.is_some();
    let Some(good) = good.filter(|_| revert) else {
        tl.degrade(format!("highstate: {reason}"));
        return Ok(summary);
    };
    let started = std::time::Instant::now();
    let reason = format!("highstate failed: {reason}");
    tracing::warn!(
        "salt release {}: {reason}; reverting to the last good release {} and quarantining the commit",
        short(&commit),
        short(&good)
    );
    if let Err(e) = repos::publish(layout, "salt", &good) {
        tl.degrade(format!("highstate: {reason}; the revert failed: {e:#}"));
        releases::mark_bad(state, "salt", &commit, &reason, false);
        return Ok(summary);
    }
    releases::mark_bad(state, "salt", &commit, &reason, true);
    record_repo(
        state,
        "salt",
        spec_of(settings),
        Some(good.clone()),
        "reverted",
        None,
    );
    let at = now_rfc3339();
    let report = highstate_step(tl, "highstate-revert", ctx, salt_call);
    summary.salt_reverted = Some(commit.clone());
    let ms = started.elapsed().as_millis() as u64;
    releases::record_revert(state, "salt", &commit, &good, &reason, ms);
    if let Some(again) = record_highstate(state, &mut summary, report, &good, at) {
        tl.degrade(format!(
            "highstate: {reason}; reverted to {}, which failed too: {again}",
            short(&good)
        ));
    }
    Ok(summary)
}

/// One highstate as a timed step (one copy of the step's code for both runs).
fn highstate_step(
    tl: &mut Timeline,
    step: &str,
    ctx: SyncContext<'_>,
    salt_call: &Path,
) -> Result<highstate::HighstateReport> {
    tl.step(step, || {
        let r = highstate::run(
            ctx.layout,
            salt_call,
            &ctx.settings.minion_id,
            &crate::boot::inside(
                &ctx.layout.repo_current("salt"),
                &ctx.settings.salt.states_dir,
            ),
            ctx.settings.salt.timeout,
            ctx.warm.and_then(Cell::take),
        )?;
        let d = r.summary();
        Ok((r, Some(d)))
    })
}

fn spec_of(settings: &Settings) -> &RepoSpec {
    settings
        .salt
        .repo
        .as_ref()
        .expect("a salt commit means a salt repository")
}

/// Records a highstate's result; `Some(why)` when it did not converge.
fn record_highstate(
    state: &mut State,
    summary: &mut SyncSummary,
    report: Result<highstate::HighstateReport>,
    commit: &str,
    at: String,
) -> Option<String> {
    let commit = Some(commit.to_string());
    match report {
        Ok(report) => {
            summary.highstate_ok = Some(report.ok);
            let failure = (!report.ok).then(|| report.summary());
            state.highstate = Some(HighstateRecord {
                report,
                commit,
                at,
                error: None,
            });
            failure
        }
        Err(e) => {
            summary.highstate_ok = Some(false);
            let msg = format!("{e:#}");
            state.highstate = Some(HighstateRecord {
                report: Default::default(),
                commit,
                at,
                error: Some(msg.clone()),
            });
            Some(msg)
        }
    }
}

fn record_repo(
    state: &mut State,
    name: &str,
    spec: &RepoSpec,
    commit: Option<String>,
    result: &str,
    error: Option<String>,
) {
    let commit = commit.or_else(|| state.repos.get(name).and_then(|r| r.commit.clone()));
    state.repos.insert(
        name.to_string(),
        RepoRecord {
            url: spec.url.clone(),
            reference: spec.reference.clone(),
            commit,
            result: result.into(),
            synced_at: now_rfc3339(),
            error,
        },
    );
}

fn describe(o: &SyncOutcome) -> String {
    match o {
        SyncOutcome::Updated {
            commit,
            previous: Some(p),
        } => format!("{} -> {}", short(p), short(commit)),
        SyncOutcome::Updated {
            commit,
            previous: None,
        } => format!("published {}", short(commit)),
        SyncOutcome::Unchanged { commit } => format!("unchanged at {}", short(commit)),
        SyncOutcome::KeptLast { commit, .. } => format!("update failed, kept {}", short(commit)),
        SyncOutcome::Quarantined { commit, skipped } => format!(
            "upstream at quarantined {}, kept {}",
            short(skipped),
            short(commit)
        ),
    }
}

/// Whether the last highstate failed, so the next sync runs it again even without a new commit.
pub fn last_highstate_failed(state: &State) -> bool {
    state
        .highstate
        .as_ref()
        .is_some_and(|h| !h.report.ok || h.error.is_some())
}

/// A sync that ran and was recorded.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// What went into `state.last_sync`.
    pub record: SyncRecord,
    /// Highstates failed in a row, this sync included (0 after one that converged).
    pub highstate_failures: u32,
}

/// Runs one sync ([`run`]) and records it, the one place a sync record is built: sets
/// `state.last_sync` and carries the count of failed highstates in a row into
/// `state.schedule` (when there is one). The caller holds the lock and saves the state.
pub fn run_recorded(
    ctx: SyncContext<'_>,
    state: &mut State,
    trigger: Trigger,
    retry_highstate: bool,
) -> Recorded {
    let at = now_rfc3339();
    let mut tl = Timeline::new();
    let result = run(ctx, state, &mut tl, trigger, retry_highstate);
    let (outcome, error, ran, ok) = match &result {
        Ok(s) if tl.degraded.is_empty() => (Outcome::Ready, None, s.highstate_ran, s.highstate_ok),
        Ok(s) => (
            Outcome::Degraded,
            Some(tl.degraded.join("; ")),
            s.highstate_ran,
            s.highstate_ok,
        ),
        Err(e) => (Outcome::Failed, Some(format!("{e:#}")), false, None),
    };
    let failures = state.schedule.as_ref().map_or(0, |s| s.highstate_failures);
    let highstate_failures = match ok {
        Some(true) => 0,
        Some(false) => failures + 1,
        None => failures,
    };
    if let Some(sched) = state.schedule.as_mut() {
        sched.highstate_failures = highstate_failures;
    }
    let record = SyncRecord {
        at,
        trigger: trigger.as_str().into(),
        outcome,
        error,
        ms: tl.total_ms(),
        highstate_ran: ran,
        steps: std::mem::take(&mut tl.steps),
    };
    state.last_sync = Some(record.clone());
    Recorded {
        record,
        highstate_failures,
    }
}

/// `stackless-init sync`: one sync now, with the settings the boot applied, through the same
/// lock as every other sync. A highstate that failed last time runs again even without a new
/// commit. Recorded as the last sync.
pub fn run_now(layout: &Layout, lock_wait: Duration) -> Result<SyncRecord> {
    let (settings, _identity) = crate::settings::load_saved(layout)?;
    let salt_call = if settings.salt.repo.is_some()
        && settings.sync.highstate != HighstateMode::Never
    {
        Some(
            crate::salt::install::find_salt_call(layout, settings.salt.salt_call.as_deref()).ok_or_else(|| {
                anyhow::anyhow!("salt-call is not installed; run `stackless-init boot --once` to install it")
            })?,
        )
    } else {
        None
    };
    let _lock = crate::lock::SyncLock::acquire(layout, lock_wait)?;
    let mut state = State::load(layout)?.unwrap_or_default();
    let retry = last_highstate_failed(&state);
    let ctx = SyncContext {
        layout,
        settings: &settings,
        salt_call: salt_call.as_deref(),
        warm: None,
    };
    let recorded = run_recorded(ctx, &mut state, Trigger::Manual, retry);
    crate::report::update(&mut state, Some(&settings), false);
    state.save(layout)?;
    Ok(recorded.record)
}
