//! The builder's images in a region: content-addressed reuse (`find_by_input_hash`),
//! `builder images list` and `builder images prune`.
//!
//! Only images owned by this account and tagged by the builder are ever considered; prune never
//! removes the image the definition's SSM parameter points at.

use super::ami::{self as image, tag_map};
use super::publish::{current_parameter, COPY_TAG_PREFIX};
use super::tags;
use crate::aws::aws_error;
use crate::aws::filter;
use crate::definition::ImageDef;
use crate::platform::Artifact;
use anyhow::{Context, Result};
use aws_sdk_ec2::types::{Filter, Image, ImageState};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// This account's images matching the filters, newest first.
async fn owned_images(
    ec2: &aws_sdk_ec2::Client,
    filters: Vec<Filter>,
    what: &str,
) -> Result<Vec<Image>> {
    let mut images: Vec<Image> = ec2
        .describe_images()
        .owners("self")
        .include_deprecated(true)
        .include_disabled(true)
        .set_filters(Some(filters))
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(aws_error)
        .with_context(|| format!("listing {what} (the builder needs ec2:DescribeImages)"))?;
    images.sort_by(|a, b| {
        (
            b.creation_date().unwrap_or_default(),
            b.image_id().unwrap_or_default(),
        )
            .cmp(&(
                a.creation_date().unwrap_or_default(),
                a.image_id().unwrap_or_default(),
            ))
    });
    Ok(images)
}

fn managed_filter() -> Filter {
    filter(&format!("tag:{}", tags::MANAGED_BY), tags::MANAGED_BY_VALUE)
}

/// An available image of this definition (tag IMAGE = def.image) with tag INPUT_HASH =
/// input_hash, owned by this account; newest wins. Its copies in other regions come from the
/// copy tags `publish` put on it.
pub async fn find_by_input_hash(
    ec2: &aws_sdk_ec2::Client,
    def: &ImageDef,
    input_hash: &str,
) -> Result<Option<Artifact>> {
    let images = owned_images(
        ec2,
        vec![
            managed_filter(),
            filter(&format!("tag:{}", tags::IMAGE), &def.image),
            filter(&format!("tag:{}", tags::INPUT_HASH), input_hash),
            filter("state", "available"),
        ],
        &format!("the images of {} with input hash {input_hash}", def.image),
    )
    .await?;
    // Filters are the server's business; check again rather than trust every endpoint.
    let found = images.into_iter().find(|i| {
        let t = tag_map(i.tags());
        i.state() == Some(&ImageState::Available)
            && t.get(tags::PUBLISHED).map(String::as_str) == Some("true")
            && t.get(tags::IMAGE) == Some(&def.image)
            && t.get(tags::INPUT_HASH).map(String::as_str) == Some(input_hash)
    });
    let Some(img) = found else { return Ok(None) };
    let id = img.image_id().unwrap_or_default().to_string();
    let t = tag_map(img.tags());
    let mut regions = BTreeMap::new();
    if let Some(region) = ec2.config().region() {
        regions.insert(region.to_string(), id.clone());
    }
    for (k, v) in &t {
        if let Some(region) = k.strip_prefix(COPY_TAG_PREFIX) {
            regions.insert(region.to_string(), v.clone());
        }
    }
    let mut details = BTreeMap::new();
    details.insert("reused".into(), "true".into());
    details.insert("snapshots".into(), image::snapshots_of(&img).join(","));
    if let Some(name) = img.name() {
        details.insert("name".into(), name.to_string());
    }
    if let Some(b) = t.get(tags::BUILD_ID) {
        details.insert("build_id".into(), b.clone());
    }
    if let Some(c) = img.creation_date() {
        details.insert("created".into(), c.to_string());
    }
    Ok(Some(Artifact {
        id,
        regions,
        details,
    }))
}

/// One line of `builder images list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageRow {
    pub image_id: String,
    pub name: String,
    /// The definition (tag IMAGE).
    pub image: String,
    pub created: String,
    pub state: String,
    pub build_id: String,
    pub input_hash: String,
    /// The definition's SSM parameter points at it.
    pub published: bool,
}

