//! `--asg NAME`: fleets that outgrow replacing instances one deploy at a time. The image goes into a
//! new version of the group's launch template, and EC2 Auto Scaling's instance refresh does the
//! rolling replacement (minimum healthy percentage, checkpoints, automatic rollback when it
//! fails); the builder starts it and follows it to the end.

use super::config::AsgConfig;
use super::history::{self, Outcome, Record};
use super::{lock, Clients, DeployOptions, Prepared, Steps};
use crate::aws::aws_error;
use crate::aws::waiter::Check;
use crate::aws::{error_code as aws_code, is_throttling};
use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_autoscaling::types::{
    DesiredConfiguration, InstanceRefreshStatus, LaunchTemplateSpecification, RefreshPreferences,
    RefreshStrategy,
};
use aws_sdk_ec2::types::RequestLaunchTemplateData;
use base64::Engine;
use serde::Serialize;
use std::future::Future;
use std::time::{Duration, SystemTime};

/// The group's launch template as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    pub name: String,
    pub launch_template_id: String,
    pub launch_template_name: String,
    /// As the group names it: a number, `$Latest` or `$Default`.
    pub version: String,
    pub desired: i32,
    pub instances: Vec<String>,
}

pub async fn describe(asg: &aws_sdk_autoscaling::Client, name: &str) -> Result<Group> {
    let out = asg
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| {
            format!("looking up Auto Scaling group {name} (needs autoscaling:DescribeAutoScalingGroups)")
        })?;
    let Some(g) = out.auto_scaling_groups().first() else {
        bail!("there is no Auto Scaling group `{name}` in this region");
    };
    let Some(lt) = g.launch_template() else {
        if g.mixed_instances_policy().is_some() {
            bail!("Auto Scaling group {name} uses a mixed instances policy; --asg handles groups with a plain launch template");
        }
        bail!("Auto Scaling group {name} has no launch template (a launch configuration?); move it to a launch template first");
    };
    Ok(Group {
        name: name.to_string(),
        launch_template_id: lt.launch_template_id().unwrap_or_default().to_string(),
        launch_template_name: lt.launch_template_name().unwrap_or_default().to_string(),
        version: lt.version().unwrap_or("$Default").to_string(),
        desired: g.desired_capacity().unwrap_or(0),
        instances: g
            .instances()
            .iter()
            .filter_map(|i| i.instance_id())
            .map(str::to_string)
            .collect(),
    })
}

/// A new launch template version: the group's current one with the new image (and user-data).
pub async fn new_version(
    ec2: &aws_sdk_ec2::Client,
    group: &Group,
    ami: &str,
    user_data: Option<&[u8]>,
    deploy_id: &str,
) -> Result<i64> {
    let mut data = RequestLaunchTemplateData::builder().image_id(ami);
    if let Some(u) = user_data {
        data = data.user_data(base64::engine::general_purpose::STANDARD.encode(u));
    }
    let mut req = ec2
        .create_launch_template_version()
        .source_version(&group.version)
        .version_description(format!("stackless deploy {deploy_id}: {ami}"))
        .launch_template_data(data.build());
    req = if group.launch_template_id.is_empty() {
        req.launch_template_name(&group.launch_template_name)
    } else {
        req.launch_template_id(&group.launch_template_id)
    };
    let out = req.send().await.map_err(aws_error).with_context(|| {
        format!(
            "adding a version with {ami} to launch template {} (needs ec2:CreateLaunchTemplateVersion)",
            template_label(group)
        )
    })?;
    let v = out
        .launch_template_version()
        .and_then(|v| v.version_number())
        .context("CreateLaunchTemplateVersion returned no version number")?;
    tracing::info!(
        "launch template {} version {v} boots {ami}",
        template_label(group)
    );
    Ok(v)
}

