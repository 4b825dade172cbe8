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

pub mod asg;
pub mod config;
pub mod history;
pub mod instances;
pub mod lock;
pub mod target_groups;

#[cfg(test)]
mod mock_tests;
#[cfg(test)]
mod tests;

use crate::definition;
use crate::signals::interrupted;
use crate::target::aws::source;
use crate::target::aws::waiter::Wait;
use crate::user_data::{self, Payload};
use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use config::{DeployConfig, ImageRef, ReadyMode};
use history::{Outcome, Record};
use instances::Instance;
use serde::Serialize;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// The error code of an SDK error, if the service answered.
pub(crate) fn aws_code<E: ProvideErrorMetadata>(e: &E) -> Option<&str> {
    e.code()
}

/// Codes AWS answers with when it throttles: waits keep going on them.
pub(crate) fn is_throttling(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "Throttling"
                | "ThrottlingException"
                | "ThrottledException"
                | "RequestLimitExceeded"
                | "RequestThrottled"
                | "TooManyRequestsException"
                | "SlowDown"
        )
    )
}

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

/// Everything a deploy found out before changing anything: what `--plan` prints and `run` uses.
#[derive(Debug, Clone, Serialize)]
pub struct Prepared {
    pub deploy_id: String,
    /// `deploy`, `rollback` or `asg`.
    pub kind: String,
    pub config: DeployConfig,
    pub ami: String,
    pub image_name: Option<String>,
    /// How the image was asked for, for people.
    pub image_ref: String,
    pub user_data: Option<Payload>,
    /// The service's instances now (none for `--asg`: the group has its own).
    pub old: Vec<Instance>,
    pub groups: Vec<target_groups::Group>,
    pub drain: Duration,
    pub lock_ttl: Duration,
    /// Who holds the lock now, if anybody.
    pub lock_held: Option<String>,
    pub asg: Option<asg::Group>,
}

