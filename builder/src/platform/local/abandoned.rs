//! Build folders a killed bake left behind, and the lock that tells them from live ones.
//!
//! A bake killed with SIGKILL (a CI job's timeout, the OOM killer, a lost machine) runs no
//! cleanup: `out/IMAGE/.build-ID` keeps its mounts (the overlay root, proc, sys, the host's
//! `/dev` bound in, the caches lent to provisioning) and everything the build wrote. Left there,
//! an `rm -rf out/` would recurse into the bound `/dev` and delete the host's device nodes. So
//! every build holds an exclusive `flock` on `.build-ID/.owner` from its first moment, which the
//! kernel gives back when the process dies however it dies, and every local bake first removes
//! the build folders whose lock it can take: it kills what still runs in the root, unmounts
//! everything under the folder, innermost first, and removes it, never through a mount.
//!
//! Left alone: a folder whose owner holds its lock (a bake running beside this one), one kept
//! for debugging (`--keep-on-error` marks it `.kept`), and one without an owner file (an older
//! builder's), named in a warning with the commands that remove it safely.

use super::flock;
use super::mounts::{kill_processes_in, mounted_under, remove_tree, umount_or_detach};
use anyhow::{Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The lock file in a build folder, held by the bake that made the folder.
const OWNER: &str = ".owner";
/// Marks a build folder kept for debugging: removed by hand, never by a later bake.
const KEPT: &str = ".kept";
/// Build folders in `out/IMAGE` are named `.build-ID`.
const PREFIX: &str = ".build-";

/// The running bake's claim on its build folder: an exclusive `flock` on `.owner`, released
/// when this is dropped or the process dies.
#[derive(Debug)]
pub struct BuildOwner(#[allow(dead_code)] File);

impl BuildOwner {
    /// Creates `work` (if needed) and takes its lock; fails if another process holds it.
    pub fn claim(work: &Path) -> Result<BuildOwner> {
        std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
        let path = work.join(OWNER);
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        if !matches!(flock::try_exclusive(&f), Ok(true)) {
            anyhow::bail!(
                "{} is held by another bake (its build folder {}); build ids are unique, so this \
                 should not happen: wait for that bake or stop it",
                path.display(),
                work.display()
            );
        }
        Ok(BuildOwner(f))
    }
}

/// Marks `work` as kept for debugging, so later bakes leave it to the operator.
pub fn mark_kept(work: &Path) -> Result<()> {
    let path = work.join(KEPT);
    std::fs::write(
        &path,
        "kept for debugging by `--keep-on-error`; remove this folder by hand\n",
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// What a build folder in `out/IMAGE` is, from its lock.
#[derive(Debug)]
enum Folder {
    /// Its owner is alive (the lock is held).
    Live,
    /// Kept for debugging.
    Kept,
    /// No owner file: made by a builder without the lock.
    Unknown,
    /// Its owner died; the open lock file, locked, is held until the folder is gone.
    Abandoned(File),
}

fn judge(dir: &Path) -> Folder {
    if dir.join(KEPT).exists() {
        return Folder::Kept;
    }
    match File::open(dir.join(OWNER)) {
        Ok(f) if matches!(flock::try_exclusive(&f), Ok(true)) => Folder::Abandoned(f),
        Ok(_) => Folder::Live,
        Err(_) => Folder::Unknown,
    }
}

/// Removes the build folders under `out_dir` whose bake died; returns those removed. Never
/// fails a bake: what cannot be removed is named in a warning with how to remove it by hand.
pub fn remove_abandoned_builds(out_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let mut removed = Vec::new();
    for dir in dirs {
        let by_hand = format!(
            "`umount -R {d}/root` (and `umount {d}/root` until nothing is mounted under it, see `findmnt -R {d}`), \
             then `rm -rf --one-file-system {d}`",
            d = dir.display()
        );
        match judge(&dir) {
            Folder::Live => {
                tracing::debug!(dir = %dir.display(), "a build folder in use by another bake; left alone")
            }
            Folder::Kept => {
                tracing::debug!(dir = %dir.display(), "a build folder kept for debugging; left alone")
            }
            Folder::Unknown => tracing::warn!(
                "{} has no owner lock (an older builder made it, or its bake was killed as it began); \
                 left alone. If no bake is running, remove it: {by_hand}",
                dir.display()
            ),
            Folder::Abandoned(_held) => match remove_abandoned(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed a build folder a killed bake left behind");
                    removed.push(dir);
                }
                Err(e) => tracing::warn!(
                    "removing {}, left behind by a killed bake: {e:#}; remove it by hand: {by_hand}",
                    dir.display()
                ),
            },
        }
    }
    removed
}

/// Kills what still runs in `dir`'s root, unmounts everything under `dir` (innermost first,
/// lazily where busy) and removes it; `remove_tree` refuses if anything is still mounted.
fn remove_abandoned(dir: &Path) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("finding {}", dir.display()))?;
    kill_processes_in(&dir);
    // The innermost first, one at a time: a mount's own mounts go before it, and a point with
    // mounts stacked on it comes up again until none is left. Bounded, for a mount that will
    // not go; `remove_tree` then refuses.
    for _ in 0..64 {
        let innermost = mounted_under(&dir)?
            .into_iter()
            .max_by_key(|p| p.components().count());
        let Some(target) = innermost else { break };
        umount_or_detach("what a killed bake left mounted at ", &target)?;
    }
    remove_tree(&dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// A bake stand-in: a real process that claims `work` the way `BuildOwner` does (flock on
    /// `.owner`), mounts what a bake mounts (the host's `/dev` bound in, a tmpfs /run, a cache
    /// folder bound in) and then waits; `ready` is written once it has.
    fn baking(work: &Path, cache: &Path) -> std::process::Child {
        let root = work.join("root");
        let script = format!(
            "set -e; mkdir -p {r}/dev {r}/run {r}/var/cache/pip; exec 9>{w}/.owner; flock -n 9; \
             mount --bind /dev {r}/dev; mount -t tmpfs tmpfs {r}/run; mount --bind {c} {r}/var/cache/pip; \
             touch {w}/ready; exec sleep 600",
            r = root.display(),
            w = work.display(),
            c = cache.display()
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !work.join("ready").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the stand-in bake did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    // Needs root (mount); CI runs as root.
    #[test]
    fn a_killed_bakes_folder_is_unmounted_and_removed_and_a_live_ones_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let out = base.join("out/img");
        let cache = base.join("pip-cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("wheel.whl"), "kept").unwrap();

        let killed = out.join(".build-b-1");
        let live = out.join(".build-b-2");
        let mut k = baking(&killed, &cache);
        let mut l = baking(&live, &cache);
        // SIGKILL: no cleanup runs, the mounts stay, the kernel gives the lock back.
        k.kill().unwrap();
        k.wait().unwrap();
        assert_eq!(mounted_under(&killed).unwrap().len(), 3);

        let removed = remove_abandoned_builds(&out);
        assert_eq!(removed, vec![killed.clone()]);
        assert!(!killed.exists());
        assert!(mounted_under(&killed).unwrap().is_empty());
        // Nothing was deleted through a mount: the host's /dev and the lent cache are whole.
        assert!(Path::new("/dev/null").exists());
        assert_eq!(
            std::fs::read_to_string(cache.join("wheel.whl")).unwrap(),
            "kept"
        );
        // The live bake's folder and mounts are untouched.
        assert!(live.join("ready").exists());
        assert_eq!(mounted_under(&live).unwrap().len(), 3);

        l.kill().unwrap();
        l.wait().unwrap();
        assert_eq!(remove_abandoned_builds(&out), vec![live.clone()]);
        assert!(!live.exists());
    }

    #[test]
    fn kept_unknown_and_claimed_folders_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().canonicalize().unwrap();
        let claimed = out.join(".build-b-1");
        let owner = BuildOwner::claim(&claimed).unwrap();
        let e = BuildOwner::claim(&claimed).unwrap_err().to_string();
        assert!(e.contains("held by another bake"), "{e}");

        let kept = out.join(".build-b-2");
        drop(BuildOwner::claim(&kept).unwrap());
        mark_kept(&kept).unwrap();
        let unknown = out.join(".build-b-3");
        std::fs::create_dir_all(unknown.join("root")).unwrap();
        // Not a build folder at all.
        let other = out.join("b-4");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join(".owner"), "").unwrap();

        assert_eq!(remove_abandoned_builds(&out), Vec::<PathBuf>::new());
        for d in [&claimed, &kept, &unknown, &other] {
            assert!(d.exists(), "{}", d.display());
        }
        // Its owner gone, the claimed one goes. Just after the drop, a child another test's
        // thread is forking may still hold a copy of the lock's descriptor until it execs.
        drop(owner);
        let t = Instant::now();
        let removed = loop {
            let removed = remove_abandoned_builds(&out);
            if !removed.is_empty() || t.elapsed() > Duration::from_secs(10) {
                break removed;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(removed, vec![claimed.clone()]);
        assert!(!claimed.exists());
    }
}
