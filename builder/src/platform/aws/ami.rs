//! The image itself: CreateImage from the stopped seed instance, the wait until it is
//! `available`, its tags (image and snapshots), and deregistration with its snapshots.
//!
//! Every image the builder makes carries the build's tags from the moment it exists
//! (TagSpecifications), so a run killed half-way leaves an image `builder gc` can find.

use super::tags;
use crate::aws::waiter::{Check, Wait};
use crate::aws::{aws_error, describe_error, error_code};
use crate::definition::ImageDef;
use crate::platform::Build;
use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, Image, ImageState, InstanceStateName, ResourceType,
    Tag, TagSpecification, VolumeType,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// The image CreateImage made, once it is available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub image_id: String,
    pub snapshot_ids: Vec<String>,
}

/// How long and how often image waits (CreateImage, CopyImage) look. The defaults do not fail
/// on a slow but healthy AWS: a real image can take 20 minutes, a cross-region copy longer.
#[derive(Debug, Clone)]
pub struct ImageWaits {
    pub timeout: Duration,
    pub interval: Duration,
    pub max_interval: Duration,
    /// A spinner with the elapsed time on stderr (drawn only where stderr is a terminal).
    pub progress: bool,
}

impl Default for ImageWaits {
    fn default() -> Self {
        ImageWaits {
            timeout: Duration::from_secs(60 * 60),
            interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(30),
            progress: true,
        }
    }
}

impl ImageWaits {
    pub(crate) fn wait(&self, what: impl Into<String>) -> Wait {
        Wait::new(what, self.timeout)
            .interval(self.interval, self.max_interval)
            .progress(self.progress)
            .hint("a slow but healthy image may still become available: raise the image wait limit")
    }
}

fn error_status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

pub(crate) fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

pub(crate) fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// The tags of a built image and its snapshots: the definition's own tags, then the builder's
/// (which win, so a definition cannot break `builder gc` or content addressing).
pub fn image_tags(def: &ImageDef, build: &Build, name: &str) -> Vec<Tag> {
    let mut all: BTreeMap<String, String> = def.tags.clone();
    all.insert("Name".into(), name.into());
    all.insert(tags::BUILD_ID.into(), build.id.clone());
    all.insert(tags::IMAGE.into(), def.image.clone());
    all.insert(tags::INPUT_HASH.into(), build.input_hash.clone());
    all.insert(tags::SOURCE.into(), build.source.clone());
    all.insert(tags::ARCH.into(), build.arch.ec2().into());
    all.insert(tags::MANAGED_BY.into(), tags::MANAGED_BY_VALUE.into());
    all.iter().map(|(k, v)| tag(k, v)).collect()
}

fn spec(kind: ResourceType, tags: &[Tag]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags.to_vec()))
        .build()
}

/// Snapshot ids of an image's EBS block devices.
pub(crate) fn snapshots_of(image: &Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_string))
        .collect()
}

/// Whether every EBS volume of an image is encrypted.
pub(crate) fn is_encrypted(image: &Image) -> bool {
    let ebs: Vec<_> = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs())
        .collect();
    !ebs.is_empty() && ebs.iter().all(|e| e.encrypted() == Some(true))
}

