//! Git repositories: each one is checked out into `repos/NAME/releases/SHA` and published by an
//! atomic flip of the relative symlink `repos/NAME/current`.
//!
//! The `git` command line does the transport, so any URL git understands works (https, ssh, git,
//! file). A sync is cheap when nothing changed: one `git ls-remote`, no fetch. A new commit is
//! fetched shallow into the repository's object store (`store`: only the objects it adds), made
//! into a temporary folder that shares the previous release's unchanged files (`materialise`),
//! renamed into place and published; a failure at any point removes the temporary folder and
//! keeps the old `current`. Callers hold the [`SyncLock`](crate::lock::SyncLock) so syncs
//! never overlap.

mod git;
pub mod materialise;
pub mod store;

use crate::gitauth::GitAuth;
use crate::paths::Layout;
pub use crate::userdata::RepoSpec;
use anyhow::{bail, Context, Result};
use git::{is_full_sha, Place};
use materialise::{materialise, Previous};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};
use store::Store;

/// How many releases besides `current` a repository keeps.
pub const KEEP_PREVIOUS: usize = 3;

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// A new release was published.
    Updated {
        commit: String,
        previous: Option<String>,
    },
    /// Upstream is at the published commit; nothing was fetched.
    Unchanged { commit: String },
    /// The fetch failed; the last good release stays published.
    KeptLast { commit: String, error: String },
    /// Upstream is at a quarantined commit (a bad release that was reverted); the published
    /// release stays and nothing was fetched.
    Quarantined { commit: String, skipped: String },
}

/// What the release verdicts ask of a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// A quarantined commit: when upstream is at it, keep the published release.
    pub skip: Option<String>,
    /// A release pruning must keep (the last good one, which a revert goes back to).
    pub keep: Option<String>,
}

impl SyncOutcome {
    /// The commit published after the sync.
    pub fn commit(&self) -> &str {
        match self {
            SyncOutcome::Updated { commit, .. }
            | SyncOutcome::Unchanged { commit }
            | SyncOutcome::KeptLast { commit, .. }
            | SyncOutcome::Quarantined { commit, .. } => commit,
        }
    }
}

/// Syncs repository `name` (`salt` or `config`) from `spec` into `Layout::repo_dir(name)`.
/// `timeout` bounds each git command. Errs only when the sync failed and there is no published
/// release to keep; the error then says what failed (url, ref, the last lines of git's stderr).
pub fn sync(
    layout: &Layout,
    name: &str,
    spec: &RepoSpec,
    timeout: Duration,
) -> Result<SyncOutcome> {
    sync_with_auth(layout, name, spec, timeout, None, &Policy::default())
}

/// [`sync`] for a private repository (git's ls-remote and fetch get `auth`), under `policy`.
pub fn sync_with_auth(
    layout: &Layout,
    name: &str,
    spec: &RepoSpec,
    timeout: Duration,
    auth: Option<&GitAuth>,
    policy: &Policy,
) -> Result<SyncOutcome> {
    let current = current_commit(layout, name);
    let result = sync_inner(
        layout,
        name,
        spec,
        current.as_deref(),
        timeout,
        auth,
        policy,
    );
    let result = result.with_context(|| {
        let with = spec
            .credentials
            .as_ref()
            .map(|c| format!(" with the credentials of SSM parameter {}", c.parameter()))
            .unwrap_or_default();
        format!(
            "syncing repository {name} from {} (ref {}){with}",
            spec.url, spec.reference
        )
    });
    keep_last(name, result, current)
}

/// Fetches `spec`'s commit into repository `name`'s object store without publishing anything:
/// the bake-time seed of an image, so its first sync is incremental. Returns the commit.
pub fn seed(layout: &Layout, name: &str, spec: &RepoSpec, timeout: Duration) -> Result<String> {
    let what = || {
        format!(
            "seeding the {name} object store from {} (ref {})",
            spec.url, spec.reference
        )
    };
    validate(name, spec).with_context(what)?;
    if crate::userdata::credentials::credentials_in_url(&spec.url).is_some() {
        // Not even the URL is repeated: it holds a secret.
        bail!(
            "seeding the {name} object store: the URL has credentials in it; seed from a public \
             URL (private repositories get their credentials from SSM at boot, never at bake time)"
        );
    }
    let what = || {
        format!(
            "seeding the {name} object store from {} (ref {})",
            spec.url, spec.reference
        )
    };
    validate(name, spec).with_context(what)?;
    let (sha, fetch_ref) = resolve(spec, timeout, None).with_context(what)?;
    let repo_dir = layout.repo_dir(name);
    let (store, head) =
        fetch(&repo_dir, name, &spec.url, &sha, &fetch_ref, timeout, None).with_context(what)?;
    store.keep(&[]).with_context(what)?;
    tracing::info!(repo = name, url = %spec.url, commit = %head, "seeded the object store");
    Ok(head)
}

/// A failed sync keeps the published release when there is one.
pub fn keep_last(
    name: &str,
    result: Result<SyncOutcome>,
    current: Option<String>,
) -> Result<SyncOutcome> {
    match (result, current) {
        (Ok(outcome), _) => Ok(outcome),
        (Err(e), Some(commit)) => {
            let error = format!("{e:#}");
            tracing::warn!(repo = name, %commit, "{error}; keeping the published release");
            Ok(SyncOutcome::KeptLast { commit, error })
        }
        (Err(e), None) => Err(e),
    }
}

/// A commit as people read it: its first 12 hex digits.
pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// The commit `current` points at, if it points at a release that exists.
pub fn current_commit(layout: &Layout, name: &str) -> Option<String> {
    let target = fs::read_link(layout.repo_current(name)).ok()?;
    let sha = target.strip_prefix("releases").ok()?.to_str()?;
    if !is_full_sha(sha) || !layout.repo_dir(name).join("releases").join(sha).is_dir() {
        return None;
    }
    Some(sha.to_string())
}

