//! Caches kept across local bakes and lent to the build root while provisioning only. Without
//! them every bake downloads the same Debian packages and Python wheels again and builds salt's C
//! dependencies (timelib and friends) from source: most of a re-bake's time.
//!
//! * pip: a wheelhouse (every wheel an earlier bake downloaded or built) and pip's own cache, one
//!   per salt version, Debian release (which fixes the Python) and architecture, at
//!   [`PIP_IN_ROOT`] (`PIP_CACHE_DIR`; provision.sh installs from `$PIP_CACHE_DIR/wheelhouse` when
//!   it is complete, else fills it first).
//! * apt: the downloaded packages (`/var/cache/apt/archives`), one per release and architecture;
//!   apt checks each against the signed lists before using it.
//!
//! Each is bind-mounted for provisioning and unmounted before generalising (so nothing a
//! generalising script does can reach the host's copy); generalising removes the pip mount point
//! and the snapshot refuses a root that still has it, so the image never carries the cache. A
//! cache older than the base's maximum age starts over, as the base does, so dependencies do not
//! stay pinned forever.

use super::mounts::umount_or_detach;
use super::process::run_blocking;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the build root sees the pip cache (relative to the root; `PIP_CACHE_DIR` is `/` + this).
pub const PIP_IN_ROOT: &str = "var/cache/stackless-pip";
/// apt's downloaded packages, in the root.
pub const APT_IN_ROOT: &str = "var/cache/apt/archives";
/// Written when a cache folder is made: its age decides when it starts over.
const CREATED: &str = ".stackless-created";

/// The pip cache's folder under the builder's cache: `pip/salt-VERSION-RELEASE-ARCH`.
pub fn pip_host_dir(cache_dir: &Path, salt_version: &str, release: &str, arch: &str) -> PathBuf {
    cache_dir
        .join("pip")
        .join(format!("salt-{salt_version}-{release}-{arch}"))
}

/// The apt cache's folder under the builder's cache: `apt/RELEASE-ARCH`.
pub fn apt_host_dir(cache_dir: &Path, release: &str, arch: &str) -> PathBuf {
    cache_dir.join("apt").join(format!("{release}-{arch}"))
}

/// A host folder bind-mounted into a build root; unmounted by [`BindCache::unmount`] or on drop.
#[derive(Debug)]
pub struct BindCache {
    host: PathBuf,
    target: PathBuf,
    mounted: bool,
    /// The cache's lock (`HOST.lock`, flock), held while it is lent to this build.
    _lock: std::fs::File,
}

impl BindCache {
    /// Makes the host folder with `mode` (starting it over when older than `max_age`) and the
    /// mount point, and bind-mounts one on the other. `None` when another bake holds the cache:
    /// two apt or pip runs in one cache would trip over each other's locks, so this build goes
    /// without it rather than wait or fail.
    pub fn mount(
        host: &Path,
        root: &Path,
        in_root: &str,
        mode: u32,
        max_age: Duration,
    ) -> Result<Option<BindCache>> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if let Some(parent) = host.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let lock_path = host.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let locked = super::flock::try_exclusive(&lock)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        if !locked {
            tracing::warn!(cache = %host.display(), "another bake is using this cache; provisioning without it");
            return Ok(None);
        }
        let stamp = host.join(CREATED);
        let age = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > max_age) {
            tracing::info!(cache = %host.display(), "cache older than the base's maximum age; starting it over");
            std::fs::remove_dir_all(host)
                .with_context(|| format!("removing the old cache {}", host.display()))?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(host)
            .with_context(|| format!("creating the cache {}", host.display()))?;
        std::fs::set_permissions(host, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of the cache {}", host.display()))?;
        if !stamp.exists() {
            std::fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
        }
        let target = root.join(in_root);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "{} is a symbolic link; refusing to mount the cache over what it points at",
                target.display()
            );
        }
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        let (h, t) = (
            host.to_string_lossy().into_owned(),
            target.to_string_lossy().into_owned(),
        );
        run_blocking(
            &format!("mounting the cache {h} on {t}"),
            "mount",
            &["--bind", &h, &t],
        )?;
        let mut c = BindCache {
            host: host.to_owned(),
            target,
            mounted: true,
            _lock: lock,
        };
        if let Err(e) = run_blocking(
            &format!("making {t} a slave mount"),
            "mount",
            &["--make-rslave", &t],
        ) {
            c.unmount()?;
            return Err(e);
        }
        tracing::info!(cache = %c.host.display(), at = %in_root, "cache mounted for provisioning");
        Ok(Some(c))
    }

    /// Unmounts it (lazily if busy). Safe more than once.
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        umount_or_detach("the cache ", &self.target)?;
        self.mounted = false;
        Ok(())
    }
}

