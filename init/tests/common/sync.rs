//! The set-up the resident-mode tests share: a supervisord, a root for the agent, repositories
//! and user-data naming them, and what checks a published release.

use super::*;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig};
use stackless_init::imds::Identity;
use std::fs;
use std::path::{Path, PathBuf};

pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub sup: Supervisord,
}

impl Setup {
    pub fn new(programs: &[(&str, &str)]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisord::start(&tmp.path().join("sup"), programs);
        fs::create_dir_all(tmp.path().join("app")).unwrap();
        Setup { tmp, sup }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    pub fn root(&self) -> PathBuf {
        self.path("root")
    }
    /// User-data with the supervisord of this setup and `extra` appended.
    pub fn user_data(&self, extra: &str) -> String {
        format!(
            "minion_id = \"web-{{instance_id}}\"\n[supervisor]\nsocket = \"{}\"\nconf_dir = \"{}\"\n{extra}",
            self.sup.socket().display(),
            self.sup.conf_dir().display()
        )
    }
    pub fn boot(&self, user_data: &str) -> (Emulator, Agent) {
        let imds = Emulator::start(
            EmulatorConfig::new(Identity::example()).with_user_data(user_data.as_bytes().to_vec()),
        )
        .unwrap();
        let agent = Agent::spawn(&self.root(), &imds.endpoint());
        let code = agent.wait_ready(120);
        assert_eq!(code, 0, "boot not ready: {}", agent.log());
        (imds, agent)
    }
}

pub fn repo_user_data(
    s: &Setup,
    salt: Option<&GitRepo>,
    config: Option<&GitRepo>,
    extra: &str,
) -> String {
    let mut ud = s.user_data("");
    if let Some(r) = salt {
        ud.push_str(&format!("\n[salt]\nrepo = \"{}\"\n", r.url()));
    }
    if let Some(r) = config {
        ud.push_str(&format!("\n[config]\nrepo = \"{}\"\n", r.url()));
    }
    ud.push_str("\n[sync]\nschedule = \"@every 1s\"\n");
    ud.push_str(extra);
    ud
}

pub fn salt_state(marker: &Path, value: &str) -> Vec<(String, String)> {
    vec![
        ("top.sls".into(), "base:\n  '*':\n    - app\n".into()),
        (
            "app.sls".into(),
            format!("marker:\n  file.managed:\n    - name: {}\n    - makedirs: True\n    - contents: {value}\n", marker.display()),
        ),
    ]
}

pub fn commit_files(repo: &GitRepo, files: &[(String, String)], msg: &str) -> String {
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    repo.commit(&refs, msg)
}

/// A folder with a `git` that runs `on_fetch` (shell) before each fetch and then the real git;
/// the PATH that puts it first.
pub fn git_wrapper(bin: &Path, on_fetch: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(bin).unwrap();
    let real_git = real_git();
    fs::write(
        bin.join("git"),
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" fetch \"*) {on_fetch};; esac\nexec {} \"$@\"\n",
            real_git
        ),
    )
    .unwrap();
    fs::set_permissions(bin.join("git"), fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:{}", bin.display(), test_path())
}

/// The sizes of every file of `sha` in `repo` (`git ls-tree -r -l`), by path.
pub fn tree_sizes(repo: &GitRepo, sha: &str) -> Vec<(String, u64)> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo.bare)
        .args(["ls-tree", "-r", "-l", sha])
        .output()
        .unwrap();
    let mut v: Vec<(String, u64)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (meta, path) = l.split_once('\t').unwrap();
            (
                path.to_string(),
                meta.split_whitespace().nth(3).unwrap().parse().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Whether `current` is a whole release: exactly the files of its commit, at their sizes. The
/// commit it holds, or what is wrong with it.
pub fn whole_release(current: &Path, repo: &GitRepo) -> Result<String, String> {
    let target = fs::read_link(current).map_err(|e| format!("{}: {e}", current.display()))?;
    let sha = target.file_name().unwrap().to_str().unwrap().to_string();
    let release = current.parent().unwrap().join(&target);
    let mut on_disk = Vec::new();
    let mut stack = vec![release.clone()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for e in entries.flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(&release)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                on_disk.push((rel, m.len()));
            }
        }
    }
    on_disk.sort();
    let expected = tree_sizes(repo, &sha);
    if on_disk == expected {
        Ok(sha)
    } else {
        Err(format!(
            "release {sha} is not whole: {on_disk:?} on disk, {expected:?} in the commit"
        ))
    }
}

pub fn assert_whole_release(current: &Path, repo: &GitRepo) {
    if let Err(e) = whole_release(current, repo) {
        panic!("{e}");
    }
}

/// Where the real `git` is, for wrappers that call it.
pub fn real_git() -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v git"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
