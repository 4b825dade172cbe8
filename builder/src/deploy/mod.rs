//! `builder deploy SERVICE`: replaces a service's instances behind its load balancer, and undoes
//! itself when anything fails.
//!
//! 1. take the service's deploy lock (an SSM parameter: [`lock`]);
//! 2. boot the new instances from the image, tagged with the service and the deploy id;
//! 3. wait until they run and, if asked, until a health URL answers 200 or the status checks pass;
//! 4. register them with the target groups and wait until every one is healthy in every group;
//! 5. deregister the old instances, wait for connection draining, terminate them;
//! 6. record the deploy ([`history`]).
//!
//! Any failure or interrupt before step 5 deregisters and terminates the new instances and leaves
//! the old ones serving, untouched. The old ones are only deregistered once every new one is
//! healthy, so the number of healthy registered instances never falls below what it was. The lock
//! is released at the end whatever happened. `--asg` hands steps 2 to 5 to an EC2 Auto Scaling
//! instance refresh ([`asg`]).
//!
//! [`plan`] finds out everything before anything changes (`--plan` prints it), [`execute`] runs
//! the steps, [`rollback`] undoes a deploy cut short and picks the image `builder rollback`
//! goes back to.

pub mod asg;
pub mod config;
mod execute;
pub mod history;
pub mod instances;
pub mod lock;
mod plan;
mod rollback;
pub mod target_groups;

pub use execute::{deploy, deploy_until};
pub use plan::{prepare, Prepared};
pub use rollback::rollback_image;

#[cfg(test)]
mod mock_tests;
#[cfg(test)]
mod tests;

use crate::aws::waiter::Wait;
use anyhow::{Context, Result};
use instances::Instance;
use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

/// The AWS clients a deploy uses.
#[derive(Clone, Debug)]
pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub asg: aws_sdk_autoscaling::Client,
}

impl Clients {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Clients {
            ec2: aws_sdk_ec2::Client::new(config),
            ssm: aws_sdk_ssm::Client::new(config),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(config),
            asg: aws_sdk_autoscaling::Client::new(config),
        }
    }
}

/// How a deploy waits and shows progress.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// Spinners with the elapsed time on stderr (only drawn where stderr is a terminal).
    pub progress: bool,
    /// The first pause between looks; it grows by half up to `max_poll`.
    pub poll: Duration,
    pub max_poll: Duration,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            progress: true,
            poll: Duration::from_secs(2),
            max_poll: Duration::from_secs(15),
        }
    }
}

impl DeployOptions {
    pub(crate) fn wait(&self, what: impl Into<String>, timeout: Duration) -> Wait {
        Wait::new(what, timeout)
            .interval(self.poll, self.max_poll)
            .progress(self.progress)
    }
}

/// `d-YYYYMMDDhhmmssmmm-xxxxxx` (UTC, to the millisecond): sorts by time.
pub fn new_deploy_id() -> String {
    let now = SystemTime::now();
    let ts = humantime::format_rfc3339_millis(now).to_string();
    let compact: String = ts.chars().filter(|c| c.is_ascii_digit()).take(17).collect();
    let (build, _) = crate::pipeline::new_build_id();
    let rand = build.rsplit('-').next().unwrap_or("000000");
    format!("d-{compact}-{rand}")
}

pub(crate) fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Rounded up to the second: for a least value.
pub(crate) fn human_up(d: Duration) -> String {
    human(Duration::from_secs(
        d.as_secs() + u64::from(d.subsec_nanos() > 0),
    ))
}

pub(crate) fn ids(v: &[Instance]) -> Vec<String> {
    v.iter().map(|i| i.id.clone()).collect()
}

/// Times the steps for the record and the log, and names them in errors.
pub(crate) struct Steps {
    total: usize,
    pub(crate) done: Vec<(String, u64)>,
}

impl Steps {
    pub(crate) fn new(total: usize) -> Self {
        Steps {
            total,
            done: Vec::new(),
        }
    }
    pub(crate) fn label(&self, n: usize, name: &str) -> String {
        format!("step {n}/{} {name}", self.total)
    }
    pub(crate) async fn run<T, F: Future<Output = Result<T>>>(
        &mut self,
        n: usize,
        name: &str,
        f: F,
    ) -> Result<T> {
        let label = self.label(n, name);
        tracing::info!("{label}");
        let t = Instant::now();
        let r = f.await.with_context(|| label.clone());
        let ms = t.elapsed().as_millis() as u64;
        self.done.push((name.to_string(), ms));
        if r.is_ok() {
            tracing::info!("{label}: done in {}", human_ms(ms));
        }
        r
    }
}

pub(crate) fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}
