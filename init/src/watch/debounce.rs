//! Pending changes per target: a quiet window restarted by every event, bounded by a maximum
//! delay from the first event. Pure bookkeeping; no clock of its own (callers pass `now`).
//!
//! Two windows, by what the events so far look like:
//!
//! * A finished write: exactly one closing event (`IN_CLOSE_WRITE` or `IN_MOVED_TO`, or a change
//!   a rescan found) on one path, and nothing after it. The writer is done with the file; the agent
//!   acts once the kernel's queue has stayed empty for [`CONFIRM`] (no event at all in the watched
//!   folders, temporary files and other targets' files included, up to the quiet window), so a
//!   single edit restarts its program about as fast as a loop acting on the first event would,
//!   and a writer busy with other files is not taken for done.
//! * Anything else waits the whole quiet window: a write still open (the last event is a create
//!   or a modify, no close yet: the writer may stall between its truncate and its write; its close
//!   ends the wait at once), a delete or a rename away (the writer may be replacing the file, as
//!   vim does, and a program restarted on a missing file would fail), and a burst: a second closing
//!   event, a second path or more than [`LONE_CHANGE_EVENTS`] events. A burst gives one action. A writer that writes again
//!   within [`CONFIRM`] of its first close is seen as a burst; one that pauses longer gets two
//!   actions, which is the price of the fast path. The agent's own highstate cannot split like
//!   that: the loop is blocked while salt runs, so everything salt wrote is read in one go.

use super::Timing;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What is pending for one target.
#[derive(Debug)]
pub struct Pending {
    first: Instant,
    last: Instant,
    /// Events seen; more than [`LONE_CHANGE_EVENTS`] make a burst.
    events: u32,
    /// Closing events seen (a write finished, a file renamed into place).
    closes: u32,
    /// What the last event was.
    last_kind: Kind,
    /// When a finished write's confirmation began, and the CPU stall total then (µs; see
    /// `pressure.rs`). Cleared by every event.
    pub mark: Option<(Instant, u64)>,
    /// Path → "already known to have changed": set when another target's take recorded a new
    /// hash for this path, so this target still sees the change.
    pub paths: BTreeMap<PathBuf, bool>,
}

impl Pending {
    /// When its first event came.
    pub fn started(&self) -> Instant {
        self.first
    }

    /// A finished lone write: acted on after the short confirmation.
    pub fn is_finished_write(&self) -> bool {
        self.events <= LONE_CHANGE_EVENTS
            && self.paths.len() <= 1
            && self.closes <= 1
            && self.last_kind == Kind::Closing
    }
}

/// The events one change of one file gives at most: create, modify, close-write.
const LONE_CHANGE_EVENTS: u32 = 3;

/// How long the queue must stay empty after a finished write before the agent acts on it. Long
/// enough for a writer's next write in a loop (tens of microseconds) to arrive first, short
/// enough to be lost in the restart itself.
pub const CONFIRM: Duration = Duration::from_millis(1);

/// What kind of event this is, for telling a finished write from one still going on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The writer is done: `IN_CLOSE_WRITE`, `IN_MOVED_TO`, or a difference a rescan found.
    Closing,
    /// Anything else: a write going on (`IN_CREATE`, `IN_MODIFY`, a truncate among them), or
    /// the file going away (`IN_DELETE`, `IN_MOVED_FROM`).
    Other,
}

/// What an event did to its target's pending action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// It started one.
    First,
    /// It joined the one already pending (the count of events so far).
    Debounced(u32),
}

#[derive(Debug, Default)]
pub struct Debouncer {
    targets: BTreeMap<String, Pending>,
    /// The last event of any kind in the watched folders, ignored names included.
    activity: Option<Instant>,
    /// While recording (see [`Debouncer::record_touches`]), the paths events were added for.
    touches: Option<BTreeSet<PathBuf>>,
}

impl Debouncer {
    /// Notes an event on `path` for `target`. Allocates only for a new target or a new path.
    /// Starts noting the paths events are added for (from none).
    pub fn record_touches(&mut self) {
        self.touches = Some(BTreeSet::new());
    }

    /// Stops noting, and returns the paths events were added for since [`Self::record_touches`].
    pub fn take_touches(&mut self) -> BTreeSet<PathBuf> {
        self.touches.take().unwrap_or_default()
    }

