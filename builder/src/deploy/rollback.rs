//! Undoing: removing a cut-short deploy's new instances, and the image `builder rollback` goes
//! back to.

use super::execute::Live;
use super::history::{self, Record};
use super::{instances, target_groups, Clients, DeployOptions, Prepared};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Removes this deploy's new instances: deregistered (and drained, if they were registered), then
/// terminated. Returns their ids.
pub(super) async fn rollback_new(
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
