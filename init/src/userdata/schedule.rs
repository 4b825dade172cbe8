//! The `[sync] schedule`: a 5-field cron expression, a cron nickname (`@hourly`) or `@every DURATION`.

use std::fmt;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// A validated cron expression, kept as text (croner parses it again when computing ticks).
    Cron(String),
    /// A fixed interval.
    Every(Duration),
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("@every") {
            let rest = rest.trim();
            if rest.is_empty() {
                return Err("`@every` needs a duration, like `@every 10m`".into());
            }
            let every = humantime::parse_duration(rest)
                .map_err(|e| format!("bad duration `{rest}` in `@every`: {e}"))?;
            if every < Duration::from_secs(1) {
                return Err(format!("`@every {rest}` is shorter than the 1s minimum"));
            }
            if every > MAX_EVERY {
                return Err(format!(
                    "`@every {rest}` is longer than the 366 day maximum"
                ));
            }
            return Ok(Schedule::Every(every));
        }
        let fields = text.split_whitespace().count();
        if !text.starts_with('@') && fields != 5 {
            return Err(format!(
                "cron schedule `{text}` has {fields} fields; expected 5 (minute hour day month weekday), \
                 or `@every 10m`"
            ));
        }
        croner::Cron::new(text)
            .parse()
            .map_err(|e| format!("bad cron schedule `{text}`: {e}"))?;
        Ok(Schedule::Cron(text.to_string()))
    }
}

impl Schedule {
    /// The next tick strictly after `now`, with this instance's splay `offset` added: the
    /// schedule's slot plus the offset, so one instance keeps its place in the fleet's spread.
    /// `@every` counts from `last` (the previous tick) when there is one.
    pub fn next_tick(
        &self,
        now: SystemTime,
        last: Option<SystemTime>,
        offset: Duration,
    ) -> SystemTime {
        match self {
            Schedule::Every(every) => {
                // The first tick carries the splay offset; later ones keep that phase.
                let base = match last {
                    Some(l) => l.checked_add(*every),
                    None => now.checked_add(*every).and_then(|t| t.checked_add(offset)),
                };
                match base {
                    // After a long sync or a suspended machine, do not fire a backlog of ticks.
                    Some(b) if b > now => b,
                    _ => now.checked_add(*every).unwrap_or(now + MAX_EVERY),
                }
            }
            Schedule::Cron(expr) => {
                let shifted = now.checked_sub(offset).unwrap_or(SystemTime::UNIX_EPOCH);
                let from = chrono::DateTime::<chrono::Utc>::from(shifted);
                let next = croner::Cron::new(expr)
                    .parse()
                    .ok()
                    .and_then(|c| c.find_next_occurrence(&from, false).ok())
                    .map(SystemTime::from)
                    // Validated at parse time; an expression with no future match waits a day.
                    .unwrap_or(shifted + Duration::from_secs(86_400));
                next.checked_add(offset).unwrap_or(next)
            }
        }
    }
}

/// A stable offset in `[0, splay)` derived from the instance id, so a fleet spreads its pulls and
/// each instance keeps its slot across restarts.
pub fn splay_offset(instance_id: &str, splay: Duration) -> Duration {
    let ms = splay.as_millis() as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, instance_id.as_bytes());
    let n = u64::from_be_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"));
    Duration::from_millis(n % ms)
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron(expr) => f.write_str(expr),
            Schedule::Every(d) => write!(f, "@every {}", humantime::format_duration(*d)),
        }
    }
}

/// The longest `@every`.
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 86_400);

/// A duration such as `2m` or `30s`, with a message that names the value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("bad duration `{text}`: {e} (write it like `90s`, `2m`, `1h`)"))
}

/// A duration no longer than `max` (`what` names the setting).
pub fn parse_bounded(text: &str, what: &str, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > max {
        return Err(format!(
            "{what} `{text}` is longer than the {} maximum",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_cron_nicknames_and_every() {
        assert_eq!(
            Schedule::parse("*/15 * * * *").unwrap(),
            Schedule::Cron("*/15 * * * *".into())
        );
        assert!(matches!(
            Schedule::parse("@hourly").unwrap(),
            Schedule::Cron(_)
        ));
        assert_eq!(
            Schedule::parse("@every 10m").unwrap(),
            Schedule::Every(Duration::from_secs(600))
        );
        assert_eq!(
            Schedule::parse("@every 1s").unwrap().to_string(),
            "@every 1s"
        );
    }

    #[test]
    fn cron_ticks_land_on_the_slot_plus_splay() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let every15 = Schedule::parse("*/15 * * * *").unwrap();
        // 00:07 -> 00:15; with a 30 s offset, 00:15:30.
        assert_eq!(
            every15.next_tick(at(7 * 60), None, Duration::ZERO),
            at(15 * 60)
        );
        assert_eq!(
            every15.next_tick(at(7 * 60), None, Duration::from_secs(30)),
            at(15 * 60 + 30)
        );
        // 00:15:10 with a 30 s offset: this slot's tick (00:15:30) is still ahead.
        assert_eq!(
            every15.next_tick(at(15 * 60 + 10), None, Duration::from_secs(30)),
            at(15 * 60 + 30)
        );
        // Exactly on a tick: the next one.
        assert_eq!(
            every15.next_tick(at(15 * 60), None, Duration::ZERO),
            at(30 * 60)
        );
    }

    #[test]
    fn every_counts_from_the_last_tick_without_backlog() {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let s = Schedule::parse("@every 10s").unwrap();
        assert_eq!(s.next_tick(at(100), None, Duration::ZERO), at(110));
        assert_eq!(
            s.next_tick(at(100), None, Duration::from_secs(3)),
            at(113),
            "splay shifts the first tick"
        );
        assert!(
            Schedule::parse("@every 400000000000y").is_err(),
            "absurd intervals are refused, not overflowed"
        );
        assert_eq!(s.next_tick(at(105), Some(at(100)), Duration::ZERO), at(110));
        assert_eq!(s.next_tick(at(200), Some(at(100)), Duration::ZERO), at(210));
    }

    #[test]
    fn splay_is_stable_and_bounded() {
        let splay = Duration::from_secs(120);
        let a = splay_offset("i-0123456789abcdef0", splay);
        assert_eq!(a, splay_offset("i-0123456789abcdef0", splay));
        assert!(a < splay);
        let spread: std::collections::BTreeSet<_> = (0..50)
            .map(|i| splay_offset(&format!("i-{i:017x}"), splay).as_secs())
            .collect();
        assert!(
            spread.len() > 30,
            "offsets spread over the window: {spread:?}"
        );
        assert_eq!(splay_offset("i-1", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn rejects_bad_schedules() {
        assert!(Schedule::parse("* * * *").unwrap_err().contains("4 fields"));
        assert!(Schedule::parse("*/15 * * * * *")
            .unwrap_err()
            .contains("6 fields"));
        assert!(Schedule::parse("61 * * * *").is_err());
        assert!(Schedule::parse("@every").is_err());
        assert!(Schedule::parse("@every soon").is_err());
        assert!(Schedule::parse("@every 10ms")
            .unwrap_err()
            .contains("minimum"));
        assert!(Schedule::parse("@fortnightly").is_err());
    }
}
