//! Timed steps: every step of a boot or a sync is recorded with its duration and outcome.

use crate::state::Step;
use anyhow::Result;
use std::time::Instant;

/// Times steps and keeps the problems that make a run degraded (but not failed).
pub struct Timeline {
    started: Instant,
    pub steps: Vec<Step>,
    pub degraded: Vec<String>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            steps: Vec::new(),
            degraded: Vec::new(),
        }
    }

    /// Runs a step; records its time, whether it passed, and a detail line.
    pub fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, Option<String>)>,
    ) -> Result<T> {
        let t = Instant::now();
        tracing::debug!(step = name, "starting");
        let r = f();
        let ms = t.elapsed().as_millis() as u64;
        match r {
            Ok((v, detail)) => {
                tracing::info!(
                    step = name,
                    ms,
                    detail = detail.as_deref().unwrap_or(""),
                    "done"
                );
                self.steps.push(Step {
                    name: name.into(),
                    ms,
                    ok: true,
                    detail,
                });
                Ok(v)
            }
            Err(e) => {
                let detail = format!("{e:#}");
                tracing::error!(step = name, ms, "{detail}");
                self.steps.push(Step {
                    name: name.into(),
                    ms,
                    ok: false,
                    detail: Some(detail),
                });
                Err(e)
            }
        }
    }

    /// Marks the last step as not ok without failing the run.
    pub fn degrade(&mut self, reason: String) {
        let reason = one_line(&reason);
        if let Some(s) = self.steps.last_mut() {
            s.ok = false;
        }
        tracing::warn!("{reason}");
        self.degraded.push(reason);
    }

    pub fn total_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// A reason on one line: for stderr, the ready marker and systemd's STATUS=.
pub fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
