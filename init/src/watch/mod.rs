//! The watcher engine: which targets are due for a restart (or a signal) because files they
//! depend on really changed. No I/O to supervisord or systemd here; the agent acts on [`Due`].
//!
//! The agent runs one poll(2) loop: it polls [`Watcher::fd`], calls [`Watcher::read_events`]
//! when it is readable, sleeps until [`Watcher::next_deadline`] (forever when `None`: idle means
//! idle) and then calls [`Watcher::take_due`].
//!
//! * Folders are watched, never file inodes (see `dirs.rs`): renames over a file, delete and
//!   recreate, missing folders created later and `current` symlink flips are all seen.
//! * Events are debounced per target (`debounce.rs`): a finished lone write is acted on once the
//!   queue stays empty for a millisecond; anything else waits a quiet window, bounded by a
//!   maximum delay.
//! * Content decides: when a target is due, every pending path is hashed ([`mod@digest`]) and
//!   compared with the hash recorded at the last take; no real change, no [`Due`].
//! * A queue overflow (or any doubt) re-plans the watches and rescans every matching file.

mod debounce;
pub mod digest;
mod dirs;
pub mod glob;
pub mod pressure;

#[cfg(test)]
mod tests;

use anyhow::{Context, Result};
use debounce::{Added, Debouncer, Kind};
use digest::{digest, Digest};
use dirs::Plan;
use glob::{is_temp_name, Comp, Pattern};
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Files to watch and what to do to whom when they change.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Absolute globs (see [`glob`]).
    pub patterns: Vec<String>,
    /// Opaque target names; changes are coalesced per name.
    pub targets: Vec<String>,
    /// A signal name to send; `None` means restart.
    pub signal: Option<String>,
}

/// A target to act on now.
#[derive(Debug, Clone, PartialEq)]
pub struct Due {
    pub target: String,
    /// `None` (restart) if any fired rule for this target wants a restart.
    pub signal: Option<String>,
    /// The paths that really changed, sorted.
    pub paths: Vec<PathBuf>,
}

/// Debounce timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A target is due after this long without a new event...
    pub quiet: Duration,
    /// ...or this long after its first pending event, whichever comes first.
    pub max_delay: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Content events in folders holding files.
const FILE_EVENTS: F = F::IN_CLOSE_WRITE
    .union(F::IN_MODIFY)
    .union(F::IN_MOVED_TO)
    .union(F::IN_MOVED_FROM)
    .union(F::IN_CREATE)
    .union(F::IN_DELETE);
/// Entry events in folders on the way to the files.
const ENTRY_EVENTS: F = F::IN_CREATE
    .union(F::IN_DELETE)
    .union(F::IN_MOVED_FROM)
    .union(F::IN_MOVED_TO);
/// The watched folder itself went away or moved: re-plan.
const SELF_EVENTS: F = F::IN_DELETE_SELF
    .union(F::IN_MOVE_SELF)
    .union(F::IN_UNMOUNT)
    .union(F::IN_IGNORED);
/// Not named by nix 0.29.
const IN_EXCL_UNLINK: F = F::from_bits_retain(nix::libc::IN_EXCL_UNLINK);
const IN_MASK_ADD: F = F::from_bits_retain(nix::libc::IN_MASK_ADD);
const ALWAYS: F = F::IN_DELETE_SELF
    .union(F::IN_MOVE_SELF)
    .union(F::IN_ONLYDIR)
    .union(IN_EXCL_UNLINK);

/// The compiled rules.
#[derive(Debug, Default)]
struct Compiled {
    rules: Vec<Rule>,
    /// Per rule, indices into `patterns`.
    rule_patterns: Vec<Vec<usize>>,
    /// Distinct patterns.
    patterns: Vec<Pattern>,
}

