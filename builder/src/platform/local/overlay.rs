//! The build root as an overlay mount: the cached packages layer (a folder, never written) is the
//! lower layer and the build writes into its own `upper` folder. Starting a build is one mount
//! instead of unpacking 900 MB, and cleaning up removes only what the build wrote.
//!
//! Used only where it is exact: the kernel has overlayfs, the mount is allowed (not every
//! container allows it), and the layer and the build are on one file system, where overlayfs
//! keeps the real inode numbers (`mke2fs -d` pairs hard links by device and inode; across two
//! file systems an upper and a lower file could share a number). Anywhere else the caller copies
//! the layer instead.

use super::mounts::{kill_processes_in, mounted_inside, path_list, umount_or_detach};
use super::process::run_blocking;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One overlay mounted at `merged`; unmounted by `unmount` or, failing that, on drop.
#[derive(Debug)]
pub struct OverlayRoot {
    merged: PathBuf,
    mounted: bool,
}

/// Why an overlay cannot serve here, or `None` when it can be tried. `upper` and `work` must
/// not exist yet; their parent must.
pub fn unusable(lower: &Path, upper_parent: &Path) -> Option<String> {
    // The mount's option string splits on commas and colons.
    for p in [lower, upper_parent] {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) {
            return Some(format!(
                "{} has a comma, colon or backslash in it",
                p.display()
            ));
        }
    }
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
    match (dev(lower), dev(upper_parent)) {
        (Ok(a), Ok(b)) if a == b => None,
        (Ok(_), Ok(_)) => Some(format!(
            "the packages layer {} and the build {} are on different file systems",
            lower.display(),
            upper_parent.display()
        )),
        (Err(e), _) | (_, Err(e)) => Some(format!("reading the layer or the build folder: {e}")),
    }
}

impl OverlayRoot {
    /// Mounts `lower` read-only under `merged`, with `upper` and `work` (created here, empty)
    /// taking the writes. `merged` must be an empty folder.
    pub fn mount(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<OverlayRoot> {
        for d in [upper, work, merged] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // Absolute paths: the options are read relative to nothing the caller knows.
        let abs = |p: &Path| {
            p.canonicalize()
                .with_context(|| format!("finding {}", p.display()))
        };
        let (lower, upper, work, merged) = (abs(lower)?, abs(upper)?, abs(work)?, abs(merged)?);
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let target = merged.to_string_lossy().to_string();
        run_blocking(
            &format!(
                "mounting the packages layer {} as an overlay on {target}",
                lower.display()
            ),
            "mount",
            &["-t", "overlay", "overlay", "-o", &options, &target],
        )?;
        // The chroot's own mounts below must not propagate back out.
        let mut root = OverlayRoot {
            merged,
            mounted: true,
        };
        if let Err(e) = run_blocking(
            &format!("making {target} a private mount"),
            "mount",
            &["--make-private", &target],
        ) {
            root.unmount()?;
            return Err(e);
        }
        Ok(root)
    }

    pub fn merged(&self) -> &Path {
        &self.merged
    }

    /// Unmounts the overlay (a busy one is detached lazily). Nothing may be mounted inside it
    /// any more. Safe more than once.
    pub fn unmount(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        let inner = mounted_inside(&self.merged)?;
        if !inner.is_empty() {
            bail!(
                "not unmounting the build root {}: still mounted inside it: {}",
                self.merged.display(),
                path_list(&inner)
            );
        }
        kill_processes_in(&self.merged);
        umount_or_detach("the overlay ", &self.merged)?;
        self.mounted = false;
        Ok(())
    }
}

impl Drop for OverlayRoot {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::error!("{e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mounts::mounted_under;
    use super::*;

    // Needs root (mount) and overlayfs; CI runs as root on Linux.
    #[test]
    fn writes_go_to_the_upper_folder_and_the_lower_stays_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let lower = base.join("lower");
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::write(lower.join("etc/kept"), "from the layer").unwrap();
        std::fs::write(lower.join("etc/changed"), "old").unwrap();
        std::fs::write(lower.join("etc/removed"), "gone").unwrap();
        assert_eq!(unusable(&lower, &base), None);
        let merged = base.join("root");
        let mut o = OverlayRoot::mount(
            &lower,
            &base.join("upper"),
            &base.join("overlay-work"),
            &merged,
        )
        .unwrap();
        assert_eq!(mounted_under(&merged).unwrap(), vec![merged.clone()]);
        assert_eq!(
            std::fs::read_to_string(merged.join("etc/kept")).unwrap(),
            "from the layer"
        );
        std::fs::write(merged.join("etc/changed"), "new").unwrap();
        std::fs::remove_file(merged.join("etc/removed")).unwrap();
        std::fs::write(merged.join("etc/added"), "by the build").unwrap();

        // The chroot's mounts inside keep it mounted.
        let mut inner = super::super::mounts::Mounts::mount(&merged).unwrap();
        let e = o.unmount().unwrap_err().to_string();
        assert!(e.contains("still mounted inside it"), "{e}");
        inner.unmount().unwrap();
        o.unmount().unwrap();
        o.unmount().unwrap();
        assert!(mounted_under(&merged).unwrap().is_empty());

        // The layer is as it was; the build's writes are in its own folder.
        assert_eq!(
            std::fs::read_to_string(lower.join("etc/changed")).unwrap(),
            "old"
        );
        assert!(lower.join("etc/removed").exists());
        assert!(!lower.join("etc/added").exists());
        assert_eq!(
            std::fs::read_to_string(base.join("upper/etc/added")).unwrap(),
            "by the build"
        );
        assert!(
            !base.join("upper/etc/kept").exists(),
            "untouched files are not copied"
        );
        assert_eq!(std::fs::read_dir(&merged).unwrap().count(), 0);
    }

    #[test]
    fn dropping_unmounts() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("lower")).unwrap();
        let merged = base.join("root");
        {
            let _o = OverlayRoot::mount(
                &base.join("lower"),
                &base.join("upper"),
                &base.join("w"),
                &merged,
            )
            .unwrap();
            assert!(!mounted_under(&merged).unwrap().is_empty());
        }
        assert!(mounted_under(&merged).unwrap().is_empty());
    }

    #[test]
    fn paths_the_mount_options_cannot_carry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a,b");
        std::fs::create_dir_all(&odd).unwrap();
        let why = unusable(&odd, dir.path()).unwrap();
        assert!(why.contains("comma"), "{why}");
        let why = unusable(&dir.path().join("missing"), dir.path()).unwrap();
        assert!(why.contains("reading the layer"), "{why}");
        // /proc is another file system than any folder of ours.
        let why = unusable(dir.path(), Path::new("/proc")).unwrap();
        assert!(why.contains("different file systems"), "{why}");
    }
}
