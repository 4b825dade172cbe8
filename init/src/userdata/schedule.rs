//! The `[sync] schedule`: a 5-field cron expression, a cron nickname (`@hourly`) or `@every DURATION`.

use std::fmt;
use std::time::Duration;

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

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron(expr) => f.write_str(expr),
            Schedule::Every(d) => write!(f, "@every {}", humantime::format_duration(*d)),
        }
    }
}

/// A duration such as `2m` or `30s`, with a message that names the value.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("bad duration `{text}`: {e} (write it like `90s`, `2m`, `1h`)"))
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
