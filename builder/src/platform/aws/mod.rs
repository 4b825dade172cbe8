//! The AWS target: a seed instance reached over SSM, turned into an AMI.
//!
//! `start` resolves the source, creates a temporary security group with no inbound rules,
//! launches the seed on a lease (IMDSv2 only, tagged with the build, powering itself off after
//! `lease_minutes`), waits until it runs and its SSM agent is online, and hands back an
//! [`crate::communicator::ssm::SsmCommunicator`]. `snapshot` stops it and calls `image` and `publish`. `cleanup` removes
//! what the build made, found both from what was recorded and by the build's tag, so a call that
//! was cancelled half-way (an instance whose id never came back) is still cleaned up.

pub mod ami;
pub mod catalog;
pub mod console;
pub mod gc;
pub mod instance;
pub mod publish;
pub mod security_group;
pub mod source;
pub mod tags;

use crate::arch::Arch;
use crate::aws::{aws_error, tag_filter};
use crate::communicator::Communicator;
use crate::definition::ImageDef;
use crate::platform::{Artifact, Build, ResolvedSource, Target};
use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use aws_sdk_ec2::types::InstanceStateName;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Wait limits and polling for the AWS target. The defaults leave room for a slow but healthy
/// AWS; image waits are `image::ImageWaits`.
#[derive(Debug, Clone)]
pub struct AwsOptions {
    /// How long the seed's SSM agent may take to come online.
    pub ssm_wait: Duration,
    /// The first pause between GetCommandInvocation (and DescribeInstanceInformation) calls; it
    /// grows up to 8 times this, at most 10 s.
    pub command_poll: Duration,
    /// How often the seed's console is read (GetConsoleOutput) while waiting for SSM, for the
    /// user-data's failure line.
    pub console_poll: Duration,
    /// How long the seed may take to run, stop or terminate.
    pub instance_wait: Duration,
    /// How long a security group may stay in use (by an instance shutting down) before its
    /// deletion is given up.
    pub delete_wait: Duration,
    /// Spinners with the elapsed time on stderr (only drawn where stderr is a terminal).
    pub progress: bool,
}

impl Default for AwsOptions {
    fn default() -> Self {
        AwsOptions {
            ssm_wait: Duration::from_secs(15 * 60),
            command_poll: Duration::from_secs(1),
            console_poll: Duration::from_secs(15),
            instance_wait: Duration::from_secs(15 * 60),
            delete_wait: Duration::from_secs(5 * 60),
            progress: true,
        }
    }
}

/// What this target has made so far, recorded as it goes.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Created {
    pub security_group: Option<String>,
    pub instance: Option<String>,
    /// The image made from the seed (until the bake has published it, a half-made image).
    pub image: Option<String>,
    pub snapshots: Vec<String>,
    /// The image was published: a later cleanup must leave it alone.
    pub published: bool,
}

pub struct AwsTarget {
    config: aws_config::SdkConfig,
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    opts: AwsOptions,
    source: Option<source::SourceImage>,
    created: Created,
    /// When the seed's lease ends (its `EXPIRES_AT` tag).
    lease_ends: Option<String>,
    /// Regions the definition copies to: an interrupted publish may have left copies there.
    copy_regions: Vec<String>,
    /// The parameter the definition publishes to: if it already names this build's image, the
    /// publish finished and nothing of it may be removed.
    ssm_parameter: Option<String>,
}

impl AwsTarget {
    pub fn new(config: aws_config::SdkConfig, opts: AwsOptions) -> Self {
        let ec2 = aws_sdk_ec2::Client::new(&config);
        let ssm = aws_sdk_ssm::Client::new(&config);
        AwsTarget {
            config,
            ec2,
            ssm,
            opts,
            source: None,
            created: Created::default(),
            lease_ends: None,
            copy_regions: Vec::new(),
            ssm_parameter: None,
        }
    }

    /// Uses this SSM client for Run Command (tests point it at an SSM stand-in).
    pub fn with_ssm_client(mut self, ssm: aws_sdk_ssm::Client) -> Self {
        self.ssm = ssm;
        self
    }

