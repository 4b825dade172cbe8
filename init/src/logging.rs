//! The agent's log: one line per event on stderr (the journal and the console are its readers),
//!
//! ```text
//! 2026-12-04T16:13:34.313044Z  INFO watch rules changed; reloading paths=["/etc/app/a.conf"]
//! ```
//!
//! the time in UTC to the microsecond, the level, the message, then each field as `name=value`
//! (`Debug`, so strings are quoted). It is the line tracing-subscriber's `fmt` layer wrote with
//! colours and targets off. That layer and its span registry were 21 KiB of the static agent
//! (issue 18: under 2 MiB), and the agent records no spans, so this [`Subscriber`] writes events
//! only: a span gets one shared id and its fields are not kept.
//!
//! Which events: a level (`-q` errors, default info, `-v` debug, `-vv` trace), or `RUST_LOG` in
//! the `target=level,...` form tracing-subscriber's `Targets` read, without a regex engine.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::SystemTime;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};

/// Which events are written: a default level, and levels for targets by prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    default: LevelFilter,
    /// Longest prefix first, so the most specific directive wins.
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Every target at `level`.
    pub fn level(level: LevelFilter) -> Self {
        Filter {
            default: level,
            targets: Vec::new(),
        }
    }

    /// `RUST_LOG`'s directives, comma separated: `level`, `target=level` or `target` (all of
    /// it). A target not named, with no bare level, is off. `None` when any directive is not
    /// understood (the caller then keeps its own level).
    pub fn parse(spec: &str) -> Option<Self> {
        let mut f = Filter::level(LevelFilter::OFF);
        for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            match d.split_once('=') {
                Some((target, level)) if !target.is_empty() => {
                    f.targets
                        .push((target.to_string(), level.trim().parse().ok()?));
                }
                Some(_) => return None,
                None => match d.parse::<LevelFilter>() {
                    Ok(level) => f.default = level,
                    // A bare name that is no level is a target, at every level.
                    Err(_) if d.chars().all(|c| c.is_alphanumeric() || "_:-".contains(c)) => {
                        f.targets.push((d.to_string(), LevelFilter::TRACE))
                    }
                    Err(_) => return None,
                },
            }
        }
        f.targets.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        Some(f)
    }

    fn for_target(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .find(|(t, _)| target.starts_with(t.as_str()))
            .map_or(self.default, |(_, l)| *l)
    }

    pub fn enabled(&self, meta: &Metadata<'_>) -> bool {
        *meta.level() <= self.for_target(meta.target())
    }

    /// The most verbose level any target gets: tracing skips what is above it without asking.
    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, std::cmp::max)
    }
}

/// Where a finished line goes.
type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

/// The subscriber: filter, format, write.
pub struct Log {
    filter: Filter,
    sink: Sink,
}

impl Log {
    /// Lines to stderr, each in one write (whole lines even when programs share the journal).
    pub fn stderr(filter: Filter) -> Self {
        Log::to(
            filter,
            Box::new(|line| drop(std::io::stderr().lock().write_all(line))),
        )
    }

    pub fn to(filter: Filter, sink: Sink) -> Self {
        Log { filter, sink }
    }
}

/// Taken by every test that runs code under a scoped subscriber (`with_default`). tracing keeps
/// one maximum level and one interest per call site for the whole process, rebuilt as
/// subscribers come and go:
/// - two scoped subscribers with different filters on two test threads can hide each other's
///   events (a TRACE test lost its lines beside a WARN one), so they take turns;
/// - while only one dispatcher is registered, tracing-core 0.1 computes a call site's interest,
///   on its first hit, from the default of the thread that hits it. A test thread with no
///   subscriber hitting a call site first cached "never" for it, and the scoped TRACE
///   subscriber lost that line (CI, stop 31). A second dispatcher kept registered for the whole
///   test process makes tracing ask every registered one instead.
#[cfg(test)]
pub(crate) fn scoped_subscriber_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    static SECOND: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    SECOND.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    // A test that panicked under it poisons nothing another test relies on.
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `Log::stderr(filter)` the process's subscriber.
pub fn init(filter: Filter) {
    // Only fails when one is set already (a test harness); the first one stays.
    let _ = tracing::subscriber::set_global_default(Log::stderr(filter));
}

impl Subscriber for Log {
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.filter.enabled(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        self.filter.enabled(meta)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.filter.max())
    }

    // No spans are kept (the agent records none): every span is the same id, and entering or
    // leaving one changes nothing.
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        (self.sink)(line(SystemTime::now(), event).as_bytes());
    }
}

/// One event as its log line, newline included.
fn line(at: SystemTime, event: &Event<'_>) -> String {
    let mut out = String::with_capacity(128);
    let _ = write!(
        out,
        "{} {:>5} ",
        humantime::format_rfc3339_micros(at),
        event.metadata().level()
    );
    let mut fields = Fields {
        out: &mut out,
        first: true,
    };
    event.record(&mut fields);
    out.push('\n');
    out
}

