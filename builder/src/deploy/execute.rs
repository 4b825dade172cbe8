//! Running a deploy: steps 1 to 6 (see the module above), with the rollback of steps 2 to 4 on a
//! failure or an interrupt, and step 5 only while the lock is still the deploy's.

use super::config::ReadyMode;
use super::history::{Outcome, Record};
use super::rollback::rollback_new;
use super::{
    asg, history, ids, instances, lock, target_groups, Clients, DeployOptions, Prepared, Steps,
};
use crate::signals::interrupted;
use anyhow::{anyhow, Context, Result};
use std::future::Future;
use std::time::{Instant, SystemTime};

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
        return asg::deploy_until(c, p, opts, stop).await;
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
            r = go => r.map_err(Halt::Failed),
            why = &mut stop => Err(Halt::Interrupted(why)),
        }
    };
    let mut record = p.record(started);

    // Step 5 removes instances: only while this deploy still holds the lock. A deploy that lost
    // it (it outlived its lifetime and another deploy took it over) must not terminate what the
    // other deploy may have booted, nor its own new instances, which serve now.
    let mut result = result;
    if result.is_ok() {
        // Every new instance must still be healthy in every group when the old ones go.
        result = target_groups::confirm_healthy(&c.elb, &cfg.target_groups, &live.new_ids, opts)
            .await
            .with_context(|| steps.label(4, "register with the target groups"))
            .map_err(Halt::Failed);
    }
    let mut lost_lock = None;
    if result.is_ok() {
        if let Err(e) =
            lock::still_ours(&c.ssm, &cfg.service, &p.deploy_id, SystemTime::now()).await
        {
            lost_lock = Some(e.context("the deploy lock was lost before step 5"));
        }
    }

    if let Err(halt) = result {
        // Before the switch: remove the new instances, keep the old ones.
        let e = match halt {
            Halt::Failed(e) => e,
            // An interrupt comes without the step it cut short.
            Halt::Interrupted(why) if !live.failed_step.is_empty() => {
                anyhow!("{why}").context(live.failed_step.clone())
            }
            Halt::Interrupted(why) => anyhow!("{why}").context("interrupted"),
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
        Some(e) => Err(Switch::LockLost(e)),
        None => steps
            .run(
                5,
                "deregister and terminate the old instances",
                replace_old(c, p, opts),
            )
            .await
            .map_err(Switch::Failed),
    };
    match replaced {
        Ok(old) => record.replaced = old,
        Err(Switch::LockLost(e)) => {
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
        Err(Switch::Failed(e)) => {
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

/// Why steps 2 to 4 stopped short of the switch.
enum Halt {
    /// A step failed (the error names it).
    Failed(anyhow::Error),
    /// Ctrl-C, SIGTERM or the caller's stop, with its reason.
    Interrupted(&'static str),
}

/// Why step 5 did not replace the old instances.
enum Switch {
    /// The lock was found lost just before it: nothing was touched.
    LockLost(anyhow::Error),
    /// It failed part way.
    Failed(anyhow::Error),
}

/// What steps 2 to 4 got to, for the rollback.
#[derive(Debug, Default)]
pub(super) struct Live {
    pub(super) new_ids: Vec<String>,
    /// Step 2 finished: every new instance is in `new_ids`.
    pub(super) launched: bool,
    /// Registration started: the rollback deregisters and waits for draining.
    pub(super) registered: bool,
    /// The label of the step that was running, for the error.
    pub(super) failed_step: String,
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
