//! Where the agent keeps its files. Every path the agent owns hangs off one root, so
//! `--root DIR` (or `STACKLESS_ROOT`) moves all of them and tests never touch the host.

use std::path::{Path, PathBuf};

/// The agent's file layout under a root (`/` on a real instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root every other path is under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this is the real system root (so we may talk to the system's services).
    pub fn is_system_root(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `ROOT/rel`, for an absolute or relative `rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        let rel = rel.as_ref();
        self.root.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    /// Image defaults written at bake time.
    pub fn defaults_file(&self) -> PathBuf {
        self.join("etc/stackless/init.toml")
    }
    /// Folder of watch rules that salt states may manage.
    pub fn watch_dir(&self) -> PathBuf {
        self.join("etc/stackless/watch.d")
    }
    pub fn salt_config_dir(&self) -> PathBuf {
        self.join("etc/salt")
    }
    pub fn minion_id_file(&self) -> PathBuf {
        self.join("etc/salt/minion_id")
    }
    pub fn minion_conf_file(&self) -> PathBuf {
        self.join("etc/salt/minion.d/stackless.conf")
    }
    /// Persistent agent state (`state.json`, repositories, salt virtualenv).
    pub fn state_dir(&self) -> PathBuf {
        self.join("var/lib/stackless")
    }
    pub fn state_file(&self) -> PathBuf {
        self.join("var/lib/stackless/state.json")
    }
    /// `repos/NAME`, holding `releases/SHA` and the `current` symlink.
    pub fn repo_dir(&self, name: &str) -> PathBuf {
        self.join("var/lib/stackless/repos").join(name)
    }
    /// The published release of a repository.
    pub fn repo_current(&self, name: &str) -> PathBuf {
        self.repo_dir(name).join("current")
    }
    /// Virtualenv for salt installed by the `pip` method.
    pub fn salt_venv(&self) -> PathBuf {
        self.join("opt/stackless/salt")
    }
    /// Runtime files: locks and the ready marker (tmpfs on a real instance).
    pub fn run_dir(&self) -> PathBuf {
        self.join("run/stackless")
    }
    pub fn sync_lock(&self) -> PathBuf {
        self.join("run/stackless/sync.lock")
    }
    pub fn ready_marker(&self) -> PathBuf {
        self.join("run/stackless/ready")
    }
    /// The user-data the last boot applied (decoded), for scheduled and manual syncs.
    pub fn saved_user_data(&self) -> PathBuf {
        self.join("var/lib/stackless/user-data")
    }
    /// Where salt-call writes its JSON result.
    pub fn highstate_out(&self) -> PathBuf {
        self.join("var/lib/stackless/highstate.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keeps_everything_under_root() {
        let l = Layout::new("/tmp/r");
        assert_eq!(l.join("/etc/salt"), PathBuf::from("/tmp/r/etc/salt"));
        assert_eq!(l.join("etc/salt"), PathBuf::from("/tmp/r/etc/salt"));
        assert_eq!(
            l.minion_id_file(),
            PathBuf::from("/tmp/r/etc/salt/minion_id")
        );
        assert_eq!(
            l.repo_current("salt"),
            PathBuf::from("/tmp/r/var/lib/stackless/repos/salt/current")
        );
        assert!(!l.is_system_root());
        assert!(Layout::new("/").is_system_root());
        assert_eq!(
            Layout::new("/").state_file(),
            PathBuf::from("/var/lib/stackless/state.json")
        );
    }
}
