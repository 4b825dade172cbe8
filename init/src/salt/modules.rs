//! Whether a highstate needs salt to sync the state tree's custom modules first.
//!
//! Salt's default (`autoload_dynamic_modules: True`) makes every `state.highstate` call
//! `saltutil.sync_all`: it walks the file roots for `_modules`, `_states`, `_grains` and the
//! other `_*` directories, once per module type, each walk with a file client and a loader of
//! its own. For a tree with none of them, which is most trees, that is a third of a small
//! highstate's time (measured on salt 3008: 1.46 s to 0.96 s on the host; under TCG the
//! same share of about 25 s). So before each highstate the agent writes
//! `minion.d/stackless-modules.conf` saying whether salt should sync:
//!
//! - yes when the published tree has a `_*` directory at its top (salt's own test for what to
//!   sync is the directory's name, so a tree with any of them keeps salt's behaviour whole);
//! - yes when salt's `extmods` directory still holds a module from an earlier sync, so a
//!   commit that removes the last custom module is synced too and salt deletes the stale copy;
//! - no otherwise.

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

use crate::fsutil::write_if_changed;
use crate::paths::Layout;

/// Where salt keeps synced custom modules: its default `extension_modules`
/// (`cachedir/extmods`; under a test root salt's `root_dir` puts it under the root too).
pub fn extmods_dir(layout: &Layout) -> PathBuf {
    layout.join("var/cache/salt/minion/extmods")
}

/// The file stackless-init writes before each highstate.
pub fn conf_file(layout: &Layout) -> PathBuf {
    layout
        .salt_config_dir()
        .join("minion.d/stackless-modules.conf")
}

/// Why salt should sync before this highstate, or `None` when there is nothing to sync.
pub fn sync_reason(file_root: &Path, extmods: &Path) -> Option<String> {
    if let Ok(entries) = fs::read_dir(file_root) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            // `is_dir` follows symbolic links, as salt's walk does.
            if name.starts_with('_') && e.path().is_dir() {
                return Some(format!("the state tree has {name}/"));
            }
        }
    }
    has_a_file(extmods, 4).then(|| format!("{} holds modules synced earlier", extmods.display()))
}

/// Whether `dir` holds a regular file at most `depth` levels down (salt's layout is
/// `extmods/TYPE/NAME.py`, with `__pycache__` beside).
fn has_a_file(dir: &Path, depth: usize) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| match e.file_type() {
        Ok(t) if t.is_dir() => depth > 0 && has_a_file(&e.path(), depth - 1),
        Ok(_) => true,
        Err(_) => false,
    })
}

/// Writes `minion.d/stackless-modules.conf` for a highstate of the tree at `file_root`; returns
/// whether salt will sync, and why.
pub fn write_sync_setting(layout: &Layout, file_root: &Path) -> Result<Option<String>> {
    let reason = sync_reason(file_root, &extmods_dir(layout));
    let text = format!(
        "# Written by stackless-init before each highstate: salt syncs the state tree's custom\n\
         # modules (_modules, _states, ...) only when the tree has some or had some.\n\
         autoload_dynamic_modules: {}\n",
        if reason.is_some() { "true" } else { "false" }
    );
    let path = conf_file(layout);
    write_if_changed(&path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_without_custom_modules_needs_no_sync() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("states");
        fs::create_dir_all(root.join("web")).unwrap();
        fs::write(root.join("top.sls"), "base: {}\n").unwrap();
        fs::write(root.join("_not_a_dir.sls"), "").unwrap();
        assert_eq!(sync_reason(&root, &d.path().join("extmods")), None);
        // A tree that is not there yet (the first boot's minion config) needs none either.
        assert_eq!(
            sync_reason(&d.path().join("nowhere"), &d.path().join("x")),
            None
        );
    }

    #[test]
    fn a_custom_module_directory_or_a_linked_one_needs_a_sync() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("states");
        fs::create_dir_all(root.join("_states")).unwrap();
        let r = sync_reason(&root, &d.path().join("extmods")).unwrap();
        assert!(r.contains("_states/"), "{r}");

        let other = d.path().join("states2");
        fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(root.join("_states"), other.join("_modules")).unwrap();
        assert!(sync_reason(&other, &d.path().join("extmods")).is_some());
    }

    #[test]
    fn modules_left_from_an_earlier_sync_need_one_more() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("states");
        fs::create_dir_all(&root).unwrap();
        let ext = d.path().join("extmods");
        // Empty type directories are what salt leaves after removing the last module.
        fs::create_dir_all(ext.join("modules/__pycache__")).unwrap();
        assert_eq!(sync_reason(&root, &ext), None);
        fs::write(ext.join("modules/greet.py"), "").unwrap();
        let r = sync_reason(&root, &ext).unwrap();
        assert!(r.contains("synced earlier"), "{r}");
    }

    #[test]
    fn the_setting_file_follows_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let root = layout.repo_current("salt");
        fs::create_dir_all(&root).unwrap();
        assert_eq!(write_sync_setting(&layout, &root).unwrap(), None);
        let text = fs::read_to_string(conf_file(&layout)).unwrap();
        assert!(text.contains("autoload_dynamic_modules: false"), "{text}");
        fs::create_dir(root.join("_modules")).unwrap();
        assert!(write_sync_setting(&layout, &root).unwrap().is_some());
        let text = fs::read_to_string(conf_file(&layout)).unwrap();
        assert!(text.contains("autoload_dynamic_modules: true"), "{text}");
    }
}
