//! The service's instances: finding the old ones, booting the new ones (tagged with the service and
//! the deploy), waiting until they run and are ready, terminating.

use super::DeployOptions;
use crate::aws::waiter::Check;
use crate::aws::{aws_error, tag_filter, tag_spec};
use crate::aws::{error_code as aws_code, is_throttling};
use crate::console::{self, AgentResult};
use crate::platform::aws::tags;
use anyhow::{Context, Result};
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceStateName, InstanceType, ResourceType,
};
use base64::Engine;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Tag: the service an instance belongs to.
pub const SERVICE: &str = "stackless:service";
/// Tag: the deploy that booted it.
pub const DEPLOY_ID: &str = "stackless:deploy-id";
/// Tag: the AMI id it was booted from (`stackless:image` keeps the definition name, as on images).
pub const AMI: &str = "stackless:ami";

/// One instance as the deploy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    pub id: String,
    pub state: String,
    pub private_ip: String,
    pub public_ip: String,
    pub deploy_id: String,
    pub image: String,
}

fn from_sdk(i: &aws_sdk_ec2::types::Instance) -> Instance {
    let tag = |k: &str| {
        i.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .unwrap_or_default()
            .to_string()
    };
    Instance {
        id: i.instance_id().unwrap_or_default().to_string(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_default(),
        private_ip: i.private_ip_address().unwrap_or_default().to_string(),
        public_ip: i.public_ip_address().unwrap_or_default().to_string(),
        deploy_id: tag(DEPLOY_ID),
        image: i.image_id().unwrap_or_default().to_string(),
    }
}

async fn describe(
    ec2: &aws_sdk_ec2::Client,
    filters: Vec<Filter>,
    what: &str,
) -> Result<Vec<Instance>> {
    let mut out = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .set_filters(Some(filters))
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page
            .map_err(aws_error)
            .with_context(|| format!("looking for {what} (needs ec2:DescribeInstances)"))?;
        for r in page.reservations() {
            out.extend(r.instances().iter().map(from_sdk));
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn live_states() -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .set_values(Some(
            ["pending", "running", "stopping", "stopped"]
                .map(String::from)
                .to_vec(),
        ))
        .build()
}

/// The service's instances that are not terminated, except those of `except_deploy`.
pub async fn find_old(
    ec2: &aws_sdk_ec2::Client,
    service: &str,
    except_deploy: Option<&str>,
) -> Result<Vec<Instance>> {
    let all = describe(
        ec2,
        vec![tag_filter(SERVICE, service), live_states()],
        &format!("the instances of {service} (tagged {SERVICE}={service})"),
    )
    .await?;
    Ok(all
        .into_iter()
        .filter(|i| Some(i.deploy_id.as_str()) != except_deploy)
        .collect())
}

/// Instances a deploy booted that are not terminated, whatever it recorded: a RunInstances cut
/// short by an interrupt may have started some whose ids it never saw.
pub async fn find_by_deploy(ec2: &aws_sdk_ec2::Client, deploy_id: &str) -> Result<Vec<String>> {
    let found = describe(
        ec2,
        vec![
            tag_filter(DEPLOY_ID, deploy_id),
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    ["pending", "running", "shutting-down", "stopping", "stopped"]
                        .map(String::from)
                        .to_vec(),
                ))
                .build(),
        ],
        &format!("the instances of deploy {deploy_id}"),
    )
    .await?;
    Ok(found.into_iter().map(|i| i.id).collect())
}

/// What booting the new instances needs.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    pub service: &'a str,
    pub deploy_id: &'a str,
    pub ami: &'a str,
    /// The image definition name, when the image was given by name.
    pub image_name: Option<&'a str>,
    pub count: u32,
    pub instance_type: &'a str,
    pub subnets: &'a [String],
    pub security_groups: &'a [String],
    pub instance_profile: Option<&'a str>,
    pub user_data: Option<&'a [u8]>,
    pub extra_tags: &'a BTreeMap<String, String>,
}

/// The tags of a new instance and its volumes: the deploy file's, then the builder's, which win.
pub fn launch_tags(l: &Launch<'_>) -> BTreeMap<String, String> {
    let mut t = l.extra_tags.clone();
    t.insert("Name".into(), l.service.to_string());
    t.insert(SERVICE.into(), l.service.into());
    t.insert(DEPLOY_ID.into(), l.deploy_id.into());
    t.insert(AMI.into(), l.ami.into());
    if let Some(n) = l.image_name {
        t.insert(tags::IMAGE.into(), n.into());
    }
    t.insert(tags::MANAGED_BY.into(), tags::MANAGED_BY_VALUE.into());
    t
}