fn sync_inner(
    layout: &Layout,
    name: &str,
    spec: &RepoSpec,
    current: Option<&str>,
    timeout: Duration,
    auth: Option<&GitAuth>,
    policy: &Policy,
) -> Result<SyncOutcome> {
    validate(name, spec)?;
    let repo_dir = layout.repo_dir(name);
    let releases = repo_dir.join("releases");

    let (sha, fetch_ref) = resolve(spec, timeout, auth)?;
    if current == Some(sha.as_str()) {
        // A release published by an older agent (0755) or before `[config] group` changed
        // gets its modes now, not at the next commit.
        restrict_if_needed(&releases.join(&sha), spec.group.as_deref())?;
        return Ok(SyncOutcome::Unchanged { commit: sha });
    }
    if let (Some(bad), Some(cur)) = (policy.skip.as_deref(), current) {
        if bad == sha {
            return Ok(SyncOutcome::Quarantined {
                commit: cur.to_string(),
                skipped: sha,
            });
        }
    }

    fs::create_dir_all(&releases).with_context(|| format!("creating {}", releases.display()))?;
    remove_stale_temps(&releases);
    let mut kept_store = None;
    let commit = if releases.join(&sha).is_dir() {
        // Flipping back to a release we still have: nothing to fetch (its modes are made right
        // again: it may predate them, or the group may have changed).
        restrict(&releases.join(&sha), spec.group.as_deref())?;
        // The upstream ref names a commit published before: someone moved the branch back (a
        // force-push). It is the new tip all the same; the operator should know it happened.
        // (A pinned commit is chosen, not moved.)
        if !is_full_sha(&spec.reference) {
            tracing::warn!(
                repo = name,
                reference = %spec.reference,
                %sha,
                previous = current.unwrap_or("none"),
                "the branch went back to a commit published before (a force-push?); publishing it as the new tip"
            );
        }
        sha
    } else {
        let (mut store, head) = fetch(&repo_dir, name, &spec.url, &sha, &fetch_ref, timeout, auth)?;
        if head != sha {
            if is_full_sha(&spec.reference) {
                bail!("fetched commit {head}, not the requested {sha}");
            }
            // The branch moved between ls-remote and fetch: publish what we fetched, it is newer.
            tracing::info!(repo = name, listed = %sha, fetched = %head, "ref moved while syncing");
            if current == Some(head.as_str()) {
                return Ok(SyncOutcome::Unchanged { commit: head });
            }
        }
        let release = releases.join(&head);
        if !release.is_dir() {
            let previous_dir = current.map(|c| releases.join(c));
            let previous = || {
                current
                    .zip(previous_dir.as_deref())
                    .map(|(commit, dir)| Previous { commit, dir })
            };
            let mut tmp = TempDir::new(&releases)?;
            let made = match materialise(&store, &head, previous(), &tmp.path, timeout) {
                Ok(made) => made,
                Err(e) => {
                    // A full disk is not a damaged store: rebuilding it would only throw away
                    // the objects a later sync needs, on a disk with no room to fetch them.
                    if let Some(full) = out_of_space(&releases, &store, &head, timeout) {
                        return Err(e.context(full));
                    }
                    // An object the store should have is missing or unreadable (a disk error,
                    // someone deleting files): fetch into a new store, once.
                    tracing::warn!(
                        repo = name,
                        "making release {head} from the object store failed ({e:#}); fetching into a new store"
                    );
                    drop(tmp);
                    store = store.rebuild(timeout)?;
                    let again = store.fetch(&spec.url, &head, &fetch_ref, timeout, auth)?;
                    if again != head {
                        bail!("{fetch_ref} moved to {again} while {head} was being made; the next sync takes it");
                    }
                    tmp = TempDir::new(&releases)?;
                    materialise(&store, &head, previous(), &tmp.path, timeout)
                        .with_context(|| format!("making release {head} from a new object store"))?
                }
            };
            tracing::debug!(repo = name, commit = %head, written = made.written, shared = made.shared, "made a release");
            // Readable by root (or the configured group) alone before it is ever published.
            restrict(&tmp.path, spec.group.as_deref())?;
            durable(&tmp.path);
            fs::rename(&tmp.path, &release).with_context(|| {
                format!("renaming {} to {}", tmp.path.display(), release.display())
            })?;
            tmp.disarm();
        }
        kept_store = Some(store);
        head
    };

    flip(&repo_dir, &commit)?;
    tracing::info!(
        repo = name,
        url = %spec.url,
        reference = %spec.reference,
        %commit,
        previous = current.unwrap_or("none"),
        "published a new release"
    );
    if let Err(e) = prune(&releases, &commit, policy.keep.as_deref()) {
        tracing::warn!(repo = name, "pruning old releases: {e:#}");
    }
    if let Some(store) = kept_store {
        let on_disk = releases_in(&releases);
        let on_disk: Vec<&str> = on_disk.iter().map(String::as_str).collect();
        if let Err(e) = store.keep(&on_disk) {
            tracing::warn!(
                repo = name,
                "keeping the releases' objects in the store: {e:#}"
            );
        }
    }
    Ok(SyncOutcome::Updated {
        commit,
        previous: current.map(str::to_string),
    })
}

fn validate(name: &str, spec: &RepoSpec) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        bail!("invalid repository name {name:?}");
    }
    if spec.url.is_empty() || spec.url.starts_with('-') {
        bail!("invalid repository url {:?}", spec.url);
    }
    let r = &spec.reference;
    let bad = |c: char| c.is_whitespace() || c.is_control() || "*?[\\~^:".contains(c);
    if r.is_empty() || r.starts_with('-') || r.contains("..") || r.chars().any(bad) {
        bail!("invalid ref {r:?}: give a branch, a tag or a full commit sha");
    }
    Ok(())
}

/// Resolves the ref to a commit and the name to fetch it by. A full sha needs no round trip.
fn resolve(spec: &RepoSpec, timeout: Duration, auth: Option<&GitAuth>) -> Result<(String, String)> {
    let r = spec.reference.as_str();
    let lower = r.to_ascii_lowercase();
    if is_full_sha(&lower) {
        return Ok((lower.clone(), lower));
    }
    let peeled_pattern = format!("{r}^{{}}");
    let out = git::run(
        Place::default(),
        Some(&spec.url),
        [
            OsStr::new("ls-remote"),
            OsStr::new(&spec.url),
            OsStr::new(r),
            OsStr::new(&peeled_pattern),
        ],
        timeout,
        auth,
    )?;
    pick_ref(&out, r).with_context(|| format!("resolving {r:?} at {}", spec.url))
}