fn template_label(g: &Group) -> String {
    if g.launch_template_name.is_empty() {
        g.launch_template_id.clone()
    } else {
        format!("{} ({})", g.launch_template_name, g.launch_template_id)
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// The refresh preferences from `[asg]`: skip matching instances, so a refresh to the image the
/// group already runs replaces nothing.
pub fn preferences(c: &AsgConfig) -> RefreshPreferences {
    RefreshPreferences::builder()
        .set_min_healthy_percentage(c.min_healthy_percentage)
        .set_max_healthy_percentage(c.max_healthy_percentage)
        .set_checkpoint_percentages(if c.checkpoint_percentages.is_empty() {
            None
        } else {
            Some(c.checkpoint_percentages.clone())
        })
        .set_checkpoint_delay(c.checkpoint_delay.map(secs))
        .set_instance_warmup(c.instance_warmup.map(secs))
        .auto_rollback(c.auto_rollback)
        .skip_matching(true)
        .build()
}

/// Starts the instance refresh to `version`; returns its id.
pub async fn start_refresh(
    asg: &aws_sdk_autoscaling::Client,
    group: &Group,
    version: i64,
    c: &AsgConfig,
) -> Result<String> {
    let mut lt = LaunchTemplateSpecification::builder().version(version.to_string());
    lt = if group.launch_template_id.is_empty() {
        lt.launch_template_name(&group.launch_template_name)
    } else {
        lt.launch_template_id(&group.launch_template_id)
    };
    let out = asg
        .start_instance_refresh()
        .auto_scaling_group_name(&group.name)
        .strategy(RefreshStrategy::Rolling)
        .desired_configuration(DesiredConfiguration::builder().launch_template(lt.build()).build())
        .preferences(preferences(c))
        .send()
        .await
        .map_err(|e| {
            let hint = if aws_code(&e) == Some("InstanceRefreshInProgress") {
                " (an instance refresh is already running on this group: wait for it, or cancel it with `aws autoscaling cancel-instance-refresh`)"
            } else {
                ""
            };
            aws_error(e).context(hint.to_string())
        })
        .with_context(|| {
            format!(
                "starting an instance refresh of {} (needs autoscaling:StartInstanceRefresh)",
                group.name
            )
        })?;
    let id = out
        .instance_refresh_id()
        .context("StartInstanceRefresh returned no id")?
        .to_string();
    tracing::info!("instance refresh {id} of {} started", group.name);
    Ok(id)
}

/// What one look at the refresh found.
pub fn judge(status: &InstanceRefreshStatus, percent: Option<i32>, reason: &str) -> Check<()> {
    use InstanceRefreshStatus as S;
    let why = if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    };
    match status {
        S::Successful => Check::Ready(()),
        S::Failed | S::Cancelled | S::RollbackSuccessful | S::RollbackFailed => Check::Failed(
            format!("the instance refresh ended {}{why}", status.as_str()),
        ),
        _ => Check::Waiting(format!(
            "{} {}%{why}",
            status.as_str(),
            percent.unwrap_or(0)
        )),
    }
}

/// Follows the refresh to its end: Ok when it succeeded, an error with its status and reason when
/// it failed, was cancelled or rolled back.
/// `last` keeps the last status seen, for the record.
pub async fn follow(
    asg: &aws_sdk_autoscaling::Client,
    group: &str,
    id: &str,
    timeout: Duration,
    opts: &DeployOptions,
    last: &std::sync::Mutex<Option<InstanceRefreshStatus>>,
) -> Result<()> {
    opts.wait(format!("instance refresh {id} of {group}"), timeout)
        .hint("the refresh goes on in AWS: follow it with `aws autoscaling describe-instance-refreshes`")
        .until(|| async {
            let out = match asg
                .describe_instance_refreshes()
                .auto_scaling_group_name(group)
                .instance_refresh_ids(id)
                .send()
                .await
            {
                Ok(o) => o,
                Err(e) if is_throttling(aws_code(&e)) => {
                    return Ok(Check::Waiting("throttled".into()))
                }
                Err(e) => {
                    return Err(aws_error(e)).with_context(|| {
                        format!("reading instance refresh {id} (needs autoscaling:DescribeInstanceRefreshes)")
                    })
                }
            };
            let Some(r) = out
                .instance_refreshes()
                .iter()
                .find(|r| r.instance_refresh_id() == Some(id))
            else {
                return Ok(Check::Waiting("not visible yet".into()));
            };
            let status = r.status().cloned().unwrap_or(InstanceRefreshStatus::Pending);
            if let Ok(mut l) = last.lock() {
                *l = Some(status.clone());
            }
            Ok(judge(&status, r.percentage_complete(), r.status_reason().unwrap_or("")))
        })
        .await
}

/// The honest outcome of an `--asg` deploy that did not succeed: `rolled-back` only when the group
/// is known to run the old image only (the refresh never started, or ended RollbackSuccessful);
/// `failed` whenever part of the group may run the new image (Failed, Cancelled, RollbackFailed,
/// a rollback or cancel only requested on an interrupt or the deadline, a status never seen).
pub fn failed_outcome(
    started: bool,
    last: Option<&InstanceRefreshStatus>,
    stop_requested: bool,
) -> Outcome {
    use InstanceRefreshStatus as S;
    if !started {
        return Outcome::RolledBack;
    }
    if stop_requested {
        return Outcome::Failed;
    }
    match last {
        Some(S::RollbackSuccessful) => Outcome::RolledBack,
        // Ended well after all (the error came from elsewhere): the new image serves.
        Some(S::Successful) => Outcome::SucceededWithErrors,
        _ => Outcome::Failed,
    }
}

/// On an interrupt: roll the refresh back when automatic rollback is on, else cancel it.
pub async fn stop_refresh(
    asg: &aws_sdk_autoscaling::Client,
    group: &str,
    rollback: bool,
) -> Result<String> {
    if rollback {
        asg.rollback_instance_refresh()
            .auto_scaling_group_name(group)
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| format!("rolling back the instance refresh of {group} (needs autoscaling:RollbackInstanceRefresh)"))?;
        Ok(format!("asked EC2 Auto Scaling to roll back the instance refresh of {group}; follow it with `aws autoscaling describe-instance-refreshes --auto-scaling-group-name {group}`"))
    } else {
        asg.cancel_instance_refresh()
            .auto_scaling_group_name(group)
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| format!("cancelling the instance refresh of {group} (needs autoscaling:CancelInstanceRefresh)"))?;
        Ok(format!("cancelled the instance refresh of {group}; instances already replaced keep the new image"))
    }
}