/// Resolves the image, reads and validates the user-data, and looks at what runs now. Changes
/// nothing.
pub async fn prepare(
    c: &Clients,
    cfg: &DeployConfig,
    images_dir: &Path,
    kind: &str,
) -> Result<Prepared> {
    let region = c
        .ec2
        .config()
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "the configured region".into());
    // The image, and the defaults its user-data is checked over.
    let (src, image_name, defaults) = match &cfg.image {
        ImageRef::Ami(a) => (definition::Source::Ami(a.clone()), None, None),
        ImageRef::Parameter(p) => (definition::Source::Parameter(p.clone()), None, None),
        ImageRef::Definition(name) => {
            let def = definition::load(images_dir, name)?;
            let Some(p) = def.ssm_parameter.clone() else {
                bail!(
                    "image {name} publishes its id nowhere: give its definition a [publish] ssm_parameter, or deploy with --ami or --ssm-parameter"
                );
            };
            (
                definition::Source::Parameter(p),
                Some(name.clone()),
                Some(def.defaults_document()),
            )
        }
    };
    let image = source::resolve(&c.ec2, &c.ssm, &src)
        .await
        .with_context(|| format!("resolving the image to deploy ({}) in {region}", cfg.image))?;
    let image_ref = match &src {
        definition::Source::Parameter(p) if image_name.is_some() => {
            format!("{} via {p}", cfg.image)
        }
        _ => cfg.image.to_string(),
    };
    let user_data = match &cfg.user_data {
        Some(f) => Some(user_data::prepare(f, &defaults.unwrap_or_default())?),
        None => None,
    };

    let mut groups = target_groups::describe(&c.elb, &cfg.target_groups).await?;
    let asg = match &cfg.asg {
        Some(a) => {
            if !cfg.target_groups.is_empty() {
                tracing::info!("--asg: the group's own target groups and health checks apply; target_groups of the deploy file are only shown");
            }
            Some(asg::describe(&c.asg, &a.name).await?)
        }
        None => None,
    };
    let old = if asg.is_some() {
        Vec::new()
    } else {
        instances::find_old(&c.ec2, &cfg.service, None).await?
    };
    // Never fewer healthy targets than now: the new instances must cover the old healthy ones.
    if asg.is_none() {
        let old_ids: Vec<String> = old.iter().map(|i| i.id.clone()).collect();
        for g in &groups {
            let healthy = g.healthy(&old_ids);
            if (cfg.count as usize) < healthy {
                bail!(
                    "{} instances of {} are healthy in target group {} now, and the deploy boots only {}: \
                     the number of healthy instances must not fall. Deploy with --count {healthy} or more",
                    healthy,
                    cfg.service,
                    g.name,
                    cfg.count
                );
            }
        }
    }
    let drain = cfg.timeouts.drain.unwrap_or_else(|| {
        groups
            .iter()
            .map(|g| g.deregistration_delay)
            .max()
            .unwrap_or_default()
            + Duration::from_secs(120)
    });
    // The lock must outlast the deploy: a lock that expires while the deploy runs lets another
    // deploy take it over, and the two would terminate each other's instances.
    let (longest, parts) = if cfg.asg.is_some() {
        (
            cfg.timeouts.refresh,
            format!("refresh {}", human(cfg.timeouts.refresh)),
        )
    } else {
        (
            cfg.timeouts.longest(drain),
            cfg.timeouts.describe_longest(drain),
        )
    };
    let lock_ttl = match cfg.lock_ttl {
        Some(ttl) if ttl < longest => bail!(
            "the deploy lock's lifetime {} (--lock-ttl or [timeouts] lock) is below the sum of the step deadlines {} ({parts}): \
             another deploy could take the lock over while this one still runs. Give at least {}, or leave it out for the default",
            human(ttl),
            human_up(longest),
            human_up(longest)
        ),
        Some(ttl) => ttl,
        None => (longest + Duration::from_secs(600)).max(Duration::from_secs(3600)),
    };
    let lock_held = lock::read(&c.ssm, &cfg.service)
        .await?
        .map(|(raw, rec)| rec.map(|r| r.describe()).unwrap_or(raw));
    // Targets in the groups that are not this service's: never touched, but worth saying.
    for g in &mut groups {
        g.targets.retain(|_, s| s != "unused");
    }
    Ok(Prepared {
        deploy_id: new_deploy_id(),
        kind: kind.to_string(),
        config: cfg.clone(),
        ami: image.image_id,
        image_name,
        image_ref,
        user_data,
        old,
        groups,
        drain,
        lock_ttl,
        lock_held,
        asg,
    })
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Rounded up to the second: for a least value.
fn human_up(d: Duration) -> String {
    human(Duration::from_secs(
        d.as_secs() + u64::from(d.subsec_nanos() > 0),
    ))
}

fn ids(v: &[Instance]) -> Vec<String> {
    v.iter().map(|i| i.id.clone()).collect()
}