impl Compiled {
    fn new(rules: Vec<Rule>) -> Result<Compiled> {
        let mut c = Compiled::default();
        for rule in &rules {
            let mut ids = Vec::with_capacity(rule.patterns.len());
            for text in &rule.patterns {
                let id = match c.patterns.iter().position(|p| p.as_str() == text) {
                    Some(id) => id,
                    None => {
                        c.patterns.push(Pattern::parse(text).with_context(|| {
                            format!("watch rule for {}", rule.targets.join(", "))
                        })?);
                        c.patterns.len() - 1
                    }
                };
                ids.push(id);
            }
            c.rule_patterns.push(ids);
        }
        c.rules = rules;
        Ok(c)
    }

    /// Whether pattern `pi` matches `path`; a temp name never matches a glob file component.
    fn pattern_matches(&self, pi: usize, path: &Path) -> bool {
        let p = &self.patterns[pi];
        if !p.matches(path) {
            return false;
        }
        match p.comps().last() {
            Some(Comp::Literal(_)) => true,
            _ => !path.file_name().is_some_and(is_temp_name),
        }
    }

    fn rule_matches(&self, ri: usize, path: &Path) -> bool {
        self.rule_patterns[ri]
            .iter()
            .any(|&pi| self.pattern_matches(pi, path))
    }

    /// Notes an event on `path` for every target of every rule matching it.
    /// Traced, so `RUST_LOG=trace` says why a change did or did not lead to an action.
    fn add_event(&self, pending: &mut Debouncer, path: &Path, kind: Kind, now: Instant) {
        let mut matched = false;
        for (ri, rule) in self.rules.iter().enumerate() {
            if self.rule_matches(ri, path) {
                matched = true;
                for t in &rule.targets {
                    match pending.add(t, path, kind, now) {
                        Added::First => tracing::trace!(
                            path = %path.display(), target = %t,
                            "change noted; waiting for the quiet window"
                        ),
                        Added::Debounced(n) => tracing::trace!(
                            path = %path.display(), target = %t, events = n,
                            "change debounced into the action already pending"
                        ),
                    }
                }
            }
        }
        if !matched {
            let temp = path.file_name().is_some_and(is_temp_name)
                && self.patterns.iter().any(|p| p.matches(path));
            if temp {
                tracing::trace!(
                    path = %path.display(),
                    "temporary name ignored (an editor, salt or git writing); the rename onto the real name counts"
                );
            } else {
                tracing::trace!(path = %path.display(), "no rule matches this path; ignored");
            }
        }
    }
}

/// One inotify watch (one folder inode, maybe reached by several paths).
#[derive(Debug)]
struct Watch {
    /// Every planned path that reaches this folder.
    paths: Vec<PathBuf>,
    /// The paths whose files are matched: a content event on NAME is a change of PATH/NAME.
    files: Vec<PathBuf>,
    /// (pattern, component) whose entry events re-plan.
    entries: BTreeSet<(usize, usize)>,
}

/// The watcher engine. See the module documentation.
#[derive(Debug)]
pub struct Watcher {
    timing: Timing,
    inotify: Inotify,
    compiled: Compiled,
    watches: HashMap<WatchDescriptor, Watch>,
    plan: Plan,
    /// Hash of every matched path at the last take (or baseline); absent paths are not stored.
    records: BTreeMap<PathBuf, Digest>,
    pending: Debouncer,
    overflows: u64,
    /// CPU pressure, to tell a finished writer from a preempted one; `None`: not consulted.
    pressure: Option<Box<dyn pressure::Pressure>>,
}

/// What a batch of events asks for once it is drained.
#[derive(Default)]
struct After {
    replan: bool,
    overflow: bool,
}

