//! Publishing a baked image: an encrypted copy where the definition asks for encryption and the
//! seed volume was not, copies to the definition's other regions (concurrently), sharing with its
//! accounts, deprecation, and the SSM parameter that names the current image.
//!
//! Either all of it happens or the copies it made are removed again: a failed publish leaves
//! only the image it was given (which the bake's cleanup deregisters). The one exception is
//! deprecation: an image is complete without it, so a refused EnableImageDeprecation is a warning,
//! recorded in the artifact's details as `deprecation_failed`.

use super::ami::{self as image, image_tags, ImageInfo, ImageWaits};
use crate::aws::waiter::Check;
use crate::aws::{aws_error, describe_error, error_code};
use crate::definition::ImageDef;
use crate::platform::{Artifact, Build};
use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_ec2::types::{
    Image, ImageState, LaunchPermission, LaunchPermissionModifications, OperationType,
    ResourceType, SnapshotAttributeName, Tag, TagSpecification,
};
use aws_sdk_ssm::types::ParameterType;
use std::collections::BTreeMap;
use std::time::SystemTime;

/// On the home image: one tag per copy, `stackless:copy:REGION` = the copy's AMI id, so a later
/// bake that reuses the image (content addressing) knows its copies.
pub const COPY_TAG_PREFIX: &str = "stackless:copy:";
/// On a copy: `REGION/AMI` of the image it was copied from.
pub const COPY_OF: &str = "stackless:copy-of";
/// The SSM parameter data type that makes SSM check the value is an AMI id.
pub const PARAMETER_DATA_TYPE: &str = "aws:ec2:image";

/// See the module doc and [`publish_with`].
pub async fn publish(
    config: &aws_config::SdkConfig,
    def: &ImageDef,
    build: &Build,
    image: &ImageInfo,
) -> Result<Artifact> {
    publish_with(config, def, build, image, &ImageWaits::default()).await
}

/// An EC2 client for a region, with everything else (endpoint, credentials) from `config`.
pub fn ec2_for(config: &aws_config::SdkConfig, region: &str) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::config::Builder::from(config)
        .region(aws_sdk_ec2::config::Region::new(region.to_string()))
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

/// The KMS key to encrypt with in `region`. An alias (`alias/NAME`, resolved in each region) and
/// a multi-region key (`mrk-...`) work everywhere; a single-region key only in its own region.
pub fn kms_key_for(key: &str, home: &str, region: &str) -> Result<String> {
    if let Some(rest) = key.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        // partition, service, region, account, resource
        if parts.len() != 5 || parts[1] != "kms" {
            bail!("kms_key `{key}` is not a KMS key or alias ARN");
        }
        if parts[2] == region {
            return Ok(key.to_string());
        }
        if parts[4].starts_with("key/mrk-") || parts[4].starts_with("alias/") {
            return Ok(format!(
                "arn:{}:kms:{region}:{}:{}",
                parts[0], parts[3], parts[4]
            ));
        }
        bail!(
            "kms_key `{key}` is a single-region key in {}; it cannot encrypt the copy in {region}: use an alias that exists in every region (alias/NAME) or a multi-region key (mrk-...)",
            parts[2]
        );
    }
    if key.starts_with("alias/") || key.starts_with("mrk-") || region == home {
        return Ok(key.to_string());
    }
    bail!(
        "kms_key `{key}` names a key of one region ({home}); it cannot encrypt the copy in {region}: use an alias (alias/NAME) or a multi-region key (mrk-...)"
    )
}

/// The regions to copy to: the definition's, without the home region and duplicates.
fn copy_regions(def: &ImageDef, home: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in &def.regions {
        if r != home && !out.contains(r) {
            out.push(r.clone());
        }
    }
    out
}

/// Problems that must stop a publish before it copies anything.
fn preflight(def: &ImageDef, home: &str) -> Result<BTreeMap<String, Option<String>>> {
    if def.encrypted && def.kms_key.is_none() && !def.accounts.is_empty() {
        bail!(
            "the image is encrypted with the default EBS key, which cannot be shared: set publish.kms_key to a customer managed key whose policy lets accounts {} use it",
            def.accounts.join(", ")
        );
    }
    let mut keys = BTreeMap::new();
    for r in std::iter::once(home.to_string()).chain(copy_regions(def, home)) {
        let key = match (&def.kms_key, def.encrypted) {
            (Some(k), true) => Some(kms_key_for(k, home, &r)?),
            _ => None,
        };
        keys.insert(r, key);
    }
    Ok(keys)
}