impl Prepared {
    /// What the deploy would do, step by step, for people (`--plan`).
    pub fn describe(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "{} {} of {} (plan: nothing is changed)\n",
            self.kind, self.deploy_id, c.service
        );
        s.push_str(&format!("  image      {} ({})\n", self.ami, self.image_ref));
        match &self.user_data {
            Some(u) => s.push_str(&format!(
                "  user-data  {}: {} bytes{}, minion id on a sample instance {}\n",
                u.file,
                u.text_bytes,
                if u.gzipped {
                    format!(", sent gzipped ({} bytes)", u.bytes.len())
                } else {
                    String::new()
                },
                u.minion_id
            )),
            None => s.push_str("  user-data  none\n"),
        }
        s.push_str(&format!(
            "  lock       {}\n",
            self.lock_held
                .as_ref()
                .map(|h| format!("held by {h}"))
                .unwrap_or_else(|| "free".into())
        ));
        if let Some(g) = &self.asg {
            let a = c.asg.as_ref().expect("asg config with an asg group");
            s.push_str(&format!(
                "  group      {}: {} instances, launch template {} version {}\n",
                g.name,
                g.desired,
                if g.launch_template_name.is_empty() {
                    &g.launch_template_id
                } else {
                    &g.launch_template_name
                },
                g.version
            ));
            s.push_str("  steps\n");
            s.push_str(&format!(
                "    1/5 take the lock {} (expires after {})\n",
                lock::parameter(&c.service),
                human(self.lock_ttl)
            ));
            s.push_str(&format!(
                "    2/5 add a launch template version from version {} with image {}\n",
                g.version, self.ami
            ));
            s.push_str(&format!(
                "    3/5 start an instance refresh of {}: min healthy {}%, checkpoints {:?}, auto rollback {}\n",
                g.name,
                a.min_healthy_percentage.map(|p| p.to_string()).unwrap_or_else(|| "90 (the AWS default)".into()),
                a.checkpoint_percentages,
                a.auto_rollback
            ));
            s.push_str(&format!(
                "    4/5 follow it to the end (at most {})\n",
                human(c.timeouts.refresh)
            ));
            s.push_str(&format!(
                "    5/5 record the deploy under {}\n",
                history::prefix(&c.service)
            ));
            return s;
        }
        if self.old.is_empty() {
            s.push_str("  old        none (a first deploy)\n");
        }
        for i in &self.old {
            s.push_str(&format!(
                "  old        {} {} {} (deploy {})\n",
                i.id,
                i.state,
                i.image,
                if i.deploy_id.is_empty() {
                    "-"
                } else {
                    &i.deploy_id
                }
            ));
        }
        for g in &self.groups {
            let t: Vec<String> = g
                .targets
                .iter()
                .map(|(id, st)| format!("{id} {st}"))
                .collect();
            s.push_str(&format!(
                "  group      {} port {} deregistration delay {}: {}\n",
                g.name,
                g.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                human(g.deregistration_delay),
                if t.is_empty() {
                    "no targets".to_string()
                } else {
                    t.join(", ")
                }
            ));
        }
        let t = &c.timeouts;
        s.push_str("  steps\n");
        s.push_str(&format!(
            "    1/6 take the lock {} (expires after {})\n",
            lock::parameter(&c.service),
            human(self.lock_ttl)
        ));
        s.push_str(&format!(
            "    2/6 boot {} {} from {} in {}{}{}, tagged {}={} {}={}\n",
            c.count,
            c.instance_type,
            self.ami,
            if c.subnets.is_empty() {
                "the default VPC".to_string()
            } else {
                c.subnets.join(" ")
            },
            if c.security_groups.is_empty() {
                String::new()
            } else {
                format!(", groups {}", c.security_groups.join(" "))
            },
            c.instance_profile
                .as_ref()
                .map(|p| format!(", profile {p}"))
                .unwrap_or_default(),
            instances::SERVICE,
            c.service,
            instances::DEPLOY_ID,
            self.deploy_id
        ));
        let mut ready = format!("    3/6 wait until they run ({})", human(t.running));
        if let Some(u) = &c.health_url {
            ready.push_str(&format!(" and {u} answers 200 ({})", human(t.ready)));
        }
        match c.ready {
            ReadyMode::Agent => ready.push_str(&format!(
                " and the agent reports ready on their consoles ({})",
                human(t.ready)
            )),
            ReadyMode::StatusChecks => {
                ready.push_str(&format!(" and the status checks pass ({})", human(t.ready)))
            }
            ReadyMode::None => {}
        }
        s.push_str(&ready);
        s.push('\n');
        if self.groups.is_empty() {
            s.push_str("    4/6 no target groups: nothing to register\n");
        } else {
            s.push_str(&format!(
                "    4/6 register them with {} and wait until all are healthy ({}; unhealthy tolerated for {} after registration)\n",
                self.groups
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                human(t.healthy),
                human(t.unhealthy_grace)
            ));
        }
        if self.old.is_empty() {
            s.push_str("    5/6 no old instances to remove\n");
        } else {
            s.push_str(&format!(
                "    5/6 if the lock is still this deploy's: deregister {}, wait for draining ({}), terminate them ({})\n",
                ids(&self.old).join(" "),
                human(self.drain),
                human(t.terminate)
            ));
        }
        s.push_str(&format!(
            "    6/6 record the deploy in {}/{}\n",
            history::prefix(&c.service),
            self.deploy_id
        ));
        s.push_str("  on a failure or interrupt before step 5: deregister and terminate the new instances, keep the old ones\n");
        s
    }
}

