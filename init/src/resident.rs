//! Resident mode: after the boot the agent stays up, with one poll(2) loop over the inotify
//! watcher and a signalfd. Its only timers are the watcher's debounce deadline and the next
//! scheduled sync, so an idle agent sleeps in the kernel until something happens.
//!
//! Syncs run inline, holding the sync lock: events that arrive meanwhile wait in the kernel's
//! inotify queue and are acted on once it finishes, so a program is never restarted in the
//! middle of a highstate. A manual `stackless-init sync` in another process holds the same lock;
//! actions due while it runs are deferred until it lets go.

use crate::actions::{hold, Backends, SupervisordBackend, SystemdBackend};
use crate::boot::BootResult;
use crate::lifecycle;
use crate::lock::SyncLock;
use crate::paths::Layout;
use crate::releases;
use crate::repos::{self, short};
use crate::state::{now_rfc3339, ProgramRecord, RuleRecord, ScheduleRecord, State, WatchRecord};
use crate::sync::{self, Trigger};
use crate::userdata::{self, schedule::splay_offset, ConfigOnFailure, Settings};
use crate::watch::{Due, Rule, Timing, Watcher};
use anyhow::{Context, Result};
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// Internal target: a file in `watch.d` changed, reload the rules.
const RELOAD_RULES: &str = "stackless:reload-rules";
/// Internal target: a program definition changed, re-read and update supervisord.
const SUPERVISOR_UPDATE: &str = "stackless:supervisor-update";
/// How soon to retry actions deferred by another process's sync.
const DEFER_RETRY: Duration = Duration::from_millis(200);
/// First and longest wait before an action supervisord could not take (stopped, restarting,
/// hung) is tried again; doubled between tries, so a long outage costs few calls.
const SUPERVISOR_RETRY_FIRST: Duration = Duration::from_millis(500);
const SUPERVISOR_RETRY_MAX: Duration = Duration::from_secs(15);
/// Most ticks a failing highstate waits between retries.
const MAX_RETRY_TICKS: u32 = 16;
/// A config release that triggered nothing within the watcher's window plus this is good.
const SETTLE: Duration = Duration::from_secs(1);

/// A config release published and not judged yet.
#[derive(Debug, Clone)]
struct Pending {
    commit: String,
    /// When the agent noticed it (the revert time counts from here).
    since: Instant,
    /// When it is good if it triggered nothing.
    settle_at: Instant,
}

/// The signals the resident agent takes through its signalfd.
fn signal_set() -> SigSet {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask
}

/// Blocks the resident agent's signals in this thread, so they queue until the poll loop reads
/// them. Children get a clean signal mask from `std::process::Command`.
pub fn block_signals() -> Result<()> {
    signal_set()
        .thread_block()
        .context("blocking SIGTERM, SIGINT and SIGHUP")
}

/// Starts the watchers and the schedule after a boot that did not fail; `serve` then runs.
pub fn start(layout: &Layout, boot: &BootResult) -> Result<Agent> {
    let Some(settings) = boot.settings.clone() else {
        anyhow::bail!("the boot resolved no settings; nothing to run");
    };
    Agent::new(layout.clone(), settings, boot)
}

/// The resident agent.
pub struct Agent {
    layout: Layout,
    settings: Settings,
    salt_call: Option<PathBuf>,
    instance_id: String,
    signals: SignalFd,
    watcher: Watcher,
    rule_records: Vec<RuleRecord>,
    backends: Backends,
    /// Actions a sync in another process, or an unreachable supervisord, kept us from doing.
    deferred: Vec<Due>,
    retry_at: Option<Instant>,
    /// How long to wait before trying supervisord again after it could not be reached.
    supervisor_backoff: Duration,
    next_tick: Option<SystemTime>,
    last_tick: Option<SystemTime>,
    ticks_since_highstate: u32,
    pending: Option<Pending>,
}

