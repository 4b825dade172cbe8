//! The local target: a Debian root made by debootstrap (cached), provisioned through a chroot
//! with the very same command stream as the AWS seed instance, then turned into a qcow2 disk
//! image with the image's own kernel beside it, under `out/IMAGE/BUILD_ID/`.
//!
//! `start` mounts the packages layer (`layer.rs`; made on the base, unpacked or debootstrapped,
//! when there is none) as an overlay on `out/IMAGE/.build-ID/root` (`overlay.rs`; copied where no
//! overlay can be mounted), stages the host's CA bundle when asked, stops package scripts from
//! starting services, and mounts proc, sys, dev and a tmpfs /run. `snapshot` unmounts those,
//! undoes the build-only changes and makes the disk from the root. `cleanup` unmounts whatever
//! is still mounted, the overlay last, and removes the build folder (only what the build wrote),
//! never while anything is mounted under it. A bake killed before its cleanup leaves its folder
//! mounted; the next bake removes it (`abandoned.rs`: each build holds a lock on its folder).

pub mod abandoned;
pub mod base;
pub mod caches;
pub mod disk;
pub mod flock;
pub mod layer;
pub mod mounts;
pub mod overlay;
pub mod process;

use crate::arch::Arch;
use crate::communicator::chroot::{ChrootCommunicator, BUILD_CA_IN_ROOT, HOST_CA_BUNDLE};
use crate::communicator::{run_checked, Communicator};
use crate::definition::ImageDef;
use crate::platform::{Artifact, Build, ResolvedSource, Target};
use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use base::BaseSpec;
use caches::BindCache;
use layer::LayerSpec;
use mounts::{remove_tree, Mounts};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Keeps package maintainer scripts from starting daemons inside the build root.
const POLICY_RC_D: &str = "usr/sbin/policy-rc.d";

#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// `out/IMAGE`: each build's disk goes into a folder named after the build id.
    pub out_dir: PathBuf,
    /// The manifest of the last bake (for reuse by input hash).
    pub manifest: PathBuf,
    /// Where the debootstrapped base is cached.
    pub cache_dir: PathBuf,
    /// A cached base older than this is debootstrapped again (it ages with Debian's updates).
    pub base_max_age: Duration,
    /// Trust the host's CA bundle while building (removed again by the generalising step).
    pub build_ca: bool,
    /// Finished builds kept under `out/IMAGE` (the newest first); older ones are removed.
    pub keep_builds: usize,
    /// Keep pip's wheels and apt's packages across bakes, under `cache_dir/pip` and
    /// `cache_dir/apt` (see `caches.rs`).
    pub provision_caches: bool,
    /// Start from the base with the definition's apt packages installed, cached as the folder
    /// `cache_dir/layer-KEY.d` (see `layer.rs`), and as old as the base may be.
    pub packages_layer: bool,
}

impl LocalOptions {
    pub fn new(out_dir: PathBuf, manifest: PathBuf) -> Self {
        Self {
            out_dir,
            manifest,
            cache_dir: base::default_cache_dir(),
            base_max_age: Duration::from_secs(7 * 24 * 3600),
            build_ca: true,
            keep_builds: 2,
            provision_caches: true,
            packages_layer: true,
        }
    }
}

pub struct LocalTarget {
    opts: LocalOptions,
    spec: Option<BaseSpec>,
    /// `out/IMAGE/.build-ID`, while a build is under way.
    work: Option<PathBuf>,
    /// This bake's lock on `work`, held until the folder is gone (`abandoned.rs`).
    owner: Option<abandoned::BuildOwner>,
    mounts: Option<Mounts>,
    /// The caches lent to provisioning, mounted from `start` until provisioning is done.
    caches: Vec<BindCache>,
    /// The packages layer under the build root (the overlay and the layer's lock), from `start`
    /// to `cleanup`. After `mounts` and `caches`: dropped last, as it is mounted first.
    layer_root: Option<layer::LayerRoot>,
}

