//! Terminating instances, for the bake's cleanup, `builder gc`, a deploy's step 5 and its
//! rollback alike. EC2 refuses the whole TerminateInstances call when any one id is unknown to it
//! (`InvalidInstanceID.NotFound`: long gone, or just launched and not visible yet), so the ids
//! it names are dropped and the call made again with the rest; an instance EC2 cannot see is
//! counted as gone.

use super::{aws_error, error_code, is_throttling};
use crate::aws::waiter::{Check, Wait};
use anyhow::{Context, Result};
use aws_sdk_ec2::types::InstanceStateName;

const NOT_FOUND: &str = "InvalidInstanceID.NotFound";

/// The instance ids an `InvalidInstanceID.NotFound` message names: "The instance ID 'i-1' does
/// not exist", "The instance IDs 'i-1, i-2' do not exist".
pub fn ids_not_found(message: &str) -> Vec<String> {
    let Some(start) = message.find('\'') else {
        return Vec::new();
    };
    let rest = &message[start + 1..];
    let Some(end) = rest.find('\'') else {
        return Vec::new();
    };
    rest[..end]
        .split(',')
        .map(str::trim)
        .filter(|id| id.starts_with("i-"))
        .map(str::to_string)
        .collect()
}

/// Asks EC2 to terminate `ids`, leaving out any it says do not exist. Returns those it accepted.
pub async fn request_termination(ec2: &aws_sdk_ec2::Client, ids: &[String]) -> Result<Vec<String>> {
    let mut left: Vec<String> = ids.to_vec();
    while !left.is_empty() {
        match ec2
            .terminate_instances()
            .set_instance_ids(Some(left.clone()))
            .send()
            .await
        {
            Ok(_) => return Ok(left),
            Err(e) if error_code(&e) == Some(NOT_FOUND) => {
                let gone = ids_not_found(
                    aws_sdk_ec2::error::ProvideErrorMetadata::message(&e).unwrap_or(""),
                );
                let before = left.len();
                left.retain(|id| !gone.contains(id));
                if left.len() == before {
                    // A message this code cannot read: one id at a time, each judged alone.
                    let mut accepted = Vec::new();
                    for id in &left {
                        match ec2.terminate_instances().instance_ids(id).send().await {
                            Ok(_) => accepted.push(id.clone()),
                            Err(e) if error_code(&e) == Some(NOT_FOUND) => {}
                            Err(e) => {
                                return Err(aws_error(e)).with_context(|| {
                                    format!("terminating {id} (needs ec2:TerminateInstances)")
                                })
                            }
                        }
                    }
                    return Ok(accepted);
                }
                tracing::debug!("EC2 does not know {}; terminating the rest", gone.join(" "));
            }
            Err(e) => {
                return Err(aws_error(e)).with_context(|| {
                    format!(
                        "terminating {} (needs ec2:TerminateInstances)",
                        left.join(" ")
                    )
                })
            }
        }
    }
    Ok(left)
}

/// Terminates the instances and waits, as `wait` says, until every one is terminated or gone.
pub async fn terminate(ec2: &aws_sdk_ec2::Client, ids: &[String], wait: Wait) -> Result<()> {
    let accepted = request_termination(ec2, ids).await?;
    if accepted.is_empty() {
        return Ok(());
    }
    wait.until(|| async {
        let out = match ec2
            .describe_instances()
            .set_instance_ids(Some(accepted.clone()))
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if error_code(&e) == Some(NOT_FOUND) => return Ok(Check::Ready(())),
            Err(e) if is_throttling(error_code(&e)) => {
                return Ok(Check::Waiting("throttled".into()))
            }
            Err(e) => return Err(aws_error(e)).context("describing terminating instances"),
        };
        let left: Vec<String> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| {
                let state = i.state().and_then(|s| s.name())?;
                (*state != InstanceStateName::Terminated)
                    .then(|| format!("{} {}", i.instance_id().unwrap_or("?"), state.as_str()))
            })
            .collect();
        Ok(Check::unless_waiting(left))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use testkit::Moto;

    #[test]
    fn the_ids_ec2_does_not_know_are_read_from_its_message() {
        assert_eq!(
            ids_not_found("The instance ID 'i-0abc' does not exist"),
            ["i-0abc"]
        );
        assert_eq!(
            ids_not_found("The instance IDs 'i-1, i-2' do not exist"),
            ["i-1", "i-2"]
        );
        assert!(ids_not_found("something else").is_empty());
    }

    #[tokio::test]
    async fn one_unknown_id_among_several_does_not_stop_the_others() {
        let moto = Moto::start();
        let config = moto.sdk_config().await;
        let ec2 = aws_sdk_ec2::Client::new(&config);
        let w = testkit::DeployWorld::create(&config).await;
        let out = ec2
            .run_instances()
            .image_id(&w.amis[0])
            .min_count(2)
            .max_count(2)
            .send()
            .await
            .unwrap();
        let mut ids: Vec<String> = out
            .instances()
            .iter()
            .filter_map(|i| i.instance_id())
            .map(str::to_string)
            .collect();
        ids.insert(1, "i-0123456789abcdef0".into());
        let wait = Wait::new("test instances to terminate", Duration::from_secs(20))
            .interval(Duration::from_millis(20), Duration::from_millis(100))
            .progress(false);
        terminate(&ec2, &ids, wait).await.unwrap();
        let states: Vec<String> = ec2
            .describe_instances()
            .instance_ids(&ids[0])
            .instance_ids(&ids[2])
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| {
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string())
            })
            .collect();
        assert_eq!(states, ["terminated", "terminated"]);
    }
}
