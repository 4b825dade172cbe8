//! The kernel file systems a chroot needs (proc, sys, dev, dev/pts, a tmpfs /run), mounted for
//! the provisioning and always unmounted again: on success, on failure, on Ctrl-C, and from
//! `Drop` if nobody did. Nothing under the root is ever deleted while something is mounted there.

use super::process::run_blocking;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What is mounted under one root, innermost last.
#[derive(Debug)]
pub struct Mounts {
    root: PathBuf,
    mounted: Vec<PathBuf>,
}

/// (file system type or "bind", source, target under the root)
const MOUNTS: [(&str, &str, &str); 5] = [
    ("proc", "proc", "proc"),
    ("sysfs", "sysfs", "sys"),
    ("bind", "/dev", "dev"),
    ("bind", "/dev/pts", "dev/pts"),
    ("tmpfs", "tmpfs", "run"),
];

impl Mounts {
    /// Mounts everything under `root`; a failure half-way unmounts what was mounted.
    pub fn mount(root: &Path) -> Result<Mounts> {
        let root = root
            .canonicalize()
            .with_context(|| format!("finding the build root {}", root.display()))?;
        let mut m = Mounts {
            root: root.clone(),
            mounted: Vec::new(),
        };
        for (fstype, source, under) in MOUNTS {
            let target = root.join(under);
            // A symlink here (dev -> /dev in a hostile root) would mount over the host's own.
            if std::fs::symlink_metadata(&target).is_ok_and(|md| md.file_type().is_symlink()) {
                bail!(
                    "{} is a symbolic link; refusing to mount over what it points at",
                    target.display()
                );
            }
            std::fs::create_dir_all(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            let t = target.to_string_lossy().to_string();
            let args: Vec<&str> = match fstype {
                "bind" => vec!["--bind", source, &t],
                _ => vec!["-t", fstype, source, &t],
            };
            run_blocking(&format!("mounting {source} on {t}"), "mount", &args)?;
            m.mounted.push(target);
            // Mounts made under it inside the chroot must not propagate to the host.
            run_blocking(
                &format!("making {t} a slave mount"),
                "mount",
                &["--make-rslave", &t],
            )?;
        }
        Ok(m)
    }

    /// Unmounts everything, innermost first; a busy mount is detached lazily so the build can
    /// still clean up. Safe more than once.
    pub fn unmount(&mut self) -> Result<()> {
        // A timed-out apt, dpkg or pip may still run in there and keep /dev busy.
        kill_processes_in(&self.root);
        let mut errors = Vec::new();
        while let Some(target) = self.mounted.pop() {
            if let Err(e) = umount_or_detach("", &target) {
                errors.push(format!("{e:#}"));
            }
        }
        if !errors.is_empty() {
            bail!("{}", errors.join("; "));
        }
        // The root itself may be a mount (the packages layer's overlay), released by its owner.
        let left = mounted_inside(&self.root)?;
        if !left.is_empty() {
            bail!(
                "still mounted under the build root after unmounting: {}",
                path_list(&left)
            );
        }
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if !self.mounted.is_empty() {
            if let Err(e) = self.unmount() {
                tracing::error!("{e:#}");
            }
        }
    }
}

/// Kills every process whose root directory is `root` or below it (what is left of a chroot).
pub fn kill_processes_in(root: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(r) = std::fs::read_link(e.path().join("root")) {
            if r.starts_with(root) {
                tracing::warn!(pid, "killing a process left in the build root");
                // SAFETY: kill(2) with a pid read from /proc; at worst the process is gone.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Mount points at or under `root`, from /proc/self/mountinfo.
pub fn mounted_under(root: &Path) -> Result<Vec<PathBuf>> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root))
        .collect())
}

/// Mount points below `root`, not counting `root` itself when it is one.
pub fn mounted_inside(root: &Path) -> Result<Vec<PathBuf>> {
    Ok(mounted_under(root)?
        .into_iter()
        .filter(|p| p != root)
        .collect())
}

/// Paths for a message, comma-separated.
pub fn path_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Unmounts `target` (what it is, such as "the cache ", leads the messages), detaching it
/// lazily when it is busy.
pub fn umount_or_detach(what: &str, target: &Path) -> Result<()> {
    let t = target.to_string_lossy().to_string();
    if let Err(e) = run_blocking(&format!("unmounting {what}{t}"), "umount", &[&t]) {
        tracing::warn!("{e:#}; detaching it lazily");
        run_blocking(&format!("detaching {what}{t}"), "umount", &["-l", &t])?;
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Removes a build folder, refusing while anything is mounted under it (a bind-mounted /dev
/// would otherwise be emptied on the host).
pub fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let abs = dir
        .canonicalize()
        .with_context(|| format!("finding {}", dir.display()))?;
    let left = mounted_under(&abs)?;
    if !left.is_empty() {
        bail!(
            "not removing {}: still mounted there: {}; unmount them (umount -R) and remove it by hand",
            abs.display(),
            path_list(&left)
        );
    }
    std::fs::remove_dir_all(&abs).with_context(|| format!("removing {}", abs.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    // Needs root (mount); CI runs as root.
    #[test]
    fn mounts_come_and_go_and_a_mounted_tree_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let mut m = Mounts::mount(&root).unwrap();
        let abs = root.canonicalize().unwrap();
        assert_eq!(mounted_under(&abs).unwrap().len(), 5);
        assert!(abs.join("proc/self/status").exists());
        assert!(abs.join("dev/null").exists());
        let e = remove_tree(&root).unwrap_err().to_string();
        assert!(e.contains("still mounted"), "{e}");
        assert!(Path::new("/dev/null").exists());
        m.unmount().unwrap();
        assert!(mounted_under(&abs).unwrap().is_empty());
        m.unmount().unwrap();
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        assert!(
            Path::new("/dev/null").exists(),
            "the host's /dev is untouched"
        );
    }

    #[test]
    fn dropping_unmounts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir_all(&root).unwrap();
        let abs = root.canonicalize().unwrap();
        {
            let _m = Mounts::mount(&root).unwrap();
            assert!(!mounted_under(&abs).unwrap().is_empty());
        }
        assert!(mounted_under(&abs).unwrap().is_empty());
    }
}
