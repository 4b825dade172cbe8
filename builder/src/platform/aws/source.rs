//! The source AMI: given by id, found by owner plus name pattern (the newest wins), or read from an
//! SSM parameter such as the public ones Debian, Canonical and Amazon publish.

use crate::aws::aws_error;
use crate::definition::Source;
use anyhow::{bail, Context, Result};
use aws_sdk_ec2::types::{Filter, Image, ImageState};

/// The resolved source image, with what launching from it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceImage {
    pub image_id: String,
    pub name: String,
    /// Where the root volume attaches (`/dev/xvda`); the launch sizes the volume there.
    pub root_device_name: String,
    pub architecture: String,
    pub creation_date: String,
    pub owner_id: String,
}

impl SourceImage {
    fn from_image(i: &Image) -> Self {
        SourceImage {
            image_id: i.image_id().unwrap_or_default().to_string(),
            name: i.name().unwrap_or_default().to_string(),
            root_device_name: i.root_device_name().unwrap_or("/dev/xvda").to_string(),
            architecture: i
                .architecture()
                .map(|a| a.as_str().to_string())
                .unwrap_or_default(),
            creation_date: i.creation_date().unwrap_or_default().to_string(),
            owner_id: i.owner_id().unwrap_or_default().to_string(),
        }
    }
}

/// Resolves the definition's source in the client's region.
pub async fn resolve(
    ec2: &aws_sdk_ec2::Client,
    ssm: &aws_sdk_ssm::Client,
    source: &Source,
) -> Result<SourceImage> {
    let region = ec2
        .config()
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "the configured region".into());
    match source {
        Source::Ami(id) => describe(ec2, id).await,
        Source::Parameter(name) => {
            let out = ssm.get_parameter().name(name).send().await.map_err(aws_error).with_context(|| {
                format!("reading the source SSM parameter {name} in {region} (does it exist there, and may this role ssm:GetParameter it?)")
            })?;
            let value = out
                .parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .trim()
                .to_string();
            if !value.starts_with("ami-") {
                bail!("SSM parameter {name} in {region} holds `{value}`, not an AMI id: [source] ssm_parameter must name an image parameter");
            }
            describe(ec2, &value)
                .await
                .with_context(|| format!("SSM parameter {name} points at {value}"))
        }
        Source::Search {
            owner,
            name,
            architecture,
        } => {
            let mut images = Vec::new();
            let mut pages = ec2
                .describe_images()
                .owners(owner)
                .filters(Filter::builder().name("name").values(name).build())
                .filters(
                    Filter::builder()
                        .name("architecture")
                        .values(architecture)
                        .build(),
                )
                .filters(Filter::builder().name("state").values("available").build())
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let out = page.map_err(aws_error).with_context(|| {
                    format!("searching images owned by {owner} named {name} in {region}")
                })?;
                images.extend(out.images().iter().cloned());
            }
            match newest(&images) {
                Some(i) => {
                    let s = SourceImage::from_image(i);
                    tracing::info!("source: {} ({}, created {}) is the newest of {} matches", s.image_id, s.name, s.creation_date, images.len());
                    Ok(s)
                }
                None => bail!(
                    "no available {architecture} image owned by {owner} matches the name `{name}` in {region}: check [source] owner, name and architecture"
                ),
            }
        }
    }
}

/// The newest image: the latest creation date, then the greatest name (names usually carry a
/// date), then the id, so the choice never depends on the order AWS returns them in.
pub fn newest(images: &[Image]) -> Option<&Image> {
    images.iter().max_by(|a, b| {
        (
            a.creation_date().unwrap_or(""),
            a.name().unwrap_or(""),
            a.image_id().unwrap_or(""),
        )
            .cmp(&(
                b.creation_date().unwrap_or(""),
                b.name().unwrap_or(""),
                b.image_id().unwrap_or(""),
            ))
    })
}