/// The part of a manifest `find_existing` reads.
#[derive(Deserialize)]
struct ManifestHead {
    input_hash: String,
    artifact: String,
    #[serde(default)]
    details: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    cleanup_error: Option<String>,
}

impl LocalTarget {
    pub fn new(opts: LocalOptions) -> Self {
        Self {
            opts,
            spec: None,
            work: None,
            owner: None,
            mounts: None,
            caches: Vec::new(),
            layer_root: None,
        }
    }

    fn root(&self) -> Result<PathBuf> {
        self.work
            .as_ref()
            .map(|w| w.join("root"))
            .context("the build root is not there: start was not called or failed")
    }

    /// Unmounts the caches lent to provisioning and gives their locks back. Safe more than once.
    fn release_caches(&mut self) -> Result<()> {
        for mut c in self.caches.drain(..) {
            c.unmount().context("unmounting the caches")?;
        }
        Ok(())
    }

    /// Removes finished builds beyond `keep_builds`, newest kept (build ids sort by time).
    fn prune_builds(&self, current: &str) {
        let Ok(entries) = std::fs::read_dir(&self.opts.out_dir) else {
            return;
        };
        let mut builds: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join("disk.qcow2").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("b-") && n != current)
            .collect();
        builds.sort();
        let keep_others = self.opts.keep_builds.saturating_sub(1);
        let drop_count = builds.len().saturating_sub(keep_others);
        for old in builds.into_iter().take(drop_count) {
            let dir = self.opts.out_dir.join(&old);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(build = %old, "removed an older local build"),
                Err(e) => tracing::warn!("removing the older build {}: {e}", dir.display()),
            }
        }
    }
}

#[async_trait]
impl Target for LocalTarget {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn resolve_source(&mut self, def: &ImageDef) -> Result<ResolvedSource> {
        if let Some(arch) = def.arch.filter(|a| *a != Arch::X86_64) {
            bail!(
                "`{}` is an {arch} image ([instance] arch), and the local target bakes x86_64 only: it debootstraps \
                 amd64 and boots the disk in qemu-system-x86_64. An {arch} local bake would need debootstrap --foreign \
                 finished under qemu-user-static, an {arch} kernel and qemu-system-aarch64 with UEFI firmware, which the \
                 builder does not do; bake it on AWS (--target aws)",
                def.image
            );
        }
        let spec = BaseSpec {
            release: def.local_release.clone(),
            mirror: def.local_mirror.clone(),
        };
        let id = spec.source_id();
        self.spec = Some(spec);
        Ok(ResolvedSource {
            id,
            arch: Arch::X86_64,
        })
    }

    async fn find_existing(
        &mut self,
        _def: &ImageDef,
        input_hash: &str,
    ) -> Result<Option<Artifact>> {
        let Ok(text) = std::fs::read_to_string(&self.opts.manifest) else {
            return Ok(None);
        };
        let Ok(m) = serde_json::from_str::<ManifestHead>(&text) else {
            tracing::warn!(manifest = %self.opts.manifest.display(), "unreadable manifest; baking anew");
            return Ok(None);
        };
        if m.input_hash != input_hash
            || m.cleanup_error.is_some()
            || !Path::new(&m.artifact).exists()
        {
            return Ok(None);
        }
        Ok(Some(Artifact {
            id: m.artifact,
            regions: Default::default(),
            details: m.details,
        }))
    }