    pub fn add(&mut self, target: &str, path: &Path, kind: Kind, now: Instant) -> Added {
        if let Some(t) = self.touches.as_mut() {
            if !t.contains(path) {
                t.insert(path.to_owned());
            }
        }
        let pending = match self.targets.get_mut(target) {
            Some(p) => p,
            None => self.targets.entry(target.to_owned()).or_insert(Pending {
                first: now,
                last: now,
                events: 0,
                closes: 0,
                last_kind: kind,
                mark: None,
                paths: BTreeMap::new(),
            }),
        };
        pending.events = pending.events.saturating_add(1);
        pending.last_kind = kind;
        pending.mark = None;
        if kind == Kind::Closing {
            pending.closes = pending.closes.saturating_add(1);
        }
        if now > pending.last {
            pending.last = now;
        }
        if !pending.paths.contains_key(path) {
            pending.paths.insert(path.to_owned(), false);
        }
        if pending.events == 1 {
            Added::First
        } else {
            Added::Debounced(pending.events)
        }
    }

    /// Notes an event anywhere in the watched folders: a finished write is confirmed only once
    /// the whole queue has stayed empty for [`CONFIRM`], so a writer busy with other files (a
    /// loop over several, a temporary file before a rename) is not taken for done.
    pub fn activity(&mut self, now: Instant) {
        if self.activity.is_none_or(|a| now > a) {
            self.activity = Some(now);
        }
    }