impl Agent {
    fn new(layout: Layout, settings: Settings, boot: &BootResult) -> Result<Agent> {
        // Signals arrive through a file descriptor in the poll loop, never mid-action.
        block_signals()?;
        let mask = signal_set();
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("creating a signalfd")?;

        let (rules, rule_records) = collect_rules(&layout, &settings);
        let timing = Timing {
            quiet: settings.watch_quiet,
            max_delay: settings.watch_max_delay,
        };
        let mut watcher = Watcher::new(rules, timing).context("starting the file watchers")?;
        watcher.consult_cpu_pressure(Box::new(crate::watch::pressure::ProcPressure::open()));
        let backends = Backends {
            supervisord: SupervisordBackend::new(&settings.supervisor_socket),
            systemd: SystemdBackend::new(settings.timeouts.systemctl),
        };
        let instance_id = boot.state.instance_id.clone().unwrap_or_default();
        let mut agent = Agent {
            layout,
            salt_call: boot.salt_call.clone(),
            instance_id,
            signals,
            watcher,
            rule_records,
            backends,
            deferred: Vec::new(),
            retry_at: None,
            supervisor_backoff: SUPERVISOR_RETRY_FIRST,
            next_tick: None,
            last_tick: None,
            ticks_since_highstate: 0,
            pending: None,
            settings,
        };
        agent.notice_release();
        agent.plan_tick();
        agent.save_locked(|_| {})?;
        Ok(agent)
    }

    /// Whether there is anything to sync on a schedule.
    fn has_repos(&self) -> bool {
        self.settings.salt.repo.is_some() || self.settings.config.is_some()
    }

    fn plan_tick(&mut self) {
        if !self.has_repos() {
            self.next_tick = None;
            return;
        }
        let offset = splay_offset(&self.instance_id, self.settings.sync.splay);
        self.next_tick = Some(self.settings.sync.schedule.next_tick(
            SystemTime::now(),
            self.last_tick,
            offset,
        ));
    }

    /// Serves until SIGTERM or SIGINT; returns the exit code.
    pub fn serve(&mut self) -> Result<i32> {
        lifecycle::status(&self.idle_status());
        loop {
            let now = Instant::now();
            let mut deadline: Option<Instant> = self.watcher.next_deadline();
            if let Some(at) = self.retry_at {
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
            if let Some(p) = &self.pending {
                // Judged once the watcher has nothing pending: no busy wait meanwhile.
                if deadline.is_none() || self.watcher.next_deadline().is_none() {
                    let at = p.settle_at;
                    deadline = Some(deadline.map_or(at, |d| d.min(at)));
                }
            }
            if let Some(tick) = self.next_tick {
                let in_ = tick.duration_since(SystemTime::now()).unwrap_or_default();
                let at = now + in_;
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
            // ppoll, not poll: a finished write is due a millisecond after it was read, and
            // poll's whole milliseconds would double that.
            let timeout = deadline.map(|d| {
                let wait = d.saturating_duration_since(now);
                TimeSpec::from_duration(wait.min(Duration::from_secs(86_400)))
            });
            let (sig_ready, fs_ready) = {
                let mut fds = [
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.watcher.fd(), PollFlags::POLLIN),
                ];
                match ppoll(&mut fds, timeout, None) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("waiting for events"),
                }
                let ready =
                    |f: &PollFd| f.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN));
                (ready(&fds[0]), ready(&fds[1]))
            };

