//! The seed's console, read while the builder waits for its SSM agent: when the seed's user-data
//! fails (no route to the agent's download, a signature that does not match) it prints one line
//! starting with [`SEED_FAILURE_PREFIX`] on the console, and the bake fails at once naming it
//! instead of waiting for SSM until `ssm_timeout`.

use crate::aws::aws_error;
use crate::render::SEED_FAILURE_PREFIX;
use anyhow::{Context, Result};
use base64::Engine;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The seed's failure line in console output, if it printed one: from the prefix to the end of
/// its line (the console puts timestamps and `cloud-init[123]:` before it). The last one wins.
pub fn seed_failure(console: &str) -> Option<String> {
    console
        .lines()
        .filter_map(|l| l.find(SEED_FAILURE_PREFIX).map(|at| &l[at..]))
        .map(|l| l.trim_end_matches(['\r', ' ']).to_string())
        .rfind(|l| l.len() > SEED_FAILURE_PREFIX.len())
}

/// GetConsoleOutput's text: base64 on the wire (the SDK leaves it encoded).
pub fn decode(output: &str) -> String {
    let clean: String = output.chars().filter(|c| !c.is_whitespace()).collect();
    match base64::engine::general_purpose::STANDARD.decode(clean.as_bytes()) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        // Not base64 (some stand-ins return plain text): take it as it is.
        Err(_) => output.to_string(),
    }
}

/// Looks at one instance's console at most every `every`.
pub struct ConsoleWatch {
    ec2: aws_sdk_ec2::Client,
    instance_id: String,
    every: Duration,
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    last: Option<Instant>,
    /// GetConsoleOutput with `Latest` is for Nitro instances only: without it once refused.
    no_latest: bool,
    /// Said once that the console cannot be read (no ec2:GetConsoleOutput, say).
    warned: bool,
}

impl ConsoleWatch {
    pub fn new(ec2: aws_sdk_ec2::Client, instance_id: impl Into<String>, every: Duration) -> Self {
        ConsoleWatch {
            ec2,
            instance_id: instance_id.into(),
            every,
            state: Mutex::new(WatchState::default()),
        }
    }

    /// The console output now (decoded; empty when EC2 has none yet).
    pub async fn read(&self) -> Result<String> {
        let no_latest = self.state.lock().map(|s| s.no_latest).unwrap_or(false);
        let id = &self.instance_id;
        let ask = |latest: bool| {
            let mut req = self.ec2.get_console_output().instance_id(id);
            if latest {
                req = req.latest(true);
            }
            req.send()
        };
        let out = if no_latest {
            ask(false).await
        } else {
            match ask(true).await {
                Ok(out) => Ok(out),
                Err(e) => {
                    use aws_sdk_ec2::error::ProvideErrorMetadata;
                    if matches!(
                        e.code(),
                        Some(
                            "UnsupportedOperation"
                                | "InvalidParameterCombination"
                                | "InvalidParameterValue"
                        )
                    ) {
                        if let Ok(mut s) = self.state.lock() {
                            s.no_latest = true;
                        }
                        ask(false).await
                    } else {
                        Err(e)
                    }
                }
            }
        };
        let out = out
            .map_err(aws_error)
            .with_context(|| format!("reading the console of {id} (ec2:GetConsoleOutput)"))?;
        Ok(out.output().map(decode).unwrap_or_default())
    }

    /// The seed's failure line, when it is on the console; looks at most every `every`. A console
    /// that cannot be read is said once and otherwise ignored: the wait for SSM goes on.
    pub async fn failure(&self) -> Option<String> {
        {
            let mut s = self.state.lock().ok()?;
            if s.last.is_some_and(|t| t.elapsed() < self.every) {
                return None;
            }
            s.last = Some(Instant::now());
        }
        match self.read().await {
            Ok(text) => seed_failure(&text).map(|line| {
                format!(
                    "the seed's user-data failed; its console says: {line} (`aws ec2 get-console-output --instance-id {}` shows the whole boot)",
                    self.instance_id
                )
            }),
            Err(e) => {
                if let Ok(mut s) = self.state.lock() {
                    if !s.warned {
                        s.warned = true;
                        tracing::warn!("{e:#}; waiting for SSM without watching the console");
                    }
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