/// `--asg`: a launch template version and an instance refresh, followed to the end.
pub(super) async fn deploy_until(
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
                    new_version(
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
                    start_refresh(&c.asg, group, v, a),
                )
                .await?;
            refresh = Some(id.clone());
            steps
                .run(
                    4,
                    "follow the instance refresh",
                    follow(
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
    let mut record = p.record(started);
    record.replaced = group.instances.clone();
    record.asg = Some(format!(
        "{} launch template {} version {} refresh {}",
        group.name,
        if group.launch_template_id.is_empty() {
            &group.launch_template_name
        } else {
            &group.launch_template_id
        },
        version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
        refresh.as_deref().unwrap_or("-")
    ));
    let mut err = None;
    if let Err(e) = result {
        let mut msg = format!("{e:#}");
        // Interrupted or timed out while the refresh runs: hand it back to EC2 Auto Scaling.
        let stop_requested = refresh.is_some() && !msg.contains("the instance refresh ended");
        if stop_requested {
            match stop_refresh(&c.asg, &group.name, a.auto_rollback).await {
                Ok(note) => msg.push_str(&format!("; {note}")),
                Err(se) => msg.push_str(&format!("; {se:#}")),
            }
        }
        let last = last_status.lock().ok().and_then(|l| l.clone());
        record.outcome = failed_outcome(refresh.is_some(), last.as_ref(), stop_requested);
        if record.outcome == Outcome::Failed {
            msg.push_str(&format!(
                "; part of {} may run the new image {}: look at its instances before deploying again",
                group.name, p.ami
            ));
        }
        record.error = Some(msg.clone());
        err = Some(anyhow!("{msg}"));
    } else if let Ok(g) = describe(&c.asg, &group.name).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceRefreshStatus as S;

    #[test]
    fn refreshes_end_on_success_failure_or_rollback() {
        assert_eq!(judge(&S::Successful, Some(100), ""), Check::Ready(()));
        assert_eq!(
            judge(&S::InProgress, Some(40), ""),
            Check::Waiting("InProgress 40%".into())
        );
        assert!(matches!(
            judge(&S::RollbackSuccessful, None, "instances failed health checks"),
            Check::Failed(s) if s.contains("RollbackSuccessful") && s.contains("health checks")
        ));
        assert!(matches!(judge(&S::Failed, None, ""), Check::Failed(_)));
    }

    #[test]
    fn only_a_refresh_known_to_be_undone_counts_as_rolled_back() {
        assert_eq!(failed_outcome(false, None, false), Outcome::RolledBack);
        assert_eq!(
            failed_outcome(true, Some(&S::RollbackSuccessful), false),
            Outcome::RolledBack
        );
        for s in [S::Failed, S::Cancelled, S::RollbackFailed, S::InProgress] {
            assert_eq!(
                failed_outcome(true, Some(&s), false),
                Outcome::Failed,
                "{s:?}"
            );
        }
        assert_eq!(failed_outcome(true, None, false), Outcome::Failed);
        assert_eq!(
            failed_outcome(true, Some(&S::InProgress), true),
            Outcome::Failed,
            "a rollback only requested"
        );
    }

    #[test]
    fn preferences_carry_the_config() {
        let p = preferences(&AsgConfig {
            name: "web".into(),
            min_healthy_percentage: Some(90),
            max_healthy_percentage: Some(120),
            checkpoint_percentages: vec![50, 100],
            checkpoint_delay: Some(Duration::from_secs(120)),
            instance_warmup: None,
            auto_rollback: true,
        });
        assert_eq!(p.min_healthy_percentage(), Some(90));
        assert_eq!(p.max_healthy_percentage(), Some(120));
        assert_eq!(p.checkpoint_percentages(), [50, 100]);
        assert_eq!(p.checkpoint_delay(), Some(120));
        assert_eq!(p.auto_rollback(), Some(true));
        assert_eq!(p.skip_matching(), Some(true));
    }
}
