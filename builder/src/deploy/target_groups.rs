//! ELBv2 target groups: what they are, registering the new instances and waiting until every one
//! is healthy in every group, deregistering and waiting for connection draining.

use super::{aws_code, is_throttling, DeployOptions};
use crate::target::aws::aws_error;
use crate::target::aws::waiter::Check;
use anyhow::{bail, Context, Result};
use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealthStateEnum};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

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

/// What one look at the new targets found.
pub fn judge_healthy(
    arn: &str,
    ids: &[String],
    seen: &BTreeMap<String, (String, String)>,
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
        match TargetHealthStateEnum::from(state.as_str()) {
            TargetHealthStateEnum::Healthy => {}
            TargetHealthStateEnum::Initial => waiting.push(format!("{id} initial{why}")),
            TargetHealthStateEnum::Unhealthy
            | TargetHealthStateEnum::Draining
            | TargetHealthStateEnum::Unavailable => {
                return Check::Failed(format!(
                    "target {id} is {state} in {arn}{why}: check the group's health check (path, port, matcher) and the service on the instance"
                ))
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

/// Waits until every new instance is healthy in every group. `unhealthy` fails at once.
pub async fn wait_healthy(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arns: &[String],
    ids: &[String],
    timeout: Duration,
    opts: &DeployOptions,
) -> Result<()> {
    for arn in arns {
        opts.wait(format!("{} to be healthy in {arn}", ids.join(" ")), timeout)
            .hint("raise [timeouts] healthy, or look at the target group's health check and the service on the instances")
            .until(|| async {
                match health_detail(elb, arn, Some(ids)).await {
                    Ok(seen) => Ok(judge_healthy(arn, ids, &seen)),
                    Err(e) if throttled(&e) => Ok(Check::Waiting("throttled".into())),
                    Err(e) => Err(e),
                }
            })
            .await?;
    }
    Ok(())
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
        assert_eq!(
            judge_healthy("tg", &ids, &seen(&[("i-1", "healthy"), ("i-2", "healthy")])),
            Check::Ready(())
        );
        assert!(matches!(
            judge_healthy("tg", &ids, &seen(&[("i-1", "healthy"), ("i-2", "initial")])),
            Check::Waiting(s) if s == "i-2 initial"
        ));
        assert!(matches!(
            judge_healthy("tg", &ids, &seen(&[("i-1", "unhealthy"), ("i-2", "healthy")])),
            Check::Failed(s) if s.contains("i-1 is unhealthy")
        ));
        assert!(matches!(
            judge_healthy("tg", &ids, &seen(&[("i-1", "healthy")])),
            Check::Waiting(s) if s.contains("i-2 not listed")
        ));
    }
}