/// How many instances go to each subnet: spread evenly, the first subnets taking the rest.
pub fn spread(count: u32, subnets: usize) -> Vec<u32> {
    if subnets == 0 {
        return vec![count];
    }
    let n = subnets as u32;
    (0..n)
        .map(|i| count / n + u32::from(i < count % n))
        .filter(|c| *c > 0)
        .collect()
}

/// Boots the new instances, spread over the subnets (one RunInstances per subnet, its client token
/// derived from the deploy id so a retried call cannot boot twice). Returns their ids.
pub async fn launch(ec2: &aws_sdk_ec2::Client, l: &Launch<'_>) -> Result<Vec<String>> {
    let tags = launch_tags(l);
    let mut ids = Vec::new();
    for (i, n) in spread(l.count, l.subnets.len()).into_iter().enumerate() {
        let subnet = l.subnets.get(i).cloned();
        let n = i32::try_from(n).context("count does not fit")?;
        let mut req = ec2
            .run_instances()
            .image_id(l.ami)
            .instance_type(InstanceType::from(l.instance_type))
            .min_count(n)
            .max_count(n)
            .client_token(format!("{}-{i}", l.deploy_id))
            .set_subnet_id(subnet.clone())
            .set_security_group_ids(if l.security_groups.is_empty() {
                None
            } else {
                Some(l.security_groups.to_vec())
            })
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .tag_specifications(tag_spec(ResourceType::Instance, &tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &tags));
        if let Some(u) = l.user_data {
            req = req.user_data(base64::engine::general_purpose::STANDARD.encode(u));
        }
        if let Some(profile) = l.instance_profile {
            req = req.iam_instance_profile(crate::aws::instance_profile(profile));
        }
        let out = req.send().await.map_err(aws_error).with_context(|| {
            format!(
                "booting {n} {} from {} in subnet {} (check the instance type, subnets, security groups and instance profile; \
                 the deployer needs ec2:RunInstances, ec2:CreateTags and iam:PassRole on the profile's role)",
                l.instance_type,
                l.ami,
                subnet.as_deref().unwrap_or("default"),
            )
        })?;
        let got: Vec<String> = out
            .instances()
            .iter()
            .filter_map(|i| i.instance_id())
            .map(str::to_string)
            .collect();
        tracing::info!(
            "booted {} in subnet {}",
            got.join(" "),
            subnet.as_deref().unwrap_or("default")
        );
        ids.extend(got);
    }
    Ok(ids)
}

/// Waits until every instance runs; fails at once when one stops or terminates.
pub async fn wait_running(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
    timeout: Duration,
    opts: &DeployOptions,
) -> Result<Vec<Instance>> {
    opts.wait(format!("{} to be running", ids.join(" ")), timeout)
        .hint("raise [timeouts] running, or look at the instances in the EC2 console")
        .until(|| async {
            let out = match ec2
                .describe_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await
            {
                Ok(o) => o,
                // Just booted and not visible yet: EC2 is eventually consistent.
                Err(e) if aws_code(&e) == Some("InvalidInstanceID.NotFound") => {
                    return Ok(Check::Waiting("not visible yet".into()))
                }
                Err(e) if is_throttling(aws_code(&e)) => {
                    return Ok(Check::Waiting("throttled".into()))
                }
                Err(e) => return Err(aws_error(e)).context("describing the new instances"),
            };
            let seen: Vec<Instance> = out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(from_sdk)
                .collect();
            judge_running(ids, &seen)
        })
        .await
}

fn judge_running(ids: &[String], seen: &[Instance]) -> Result<Check<Vec<Instance>>> {
    let mut waiting = Vec::new();
    let mut ready = Vec::new();
    for id in ids {
        match seen.iter().find(|i| &i.id == id) {
            None => waiting.push(format!("{id} not visible yet")),
            Some(i) if i.state == InstanceStateName::Running.as_str() => ready.push(i.clone()),
            Some(i) if ["pending", ""].contains(&i.state.as_str()) => {
                waiting.push(format!("{id} {}", i.state))
            }
            Some(i) => {
                return Ok(Check::Failed(format!(
                    "instance {id} is {} (look at its state reason and console output)",
                    i.state
                )))
            }
        }
    }
    Ok(if waiting.is_empty() {
        Check::Ready(ready)
    } else {
        Check::Waiting(format!(
            "{} of {} running; {}",
            ready.len(),
            ids.len(),
            waiting.join(", ")
        ))
    })
}