/// The commit `r` names in `git ls-remote` output (`SHA<TAB>NAME` lines): the branch, else the
/// tag (peeled to its commit), else the exact name; with the full name it was found under.
pub(crate) fn pick_ref(out: &str, r: &str) -> Result<(String, String)> {
    let refs: HashMap<&str, &str> = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(sha, name)| (name.trim(), sha.trim()))
        .collect();
    let candidates = [
        format!("refs/heads/{r}"),
        format!("refs/tags/{r}"),
        r.to_string(),
    ];
    for name in &candidates {
        let peeled = refs.get(format!("{name}^{{}}").as_str());
        if let Some(sha) = peeled.or_else(|| refs.get(name.as_str())) {
            if !is_full_sha(sha) {
                bail!("git ls-remote gave an unexpected id {sha:?} for {name}");
            }
            return Ok((sha.to_string(), name.clone()));
        }
    }
    bail!(
        "ref {r:?} not found (looked for branch refs/heads/{r}, tag refs/tags/{r} and {r}); \
         check the configured ref"
    )
}

/// When a release of `commit` failed to be written: says so if the disk holding `releases` has
/// less room than the release can take (git's "unable to write file" does not say why).
fn out_of_space(releases: &Path, store: &Store, commit: &str, timeout: Duration) -> Option<String> {
    let free = crate::fsutil::free_bytes(releases)?;
    let needs = store.tree_size(commit, timeout).ok()?;
    (free < needs).then(|| {
        format!(
            "the disk holding {} is full (No space left on device: {} bytes free, release {} takes up to {}): free space there; the published release stays, and the next sync makes the new one",
            releases.display(),
            free,
            short(commit),
            needs
        )
    })
}

/// Fetches `what` into the repository's object store. A fetch that fails on a store git finds
/// damaged is tried once more on a new store; one that fails on a sound store failed upstream.
fn fetch(
    repo_dir: &Path,
    name: &str,
    url: &str,
    sha: &str,
    reference: &str,
    timeout: Duration,
    auth: Option<&GitAuth>,
) -> Result<(Store, String)> {
    let store = Store::open(repo_dir, timeout)?;
    match store.fetch(url, sha, reference, timeout, auth) {
        Ok(head) => Ok((store, head)),
        Err(e) if store.is_sound(timeout) => Err(e),
        Err(e) => {
            tracing::warn!(
                repo = name,
                store = %store.dir().display(),
                "the object store is damaged ({e:#}); fetching into a new one"
            );
            let store = store.rebuild(timeout)?;
            let head = store.fetch(url, sha, reference, timeout, auth)?;
            Ok((store, head))
        }
    }
}

/// Makes a release readable by root alone (dirs 0700, files 0400, executables 0500) or, with
/// `group`, by that group too (0750 / 0440 / 0550, group-owned). Files are read-only: a
/// published release is never written again, and its files may be shared with the next one
/// (hard links). Symlinks are left as they are.
pub fn restrict(dir: &Path, group: Option<&str>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let gid = match group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .with_context(|| format!("looking up the group {name}"))?
                .with_context(|| format!("[config] group {name} does not exist on this instance"))?
                .gid,
        ),
        None => None,
    };
    let (dmode, fmode, xmode) = if gid.is_some() {
        (0o750, 0o440, 0o550)
    } else {
        (0o700, 0o400, 0o500)
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let mode = if meta.is_dir() {
            for entry in
                fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))?
            {
                stack.push(entry?.path());
            }
            dmode
        } else if meta.is_file() {
            if meta.permissions().mode() & 0o111 != 0 {
                xmode
            } else {
                fmode
            }
        } else {
            continue;
        };
        // Files shared with the previous release mostly have their modes already.
        use std::os::unix::fs::MetadataExt;
        if gid.is_some_and(|g| g.as_raw() != meta.gid()) {
            nix::unistd::chown(&path, None, gid)
                .with_context(|| format!("changing the group of {}", path.display()))?;
        }
        if meta.mode() & 0o7777 != mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
    }
    Ok(())
}

/// [`restrict`] unless the release's own folder already has the mode and group it would give.
/// One `stat` per sync: nobody but root passes a 0700 (or 0750 group) folder, whatever the
/// modes beneath it, so the folder tells whether the release is closed.
fn restrict_if_needed(release: &Path, group: Option<&str>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(release) else {
        return Ok(());
    };
    let closed = match group {
        None => meta.mode() & 0o777 == 0o700,
        Some(name) => {
            meta.mode() & 0o777 == 0o750
                && nix::unistd::Group::from_name(name)
                    .ok()
                    .flatten()
                    .is_some_and(|g| g.gid.as_raw() == meta.gid())
        }
    };
    if closed {
        return Ok(());
    }
    tracing::info!(release = %release.display(), "closing a release published with other modes");
    restrict(release, group)
}

/// Points `current` at `releases/SHA` atomically: a new symlink renamed over the old one.
fn flip(repo_dir: &Path, sha: &str) -> Result<()> {
    let release = repo_dir.join("releases").join(sha);
    // Releases are pruned oldest first; a fresh publish counts as new.
    if let Err(e) = fs::File::open(&release).and_then(|f| f.set_modified(SystemTime::now())) {
        tracing::debug!("touching {}: {e}", release.display());
    }
    let current = repo_dir.join("current");
    let tmp = repo_dir.join(format!("current.tmp-{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", tmp.display()));
        }
        _ => {}
    }
    symlink(Path::new("releases").join(sha), &tmp)
        .with_context(|| format!("creating the symlink {}", tmp.display()))?;
    if let Err(e) = fs::rename(&tmp, &current) {
        let _ = fs::remove_file(&tmp);
        return Err(e)
            .with_context(|| format!("renaming {} over {}", tmp.display(), current.display()));
    }
    if let Ok(d) = fs::File::open(repo_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Publishes a release this repository still has (a revert, a pin): `current` flips to it.
pub fn publish(layout: &Layout, name: &str, commit: &str) -> Result<()> {
    let dir = layout.repo_dir(name);
    if !is_full_sha(commit) || !dir.join("releases").join(commit).is_dir() {
        bail!("repository {name} has no release {commit} (see `stackless-init releases`)");
    }
    flip(&dir, commit)?;
    tracing::info!("{name}: published the kept release {commit} again");
    Ok(())
}

/// The releases a repository holds, newest published first.
pub fn releases(layout: &Layout, name: &str) -> Vec<String> {
    releases_in(&layout.repo_dir(name).join("releases"))
}

fn releases_in(dir: &Path) -> Vec<String> {
    let mut found: Vec<(SystemTime, String)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_string();
            let at = e.metadata().and_then(|m| m.modified()).ok()?;
            is_full_sha(&n).then_some((at, n))
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, n)| n).collect()
}