    async fn start(&mut self, def: &ImageDef, build: &Build) -> Result<Arc<dyn Communicator>> {
        let spec = self
            .spec
            .clone()
            .context("resolve_source must run before start")?;
        std::fs::create_dir_all(&self.opts.out_dir)
            .with_context(|| format!("creating {}", self.opts.out_dir.display()))?;
        let out_dir = self
            .opts
            .out_dir
            .canonicalize()
            .with_context(|| format!("finding {}", self.opts.out_dir.display()))?;
        // A bake killed with SIGKILL left its folder mounted; never let those pile up.
        abandoned::remove_abandoned_builds(&out_dir);
        let work = out_dir.join(format!(".build-{}", build.id));
        self.owner = Some(abandoned::BuildOwner::claim(&work)?);
        self.work = Some(work.clone());
        let root = work.join("root");
        let (cache, max_age) = (&self.opts.cache_dir, self.opts.base_max_age);
        let layer = LayerSpec::new(&spec, &def.packages, def.supervisor)
            .filter(|_| self.opts.packages_layer);
        let cached = match &layer {
            Some(layer) => {
                // The layer's install lends apt's cache, as provisioning does.
                let apt = self
                    .opts
                    .provision_caches
                    .then(|| caches::apt_host_dir(cache, &def.local_release, Arch::X86_64.ec2()));
                let filled = layer::prepare(
                    &spec,
                    layer,
                    &root,
                    cache,
                    max_age,
                    apt.as_deref(),
                    self.opts.build_ca,
                )
                .await?;
                let cached = filled.cached;
                self.layer_root = Some(filled);
                cached
            }
            None => base::prepare(&spec, &root, cache, max_age).await?,
        };
        tracing::info!(root = %root.display(), cached, layer = layer.is_some(), "build root ready");

        // Build-only changes, undone by `snapshot`. The host's CA comes after the layer is made:
        // it must never be cached in it.
        write_policy_rc_d(&root)?;
        copy_host_resolv_conf(&root)?;
        if self.opts.build_ca {
            let to = root.join(BUILD_CA_IN_ROOT);
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::copy(HOST_CA_BUNDLE, &to).with_context(|| {
                format!("copying the host's CA bundle {HOST_CA_BUNDLE} into the build root (install ca-certificates on the host, or bake without it)")
            })?;
        }
        self.mounts = Some(Mounts::mount(&root)?);
        let mut comm = ChrootCommunicator::new(root.clone(), self.opts.build_ca);
        if self.opts.provision_caches {
            let (cache, release, arch) =
                (&self.opts.cache_dir, &def.local_release, Arch::X86_64.ec2());
            let max_age = self.opts.base_max_age;
            // Built wheels are code the next bake runs as root: the host's root alone reads them.
            let pip = caches::pip_host_dir(cache, &def.salt_version, release, arch);
            if let Some(c) = BindCache::mount(&pip, &root, caches::PIP_IN_ROOT, 0o700, max_age)? {
                self.caches.push(c);
                comm = comm.with_pip_cache(&format!("/{}", caches::PIP_IN_ROOT));
            }
            if root.join(caches::APT_IN_ROOT).is_dir() {
                // apt's own sandbox user must reach it, as in the root's own folder.
                let apt = caches::apt_host_dir(cache, release, arch);
                if let Some(c) = BindCache::mount(&apt, &root, caches::APT_IN_ROOT, 0o755, max_age)?
                {
                    self.caches.push(c);
                }
            }
        }
        if self.opts.build_ca {
            run_checked(
                &comm,
                "trusting the host's CA bundle",
                "update-ca-certificates >/dev/null",
                Duration::from_secs(120),
            )
            .await?;
        }
        Ok(Arc::new(comm))
    }

    async fn provisioned(&mut self) -> Result<()> {
        self.release_caches().context("before generalising")
    }