    pub fn created(&self) -> &Created {
        &self.created
    }

    pub fn ec2(&self) -> &aws_sdk_ec2::Client {
        &self.ec2
    }

    pub fn region(&self) -> String {
        self.config
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".into())
    }

    /// The commands that remove the seed and its group by hand.
    fn removal_commands(&self, instances: &[String], groups: &[String]) -> Vec<String> {
        let region = self.region();
        let mut cmds = Vec::new();
        if !instances.is_empty() {
            let ids = instances.join(" ");
            cmds.push(format!(
                "aws ec2 terminate-instances --region {region} --instance-ids {ids}"
            ));
            cmds.push(format!(
                "aws ec2 wait instance-terminated --region {region} --instance-ids {ids}"
            ));
        }
        for g in groups {
            cmds.push(format!(
                "aws ec2 delete-security-group --region {region} --group-id {g}"
            ));
        }
        cmds
    }

    async fn source_for(&mut self, build: &Build) -> Result<source::SourceImage> {
        match &self.source {
            Some(s) if s.image_id == build.source => Ok(s.clone()),
            _ => {
                let s = source::describe(&self.ec2, &build.source).await?;
                self.source = Some(s.clone());
                Ok(s)
            }
        }
    }
}

/// The tags of everything temporary a build makes (the seed, its volume, its group): the
/// definition's own tags, then the builder's, which win.
pub fn temporary_tags(def: &ImageDef, build: &Build, now: SystemTime) -> BTreeMap<String, String> {
    let lease = Duration::from_secs(u64::try_from(def.lease_minutes).unwrap_or(0) * 60);
    let mut t = def.tags.clone();
    t.insert(
        "Name".into(),
        format!("stackless-build {} {}", def.image, build.id),
    );
    t.insert(tags::BUILD_ID.into(), build.id.clone());
    t.insert(tags::IMAGE.into(), def.image.clone());
    t.insert(tags::TEMPORARY.into(), "true".into());
    t.insert(
        tags::EXPIRES_AT.into(),
        humantime::format_rfc3339_seconds(now + lease).to_string(),
    );
    t.insert(tags::MANAGED_BY.into(), tags::MANAGED_BY_VALUE.into());
    t
}

/// Images of this build in the home region (any state), whatever was recorded.
async fn images_by_build(ec2: &aws_sdk_ec2::Client, build_id: &str) -> Result<Vec<String>> {
    let out = ec2
        .describe_images()
        .owners("self")
        .include_deprecated(true)
        .include_disabled(true)
        .filters(tag_filter(tags::BUILD_ID, build_id))
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("looking for images tagged {}={build_id}", tags::BUILD_ID))?;
    Ok(out
        .images()
        .iter()
        .filter_map(|i| i.image_id())
        .map(str::to_string)
        .collect())
}