/// Writes the message bare and every other field as ` name=value`.
struct Fields<'a> {
    out: &'a mut String,
    first: bool,
}

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !std::mem::take(&mut self.first) {
            self.out.push(' ');
        }
        let _ = match field.name() {
            // The message is `format_args!`, whose Debug is its text.
            "message" => write!(self.out, "{value:?}"),
            name => write!(
                self.out,
                "{}={value:?}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Runs `f` under a `Log` with `filter` and returns what it wrote.
    fn logged(filter: Filter, f: impl FnOnce()) -> String {
        let _alone = scoped_subscriber_lock();
        let buf = Arc::new(Mutex::new(Vec::new()));
        let into = buf.clone();
        let log = Log::to(
            filter,
            Box::new(move |l| into.lock().unwrap().extend_from_slice(l)),
        );
        tracing::subscriber::with_default(log, f);
        let bytes = buf.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// A call site hit for the first time on a thread without a subscriber, while a scoped one
    /// is set on this thread, must still reach the scoped one (the watcher's TRACE test lost a
    /// line to another test's thread this way).
    #[test]
    fn a_call_site_first_hit_on_another_thread_still_reaches_a_scoped_subscriber() {
        fn call_site() {
            tracing::trace!("from the call site under test");
        }
        let out = logged(Filter::level(LevelFilter::TRACE), || {
            std::thread::spawn(call_site).join().unwrap();
            call_site();
        });
        assert_eq!(
            out.matches("from the call site under test").count(),
            1,
            "{out}"
        );
    }

    #[test]
    fn a_line_is_time_level_message_then_fields() {
        let out = logged(Filter::level(LevelFilter::INFO), || {
            let paths = vec!["/etc/app/a.conf"];
            tracing::info!(phase = "provision", ms = 30719u64, "done");
            tracing::warn!(paths = ?paths, target = %"web", "restart {} of {}", 1, 2);
            tracing::error!(r#type = "x", "failed");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        // 2026-12-04T16:13:34.313044Z: 27 characters, UTC, to the microsecond.
        let (time, rest) = lines[0].split_at(27);
        assert!(
            time.ends_with('Z') && time.as_bytes()[10] == b'T' && time.as_bytes()[19] == b'.',
            "{time}"
        );
        humantime::parse_rfc3339(time).expect("an RFC 3339 time");
        assert_eq!(rest, "  INFO done phase=\"provision\" ms=30719");
        assert_eq!(
            &lines[1][27..],
            "  WARN restart 1 of 2 paths=[\"/etc/app/a.conf\"] target=web"
        );
        assert_eq!(&lines[2][27..], " ERROR failed type=\"x\"");
    }

    #[test]
    fn levels_below_the_filter_are_not_written() {
        let out = logged(Filter::level(LevelFilter::WARN), || {
            tracing::info!("hidden");
            tracing::debug!("hidden");
            tracing::warn!("shown");
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains(" WARN shown"), "{out}");
        let out = logged(Filter::level(LevelFilter::TRACE), || {
            tracing::trace!(n = 1, "deep")
        });
        assert!(out.contains("TRACE deep n=1"), "{out}");
    }

    #[test]
    fn rust_log_directives_pick_levels_by_target() {
        let f = Filter::parse("warn,stackless_init::watch=trace,stackless_init=info").unwrap();
        assert_eq!(
            f.for_target("stackless_init::watch::debounce"),
            LevelFilter::TRACE
        );
        assert_eq!(f.for_target("stackless_init::boot"), LevelFilter::INFO);
        assert_eq!(f.for_target("ureq"), LevelFilter::WARN);
        assert_eq!(f.max(), LevelFilter::TRACE);
        // No bare level: targets not named are off.
        let f = Filter::parse("stackless_init::sync=debug").unwrap();
        assert_eq!(f.for_target("stackless_init::boot"), LevelFilter::OFF);
        assert_eq!(f.for_target("stackless_init::sync"), LevelFilter::DEBUG);
        // A bare target is every level of it; levels in any case.
        let f = Filter::parse(" DEBUG , stackless_init::watch ").unwrap();
        assert_eq!(f.default, LevelFilter::DEBUG);
        assert_eq!(f.for_target("stackless_init::watch"), LevelFilter::TRACE);
        // Not understood: the caller keeps its own level.
        assert_eq!(Filter::parse("stackless_init=loud"), None);
        assert_eq!(Filter::parse("=debug"), None);
        assert_eq!(Filter::parse("watch[x]"), None);
        // This module's own events, through a directive on its target.
        let out = logged(
            Filter::parse("off,stackless_init::logging=debug").unwrap(),
            || tracing::debug!("mine"),
        );
        assert!(out.contains("DEBUG mine"), "{out}");
    }
}