/// Times the steps for the record and the log, and names them in errors.
struct Steps {
    total: usize,
    done: Vec<(String, u64)>,
}

impl Steps {
    fn new(total: usize) -> Self {
        Steps {
            total,
            done: Vec::new(),
        }
    }
    fn label(&self, n: usize, name: &str) -> String {
        format!("step {n}/{} {name}", self.total)
    }
    async fn run<T, F: Future<Output = Result<T>>>(
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

fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// Deploys, rolling back on Ctrl-C or SIGTERM before the switch.
pub async fn deploy(c: &Clients, p: &Prepared, opts: &DeployOptions) -> Result<Record> {
    deploy_until(c, p, opts, interrupted()).await
}

/// `deploy`, interrupted when `stop` resolves (with the reason) instead of on a signal: tests
/// interrupt each step this way without signalling the whole test process.
pub async fn deploy_until(
    c: &Clients,
    p: &Prepared,
    opts: &DeployOptions,
    stop: impl Future<Output = &'static str>,
) -> Result<Record> {
    if p.asg.is_some() {
        return deploy_asg_until(c, p, opts, stop).await;
    }
    let cfg = &p.config;
    let started = SystemTime::now();
    let mut steps = Steps::new(6);
    let rec = lock::LockRecord::new(&p.deploy_id, started, p.lock_ttl);
    let taken = steps
        .run(
            1,
            "take the deploy lock",
            lock::acquire(&c.ssm, &cfg.service, &rec, started),
        )
        .await?;
    if let lock::Taken::TookOver(old) = &taken {
        tracing::warn!("took over the expired lock of {}", old.describe());
    }

    let mut live = Live::default();
    let result = {
        tokio::pin!(stop);
        let go = go_live(c, p, opts, &mut steps, &mut live);
        tokio::select! {
            r = go => r,
            why = &mut stop => Err(anyhow!("{why}")).context(Interrupted),
        }
    };
    let mut record = Record {
        deploy_id: p.deploy_id.clone(),
        service: cfg.service.clone(),
        image: p.ami.clone(),
        image_ref: p.image_ref.clone(),
        kind: p.kind.clone(),
        outcome: Outcome::Succeeded,
        instances: Vec::new(),
        replaced: Vec::new(),
        owner: lock::owner(),
        started: lock::stamp(started),
        finished: String::new(),
        steps: Vec::new(),
        error: None,
        asg: None,
    };

    // Step 5 removes instances: only while this deploy still holds the lock. A deploy that lost
    // it (it outlived its lifetime and another deploy took it over) must not terminate what the
    // other deploy may have booted, nor its own new instances, which serve now.
    let mut result = result;
    if result.is_ok() {
        // Every new instance must still be healthy in every group when the old ones go.
        result = target_groups::confirm_healthy(&c.elb, &cfg.target_groups, &live.new_ids, opts)
            .await
            .with_context(|| steps.label(4, "register with the target groups"));
    }
    let mut lost_lock = None;
    if result.is_ok() {
        if let Err(e) =
            lock::still_ours(&c.ssm, &cfg.service, &p.deploy_id, SystemTime::now()).await
        {
            lost_lock = Some(e.context(LostLock));
        }
    }

    if let Err(e) = result {
        // Before the switch: remove the new instances, keep the old ones.
        // An interrupt comes without the step it cut short.
        let e = if e.downcast_ref::<Interrupted>().is_some() && !live.failed_step.is_empty() {
            anyhow!("{}", e.root_cause()).context(live.failed_step.clone())
        } else {
            e
        };
        tracing::error!("{e:#}; rolling back");
        let t = Instant::now();
        let rolled = rollback_new(c, p, opts, &live).await;
        steps
            .done
            .push(("rollback".into(), t.elapsed().as_millis() as u64));
        let kept = if p.old.is_empty() {
            "there were no old instances".to_string()
        } else {
            format!(
                "the old instances {} were not touched",
                ids(&p.old).join(" ")
            )
        };
        let (outcome, msg) = match &rolled {
            Ok(removed) => (
                Outcome::RolledBack,
                format!(
                    "rolled back: {}; {kept}",
                    if removed.is_empty() {
                        "no new instance had been booted".to_string()
                    } else {
                        format!(
                            "{} the new instances {}",
                            if live.registered {
                                "deregistered and terminated"
                            } else {
                                "terminated"
                            },
                            removed.join(" ")
                        )
                    }
                ),
            ),
            Err(re) => (
                Outcome::Failed,
                format!(
                    "rolling back failed too: {re:#}; {kept}. Remove what is left of this deploy: instances tagged {}={}",
                    instances::DEPLOY_ID,
                    p.deploy_id
                ),
            ),
        };
        record.outcome = outcome;
        record.instances = live.new_ids.clone();
        record.error = Some(format!("{e:#}; {msg}"));
        record.finished = lock::stamp(SystemTime::now());
        record.steps = steps.done.clone();
        let recorded = history::record(&c.ssm, &record).await;
        let released = lock::release(&c.ssm, &cfg.service, &p.deploy_id).await;
        // The step and why first, then what the rollback did.
        let mut err = anyhow!("{e:#}; {msg}");
        if let Err(r) = recorded {
            err = err.context(format!("recording the failed deploy failed too: {r:#}"));
        }
        if let Err(r) = released {
            err = err.context(format!("{r:#}"));
        }
        return Err(err);
    }

    // The new instances serve: from here on an interrupt no longer undoes the deploy.
    record.instances = live.new_ids.clone();
    let mut errors = Vec::new();
    let replaced = match lost_lock {
        // Another deploy may own the service now: leave every instance as it is.
        Some(e) => Err(e),
        None => {
            steps
                .run(
                    5,
                    "deregister and terminate the old instances",
                    replace_old(c, p, opts),
                )
                .await
        }
    };
    match replaced {
        Ok(old) => record.replaced = old,
        Err(e) if e.downcast_ref::<LostLock>().is_some() => {
            record.outcome = Outcome::SucceededWithErrors;
            let old = ids(&p.old);
            let msg = format!(
                "{e:#}; step 5 was not run: the new instances {} serve, and the old ones {} were left untouched, serving too. \
                 Once no other deploy of {} runs, remove the old ones by hand or with the next deploy",
                live.new_ids.join(" "),
                if old.is_empty() { "(none)".to_string() } else { old.join(" ") },
                cfg.service
            );
            tracing::error!("{msg}");
            errors.push(msg);
        }
        Err(e) => {
            record.outcome = Outcome::SucceededWithErrors;
            errors.push(format!(
                "{e:#}. The new instances serve; remove the old ones of {} that are left (tagged {}={}, not {}={}) by hand or with the next deploy",
                cfg.service,
                instances::SERVICE,
                cfg.service,
                instances::DEPLOY_ID,
                p.deploy_id
            ));
        }
    }
    record.finished = lock::stamp(SystemTime::now());
    record.steps = steps.done.clone();
    if !errors.is_empty() {
        record.error = Some(errors.join("; "));
    }
    let recorded = steps
        .run(6, "record the deploy", history::record(&c.ssm, &record))
        .await;
    if let Err(e) = recorded {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = lock::release(&c.ssm, &cfg.service, &p.deploy_id).await {
        errors.push(format!("{e:#}"));
    }
    if errors.is_empty() {
        Ok(record)
    } else {
        Err(anyhow!(
            "deploy {} of {} is live on {}, but: {}",
            p.deploy_id,
            cfg.service,
            record.instances.join(" "),
            errors.join("; ")
        ))
    }
}

/// Marks an error as an interrupt.
#[derive(Debug)]
struct Interrupted;
impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}

/// Marks the lock found lost just before step 5.
#[derive(Debug)]
struct LostLock;
impl std::fmt::Display for LostLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the deploy lock was lost before step 5")
    }
}

