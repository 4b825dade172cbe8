//! Which folders to watch for a set of patterns, and which files the patterns match now.
//!
//! Every folder on the way from `/` to the files is watched for its own move or deletion, and
//! where the path can change under us, for entry changes (create, delete, rename) of the names
//! the next pattern component can take: that catches a missing folder that appears (the nearest
//! existing ancestor is watched), a new folder matching a glob, and a symlink like `current`
//! replaced by a rename. Real folders on the way get no entry watch, so the comings and goings
//! of other files in busy folders like /tmp or /etc never wake the agent. The folders holding the files are watched for
//! content changes too. Paths stay lexical (never canonicalised): a watch through a symlink
//! lands on the inode it points at now, and the next entry event on the way re-plans.

use super::glob::{is_temp_name, Comp, Pattern};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A `**` walk stops after this many folders per pattern (and says so).
const MAX_ANY_DEPTH_DIRS: usize = 4096;
/// A `**` walk goes no deeper than this.
const MAX_ANY_DEPTH: usize = 32;

/// A folder identity: (device, inode).
pub type DirId = (u64, u64);

/// What one folder (by path) is watched for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DirPlan {
    pub id: DirId,
    /// It holds files some pattern matches: watch content changes.
    pub files: bool,
    /// (pattern, component): entry events whose name that component matches re-plan.
    pub entries: BTreeSet<(usize, usize)>,
}

/// The folders to watch for a set of patterns.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    pub dirs: BTreeMap<PathBuf, DirPlan>,
    /// Per pattern: the folders holding its files, with their identity (a flipped symlink keeps
    /// the path but changes the identity).
    pub file_dirs: Vec<BTreeSet<(PathBuf, DirId)>>,
}

fn dir_id(path: &Path) -> Option<DirId> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Some((m.dev(), m.ino())),
        _ => None,
    }
}

impl Plan {
    pub fn build(patterns: &[Pattern]) -> Plan {
        let mut plan = Plan {
            dirs: BTreeMap::new(),
            file_dirs: vec![BTreeSet::new(); patterns.len()],
        };
        for (pi, pattern) in patterns.iter().enumerate() {
            plan.add_pattern(pi, pattern);
        }
        plan
    }

    fn slot(&mut self, dir: &Path, id: DirId) -> &mut DirPlan {
        if !self.dirs.contains_key(dir) {
            self.dirs.insert(
                dir.to_owned(),
                DirPlan {
                    id,
                    ..DirPlan::default()
                },
            );
        }
        self.dirs.get_mut(dir).expect("inserted above")
    }

    fn add_pattern(&mut self, pi: usize, pattern: &Pattern) {
        let comps = pattern.comps();
        let (_, dir_comps) = comps.split_last().expect("a pattern has a file component");
        let mut cur: BTreeMap<PathBuf, DirId> = BTreeMap::new();
        if let Some(id) = dir_id(Path::new("/")) {
            cur.insert(PathBuf::from("/"), id);
        }
        for (ci, comp) in dir_comps.iter().enumerate() {
            let mut next = BTreeMap::new();
            for (dir, id) in &cur {
                // A real (non-symlink) folder on the way needs no entry watch on its parent:
                // the self events every watch carries (moved, deleted) re-plan if it goes.
                // Entry watches stay where the path can change under us: a missing name, a
                // symlink (the `current` flip), a glob. Busy ancestors such as /tmp or /etc then
                // never wake an idle agent.
                let stable = match comp {
                    Comp::Literal(name) => {
                        fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.is_dir())
                    }
                    _ => false,
                };
                let slot = self.slot(dir, *id);
                if !stable {
                    slot.entries.insert((pi, ci));
                }
                match comp {
                    Comp::Literal(name) => {
                        let child = dir.join(name);
                        if let Some(cid) = dir_id(&child) {
                            next.insert(child, cid);
                        }
                    }
                    Comp::Glob(_) => {
                        for child in list(dir) {
                            if comp.matches(child.as_os_str()) {
                                let child = dir.join(child);
                                if let Some(cid) = dir_id(&child) {
                                    next.insert(child, cid);
                                }
                            }
                        }
                    }
                    Comp::AnyDepth => {
                        next.insert(dir.clone(), *id);
                        let mut found = Vec::new();
                        walk(dir, 0, &mut found, pattern);
                        for (sub, sid) in found {
                            self.slot(&sub, sid).entries.insert((pi, ci));
                            next.insert(sub, sid);
                        }
                    }
                }
            }
            cur = next;
        }
        for (dir, id) in cur {
            self.slot(&dir, id).files = true;
            self.file_dirs[pi].insert((dir, id));
        }
    }

    /// The paths `pattern` (number `pi`) matches now; temp names are left out when the file
    /// component is a glob.
    pub fn matches(&self, pi: usize, pattern: &Pattern) -> Vec<PathBuf> {
        let file_comp = pattern
            .comps()
            .last()
            .expect("a pattern has a file component");
        let mut out = Vec::new();
        for (dir, _) in &self.file_dirs[pi] {
            match file_comp {
                Comp::Literal(name) => {
                    let p = dir.join(name);
                    if fs::symlink_metadata(&p).is_ok() {
                        out.push(p);
                    }
                }
                _ => {
                    for name in list(dir) {
                        if file_comp.matches(&name) && !is_temp_name(&name) {
                            out.push(dir.join(name));
                        }
                    }
                }
            }
        }
        out
    }
}

