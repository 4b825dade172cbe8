//! Fault injection in numbers (issue 19): each fault test injects its fault `rounds()` times at
//! random points and keeps a `Tally` of what happened. The test fails on any loss, as every test
//! does; `scripts/faults.sh` also collects the tallies (`STACKLESS_FAULTS_REPORT`, one JSON line
//! per fault) and renders them as `docs/reliability.md`.
//!
//! The random points come from a seed that is printed first, so a failing round can be replayed
//! with `STACKLESS_FAULTS_SEED`.

use std::collections::BTreeMap;
use std::io::Write;

/// How many times each fault is injected: `STACKLESS_FAULTS_ROUNDS`, or `ci` (the suite's
/// default, a few rounds that keep `cargo test` short).
pub fn rounds(ci: u32) -> u32 {
    std::env::var("STACKLESS_FAULTS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(ci)
}

/// A small deterministic random source (SplitMix64): the injection points of a run.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `STACKLESS_FAULTS_SEED` or the clock; the seed is printed, named by `what`.
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("STACKLESS_FAULTS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: STACKLESS_FAULTS_SEED={seed}");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..hi` (`hi` excluded; `lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64) as usize]
    }
}

/// The outcome of one fault, injected many times.
pub struct Tally {
    fault: String,
    injected: u32,
    survived: u32,
    /// What was lost or leaked, by kind ("releases", "restarts", "records", "resources"), and
    /// the first few rounds that lost something, to say in the failure.
    losses: BTreeMap<String, u64>,
    failures: Vec<String>,
    /// Where the fault landed ("mid-fetch", "publish", ...), counted: the table's coverage.
    landed: BTreeMap<String, u32>,
}

impl Tally {
    /// `fault` is the table's row name; `kinds` are the loss columns that apply to it (each
    /// starts at zero, so a column the fault never touched is absent rather than a false zero).
    pub fn new(fault: &str, kinds: &[&str]) -> Tally {
        Tally {
            fault: fault.to_string(),
            injected: 0,
            survived: 0,
            losses: kinds.iter().map(|k| (k.to_string(), 0)).collect(),
            failures: Vec::new(),
            landed: BTreeMap::new(),
        }
    }

    /// One injection, where it landed, and what it lost (empty: survived). A loss kind must be
    /// one given to `new`.
    pub fn round(&mut self, landed: &str, losses: &[(&str, u64, String)]) {
        self.injected += 1;
        *self.landed.entry(landed.to_string()).or_default() += 1;
        let mut lost = false;
        for (kind, n, why) in losses {
            if *n == 0 {
                continue;
            }
            let column = self
                .losses
                .get_mut(*kind)
                .unwrap_or_else(|| panic!("{}: no loss column {kind:?}", self.fault));
            *column += n;
            lost = true;
            if self.failures.len() < 5 {
                self.failures.push(format!(
                    "round {} ({landed}): {n} {kind} lost: {why}",
                    self.injected
                ));
            }
        }
        if !lost {
            self.survived += 1;
        }
        eprintln!(
            "{}: round {} landed {landed}: {}",
            self.fault,
            self.injected,
            if lost { "LOST" } else { "survived" }
        );
    }

    /// Appends the tally to `STACKLESS_FAULTS_REPORT` when set, then fails the test if anything
    /// was lost or nothing was injected.
    pub fn finish(self) {
        if let Ok(path) = std::env::var("STACKLESS_FAULTS_REPORT") {
            let line = serde_json::json!({
                "fault": self.fault,
                "injected": self.injected,
                "survived": self.survived,
                "losses": self.losses,
                "landed": self.landed,
                "failures": self.failures,
            });
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            writeln!(f, "{line}").unwrap();
        }
        assert!(self.injected > 0, "{}: no fault was injected", self.fault);
        assert!(
            self.failures.is_empty(),
            "{}: {} of {} injections lost something:\n{}",
            self.fault,
            self.injected - self.survived,
            self.injected,
            self.failures.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_rounds_and_fails_on_a_loss() {
        let mut t = Tally::new("x", &["releases"]);
        t.round("fetch", &[]);
        t.round(
            "publish",
            &[("releases", 1, "current is half a release".into())],
        );
        assert_eq!((t.injected, t.survived), (2, 1));
        assert_eq!(t.losses["releases"], 1);
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.finish()));
        let msg = failed.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("round 2 (publish): 1 releases lost"), "{msg}");
    }

    #[test]
    fn a_tally_without_injections_fails() {
        let t = Tally::new("nothing", &[]);
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.finish())).is_err());
    }

    #[test]
    fn the_random_source_stays_in_range_and_repeats_from_its_seed() {
        let mut a = Rng(7);
        let mut b = Rng(7);
        for _ in 0..1000 {
            let x = a.range(10, 20);
            assert!((10..20).contains(&x));
            assert_eq!(x, b.range(10, 20));
        }
        assert_eq!(a.range(5, 5), 5);
    }
}