/// [`publish`] with explicit wait limits for the copies.
pub async fn publish_with(
    config: &aws_config::SdkConfig,
    def: &ImageDef,
    build: &Build,
    image: &ImageInfo,
    waits: &ImageWaits,
) -> Result<Artifact> {
    let home = config.region().map(|r| r.to_string()).ok_or_else(|| {
        anyhow!("no AWS region to publish from: set AWS_REGION or a region in the AWS profile")
    })?;
    let keys = preflight(def, &home).context("publishing the image")?;
    let ec2 = ec2_for(config, &home);
    let ssm = aws_sdk_ssm::Client::new(config);

    let mut run = Publish {
        def,
        build,
        home: home.clone(),
        keys,
        waits,
        created: Vec::new(),
        details: BTreeMap::new(),
    };
    match run.steps(config, &ec2, &ssm, image).await {
        Ok(artifact) => {
            if artifact.id != image.image_id {
                // The unencrypted intermediate has been replaced by its encrypted copy.
                match image::deregister(&ec2, &image.image_id).await {
                    Ok(()) => tracing::info!("deregistered the unencrypted intermediate image {}", image.image_id),
                    Err(e) => tracing::warn!(
                        "the image is published, but the unencrypted intermediate {} could not be removed ({e:#}): `builder images prune` or `aws ec2 deregister-image --image-id {}`",
                        image.image_id,
                        image.image_id
                    ),
                }
            }
            Ok(artifact)
        }
        Err(e) => {
            let mut removed = Vec::new();
            let mut left = Vec::new();
            for (region, id) in run.created.iter().rev() {
                match image::deregister(&ec2_for(config, region), id).await {
                    Ok(()) => removed.push(format!("{region}/{id}")),
                    Err(d) => left.push(format!("{region}/{id} ({d:#})")),
                }
            }
            let mut note = format!("publishing image {} failed", image.image_id);
            if !removed.is_empty() {
                note.push_str(&format!(
                    "; the copies it made were deregistered: {}",
                    removed.join(", ")
                ));
            }
            if !left.is_empty() {
                note.push_str(&format!(
                    "; these copies could not be removed, run `builder gc` in their regions: {}",
                    left.join(", ")
                ));
            }
            Err(e.context(note))
        }
    }
}

struct Publish<'a> {
    def: &'a ImageDef,
    build: &'a Build,
    home: String,
    keys: BTreeMap<String, Option<String>>,
    waits: &'a ImageWaits,
    /// (region, image id) of every copy made so far, removed again if the publish fails.
    created: Vec<(String, String)>,
    details: BTreeMap<String, String>,
}

