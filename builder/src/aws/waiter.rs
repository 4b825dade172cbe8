//! Waiting on AWS: poll with backoff until a deadline, fail at once on a terminal state, and show
//! the elapsed time on a terminal (a spinner on stderr; nothing but log lines when stderr is not
//! a terminal or progress is off). Sleeps are tokio sleeps, so a wait is cancelled by dropping it.

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// What one look at the resource found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check<T> {
    /// Done: the wait returns this.
    Ready(T),
    /// Not yet; the text is the current state, shown on the spinner (`pending`, `InProgress`).
    Waiting(String),
    /// A state the resource will never leave (`terminated` while waiting for `running`): the wait
    /// fails at once with this text.
    Failed(String),
}

impl Check<()> {
    /// Ready when nothing is left waiting; else waiting on all of it, in one line.
    pub fn unless_waiting(waiting: Vec<String>) -> Check<()> {
        if waiting.is_empty() {
            Check::Ready(())
        } else {
            Check::Waiting(waiting.join("; "))
        }
    }
}

/// One wait: what for, how long at most, how often to look.
#[derive(Debug, Clone)]
pub struct Wait {
    /// For messages: "instance i-0abc to be running".
    pub what: String,
    /// Give up after this long.
    pub timeout: Duration,
    /// The first pause between looks; each next pause is half as long again, up to `max_interval`.
    pub interval: Duration,
    pub max_interval: Duration,
    /// Draw a spinner with the elapsed time (only where stderr is a terminal).
    pub progress: bool,
    /// Said after a timeout: what to check or raise.
    pub hint: String,
}

impl Wait {
    pub fn new(what: impl Into<String>, timeout: Duration) -> Self {
        Wait {
            what: what.into(),
            timeout,
            interval: Duration::from_secs(2),
            max_interval: Duration::from_secs(15),
            progress: true,
            hint: String::new(),
        }
    }
    pub fn interval(mut self, first: Duration, max: Duration) -> Self {
        self.interval = first;
        self.max_interval = max.max(first);
        self
    }
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }

    /// Calls `check` until it is ready, failed, or the deadline passes. An error from `check`
    /// (an API call that failed for good) ends the wait with that error.
    pub async fn until<T, F, Fut>(&self, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Check<T>>>,
    {
        let start = Instant::now();
        let spinner = Spinner::new(&self.what, self.progress);
        let mut interval = self.interval;
        let mut last = String::new();
        loop {
            match check().await? {
                Check::Ready(v) => {
                    tracing::debug!("{}: done after {}", self.what, elapsed(start));
                    return Ok(v);
                }
                Check::Failed(why) => bail!(
                    "while waiting for {}: {why} (after {})",
                    self.what,
                    elapsed(start)
                ),
                Check::Waiting(state) => {
                    if state != last {
                        tracing::info!("waiting for {}: {state}", self.what);
                        last = state;
                    }
                    spinner.show(&last);
                }
            }
            let spent = start.elapsed();
            if spent >= self.timeout {
                let state = if last.is_empty() {
                    String::new()
                } else {
                    format!(" (last state: {last})")
                };
                let hint = if self.hint.is_empty() {
                    String::new()
                } else {
                    format!("; {}", self.hint)
                };
                bail!(
                    "timed out after {} waiting for {}{state}{hint}",
                    elapsed(start),
                    self.what
                );
            }
            tokio::time::sleep(interval.min(self.timeout - spent)).await;
            interval = (interval + interval / 2).min(self.max_interval);
        }
    }
}

fn elapsed(start: Instant) -> String {
    humantime::format_duration(Duration::from_secs(start.elapsed().as_secs())).to_string()
}

/// A spinner on stderr, cleared when dropped (also when the wait is cancelled).
struct Spinner(Option<ProgressBar>);

impl Spinner {
    fn new(what: &str, progress: bool) -> Self {
        if !progress || !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let pb = ProgressBar::new_spinner();
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} waiting for {prefix}: {msg} [{elapsed}]")
        {
            pb.set_style(style);
        }
        pb.set_prefix(what.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        Spinner(Some(pb))
    }
    fn show(&self, state: &str) {
        if let Some(pb) = &self.0 {
            pb.set_message(state.to_string());
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(what: &str, timeout: Duration) -> Wait {
        Wait::new(what, timeout)
            .interval(Duration::from_millis(5), Duration::from_millis(20))
            .progress(false)
    }

    #[tokio::test]
    async fn returns_when_ready() {
        let n = AtomicU32::new(0);
        let v = quick("thing", Duration::from_secs(5))
            .until(|| async {
                let i = n.fetch_add(1, Ordering::SeqCst);
                Ok(if i < 3 {
                    Check::Waiting(format!("step {i}"))
                } else {
                    Check::Ready(i)
                })
            })
            .await
            .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn fails_fast_on_a_terminal_state() {
        let n = AtomicU32::new(0);
        let start = Instant::now();
        let e = quick("instance i-1 to be running", Duration::from_secs(60))
            .until(|| async {
                n.fetch_add(1, Ordering::SeqCst);
                Ok(Check::<()>::Failed("it is terminated".into()))
            })
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            e.contains("instance i-1 to be running") && e.contains("it is terminated"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn times_out_with_the_last_state_and_the_hint() {
        let e = quick("image ami-1", Duration::from_millis(100))
            .hint("raise --image-wait")
            .until(|| async { Ok(Check::<()>::Waiting("pending".into())) })
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("timed out")
                && e.contains("image ami-1")
                && e.contains("last state: pending"),
            "{e}"
        );
        assert!(e.contains("raise --image-wait"), "{e}");
    }

    #[tokio::test]
    async fn an_error_from_the_check_ends_the_wait() {
        let e = quick("x", Duration::from_secs(60))
            .until(|| async { Err::<Check<()>, _>(anyhow::anyhow!("AccessDenied")) })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("AccessDenied"));
    }

    #[tokio::test]
    async fn backs_off_between_looks() {
        // 5, 7, 10, 15, 20, 20 ... ms: far fewer looks than a fixed 5 ms would make.
        let n = AtomicU32::new(0);
        let _ = quick("x", Duration::from_millis(200))
            .until(|| async {
                n.fetch_add(1, Ordering::SeqCst);
                Ok(Check::<()>::Waiting("w".into()))
            })
            .await;
        let looks = n.load(Ordering::SeqCst);
        assert!((2..=30).contains(&looks), "{looks} looks");
    }
}