/// Removes all releases but `current`, `keep` and the `KEEP_PREVIOUS` most recently published
/// others.
fn prune(releases: &Path, current: &str, keep: Option<&str>) -> Result<()> {
    let mut others = Vec::new();
    for entry in
        fs::read_dir(releases).with_context(|| format!("listing {}", releases.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_full_sha(&name) || name == current || Some(name.as_str()) == keep {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        others.push((modified, name));
    }
    others.sort_by(|a, b| b.cmp(a));
    for (_, name) in others.into_iter().skip(KEEP_PREVIOUS) {
        let path = releases.join(&name);
        fs::remove_dir_all(&path)
            .with_context(|| format!("removing the old release {}", path.display()))?;
        tracing::debug!("pruned the old release {}", path.display());
    }
    Ok(())
}

/// Removes temporary folders left by syncs that died (their pid is gone).
fn remove_stale_temps(releases: &Path) {
    let Ok(entries) = fs::read_dir(releases) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".tmp-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| {
            p == std::process::id() as i32
                || nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None)
                    != Err(nix::errno::Errno::ESRCH)
        });
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Flushes a new release to disk before it is published, so a power cut cannot publish empty files.
fn durable(dir: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = fs::File::open(dir) {
        let _ = nix::unistd::syncfs(f.as_raw_fd());
    }
}

/// A temporary folder under `releases/`, removed on drop unless disarmed.
struct TempDir {
    path: PathBuf,
    armed: bool,
}

impl TempDir {
    fn new(releases: &Path) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = releases.join(format!(".tmp-{}-{n}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        // Root-only from the start: a private repository's files must not be readable while
        // they are fetched (`restrict` sets the release's final modes before it is published).
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, armed: true })
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::SyncLock;
    use std::process::{Command, Stdio};

    const T: Duration = Duration::from_secs(30);

    /// A bare repository served by `file://`, a work clone that pushes to it, and a layout.
    struct Fixture {
        _tmp: tempfile::TempDir,
        work: PathBuf,
        bare: PathBuf,
        layout: Layout,
    }

    fn sh_git(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.com",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let bare = tmp.path().join("upstream.git");
            let work = tmp.path().join("work");
            fs::create_dir_all(&work).unwrap();
            sh_git(
                tmp.path(),
                &["init", "-q", "--bare", bare.to_str().unwrap()],
            );
            sh_git(&work, &["init", "-q", "-b", "main"]);
            let layout = Layout::new(tmp.path().join("root"));
            let f = Fixture {
                _tmp: tmp,
                work,
                bare,
                layout,
            };
            f.commit("top.sls", "base: {}\n");
            f
        }

        fn url(&self) -> String {
            format!("file://{}", self.bare.display())
        }

        fn spec(&self, reference: &str) -> RepoSpec {
            RepoSpec {
                url: self.url(),
                reference: reference.to_string(),
                credentials: None,
                group: None,
            }
        }

        /// Commits `file` with `content` and pushes main; returns the commit.
        fn commit(&self, file: &str, content: &str) -> String {
            fs::write(self.work.join(file), content).unwrap();
            sh_git(&self.work, &["add", "-A"]);
            sh_git(&self.work, &["commit", "-q", "-m", &format!("edit {file}")]);
            sh_git(
                &self.work,
                &[
                    "push",
                    "-q",
                    self.bare.to_str().unwrap(),
                    "HEAD:refs/heads/main",
                ],
            );
            sh_git(&self.work, &["rev-parse", "HEAD"])
        }

        fn releases(&self) -> Vec<String> {
            let dir = self.layout.repo_dir("salt").join("releases");
            let mut v: Vec<String> = fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        }

