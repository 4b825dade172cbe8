//! `builder gc`: removes what killed runs left behind, in one region.
//!
//! - Seed instances and security groups tagged `stackless:temporary=true` whose
//!   `stackless:expires-at` is in the past: instances are terminated first (and waited for, since
//!   a group in use cannot be deleted), then the groups.
//! - Images tagged by the builder that never became `available`: `failed`, `error` and `invalid`
//!   ones at once (they never will), `pending` ones once their build has expired
//!   ([`BUILD_LIFETIME`] after the build started). Their snapshots go with them.
//!
//! - With `--build`, builds the caller knows are over (killed: their id is in their log): what
//!   they left goes now, whatever its expiry, and so do the images they made but never
//!   published (an image their definition's parameter names is kept: that publish had finished
//!   but for its last tag). Copies are left alone: a copy carries no published tag of its own.
//!
//! Nothing without those tags is ever touched, and a temporary resource whose expiry cannot be
//! read is skipped, not guessed at.

use super::ami::{self as image, tag_map};
use super::tags;
use crate::aws::tag_filter;
use crate::aws::waiter::Wait;
use crate::aws::{aws_error, error_code};
use anyhow::{Context, Result};
use aws_sdk_ec2::types::{Filter, ImageState, InstanceStateName, Tag};
use serde::Serialize;
use std::time::{Duration, SystemTime};

/// How long after its start a build may still be making its image. Longer than any lease
/// (definitions allow 24 hours at most) plus the image wait.
pub const BUILD_LIFETIME: Duration = Duration::from_secs(26 * 60 * 60);

/// What `gc` removed (or, dry, would remove), and what it found but left, with why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub instances_terminated: Vec<String>,
    pub groups_deleted: Vec<String>,
    pub images_deregistered: Vec<String>,
    /// `ID: reason`.
    pub skipped: Vec<String>,
}

/// Builds known to be over (`builder gc --build`), and what it takes to tell whether an image of
/// theirs went live.
pub struct Ended<'a> {
    pub builds: &'a [String],
    pub ssm: &'a aws_sdk_ssm::Client,
    /// The SSM parameter a definition publishes to, by the definition's name.
    pub parameter_of: &'a dyn Fn(&str) -> Option<String>,
}

impl Ended<'_> {
    fn has(&self, tags: &[Tag]) -> bool {
        tag_map(tags)
            .get(tags::BUILD_ID)
            .is_some_and(|b| self.builds.contains(b))
    }
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Ok(true) when the resource's expiry has passed; Err(reason) when it cannot be read.
fn expired(tags: &[Tag], now: SystemTime) -> std::result::Result<bool, String> {
    let t = tag_map(tags);
    let value = t
        .get(tags::EXPIRES_AT)
        .ok_or_else(|| format!("tagged temporary but has no {} tag", tags::EXPIRES_AT))?;
    let at = humantime::parse_rfc3339_weak(value)
        .map_err(|e| format!("unreadable {} `{value}` ({e})", tags::EXPIRES_AT))?;
    Ok(at <= now)
}

/// When a build started, from its id (`b-YYYYMMDDhhmmss-xxxxxx`).
pub fn build_started(build_id: &str) -> Option<SystemTime> {
    let ts = build_id.strip_prefix("b-")?.get(..14)?;
    if !ts.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let text = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &ts[0..4],
        &ts[4..6],
        &ts[6..8],
        &ts[8..10],
        &ts[10..12],
        &ts[12..14]
    );
    humantime::parse_rfc3339(&text).ok()
}

/// See the module doc. `now` decides what has expired; `dry_run` only reports.
pub async fn gc(
    ec2: &aws_sdk_ec2::Client,
    now: SystemTime,
    dry_run: bool,
    ended: Option<&Ended<'_>>,
) -> Result<GcReport> {
    let mut report = GcReport::default();
    instances(ec2, now, dry_run, ended, &mut report).await?;
    groups(ec2, now, dry_run, ended, &mut report).await?;
    images(ec2, now, dry_run, ended, &mut report).await?;
    Ok(report)
}

/// Ok(true) when a temporary resource is garbage: its build is over or its expiry has passed.
fn over(
    tags: &[Tag],
    now: SystemTime,
    ended: Option<&Ended<'_>>,
) -> std::result::Result<bool, String> {
    if ended.is_some_and(|e| e.has(tags)) {
        return Ok(true);
    }
    expired(tags, now)
}

async fn instances(
    ec2: &aws_sdk_ec2::Client,
    now: SystemTime,
    dry_run: bool,
    ended: Option<&Ended<'_>>,
    report: &mut GcReport,
) -> Result<()> {
    let reservations = ec2
        .describe_instances()
        .filters(tag_filter(tags::TEMPORARY, "true"))
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .build(),
        )
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(aws_error)
        .context("gc: listing temporary instances (the builder needs ec2:DescribeInstances)")?;
    let mut doomed = Vec::new();
    for instance in reservations.iter().flat_map(|r| r.instances()) {
        let id = instance.instance_id().unwrap_or_default().to_string();
        let state = instance.state().and_then(|s| s.name());
        if matches!(
            state,
            Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
        ) {
            continue;
        }
        if tag_map(instance.tags())
            .get(tags::TEMPORARY)
            .map(String::as_str)
            != Some("true")
        {
            continue;
        }
        match over(instance.tags(), now, ended) {
            Ok(true) => doomed.push(id),
            Ok(false) => report.skipped.push(format!("{id}: not expired yet")),
            Err(why) => report.skipped.push(format!("{id}: {why}")),
        }
    }
    if doomed.is_empty() {
        return Ok(());
    }
    if !dry_run {
        let wait = Wait::new(
            format!("instances {} to terminate", doomed.join(", ")),
            Duration::from_secs(15 * 60),
        )
        .interval(Duration::from_secs(2), Duration::from_secs(15))
        .progress(true)
        .hint("run `builder gc` again later to delete their security groups");
        crate::aws::instances::terminate(ec2, &doomed, wait)
            .await
            .with_context(|| {
                format!(
                    "gc: terminating expired seed instances {}",
                    doomed.join(", ")
                )
            })?;
    }
    report.instances_terminated = doomed;
    Ok(())
}