            if sig_ready {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGHUP) => {
                            tracing::info!("SIGHUP: reloading watch rules");
                            self.reload_rules();
                            if let Err(e) = self.save_locked(|_| {}) {
                                tracing::error!("{e:#}");
                            }
                        }
                        Ok(sig) => {
                            tracing::info!("{sig}: stopping");
                            lifecycle::stopping();
                            return Ok(0);
                        }
                        Err(_) => {}
                    }
                }
            }
            if fs_ready {
                if let Err(e) = self.watcher.read_events(Instant::now()) {
                    tracing::error!("reading file events: {e:#}");
                }
            }
            if self.next_tick.is_some_and(|t| SystemTime::now() >= t) {
                self.tick();
                // What changed during the sync is in the kernel's queue; read it now.
                if let Err(e) = self.watcher.read_events(Instant::now()) {
                    tracing::error!("reading file events: {e:#}");
                }
            }
            let mut due = std::mem::take(&mut self.deferred);
            if self.retry_at.is_some_and(|t| Instant::now() < t) && !due.is_empty() {
                // Not yet time to retry deferred actions.
                tracing::trace!(
                    deferred = due.len(),
                    "a sync was in progress; retrying the deferred actions shortly"
                );
                self.deferred = due;
                due = Vec::new();
            }
            merge(&mut due, self.watcher.take_due(Instant::now()));
            if !due.is_empty() {
                self.act(due);
            }
            self.settle_release();
        }
    }

    /// Notes a config release that is not known good as pending its verdict.
    fn notice_release(&mut self) {
        if self.settings.config.is_none() {
            return;
        }
        let Some(current) = repos::current_commit(&self.layout, "config") else {
            return;
        };
        if self.pending.as_ref().is_some_and(|p| p.commit == current) {
            return;
        }
        let state = State::load(&self.layout).ok().flatten().unwrap_or_default();
        if releases::good(&state, "config").as_deref() == Some(current.as_str()) {
            self.pending = None;
            return;
        }
        let now = Instant::now();
        tracing::debug!("config release {} pending its verdict", short(&current));
        self.pending = Some(Pending {
            commit: current,
            since: now,
            settle_at: now + self.settings.watch_max_delay + SETTLE,
        });
    }

    /// A pending release that triggered nothing once the watcher is quiet is good.
    fn settle_release(&mut self) {
        let Some(p) = &self.pending else { return };
        let now = Instant::now();
        if now < p.settle_at || self.watcher.next_deadline().is_some() || !self.deferred.is_empty()
        {
            return;
        }
        let commit = p.commit.clone();
        let Ok(Some(_lock)) = SyncLock::try_acquire(&self.layout) else {
            if let Some(p) = self.pending.as_mut() {
                p.settle_at = now + DEFER_RETRY;
            }
            return;
        };
        self.pending = None;
        if repos::current_commit(&self.layout, "config").as_deref() != Some(commit.as_str()) {
            return;
        }
        if let Err(e) = self.update_state(|st| releases::mark_good(st, "config", &commit)) {
            tracing::error!("{e:#}");
        }
    }

    /// Loads the record, changes it, saves it. The caller holds the sync lock.
    fn update_state(&self, change: impl FnOnce(&mut State)) -> Result<()> {
        let mut state = State::load(&self.layout)?.unwrap_or_default();
        change(&mut state);
        state.save(&self.layout)
    }

    fn idle_status(&self) -> String {
        match self.next_tick {
            Some(t) => format!(
                "idle; next sync at {}",
                humantime::format_rfc3339_seconds(t)
            ),
            None => "idle; watching".to_string(),
        }
    }

    /// A scheduled sync. Skipped when another sync holds the lock (it is doing the work).
    fn tick(&mut self) {
        self.last_tick = self.next_tick;
        let lock = match SyncLock::try_acquire(&self.layout) {
            Ok(Some(l)) => l,
            Ok(None) => {
                tracing::info!("scheduled sync skipped: another sync is running");
                self.plan_tick();
                return;
            }
            Err(e) => {
                tracing::error!("scheduled sync: {e:#}");
                self.plan_tick();
                return;
            }
        };
        lifecycle::status("syncing");
        let mut state = match State::load(&self.layout) {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::error!("scheduled sync skipped: {e:#}");
                self.plan_tick();
                return;
            }
        };
        let failures = state.schedule.as_ref().map_or(0, |s| s.highstate_failures);
        let last_failed = sync::last_highstate_failed(&state);
        self.ticks_since_highstate += 1;
        // Back off over ticks: retry after 1, 2, 4 ... ticks, at most MAX_RETRY_TICKS.
        let wait_ticks = 1u32 << failures.saturating_sub(1).min(4);
        let retry = last_failed && self.ticks_since_highstate >= wait_ticks.min(MAX_RETRY_TICKS);
        let ctx = sync::SyncContext {
            layout: &self.layout,
            settings: &self.settings,
            salt_call: self.salt_call.as_deref(),
            warm: None,
        };
        let recorded = sync::run_recorded(ctx, &mut state, Trigger::Schedule, retry);
        if recorded.record.highstate_ran {
            self.ticks_since_highstate = 0;
        }
        self.plan_tick();
        state.schedule = Some(self.schedule_record(recorded.highstate_failures));
        crate::report::update(&mut state, Some(&self.settings), false);
        if let Err(e) = state.save(&self.layout) {
            tracing::error!("{e:#}");
        }
        drop(lock);
        self.notice_release();
        match &recorded.record.error {
            Some(e) => tracing::warn!("scheduled sync {}: {e}", recorded.record.outcome.as_str()),
            None => tracing::info!("scheduled sync done"),
        }
        lifecycle::status(&self.idle_status());
    }

    fn schedule_record(&self, highstate_failures: u32) -> ScheduleRecord {
        ScheduleRecord {
            schedule: self.settings.sync.schedule.to_string(),
            splay_ms: splay_offset(&self.instance_id, self.settings.sync.splay).as_millis() as u64,
            next_tick: self
                .next_tick
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            highstate_failures,
        }
    }

    /// Acts on due targets, holding the sync lock so no highstate runs meanwhile.
    fn act(&mut self, due: Vec<Due>) {
        let lock = match SyncLock::try_acquire(&self.layout) {
            Ok(Some(l)) => l,
            Ok(None) => {
                let targets: Vec<&str> = due.iter().map(|d| d.target.as_str()).collect();
                tracing::debug!(
                    ?targets,
                    "a sync is in progress (it holds the lock); deferring until it ends"
                );
                merge(&mut self.deferred, due);
                self.retry_at = Some(Instant::now() + DEFER_RETRY);
                return;
            }
            Err(e) => {
                tracing::error!("{e:#}; acting without the lock");
                return self.act_locked(due);
            }
        };
        if self.deferred.is_empty() {
            // (Actions still deferred keep their retry time: these are newer ones.)
            self.retry_at = None;
        }
        self.act_locked(due);
        drop(lock);
    }

    fn act_locked(&mut self, mut due: Vec<Due>) {
        // Rules and program definitions first: they change what the rest means.
        due.sort_by_key(|d| match d.target.as_str() {
            RELOAD_RULES => 0,
            SUPERVISOR_UPDATE => 1,
            _ => 2,
        });
        let mut records: Vec<(String, ProgramRecord)> = Vec::new();
        // Actions caused by a config release not yet known good decide its verdict.
        let judged = self.judged_release(&due);
        let config_dir = self.layout.repo_dir("config");
        let acted_at = Instant::now();
        let mut held: Vec<String> = Vec::new();
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut unreachable: Vec<Due> = Vec::new();
        for d in due {
            let started = Instant::now();
            let from_release =
                judged.is_some() && d.paths.iter().any(|p| p.starts_with(&config_dir));
            let paths: Vec<String> = d.paths.iter().map(|p| p.display().to_string()).collect();
            match d.target.as_str() {
                RELOAD_RULES => {
                    tracing::info!(paths = ?paths, "watch rules changed; reloading");
                    self.reload_rules();
                }
                SUPERVISOR_UPDATE => {
                    lifecycle::status("updating supervisord");
                    let r = self.backends.supervisord.update();
                    let ms = started.elapsed().as_millis() as u64;
                    let (outcome, ok) = match &r {
                        Ok(u) => {
                            tracing::info!(added = ?u.added, changed = ?u.changed, removed = ?u.removed, ms, "supervisord updated");
                            ("ok".to_string(), true)
                        }
                        Err(e) => {
                            tracing::error!("updating supervisord after {paths:?} changed: {e:#}");
                            (format!("{e:#}"), false)
                        }
                    };
                    let groups = r
                        .map(|u| [u.added, u.changed, u.removed].concat())
                        .unwrap_or_default();
                    let names = if groups.is_empty() {
                        vec!["supervisord".to_string()]
                    } else {
                        groups
                    };
                    for g in names {
                        records.push((
                            g,
                            ProgramRecord {
                                updates: ok as u64,
                                failures: (!ok) as u64,
                                last_action: "update".into(),
                                last_outcome: outcome.clone(),
                                last_at: now_rfc3339(),
                                last_ms: ms,
                                paths: paths.clone(),
                                ..Default::default()
                            },
                        ));
                    }
                }
                target => {
                    let action = d
                        .signal
                        .as_ref()
                        .map_or("restart".to_string(), |s| format!("signal {s}"));
                    lifecycle::status(&format!("{action} {target}"));
                    let r = self.backends.act(target, d.signal.as_deref());
                    let ms = started.elapsed().as_millis() as u64;
                    let mut rec = ProgramRecord {
                        last_action: action.clone(),
                        last_at: now_rfc3339(),
                        last_ms: ms,
                        paths: paths.clone(),
                        ..Default::default()
                    };
                    match r {
                        Ok(done) => {
                            tracing::info!(target, ms, paths = ?paths, "{}", done.detail);
                            if d.signal.is_some() {
                                rec.signals = 1;
                            } else {
                                rec.restarts = 1;
                            }
                            rec.pid = done.pid;
                            rec.last_outcome = "ok".into();
                            if from_release {
                                held.push(target.to_string());
                            }
                        }
                        Err(e) if supervisord_unreachable(&e) => {
                            // Not the program's fault: the change still stands, so the action
                            // waits for supervisord rather than being lost.
                            let wait = self.supervisor_backoff;
                            tracing::warn!(
                                target,
                                ms,
                                "{action} after {paths:?} changed: {e:#}; trying again in {wait:?}"
                            );
                            rec.last_outcome = format!("waiting for supervisord: {e:#}");
                            unreachable.push(d.clone());
                        }
                        Err(e) => {
                            if from_release {
                                failures.push((target.to_string(), format!("{action}: {e:#}")));
                            }
                            tracing::error!(target, ms, "{action} after {paths:?} changed: {e:#}");
                            rec.failures = 1;
                            rec.last_outcome = format!("{e:#}");
                        }
                    }
                    records.push((target.to_string(), rec));
                }
            }
        }
        if unreachable.is_empty() {
            self.supervisor_backoff = SUPERVISOR_RETRY_FIRST;
        } else {
            merge(&mut self.deferred, unreachable);
            self.retry_at = Some(Instant::now() + self.supervisor_backoff);
            self.supervisor_backoff = (self.supervisor_backoff * 2).min(SUPERVISOR_RETRY_MAX);
        }
        if judged.is_some() && !held.is_empty() {
            // startsecs was waited for by the restart; the grace catches a program that dies
            // just after. Bounded: the resident loop waits no longer than the grace.
            lifecycle::status("watching restarted programs");
            failures.extend(hold::hold(
                &self.backends,
                &held,
                self.settings.releases.config_grace,
            ));
        }
        let overflows = self.watcher.overflows();
        let dirs = self.watcher.watched_dirs().len();
        let rules = self.rule_records.clone();
        let r = self.save(move |w| {
            w.overflows = overflows;
            w.watched_dirs = dirs;
            w.rules = rules;
            for (name, rec) in records {
                let e = w.programs.entry(name).or_default();
                e.restarts += rec.restarts;
                e.signals += rec.signals;
                e.updates += rec.updates;
                e.failures += rec.failures;
                e.last_action = rec.last_action;
                e.last_outcome = rec.last_outcome;
                e.last_at = rec.last_at;
                e.last_ms = rec.last_ms;
                e.paths = rec.paths;
                if rec.pid.is_some() {
                    e.pid = rec.pid;
                }
            }
        });
        if let Err(e) = r {
            tracing::error!("{e:#}");
        }
        if let Some((commit, good)) = judged {
            self.judge(commit, good, failures, acted_at);
        }
        lifecycle::status(&self.idle_status());
    }

    /// The published config release and its last good one, when `due` holds an action caused
    /// by a change under the config repository and that release is not known good yet.
    fn judged_release(&self, due: &[Due]) -> Option<(String, Option<String>)> {
        self.settings.config.as_ref()?;
        let config_dir = self.layout.repo_dir("config");
        let ours = due.iter().any(|d| {
            d.target != RELOAD_RULES
                && d.target != SUPERVISOR_UPDATE
                && d.paths.iter().any(|p| p.starts_with(&config_dir))
        });
        if !ours {
            return None;
        }
        let current = repos::current_commit(&self.layout, "config")?;
        let state = State::load(&self.layout).ok().flatten().unwrap_or_default();
        let good = releases::good(&state, "config");
        (good.as_deref() != Some(current.as_str())).then_some((current, good))
    }

    /// The verdict of a config release from what its actions did; a bad one is reverted (by
    /// default) and quarantined. The caller holds the sync lock.
    fn judge(
        &mut self,
        commit: String,
        good: Option<String>,
        failures: Vec<(String, String)>,
        acted_at: Instant,
    ) {
        let since = match &self.pending {
            Some(p) if p.commit == commit => p.since,
            _ => acted_at,
        };
        self.pending = None;
        if failures.is_empty() {
            if let Err(e) = self.update_state(|st| releases::mark_good(st, "config", &commit)) {
                tracing::error!("{e:#}");
            }
            return;
        }
        for (target, why) in &failures {
            // The program's own words go to the log (the journal) alone: they may hold secrets.
            let output = hold::last_output(&self.backends, target);
            tracing::error!("{target}: {why}; its last output:\n{output}");
        }
        let reason = failures
            .iter()
            .map(|(_, why)| why.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let bad = short(&commit).to_string();
        let revert = self.settings.releases.config_on_failure == ConfigOnFailure::Revert;
        // Where to go back to, or why the bad release stays.
        let back = match good.filter(|_| revert) {
            Some(to) => repos::publish(&self.layout, "config", &to)
                .map(|()| to)
                .map_err(|e| format!("reverting failed: {e:#}")),
            None if revert => Err("no earlier good release to revert to".to_string()),
            None => Err("[config] on_failure = \"keep\"".to_string()),
        };
        let ms = since.elapsed().as_millis() as u64;
        let r = match back {
            Err(why) => {
                tracing::error!("config release {bad} is bad ({reason}); keeping it: {why}");
                self.update_state(|st| releases::mark_bad(st, "config", &commit, &reason, false))
            }
            Ok(to) => {
                tracing::warn!(
                    "config release {bad} is bad ({reason}); reverted to the last good release {} \
                     after {ms} ms and quarantined the commit until upstream moves on",
                    short(&to)
                );
                self.update_state(|st| {
                    releases::mark_bad(st, "config", &commit, &reason, true);
                    releases::record_revert(st, "config", &commit, &to, &reason, ms);
                    if let Some(rec) = st.repos.get_mut("config") {
                        rec.commit = Some(to.clone());
                        rec.result = "reverted".into();
                    }
                })
            }
        };
        if let Err(e) = r {
            tracing::error!("{e:#}");
        }
    }

    /// Reloads the rules; the caller records them (act_locked saves, SIGHUP saves under the lock).
    fn reload_rules(&mut self) {
        let (rules, records) = collect_rules(&self.layout, &self.settings);
        match self.watcher.set_rules(rules) {
            Ok(()) => {
                tracing::info!(rules = records.len(), "watch rules loaded");
                self.rule_records = records;
            }
            Err(e) => tracing::error!("reloading watch rules: {e:#}"),
        }
    }

    /// `save` under the sync lock, for callers that do not hold it already.
    fn save_locked(&self, change: impl FnOnce(&mut WatchRecord)) -> Result<()> {
        let _lock = SyncLock::acquire(&self.layout, Duration::from_secs(60))?;
        self.save(change)
    }

    /// Re-reads the record (another process may have written it), changes the watcher part and
    /// the schedule, and saves. The caller holds the sync lock.
    fn save(&self, change: impl FnOnce(&mut WatchRecord)) -> Result<()> {
        let mut state = State::load(&self.layout)?.unwrap_or_default();
        let mut w = state.watch.take().unwrap_or_default();
        w.rules = self.rule_records.clone();
        w.watched_dirs = self.watcher.watched_dirs().len();
        w.overflows = self.watcher.overflows();
        change(&mut w);
        state.watch = Some(w);
        let failures = state.schedule.as_ref().map_or(0, |s| s.highstate_failures);
        state.schedule = self.has_repos().then(|| self.schedule_record(failures));
        // A restart that failed (or works again) changes the report; nothing else here does. A
        // report that failed before is tried again by the next sync, not by every watch event:
        // an unreachable EC2 would hold the event loop for the report's deadline each time.
        let tags = crate::report::tags_for(&state);
        if tags.is_some() && state.report.as_ref().map(|r| &r.tags) != tags.as_ref() {
            crate::report::update(&mut state, Some(&self.settings), false);
        }
        state.save(&self.layout)
    }
}