    async fn snapshot(&mut self, def: &ImageDef, build: &Build) -> Result<Artifact> {
        self.release_caches()?;
        if let Some(mut m) = self.mounts.take() {
            m.unmount()
                .context("unmounting the build root before making the disk")?;
        }
        let root = self.root()?;
        std::fs::remove_file(root.join(POLICY_RC_D)).context("removing the build's policy-rc.d")?;
        if root.join(BUILD_CA_IN_ROOT).exists() {
            anyhow::bail!(
                "the generalising step left the build host's CA bundle in the image (/{BUILD_CA_IN_ROOT}); \
                 a custom generalize.sh must keep the `build_ca` block of the built-in one"
            );
        }
        caches::check_absent(&root)?;
        // The guest's DHCP client writes its own; the host's has no business in the image.
        let resolv = root.join("etc/resolv.conf");
        let _ = std::fs::remove_file(&resolv);
        std::fs::write(&resolv, "").context("emptying /etc/resolv.conf in the image")?;

        let dir = self.opts.out_dir.join(&build.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let d = disk::make(&root, &dir, &def.local_disk_size).await?;
        let rel = |p: &Path| {
            p.strip_prefix(&self.opts.out_dir)
                .unwrap_or(p)
                .to_string_lossy()
                .to_string()
        };
        let mut details = std::collections::BTreeMap::new();
        details.insert("disk".into(), rel(&d.disk));
        details.insert("kernel".into(), rel(&d.kernel));
        details.insert("initrd".into(), rel(&d.initrd));
        details.insert("cmdline".into(), disk::KERNEL_CMDLINE.into());
        details.insert("disk_size".into(), d.size_bytes.to_string());
        details.insert("release".into(), def.local_release.clone());
        self.prune_builds(&build.id);
        Ok(Artifact {
            id: d.disk.to_string_lossy().to_string(),
            regions: Default::default(),
            details,
        })
    }

    async fn cleanup(&mut self, build: &Build, failed: bool, keep: bool) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        // The caches first: the root's own mounts refuse to go while anything is mounted below.
        self.release_caches()?;
        if let Some(mut m) = self.mounts.take() {
            m.unmount().context("unmounting the build root")?;
        }
        let overlaid = self
            .layer_root
            .as_ref()
            .filter(|l| l.filled == layer::Filled::Overlay)
            .map(|l| l.layer.clone());
        if let Some(mut l) = self.layer_root.take() {
            l.release().context("unmounting the build root's overlay")?;
        }
        if let Some(work) = &self.work {
            if keep {
                let look = match overlaid {
                    // The overlay is unmounted: root/ is empty until it is mounted again.
                    Some(lower) => format!(
                        "`mount -t overlay overlay -o lowerdir={},upperdir={w}/upper,workdir={w}/overlay-work {w}/root` \
                         and `chroot {w}/root` to look; what the build wrote is in {w}/upper",
                        lower.display(),
                        w = work.display()
                    ),
                    None => format!("`chroot {}/root` to look", work.display()),
                };
                if let Err(e) = abandoned::mark_kept(work) {
                    tracing::warn!("{e:#}; the next bake may remove the kept build folder");
                }
                notes.push(format!(
                    "the build root is kept for debugging at {} (nothing is mounted there; {look}; `rm -rf {}` when done)",
                    work.display(),
                    work.display()
                ));
            } else {
                remove_tree(work)?;
            }
        }
        self.owner = None;
        if failed {
            let half = self.opts.out_dir.join(&build.id);
            if half.exists() {
                std::fs::remove_dir_all(&half)
                    .with_context(|| format!("removing the half-made {}", half.display()))?;
            }
        }
        Ok(notes)
    }
}

/// Keeps package scripts from starting daemons in the root (removed before anything is cached or
/// snapshotted).
fn write_policy_rc_d(root: &Path) -> Result<()> {
    let policy = root.join(POLICY_RC_D);
    std::fs::write(
        &policy,
        "#!/bin/sh\n# builder: no daemons start inside the build root.\nexit 101\n",
    )
    .with_context(|| format!("writing {}", policy.display()))?;
    set_mode(&policy, 0o755)
}

/// apt and pip in the root resolve names as the host does (emptied again before caching or
/// snapshotting).
fn copy_host_resolv_conf(root: &Path) -> Result<()> {
    if Path::new("/etc/resolv.conf").exists() {
        let to = root.join("etc/resolv.conf");
        let _ = std::fs::remove_file(&to); // may be a dangling symlink
        std::fs::copy("/etc/resolv.conf", &to)
            .context("copying the host's /etc/resolv.conf into the build root")?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

#[cfg(test)]
mod seed_tests;
#[cfg(test)]
mod tests;
