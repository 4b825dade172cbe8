//! Where an image is baked: a seed instance on AWS, or a debootstrapped root locally. One bake
//! pipeline drives either through this trait.

pub mod aws;
pub mod local;

use crate::arch::Arch;
use crate::communicator::Communicator;
use crate::definition::ImageDef;
use anyhow::Result;
use async_trait::async_trait;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One bake's identity, stamped on everything it creates.
#[derive(Debug, Clone, Serialize)]
pub struct Build {
    /// `b-YYYYMMDDhhmmss-xxxxxx`.
    pub id: String,
    /// UTC `YYYYMMDDhhmmss`.
    pub timestamp: String,
    pub image_name: String,
    /// sha256 over every input (source, definition, templates, init binary).
    pub input_hash: String,
    /// The resolved source (an AMI id, or the local release).
    pub source: String,
    /// The source's architecture, which the image has (and its agent binary).
    pub arch: Arch,
    /// The AWS seed's user-data (`Rendered::seed_user_data`: the lease, then the SSM agent).
    #[serde(skip)]
    pub seed_user_data: String,
}

/// The definition's source, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSource {
    /// An AMI id, or the local release's id (part of the input hash).
    pub id: String,
    /// The image's architecture: the AMI's, or the local target's.
    pub arch: Arch,
}

/// What a bake produced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Artifact {
    /// The AMI id in the home region, or the disk image path.
    pub id: String,
    /// Region to AMI id, the home region included.
    pub regions: BTreeMap<String, String>,
    /// Snapshot ids, parameter names and the like, for the manifest.
    pub details: BTreeMap<String, String>,
}

#[async_trait]
pub trait Target: Send {
    /// `aws` or `local`.
    fn kind(&self) -> &'static str;
    /// Resolves the definition's source to a concrete id (part of the input hash) and its
    /// architecture, refusing what the target cannot bake for it: an `[instance] arch` other than
    /// the source's, an instance type of another architecture, an architecture the target lacks.
    async fn resolve_source(&mut self, def: &ImageDef) -> Result<ResolvedSource>;
    /// An image already baked from exactly these inputs, if any.
    async fn find_existing(&mut self, def: &ImageDef, input_hash: &str)
        -> Result<Option<Artifact>>;
    /// Starts the machine and returns a way to run commands on it.
    async fn start(&mut self, def: &ImageDef, build: &Build) -> Result<Arc<dyn Communicator>>;
    /// Provisioning is done and generalising comes next: take away what only provisioning may
    /// use (the local target unmounts its pip cache here, so nothing generalising does can reach
    /// the host's copy).
    async fn provisioned(&mut self) -> Result<()> {
        Ok(())
    }
    /// Turns the provisioned, generalised machine into the image and publishes it.
    async fn snapshot(&mut self, def: &ImageDef, build: &Build) -> Result<Artifact>;
    /// Removes everything temporary this build made (and, after a failure, any half-made image).
    /// Safe at any point and more than once. With `keep` the machine stays for debugging and the
    /// message says how to remove it.
    async fn cleanup(&mut self, build: &Build, failed: bool, keep: bool) -> Result<Vec<String>>;
}
