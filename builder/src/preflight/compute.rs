//! The image and the machine: the source image resolves, its architecture fits the instance
//! type, the type is offered in the subnet's zone, and the KMS key.

use super::{Check, Clients};
use crate::aws::{describe_error, error_code};
use crate::definition::{self, Source};
use crate::deploy::config::ImageRef;
use crate::platform::aws::source::{self, SourceImage};
use aws_sdk_ec2::types::{Filter, InstanceType, LocationType};
use std::path::Path;

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// The bake's source image (reusing the bake's own resolution).
pub async fn source(
    ec2: &aws_sdk_ec2::Client,
    ssm: &aws_sdk_ssm::Client,
    src: &Source,
) -> (Check, Option<SourceImage>) {
    const NAME: &str = "source image";
    match source::resolve(ec2, ssm, src).await {
        Ok(s) => (
            Check::passed(
                NAME,
                format!("{} ({}, {})", s.image_id, s.name, s.architecture),
            ),
            Some(s),
        ),
        Err(e) => (
            Check::failed(
                NAME,
                first_line(&e),
                "fix [source] (ami, owner/name/architecture, or ssm_parameter) for this region",
            ),
            None,
        ),
    }
}

/// The image a deploy boots.
pub async fn deploy_image(
    c: &Clients,
    image: &ImageRef,
    images_dir: &Path,
) -> (Check, Option<SourceImage>) {
    const NAME: &str = "image";
    let src = match image {
        ImageRef::Ami(a) => Source::Ami(a.clone()),
        ImageRef::Parameter(p) => Source::Parameter(p.clone()),
        ImageRef::Definition(name) => match definition::load(images_dir, name) {
            Ok(def) => match def.ssm_parameter {
                Some(p) => Source::Parameter(p),
                None => {
                    return (
                        Check::failed(
                            NAME,
                            format!("image {name} has no [publish] ssm_parameter"),
                            "give the deploy --ami or --ssm-parameter, or publish the image to a parameter",
                        ),
                        None,
                    )
                }
            },
            Err(e) => {
                return (
                    Check::failed(
                        NAME,
                        format!("image {name}: {e}"),
                        "fix the image definition",
                    ),
                    None,
                )
            }
        },
    };
    let (check, found) = source(&c.ec2, &c.ssm, &src).await;
    let check = super::Check {
        name: NAME.into(),
        fix: check
            .fix
            .map(|_| "check the deploy's image (--image, --ami, --ssm-parameter)".to_string()),
        ..check
    };
    (check, found)
}

/// The instance type exists and runs the image's architecture.
pub async fn architecture(
    ec2: &aws_sdk_ec2::Client,
    instance_type: &str,
    image: Option<&SourceImage>,
) -> Check {
    const NAME: &str = "instance type";
    let out = match ec2
        .describe_instance_types()
        .instance_types(InstanceType::from(instance_type))
        .send()
        .await
    {
        Ok(o) => o,
        Err(e) if error_code(&e).is_some_and(|c| c.starts_with("InvalidInstanceType")) => {
            return Check::failed(
                NAME,
                format!("{instance_type} is not an instance type in this region"),
                "set a valid instance type ([instance] type, or --instance-type)",
            )
        }
        Err(e) => {
            return Check::unchecked(
                NAME,
                format!("ec2:DescribeInstanceTypes failed: {}", describe_error(&e)),
            )
        }
    };
    let Some(info) = out.instance_types().first() else {
        return Check::failed(
            NAME,
            format!("{instance_type} is not an instance type in this region"),
            "set a valid instance type ([instance] type, or --instance-type)",
        );
    };
    let archs: Vec<String> = info
        .processor_info()
        .map(|p| {
            p.supported_architectures()
                .iter()
                .map(|a| a.as_str().to_string())
                .collect()
        })
        .unwrap_or_default();
    let Some(image) = image else {
        return Check::unchecked(
            NAME,
            format!(
                "{instance_type} ({}); the image's architecture is unknown (it did not resolve)",
                archs.join(", ")
            ),
        );
    };
    if archs.is_empty() || archs.iter().any(|a| a == &image.architecture) {
        Check::passed(
            NAME,
            format!(
                "{instance_type} runs {} ({})",
                image.architecture, image.image_id
            ),
        )
    } else {
        Check::failed(
            NAME,
            format!(
                "{instance_type} runs {}, the image {} is {}",
                archs.join(", "),
                image.image_id,
                image.architecture
            ),
            format!(
                "pick a {} instance type (like {}), or an image of the type's architecture",
                image.architecture,
                if image.architecture == "arm64" {
                    "t4g.small"
                } else {
                    "t3.small"
                }
            ),
        )
    }
}

/// The instance type is offered in each zone.
pub async fn offered(ec2: &aws_sdk_ec2::Client, instance_type: &str, zones: &[String]) -> Check {
    const NAME: &str = "instance type offered";
    let mut zones = zones.to_vec();
    zones.sort();
    zones.dedup();
    let mut pages = ec2
        .describe_instance_type_offerings()
        .location_type(LocationType::AvailabilityZone)
        .filters(
            Filter::builder()
                .name("instance-type")
                .values(instance_type)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("location")
                .set_values(Some(zones.clone()))
                .build(),
        )
        .into_paginator()
        .send();
    let mut offered = Vec::new();
    while let Some(page) = pages.next().await {
        match page {
            Ok(p) => offered.extend(
                p.instance_type_offerings()
                    .iter()
                    .filter(|o| o.instance_type().map(|t| t.as_str()) == Some(instance_type))
                    .filter_map(|o| o.location().map(str::to_string)),
            ),
            Err(e) => {
                return Check::unchecked(
                    NAME,
                    format!(
                        "ec2:DescribeInstanceTypeOfferings failed: {}",
                        describe_error(&e)
                    ),
                )
            }
        }
    }
    let missing: Vec<&String> = zones.iter().filter(|z| !offered.contains(z)).collect();
    if missing.is_empty() {
        Check::passed(NAME, format!("{instance_type} in {}", zones.join(", ")))
    } else {
        Check::failed(
            NAME,
            format!(
                "{instance_type} is not offered in {}",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("pick another instance type, or a subnet in a zone that offers it (aws ec2 describe-instance-type-offerings --location-type availability-zone --filters Name=instance-type,Values={instance_type})"),
        )
    }
}

/// The KMS key: the builder links no KMS client (one more SDK crate for one call), so it is
/// left to the IAM simulation of the kms: actions.
pub fn kms_key(key: &str) -> Check {
    Check::unchecked(
        "KMS key",
        format!("{key}: not described (the builder links no KMS client); the kms: actions are in the IAM simulation above, and the key policy is not"),
    )
}