/// Waits until the health URL answers 200 for every instance, checked from where the builder runs.
pub async fn wait_health_url(
    instances: &[Instance],
    template: &str,
    timeout: Duration,
    opts: &DeployOptions,
) -> Result<()> {
    let urls: Vec<(String, String)> = instances
        .iter()
        .map(|i| {
            (
                i.id.clone(),
                super::config::render_health_url(template, &i.private_ip, &i.public_ip),
            )
        })
        .collect();
    let ready = std::sync::Mutex::new(BTreeSet::new());
    opts.wait(format!("the health URL {template} to answer 200"), timeout)
        .hint("is the URL reachable from where the builder runs (security groups, {public_ip} vs {ip})? Raise [timeouts] ready if the service starts slowly")
        .until(|| async {
            let mut last = Vec::new();
            for (id, url) in &urls {
                if ready.lock().map(|r| r.contains(id)).unwrap_or(false) {
                    continue;
                }
                let u = url.clone();
                // The status code, or why there was none.
                let r: std::result::Result<u16, String> = tokio::task::spawn_blocking(move || {
                    match ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(5))
                        .build()
                        .get(&u)
                        .call()
                    {
                        Ok(resp) => Ok(resp.status()),
                        Err(ureq::Error::Status(code, _)) => Ok(code),
                        Err(e) => Err(e.to_string()),
                    }
                })
                .await
                .context("the health check task")?;
                match r {
                    Ok(200) => {
                        if let Ok(mut r) = ready.lock() {
                            r.insert(id.clone());
                        }
                        tracing::info!("{id}: {url} answers 200");
                    }
                    Ok(code) => last.push(format!("{id}: {url} answered {code}")),
                    Err(e) => last.push(format!("{id}: {e}")),
                }
            }
            Ok(Check::unless_waiting(last))
        })
        .await
}

/// Waits until EC2's instance and system status checks pass for every instance.
pub async fn wait_status_checks(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
    timeout: Duration,
    opts: &DeployOptions,
) -> Result<()> {
    opts.wait(
        format!("the status checks of {} to pass", ids.join(" ")),
        timeout,
    )
    .hint("raise [timeouts] ready; the instance's console output says why it does not come up")
    .until(|| async {
        let out = match ec2
            .describe_instance_status()
            .set_instance_ids(Some(ids.to_vec()))
            .include_all_instances(true)
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if is_throttling(aws_code(&e)) => return Ok(Check::Waiting("throttled".into())),
            Err(e) => {
                return Err(aws_error(e))
                    .context("reading the status checks (needs ec2:DescribeInstanceStatus)")
            }
        };
        let mut waiting = Vec::new();
        for id in ids {
            let s = out
                .instance_statuses()
                .iter()
                .find(|s| s.instance_id() == Some(id));
            let summary = |x: Option<&aws_sdk_ec2::types::InstanceStatusSummary>| {
                x.and_then(|x| x.status())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "unknown".into())
            };
            let (inst, sys) = match s {
                Some(s) => (summary(s.instance_status()), summary(s.system_status())),
                None => ("unknown".into(), "unknown".into()),
            };
            if inst == "impaired" || sys == "impaired" {
                return Ok(Check::Failed(format!(
                    "{id}: status checks impaired (instance {inst}, system {sys})"
                )));
            }
            if inst != "ok" || sys != "ok" {
                waiting.push(format!("{id}: instance {inst}, system {sys}"));
            }
        }
        Ok(Check::unless_waiting(waiting))
    })
    .await
}

/// The agent's last result on a console text (`stackless-init-result: {json}`), if it printed one.
pub fn agent_result(console: &str) -> Option<Result<AgentResult, String>> {
    console
        .lines()
        .rev()
        .find_map(|l| console::parse_result(&console::clean(l)))
}