/// Adds `more` to `into`, one entry per target: paths add up, and a restart wins over a signal.
/// Whether an action failed because supervisord was out of reach rather than refusing it.
fn supervisord_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::supervisor::SupervisorError>()
            .is_some_and(|s| s.is_unreachable())
    })
}

fn merge(into: &mut Vec<Due>, more: Vec<Due>) {
    for d in more {
        match into.iter_mut().find(|x| x.target == d.target) {
            Some(x) => {
                if d.signal.is_none() {
                    x.signal = None;
                }
                for p in d.paths {
                    if !x.paths.contains(&p) {
                        x.paths.push(p);
                    }
                }
            }
            None => into.push(d),
        }
    }
}

/// The rules to watch: user-data's and the image's, each valid file in `watch.d`, and the
/// agent's own (reload on `watch.d` changes, update supervisord on program definition changes).
/// A broken `watch.d` file is reported and skipped; the others still apply.
pub fn collect_rules(layout: &Layout, settings: &Settings) -> (Vec<Rule>, Vec<RuleRecord>) {
    let mut rules = Vec::new();
    let mut records = Vec::new();
    let mut add = |source: String, r: &userdata::WatchRule| {
        let rule = Rule {
            patterns: r.paths.iter().map(|p| p.get_ref().clone()).collect(),
            targets: r.restart.iter().map(|t| t.get_ref().clone()).collect(),
            signal: r
                .signal
                .as_ref()
                .map(|s| s.get_ref().trim_start_matches("SIG").to_string()),
        };
        records.push(RuleRecord {
            source,
            paths: rule.patterns.clone(),
            restart: rule.targets.clone(),
            signal: rule.signal.clone(),
        });
        rules.push(rule);
    };
    for r in &settings.watch {
        add("user-data".into(), r);
    }
    let dir = layout.watch_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    for f in files {
        let name = f.display().to_string();
        match std::fs::read_to_string(&f)
            .map_err(|e| e.to_string())
            .and_then(|text| userdata::parse_watch_file(&name, &text).map_err(|e| e.to_string()))
        {
            Ok(file_rules) => file_rules.iter().for_each(|r| add(name.clone(), r)),
            Err(e) => tracing::error!("skipping watch rules of {name}: {e}"),
        }
    }
    rules.push(Rule {
        patterns: vec![format!("{}/*.toml", dir.display())],
        targets: vec![RELOAD_RULES.into()],
        signal: None,
    });
    rules.push(Rule {
        patterns: vec![format!("{}/*.conf", settings.supervisor_conf_dir.display())],
        targets: vec![SUPERVISOR_UPDATE.into()],
        signal: None,
    });
    (rules, records)
}
