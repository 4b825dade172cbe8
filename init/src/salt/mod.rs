//! Salt, masterless: the minion configuration ([`config`]), salt itself on the machine
//! ([`install`]), and `state.highstate` with its parsed result ([`highstate`]), preceded by a
//! sync of the tree's custom modules only when it has some ([`modules`]).
//!
//! Salt runs as `salt-call --local` with `--config-dir` pointing at the layout's `etc/salt`;
//! under a root other than `/` the configuration sets `root_dir` so salt's cache, keys,
//! sockets and logs stay under that root too.

pub mod config;
pub mod highstate;
pub mod install;
pub mod modules;
pub mod warm;

pub use config::{write_minion_config, MinionConfig};
pub use highstate::{FailedState, HighstateReport};
pub use install::{ensure_installed, find_salt_call, InstallMethod, InstallOutcome, InstallSpec};

/// The real `salt-call` for tests: `STACKLESS_SALT_CALL`, else `salt-call` on `PATH`, else the
/// repository's `.venv/bin/salt-call`. Tests fail, never skip, without it.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::paths::Layout;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    pub fn salt_call() -> PathBuf {
        if let Some(p) = std::env::var_os("STACKLESS_SALT_CALL") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "STACKLESS_SALT_CALL={} does not exist",
                p.display()
            );
            return p;
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let c = dir.join("salt-call");
                if c.is_file() {
                    return c;
                }
            }
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/salt-call");
        if venv.is_file() {
            return venv;
        }
        panic!(
            "these tests need the real salt-call (PyPI `salt`): set STACKLESS_SALT_CALL, put salt-call on PATH, \
             or install it into {} (scripts/test.sh does)",
            venv.display()
        );
    }

    /// `salt-call --local --config-dir LAYOUT/etc/salt ARGS --out=json`, parsed.
    pub fn salt_json(salt: &Path, layout: &Layout, args: &[&str]) -> serde_json::Value {
        assert!(
            layout.minion_conf_file().is_file(),
            "write the minion configuration first"
        );
        let out = Command::new(salt)
            .arg("--local")
            .arg("--config-dir")
            .arg(layout.salt_config_dir())
            .args(args)
            .args(["--out=json", "-l", "error"])
            .output()
            .expect("running salt-call");
        assert!(
            out.status.success(),
            "salt-call {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "salt-call {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}
