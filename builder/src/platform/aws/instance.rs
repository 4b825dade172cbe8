//! The seed instance: launched locked down (IMDSv2 only, no inbound rules, an instance profile for
//! SSM) and on a lease: its user-data powers it off after `lease_minutes`, and an instance-initiated
//! shutdown terminates it, so even a builder killed with SIGKILL cannot leave it running.

use super::source::SourceImage;
use crate::aws::waiter::{Check, Wait};
use crate::aws::{aws_error, tag_filter, tag_spec};
use crate::definition::ImageDef;
use crate::platform::Build;
use anyhow::{Context, Result};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, InstanceType, ResourceType,
    ShutdownBehavior, VolumeType,
};
use base64::Engine;
use std::collections::BTreeMap;
use std::time::Duration;

/// The user-data lease: cloud-init runs it at first boot and the machine powers itself off after
/// `minutes`, which (with `InstanceInitiatedShutdownBehavior=terminate`) terminates it. The seed's
/// user-data (`render::Rendered::seed_user_data`) starts with it.
pub fn lease_user_data(minutes: i64) -> String {
    format!("#!/bin/sh\nshutdown -h +{minutes}\n")
}

/// Launches the seed; returns its id as soon as EC2 has accepted it. `ClientToken` is the build
/// id, so a retried call cannot start a second seed.
pub async fn launch(
    ec2: &aws_sdk_ec2::Client,
    def: &ImageDef,
    build: &Build,
    source: &SourceImage,
    security_group: &str,
    tags: &BTreeMap<String, String>,
) -> Result<String> {
    if !build
        .seed_user_data
        .starts_with(&lease_user_data(def.lease_minutes))
    {
        anyhow::bail!(
            "internal: build {} carries no seed user-data starting with the lease",
            build.id
        );
    }
    let user_data = base64::engine::general_purpose::STANDARD.encode(&build.seed_user_data);
    let volume_size = i32::try_from(def.volume_size).context("volume_size does not fit")?;
    let mut req = ec2
        .run_instances()
        .image_id(&source.image_id)
        .instance_type(InstanceType::from(def.instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .client_token(&build.id)
        .security_group_ids(security_group)
        .set_subnet_id(def.subnet.clone())
        .user_data(user_data)
        .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .build(),
        )
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(&source.root_device_name)
                .ebs(
                    EbsBlockDevice::builder()
                        .volume_size(volume_size)
                        .volume_type(VolumeType::from(def.volume_type.as_str()))
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .tag_specifications(tag_spec(ResourceType::Instance, tags))
        .tag_specifications(tag_spec(ResourceType::Volume, tags));
    if let Some(profile) = &def.instance_profile {
        req = req.iam_instance_profile(crate::aws::instance_profile(profile));
    }
    let out = req.send().await.map_err(aws_error).with_context(|| {
        format!(
            "launching the seed instance ({} from {} {}, subnet {}, instance profile {}): check [instance] type, subnet and \
             instance_profile; the builder needs ec2:RunInstances, ec2:CreateTags and iam:PassRole on the profile's role",
            def.instance_type,
            source.image_id,
            source.name,
            def.subnet.as_deref().unwrap_or("default"),
            def.instance_profile.as_deref().unwrap_or("none"),
        )
    })?;
    let id = out
        .instances()
        .first()
        .and_then(|i| i.instance_id())
        .context("RunInstances returned no instance")?
        .to_string();
    tracing::info!(
        "launched seed instance {id} ({} from {})",
        def.instance_type,
        source.image_id
    );
    Ok(id)
}

/// What a wait for an instance state makes of the state it sees.
fn judge(
    want: &InstanceStateName,
    state: &InstanceStateName,
    reason: &str,
    lease_minutes: Option<i64>,
) -> Check<()> {
    use InstanceStateName as S;
    if state == want {
        return Check::Ready(());
    }
    let dead = matches!(state, S::ShuttingDown | S::Terminated);
    let terminal = match want {
        S::Running => dead || matches!(state, S::Stopping | S::Stopped),
        S::Stopped => dead,
        _ => false,
    };
    if !terminal {
        return Check::Waiting(state.as_str().to_string());
    }
    let mut why = format!("the instance is {}", state.as_str());
    if !reason.is_empty() {
        why.push_str(&format!(" ({reason})"));
    }
    if reason.contains("InstanceInitiatedShutdown") {
        if let Some(m) = lease_minutes {
            why.push_str(&format!(
                "; it powered itself off: its lease of {m} minutes ([instance] lease_minutes) ran out, or a command shut it down"
            ));
        }
    }
    Check::Failed(why)
}

/// Waits until the instance is in `want`, failing at once on a state it cannot come back from.
pub async fn wait_state(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    want: InstanceStateName,
    timeout: Duration,
    progress: bool,
    lease_minutes: Option<i64>,
) -> Result<()> {
    let want_terminated = want == InstanceStateName::Terminated;
    Wait::new(format!("instance {id} to be {}", want.as_str()), timeout)
        .interval(Duration::from_secs(2), Duration::from_secs(15))
        .progress(progress)
        .hint("raise the wait limit, or look at the instance in the EC2 console")
        .until(|| async {
            match ec2.describe_instances().instance_ids(id).send().await {
                Ok(out) => {
                    let inst = out.reservations().iter().flat_map(|r| r.instances()).next();
                    let Some(inst) = inst else {
                        return Ok(if want_terminated {
                            Check::Ready(())
                        } else {
                            Check::Waiting("not visible yet".into())
                        });
                    };
                    let state = inst
                        .state()
                        .and_then(|s| s.name())
                        .cloned()
                        .unwrap_or(InstanceStateName::Pending);
                    let reason = inst.state_reason().and_then(|r| r.message()).unwrap_or("");
                    Ok(judge(&want, &state, reason, lease_minutes))
                }
                // Just launched and not yet visible (EC2 is eventually consistent), or long gone.
                Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => {
                    Ok(if want_terminated {
                        Check::Ready(())
                    } else {
                        Check::Waiting("not visible yet".into())
                    })
                }
                Err(e) => Err(aws_error(e)).with_context(|| format!("describing instance {id}")),
            }
        })
        .await
}

/// Stops the instance (the API stop stops; only a shutdown from inside terminates) and waits.
pub async fn stop(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    timeout: Duration,
    progress: bool,
    lease_minutes: i64,
) -> Result<()> {
    ec2.stop_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("stopping seed instance {id} (needs ec2:StopInstances)"))?;
    wait_state(
        ec2,
        id,
        InstanceStateName::Stopped,
        timeout,
        progress,
        Some(lease_minutes),
    )
    .await
}

/// Terminates the instances and waits until they are gone. Instances already gone are fine.
pub async fn terminate(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
    timeout: Duration,
    progress: bool,
) -> Result<()> {
    let wait = Wait::new(format!("instances {} to terminate", ids.join(" ")), timeout)
        .interval(Duration::from_secs(2), Duration::from_secs(15))
        .progress(progress)
        .hint("raise the wait limit, or look at the instances in the EC2 console");
    crate::aws::instances::terminate(ec2, ids, wait).await?;
    for id in ids {
        tracing::info!("terminated instance {id}");
    }
    Ok(())
}

/// Instances tagged with this build that are not terminated yet, whatever the builder recorded:
/// a RunInstances cancelled half-way may have started one whose id it never saw.
pub async fn find_by_build(ec2: &aws_sdk_ec2::Client, build_id: &str) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut pages = ec2
        .describe_instances()
        .filters(tag_filter(super::tags::BUILD_ID, build_id))
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    ["pending", "running", "shutting-down", "stopping", "stopped"]
                        .map(String::from)
                        .to_vec(),
                ))
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let out = page.map_err(aws_error).with_context(|| {
            format!(
                "looking for instances tagged {}={build_id}",
                super::tags::BUILD_ID
            )
        })?;
        for r in out.reservations() {
            for i in r.instances() {
                if let Some(id) = i.instance_id() {
                    ids.push(id.to_string());
                }
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceStateName as S;

    #[test]
    fn the_lease_powers_off_after_n_minutes() {
        assert_eq!(lease_user_data(120), "#!/bin/sh\nshutdown -h +120\n");
    }

    #[test]
    fn waits_fail_fast_on_states_with_no_way_back() {
        assert_eq!(judge(&S::Running, &S::Running, "", None), Check::Ready(()));
        assert_eq!(
            judge(&S::Running, &S::Pending, "", None),
            Check::Waiting("pending".into())
        );
        assert!(
            matches!(judge(&S::Running, &S::Terminated, "Server.InternalError", None), Check::Failed(m) if m.contains("Server.InternalError"))
        );
        assert!(matches!(
            judge(&S::Running, &S::Stopped, "", None),
            Check::Failed(_)
        ));
        assert_eq!(
            judge(&S::Stopped, &S::Stopping, "", None),
            Check::Waiting("stopping".into())
        );
        assert_eq!(
            judge(&S::Stopped, &S::Running, "", None),
            Check::Waiting("running".into())
        );
        let lease = judge(
            &S::Stopped,
            &S::ShuttingDown,
            "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
            Some(90),
        );
        assert!(matches!(lease, Check::Failed(m) if m.contains("lease of 90 minutes")));
        assert_eq!(
            judge(&S::Terminated, &S::ShuttingDown, "", None),
            Check::Waiting("shutting-down".into())
        );
        assert_eq!(
            judge(&S::Terminated, &S::Terminated, "", None),
            Check::Ready(())
        );
    }
}