/// One image by id, which must exist and be available.
pub async fn describe(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<SourceImage> {
    let region = ec2
        .config()
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "the configured region".into());
    let out = ec2.describe_images().image_ids(id).send().await.map_err(aws_error).with_context(|| {
        format!("looking up source image {id} in {region} (an AMI id belongs to one region; is it shared with this account?)")
    })?;
    let Some(image) = out.images().first() else {
        bail!("source image {id} was not found in {region}: an AMI id belongs to one region, and a private image must be shared with this account");
    };
    if let Some(state) = image.state() {
        if *state != ImageState::Available {
            bail!("source image {id} is {}, not available", state.as_str());
        }
    }
    Ok(SourceImage::from_image(image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::Moto;

    fn image(id: &str, name: &str, created: &str) -> Image {
        Image::builder()
            .image_id(id)
            .name(name)
            .creation_date(created)
            .build()
    }

    #[test]
    fn the_newest_wins_whatever_the_order() {
        let images = vec![
            image(
                "ami-1",
                "debian-12-amd64-20240110",
                "2024-01-10T10:00:00.000Z",
            ),
            image(
                "ami-3",
                "debian-12-amd64-20240301",
                "2024-03-01T10:00:00.000Z",
            ),
            image(
                "ami-2",
                "debian-12-amd64-20240201",
                "2024-02-01T10:00:00.000Z",
            ),
        ];
        assert_eq!(newest(&images).unwrap().image_id(), Some("ami-3"));
        let mut reversed = images.clone();
        reversed.reverse();
        assert_eq!(newest(&reversed).unwrap().image_id(), Some("ami-3"));
        // Same creation time: the name decides.
        let tied = vec![
            image("ami-a", "x-20240102", "2024-01-01T00:00:00.000Z"),
            image("ami-b", "x-20240101", "2024-01-01T00:00:00.000Z"),
        ];
        assert_eq!(newest(&tied).unwrap().image_id(), Some("ami-a"));
        assert!(newest(&[]).is_none());
    }

    async fn clients(moto: &Moto) -> (aws_sdk_ec2::Client, aws_sdk_ssm::Client) {
        let c = moto.sdk_config().await;
        (aws_sdk_ec2::Client::new(&c), aws_sdk_ssm::Client::new(&c))
    }

    #[tokio::test]
    async fn resolves_an_id_a_search_and_a_parameter_against_moto() {
        let moto = Moto::start();
        let (ec2, ssm) = clients(&moto).await;

        // Moto's Amazon-owned images for eu-west-1 include exactly one AL2023 6.12 x86_64 image.
        let found = resolve(
            &ec2,
            &ssm,
            &Source::Search {
                owner: "amazon".into(),
                name: "al2023-ami-2023.*-kernel-6.12-x86_64".into(),
                architecture: "x86_64".into(),
            },
        )
        .await
        .unwrap();
        assert!(
            found.image_id.starts_with("ami-") && found.name.starts_with("al2023-ami-2023."),
            "{found:?}"
        );
        assert_eq!(found.root_device_name, "/dev/xvda");
        assert_eq!(found.architecture, "x86_64");

        let by_id = resolve(&ec2, &ssm, &Source::Ami(found.image_id.clone()))
            .await
            .unwrap();
        assert_eq!(by_id, found);

        ssm.put_parameter()
            .name("/test/source")
            .value(&found.image_id)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .send()
            .await
            .unwrap();
        let by_param = resolve(&ec2, &ssm, &Source::Parameter("/test/source".into()))
            .await
            .unwrap();
        assert_eq!(by_param.image_id, found.image_id);
    }

    #[tokio::test]
    async fn says_what_is_wrong_with_a_bad_source() {
        let moto = Moto::start();
        let (ec2, ssm) = clients(&moto).await;
        let e = format!(
            "{:#}",
            resolve(&ec2, &ssm, &Source::Ami("ami-0123456789abcdef0".into()))
                .await
                .unwrap_err()
        );
        assert!(
            e.contains("ami-0123456789abcdef0") && e.contains("eu-west-1"),
            "{e}"
        );

        let e = format!(
            "{:#}",
            resolve(
                &ec2,
                &ssm,
                &Source::Search {
                    owner: "amazon".into(),
                    name: "no-such-*".into(),
                    architecture: "x86_64".into()
                }
            )
            .await
            .unwrap_err()
        );
        assert!(
            e.contains("no available x86_64 image owned by amazon matches the name `no-such-*`"),
            "{e}"
        );

        let e = format!(
            "{:#}",
            resolve(&ec2, &ssm, &Source::Parameter("/no/such".into()))
                .await
                .unwrap_err()
        );
        assert!(
            e.contains("/no/such") && e.contains("ParameterNotFound"),
            "{e}"
        );

        ssm.put_parameter()
            .name("/test/notami")
            .value("hello")
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .send()
            .await
            .unwrap();
        let e = format!(
            "{:#}",
            resolve(&ec2, &ssm, &Source::Parameter("/test/notami".into()))
                .await
                .unwrap_err()
        );
        assert!(e.contains("not an AMI id"), "{e}");
    }
}
