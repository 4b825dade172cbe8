//! ELBv2 target groups: what they are, registering the new instances and waiting until every one
//! is healthy in every group, deregistering and waiting for connection draining.

use super::DeployOptions;
use crate::aws::aws_error;
use crate::aws::waiter::Check;
use crate::aws::{error_code as aws_code, is_throttling};
use anyhow::{bail, Context, Result};
use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealthStateEnum};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A target group as the deploy needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    pub arn: String,
    pub name: String,
    pub port: Option<i32>,
    /// `deregistration_delay.timeout_seconds`: how long draining lasts at most.
    pub deregistration_delay: Duration,
    /// Instance id to health state, for the targets registered now.
    pub targets: BTreeMap<String, String>,
}

impl Group {
    pub fn healthy(&self, ids: &[String]) -> usize {
        ids.iter()
            .filter(|id| self.targets.get(*id).map(String::as_str) == Some("healthy"))
            .count()
    }
}

/// Reads the groups, their draining delay and their registered targets.
pub async fn describe(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arns: &[String],
) -> Result<Vec<Group>> {
    if arns.is_empty() {
        return Ok(Vec::new());
    }
    let out = elb
        .describe_target_groups()
        .set_target_group_arns(Some(arns.to_vec()))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| {
            format!(
                "looking up the target groups {} (do they exist in this region? needs elasticloadbalancing:DescribeTargetGroups)",
                arns.join(" ")
            )
        })?;
    let mut groups = Vec::new();
    for arn in arns {
        let Some(g) = out
            .target_groups()
            .iter()
            .find(|g| g.target_group_arn() == Some(arn))
        else {
            bail!("target group {arn} was not found");
        };
        if let Some(t) = g.target_type() {
            if t.as_str() != "instance" {
                bail!(
                    "target group {arn} takes targets of type `{}`; a deploy registers instances: use a group of target type `instance`",
                    t.as_str()
                );
            }
        }
        let attrs = elb
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| format!("reading the attributes of target group {arn}"))?;
        let delay = attrs
            .attributes()
            .iter()
            .find(|a| a.key() == Some("deregistration_delay.timeout_seconds"))
            .and_then(|a| a.value())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(300);
        groups.push(Group {
            arn: arn.clone(),
            name: g.target_group_name().unwrap_or_default().to_string(),
            port: g.port(),
            deregistration_delay: Duration::from_secs(delay),
            targets: health(elb, arn, None).await?,
        });
    }
    Ok(groups)
}

/// Instance id to health state (`healthy`, `initial`, `unhealthy`, `draining`, `unused` ...) with
/// the reason when there is one: the registered targets, or the ones asked about.
pub async fn health(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arn: &str,
    ids: Option<&[String]>,
) -> Result<BTreeMap<String, String>> {
    Ok(health_detail(elb, arn, ids)
        .await?
        .into_iter()
        .map(|(k, (state, _))| (k, state))
        .collect())
}

async fn health_detail(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arn: &str,
    ids: Option<&[String]>,
) -> Result<BTreeMap<String, (String, String)>> {
    let targets = ids.map(descriptions);
    let out = elb
        .describe_target_health()
        .target_group_arn(arn)
        .set_targets(targets)
        .send()
        .await
        .map_err(|e| {
            let throttled = is_throttling(aws_code(&e));
            let err = aws_error(e);
            if throttled {
                err.context(Throttled)
            } else {
                err
            }
        })
        .with_context(|| {
            format!(
                "reading target health in {arn} (needs elasticloadbalancing:DescribeTargetHealth)"
            )
        })?;
    let mut m = BTreeMap::new();
    for d in out.target_health_descriptions() {
        let Some(id) = d.target().and_then(|t| t.id()) else {
            continue;
        };
        let h = d.target_health();
        let state = h
            .and_then(|h| h.state())
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| "unknown".into());
        let why = h
            .map(|h| {
                [h.reason().map(|r| r.as_str()), h.description()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ")
            })
            .unwrap_or_default();
        m.insert(id.to_string(), (state, why));
    }
    Ok(m)
}

/// Marks an error as throttling, so waits keep going.
#[derive(Debug)]
struct Throttled;
impl std::fmt::Display for Throttled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "throttled")
    }
}

fn throttled(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Throttled>().is_some()
}

fn descriptions(ids: &[String]) -> Vec<TargetDescription> {
    ids.iter()
        .map(|id| TargetDescription::builder().id(id).build())
        .collect()
}