fn list(dir: &Path) -> Vec<std::ffi::OsString> {
    match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect(),
        Err(_) => Vec::new(),
    }
}

/// All non-hidden sub-folders of `dir` (symlinks are not followed, so no loops).
fn walk(dir: &Path, depth: usize, found: &mut Vec<(PathBuf, DirId)>, pattern: &Pattern) {
    if depth >= MAX_ANY_DEPTH {
        return;
    }
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name();
        if name.as_encoded_bytes().first() == Some(&b'.') {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        if found.len() >= MAX_ANY_DEPTH_DIRS {
            tracing::warn!(
                pattern = pattern.as_str(),
                "`**` matches more than {MAX_ANY_DEPTH_DIRS} folders; the rest are not watched"
            );
            return;
        }
        let sub = dir.join(&name);
        if let Ok(m) = e.metadata() {
            found.push((sub.clone(), (m.dev(), m.ino())));
            walk(&sub, depth + 1, found, pattern);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_ancestors_globs_and_missing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("a/x/conf")).unwrap();
        fs::create_dir_all(root.join("a/y/conf")).unwrap();
        fs::create_dir_all(root.join("a/.hidden/conf")).unwrap();
        fs::write(root.join("a/x/conf/1.conf"), "1").unwrap();
        fs::write(root.join("a/x/conf/__salt.tmp.1.conf"), "1").unwrap();
        let pats = vec![
            Pattern::parse(&format!("{}/a/*/conf/*.conf", root.display())).unwrap(),
            Pattern::parse(&format!("{}/missing/deeper/*.conf", root.display())).unwrap(),
        ];
        let plan = Plan::build(&pats);
        let files: Vec<_> = plan.file_dirs[0].iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(files, vec![root.join("a/x/conf"), root.join("a/y/conf")]);
        assert!(plan.file_dirs[1].is_empty());
        // Every ancestor is watched, up to `/`; for entries only where the path can change
        // under us: before a glob (`a`), or a missing name (`root`, for pattern 1).
        for d in [Path::new("/"), root, &root.join("a"), &root.join("a/x")] {
            assert!(plan.dirs.contains_key(d), "{}", d.display());
        }
        assert!(
            plan.dirs[Path::new("/")].entries.is_empty(),
            "/ is a stable ancestor"
        );
        assert!(
            plan.dirs[&root.join("a/x")].entries.is_empty(),
            "a/x/conf exists: stable"
        );
        assert!(
            !plan.dirs[&root.join("a")].entries.is_empty(),
            "a/* is a glob"
        );
        assert!(
            !plan.dirs[root].entries.iter().any(|&(pi, _)| pi == 0),
            "a exists: stable"
        );
        // The missing folder's nearest existing ancestor is watched.
        assert!(plan.dirs[root]
            .entries
            .contains(&(1, root.components().count() - 1)));
        assert!(!plan.dirs.contains_key(&root.join("missing")));
        assert!(!plan.dirs.contains_key(&root.join("a/.hidden")));
        assert_eq!(
            plan.matches(0, &pats[0]),
            vec![root.join("a/x/conf/1.conf")]
        );
    }

    #[test]
    fn any_depth_walks_subfolders() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir_all(root.join("a/.git/objects")).unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("a/b/loop")).unwrap();
        let pats = vec![Pattern::parse(&format!("{}/a/**/*.conf", root.display())).unwrap()];
        let plan = Plan::build(&pats);
        let files: Vec<_> = plan.file_dirs[0].iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            files,
            vec![root.join("a"), root.join("a/b"), root.join("a/b/c")]
        );
    }

    #[test]
    fn symlinks_on_the_way_keep_their_parent_watched_for_entries() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("releases/r1/app")).unwrap();
        std::os::unix::fs::symlink("releases/r1", root.join("current")).unwrap();
        let pats = vec![Pattern::parse(&format!("{}/current/app/*.conf", root.display())).unwrap()];
        let plan = Plan::build(&pats);
        assert!(
            !plan.dirs[root].entries.is_empty(),
            "the folder holding `current` sees its flip"
        );
        assert!(
            plan.dirs[&root.join("current")].entries.is_empty(),
            "app is a real folder"
        );
        assert!(plan.dirs[&root.join("current/app")].files);
    }
}