fn row(img: &Image) -> ImageRow {
    let t = tag_map(img.tags());
    let get = |k: &str| t.get(k).cloned().unwrap_or_default();
    ImageRow {
        image_id: img.image_id().unwrap_or_default().to_string(),
        name: img.name().unwrap_or_default().to_string(),
        image: get(tags::IMAGE),
        created: img.creation_date().unwrap_or_default().to_string(),
        state: img
            .state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        build_id: get(tags::BUILD_ID),
        input_hash: get(tags::INPUT_HASH),
        published: false,
    }
}

/// `builder images list [IMAGE]`: the builder's images (MANAGED_BY tag), newest first, marking
/// the one each definition's parameter points at. `parameter_of` maps a definition name to its
/// SSM parameter (None: the definition is unknown or publishes none).
pub async fn list(
    ec2: &aws_sdk_ec2::Client,
    ssm: &aws_sdk_ssm::Client,
    image: Option<&str>,
    parameter_of: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ImageRow>> {
    let mut filters = vec![managed_filter()];
    if let Some(name) = image {
        filters.push(filter(&format!("tag:{}", tags::IMAGE), name));
    }
    let what = match image {
        Some(name) => format!("the builder's {name} images"),
        None => "the builder's images".into(),
    };
    let mut rows: Vec<ImageRow> = owned_images(ec2, filters, &what)
        .await?
        .iter()
        .map(row)
        .filter(|r| image.is_none_or(|name| r.image == name))
        .collect();
    let definitions: BTreeSet<String> = rows
        .iter()
        .map(|r| r.image.clone())
        .filter(|i| !i.is_empty())
        .collect();
    for def in definitions {
        let Some(parameter) = parameter_of(&def) else {
            continue;
        };
        let current = current_parameter(ssm, &parameter)
            .await
            .with_context(|| format!("finding which {def} image is published"))?;
        if let Some(current) = current {
            for r in rows
                .iter_mut()
                .filter(|r| r.image == def && r.image_id == current)
            {
                r.published = true;
            }
        }
    }
    Ok(rows)
}

/// What `prune` did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub deregistered: Vec<String>,
    pub snapshots_deleted: Vec<String>,
}

/// `builder images prune IMAGE --keep N`: keeps the newest N available images of the definition
/// and, in addition, the one its SSM parameter points at; deregisters the rest and deletes their
/// snapshots. Images that are not `available` (a bake in progress, a disabled image) are left
/// alone and reported as kept; `builder gc` removes failed leftovers. This region only.
pub async fn prune(
    ec2: &aws_sdk_ec2::Client,
    ssm: &aws_sdk_ssm::Client,
    def: &ImageDef,
    keep: usize,
    dry_run: bool,
) -> Result<PruneReport> {
    // Which image is published must be known for sure before anything is removed.
    let published = match &def.ssm_parameter {
        Some(p) => current_parameter(ssm, p).await.with_context(|| {
            format!(
                "pruning {} images: cannot tell which one is published, so none is removed",
                def.image
            )
        })?,
        None => None,
    };
    let images = owned_images(
        ec2,
        vec![
            managed_filter(),
            filter(&format!("tag:{}", tags::IMAGE), &def.image),
        ],
        &format!("the builder's {} images", def.image),
    )
    .await?;
    let mut report = PruneReport::default();
    let mut kept_available = 0;
    for img in images
        .iter()
        .filter(|i| tag_map(i.tags()).get(tags::IMAGE) == Some(&def.image))
    {
        let id = img.image_id().unwrap_or_default().to_string();
        let available = img.state() == Some(&ImageState::Available);
        if !available || published.as_deref() == Some(id.as_str()) {
            report.kept.push(id);
            continue;
        }
        if kept_available < keep {
            kept_available += 1;
            report.kept.push(id);
            continue;
        }
        if dry_run {
            report.snapshots_deleted.extend(image::snapshots_of(img));
        } else {
            let deleted = image::deregister_with_snapshots(ec2, &id)
                .await
                .with_context(|| format!("pruning {} images: removing {id}", def.image))?;
            report.snapshots_deleted.extend(deleted);
        }
        report.deregistered.push(id);
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