        fn current_target(&self) -> PathBuf {
            fs::read_link(self.layout.repo_current("salt")).unwrap()
        }
    }

    /// `runuser -u nobody -- cat FILE`: whether an unprivileged user can read it.
    fn nobody_reads(file: &Path) -> bool {
        Command::new("runuser")
            .args(["-u", "nobody", "--", "cat"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("runuser")
            .success()
    }

    /// Releases are root-only (salt: the pillar of every role is in there), or readable by the
    /// configured group; the modes are in place before `current` points at the release.
    #[test]
    fn releases_are_readable_by_root_or_the_group_alone() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        fs::create_dir_all(f.work.join("pillar")).unwrap();
        f.commit("pillar/secrets.sls", "db_password: CANARY\n");
        // Let nobody walk down to the releases, as on an instance (/var/lib is 0755).
        fs::set_permissions(f._tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        let release = f.layout.repo_current("salt");
        let secret = release.join("pillar/secrets.sls");
        assert!(fs::read_to_string(&secret).unwrap().contains("CANARY"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&secret), 0o400);
        assert_eq!(mode(&release.join("pillar")), 0o700);
        assert_eq!(mode(&fs::canonicalize(&release).unwrap()), 0o700);
        assert!(!nobody_reads(&secret), "nobody read the salt pillar");
        // The object store holds the same secrets, as blobs.
        let store = f.layout.repo_dir("salt").join("store.git");
        assert_eq!(mode(&store), 0o700);
        assert!(
            !nobody_reads(&store.join("HEAD")),
            "nobody read the object store"
        );

        // A config repository readable by the programs' group (nobody's own, nogroup).
        let mut spec = f.spec("main");
        spec.group = Some("nogroup".into());
        sync(&f.layout, "config", &spec, T).unwrap();
        let secret = f.layout.repo_current("config").join("pillar/secrets.sls");
        assert_eq!(mode(&secret), 0o440);
        assert!(nobody_reads(&secret), "the group reads the config release");
        let e = restrict(f._tmp.path(), Some("no-such-group-x")).unwrap_err();
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");

        // A release an older agent left open (0755/0644) is closed by the next sync, even when
        // the commit has not changed; so is a group taken away.
        let old = fs::canonicalize(f.layout.repo_current("salt")).unwrap();
        for entry in [&old, &old.join("pillar")] {
            fs::set_permissions(entry, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::set_permissions(
            old.join("pillar/secrets.sls"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(nobody_reads(&old.join("pillar/secrets.sls")));
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert!(matches!(out, SyncOutcome::Unchanged { .. }), "{out:?}");
        assert!(!nobody_reads(&old.join("pillar/secrets.sls")));
        assert_eq!(mode(&old.join("pillar/secrets.sls")), 0o400);
        sync(&f.layout, "config", &f.spec("main"), T).unwrap();
        assert!(!nobody_reads(&secret), "the group was taken away");
    }

    #[test]
    fn first_sync_publishes_then_unchanged_then_updated() {
        let f = Fixture::new();
        let c1 = sh_git(&f.work, &["rev-parse", "HEAD"]);
        assert_eq!(current_commit(&f.layout, "salt"), None);

        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Updated {
                commit: c1.clone(),
                previous: None
            }
        );
        assert_eq!(out.commit(), c1);
        assert_eq!(f.current_target(), Path::new("releases").join(&c1));
        assert_eq!(
            current_commit(&f.layout, "salt").as_deref(),
            Some(c1.as_str())
        );
        let current = f.layout.repo_current("salt");
        assert_eq!(
            fs::read_to_string(current.join("top.sls")).unwrap(),
            "base: {}\n"
        );
        assert_eq!(f.releases(), vec![c1.clone()], "no temporary folder left");

        // Nothing new upstream: no fetch, nothing written.
        let before = fs::metadata(f.layout.repo_dir("salt").join("releases"))
            .unwrap()
            .modified()
            .unwrap();
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(out, SyncOutcome::Unchanged { commit: c1.clone() });
        assert_eq!(f.releases(), vec![c1.clone()]);
        let after = fs::metadata(f.layout.repo_dir("salt").join("releases"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "an unchanged sync must not touch releases/");

        let c2 = f.commit("top.sls", "base: {'*': [web]}\n");
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Updated {
                commit: c2.clone(),
                previous: Some(c1.clone())
            }
        );
        assert_eq!(
            fs::read_to_string(current.join("top.sls")).unwrap(),
            "base: {'*': [web]}\n"
        );
        assert_eq!(f.current_target(), Path::new("releases").join(&c2));
        let mut both = vec![c1, c2];
        both.sort();
        assert_eq!(f.releases(), both);
        // The leftover symlink of the flip is gone.
        let mut names: Vec<_> = fs::read_dir(f.layout.repo_dir("salt"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["current", "releases", "store.git"]);
    }

    /// Pushes whatever the work tree holds now.
    fn commit_all(f: &Fixture, message: &str) -> String {
        sh_git(&f.work, &["add", "-A"]);
        sh_git(&f.work, &["commit", "-q", "-m", message]);
        let bare = f.bare.to_str().unwrap();
        sh_git(&f.work, &["push", "-q", bare, "HEAD:refs/heads/main"]);
        sh_git(&f.work, &["rev-parse", "HEAD"])
    }

    fn loose_objects(store: &Path) -> usize {
        let out = sh_git(store, &["count-objects", "-v"]);
        out.lines()
            .find_map(|l| l.strip_prefix("count: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A one-line commit fetches only the objects it adds and writes only the file it changed;
    /// every other file is the previous release's own (the same inode), and the release has no
    /// `.git`. Deleted, added, executable and symlinked files come out as a checkout has them.
    #[test]
    fn a_commit_writes_what_it_changed_and_shares_the_rest() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        fs::create_dir_all(f.work.join("app/conf.d")).unwrap();
        for i in 0..20 {
            fs::write(
                f.work.join(format!("app/conf.d/{i}.conf")),
                format!("n={i}\n"),
            )
            .unwrap();
        }
        fs::write(f.work.join("app/run.sh"), "#!/bin/sh\n").unwrap();
        fs::create_dir_all(f.work.join("app/conf.d/sub")).unwrap();
        fs::write(f.work.join("app/conf.d/sub/x"), "x\n").unwrap();
        fs::write(f.work.join("app/tool.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(
            f.work.join("app/tool.sh"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        fs::set_permissions(f.work.join("app/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("conf.d/1.conf", f.work.join("app/main.conf")).unwrap();
        fs::write(f.work.join("gone.txt"), "bye\n").unwrap();
        let c1 = commit_all(&f, "many files");
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        let store = f.layout.repo_dir("salt").join("store.git");
        let loose_before = loose_objects(&store);
        let releases = f.layout.repo_dir("salt").join("releases");
        let before = materialise::inodes(&releases.join(&c1));

        fs::write(f.work.join("app/conf.d/7.conf"), "n=seven\n").unwrap();
        fs::remove_file(f.work.join("gone.txt")).unwrap();
        fs::write(f.work.join("new.txt"), "hello\n").unwrap();
        // A file that becomes a folder, and a folder that becomes a file.
        fs::remove_file(f.work.join("app/run.sh")).unwrap();
        fs::create_dir_all(f.work.join("app/run.sh")).unwrap();
        fs::write(f.work.join("app/run.sh/inner"), "in\n").unwrap();
        fs::remove_dir_all(f.work.join("app/conf.d/sub")).unwrap();
        fs::write(f.work.join("app/conf.d/sub"), "now a file\n").unwrap();
        let c2 = commit_all(&f, "one line, one file gone, one new");
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert!(matches!(out, SyncOutcome::Updated { .. }), "{out:?}");

        // The fetch brought the objects the commit adds and nothing else: the commit, four
        // trees (the root, app, app/conf.d, app/run.sh) and four blobs (7.conf, new.txt,
        // app/run.sh/inner, app/conf.d/sub).
        let added = loose_objects(&store) - loose_before;
        assert_eq!(added, 9, "objects fetched for a small commit");

        let release = releases.join(&c2);
        let after = materialise::inodes(&release);
        let changed: Vec<_> = after
            .iter()
            .filter(|(path, ino)| before.get(*path) != Some(ino))
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            changed,
            [
                "app/conf.d/7.conf",
                "app/conf.d/sub",
                "app/run.sh/inner",
                "new.txt"
            ]
        );
        assert_eq!(
            fs::read_to_string(release.join("app/run.sh/inner")).unwrap(),
            "in\n"
        );
        assert_eq!(
            fs::read_to_string(release.join("app/conf.d/sub")).unwrap(),
            "now a file\n"
        );
        assert!(!release.join("gone.txt").exists());
        assert!(!release.join(".git").exists(), "a release has no .git");
        assert!(!releases.join(&c1).join(".git").exists());
        assert_eq!(
            fs::read_to_string(release.join("app/conf.d/7.conf")).unwrap(),
            "n=seven\n"
        );
        assert_eq!(
            fs::read_to_string(release.join("app/conf.d/3.conf")).unwrap(),
            "n=3\n"
        );
        // The old release still has its own version of the changed file.
        assert_eq!(
            fs::read_to_string(releases.join(&c1).join("app/conf.d/7.conf")).unwrap(),
            "n=7\n"
        );
        assert_eq!(
            fs::read_link(release.join("app/main.conf")).unwrap(),
            Path::new("conf.d/1.conf")
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&release.join("app/tool.sh")), 0o500);
        assert_eq!(mode(&release.join("new.txt")), 0o400);
    }

    /// An image's seeded store makes the first sync fetch only what is newer than the seed;
    /// the release is whole all the same. A URL with credentials is refused without echoing it.
    #[test]
    fn a_seeded_store_makes_the_first_sync_incremental() {
        let f = Fixture::new();
        for i in 0..30 {
            f.commit(&format!("f{i}.sls"), &format!("n: {i}\n"));
        }
        let seeded = seed(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(seeded, sh_git(&f.work, &["rev-parse", "HEAD"]));
        assert_eq!(
            current_commit(&f.layout, "salt"),
            None,
            "a seed publishes nothing"
        );
        let store = f.layout.repo_dir("salt").join("store.git");
        let packs_before = fs::read_dir(store.join("objects/pack")).unwrap().count();
        let loose_before = loose_objects(&store);

        let c2 = f.commit("f7.sls", "n: seven\n");
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Updated {
                commit: c2,
                previous: None
            }
        );
        // The commit, its tree and one blob: nothing of the 30 files the seed had.
        assert_eq!(loose_objects(&store) - loose_before, 3);
        assert_eq!(
            fs::read_dir(store.join("objects/pack")).unwrap().count(),
            packs_before
        );
        let current = f.layout.repo_current("salt");
        assert_eq!(
            fs::read_to_string(current.join("f7.sls")).unwrap(),
            "n: seven\n"
        );
        assert_eq!(
            fs::read_to_string(current.join("f29.sls")).unwrap(),
            "n: 29\n"
        );

        let mut secret = f.spec("main");
        secret.url = "https://deploy:CANARY-TOKEN@git.example.com/salt.git".into();
        let e = format!("{:#}", seed(&f.layout, "config", &secret, T).unwrap_err());
        assert!(
            e.contains("credentials in it") && !e.contains("CANARY"),
            "{e}"
        );
    }

    /// A store git finds damaged (objects gone, as after a disk error or someone deleting
    /// them) is made again; the sync still publishes the new commit, whole.
    #[test]
    fn a_damaged_object_store_is_made_again() {
        let f = Fixture::new();
        f.commit("a.sls", "a: 1\n");
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        let store = f.layout.repo_dir("salt").join("store.git");
        for dir in ["objects/pack", "objects"] {
            for e in fs::read_dir(store.join(dir)).unwrap().flatten() {
                if e.path().is_file() || e.file_name().len() == 2 {
                    let _ = fs::remove_dir_all(e.path());
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let c2 = f.commit("b.sls", "b: 2\n");
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert!(
            matches!(out, SyncOutcome::Updated { ref commit, .. } if *commit == c2),
            "{out:?}"
        );
        let current = f.layout.repo_current("salt");
        assert_eq!(fs::read_to_string(current.join("a.sls")).unwrap(), "a: 1\n");
        assert_eq!(fs::read_to_string(current.join("b.sls")).unwrap(), "b: 2\n");
        assert_eq!(
            fs::read_to_string(current.join("top.sls")).unwrap(),
            "base: {}\n"
        );

        // Removed altogether: made again too.
        fs::remove_dir_all(&store).unwrap();
        let c3 = f.commit("c.sls", "c: 3\n");
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(out.commit(), c3);
        assert_eq!(fs::read_to_string(current.join("c.sls")).unwrap(), "c: 3\n");

        // Not a repository at all (a half-made one): replaced.
        fs::remove_dir_all(&store).unwrap();
        fs::create_dir_all(store.join("objects")).unwrap();
        let c4 = f.commit("d.sls", "d: 4\n");
        assert_eq!(
            sync(&f.layout, "salt", &f.spec("main"), T)
                .unwrap()
                .commit(),
            c4
        );
    }

    /// What a sync killed mid-fetch leaves (git's lock on the shallow list, a ref lock, a
    /// throwaway index) does not stop the next one, which still fetches incrementally.
    #[test]
    fn leftovers_of_a_killed_sync_are_cleared() {
        let f = Fixture::new();
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        let store = f.layout.repo_dir("salt").join("store.git");
        let packs = fs::read_dir(store.join("objects/pack")).unwrap().count();
        fs::write(store.join("shallow.lock"), "").unwrap();
        fs::create_dir_all(store.join("refs/stackless")).unwrap();
        fs::write(store.join("refs/stackless/tip.lock"), "").unwrap();
        fs::write(store.join("index.stackless-999999"), "junk").unwrap();
        let c2 = f.commit("top.sls", "base: {'*': [x]}\n");
        assert_eq!(
            sync(&f.layout, "salt", &f.spec("main"), T)
                .unwrap()
                .commit(),
            c2
        );
        assert!(!store.join("shallow.lock").exists());
        assert!(!store.join("index.stackless-999999").exists());
        assert_eq!(
            fs::read_dir(store.join("objects/pack")).unwrap().count(),
            packs,
            "the store was kept (no new full fetch)"
        );
    }

    /// An upstream that cannot be reached leaves a sound store alone: the next fetch is still
    /// incremental.
    #[test]
    fn an_unreachable_upstream_keeps_the_object_store() {
        let f = Fixture::new();
        let c1 = sh_git(&f.work, &["rev-parse", "HEAD"]);
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        let moved = f.bare.with_extension("moved");
        fs::rename(&f.bare, &moved).unwrap();
        let mut spec = f.spec("main");
        spec.reference = "0123456789abcdef0123456789abcdef01234567".into();
        let out = sync(&f.layout, "salt", &spec, T).unwrap();
        assert!(matches!(out, SyncOutcome::KeptLast { .. }), "{out:?}");
        let store = f.layout.repo_dir("salt").join("store.git");
        assert_eq!(sh_git(&store, &["rev-parse", "refs/stackless/tip"]), c1);
        assert_eq!(
            fs::read_dir(store.join("refs/stackless/releases"))
                .unwrap()
                .count(),
            1,
            "one ref per release on disk"
        );
    }

    #[test]
    fn tag_and_full_sha_refs() {
        let f = Fixture::new();
        let c1 = sh_git(&f.work, &["rev-parse", "HEAD"]);
        sh_git(&f.work, &["tag", "-a", "-m", "release one", "v1"]);
        sh_git(&f.work, &["tag", "light", "HEAD"]);
        sh_git(
            &f.work,
            &["push", "-q", f.bare.to_str().unwrap(), "v1", "light"],
        );
        let c2 = f.commit("new.sls", "x: 1\n");

        // An annotated tag resolves to the commit it points at, not the tag object.
        let out = sync(&f.layout, "salt", &f.spec("v1"), T).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Updated {
                commit: c1.clone(),
                previous: None
            }
        );
        assert!(!f.layout.repo_current("salt").join("new.sls").exists());
        let out = sync(&f.layout, "salt", &f.spec("light"), T).unwrap();
        assert_eq!(out, SyncOutcome::Unchanged { commit: c1.clone() });

        // A full sha: fetched directly.
        let out = sync(&f.layout, "salt", &f.spec(&c2), T).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Updated {
                commit: c2.clone(),
                previous: Some(c1.clone())
            }
        );
        assert!(f.layout.repo_current("salt").join("new.sls").exists());
        let out = sync(&f.layout, "salt", &f.spec(&c2.to_uppercase()), T).unwrap();
        assert_eq!(out, SyncOutcome::Unchanged { commit: c2.clone() });

        // Flipping back reuses the release we still have, even with upstream gone.
        let back = RepoSpec {
            url: "file:///nonexistent/repo.git".into(),
            reference: c1.clone(),
            credentials: None,
            group: None,
        };
        let out = sync(&f.layout, "salt", &back, T).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Updated {
                commit: c1.clone(),
                previous: Some(c2)
            }
        );
        assert_eq!(f.current_target(), Path::new("releases").join(&c1));
    }

    #[test]
    fn unreachable_upstream_keeps_the_last_release() {
        let f = Fixture::new();
        let c1 = sh_git(&f.work, &["rev-parse", "HEAD"]);
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();

        let gone = RepoSpec {
            url: "file:///nonexistent/repo.git".into(),
            reference: "main".into(),
            credentials: None,
            group: None,
        };
        let out = sync(&f.layout, "salt", &gone, T).unwrap();
        match &out {
            SyncOutcome::KeptLast { commit, error } => {
                assert_eq!(commit, &c1);
                assert!(error.contains("file:///nonexistent/repo.git"), "{error}");
                assert!(
                    error.contains("does not appear to be a git repository"),
                    "{error}"
                );
            }
            other => panic!("expected KeptLast, got {other:?}"),
        }
        assert_eq!(f.current_target(), Path::new("releases").join(&c1));
        assert_eq!(f.releases(), vec![c1.clone()]);

        // A fetch that fails after ls-remote (the commit is not upstream) leaves no temp folder.
        let missing = f.spec("0123456789abcdef0123456789abcdef01234567");
        let out = sync(&f.layout, "salt", &missing, T).unwrap();
        assert!(matches!(out, SyncOutcome::KeptLast { .. }), "{out:?}");
        assert_eq!(f.releases(), vec![c1.clone()]);
        assert_eq!(f.current_target(), Path::new("releases").join(&c1));
    }

    #[test]
    fn unreachable_upstream_without_a_release_errs_clearly() {
        let f = Fixture::new();
        let gone = RepoSpec {
            url: "file:///nonexistent/repo.git".into(),
            reference: "main".into(),
            credentials: None,
            group: None,
        };
        let err = sync(&f.layout, "salt", &gone, T).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("syncing repository salt from file:///nonexistent/repo.git (ref main)"),
            "{msg}"
        );
        assert!(msg.contains("git ls-remote failed"), "{msg}");
        assert!(
            msg.contains("does not appear to be a git repository"),
            "{msg}"
        );
        assert!(!f.layout.repo_current("salt").exists());

        let missing = f.spec("0123456789abcdef0123456789abcdef01234567");
        let msg = format!("{:#}", sync(&f.layout, "salt", &missing, T).unwrap_err());
        assert!(msg.contains("git fetch failed"), "{msg}");
        assert!(f.releases().is_empty(), "{:?}", f.releases());
        assert!(fs::symlink_metadata(f.layout.repo_current("salt")).is_err());
    }

    #[test]
    fn ls_remote_output_is_read_branch_first_and_tags_peeled() {
        let (a, b, c) = ("a".repeat(40), "b".repeat(40), "c".repeat(40));
        let out = format!(
            "{a}\trefs/heads/v1\n{b}\trefs/tags/v1\n{c}\trefs/tags/v1^{{}}\n{b}\trefs/tags/only\n{c}\trefs/tags/only^{{}}\n"
        );
        assert_eq!(pick_ref(&out, "v1").unwrap(), (a, "refs/heads/v1".into()));
        assert_eq!(
            pick_ref(&out, "only").unwrap(),
            (c.clone(), "refs/tags/only".into())
        );
        let e = format!("{:#}", pick_ref("zz\trefs/heads/x\n", "x").unwrap_err());
        assert!(e.contains("unexpected id \"zz\""), "{e}");
        let e = format!("{:#}", pick_ref("", "x").unwrap_err());
        assert!(e.contains("ref \"x\" not found"), "{e}");
        // Whatever git prints, no panic: lines without a tab, stray whitespace, a lone tab.
        for junk in [
            "\t",
            "\t\t\n\t",
            "no tab",
            " \t refs/heads/x ^{}",
            "\u{0}\t\u{0}",
        ] {
            let _ = pick_ref(junk, "x");
        }
    }

    #[test]
    fn missing_ref_errs_clearly() {
        let f = Fixture::new();
        let err = sync(&f.layout, "salt", &f.spec("no-such-branch"), T).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("resolving \"no-such-branch\" at file://")
                && msg.contains("ref \"no-such-branch\" not found (looked for branch"),
            "{msg}"
        );
        let bad = sync(&f.layout, "salt", &f.spec("--upload-pack=evil"), T).unwrap_err();
        assert!(format!("{bad:#}").contains("invalid ref"), "{bad:#}");
    }

    #[test]
    fn prune_keeps_current_and_three_previous() {
        let f = Fixture::new();
        let mut commits = vec![sh_git(&f.work, &["rev-parse", "HEAD"])];
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        for i in 0..5 {
            commits.push(f.commit("n.txt", &i.to_string()));
            let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
            assert_eq!(out.commit(), commits.last().unwrap());
        }
        let mut kept = commits[commits.len() - 1 - KEEP_PREVIOUS..].to_vec();
        kept.sort();
        assert_eq!(f.releases(), kept);
        assert_eq!(current_commit(&f.layout, "salt").as_ref(), commits.last());
    }

    #[test]
    fn a_quarantined_tip_is_skipped_and_the_good_release_outlives_pruning() {
        let f = Fixture::new();
        let good = sh_git(&f.work, &["rev-parse", "HEAD"]);
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        let bad = f.commit("n.txt", "bad");
        let policy = Policy {
            skip: Some(bad.clone()),
            keep: Some(good.clone()),
        };
        let out = sync_with_auth(&f.layout, "salt", &f.spec("main"), T, None, &policy).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Quarantined {
                commit: good.clone(),
                skipped: bad.clone()
            }
        );
        assert_eq!(f.releases(), vec![good.clone()], "nothing was fetched");
        let keep = Policy {
            skip: None,
            keep: Some(good.clone()),
        };
        for i in 0..5 {
            f.commit("n.txt", &i.to_string());
            sync_with_auth(&f.layout, "salt", &f.spec("main"), T, None, &keep).unwrap();
        }
        let kept = f.releases();
        assert!(kept.contains(&good), "{kept:?}");
        assert_eq!(kept.len(), KEEP_PREVIOUS + 2, "{kept:?}");
        publish(&f.layout, "salt", &good).unwrap();
        assert_eq!(current_commit(&f.layout, "salt"), Some(good));
        let e = publish(&f.layout, "salt", &"0".repeat(40)).unwrap_err();
        assert!(e.to_string().contains("has no release"), "{e}");
    }

    #[test]
    fn stale_temp_folders_of_dead_syncs_are_removed() {
        let f = Fixture::new();
        let releases = f.layout.repo_dir("salt").join("releases");
        fs::create_dir_all(releases.join(".tmp-999999999-0/sub")).unwrap();
        let c1 = sh_git(&f.work, &["rev-parse", "HEAD"]);
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(f.releases(), vec![c1]);
    }

    #[test]
    fn a_dangling_current_is_no_release() {
        let f = Fixture::new();
        let dir = f.layout.repo_dir("salt");
        fs::create_dir_all(&dir).unwrap();
        symlink(
            "releases/0123456789abcdef0123456789abcdef01234567",
            dir.join("current"),
        )
        .unwrap();
        assert_eq!(current_commit(&f.layout, "salt"), None);
        let c1 = sh_git(&f.work, &["rev-parse", "HEAD"]);
        let out = sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
        assert_eq!(
            out,
            SyncOutcome::Updated {
                commit: c1,
                previous: None
            }
        );
    }

    #[test]
    fn a_hung_git_is_killed_at_its_deadline() {
        // An http server that accepts and never answers: git waits forever without a deadline.
        // Over http git runs git-remote-http, which holds the connection: it closes only if
        // that grandchild dies too.
        let (port, closed) = crate::process::testing::silent_server();
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let url = format!("http://127.0.0.1:{port}/repo.git");
        let spec = RepoSpec {
            url: url.clone(),
            reference: "main".into(),
            credentials: None,
            group: None,
        };
        let start = std::time::Instant::now();
        let err = sync(&layout, "salt", &spec, Duration::from_millis(500)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        let err = format!("{err:#}");
        assert!(
            err.contains(&format!(
                "git ls-remote of {url} did not finish within 500ms; killed"
            )) && err.contains("raise [timeouts] git"),
            "{err}"
        );
        closed
            .recv_timeout(Duration::from_secs(5))
            .expect("git-remote-http survived git and still holds its connection");
    }

    #[test]
    fn syncs_serialise_on_the_lock() {
        let f = Fixture::new();
        let held = SyncLock::acquire(&f.layout, T).unwrap();
        let err = SyncLock::acquire(&f.layout, Duration::from_millis(100)).unwrap_err();
        assert!(
            format!("{err:#}").contains("another sync holds the lock"),
            "{err:#}"
        );
        drop(held);
        let _lock = SyncLock::acquire(&f.layout, Duration::from_millis(100)).unwrap();
        sync(&f.layout, "salt", &f.spec("main"), T).unwrap();
    }

    #[test]
    fn spec_uses_ref_in_config() {
        let spec: RepoSpec =
            serde_json::from_str(r#"{"url": "https://x/y.git", "ref": "main"}"#).unwrap();
        assert_eq!(spec.reference, "main");
        assert_eq!(serde_json::to_value(&spec).unwrap()["ref"], "main");
    }
}