async fn groups(
    ec2: &aws_sdk_ec2::Client,
    now: SystemTime,
    dry_run: bool,
    ended: Option<&Ended<'_>>,
    report: &mut GcReport,
) -> Result<()> {
    let groups = ec2
        .describe_security_groups()
        .filters(tag_filter(tags::TEMPORARY, "true"))
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(aws_error)
        .context(
            "gc: listing temporary security groups (the builder needs ec2:DescribeSecurityGroups)",
        )?;
    for group in groups {
        let id = group.group_id().unwrap_or_default().to_string();
        if tag_map(group.tags())
            .get(tags::TEMPORARY)
            .map(String::as_str)
            != Some("true")
        {
            continue;
        }
        match over(group.tags(), now, ended) {
            Ok(true) => {}
            Ok(false) => {
                report.skipped.push(format!("{id}: not expired yet"));
                continue;
            }
            Err(why) => {
                report.skipped.push(format!("{id}: {why}"));
                continue;
            }
        }
        if dry_run {
            report.groups_deleted.push(id);
            continue;
        }
        match ec2.delete_security_group().group_id(&id).send().await {
            Ok(_) => report.groups_deleted.push(id),
            Err(e) if error_code(&e) == Some("InvalidGroup.NotFound") => {}
            Err(e) if error_code(&e) == Some("DependencyViolation") => {
                report.skipped.push(format!("{id}: still in use (an instance or network interface); run `builder gc` again later"))
            }
            Err(e) => report.skipped.push(format!("{id}: could not be deleted: {}", aws_error(e))),
        }
    }
    Ok(())
}

async fn images(
    ec2: &aws_sdk_ec2::Client,
    now: SystemTime,
    dry_run: bool,
    ended: Option<&Ended<'_>>,
    report: &mut GcReport,
) -> Result<()> {
    let images = ec2
        .describe_images()
        .owners("self")
        .include_deprecated(true)
        .include_disabled(true)
        .filters(tag_filter(tags::MANAGED_BY, tags::MANAGED_BY_VALUE))
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(aws_error)
        .context("gc: listing the builder's images (the builder needs ec2:DescribeImages)")?;
    for img in images {
        let id = img.image_id().unwrap_or_default().to_string();
        let t = tag_map(img.tags());
        if t.get(tags::MANAGED_BY).map(String::as_str) != Some(tags::MANAGED_BY_VALUE) {
            continue;
        }
        let state = img.state().cloned().unwrap_or(ImageState::Pending);
        let ended = ended.filter(|e| e.has(img.tags()));
        let remove = match state {
            ImageState::Failed | ImageState::Error | ImageState::Invalid => true,
            // A build that is over will never finish these.
            ImageState::Pending | ImageState::Transient if ended.is_some() => true,
            ImageState::Available => match ended {
                Some(e) => unpublished(e, &id, &t, report).await?,
                None => false,
            },
            ImageState::Pending | ImageState::Transient => {
                let started = t
                    .get(tags::BUILD_ID)
                    .and_then(|b| build_started(b))
                    .or_else(|| {
                        img.creation_date()
                            .and_then(|c| humantime::parse_rfc3339_weak(c).ok())
                    });
                match started {
                    Some(start) if start + BUILD_LIFETIME <= now => true,
                    Some(start) => {
                        report.skipped.push(format!(
                            "{id}: {} and its build may still be running (until {})",
                            state.as_str(),
                            stamp(start + BUILD_LIFETIME)
                        ));
                        false
                    }
                    None => {
                        report.skipped.push(format!(
                            "{id}: {} but its build time is unknown",
                            state.as_str()
                        ));
                        false
                    }
                }
            }
            // available, disabled (on purpose), deregistered (going): not garbage.
            _ => false,
        };
        if !remove {
            continue;
        }
        if !dry_run {
            image::deregister(ec2, &id)
                .await
                .with_context(|| format!("gc: removing the {} image {id}", state.as_str()))?;
        }
        report.images_deregistered.push(id);
    }
    Ok(())
}

/// Whether an available image of an ended build is an unfinished one: not tagged published, not
/// a copy, and not what its definition's parameter names.
async fn unpublished(
    ended: &Ended<'_>,
    id: &str,
    t: &std::collections::BTreeMap<String, String>,
    report: &mut GcReport,
) -> Result<bool> {
    if t.get(tags::PUBLISHED).map(String::as_str) == Some("true") {
        return Ok(false);
    }
    if t.contains_key(super::publish::COPY_OF) {
        report.skipped.push(format!(
            "{id}: a copy; it goes with the image it was copied from"
        ));
        return Ok(false);
    }
    let parameter = t
        .get(tags::IMAGE)
        .and_then(|name| (ended.parameter_of)(name));
    if let Some(p) = parameter {
        let live = super::publish::current_parameter(ended.ssm, &p)
            .await
            .with_context(|| format!("gc: reading {p}, which may name image {id}"))?;
        if live.as_deref() == Some(id) {
            report
                .skipped
                .push(format!("{id}: {p} names it (its publish had finished)"));
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
