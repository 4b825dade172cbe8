//! The object store of one repository: a bare, shallow git repository beside the releases
//! (`repos/NAME/store.git`). It keeps the objects of the published commits, so fetching a new
//! commit transfers only the objects it adds (git negotiates with the commits the store has),
//! and the previous release's tree is at hand to share its unchanged files (`materialise`).
//!
//! It is a cache: everything in it can be fetched again. A store that is missing, half-made or
//! corrupt is removed and fetched from scratch ([`Store::rebuild`]); releases never depend on
//! it once published (they hold files, not a `.git`).

use super::git::{self, is_full_sha, Place};
use crate::gitauth::GitAuth;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The ref the last fetched commit is kept under (the store's tip).
const TIP: &str = "refs/stackless/tip";
/// Refs that keep each release's commit (and so its objects) through `git gc`.
const RELEASE_REFS: &str = "refs/stackless/releases";

/// A path a commit changed, from `git diff-tree`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its path in the tree, as git gives it (bytes, not necessarily UTF-8).
    pub path: Vec<u8>,
    /// `A`dded, `D`eleted, `M`odified or `T`ype changed.
    pub status: u8,
    /// The new mode: `100644`, `100755`, `120000` (symlink), `160000` (submodule), or
    /// `000000` when deleted.
    pub mode: String,
}

impl Change {
    pub fn is_submodule(&self) -> bool {
        self.mode == "160000"
    }
}