impl Publish<'_> {
    fn name(&self) -> String {
        self.def.image_name(&self.build.id, &self.build.timestamp)
    }

    fn tags(&self) -> Vec<Tag> {
        image_tags(self.def, self.build, &self.name())
    }

    async fn steps(
        &mut self,
        config: &aws_config::SdkConfig,
        ec2: &aws_sdk_ec2::Client,
        ssm: &aws_sdk_ssm::Client,
        given: &ImageInfo,
    ) -> Result<Artifact> {
        let home = self.home.clone();
        let original = image::describe(ec2, &given.image_id)
            .await?
            .ok_or_else(|| {
                anyhow!(
                    "image {} does not exist in {home}; nothing to publish",
                    given.image_id
                )
            })?;
        if original.state() != Some(&ImageState::Available) {
            bail!(
                "image {} is {} in {home}; only an available image can be published",
                given.image_id,
                original
                    .state()
                    .map(|s| s.as_str())
                    .unwrap_or("in an unknown state")
            );
        }

        // 1. Encryption in the home region.
        let published = if self.def.encrypted && !image::is_encrypted(&original) {
            let copy = self
                .copy(config, &home, &given.image_id, "encrypted copy")
                .await?;
            let copy = self
                .wait_copies(config, vec![(home.clone(), copy)])
                .await?
                .remove(0)
                .1;
            self.details
                .insert("encrypted_from".into(), given.image_id.clone());
            copy
        } else {
            original
        };
        let home_id = published.image_id().unwrap_or_default().to_string();
        let mut images: Vec<(String, Image)> = vec![(home.clone(), published)];

        // 2. Copies to the other regions, requested and waited for concurrently.
        let regions = copy_regions(self.def, &home);
        if !regions.is_empty() {
            let mut tasks = tokio::task::JoinSet::new();
            for region in &regions {
                let client = ec2_for(config, region);
                let request = self.copy_request(&client, region, &home_id);
                let region = region.clone();
                tasks.spawn(async move { (region, request.send().await) });
            }
            let mut started = Vec::new();
            let mut failures = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                let (region, result) = joined.context("a copy task panicked")?;
                match result {
                    Ok(out) => match out.image_id() {
                        Some(id) => {
                            self.created.push((region.clone(), id.to_string()));
                            started.push((region, id.to_string()));
                        }
                        None => failures.push(format!("{region}: CopyImage returned no image id")),
                    },
                    Err(e) => failures.push(format!("{region}: {}", aws_error(e))),
                }
            }
            if !failures.is_empty() {
                bail!(
                    "copying image {home_id} from {home} failed: {}",
                    failures.join("; ")
                );
            }
            started.sort();
            images.extend(self.wait_copies(config, started).await?);
        }

        // 3. Tags on every image and its snapshots (copies do not always get their tag
        //    specifications), and the copy map on the home image.
        for (region, img) in &images {
            let mut tags = self.tags();
            if img.image_id() != Some(given.image_id.as_str()) {
                // A copy: of the given image (the encrypted copy) or of the home image.
                let source = if region == &home {
                    &given.image_id
                } else {
                    &home_id
                };
                tags.push(image::tag(COPY_OF, &format!("{home}/{source}")));
            }
            image::tag_image_and_snapshots(&ec2_for(config, region), img, &tags)
                .await
                .with_context(|| {
                    format!(
                        "tagging image {} in {region}",
                        img.image_id().unwrap_or_default()
                    )
                })?;
        }
        let copy_tags: Vec<Tag> = images
            .iter()
            .filter(|(r, _)| r != &home)
            .map(|(r, i)| {
                image::tag(
                    &format!("{COPY_TAG_PREFIX}{r}"),
                    i.image_id().unwrap_or_default(),
                )
            })
            .collect();
        if !copy_tags.is_empty() {
            ec2.create_tags()
                .resources(&home_id)
                .set_tags(Some(copy_tags))
                .send()
                .await
                .map_err(aws_error)
                .with_context(|| format!("recording the copies on image {home_id}"))?;
        }

        // 4. Sharing, in every region: the image and its snapshots.
        if !self.def.accounts.is_empty() {
            for (region, img) in &images {
                self.share(&ec2_for(config, region), region, img).await?;
            }
            self.details
                .insert("shared_with".into(), self.def.accounts.join(","));
        }

        // 5. Deprecation, in every region.
        if let Some(after) = self.def.deprecate_after {
            let at = SystemTime::now() + after;
            let stamp = humantime::format_rfc3339_seconds(at).to_string();
            self.details.insert("deprecate_at".into(), stamp.clone());
            let mut failed = Vec::new();
            for (region, img) in &images {
                let id = img.image_id().unwrap_or_default();
                let result = ec2_for(config, region)
                    .enable_image_deprecation()
                    .image_id(id)
                    .deprecate_at(aws_sdk_ec2::primitives::DateTime::from(at))
                    .send()
                    .await;
                if let Err(e) = result {
                    // The image is complete and usable without it: say so loudly, record it in
                    // the manifest, and go on.
                    tracing::warn!(
                        "could not set deprecation of {id} in {region} ({}); set it with `aws ec2 enable-image-deprecation --region {region} --image-id {id} --deprecate-at {stamp}`",
                        describe_error(&e)
                    );
                    failed.push(format!(
                        "{region}/{id}: {}",
                        error_code(&e).unwrap_or("error")
                    ));
                }
            }
            if !failed.is_empty() {
                self.details
                    .insert("deprecation_failed".into(), failed.join(","));
            }
        }

        // 6. The SSM parameter, last: it is what users and launch templates follow.
        if let Some(parameter) = &self.def.ssm_parameter {
            let previous = current_parameter(ssm, parameter).await?;
            let out = ssm
                .put_parameter()
                .name(parameter)
                .value(&home_id)
                .r#type(ParameterType::String)
                .data_type(PARAMETER_DATA_TYPE)
                .overwrite(true)
                .description(format!(
                    "stackless {} image for {} (build {})",
                    self.def.image, self.build.arch, self.build.id
                ))
                .send()
                .await
                .map_err(aws_error)
                .with_context(|| {
                    format!("publishing {home_id} to the SSM parameter {parameter} (the builder needs ssm:PutParameter on it)")
                })?;
            self.details
                .insert("ssm_parameter".into(), parameter.clone());
            self.details
                .insert("ssm_parameter_version".into(), out.version().to_string());
            if let Some(prev) = previous {
                self.details.insert("ssm_parameter_previous".into(), prev);
            }
        }

        let mut regions = BTreeMap::new();
        for (region, img) in &images {
            let id = img.image_id().unwrap_or_default().to_string();
            let snaps = image::snapshots_of(img).join(",");
            if region == &home {
                self.details.insert("snapshots".into(), snaps);
            } else {
                self.details.insert(format!("snapshots.{region}"), snaps);
            }
            regions.insert(region.clone(), id);
        }
        self.details.insert("name".into(), self.name());
        self.details
            .insert("encrypted".into(), self.def.encrypted.to_string());
        // Last: only a finished image is reused by a later bake with the same inputs.
        ec2.create_tags()
            .resources(&home_id)
            .tags(image::tag(super::tags::PUBLISHED, "true"))
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| format!("tagging {home_id} as published"))?;
        Ok(Artifact {
            id: home_id,
            regions,
            details: std::mem::take(&mut self.details),
        })
    }

    fn copy_request(
        &self,
        client: &aws_sdk_ec2::Client,
        region: &str,
        source: &str,
    ) -> aws_sdk_ec2::operation::copy_image::builders::CopyImageFluentBuilder {
        let name = self.name();
        let mut tags = self.tags();
        tags.push(image::tag(COPY_OF, &format!("{}/{source}", self.home)));
        let mut request = client
            .copy_image()
            .source_image_id(source)
            .source_region(&self.home)
            .name(&name)
            .description(&self.def.description)
            // Idempotent: a retried request does not make a second copy.
            .client_token(format!("{}-{region}", self.build.id))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some(tags.clone()))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(tags))
                    .build(),
            );
        if self.def.encrypted {
            request = request
                .encrypted(true)
                .set_kms_key_id(self.keys.get(region).cloned().flatten());
        }
        request
    }

    /// Starts one copy (the encrypted copy in the home region) and records it for rollback.
    async fn copy(
        &mut self,
        config: &aws_config::SdkConfig,
        region: &str,
        source: &str,
        what: &str,
    ) -> Result<String> {
        let client = ec2_for(config, region);
        let out = self
            .copy_request(&client, region, source)
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| format!("making the {what} of {source} in {region}"))?;
        let id = out
            .image_id()
            .ok_or_else(|| anyhow!("CopyImage returned no image id"))?
            .to_string();
        self.created.push((region.to_string(), id.clone()));
        Ok(id)
    }

    /// Waits until every copy is available: one wait (one spinner) over all of them, failing at
    /// once when any one fails.
    async fn wait_copies(
        &self,
        config: &aws_config::SdkConfig,
        copies: Vec<(String, String)>,
    ) -> Result<Vec<(String, Image)>> {
        let clients: Vec<(String, String, aws_sdk_ec2::Client)> = copies
            .iter()
            .map(|(r, id)| (r.clone(), id.clone(), ec2_for(config, r)))
            .collect();
        let what = format!(
            "the copies of the image to be available ({})",
            copies
                .iter()
                .map(|(r, id)| format!("{r}: {id}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.waits
            .wait(what)
            .until(|| async {
                let mut ready = Vec::new();
                let mut waiting = Vec::new();
                for (region, id, client) in &clients {
                    match image::look(client, id)
                        .await
                        .with_context(|| format!("checking the copy {id} in {region}"))?
                    {
                        Check::Ready(img) => ready.push((region.clone(), img)),
                        Check::Waiting(state) => waiting.push(format!("{region} {state}")),
                        Check::Failed(why) => {
                            return Ok(Check::Failed(format!("the copy in {region} failed: {why}")))
                        }
                    }
                }
                Ok(if waiting.is_empty() {
                    Check::Ready(ready)
                } else {
                    Check::Waiting(waiting.join(", "))
                })
            })
            .await
    }

    async fn share(&self, ec2: &aws_sdk_ec2::Client, region: &str, img: &Image) -> Result<()> {
        let id = img.image_id().unwrap_or_default();
        let mut add = LaunchPermissionModifications::builder();
        for account in &self.def.accounts {
            add = add.add(LaunchPermission::builder().user_id(account).build());
        }
        ec2.modify_image_attribute()
            .image_id(id)
            .launch_permission(add.build())
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| {
                format!(
                    "sharing image {id} in {region} with {}",
                    self.def.accounts.join(", ")
                )
            })?;
        for snap in image::snapshots_of(img) {
            let mut request = ec2
                .modify_snapshot_attribute()
                .snapshot_id(&snap)
                .attribute(SnapshotAttributeName::CreateVolumePermission)
                .operation_type(OperationType::Add);
            for account in &self.def.accounts {
                request = request.user_ids(account);
            }
            request.send().await.map_err(aws_error).with_context(|| {
                format!(
                    "sharing snapshot {snap} of {id} in {region} with {}",
                    self.def.accounts.join(", ")
                )
            })?;
        }
        Ok(())
    }
}

/// The parameter's current value, or None when it does not exist yet.
pub async fn current_parameter(ssm: &aws_sdk_ssm::Client, name: &str) -> Result<Option<String>> {
    match ssm.get_parameter().name(name).send().await {
        Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            Ok(None)
        }
        Err(e) => Err(aws_error(e)).with_context(|| format!("reading the SSM parameter {name}")),
    }
}

#[cfg(test)]
mod tests;
