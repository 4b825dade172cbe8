//! Helpers shared by the end-to-end tests: the built agent, real git repositories, real salt.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The folder holding the real `salt-call`; a missing salt fails the test, it never skips it.
pub fn salt_bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("STACKLESS_SALT_CALL") {
        return Path::new(&p).parent().unwrap().to_path_buf();
    }
    let venv = repo_root().join(".venv/bin");
    if venv.join("salt-call").exists() {
        return venv;
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("salt-call").exists() {
                return dir;
            }
        }
    }
    panic!("salt-call not found: run scripts/install-test-deps.sh (or scripts/test.sh), or set STACKLESS_SALT_CALL");
}

/// PATH with the real salt first.
pub fn test_path() -> String {
    format!(
        "{}:{}",
        salt_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs the built `stackless-init` with `--root root` against an IMDS endpoint.
pub fn init(root: &Path, endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stackless-init"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
        .env("PATH", test_path())
        .env_remove("STACKLESS_ROOT")
        .env_remove("RUST_LOG")
        .output()
        .expect("running stackless-init")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `status --json` of a root.
pub fn status(root: &Path) -> serde_json::Value {
    let o = init(root, "http://127.0.0.1:9", &["status", "--json"]);
    assert!(o.status.success(), "status failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("status --json is JSON")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .expect("running git");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A real bare repository with a work clone to commit from.
pub struct GitRepo {
    pub bare: PathBuf,
    work: PathBuf,
}

impl GitRepo {
    pub fn new(parent: &Path, name: &str) -> GitRepo {
        let bare = parent.join(format!("{name}.git"));
        let work = parent.join(format!("{name}-work"));
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        GitRepo { bare, work }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Writes files (path, content), commits, pushes; returns the commit sha.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (path, content) in files {
            let p = self.work.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        git(&self.work, &["push", "-q", "origin", "main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }
}
