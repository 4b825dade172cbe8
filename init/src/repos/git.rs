//! One git command line: prompts off, the system config ignored, settings that could change a
//! checkout pinned, the caller's environment unable to redirect it, and a deadline that kills
//! git with its helpers (ssh, git-remote-http).

use crate::gitauth::GitAuth;
use crate::process::{self, Deadline};
use crate::userdata::Timeouts;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where a git command runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Place<'a> {
    /// `git -C DIR`.
    pub dir: Option<&'a Path>,
    /// `--git-dir`: the object store's bare repository.
    pub git_dir: Option<&'a Path>,
    /// `--work-tree`: where a checkout writes files.
    pub work_tree: Option<&'a Path>,
    /// `GIT_INDEX_FILE`: a throwaway index, so the store's own is never touched.
    pub index: Option<&'a Path>,
}

impl<'a> Place<'a> {
    /// Inside the bare repository `git_dir`.
    pub fn store(git_dir: &'a Path) -> Self {
        Place {
            git_dir: Some(git_dir),
            ..Place::default()
        }
    }
}

/// Runs one git command at `place` and returns its stdout. Killed, with its helpers, after
/// `timeout`; `url` is named in errors; `auth` gives a private repository's credentials.
pub fn run<'a>(
    place: Place<'_>,
    url: Option<&str>,
    args: impl IntoIterator<Item = &'a OsStr>,
    timeout: Duration,
    auth: Option<&GitAuth>,
) -> Result<String> {
    let args: Vec<&OsStr> = args.into_iter().collect();
    let sub = subcommand(&args);
    String::from_utf8(run_bytes(place, url, args, timeout, auth)?)
        .with_context(|| format!("git {sub} printed something that is not UTF-8"))
}

/// [`run`], stdout as bytes (paths in `-z` listings need not be UTF-8).
pub fn run_bytes<'a>(
    place: Place<'_>,
    url: Option<&str>,
    args: impl IntoIterator<Item = &'a OsStr>,
    timeout: Duration,
    auth: Option<&GitAuth>,
) -> Result<Vec<u8>> {
    let args: Vec<&OsStr> = args.into_iter().collect();
    let sub = subcommand(&args);
    let mut cmd = Command::new("git");
    if let Some(dir) = place.dir {
        cmd.arg("-C").arg(dir);
    }
    if let Some(d) = place.git_dir {
        cmd.arg("--git-dir").arg(d);
    }
    if let Some(w) = place.work_tree {
        cmd.arg("--work-tree").arg(w);
    }
    for c in [
        "protocol.version=2",
        "core.hooksPath=/dev/null",
        "core.autocrlf=false",
        "core.fsmonitor=false",
        "core.symlinks=true",
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
        "GIT_SHALLOW_FILE",
    ] {
        cmd.env_remove(var);
    }
    if let Some(index) = place.index {
        cmd.env("GIT_INDEX_FILE", index);
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
    Ok(out.stdout)
}

/// The git subcommand in `args`, past any leading `-c NAME=VALUE` and global `--options`.
fn subcommand(args: &[&OsStr]) -> String {
    let mut i = 0;
    while let Some(a) = args.get(i).filter(|a| a.as_bytes().starts_with(b"-")) {
        i += if *a == "-c" { 2 } else { 1 };
    }
    args.get(i)
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A full commit id (sha1, or sha256 for repositories that use it), lowercase.
pub fn is_full_sha(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
