//! Pending changes per target: a quiet window restarted by every event, bounded by a maximum
//! delay from the first event. Pure bookkeeping; no clock of its own (callers pass `now`).
//!
//! A lone change (one write: a modify and a close; one rename; one delete) only waits a settle
//! window, a quarter of the quiet window, so a single edit restarts its program quickly. As soon
//! as more events arrive the change is a burst and the full quiet window applies, so a burst
//! still gives one action.

use super::Timing;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What is pending for one target.
#[derive(Debug)]
pub struct Pending {
    first: Instant,
    last: Instant,
    /// Events seen; more than [`LONE_CHANGE_EVENTS`] make a burst.
    events: u32,
    /// Path → "already known to have changed": set when another target's take recorded a new
    /// hash for this path, so this target still sees the change.
    pub paths: BTreeMap<PathBuf, bool>,
}

/// The events one change of one file gives at most: create, modify, close-write.
const LONE_CHANGE_EVENTS: u32 = 3;

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
}

impl Debouncer {
    /// Notes an event on `path` for `target`. Allocates only for a new target or a new path.
    pub fn add(&mut self, target: &str, path: &Path, now: Instant) -> Added {
        let pending = match self.targets.get_mut(target) {
            Some(p) => p,
            None => self.targets.entry(target.to_owned()).or_insert(Pending {
                first: now,
                last: now,
                events: 0,
                paths: BTreeMap::new(),
            }),
        };
        pending.events = pending.events.saturating_add(1);
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

    fn deadline(p: &Pending, timing: &Timing) -> Instant {
        // Absurd durations must not panic: an overflowing bound is ignored.
        let window = if p.events <= LONE_CHANGE_EVENTS && p.paths.len() <= 1 {
            timing.quiet / 4
        } else {
            timing.quiet
        };
        match (
            p.last.checked_add(window),
            p.first.checked_add(timing.max_delay),
        ) {
            (Some(a), Some(b)) => a.min(b),
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => p.last,
        }
    }

    /// The earliest instant a target becomes due; `None` when nothing is pending.
    pub fn next_deadline(&self, timing: &Timing) -> Option<Instant> {
        self.targets
            .values()
            .map(|p| Self::deadline(p, timing))
            .min()
    }

    /// Removes and returns the targets that are due at `now`, in target order.
    pub fn take_ready(&mut self, now: Instant, timing: &Timing) -> Vec<(String, Pending)> {
        let ready: Vec<String> = self
            .targets
            .iter()
            .filter(|(_, p)| Self::deadline(p, timing) <= now)
            .map(|(t, _)| t.clone())
            .collect();
        ready
            .into_iter()
            .filter_map(|t| self.targets.remove_entry(&t))
            .collect()
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
        d.add("a", Path::new("/x"), t0);
        assert_eq!(
            d.next_deadline(&t),
            Some(t0 + t.quiet / 4),
            "a lone change settles fast"
        );
        d.add("a", Path::new("/x"), t0);
        d.add("a", Path::new("/x"), t0);
        assert_eq!(
            d.next_deadline(&t),
            Some(t0 + t.quiet / 4),
            "one write is up to three events"
        );
        d.add("a", Path::new("/x"), t0);
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
            d.add("a", Path::new("/x"), now);
            taken.extend(d.take_ready(now, &t).into_iter().map(|(_, p)| p.first));
        }
        // ...until max_delay forces it out, once in 3s.
        assert_eq!(taken, vec![t0]);
        let (_, p) = d.take_ready(now + t.quiet, &t).pop().unwrap();
        assert_eq!(p.paths.len(), 1);
        assert_eq!(d.next_deadline(&t), None);
    }

    #[test]
    fn confirm_marks_other_targets() {
        let t = timing();
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        d.add("a", Path::new("/x"), t0);
        d.add("b", Path::new("/x"), t0 + Duration::from_millis(90));
        let ready = d.take_ready(t0 + t.quiet, &t);
        assert_eq!(ready.len(), 1);
        d.confirm(Path::new("/x"));
        let ready = d.take_ready(t0 + Duration::from_millis(150), &t);
        assert_eq!(ready[0].0, "b");
        assert!(ready[0].1.paths[Path::new("/x")]);
    }
}