pub async fn register(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arn: &str,
    ids: &[String],
) -> Result<()> {
    elb.register_targets()
        .target_group_arn(arn)
        .set_targets(Some(descriptions(ids)))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| {
            format!(
                "registering {} with {arn} (needs elasticloadbalancing:RegisterTargets)",
                ids.join(" ")
            )
        })?;
    tracing::info!("registered {} with {arn}", ids.join(" "));
    Ok(())
}

pub async fn deregister(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arn: &str,
    ids: &[String],
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    elb.deregister_targets()
        .target_group_arn(arn)
        .set_targets(Some(descriptions(ids)))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| {
            format!(
                "deregistering {} from {arn} (needs elasticloadbalancing:DeregisterTargets)",
                ids.join(" ")
            )
        })?;
    tracing::info!("deregistered {} from {arn}", ids.join(" "));
    Ok(())
}

/// What one look at the new targets in one group found. An `unhealthy` target is tolerated
/// while `since_registration` is within `grace`, unless it had been healthy before (`ever_healthy`,
/// updated here): a first boot that still applies its state often fails a few health checks.
pub fn judge_healthy(
    arn: &str,
    ids: &[String],
    seen: &BTreeMap<String, (String, String)>,
    since_registration: Duration,
    grace: Duration,
    ever_healthy: &mut BTreeSet<String>,
) -> Check<()> {
    let mut waiting = Vec::new();
    for id in ids {
        let (state, why) = seen
            .get(id)
            .cloned()
            .unwrap_or_else(|| ("not listed".into(), String::new()));
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(" ({why})")
        };
        let fail = |extra: String| {
            Check::Failed(format!(
                "target {id} is {state} in {arn}{why}{extra}: check the group's health check (path, port, matcher) and the service on the instance"
            ))
        };
        match TargetHealthStateEnum::from(state.as_str()) {
            TargetHealthStateEnum::Healthy => {
                ever_healthy.insert(id.clone());
            }
            TargetHealthStateEnum::Initial => waiting.push(format!("{id} initial{why}")),
            TargetHealthStateEnum::Unhealthy if ever_healthy.contains(id) => {
                return fail(" after having been healthy".into())
            }
            TargetHealthStateEnum::Unhealthy if since_registration < grace => {
                waiting.push(format!(
                    "{id} unhealthy{why}, tolerated for {} more ([timeouts] unhealthy_grace)",
                    human(grace - since_registration)
                ))
            }
            TargetHealthStateEnum::Unhealthy => {
                return fail(if grace.is_zero() {
                    String::new()
                } else {
                    format!(
                        " {} after its registration ([timeouts] unhealthy_grace {})",
                        human(since_registration),
                        human(grace)
                    )
                })
            }
            TargetHealthStateEnum::Draining | TargetHealthStateEnum::Unavailable => {
                return fail(String::new())
            }
            _ => waiting.push(format!("{id} {state}{why}")),
        }
    }
    if waiting.is_empty() {
        Check::Ready(())
    } else {
        Check::Waiting(waiting.join(", "))
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Waits until every new instance is healthy in every group, judging every group on each look
/// (a target that turns unhealthy in one group while another is still waited for fails the
/// step). `unhealthy` fails once `grace` after the registration has passed, or at once after the
/// target had been healthy.
pub async fn wait_healthy(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arns: &[String],
    ids: &[String],
    timeout: Duration,
    grace: Duration,
    opts: &DeployOptions,
) -> Result<()> {
    if arns.is_empty() {
        return Ok(());
    }
    let registered = Instant::now();
    let ever_healthy: Mutex<BTreeMap<String, BTreeSet<String>>> = Mutex::new(BTreeMap::new());
    opts.wait(
        format!("{} to be healthy in {}", ids.join(" "), arns.join(" ")),
        timeout,
    )
    .hint("raise [timeouts] healthy, or look at the target group's health check and the service on the instances")
    .until(|| async {
        let mut waiting = Vec::new();
        for arn in arns {
            let seen = match health_detail(elb, arn, Some(ids)).await {
                Ok(seen) => seen,
                Err(e) if throttled(&e) => {
                    waiting.push(format!("{arn}: throttled"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut ever = ever_healthy.lock().expect("not poisoned");
            let ever = ever.entry(arn.clone()).or_default();
            match judge_healthy(arn, ids, &seen, registered.elapsed(), grace, ever) {
                Check::Ready(()) => {}
                Check::Waiting(w) if arns.len() > 1 => waiting.push(format!("{w} in {arn}")),
                Check::Waiting(w) => waiting.push(w),
                failed => return Ok(failed),
            }
        }
        Ok(Check::unless_waiting(waiting))
    })
    .await
}

/// One more look just before the switch: every new instance must still be healthy in every group.
/// Throttled reads are retried for a minute; anything but `healthy` fails.
pub async fn confirm_healthy(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arns: &[String],
    ids: &[String],
    opts: &DeployOptions,
) -> Result<()> {
    if arns.is_empty() {
        return Ok(());
    }
    opts.wait(
        format!(
            "{} to be still healthy in {}",
            ids.join(" "),
            arns.join(" ")
        ),
        Duration::from_secs(60),
    )
    .until(|| async {
        for arn in arns {
            let seen = match health_detail(elb, arn, Some(ids)).await {
                Ok(seen) => seen,
                Err(e) if throttled(&e) => return Ok(Check::Waiting(format!("{arn}: throttled"))),
                Err(e) => return Err(e),
            };
            for id in ids {
                let (state, why) = seen
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| ("not listed".into(), String::new()));
                if state != "healthy" {
                    let why = if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({why})")
                    };
                    return Ok(Check::Failed(format!(
                        "just before the switch, target {id} is {state} in {arn}{why}"
                    )));
                }
            }
        }
        Ok(Check::Ready(()))
    })
    .await
}

/// Waits until deregistered targets have drained: no longer listed, or `unused`.
pub async fn wait_drained(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arns: &[String],
    ids: &[String],
    timeout: Duration,
    opts: &DeployOptions,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    for arn in arns {
        opts.wait(format!("{} to drain from {arn}", ids.join(" ")), timeout)
            .hint("connection draining lasts up to the group's deregistration delay; raise [timeouts] drain")
            .until(|| async {
                let seen = match health_detail(elb, arn, Some(ids)).await {
                    Ok(s) => s,
                    Err(e) if throttled(&e) => return Ok(Check::Waiting("throttled".into())),
                    Err(e) => return Err(e),
                };
                let left: Vec<String> = ids
                    .iter()
                    .filter_map(|id| match seen.get(id) {
                        None => None,
                        Some((s, _)) if s == "unused" => None,
                        Some((s, _)) => Some(format!("{id} {s}")),
                    })
                    .collect();
                Ok(if left.is_empty() {
                    Check::Ready(())
                } else {
                    Check::Waiting(left.join(", "))
                })
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(pairs: &[(&str, &str)]) -> BTreeMap<String, (String, String)> {
        pairs
            .iter()
            .map(|(id, s)| (id.to_string(), (s.to_string(), String::new())))
            .collect()
    }

    #[test]
    fn healthy_waits_wait_on_initial_and_fail_on_unhealthy() {
        let ids = vec!["i-1".to_string(), "i-2".to_string()];
        let zero = Duration::ZERO;
        let judge = |s: &BTreeMap<String, (String, String)>| {
            judge_healthy("tg", &ids, s, zero, zero, &mut BTreeSet::new())
        };
        assert_eq!(
            judge(&seen(&[("i-1", "healthy"), ("i-2", "healthy")])),
            Check::Ready(())
        );
        assert!(matches!(
            judge(&seen(&[("i-1", "healthy"), ("i-2", "initial")])),
            Check::Waiting(s) if s == "i-2 initial"
        ));
        assert!(matches!(
            judge(&seen(&[("i-1", "unhealthy"), ("i-2", "healthy")])),
            Check::Failed(s) if s.contains("i-1 is unhealthy")
        ));
        assert!(matches!(
            judge(&seen(&[("i-1", "healthy")])),
            Check::Waiting(s) if s.contains("i-2 not listed")
        ));
    }

    #[test]
    fn unhealthy_is_tolerated_within_the_grace_unless_it_had_been_healthy() {
        let ids = vec!["i-1".to_string()];
        let grace = Duration::from_secs(300);
        let mut ever = BTreeSet::new();
        let unhealthy = seen(&[("i-1", "unhealthy")]);
        assert!(matches!(
            judge_healthy("tg", &ids, &unhealthy, Duration::from_secs(60), grace, &mut ever),
            Check::Waiting(s) if s.contains("i-1 unhealthy, tolerated for 4m more")
        ));
        assert!(matches!(
            judge_healthy("tg", &ids, &unhealthy, Duration::from_secs(301), grace, &mut ever),
            Check::Failed(s) if s.contains("5m 1s after its registration")
        ));
        let healthy = seen(&[("i-1", "healthy")]);
        assert_eq!(
            judge_healthy(
                "tg",
                &ids,
                &healthy,
                Duration::from_secs(90),
                grace,
                &mut ever
            ),
            Check::Ready(())
        );
        assert!(matches!(
            judge_healthy("tg", &ids, &unhealthy, Duration::from_secs(100), grace, &mut ever),
            Check::Failed(s) if s.contains("after having been healthy")
        ));
    }
}
