//! What a deploy finds out before changing anything: the image, the user-data, the instances
//! and target groups now, the lock. `--plan` prints it; [`super::execute`] acts on it.

use super::config::{DeployConfig, ImageRef, ReadyMode};
use super::instances::Instance;
use super::{
    asg, history, human, human_up, ids, instances, lock, new_deploy_id, target_groups, Clients,
};
use crate::definition;
use crate::platform::aws::source;
use crate::user_data::{self, Payload};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, SystemTime};

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
    let held = lock::read(&c.ssm, &cfg.service).await?;
    // A lock past its expiry belongs to a deploy that was killed: what it booted is to be
    // replaced with the rest, not capacity the new instances must match.
    let killed = match &held {
        Some((_, Some(rec))) if rec.expired(SystemTime::now()).unwrap_or(false) => {
            Some(rec.deploy_id.as_str())
        }
        _ => None,
    };
    // Never fewer healthy targets than now: the new instances must cover the old healthy ones.
    if asg.is_none() {
        let old_ids: Vec<String> = old
            .iter()
            .filter(|i| Some(i.deploy_id.as_str()) != killed)
            .map(|i| i.id.clone())
            .collect();
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
    let lock_held = held.map(|(raw, rec)| rec.map(|r| r.describe()).unwrap_or(raw));
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

impl Prepared {
    /// The deploy's record as it starts: succeeded until something says otherwise.
    pub(crate) fn record(&self, started: std::time::SystemTime) -> history::Record {
        history::Record {
            deploy_id: self.deploy_id.clone(),
            service: self.config.service.clone(),
            image: self.ami.clone(),
            image_ref: self.image_ref.clone(),
            kind: self.kind.clone(),
            outcome: history::Outcome::Succeeded,
            instances: Vec::new(),
            replaced: Vec::new(),
            owner: lock::owner(),
            started: lock::stamp(started),
            finished: String::new(),
            steps: Vec::new(),
            error: None,
            asg: None,
        }
    }

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
