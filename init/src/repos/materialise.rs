//! A release made from the object store: the commit's files, without a `.git`. Against the
//! previous release, only what the commit changed is written (`git diff-tree` says what);
//! every other file is a hard link to the previous release's, so a one-line commit writes one
//! file and the rest of the release costs directory entries. Sharing is safe because a
//! published release is never written again (its files are read-only, `restrict`), and the
//! watchers compare contents, so a linked file is no change to them.

use super::store::{Change, Store};
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What making a release cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Made {
    /// Files written from the store; `None` when the whole tree was.
    pub written: Option<usize>,
    /// Files shared with the previous release (hard links, symlinks made again).
    pub shared: usize,
}

/// The release a new one may share files with.
pub struct Previous<'a> {
    pub commit: &'a str,
    pub dir: &'a Path,
}

/// Fills the empty folder `dest` with `commit`'s tree from `store`, sharing what it can with
/// `previous`. Errs (and the caller throws `dest` away) when the store lacks an object. Without
/// a previous release whose commit the store has, the whole tree is written.
pub fn materialise(
    store: &Store,
    commit: &str,
    previous: Option<Previous<'_>>,
    dest: &Path,
    timeout: Duration,
) -> Result<Made> {
    let diff = previous.and_then(|p| Some((p.dir, store.diff(p.commit, commit, timeout).ok()?)));
    let Some((previous_dir, changes)) = diff else {
        store.restore(commit, dest, &[], timeout)?;
        return Ok(Made::default());
    };
    // Every path the commit touched, deleted ones included, is not the previous release's.
    let touched: HashSet<&[u8]> = changes.iter().map(|c| c.path.as_slice()).collect();
    let mut to_write: Vec<&[u8]> = Vec::new();
    for change in changes.iter().filter(|c| !c.deleted()) {
        if change.is_submodule() {
            // As a checkout leaves a submodule: an empty folder.
            let dir = dest.join(OsStr::from_bytes(&change.path));
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        } else {
            to_write.push(&change.path);
        }
    }
    let mut linker = Linker {
        dest,
        made: HashSet::new(),
        shared: 0,
        unshared: Vec::new(),
    };
    linker.walk(previous_dir, previous_dir, &touched)?;
    to_write.extend(linker.unshared.iter().map(Vec::as_slice));
    store.restore(commit, dest, &to_write, timeout)?;
    Ok(Made {
        written: Some(to_write.len()),
        shared: linker.shared,
    })
}

/// Links the previous release's untouched files into the new one.
struct Linker<'a> {
    dest: &'a Path,
    /// Folders already made under `dest`.
    made: HashSet<PathBuf>,
    shared: usize,
    /// Untouched files that could not be linked (another file system, too many links): they
    /// are written from the store like changed ones.
    unshared: Vec<Vec<u8>>,
}

impl Linker<'_> {
    fn walk(&mut self, root: &Path, dir: &Path, touched: &HashSet<&[u8]>) -> Result<()> {
        let entries = fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        let mut empty = true;
        for entry in entries {
            empty = false;
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            // A release an older agent made has its own clone in it.
            if rel == Path::new(".git") {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                self.walk(root, &path, touched)?;
                continue;
            }
            let rel_bytes = rel.as_os_str().as_bytes();
            if touched.contains(rel_bytes) {
                continue;
            }
            let new = self.dest.join(rel);
            self.parent(&new)?;
            let linked = if kind.is_symlink() {
                fs::read_link(&path).and_then(|target| symlink(target, &new))
            } else if kind.is_file() {
                fs::hard_link(&path, &new)
            } else {
                continue;
            };
            match linked {
                Ok(()) => self.shared += 1,
                Err(e) => {
                    tracing::debug!("linking {} to {}: {e}", path.display(), new.display());
                    self.unshared.push(rel_bytes.to_vec());
                }
            }
        }
        // An empty folder (a submodule's) that the commit left alone stays.
        let rel = dir.strip_prefix(root).unwrap_or(dir);
        if empty && !rel.as_os_str().is_empty() && !touched.contains(rel.as_os_str().as_bytes()) {
            let new = self.dest.join(rel);
            fs::create_dir_all(&new).with_context(|| format!("creating {}", new.display()))?;
        }
        Ok(())
    }

    fn parent(&mut self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            if !self.made.contains(parent) {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
                self.made.insert(parent.to_path_buf());
            }
        }
        Ok(())
    }
}

impl Change {
    fn deleted(&self) -> bool {
        self.status == b'D'
    }
}

/// The inode of every file under `dir`, by path relative to it.
#[cfg(test)]
pub fn inodes(dir: &Path) -> std::collections::HashMap<PathBuf, u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if m.is_file() => {
                    out.insert(p.strip_prefix(dir).unwrap_or(&p).to_path_buf(), m.ino());
                }
                _ => {}
            }
        }
    }
    out
}
