//! The seed's temporary security group: no inbound rules at all (SSM needs none: the agent calls
//! out), the default allow-all egress so the agent reaches SSM, tagged with the build so `gc`
//! finds it if the builder dies.

use super::tags;
use crate::aws::waiter::{Check, Wait};
use crate::aws::{aws_error, tag_filter, tag_spec};
use anyhow::{bail, Context, Result};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, ResourceType};
use std::collections::BTreeMap;
use std::time::Duration;

/// The VPC the seed runs in: the subnet's, or the region's default VPC.
pub async fn vpc_for(ec2: &aws_sdk_ec2::Client, subnet: Option<&str>) -> Result<String> {
    if let Some(subnet) = subnet {
        let out = ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| format!("looking up subnet {subnet} ([instance] subnet)"))?;
        return out
            .subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_string)
            .with_context(|| {
                format!("subnet {subnet} ([instance] subnet) was not found in this region")
            });
    }
    let out = ec2
        .describe_vpcs()
        .filters(Filter::builder().name("isDefault").values("true").build())
        .send()
        .await
        .map_err(aws_error)
        .context("looking for the default VPC")?;
    match out.vpcs().first().and_then(|v| v.vpc_id()) {
        Some(v) => Ok(v.to_string()),
        None => bail!("this region has no default VPC: set [instance] subnet in the definition to a subnet that reaches SSM"),
    }
}

/// Creates the group with `tags` and no inbound rules; returns its id.
pub async fn create(
    ec2: &aws_sdk_ec2::Client,
    vpc_id: &str,
    build_id: &str,
    tags: &BTreeMap<String, String>,
) -> Result<String> {
    let name = format!("stackless-build-{build_id}");
    let out = ec2
        .create_security_group()
        .group_name(&name)
        .description(format!("stackless builder, temporary, build {build_id}: no inbound rules"))
        .vpc_id(vpc_id)
        .tag_specifications(tag_spec(ResourceType::SecurityGroup, tags))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("creating the temporary security group {name} in {vpc_id} (needs ec2:CreateSecurityGroup and ec2:CreateTags)"))?;
    let id = out
        .group_id()
        .context("CreateSecurityGroup returned no group id")?
        .to_string();
    tracing::info!("created temporary security group {id} ({name}) in {vpc_id}");
    Ok(id)
}

/// The groups tagged with this build.
pub async fn find_by_build(ec2: &aws_sdk_ec2::Client, build_id: &str) -> Result<Vec<String>> {
    let out = ec2
        .describe_security_groups()
        .filters(tag_filter(tags::BUILD_ID, build_id))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| {
            format!(
                "looking for security groups tagged {}={build_id}",
                tags::BUILD_ID
            )
        })?;
    Ok(out
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id())
        .map(str::to_string)
        .collect())
}

/// Deletes the group. A group still attached to an instance that is shutting down cannot be
/// deleted yet (`DependencyViolation`): that is retried until `timeout`. A group already gone is
/// fine.
pub async fn delete(
    ec2: &aws_sdk_ec2::Client,
    group_id: &str,
    timeout: Duration,
    progress: bool,
) -> Result<()> {
    Wait::new(format!("security group {group_id} to be deleted"), timeout)
        .interval(Duration::from_secs(2), Duration::from_secs(10))
        .progress(progress)
        .hint(format!("an instance still uses it; delete it later with `aws ec2 delete-security-group --group-id {group_id}`"))
        .until(|| async {
            match ec2.delete_security_group().group_id(group_id).send().await {
                Ok(_) => Ok(Check::Ready(())),
                Err(e) => match e.code() {
                    Some("InvalidGroup.NotFound") => Ok(Check::Ready(())),
                    Some("DependencyViolation") => Ok(Check::Waiting("still in use".into())),
                    _ => Err(aws_error(e)).with_context(|| format!("deleting security group {group_id}")),
                },
            }
        })
        .await?;
    tracing::info!("deleted security group {group_id}");
    Ok(())
}