impl Drop for BindCache {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::error!("{e:#}");
        }
    }
}

/// Refuses a root that still has the pip cache's mount point (or anything at it).
pub fn check_absent(root: &Path) -> Result<()> {
    let at = root.join(PIP_IN_ROOT);
    if std::fs::symlink_metadata(&at).is_ok() {
        bail!(
            "the generalising step left the build's pip cache mount point in the image (/{PIP_IN_ROOT}); \
             a custom generalize.sh must keep the `rm -rf /{PIP_IN_ROOT}` line of the built-in one"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::local::mounts::mounted_under;

    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    // Needs root (mount); CI runs as root.
    #[test]
    fn the_cache_is_mounted_for_provisioning_only_and_keeps_what_pip_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let root = root.canonicalize().unwrap();
        let host = pip_host_dir(&dir.path().join("cache"), "3008.4", "bookworm", "x86_64");
        assert!(host.ends_with("pip/salt-3008.4-bookworm-x86_64"));

        let mut c = BindCache::mount(&host, &root, PIP_IN_ROOT, 0o700, WEEK)
            .unwrap()
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&host).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(mounted_under(&root).unwrap(), vec![root.join(PIP_IN_ROOT)]);
        // What pip writes in the root lands in the host's cache...
        std::fs::write(root.join(PIP_IN_ROOT).join("timelib.whl"), "wheel").unwrap();
        c.unmount().unwrap();
        c.unmount().unwrap();
        drop(c); // the lock goes with it
        assert!(mounted_under(&root).unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(host.join("timelib.whl")).unwrap(),
            "wheel"
        );
        // ...and the root keeps only the empty mount point, which the snapshot refuses.
        assert_eq!(
            std::fs::read_dir(root.join(PIP_IN_ROOT)).unwrap().count(),
            0
        );
        let e = format!("{:#}", check_absent(&root).unwrap_err());
        assert!(e.contains("/var/cache/stackless-pip"), "{e}");
        // Removing the mount point (what generalize.sh does) cannot touch the host's cache.
        std::fs::remove_dir_all(root.join(PIP_IN_ROOT)).unwrap();
        check_absent(&root).unwrap();
        assert!(host.join("timelib.whl").exists());

        // Dropped while mounted: unmounted. A fresh cache is kept...
        {
            let _c = mount_when_free(&host, &root, WEEK);
            assert_eq!(mounted_under(&root).unwrap().len(), 1);
            // Another build meanwhile goes without the cache: nothing mounted, nothing waited.
            let other = dir.path().join("other");
            std::fs::create_dir_all(&other).unwrap();
            let other = other.canonicalize().unwrap();
            assert!(BindCache::mount(&host, &other, PIP_IN_ROOT, 0o700, WEEK)
                .unwrap()
                .is_none());
            assert!(mounted_under(&other).unwrap().is_empty());
            assert!(root.join(PIP_IN_ROOT).join("timelib.whl").exists());
        }
        assert!(mounted_under(&root).unwrap().is_empty());
        // ...and one older than the maximum age starts over.
        let mut c = mount_when_free(&host, &root, Duration::ZERO);
        c.unmount().unwrap();
        assert!(!host.join("timelib.whl").exists());
        assert!(host.join(CREATED).exists());
    }

    /// Mounts the cache once its lock is free. Just after this thread let it go, a child that
    /// another test's thread is forking may still hold a copy of the lock's descriptor until it
    /// execs (the lock belongs to the open file, not the descriptor).
    fn mount_when_free(host: &Path, root: &Path, max_age: Duration) -> BindCache {
        let t = std::time::Instant::now();
        loop {
            if let Some(c) = BindCache::mount(host, root, PIP_IN_ROOT, 0o700, max_age).unwrap() {
                return c;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the cache's lock stayed held"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_symlinked_mount_point_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("var/cache")).unwrap();
        std::os::unix::fs::symlink("/tmp", root.join(PIP_IN_ROOT)).unwrap();
        let e = format!(
            "{:#}",
            BindCache::mount(&dir.path().join("cache"), &root, PIP_IN_ROOT, 0o700, WEEK)
                .unwrap_err()
        );
        assert!(e.contains("symbolic link"), "{e}");
    }
}