/// What steps 2 to 4 got to, for the rollback.
#[derive(Debug, Default)]
struct Live {
    new_ids: Vec<String>,
    /// Step 2 finished: every new instance is in `new_ids`.
    launched: bool,
    /// Registration started: the rollback deregisters and waits for draining.
    registered: bool,
    /// The label of the step that was running, for the error.
    failed_step: String,
}

async fn go_live(
    c: &Clients,
    p: &Prepared,
    opts: &DeployOptions,
    steps: &mut Steps,
    live: &mut Live,
) -> Result<()> {
    let cfg = &p.config;
    let t = &cfg.timeouts;
    live.failed_step = steps.label(2, "boot the new instances");
    let launch = instances::Launch {
        service: &cfg.service,
        deploy_id: &p.deploy_id,
        ami: &p.ami,
        image_name: p.image_name.as_deref(),
        count: cfg.count,
        instance_type: &cfg.instance_type,
        subnets: &cfg.subnets,
        security_groups: &cfg.security_groups,
        instance_profile: cfg.instance_profile.as_deref(),
        user_data: p.user_data.as_ref().map(|u| u.bytes.as_slice()),
        extra_tags: &cfg.tags,
    };
    live.new_ids = steps
        .run(
            2,
            "boot the new instances",
            instances::launch(&c.ec2, &launch),
        )
        .await?;
    live.launched = true;
    let new_ids = live.new_ids.clone();

    live.failed_step = steps.label(3, "wait until they run and are ready");
    steps
        .run(3, "wait until they run and are ready", async {
            let running = instances::wait_running(&c.ec2, &new_ids, t.running, opts).await?;
            if let Some(url) = &cfg.health_url {
                instances::wait_health_url(&running, url, t.ready, opts).await?;
            }
            match cfg.ready {
                ReadyMode::Agent => instances::wait_agent(&c.ec2, &new_ids, t.ready, opts).await?,
                ReadyMode::StatusChecks => {
                    instances::wait_status_checks(&c.ec2, &new_ids, t.ready, opts).await?
                }
                ReadyMode::None => {}
            }
            Ok(())
        })
        .await?;

    live.failed_step = steps.label(4, "register with the target groups");
    live.registered = true;
    steps
        .run(4, "register with the target groups", async {
            for arn in &cfg.target_groups {
                target_groups::register(&c.elb, arn, &new_ids).await?;
            }
            target_groups::wait_healthy(
                &c.elb,
                &cfg.target_groups,
                &new_ids,
                t.healthy,
                t.unhealthy_grace,
                opts,
            )
            .await
        })
        .await?;
    live.failed_step.clear();
    Ok(())
}