/// The image, or None when it does not exist (any more, or not yet: DescribeImages is
/// eventually consistent right after CreateImage and CopyImage).
pub(crate) async fn describe(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Result<Option<Image>> {
    match ec2
        .describe_images()
        .image_ids(image_id)
        .include_deprecated(true)
        .include_disabled(true)
        .send()
        .await
    {
        Ok(out) => Ok(out
            .images()
            .iter()
            .find(|i| i.image_id() == Some(image_id))
            .cloned()),
        Err(e)
            if matches!(
                error_code(&e),
                Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(aws_error(e).context(format!("describing image {image_id}"))),
    }
}

/// One look at an image that should become available.
pub(crate) async fn look(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Result<Check<Image>> {
    let Some(image) = describe(ec2, image_id).await? else {
        return Ok(Check::Waiting("not visible yet".into()));
    };
    let state = image.state().cloned().unwrap_or(ImageState::Pending);
    Ok(match state {
        ImageState::Available => Check::Ready(image),
        ImageState::Pending | ImageState::Transient => Check::Waiting(state.as_str().to_string()),
        other => {
            let reason = image
                .state_reason()
                .map(|r| {
                    format!(
                        ": {} {}",
                        r.code().unwrap_or_default(),
                        r.message().unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            Check::Failed(format!(
                "image {image_id} is {}{}",
                other.as_str(),
                reason.trim_end()
            ))
        }
    })
}

/// Waits until an image is available (failing at once on `failed`, `error`, `invalid`).
pub async fn wait_available(
    ec2: &aws_sdk_ec2::Client,
    image_id: &str,
    what: &str,
    waits: &ImageWaits,
) -> Result<Image> {
    waits.wait(what).until(|| look(ec2, image_id)).await
}

/// Tags resources (by id) with `tags`, where any of them lacks the build id tag or the name.
pub(crate) async fn ensure_tagged(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
    current: &BTreeMap<String, BTreeMap<String, String>>,
    tags: &[Tag],
) -> Result<()> {
    let wanted = tag_map(tags);
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| {
            let have = current.get(*id);
            wanted
                .iter()
                .any(|(k, v)| have.and_then(|h| h.get(k)) != Some(v))
        })
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ec2.create_tags()
        .set_resources(Some(missing.clone()))
        .set_tags(Some(tags.to_vec()))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("tagging {}", missing.join(", ")))?;
    Ok(())
}

/// The snapshots' current tags.
pub(crate) async fn snapshot_tags(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let out = ec2
        .describe_snapshots()
        .set_snapshot_ids(Some(ids.to_vec()))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("describing snapshots {}", ids.join(", ")))?;
    Ok(out
        .snapshots()
        .iter()
        .filter_map(|s| Some((s.snapshot_id()?.to_string(), tag_map(s.tags()))))
        .collect())
}

/// Tags an image and its snapshots where they are not tagged yet (CopyImage and some
/// endpoints do not apply TagSpecifications to snapshots).
pub(crate) async fn tag_image_and_snapshots(
    ec2: &aws_sdk_ec2::Client,
    image: &Image,
    tags: &[Tag],
) -> Result<()> {
    let id = image.image_id().unwrap_or_default().to_string();
    let mut current = BTreeMap::new();
    current.insert(id.clone(), tag_map(image.tags()));
    ensure_tagged(ec2, &[id], &current, tags).await?;
    let snaps = snapshots_of(image);
    let current = snapshot_tags(ec2, &snaps).await?;
    ensure_tagged(ec2, &snaps, &current, tags).await
}

/// What the seed instance looks like to CreateImage.
struct Seed {
    root_device: String,
    encrypted: bool,
}

async fn inspect_seed(ec2: &aws_sdk_ec2::Client, instance_id: &str) -> Result<Seed> {
    let out = ec2
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| {
            format!("describing the seed instance {instance_id} before creating the image")
        })?;
    let instance = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find(|i| i.instance_id() == Some(instance_id))
        .ok_or_else(|| {
            anyhow!("the seed instance {instance_id} does not exist; cannot create the image")
        })?;
    let state = instance.state().and_then(|s| s.name()).cloned();
    if state != Some(InstanceStateName::Stopped) {
        bail!(
            "the seed instance {instance_id} is {}, not stopped: stop it (and wait for `stopped`) before creating the image",
            state.map(|s| s.as_str().to_string()).unwrap_or_else(|| "in an unknown state".into())
        );
    }
    let root_device = instance
        .root_device_name()
        .unwrap_or("/dev/xvda")
        .to_string();
    let volumes: Vec<String> = instance
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs()?.volume_id().map(str::to_string))
        .collect();
    let encrypted = if volumes.is_empty() {
        false
    } else {
        let out = ec2
            .describe_volumes()
            .set_volume_ids(Some(volumes.clone()))
            .send()
            .await
            .map_err(aws_error)
            .with_context(|| {
                format!(
                    "describing the volumes of {instance_id} ({})",
                    volumes.join(", ")
                )
            })?;
        !out.volumes().is_empty() && out.volumes().iter().all(|v| v.encrypted() == Some(true))
    };
    Ok(Seed {
        root_device,
        encrypted,
    })
}

/// The name of the image CreateImage makes. When the definition wants an encrypted image and the
/// seed volume is not encrypted, the image made here is an intermediate that `publish` copies
/// (encrypted) to the definition's name; it gets a suffix so both can exist at once (AMI names
/// are unique in a region).
pub fn intermediate_name(name: &str) -> String {
    format!("{name}-unencrypted")
}

/// CreateImage from the STOPPED seed instance and wait until it is available. See the module doc.
pub async fn create_and_wait(
    ec2: &aws_sdk_ec2::Client,
    instance_id: &str,
    def: &ImageDef,
    build: &Build,
) -> Result<ImageInfo> {
    create_and_wait_with(ec2, instance_id, def, build, &ImageWaits::default()).await
}

/// [`create_and_wait`] with explicit wait limits. On any failure after CreateImage the image is
/// deregistered (and its snapshots deleted) before the error returns.
pub async fn create_and_wait_with(
    ec2: &aws_sdk_ec2::Client,
    instance_id: &str,
    def: &ImageDef,
    build: &Build,
    waits: &ImageWaits,
) -> Result<ImageInfo> {
    let seed = inspect_seed(ec2, instance_id).await?;
    let final_name = def.image_name(&build.id, &build.timestamp);
    let name = if def.encrypted && !seed.encrypted {
        intermediate_name(&final_name)
    } else {
        final_name
    };
    if name.len() > 128 {
        bail!(
            "image name `{name}` is {} characters; AWS allows 128: shorten the definition's `name`",
            name.len()
        );
    }
    let tags = image_tags(def, build, &name);
    let image_id = create_image(ec2, instance_id, def, build, &seed, &name, &tags).await?;
    tracing::info!(
        "image {image_id} ({name}) created from {instance_id}; waiting until it is available"
    );

    let finish = async {
        let image = wait_available(
            ec2,
            &image_id,
            &format!("image {image_id} ({name}) to be available"),
            waits,
        )
        .await?;
        tag_image_and_snapshots(ec2, &image, &tags)
            .await
            .with_context(|| format!("tagging image {image_id} and its snapshots"))?;
        Ok::<_, anyhow::Error>(ImageInfo {
            image_id: image_id.clone(),
            snapshot_ids: snapshots_of(&image),
        })
    };
    match finish.await {
        Ok(info) => Ok(info),
        Err(e) => Err(e.context(match deregister(ec2, &image_id).await {
            Ok(()) => format!("creating image {name} from {instance_id} failed; the half-made image {image_id} was deregistered"),
            Err(d) => format!(
                "creating image {name} from {instance_id} failed, and removing the half-made image {image_id} failed too ({d:#}): remove it with `aws ec2 deregister-image --image-id {image_id}` and delete its snapshots"
            ),
        })),
    }
}

async fn create_image(
    ec2: &aws_sdk_ec2::Client,
    instance_id: &str,
    def: &ImageDef,
    build: &Build,
    seed: &Seed,
    name: &str,
    tags: &[Tag],
) -> Result<String> {
    let request = || {
        ec2.create_image()
            .instance_id(instance_id)
            .name(name)
            .description(&def.description)
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(&seed.root_device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_type(VolumeType::from(def.volume_type.as_str()))
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(spec(ResourceType::Image, tags))
    };
    let context = || format!("creating image {name} from the seed instance {instance_id}");
    let first = request()
        .tag_specifications(spec(ResourceType::Snapshot, tags))
        .send()
        .await;
    let err = match first {
        Ok(out) => {
            return out
                .image_id()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("CreateImage returned no image id"))
                .with_context(context)
        }
        Err(e) => e,
    };
    if error_code(&err) == Some("InvalidAMIName.Duplicate") {
        return adopt_by_name(ec2, name, build).await.with_context(context);
    }
    // An endpoint that cannot tag snapshots at creation (a server error, or a refusal that names
    // the snapshot tags): create the image with its own tags only; the snapshots are tagged once
    // their ids are known. A repeated CreateImage cannot make a second image: names are unique,
    // and a duplicate is recognised by the build id below.
    let snapshot_refused = error_status(&err).is_some_and(|s| s >= 500)
        || (matches!(
            error_code(&err),
            Some("UnsupportedOperation" | "InvalidParameterValue" | "InvalidParameterCombination")
        ) && err
            .message()
            .is_some_and(|m| m.to_ascii_lowercase().contains("snapshot")));
    if !snapshot_refused {
        return Err(describe_error(&err)).with_context(context);
    }
    tracing::warn!(
        "CreateImage with snapshot tags failed ({}); retrying with image tags only",
        describe_error(&err)
    );
    match request().send().await {
        Ok(out) => out
            .image_id()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("CreateImage returned no image id"))
            .with_context(context),
        Err(e) if error_code(&e) == Some("InvalidAMIName.Duplicate") => {
            adopt_by_name(ec2, name, build).await.with_context(context)
        }
        Err(e) => Err(aws_error(e).context(format!(
            "(the first attempt failed with: {})",
            describe_error(&err)
        )))
        .with_context(context),
    }
}