/// The console output of one instance, decoded; None when there is none yet (or it is not
/// visible yet). `latest` asks for the newest output (Nitro instances); where EC2 refuses it, the
/// caller asks without it.
async fn console_text(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    latest: &AtomicBool,
) -> Result<std::result::Result<String, String>> {
    let ask_latest = latest.load(Ordering::Relaxed);
    let out = match ec2
        .get_console_output()
        .instance_id(id)
        .set_latest(ask_latest.then_some(true))
        .send()
        .await
    {
        Ok(o) => o,
        Err(e) if aws_code(&e) == Some("InvalidInstanceID.NotFound") => {
            return Ok(Err("not visible yet".into()))
        }
        Err(e) if is_throttling(aws_code(&e)) => return Ok(Err("throttled".into())),
        Err(e)
            if ask_latest
                && matches!(
                    aws_code(&e),
                    Some(
                        "UnsupportedOperation"
                            | "InvalidParameterCombination"
                            | "InvalidParameterValue"
                    )
                ) =>
        {
            // Not a Nitro instance: only the buffered output (updated every few minutes).
            latest.store(false, Ordering::Relaxed);
            return Ok(Err("asking for the buffered console output".into()));
        }
        Err(e) => {
            return Err(aws_error(e)).with_context(|| {
                format!("reading the console output of {id} (needs ec2:GetConsoleOutput)")
            })
        }
    };
    let Some(b64) = out.output().filter(|o| !o.is_empty()) else {
        return Ok(Err("no console output yet".into()));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .with_context(|| format!("the console output of {id} is not base64"))?;
    Ok(Ok(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Waits until the agent (`stackless-init boot`) reports `ready` on every instance's console.
/// `failed` or `degraded` fails at once with the instance and the agent's error.
pub async fn wait_agent(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
    timeout: Duration,
    opts: &DeployOptions,
) -> Result<()> {
    let ready = std::sync::Mutex::new(BTreeSet::new());
    let latest = AtomicBool::new(true);
    opts.wait(format!("the agent on {} to report ready", ids.join(" ")), timeout)
        .hint("raise [timeouts] ready; `aws ec2 get-console-output --latest --instance-id ID` shows how the boot goes (an image without stackless-init never reports: use ready = \"status-checks\" or \"none\")")
        .until(|| async {
            let mut waiting = Vec::new();
            for id in ids {
                if ready.lock().map(|r| r.contains(id)).unwrap_or(false) {
                    continue;
                }
                let text = match console_text(ec2, id, &latest).await? {
                    Ok(t) => t,
                    Err(why) => {
                        waiting.push(format!("{id}: {why}"));
                        continue;
                    }
                };
                match agent_result(&text) {
                    None => waiting.push(format!("{id}: no stackless-init result on the console yet")),
                    // A line cut short by the console snapshot: look again.
                    Some(Err(e)) => waiting.push(format!("{id}: {e}")),
                    Some(Ok(r)) => match r.outcome.as_str() {
                        "ready" => {
                            if let Ok(mut r) = ready.lock() {
                                r.insert(id.clone());
                            }
                            tracing::info!("{id}: the agent reports ready");
                        }
                        "failed" | "degraded" => {
                            return Ok(Check::Failed(format!(
                                "instance {id}: the agent reported {}: {} (its console output has the whole boot report)",
                                r.outcome,
                                r.error.as_deref().unwrap_or("no error given")
                            )))
                        }
                        other => waiting.push(format!("{id}: the agent reports {other}")),
                    },
                }
            }
            Ok(Check::unless_waiting(waiting))
        })
        .await
}

/// Terminates the instances and waits until they are gone.
pub async fn terminate(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
    timeout: Duration,
    opts: &DeployOptions,
) -> Result<()> {
    let wait = opts
        .wait(format!("{} to terminate", ids.join(" ")), timeout)
        .hint("raise [timeouts] terminate; the instances are terminating and will go on their own");
    crate::aws::instances::terminate(ec2, ids, wait).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_agent_result_on_the_console_counts() {
        let text = "boot\r\nstackless-init-result: {\"outcome\":\"failed\",\"error\":\"x\"}\r\n\
                    reboot\n\u{1b}[0mstackless-init-result: {\"outcome\":\"ready\"}\r\nlogin:";
        assert_eq!(agent_result(text).unwrap().unwrap().outcome, "ready");
        assert!(agent_result("no agent here\n").is_none());
    }

    #[test]
    fn instances_spread_evenly_over_subnets() {
        assert_eq!(spread(5, 2), [3, 2]);
        assert_eq!(spread(1, 3), [1]);
        assert_eq!(spread(4, 0), [4]);
        assert_eq!(spread(6, 3), [2, 2, 2]);
    }

    fn inst(id: &str, state: &str) -> Instance {
        Instance {
            id: id.into(),
            state: state.into(),
            private_ip: String::new(),
            public_ip: String::new(),
            deploy_id: String::new(),
            image: String::new(),
        }
    }

    #[test]
    fn running_waits_fail_on_a_stopped_or_terminated_instance() {
        let ids = vec!["i-1".to_string(), "i-2".to_string()];
        assert!(matches!(
            judge_running(&ids, &[inst("i-1", "running"), inst("i-2", "running")]).unwrap(),
            Check::Ready(v) if v.len() == 2
        ));
        assert!(matches!(
            judge_running(&ids, &[inst("i-1", "running")]).unwrap(),
            Check::Waiting(s) if s.contains("i-2 not visible")
        ));
        assert!(matches!(
            judge_running(&ids, &[inst("i-1", "running"), inst("i-2", "terminated")]).unwrap(),
            Check::Failed(s) if s.contains("i-2 is terminated")
        ));
    }
}
