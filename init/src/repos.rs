//! Git repositories: each one is checked out into `repos/NAME/releases/SHA` and published by an
//! atomic flip of the relative symlink `repos/NAME/current`.
//!
//! The `git` command line does the transport, so any URL git understands works (https, ssh, git,
//! file). A sync is cheap when nothing changed: one `git ls-remote`, no fetch. A new commit is
//! fetched shallow into a temporary folder, renamed into place and published; a failure at any
//! point removes the temporary folder and keeps the old `current`. Callers hold the
//! [`SyncLock`](crate::lock::SyncLock) so syncs never overlap.

use crate::gitauth::GitAuth;
use crate::paths::Layout;
use crate::process::{self, Deadline};
pub use crate::userdata::RepoSpec;
use crate::userdata::Timeouts;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

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
    let commit = if releases.join(&sha).is_dir() {
        // Flipping back to a release we still have: nothing to fetch (its modes are made right
        // again: it may predate them, or the group may have changed).
        restrict(&releases.join(&sha), spec.group.as_deref())?;
        sha
    } else {
        let tmp = TempDir::new(&releases)?;
        let head = fetch(&tmp.path, &spec.url, &fetch_ref, timeout, auth)?;
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
            // Readable by root (or the configured group) alone before it is ever published.
            restrict(&tmp.path, spec.group.as_deref())?;
            durable(&tmp.path);
            fs::rename(&tmp.path, &release).with_context(|| {
                format!("renaming {} to {}", tmp.path.display(), release.display())
            })?;
            tmp.disarm();
        }
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

/// A full commit id (sha1, or sha256 for repositories that use it), lowercase.
fn is_full_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Resolves the ref to a commit and the name to fetch it by. A full sha needs no round trip.
fn resolve(spec: &RepoSpec, timeout: Duration, auth: Option<&GitAuth>) -> Result<(String, String)> {
    let r = spec.reference.as_str();
    let lower = r.to_ascii_lowercase();
    if is_full_sha(&lower) {
        return Ok((lower.clone(), lower));
    }
    let peeled_pattern = format!("{r}^{{}}");
    let out = git(
        None,
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
        "ref {r:?} not found at {} (looked for branch refs/heads/{r}, tag refs/tags/{r} and {r}); \
         check the configured ref",
        spec.url
    )
}

/// Fetches `what` shallow into the empty folder `dir`, checks it out detached, and returns HEAD.
fn fetch(
    dir: &Path,
    url: &str,
    what: &str,
    timeout: Duration,
    auth: Option<&GitAuth>,
) -> Result<String> {
    let d = Some(dir);
    git(
        None,
        None,
        [
            OsStr::new("init"),
            OsStr::new("-q"),
            OsStr::new("--template="),
            dir.as_os_str(),
        ],
        timeout,
        None,
    )?;
    git(
        d,
        Some(url),
        ["fetch", "-q", "--depth", "1", "--no-tags", url, what].map(OsStr::new),
        timeout,
        auth,
    )?;
    git(
        d,
        None,
        ["checkout", "-q", "--detach", "FETCH_HEAD"].map(OsStr::new),
        timeout,
        None,
    )?;
    let head = git(
        d,
        None,
        ["rev-parse", "--verify", "HEAD^{commit}"].map(OsStr::new),
        timeout,
        None,
    )?;
    let head = head.trim().to_string();
    if !is_full_sha(&head) {
        bail!("git rev-parse HEAD gave {head:?} in {}", dir.display());
    }
    Ok(head)
}

/// Makes a release readable by root alone (dirs 0700, files 0600, executables 0700) or, with
/// `group`, by that group too (0750 / 0640 / 0750, group-owned). Symlinks are left as they are.
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
        (0o750, 0o640, 0o750)
    } else {
        (0o700, 0o600, 0o700)
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
        if gid.is_some() {
            nix::unistd::chown(&path, None, gid)
                .with_context(|| format!("changing the group of {}", path.display()))?;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))?;
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
    let dir = layout.repo_dir(name).join("releases");
    let mut found: Vec<(SystemTime, String)> = fs::read_dir(&dir)
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

/// Runs one git command (in `dir`, if given) with prompts off, the system config ignored and
/// settings that could change a checkout pinned; returns stdout. Killed, with its helpers (ssh),
/// after `timeout`; `url` is named in errors.
fn git<'a>(
    dir: Option<&Path>,
    url: Option<&str>,
    args: impl IntoIterator<Item = &'a OsStr>,
    timeout: Duration,
    auth: Option<&GitAuth>,
) -> Result<String> {
    let args: Vec<&OsStr> = args.into_iter().collect();
    let sub = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.arg("-C").arg(dir);
    }
    for c in [
        "protocol.version=2",
        "core.hooksPath=/dev/null",
        "core.autocrlf=false",
        "core.fsmonitor=false",
        "advice.detachedHead=false",
        "init.defaultBranch=main",
        "gc.auto=0",
        "maintenance.auto=false",
        "fetch.recurseSubmodules=false",
    ] {
        cmd.arg("-c").arg(c);
    }
    if let Some(auth) = auth {
        auth.apply(&mut cmd);
    }
    cmd.args(&args);
    for var in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_ALTERNATE_OBJECT_DIRECTORIES",
        "GIT_COMMON_DIR",
        "GIT_NAMESPACE",
        "GIT_CONFIG",
        "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("LC_ALL", "C");
    let what = format!(
        "git {sub}{}",
        url.map(|u| format!(" of {u}")).unwrap_or_default()
    );
    let out = process::run(&mut cmd, &what, Deadline::new(timeout, Timeouts::GIT))?;
    if !out.status.success() {
        let tail = out.tail(5).replace('\n', " | ");
        bail!(
            "git {sub} failed ({}): {}",
            out.status,
            if tail.is_empty() { "no output" } else { &tail }
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("git {sub} printed something that is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::SyncLock;
    use std::process::Stdio;

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
        assert_eq!(mode(&secret), 0o600);
        assert_eq!(mode(&release.join("pillar")), 0o700);
        assert_eq!(mode(&fs::canonicalize(&release).unwrap()), 0o700);
        assert!(!nobody_reads(&secret), "nobody read the salt pillar");

        // A config repository readable by the programs' group (nobody's own, nogroup).
        let mut spec = f.spec("main");
        spec.group = Some("nogroup".into());
        sync(&f.layout, "config", &spec, T).unwrap();
        let secret = f.layout.repo_current("config").join("pillar/secrets.sls");
        assert_eq!(mode(&secret), 0o640);
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
        assert_eq!(mode(&old.join("pillar/secrets.sls")), 0o600);
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
        let names: Vec<_> = fs::read_dir(f.layout.repo_dir("salt"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
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
    fn missing_ref_errs_clearly() {
        let f = Fixture::new();
        let err = sync(&f.layout, "salt", &f.spec("no-such-branch"), T).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("ref \"no-such-branch\" not found at file://"),
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