impl Watcher {
    /// Opens an inotify instance, watches what `rules` need and records the current hashes.
    pub fn new(rules: Vec<Rule>, timing: Timing) -> Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("opening an inotify instance (is fs.inotify.max_user_instances reached?)")?;
        let mut w = Watcher {
            timing,
            inotify,
            compiled: Compiled::default(),
            watches: HashMap::new(),
            plan: Plan::default(),
            records: BTreeMap::new(),
            pending: Debouncer::default(),
            overflows: 0,
            pressure: None,
        };
        w.set_rules(rules)?;
        Ok(w)
    }

    /// Replaces the rules: re-plans the watches, keeps the hashes of files still matched and
    /// records the hashes of newly matched ones, so a reload alone never makes anything due.
    /// Pending changes stay pending (and are judged against the new rules when due).
    pub fn set_rules(&mut self, rules: Vec<Rule>) -> Result<()> {
        self.compiled = Compiled::new(rules)?;
        self.replan()?;
        // Keep the records the new patterns still match (a pending deletion stays visible)...
        let compiled = &self.compiled;
        self.records.retain(|path, _| {
            (0..compiled.patterns.len()).any(|pi| compiled.pattern_matches(pi, path))
        });
        // ...and baseline the newly matched files, unless a change to them is pending.
        for path in self.all_matches() {
            if !self.records.contains_key(&path) && !self.pending.has_path(&path) {
                let d = digest(&path);
                if d != Digest::Absent {
                    self.records.insert(path, d);
                }
            }
        }
        Ok(())
    }

    /// Consults `source` before acting on a finished write: if the CPUs were too contended for
    /// the writer to have written again during the confirmation, the quiet window applies. The
    /// agent passes [`pressure::ProcPressure`]; tests with a synthetic clock leave it off.
    pub fn consult_cpu_pressure(&mut self, source: Box<dyn pressure::Pressure>) {
        self.pressure = Some(source);
    }

    /// The inotify descriptor, to poll for reading.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Reads every pending inotify event (never blocks) into the pending state; re-plans the
    /// watches (and rescans what they changed) when a folder on the way changed.
    pub fn read_events(&mut self, now: Instant) -> Result<()> {
        let r = self.read_queue(now);
        self.mark_confirmations(now);
        r
    }

    /// Notes when each new finished write's confirmation began and the CPU stall total then
    /// (one read of the pressure file, only when there is a new one).
    fn mark_confirmations(&mut self, now: Instant) {
        let Some(source) = self.pressure.as_mut() else {
            return;
        };
        let mut unmarked = self.pending.unmarked_finished_writes().peekable();
        if unmarked.peek().is_none() {
            return;
        }
        if let Some(total) = source.stalled_us() {
            for p in unmarked {
                p.mark = Some((now, total));
            }
        }
    }

    fn read_queue(&mut self, now: Instant) -> Result<()> {
        let mut after = After::default();
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => break,
                Ok(events) => {
                    for ev in &events {
                        self.event(ev, now, &mut after);
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    // Still act on what was read.
                    self.finish(after, now)?;
                    return Err(e).context("reading inotify events");
                }
            }
        }
        self.finish(after, now)
    }

    fn finish(&mut self, after: After, now: Instant) -> Result<()> {
        if after.overflow {
            tracing::warn!(
                overflows = self.overflows,
                "the inotify queue overflowed; rescanning every watched file"
            );
            self.recover(now)
        } else if after.replan {
            let before = self.plan.file_dirs.clone();
            self.replan()?;
            let changed: Vec<usize> = (0..self.compiled.patterns.len())
                .filter(|&pi| before.get(pi) != self.plan.file_dirs.get(pi))
                .collect();
            if !changed.is_empty() {
                tracing::debug!(
                    patterns = changed.len(),
                    "watched folders changed; rescanning"
                );
            }
            self.rescan_patterns(&changed, now);
            Ok(())
        } else {
            Ok(())
        }
    }

    fn event(&mut self, ev: &InotifyEvent, now: Instant, after: &mut After) {
        // Any event at all (a temporary file, another target's file) says a writer is still at
        // work: it holds off every finished write's confirmation.
        self.pending.activity(now);
        if ev.mask.contains(F::IN_Q_OVERFLOW) {
            self.overflows += 1;
            after.overflow = true;
            return;
        }
        let Some(watch) = self.watches.get(&ev.wd) else {
            return;
        };
        if ev.mask.intersects(SELF_EVENTS) {
            after.replan = true;
            return;
        }
        let Some(name) = ev.name.as_deref() else {
            return;
        };
        if ev.mask.intersects(ENTRY_EVENTS)
            && watch
                .entries
                .iter()
                .any(|&(pi, ci)| self.compiled.patterns[pi].comps()[ci].matches(name))
        {
            after.replan = true;
        }
        if ev.mask.intersects(FILE_EVENTS) {
            let kind = if ev.mask.intersects(F::IN_CLOSE_WRITE | F::IN_MOVED_TO) {
                Kind::Closing
            } else {
                Kind::Other
            };
            for dir in &watch.files {
                let path = dir.join(name);
                self.compiled.add_event(&mut self.pending, &path, kind, now);
            }
        }
    }

    /// The earliest instant [`Watcher::take_due`] has something to do; `None` when idle.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.next_deadline(&self.timing)
    }

    /// Targets whose quiet window passed or whose first pending event is older than
    /// `max_delay`, with the paths whose content (sha256, or absence) differs from the hash
    /// recorded at the last take. Targets with no real change are dropped. Records the new
    /// hashes.
    ///
    /// A file written again while it was being hashed is not judged: inotify queues an event
    /// before the system call that causes it returns, so the queue is drained once more after
    /// hashing, and a target with a path touched meanwhile goes back to waiting as a burst, its
    /// hash record left as it was. Without this a truncate caught between its open and its write
    /// would read as an empty file.
    pub fn take_due(&mut self, now: Instant) -> Vec<Due> {
        let ready = self.pending.take_ready(now, &self.timing);
        let ready = self.contended_back(ready, now);
        if ready.is_empty() {
            return Vec::new();
        }
        let mut fresh: BTreeMap<PathBuf, Digest> = BTreeMap::new();
        for (_, pending) in &ready {
            for path in pending.paths.keys() {
                if !fresh.contains_key(path) {
                    fresh.insert(path.clone(), digest(path));
                }
            }
        }
        // Only events read now count: another target may have the same path pending from
        // before, which says nothing about a writer at work during the hash.
        self.pending.record_touches();
        if let Err(e) = self.read_events(now) {
            tracing::warn!("reading file events after hashing: {e:#}");
        }
        let mut touched = self.pending.take_touches();
        touched.retain(|p| fresh.contains_key(p));
        let mut out = Vec::new();
        for (target, pending) in ready {
            // Past its maximum delay a target is acted on whatever the writer does, or an
            // endless writer would hold it (and spin this loop) for ever.
            let overdue = pending
                .started()
                .checked_add(self.timing.max_delay)
                .is_some_and(|at| at <= now);
            if let Some(p) = pending
                .paths
                .keys()
                .find(|p| touched.contains(*p) && !overdue)
            {
                tracing::trace!(path = %p.display(), target = %target, "written again while being read; waiting for the writer");
                self.pending.requeue(target, pending);
                continue;
            }
            let mut paths = Vec::new();
            let mut restart = false;
            let mut signal: Option<String> = None;
            for (path, confirmed) in pending.paths {
                let fired: Vec<usize> = (0..self.compiled.rules.len())
                    .filter(|&ri| {
                        self.compiled.rules[ri].targets.contains(&target)
                            && self.compiled.rule_matches(ri, &path)
                    })
                    .collect();
                if fired.is_empty() {
                    tracing::trace!(path = %path.display(), target = %target, "no rule of this target matches the path any more (rules reloaded); ignored");
                    continue;
                }
                let new = fresh[&path];
                let old = self.records.get(&path).copied().unwrap_or(Digest::Absent);
                if !confirmed && new == old {
                    tracing::trace!(path = %path.display(), target = %target, "content unchanged since the last action; ignored");
                    continue;
                }
                for ri in fired {
                    match &self.compiled.rules[ri].signal {
                        None => restart = true,
                        Some(s) if signal.is_none() => signal = Some(s.clone()),
                        Some(_) => {}
                    }
                }
                paths.push(path);
            }
            if paths.is_empty() {
                tracing::trace!(target = %target, "quiet window over, but no content really changed; no action");
            } else {
                tracing::trace!(target = %target, paths = ?paths, "quiet window over; due");
                out.push(Due {
                    target,
                    signal: if restart { None } else { signal },
                    paths,
                });
            }
        }
        for (path, new) in fresh {
            if touched.contains(&path) {
                // Being written: judged again once the writer is done.
                continue;
            }
            let old = self.records.get(&path).copied().unwrap_or(Digest::Absent);
            if new != old {
                // Targets still waiting on this path must not lose the change.
                self.pending.confirm(&path);
                if new == Digest::Absent {
                    self.records.remove(&path);
                } else {
                    self.records.insert(path, new);
                }
            }
        }
        out
    }

    /// Puts back the finished writes whose writer may not have had the CPU to write again during
    /// the confirmation (see `pressure.rs`): they wait the quiet window, as a burst.
    fn contended_back(
        &mut self,
        ready: Vec<(String, debounce::Pending)>,
        now: Instant,
    ) -> Vec<(String, debounce::Pending)> {
        let Some(source) = self.pressure.as_mut() else {
            return ready;
        };
        let mut total: Option<Option<u64>> = None;
        let mut out = Vec::with_capacity(ready.len());
        for (target, pending) in ready {
            let Some((since, before)) = pending.mark.filter(|_| pending.is_finished_write()) else {
                out.push((target, pending));
                continue;
            };
            let Some(after) = *total.get_or_insert_with(|| source.stalled_us()) else {
                out.push((target, pending));
                continue;
            };
            let elapsed = now.saturating_duration_since(since);
            let stalled = Duration::from_micros(after.saturating_sub(before));
            if pressure::contended(elapsed, stalled) {
                tracing::trace!(target = %target, ?elapsed, ?stalled, "the CPUs were contended while the write was being confirmed (the writer may have been kept from writing again); waiting the quiet window");
                self.pending.requeue(target, pending);
            } else {
                out.push((target, pending));
            }
        }
        out
    }

    /// Re-plans the watches and compares every matching file's hash with the record; changed
    /// paths become pending. The agent rescans on a queue overflow (through `recover`); tests
    /// call this to check a rescan finds nothing when nothing changed.
    #[cfg(test)]
    pub fn rescan(&mut self, now: Instant) {
        if let Err(e) = self.recover(now) {
            tracing::warn!("rescanning watched files: {e:#}");
        }
    }

    fn recover(&mut self, now: Instant) -> Result<()> {
        let replanned = self.replan();
        let all: Vec<usize> = (0..self.compiled.patterns.len()).collect();
        self.rescan_patterns(&all, now);
        replanned
    }

    /// How many times the inotify queue overflowed.
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Every watched folder path (sorted; several may be the same folder through a symlink).
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .watches
            .values()
            .flat_map(|w| w.paths.iter().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn all_matches(&self) -> BTreeSet<PathBuf> {
        let mut set = BTreeSet::new();
        for (pi, p) in self.compiled.patterns.iter().enumerate() {
            set.extend(self.plan.matches(pi, p));
        }
        set
    }

    /// Compares the current hash of every path patterns `pis` match (and every recorded path
    /// they match, to see deletions) with the record; differences become pending.
    fn rescan_patterns(&mut self, pis: &[usize], now: Instant) {
        if pis.is_empty() {
            return;
        }
        let mut paths = BTreeSet::new();
        for &pi in pis {
            paths.extend(self.plan.matches(pi, &self.compiled.patterns[pi]));
            paths.extend(
                self.records
                    .keys()
                    .filter(|p| self.compiled.pattern_matches(pi, p))
                    .cloned(),
            );
        }
        for path in paths {
            let old = self.records.get(&path).copied().unwrap_or(Digest::Absent);
            if digest(&path) != old {
                // What a rescan finds is already in place (a flip, a folder created whole).
                self.compiled
                    .add_event(&mut self.pending, &path, Kind::Closing, now);
            }
        }
    }

    /// Computes the folders to watch and moves the inotify watches to them. A folder that
    /// vanishes while being planned makes it plan again (a few times).
    fn replan(&mut self) -> Result<()> {
        for _ in 0..4 {
            let plan = Plan::build(&self.compiled.patterns);
            let raced = self.apply(&plan)?;
            // A folder created between the plan's look and the watch on its parent gives no
            // event (`mkdir -p` racing the agent): look again once the watches are in place.
            let settled = !raced && Plan::build(&self.compiled.patterns) == plan;
            self.plan = plan;
            if settled {
                return Ok(());
            }
        }
        tracing::debug!("watched folders keep changing while planning; using the last plan");
        Ok(())
    }

    /// Adds/updates the watches of `plan`, removes the others. Returns whether a folder
    /// vanished on the way.
    fn apply(&mut self, plan: &Plan) -> Result<bool> {
        // Group the planned paths by folder identity: one watch, the union of the masks.
        let mut by_id: BTreeMap<dirs::DirId, (F, Watch)> = BTreeMap::new();
        for (path, dp) in &plan.dirs {
            let (mask, w) = by_id.entry(dp.id).or_insert_with(|| {
                (
                    ALWAYS,
                    Watch {
                        paths: Vec::new(),
                        files: Vec::new(),
                        entries: BTreeSet::new(),
                    },
                )
            });
            w.paths.push(path.clone());
            if dp.files {
                *mask |= FILE_EVENTS;
                w.files.push(path.clone());
            }
            if !dp.entries.is_empty() {
                *mask |= ENTRY_EVENTS;
                w.entries.extend(dp.entries.iter().copied());
            }
        }
        let mut raced = false;
        let mut new: HashMap<WatchDescriptor, Watch> = HashMap::with_capacity(by_id.len());
        for (_, (mask, w)) in by_id {
            let path = &w.paths[0];
            match self.inotify.add_watch(path.as_path(), mask) {
                Ok(wd) => match new.get_mut(&wd) {
                    // The path now reaches a folder already watched (it changed under us).
                    Some(existing) => {
                        let _ = self.inotify.add_watch(path.as_path(), mask | IN_MASK_ADD);
                        existing.paths.extend(w.paths);
                        existing.files.extend(w.files);
                        existing.entries.extend(w.entries);
                        raced = true;
                    }
                    None => {
                        new.insert(wd, w);
                    }
                },
                Err(Errno::ENOENT | Errno::ENOTDIR) => raced = true,
                Err(Errno::ENOSPC) => {
                    return Err(Errno::ENOSPC).with_context(|| {
                        format!(
                        "watching {}: too many inotify watches; raise fs.inotify.max_user_watches",
                        path.display()
                    )
                    })
                }
                Err(e) => {
                    tracing::warn!("cannot watch {}: {e}", path.display());
                }
            }
        }
        for wd in self.watches.keys() {
            if !new.contains_key(wd) {
                // EINVAL when the kernel already dropped it (folder deleted): fine.
                let _ = self.inotify.rm_watch(*wd);
            }
        }
        self.watches = new;
        Ok(raced)
    }

    /// Feeds a synthetic `IN_Q_OVERFLOW` through the event path, as the kernel would.
    #[cfg(test)]
    fn inject_overflow(&mut self, now: Instant) -> Result<()> {
        let wd = *self.watches.keys().next().expect("`/` is always watched");
        let ev = InotifyEvent {
            wd,
            mask: F::IN_Q_OVERFLOW,
            cookie: 0,
            name: None,
        };
        let mut after = After::default();
        self.event(&ev, now, &mut after);
        self.finish(after, now)
    }
}