#[async_trait]
impl Target for AwsTarget {
    fn kind(&self) -> &'static str {
        "aws"
    }

    async fn resolve_source(&mut self, def: &ImageDef) -> Result<ResolvedSource> {
        let s = source::resolve(&self.ec2, &self.ssm, &def.source)
            .await
            .with_context(|| {
                format!(
                    "resolving the source image of `{}` in {}",
                    def.image,
                    self.region()
                )
            })?;
        let Some(arch) = Arch::from_ec2(&s.architecture) else {
            bail!(
                "the source image {} ({}) of `{}` is `{}`: the builder bakes x86_64 and arm64 images",
                s.image_id,
                s.name,
                def.image,
                s.architecture
            );
        };
        if let Some(want) = def.arch {
            if want != arch {
                bail!(
                    "`{}` says [instance] arch = \"{want}\", but its source image {} ({}) is {arch}: fix [source] or [instance] arch",
                    def.image,
                    s.image_id,
                    s.name
                );
            }
        }
        // The seed must be able to run the image: refused here, before anything is launched
        // (preflight says the same; this holds with --skip-preflight too).
        let check =
            crate::preflight::compute::architecture(&self.ec2, &def.instance_type, Some(&s)).await;
        match check.status {
            crate::preflight::Status::Failed => bail!(
                "`{}` cannot be baked: {}; {}",
                def.image,
                check.detail,
                check.fix.unwrap_or_default()
            ),
            crate::preflight::Status::Unchecked => {
                tracing::warn!(
                    "the instance type's architecture was not checked: {}",
                    check.detail
                )
            }
            crate::preflight::Status::Passed => {}
        }
        let id = s.image_id.clone();
        self.source = Some(s);
        Ok(ResolvedSource { id, arch })
    }

    async fn find_existing(
        &mut self,
        def: &ImageDef,
        input_hash: &str,
    ) -> Result<Option<Artifact>> {
        catalog::find_by_input_hash(&self.ec2, def, input_hash).await
    }

    async fn start(&mut self, def: &ImageDef, build: &Build) -> Result<Arc<dyn Communicator>> {
        let region = self.region();
        self.copy_regions = def.regions.clone();
        self.ssm_parameter = def.ssm_parameter.clone();
        let source = self
            .source_for(build)
            .await
            .context("starting the seed instance")?;
        let tags = temporary_tags(def, build, SystemTime::now());
        self.lease_ends = tags.get(tags::EXPIRES_AT).cloned();

        let vpc = security_group::vpc_for(&self.ec2, def.subnet.as_deref())
            .await
            .context("starting the seed instance: finding its VPC")?;
        let group = security_group::create(&self.ec2, &vpc, &build.id, &tags).await?;
        self.created.security_group = Some(group.clone());

        let id = instance::launch(&self.ec2, def, build, &source, &group, &tags).await?;
        self.created.instance = Some(id.clone());

        instance::wait_state(
            &self.ec2,
            &id,
            InstanceStateName::Running,
            self.opts.instance_wait,
            self.opts.progress,
            Some(def.lease_minutes),
        )
        .await
        .with_context(|| format!("starting seed instance {id} in {region}"))?;

        let comm = crate::communicator::ssm::SsmCommunicator::new(
            self.ssm.clone(),
            id.clone(),
            self.opts.command_poll,
            self.opts.progress,
        );
        // The seed's user-data installs the SSM agent where the image has none; when that fails
        // it says so on the console, and waiting longer for SSM would be in vain.
        let console =
            console::ConsoleWatch::new(self.ec2.clone(), id.clone(), self.opts.console_poll);
        comm.wait_online_watching(self.opts.ssm_wait, || console.failure())
            .await
            .with_context(|| format!("reaching seed instance {id} in {region} over SSM"))?;
        Ok(Arc::new(comm))
    }

    async fn snapshot(&mut self, def: &ImageDef, build: &Build) -> Result<Artifact> {
        let id = self
            .created
            .instance
            .clone()
            .context("snapshot: no seed instance (start it first)")?;
        instance::stop(
            &self.ec2,
            &id,
            self.opts.instance_wait,
            self.opts.progress,
            def.lease_minutes,
        )
        .await
        .with_context(|| format!("stopping seed instance {id} before making the image"))?;
        let made = ami::create_and_wait(&self.ec2, &id, def, build).await?;
        self.created.image = Some(made.image_id.clone());
        self.created.snapshots = made.snapshot_ids.clone();
        let artifact = publish::publish(&self.config, def, build, &made).await?;
        self.created.published = true;
        Ok(artifact)
    }

    async fn cleanup(&mut self, build: &Build, failed: bool, keep: bool) -> Result<Vec<String>> {
        let region = self.region();
        let mut notes = Vec::new();
        let mut errors: Vec<String> = Vec::new();

        let mut instances: BTreeSet<String> = self.created.instance.iter().cloned().collect();
        match instance::find_by_build(&self.ec2, &build.id).await {
            Ok(found) => instances.extend(found),
            Err(e) => errors.push(format!("{e:#}")),
        }
        let mut groups: BTreeSet<String> = self.created.security_group.iter().cloned().collect();
        match security_group::find_by_build(&self.ec2, &build.id).await {
            Ok(found) => groups.extend(found),
            Err(e) => errors.push(format!("{e:#}")),
        }
        let instances: Vec<String> = instances.into_iter().collect();
        let groups: Vec<String> = groups.into_iter().collect();

        if keep && !instances.is_empty() {
            let ids = instances.join(" ");
            let lease = match &self.lease_ends {
                Some(at) => format!("at {at}"),
                None => format!("at the time in its {} tag", tags::EXPIRES_AT),
            };
            notes.push(format!(
                "kept seed instance {ids} of build {} in {region} for debugging; it powers itself off, and so terminates, when its \
                 lease ends ({lease}). Connect with `aws ssm start-session --region {region} --target {}`. Remove it with:",
                build.id, instances[0]
            ));
            notes.extend(self.removal_commands(&instances, &groups));
        } else {
            let mut instances_gone = true;
            if !instances.is_empty() {
                match instance::terminate(
                    &self.ec2,
                    &instances,
                    self.opts.instance_wait,
                    self.opts.progress,
                )
                .await
                {
                    Ok(()) => {
                        notes.push(format!("terminated seed instance {}", instances.join(" ")));
                        self.created.instance = None;
                    }
                    Err(e) => {
                        instances_gone = false;
                        errors.push(format!("{e:#}"));
                    }
                }
            }
            // A group cannot be deleted while an instance uses it: only once they are gone.
            if instances_gone {
                for g in &groups {
                    match security_group::delete(
                        &self.ec2,
                        g,
                        self.opts.delete_wait,
                        self.opts.progress,
                    )
                    .await
                    {
                        Ok(()) => {
                            notes.push(format!("deleted security group {g}"));
                            if self.created.security_group.as_deref() == Some(g.as_str()) {
                                self.created.security_group = None;
                            }
                        }
                        Err(e) => errors.push(format!("{e:#}")),
                    }
                }
            }
        }

        if failed && !self.created.published {
            let mut images: BTreeSet<String> = self.created.image.iter().cloned().collect();
            match images_by_build(&self.ec2, &build.id).await {
                Ok(found) => images.extend(found),
                Err(e) => errors.push(format!("{e:#}")),
            }
            // Interrupted after the parameter was written: the image is live; keep everything.
            if let Some(param) = self.ssm_parameter.clone() {
                if let Ok(Some(live)) = publish::current_parameter(&self.ssm, &param).await {
                    if images.contains(&live) {
                        notes.push(format!(
                            "the parameter {param} already names {live} from this build: publishing had finished, nothing removed"
                        ));
                        self.created.published = true;
                        images.clear();
                        self.copy_regions.clear();
                    }
                }
            }
            // Copies an interrupted publish made in other regions.
            for r in self.copy_regions.clone().iter().filter(|r| **r != region) {
                match ami::deregister_build(&publish::ec2_for(&self.config, r), &build.id).await {
                    Ok(gone) if !gone.is_empty() => {
                        notes.push(format!("deregistered the copies {} in {r}", gone.join(" ")))
                    }
                    Ok(_) => {}
                    Err(e) => errors.push(format!("{r}: {e:#}")),
                }
            }
            for img in images {
                match ami::deregister(&self.ec2, &img).await {
                    Ok(()) => {
                        notes.push(format!(
                            "deregistered the half-made image {img} and deleted its snapshots"
                        ));
                        if self.created.image.as_deref() == Some(img.as_str()) {
                            self.created.image = None;
                            self.created.snapshots.clear();
                        }
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
        }

        if errors.is_empty() {
            return Ok(notes);
        }
        let mut msg = format!(
            "cleaning up build {} in {region} is incomplete:\n  {}",
            build.id,
            errors.join("\n  ")
        );
        if !notes.is_empty() {
            msg.push_str(&format!("\ndone so far:\n  {}", notes.join("\n  ")));
        }
        let by_hand = if keep {
            Vec::new()
        } else {
            self.removal_commands(&instances, &groups)
        };
        msg.push_str("\nrun `builder gc` later (everything is tagged with the build id)");
        if !by_hand.is_empty() {
            msg.push_str(&format!(
                ", or remove what is left by hand:\n  {}",
                by_hand.join("\n  ")
            ));
        }
        Err(anyhow!(msg))
    }
}

#[cfg(test)]
mod tests;