/// After a duplicate-name error: the image of that name, if this very build made it (a retried
/// request that had in fact succeeded); anything else is a real name clash.
async fn adopt_by_name(ec2: &aws_sdk_ec2::Client, name: &str, build: &Build) -> Result<String> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("looking up the existing image named {name}"))?;
    let image = out
        .images()
        .first()
        .ok_or_else(|| anyhow!("AWS says an image named {name} exists, but none is visible"))?;
    let id = image.image_id().unwrap_or_default().to_string();
    let owner = tag_map(image.tags()).get(tags::BUILD_ID).cloned();
    if owner.as_deref() == Some(build.id.as_str()) {
        return Ok(id);
    }
    bail!(
        "an image named {name} already exists ({id}, build {}): image names must be unique in a region; put {{timestamp}} or {{build_id}} in the definition's `name`",
        owner.unwrap_or_else(|| "not made by the builder".into())
    )
}

/// Deregisters an image and deletes its snapshots. An image that is already gone is not an
/// error (cleanup may run more than once).
pub async fn deregister(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Result<()> {
    deregister_with_snapshots(ec2, image_id).await.map(|_| ())
}

/// [`deregister`], returning the snapshots it deleted.
pub async fn deregister_with_snapshots(
    ec2: &aws_sdk_ec2::Client,
    image_id: &str,
) -> Result<Vec<String>> {
    let snapshots = match describe(ec2, image_id).await? {
        Some(image) => snapshots_of(&image),
        None => return Ok(Vec::new()),
    };
    match ec2.deregister_image().image_id(image_id).send().await {
        Ok(_) => {}
        Err(e)
            if matches!(
                error_code(&e),
                Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable")
            ) => {}
        Err(e) => {
            return Err(aws_error(e)).with_context(|| format!("deregistering image {image_id}"))
        }
    }
    let mut deleted = Vec::new();
    let mut failed = Vec::new();
    for snap in &snapshots {
        match ec2.delete_snapshot().snapshot_id(snap).send().await {
            Ok(_) => deleted.push(snap.clone()),
            Err(e) if error_code(&e) == Some("InvalidSnapshot.NotFound") => {}
            Err(e) => failed.push(format!("{snap}: {}", aws_error(e))),
        }
    }
    if !failed.is_empty() {
        bail!(
            "image {image_id} was deregistered, but deleting its snapshots failed ({}); delete them with `aws ec2 delete-snapshot --snapshot-id ID`",
            failed.join("; ")
        );
    }
    Ok(deleted)
}

/// Deregisters every image (any state) tagged with this build id, with its snapshots: the
/// cleanup for a build interrupted while its image was being made or copied.
pub async fn deregister_build(ec2: &aws_sdk_ec2::Client, build_id: &str) -> Result<Vec<String>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .include_deprecated(true)
        .include_disabled(true)
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::BUILD_ID))
                .values(build_id)
                .build(),
        )
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("looking for the images of build {build_id}"))?;
    let mut removed = Vec::new();
    for image in out.images() {
        if let Some(id) = image.image_id() {
            deregister(ec2, id).await?;
            removed.push(id.to_string());
        }
    }
    Ok(removed)
}

#[cfg(test)]
pub(crate) mod test_support;

#[cfg(test)]
mod tests;