/// Removes this deploy's new instances: deregistered (and drained, if they were registered), then
/// terminated. Returns their ids.
async fn rollback_new(
    c: &Clients,
    p: &Prepared,
    opts: &DeployOptions,
    live: &Live,
) -> Result<Vec<String>> {
    let mut errors = Vec::new();
    let mut all: BTreeSet<String> = live.new_ids.iter().cloned().collect();
    // A boot cut short may have started instances whose ids it never saw, and EC2 is eventually
    // consistent: look by the deploy tag until all the deploy asked for are found, or for
    // [timeouts] lookup. Once step 2 finished, every id is known and one look is enough.
    let want = p.config.count as usize;
    let until = Instant::now()
        + if live.launched {
            Duration::ZERO
        } else {
            p.config.timeouts.lookup
        };
    let mut pause = opts.poll;
    let lookup_error = loop {
        // A failed lookup must not keep the known new instances alive: go on with those.
        let error = match instances::find_by_deploy(&c.ec2, &p.deploy_id).await {
            Ok(found) => {
                all.extend(found);
                None
            }
            Err(e) => Some(e),
        };
        if all.len() >= want || Instant::now() >= until {
            break error;
        }
        tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 3 / 2).min(opts.max_poll);
    };
    if let Some(e) = lookup_error {
        errors.push(format!(
            "{e:#}; instances of this deploy not known by id may be left (tagged {}={})",
            instances::DEPLOY_ID,
            p.deploy_id
        ));
    }
    let all: Vec<String> = all.into_iter().collect();
    if all.is_empty() {
        return if errors.is_empty() {
            Ok(all)
        } else {
            Err(anyhow!("{}", errors.join("; ")))
        };
    }
    if live.registered {
        for arn in &p.config.target_groups {
            if let Err(e) = target_groups::deregister(&c.elb, arn, &all).await {
                errors.push(format!("{e:#}"));
            }
        }
        // Drain what may have served requests; a drain that takes too long does not stop the
        // rollback.
        if let Err(e) =
            target_groups::wait_drained(&c.elb, &p.config.target_groups, &all, p.drain, opts).await
        {
            tracing::warn!("{e:#}; terminating anyway");
        }
    }
    if let Err(e) = instances::terminate(&c.ec2, &all, p.config.timeouts.terminate, opts).await {
        errors.push(format!("{e:#}"));
    }
    if errors.is_empty() {
        Ok(all)
    } else {
        Err(anyhow!("{}", errors.join("; ")))
    }
}