    fn deadline(&self, p: &Pending, timing: &Timing) -> Instant {
        // Absurd durations must not panic: an overflowing bound is ignored.
        let settled = match p.last_kind {
            _ if p.is_finished_write() => {
                // Held off by other activity, never longer than a burst would wait.
                let from = self.activity.map_or(p.last, |a| a.max(p.last));
                match (
                    from.checked_add(CONFIRM.min(timing.quiet / 4)),
                    p.last.checked_add(timing.quiet),
                ) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            _ => p.last.checked_add(timing.quiet),
        };
        match (settled, p.first.checked_add(timing.max_delay)) {
            (Some(a), Some(b)) => a.min(b),
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => p.last,
        }
    }

    /// The earliest instant a target becomes due; `None` when nothing is pending.
    pub fn next_deadline(&self, timing: &Timing) -> Option<Instant> {
        self.targets
            .values()
            .map(|p| self.deadline(p, timing))
            .min()
    }

    /// Removes and returns the targets that are due at `now`, in target order.
    pub fn take_ready(&mut self, now: Instant, timing: &Timing) -> Vec<(String, Pending)> {
        let ready: Vec<String> = self
            .targets
            .iter()
            .filter(|(_, p)| self.deadline(p, timing) <= now)
            .map(|(t, _)| t.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|t| self.targets.remove_entry(&t))
            .collect()
    }

    /// Puts a taken target back, as a burst: its file was written again while the agent was
    /// reading it, so the writer is not done. The events read since join it; `first` stays, so
    /// `max_delay` still bounds the wait.
    pub fn requeue(&mut self, target: String, mut old: Pending) {
        old.events = old.events.max(LONE_CHANGE_EVENTS + 1);
        old.mark = None;
        match self.targets.get_mut(&target) {
            Some(p) => {
                p.first = p.first.min(old.first);
                p.last = p.last.max(old.last);
                p.events = p.events.saturating_add(old.events);
                p.closes = p.closes.saturating_add(old.closes);
                for (path, confirmed) in old.paths {
                    *p.paths.entry(path).or_insert(false) |= confirmed;
                }
            }
            None => {
                self.targets.insert(target, old);
            }
        }
    }

    /// Finished writes whose confirmation has no mark yet.
    pub fn unmarked_finished_writes(&mut self) -> impl Iterator<Item = &mut Pending> {
        self.targets
            .values_mut()
            .filter(|p| p.mark.is_none() && p.is_finished_write())
    }

    /// Whether some target has `path` pending.
    pub fn has_path(&self, path: &Path) -> bool {
        self.targets.values().any(|p| p.paths.contains_key(path))
    }

    /// Marks `path` as changed for every target still pending with it.
    pub fn confirm(&mut self, path: &Path) {
        for p in self.targets.values_mut() {
            if let Some(flag) = p.paths.get_mut(path) {
                *flag = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timing() -> Timing {
        Timing {
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }

    #[test]
    fn quiet_window_and_max_delay() {
        let t = timing();
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        assert_eq!(d.next_deadline(&t), None);
        d.add("a", Path::new("/x"), Kind::Other, t0);
        assert_eq!(
            d.next_deadline(&t),
            Some(t0 + t.quiet),
            "a write still open waits the whole window (the writer may stall after its truncate)"
        );
        d.add("a", Path::new("/x"), Kind::Other, t0);
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        assert_eq!(
            d.next_deadline(&t),
            Some(t0 + CONFIRM),
            "one finished write: acted on once the queue stays empty"
        );
        d.add("a", Path::new("/x"), Kind::Other, t0);
        assert_eq!(
            d.next_deadline(&t),
            Some(t0 + t.quiet),
            "more is a burst: the quiet window"
        );
        // A stream of events every 50ms keeps pushing the quiet window...
        let mut now = t0;
        let mut taken = Vec::new();
        while now < t0 + Duration::from_secs(3) {
            now += Duration::from_millis(50);
            d.add("a", Path::new("/x"), Kind::Closing, now);
            taken.extend(d.take_ready(now, &t).into_iter().map(|(_, p)| p.first));
        }
        // ...until max_delay forces it out, once in 3s.
        assert_eq!(taken, vec![t0]);
        let (_, p) = d.take_ready(now + t.quiet, &t).pop().unwrap();
        assert_eq!(p.paths.len(), 1);
        assert_eq!(d.next_deadline(&t), None);
    }

    #[test]
    fn a_second_close_or_a_second_path_is_a_burst() {
        let t = timing();
        let t0 = Instant::now();
        // Two renames into place, nothing else: two writes.
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        assert_eq!(d.next_deadline(&t), Some(t0 + t.quiet));
        // One finished write on each of two files.
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        d.add("a", Path::new("/y"), Kind::Closing, t0);
        assert_eq!(d.next_deadline(&t), Some(t0 + t.quiet));
        // A delete (vim renames the file away, then writes the new one): the whole window.
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Other, t0);
        assert_eq!(d.next_deadline(&t), Some(t0 + t.quiet));
        // Each target judges its own events: a write to another target's file changes nothing.
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        d.add(
            "b",
            Path::new("/y"),
            Kind::Closing,
            t0 + Duration::from_millis(5),
        );
        d.add(
            "b",
            Path::new("/y"),
            Kind::Closing,
            t0 + Duration::from_millis(5),
        );
        let ready = d.take_ready(t0 + CONFIRM, &t);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].0, "a");
        assert_eq!(
            d.next_deadline(&t),
            Some(t0 + Duration::from_millis(5) + t.quiet)
        );
    }

    #[test]
    fn a_short_quiet_window_caps_the_confirmation() {
        let t = Timing {
            quiet: Duration::from_micros(200),
            max_delay: Duration::from_secs(1),
        };
        let t0 = Instant::now();
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        assert_eq!(d.next_deadline(&t), Some(t0 + Duration::from_micros(50)));
    }

    #[test]
    fn confirm_marks_other_targets() {
        let t = timing();
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        d.add("a", Path::new("/x"), Kind::Other, t0);
        d.add(
            "b",
            Path::new("/x"),
            Kind::Other,
            t0 + Duration::from_millis(90),
        );
        let ready = d.take_ready(t0 + t.quiet, &t);
        assert_eq!(ready.len(), 1);
        d.confirm(Path::new("/x"));
        let ready = d.take_ready(t0 + Duration::from_millis(190), &t);
        assert_eq!(ready[0].0, "b");
        assert!(ready[0].1.paths[Path::new("/x")]);
    }

    #[test]
    fn a_requeued_target_is_a_burst_that_keeps_its_first_event() {
        let t = timing();
        let t0 = Instant::now();
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        let (target, taken) = d.take_ready(t0 + CONFIRM, &t).pop().unwrap();
        // The file was written again while it was being read: the new event and the old pending
        // change wait together, the whole quiet window, bounded from the first event.
        let t1 = t0 + Duration::from_millis(3);
        d.add("a", Path::new("/x"), Kind::Other, t1);
        d.requeue(target, taken);
        assert_eq!(d.next_deadline(&t), Some(t1 + t.quiet));
        let (_, p) = d.take_ready(t1 + t.quiet, &t).pop().unwrap();
        assert_eq!(p.first, t0);
        assert_eq!(p.paths.len(), 1);
        // Requeued alone (nothing new pending): still a burst, not a finished write.
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        let (target, taken) = d.take_ready(t0 + CONFIRM, &t).pop().unwrap();
        d.requeue(target, taken);
        assert_eq!(d.next_deadline(&t), Some(t0 + t.quiet));
    }

    #[test]
    fn any_activity_holds_off_a_finished_write_up_to_the_quiet_window() {
        let t = timing();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut d = Debouncer::default();
        d.activity(t0);
        d.add("a", Path::new("/x"), Kind::Closing, t0);
        assert_eq!(d.next_deadline(&t), Some(t0 + CONFIRM));
        // A temporary file, another target's file: the writer is still at work.
        d.activity(t0 + ms(0) + Duration::from_micros(800));
        assert_eq!(d.next_deadline(&t), Some(t0 + Duration::from_micros(1800)));
        // Endless activity elsewhere waits no longer than a burst would.
        d.activity(t0 + ms(500));
        assert_eq!(d.next_deadline(&t), Some(t0 + t.quiet));
        // Activity does not touch the other windows.
        let mut d = Debouncer::default();
        d.add("a", Path::new("/x"), Kind::Other, t0);
        d.activity(t0 + ms(10));
        assert_eq!(d.next_deadline(&t), Some(t0 + t.quiet));
    }
}