/// A repository's object store.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `repo_dir`, made when missing. Left-overs of a sync that died (git's lock
    /// files, a throwaway index) are removed: the caller holds the sync lock, so nothing else
    /// can be using them. A folder that is not a usable repository is made again.
    pub fn open(repo_dir: &Path, timeout: Duration) -> Result<Store> {
        let store = Store {
            dir: repo_dir.join("store.git"),
        };
        if store.dir.exists() && !store.looks_whole() {
            tracing::warn!(store = %store.dir.display(), "the object store is not a whole git repository; making it again");
            store.remove()?;
        }
        if !store.dir.exists() {
            store.create(timeout)?;
        }
        store.remove_leftovers();
        Ok(store)
    }

    /// Removes the store and makes an empty one: its next fetch is a full one.
    pub fn rebuild(self, timeout: Duration) -> Result<Store> {
        self.remove()?;
        self.create(timeout)?;
        Ok(self)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fetches commit `sha` (which `reference` named upstream) from `url`, shallow, and returns
    /// the commit fetched. Git sends only objects the store lacks: its tip and the kept releases
    /// are the `have`s. Asking for the commit itself spares the ref listing a fetch by name
    /// starts with (one round trip: `ls-remote` just listed it); a server that refuses commits
    /// by id is asked by name, and then the ref may have moved on.
    pub fn fetch(
        &self,
        url: &str,
        sha: &str,
        reference: &str,
        timeout: Duration,
        auth: Option<&GitAuth>,
    ) -> Result<String> {
        let by_id = self.fetch_refspec(url, &format!("+{sha}:{TIP}"), timeout, auth);
        let head = match by_id {
            Ok(()) => sha.to_string(),
            Err(e) if sha != reference && refused_by_id(&format!("{e:#}")) => {
                tracing::debug!(%url, "the server does not serve commits by id; fetching {reference}");
                self.fetch_refspec(url, &format!("+{reference}:{TIP}"), timeout, auth)?;
                self.resolve(&format!("{TIP}^{{commit}}"), timeout)?
            }
            Err(e) => return Err(e),
        };
        self.housekeeping(timeout);
        Ok(head)
    }

    fn fetch_refspec(
        &self,
        url: &str,
        refspec: &str,
        timeout: Duration,
        auth: Option<&GitAuth>,
    ) -> Result<()> {
        git::run(
            Place::store(&self.dir),
            Some(url),
            [
                "fetch",
                "-q",
                "--depth",
                "1",
                "--no-tags",
                "--no-write-fetch-head",
                url,
                refspec,
            ]
            .map(OsStr::new),
            timeout,
            auth,
        )
        .map(drop)
    }

    /// git's own housekeeping (packing loose objects once there are thousands), when git's
    /// own estimate says it is due: more than gc.auto/256 loose objects in `objects/17`. In
    /// the foreground, so it stays under the deadline, and with loose refs (`keep` edits them).
    fn housekeeping(&self, timeout: Duration) {
        const GC_AUTO: usize = 6700;
        let sample = fs::read_dir(self.dir.join("objects/17"))
            .map(|d| d.count())
            .unwrap_or(0);
        if sample <= GC_AUTO.div_ceil(256) {
            return;
        }
        let gc_auto = format!("gc.auto={GC_AUTO}");
        if let Err(e) = git::run(
            Place::store(&self.dir),
            None,
            [
                "-c",
                &gc_auto,
                "-c",
                "gc.autoDetach=false",
                "-c",
                "gc.packRefs=false",
                "gc",
                "--auto",
                "--quiet",
            ]
            .map(OsStr::new),
            timeout,
            None,
        ) {
            tracing::warn!(store = %self.dir.display(), "git gc in the object store: {e:#}");
        }
    }

    /// The commit `rev` names in the store.
    pub fn resolve(&self, rev: &str, timeout: Duration) -> Result<String> {
        let out = git::run(
            Place::store(&self.dir),
            None,
            ["rev-parse", "--verify", "--quiet", rev].map(OsStr::new),
            timeout,
            None,
        )?;
        let sha = out.trim();
        if !is_full_sha(sha) {
            bail!("git rev-parse {rev} gave {sha:?} in {}", self.dir.display());
        }
        Ok(sha.to_string())
    }

    /// The size of every file of `commit` added up (`git ls-tree -r -l`): what a release of it
    /// takes on disk at most (files shared with the previous release take nothing).
    pub fn tree_size(&self, commit: &str, timeout: Duration) -> Result<u64> {
        let out = git::run(
            Place::store(&self.dir),
            None,
            ["ls-tree", "-r", "-l", "-z", commit].map(OsStr::new),
            timeout,
            None,
        )?;
        // "MODE TYPE OBJECT SIZE\tPATH": the size is "-" for submodules.
        Ok(out
            .split('\0')
            .filter_map(|e| {
                e.split('\t')
                    .next()?
                    .split_whitespace()
                    .nth(3)?
                    .parse::<u64>()
                    .ok()
            })
            .sum())
    }

    /// What changed from commit `old` to commit `new`, file by file (no rename detection:
    /// a rename is a deletion and an addition). Errs when the store lacks either tree.
    pub fn diff(&self, old: &str, new: &str, timeout: Duration) -> Result<Vec<Change>> {
        let out = git::run_bytes(
            Place::store(&self.dir),
            None,
            ["diff-tree", "-r", "-z", "--no-renames", old, new].map(OsStr::new),
            timeout,
            None,
        )?;
        parse_diff(&out).with_context(|| format!("reading the changes from {old} to {new}"))
    }

    /// Writes `paths` of `commit` into the work tree `dest` (all of it when `paths` is empty),
    /// straight from the tree: the store's index is neither read nor written.
    pub fn restore(
        &self,
        commit: &str,
        dest: &Path,
        paths: &[&[u8]],
        timeout: Duration,
    ) -> Result<()> {
        let index = self
            .dir
            .join(format!("index.stackless-{}", std::process::id()));
        let place = Place {
            git_dir: Some(&self.dir),
            work_tree: Some(dest),
            index: Some(&index),
            ..Place::default()
        };
        let source = format!("--source={commit}");
        let base = [
            "--literal-pathspecs",
            "restore",
            "--worktree",
            source.as_str(),
            "--",
        ]
        .map(OsStr::new);
        let result = if paths.is_empty() {
            git::run(
                place,
                None,
                base.into_iter().chain([OsStr::new(".")]),
                timeout,
                None,
            )
            .map(drop)
        } else {
            // In batches that keep argv well under the kernel's limit.
            paths.chunks(2000).try_for_each(|batch| {
                let args = base
                    .into_iter()
                    .chain(batch.iter().map(|p| OsStr::from_bytes(p)));
                git::run(place, None, args, timeout, None).map(drop)
            })
        };
        let _ = fs::remove_file(&index);
        result.with_context(|| format!("writing the files of {commit} into {}", dest.display()))
    }

    /// Keeps the objects of exactly `commits` (the releases on disk) through `git gc`: one loose
    /// ref each, written the way git's files backend stores them.
    pub fn keep(&self, commits: &[&str]) -> Result<()> {
        let dir = self.dir.join(RELEASE_REFS);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let name = entry.file_name();
            if !commits.iter().any(|c| OsStr::new(c) == name) {
                fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
        for c in commits.iter().filter(|c| is_full_sha(c)) {
            let path = dir.join(c);
            if !path.exists() {
                fs::write(&path, format!("{c}\n"))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Whether git finds every object the store's refs need (after a failed fetch: a store
    /// that is whole means the failure was upstream's, and the store is kept).
    pub fn is_sound(&self, timeout: Duration) -> bool {
        self.looks_whole()
            && git::run(
                Place::store(&self.dir),
                None,
                [
                    "fsck",
                    "--connectivity-only",
                    "--no-dangling",
                    "--no-progress",
                ]
                .map(OsStr::new),
                timeout,
                None,
            )
            .is_ok()
    }

    fn looks_whole(&self) -> bool {
        self.dir.join("HEAD").is_file()
            && self.dir.join("objects").is_dir()
            && self.dir.join("refs").is_dir()
    }

    fn create(&self, timeout: Duration) -> Result<()> {
        if let Some(parent) = self.dir.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // Made under a temporary name and renamed: a store is never half-initialised.
        let tmp = self
            .dir
            .with_extension(format!("git.tmp-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        git::run(
            Place::default(),
            None,
            [
                OsStr::new("init"),
                OsStr::new("-q"),
                OsStr::new("--bare"),
                OsStr::new("--template="),
                tmp.as_os_str(),
            ],
            timeout,
            None,
        )
        .with_context(|| format!("making the object store {}", self.dir.display()))?;
        use std::os::unix::fs::PermissionsExt;
        // Private repositories' objects are as secret as their files.
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        fs::rename(&tmp, &self.dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.dir.display()))
    }

    fn remove(&self) -> Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing the object store {}", self.dir.display()))
            }
            _ => Ok(()),
        }
    }

    /// Lock files and throwaway indexes a killed sync left: git would refuse to fetch while
    /// `shallow.lock` exists.
    fn remove_leftovers(&self) {
        let mut stack = vec![self.dir.clone(), self.dir.join("refs")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let path = entry.path();
                if path.starts_with(self.dir.join("refs")) && path.is_dir() {
                    stack.push(path);
                } else if name.ends_with(".lock") || name.starts_with("index.stackless-") {
                    tracing::info!(file = %path.display(), "removing what a killed sync left in the object store");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let _ = fs::remove_dir_all(
            self.dir
                .with_extension(format!("git.tmp-{}", std::process::id())),
        );
    }
}

/// Whether git's error says the server will not serve a commit asked for by id (an older
/// protocol without `uploadpack.allowReachableSHA1InWant`).
fn refused_by_id(error: &str) -> bool {
    [
        "not our ref",
        "unadvertised object",
        "Server does not allow request",
    ]
    .iter()
    .any(|m| error.contains(m))
}

/// Parses `git diff-tree -r -z`: `:OLDMODE NEWMODE OLDID NEWID STATUS NUL PATH NUL`, repeated.
pub(crate) fn parse_diff(out: &[u8]) -> Result<Vec<Change>> {
    let mut fields = out.split(|&b| b == 0);
    let mut changes = Vec::new();
    while let Some(meta) = fields.next().filter(|m| !m.is_empty()) {
        let meta = std::str::from_utf8(meta).context("diff-tree's fields are not UTF-8")?;
        let parts: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
        let [_old_mode, mode, _old_id, _new_id, status] = parts[..] else {
            bail!("unexpected diff-tree line {meta:?}");
        };
        let status = match status.as_bytes() {
            [s @ (b'A' | b'D' | b'M' | b'T')] => *s,
            _ => bail!("unexpected diff-tree status in {meta:?}"),
        };
        let path = fields
            .next()
            .filter(|p| !p.is_empty())
            .with_context(|| format!("no path after {meta:?}"))?;
        changes.push(Change {
            path: path.to_vec(),
            status,
            mode: mode.to_string(),
        });
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// git 2.47's words, over protocol v0 to a server without allowReachableSHA1InWant.
    #[test]
    fn a_server_refusing_commits_by_id_is_recognised() {
        assert!(refused_by_id(
            "git fetch failed (exited 1): error: Server does not allow request for unadvertised object b3a46e3e04f5ef600832cdd5bf46d006de168780"
        ));
        assert!(!refused_by_id(
            "git fetch failed (exited 128): fatal: unable to access 'http://x/': Could not resolve host: x"
        ));
    }

    #[test]
    fn diff_tree_records_parse() {
        let a = "a".repeat(40);
        let z = "0".repeat(40);
        let out = format!(
            ":100644 100644 {a} {a} M\x00app/a b.conf\x00:100644 000000 {a} {z} D\x00gone\x00:000000 160000 {z} {a} A\x00vendor/x\x00"
        );
        let c = parse_diff(out.as_bytes()).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].path, b"app/a b.conf");
        assert_eq!((c[1].status, c[1].mode.as_str()), (b'D', "000000"));
        assert!(c[2].is_submodule());
        assert!(parse_diff(b"").unwrap().is_empty());
        assert!(parse_diff(format!(":100644 100644 {a} {a} M\x00").as_bytes()).is_err());
        assert!(parse_diff(format!(":100644 100644 {a} {a} R100\x00x\x00").as_bytes()).is_err());
        assert!(parse_diff(b"garbage\x00x\x00").is_err());
    }
}