/// Step 5: deregisters the service's other instances where they are registered, waits for
/// draining, terminates them. Returns their ids.
async fn replace_old(c: &Clients, p: &Prepared, opts: &DeployOptions) -> Result<Vec<String>> {
    let cfg = &p.config;
    let old = ids(&instances::find_old(&c.ec2, &cfg.service, Some(&p.deploy_id)).await?);
    if old.is_empty() {
        return Ok(old);
    }
    for arn in &cfg.target_groups {
        let registered = target_groups::health(&c.elb, arn, None).await?;
        let here: Vec<String> = old
            .iter()
            .filter(|id| registered.contains_key(*id))
            .cloned()
            .collect();
        target_groups::deregister(&c.elb, arn, &here).await?;
    }
    target_groups::wait_drained(&c.elb, &cfg.target_groups, &old, p.drain, opts).await?;
    instances::terminate(&c.ec2, &old, cfg.timeouts.terminate, opts).await?;
    Ok(old)
}

/// `--asg`: a launch template version and an instance refresh, followed to the end.
async fn deploy_asg_until(
    c: &Clients,
    p: &Prepared,
    opts: &DeployOptions,
    stop: impl Future<Output = &'static str>,
) -> Result<Record> {
    let cfg = &p.config;
    let (Some(group), Some(a)) = (&p.asg, &cfg.asg) else {
        bail!("an --asg deploy without its group");
    };
    let started = SystemTime::now();
    let mut steps = Steps::new(5);
    let rec = lock::LockRecord::new(&p.deploy_id, started, p.lock_ttl);
    steps
        .run(
            1,
            "take the deploy lock",
            lock::acquire(&c.ssm, &cfg.service, &rec, started),
        )
        .await?;
    let mut refresh: Option<String> = None;
    let mut version: Option<i64> = None;
    let last_status = std::sync::Mutex::new(None);
    let result = {
        tokio::pin!(stop);
        let go = async {
            let v = steps
                .run(
                    2,
                    "add a launch template version",
                    asg::new_version(
                        &c.ec2,
                        group,
                        &p.ami,
                        p.user_data.as_ref().map(|u| u.bytes.as_slice()),
                        &p.deploy_id,
                    ),
                )
                .await?;
            version = Some(v);
            let id = steps
                .run(
                    3,
                    "start the instance refresh",
                    asg::start_refresh(&c.asg, group, v, a),
                )
                .await?;
            refresh = Some(id.clone());
            steps
                .run(
                    4,
                    "follow the instance refresh",
                    asg::follow(
                        &c.asg,
                        &group.name,
                        &id,
                        cfg.timeouts.refresh,
                        opts,
                        &last_status,
                    ),
                )
                .await
        };
        tokio::select! {
            r = go => r,
            why = &mut stop => Err(anyhow!("{why}")),
        }
    };
    let mut record = Record {
        deploy_id: p.deploy_id.clone(),
        service: cfg.service.clone(),
        image: p.ami.clone(),
        image_ref: p.image_ref.clone(),
        kind: p.kind.clone(),
        outcome: Outcome::Succeeded,
        instances: Vec::new(),
        replaced: group.instances.clone(),
        owner: lock::owner(),
        started: lock::stamp(started),
        finished: String::new(),
        steps: Vec::new(),
        error: None,
        asg: Some(format!(
            "{} launch template {} version {} refresh {}",
            group.name,
            if group.launch_template_id.is_empty() {
                &group.launch_template_name
            } else {
                &group.launch_template_id
            },
            version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            refresh.as_deref().unwrap_or("-")
        )),
    };
    let mut err = None;
    if let Err(e) = result {
        let mut msg = format!("{e:#}");
        // Interrupted or timed out while the refresh runs: hand it back to EC2 Auto Scaling.
        let stop_requested = refresh.is_some() && !msg.contains("the instance refresh ended");
        if stop_requested {
            match asg::stop_refresh(&c.asg, &group.name, a.auto_rollback).await {
                Ok(note) => msg.push_str(&format!("; {note}")),
                Err(se) => msg.push_str(&format!("; {se:#}")),
            }
        }
        let last = last_status.lock().ok().and_then(|l| l.clone());
        record.outcome = asg::failed_outcome(refresh.is_some(), last.as_ref(), stop_requested);
        if record.outcome == Outcome::Failed {
            msg.push_str(&format!(
                "; part of {} may run the new image {}: look at its instances before deploying again",
                group.name, p.ami
            ));
        }
        record.error = Some(msg.clone());
        err = Some(anyhow!("{msg}"));
    } else if let Ok(g) = asg::describe(&c.asg, &group.name).await {
        record.instances = g.instances;
    }
    record.finished = lock::stamp(SystemTime::now());
    record.steps = steps.done.clone();
    let recorded = steps
        .run(5, "record the deploy", history::record(&c.ssm, &record))
        .await;
    let released = lock::release(&c.ssm, &cfg.service, &p.deploy_id).await;
    let mut errors: Vec<String> = Vec::new();
    if let Err(e) = recorded {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = released {
        errors.push(format!("{e:#}"));
    }
    match (err, errors.is_empty()) {
        (Some(e), true) => Err(e),
        (Some(e), false) => Err(e.context(errors.join("; "))),
        (None, true) => Ok(record),
        (None, false) => Err(anyhow!(
            "the instance refresh of {} succeeded, but: {}",
            group.name,
            errors.join("; ")
        )),
    }
}

/// `builder rollback SERVICE`: the image to go back to, from the history.
pub async fn rollback_image(c: &Clients, service: &str) -> Result<(Record, Record)> {
    let records = history::list(&c.ssm, service).await?;
    match history::previous_image(&records) {
        Some((current, previous)) => Ok((current.clone(), previous.clone())),
        None => {
            if let Some((last, from)) = history::last_rollback(&records) {
                bail!(
                    "{service} runs {} since rollback {}, which rolled away from {from}; rolling back again would bring {from} back, \
                     and no older successful image is left to go back to. Deploy the image you want with `builder deploy {service} --ami ...`",
                    last.image,
                    last.deploy_id
                )
            }
            if records.iter().any(|r| r.outcome.serves_new_image()) {
                bail!(
                    "{service} has only ever been deployed successfully with one image ({}): there is no previous image to go back to",
                    records.iter().find(|r| r.outcome.serves_new_image()).map(|r| r.image.as_str()).unwrap_or("?")
                )
            }
            bail!(
                "no successful deploy of {service} in its history ({}): nothing to roll back to",
                history::prefix(service)
            )
        }
    }
}
