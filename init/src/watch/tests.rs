//! Watcher tests against the real kernel inotify in temporary folders.
//!
//! inotify queues an event before the file-system call that causes it returns, so the tests
//! need no sleeps: they change files, read events and pass a synthetic clock.

use super::*;
use std::fs;
use std::os::unix::fs::symlink;
use tempfile::TempDir;

fn rule(patterns: &[&Path], targets: &[&str], signal: Option<&str>) -> Rule {
    Rule {
        patterns: patterns.iter().map(|p| p.display().to_string()).collect(),
        targets: targets.iter().map(|t| t.to_string()).collect(),
        signal: signal.map(str::to_owned),
    }
}

struct Env {
    _tmp: TempDir,
    root: PathBuf,
    now: Instant,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        Env {
            _tmp: tmp,
            root,
            now: Instant::now(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn write(&self, rel: &str, data: &str) {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    /// Reads the events, lets every window pass, returns what is due; nothing stays pending.
    fn settle(&mut self, w: &mut Watcher) -> Vec<Due> {
        w.read_events(self.now).unwrap();
        self.now += Duration::from_secs(10);
        let due = w.take_due(self.now);
        assert_eq!(w.next_deadline(), None, "nothing stays pending");
        due
    }
}

fn due(target: &str, signal: Option<&str>, paths: &[PathBuf]) -> Due {
    Due {
        target: target.to_owned(),
        signal: signal.map(str::to_owned),
        paths: paths.to_vec(),
    }
}

#[test]
fn write_in_place_watches_folders_only() {
    let mut env = Env::new();
    env.write("etc/app/a.conf", "1");
    env.write("etc/app/b.txt", "1");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("etc/app/*.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    assert_eq!(w.next_deadline(), None);
    let dirs = w.watched_dirs();
    assert!(dirs.contains(&env.p("etc/app")));
    assert!(dirs.contains(&env.root));
    assert!(dirs.contains(&PathBuf::from("/")));
    assert!(dirs.iter().all(|d| d.is_dir()), "{dirs:?}");
    assert_eq!(env.settle(&mut w), vec![]);

    env.write("etc/app/a.conf", "2");
    env.write("etc/app/b.txt", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("etc/app/a.conf")])]
    );
    // A second in-place edit of the same file is still seen (the watch is on the folder).
    fs::OpenOptions::new()
        .append(true)
        .open(env.p("etc/app/a.conf"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"3"))
        .unwrap();
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("etc/app/a.conf")])]
    );
}

#[test]
fn identical_rewrite_gives_nothing() {
    let mut env = Env::new();
    env.write("c/a.conf", "same");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("c/*.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    env.write("c/a.conf", "same");
    w.read_events(env.now).unwrap();
    assert!(w.next_deadline().is_some(), "the write is pending");
    assert_eq!(env.settle(&mut w), vec![]);
    // Changed and changed back inside one window: nothing either.
    env.write("c/a.conf", "other");
    env.write("c/a.conf", "same");
    assert_eq!(env.settle(&mut w), vec![]);
}

#[test]
fn rename_over_like_salt_and_editors() {
    let mut env = Env::new();
    env.write("c/a.conf", "1");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("c/*")], &["app"], Some("HUP"))],
        Timing::default(),
    )
    .unwrap();
    // salt file.managed
    env.write("c/__salt.tmp.x1y2", "2");
    fs::rename(env.p("c/__salt.tmp.x1y2"), env.p("c/a.conf")).unwrap();
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", Some("HUP"), &[env.p("c/a.conf")])]
    );
    // vim: probe file, backup by rename, write new, remove backup
    env.write("c/4913", "");
    fs::remove_file(env.p("c/4913")).unwrap();
    fs::rename(env.p("c/a.conf"), env.p("c/a.conf~")).unwrap();
    env.write("c/a.conf", "3");
    fs::remove_file(env.p("c/a.conf~")).unwrap();
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", Some("HUP"), &[env.p("c/a.conf")])]
    );
    // git: write index.lock, rename over
    env.write("c/a.conf.lock", "4");
    fs::rename(env.p("c/a.conf.lock"), env.p("c/a.conf")).unwrap();
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", Some("HUP"), &[env.p("c/a.conf")])]
    );
}

#[test]
fn temp_files_never_trigger() {
    let mut env = Env::new();
    env.write("c/keep", "1");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("c/*"), &env.p("c/.*")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    for name in [
        "__salt.tmp.abc",
        ".#a.conf",
        "a.conf~",
        ".a.conf.swp",
        ".a.conf.swx",
        "a.tmp",
        "4913",
        "index.lock",
        ".a.conf.tmp-4242",
    ] {
        env.write(&format!("c/{name}"), "x");
        env.write(&format!("c/{name}"), "y");
        fs::remove_file(env.p(&format!("c/{name}"))).unwrap();
    }
    w.read_events(env.now).unwrap();
    assert_eq!(w.next_deadline(), None, "temp files are not even pending");
    // A real hidden file does count.
    env.write("c/.env", "x");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("c/.env")])]
    );
}

#[test]
fn delete_and_recreate() {
    let mut env = Env::new();
    env.write("c/a.conf", "1");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("c/a.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    // Deleted and recreated with the same content in one window: nothing.
    fs::remove_file(env.p("c/a.conf")).unwrap();
    env.write("c/a.conf", "1");
    assert_eq!(env.settle(&mut w), vec![]);
    // Deleted and recreated with new content: one.
    fs::remove_file(env.p("c/a.conf")).unwrap();
    env.write("c/a.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("c/a.conf")])]
    );
    // Deleted: one; recreated later: one more.
    fs::remove_file(env.p("c/a.conf")).unwrap();
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("c/a.conf")])]
    );
    env.write("c/a.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("c/a.conf")])]
    );
}

#[test]
fn missing_folder_created_later_at_once() {
    let mut env = Env::new();
    let mut w = Watcher::new(
        vec![rule(&[&env.p("a/b/c/*.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    assert!(w.watched_dirs().contains(&env.root));
    assert!(!w.watched_dirs().contains(&env.p("a")));
    // mkdir -p and write before the agent reads anything.
    env.write("a/b/c/x.conf", "1");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("a/b/c/x.conf")])]
    );
    assert!(w.watched_dirs().contains(&env.p("a/b/c")));
    env.write("a/b/c/x.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("a/b/c/x.conf")])]
    );
}

#[test]
fn missing_folder_created_step_by_step() {
    let mut env = Env::new();
    let mut w = Watcher::new(
        vec![rule(&[&env.p("a/b/c/*.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    for d in ["a", "a/b", "a/b/c"] {
        fs::create_dir(env.p(d)).unwrap();
        assert_eq!(env.settle(&mut w), vec![]);
        assert!(w.watched_dirs().contains(&env.p(d)));
    }
    env.write("a/b/c/x.conf", "1");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("a/b/c/x.conf")])]
    );
    // The folder goes away: its file is gone (one Due), the ancestor is watched again.
    fs::remove_dir_all(env.p("a/b")).unwrap();
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("a/b/c/x.conf")])]
    );
    assert!(!w.watched_dirs().contains(&env.p("a/b/c")));
    env.write("a/b/c/x.conf", "1");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("a/b/c/x.conf")])]
    );
}

/// Points `repos/config/current` at `releases/REL` the way the repository code does: a new
/// symlink renamed over the old one.
fn flip(env: &Env, rel: &str) {
    let tmp = env.p("repos/config/.current.new");
    symlink(format!("releases/{rel}"), &tmp).unwrap();
    fs::rename(&tmp, env.p("repos/config/current")).unwrap();
}

#[test]
fn release_symlink_flip() {
    let mut env = Env::new();
    env.write("repos/config/releases/r1/app/a.conf", "A");
    env.write("repos/config/releases/r1/app/b.conf", "B");
    symlink("releases/r1", env.p("repos/config/current")).unwrap();
    let live = env.p("repos/config/current/app");
    let conf = |n: &str| live.join(n);
    let mut w = Watcher::new(
        vec![rule(&[&conf("*.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();

    // Same content in the new release: nothing due.
    env.write("repos/config/releases/r2/app/a.conf", "A");
    env.write("repos/config/releases/r2/app/b.conf", "B");
    assert_eq!(
        env.settle(&mut w),
        vec![],
        "building a release is not watched"
    );
    flip(&env, "r2");
    assert_eq!(env.settle(&mut w), vec![]);

    // Changed content (one file changed, one removed, one added): one Due.
    env.write("repos/config/releases/r3/app/a.conf", "A2");
    env.write("repos/config/releases/r3/app/c.conf", "C");
    flip(&env, "r3");
    assert_eq!(
        env.settle(&mut w),
        vec![due(
            "app",
            None,
            &[conf("a.conf"), conf("b.conf"), conf("c.conf")]
        )]
    );

    // The watch followed the flip: the live release is watched, the old one is not.
    env.write("repos/config/releases/r3/app/a.conf", "A3");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[conf("a.conf")])]
    );
    env.write("repos/config/releases/r1/app/a.conf", "old");
    env.write("repos/config/releases/r2/app/a.conf", "old");
    assert_eq!(env.settle(&mut w), vec![]);

    // Back to an older release with different content.
    flip(&env, "r1");
    assert_eq!(
        env.settle(&mut w),
        vec![due(
            "app",
            None,
            &[conf("a.conf"), conf("b.conf"), conf("c.conf")]
        )]
    );
}

#[test]
fn burst_gives_one_due_per_target() {
    let env = Env::new();
    let mut w = Watcher::new(
        vec![
            rule(&[&env.p("c/*.conf")], &["app", "group:*"], None),
            rule(&[&env.p("c/web.conf")], &["web"], Some("HUP")),
        ],
        Timing::default(),
    )
    .unwrap();
    let t0 = env.now;
    let mut dues = Vec::new();
    for i in 0..500 {
        let name = ["a.conf", "b.conf", "web.conf"][i % 3];
        env.write(&format!("c/{name}"), &i.to_string());
        if i % 50 == 49 {
            // The agent wakes now and then inside the quiet window.
            let now = t0 + Duration::from_millis(i as u64 / 10);
            w.read_events(now).unwrap();
            dues.extend(w.take_due(now));
        }
    }
    assert!(dues.is_empty(), "nothing is due inside the quiet window");
    let last = t0 + Duration::from_millis(49);
    assert_eq!(w.next_deadline(), Some(last + Duration::from_millis(100)));
    dues.extend(w.take_due(last + Duration::from_millis(99)));
    assert!(dues.is_empty());
    dues.extend(w.take_due(last + Duration::from_millis(100)));
    let all = vec![env.p("c/a.conf"), env.p("c/b.conf"), env.p("c/web.conf")];
    assert_eq!(
        dues,
        vec![
            due("app", None, &all),
            due("group:*", None, &all),
            due("web", Some("HUP"), &[env.p("c/web.conf")]),
        ]
    );
    assert_eq!(w.next_deadline(), None);
}

#[test]
fn max_delay_bounds_an_endless_stream() {
    let env = Env::new();
    let timing = Timing::default();
    let mut w = Watcher::new(vec![rule(&[&env.p("c/*.log")], &["app"], None)], timing).unwrap();
    let t0 = env.now;
    let mut at = Vec::new();
    for i in 0..60u32 {
        // An event every 50ms for 3s: the quiet window never passes.
        let now = t0 + Duration::from_millis(50) * i;
        env.write("c/x.log", &i.to_string());
        w.read_events(now).unwrap();
        if let Some(d) = w.next_deadline() {
            if d <= now {
                at.extend(w.take_due(now).into_iter().map(|_| now - t0));
            }
        }
    }
    assert_eq!(at, vec![timing.max_delay]);
}

#[test]
fn shared_files_and_signal_vs_restart() {
    let mut env = Env::new();
    env.write("c/shared.conf", "1");
    env.write("c/only-a.conf", "1");
    let mut w = Watcher::new(
        vec![
            rule(&[&env.p("c/*.conf")], &["a"], Some("HUP")),
            rule(&[&env.p("c/shared.conf")], &["a"], None),
            rule(&[&env.p("c/shared.conf")], &["b"], Some("USR1")),
        ],
        Timing::default(),
    )
    .unwrap();
    env.write("c/only-a.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("a", Some("HUP"), &[env.p("c/only-a.conf")])]
    );
    env.write("c/shared.conf", "2");
    env.write("c/only-a.conf", "3");
    assert_eq!(
        env.settle(&mut w),
        vec![
            due("a", None, &[env.p("c/only-a.conf"), env.p("c/shared.conf")]),
            due("b", Some("USR1"), &[env.p("c/shared.conf")]),
        ]
    );
}

#[test]
fn a_target_taken_early_does_not_hide_a_shared_change_from_another() {
    let env = Env::new();
    env.write("c/shared.conf", "1");
    let mut w = Watcher::new(
        vec![
            rule(&[&env.p("c/*.conf")], &["a"], None),
            rule(&[&env.p("c/shared.conf")], &["b"], None),
        ],
        Timing::default(),
    )
    .unwrap();
    let t0 = env.now;
    env.write("c/other.conf", "1");
    w.read_events(t0).unwrap();
    // Two writes: `b` waits its whole quiet window (one finished write would be due at once).
    env.write("c/shared.conf", "2");
    env.write("c/shared.conf", "3");
    w.read_events(t0 + Duration::from_millis(1990)).unwrap();
    // `a` hits max_delay first and records the new hash of shared.conf...
    let first = w.take_due(t0 + Duration::from_secs(2));
    assert_eq!(
        first,
        vec![due(
            "a",
            None,
            &[env.p("c/other.conf"), env.p("c/shared.conf")]
        )]
    );
    // ...`b` still gets the change when its quiet window ends.
    assert_eq!(w.take_due(t0 + Duration::from_millis(2089)), vec![]);
    let second = w.take_due(t0 + Duration::from_millis(2090));
    assert_eq!(second, vec![due("b", None, &[env.p("c/shared.conf")])]);
    assert_eq!(w.next_deadline(), None);
}

#[test]
fn glob_folders_and_any_depth_pick_up_new_folders() {
    let mut env = Env::new();
    env.write("sites/one/site.conf", "1");
    env.write("tree/x.conf", "1");
    let mut w = Watcher::new(
        vec![
            rule(&[&env.p("sites/*/site.conf")], &["sites"], None),
            rule(&[&env.p("tree/**/*.conf")], &["tree"], None),
        ],
        Timing::default(),
    )
    .unwrap();
    env.write("sites/two/site.conf", "2");
    env.write("tree/a/b/c/deep.conf", "1");
    env.write("tree/.git/hidden.conf", "1");
    assert_eq!(
        env.settle(&mut w),
        vec![
            due("sites", None, &[env.p("sites/two/site.conf")]),
            due("tree", None, &[env.p("tree/a/b/c/deep.conf")]),
        ]
    );
    env.write("sites/one/site.conf", "2");
    env.write("tree/a/b/c/deep.conf", "2");
    env.write("tree/a/b/mid.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![
            due("sites", None, &[env.p("sites/one/site.conf")]),
            due(
                "tree",
                None,
                &[env.p("tree/a/b/c/deep.conf"), env.p("tree/a/b/mid.conf")]
            ),
        ]
    );
}

#[test]
fn set_rules_baselines_without_spurious_due() {
    let mut env = Env::new();
    env.write("one/a.conf", "1");
    env.write("two/b.conf", "1");
    let r1 = rule(&[&env.p("one/*.conf")], &["one"], None);
    let r2 = rule(&[&env.p("two/*.conf")], &["two"], None);
    let mut w = Watcher::new(vec![r1.clone()], Timing::default()).unwrap();
    env.write("one/a.conf", "2");
    w.read_events(env.now).unwrap();
    // Reload while a change is pending: the change survives, the new rule brings nothing.
    w.set_rules(vec![r1.clone(), r2.clone()]).unwrap();
    assert!(w.watched_dirs().contains(&env.p("two")));
    assert_eq!(
        env.settle(&mut w),
        vec![due("one", None, &[env.p("one/a.conf")])]
    );
    env.write("two/b.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("two", None, &[env.p("two/b.conf")])]
    );
    // A deletion pending across a reload is not lost.
    fs::remove_file(env.p("two/b.conf")).unwrap();
    w.read_events(env.now).unwrap();
    w.set_rules(vec![r1.clone(), r2.clone()]).unwrap();
    assert_eq!(
        env.settle(&mut w),
        vec![due("two", None, &[env.p("two/b.conf")])]
    );
    env.write("two/b.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("two", None, &[env.p("two/b.conf")])]
    );
    // Dropping a rule stops its watch.
    w.set_rules(vec![r2]).unwrap();
    assert!(!w.watched_dirs().contains(&env.p("one")));
    env.write("one/a.conf", "3");
    assert_eq!(env.settle(&mut w), vec![]);
    // Bad patterns are refused.
    assert!(w
        .set_rules(vec![Rule {
            patterns: vec!["relative/*.conf".into()],
            targets: vec!["x".into()],
            signal: None,
        }])
        .is_err());
}

/// Throws away whatever the kernel queued, as an overflow would.
fn lose_events(w: &mut Watcher) {
    while let Ok(ev) = w.inotify.read_events() {
        if ev.is_empty() {
            break;
        }
    }
}

#[test]
fn overflow_rescans_and_loses_nothing() {
    let mut env = Env::new();
    env.write("c/a.conf", "1");
    env.write("c/b.conf", "1");
    env.write("c/gone.conf", "1");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("c/*.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    env.write("c/a.conf", "2");
    env.write("c/new.conf", "1");
    fs::remove_file(env.p("c/gone.conf")).unwrap();
    lose_events(&mut w);
    w.read_events(env.now).unwrap();
    assert_eq!(w.next_deadline(), None, "the events are lost");
    w.inject_overflow(env.now).unwrap();
    assert_eq!(w.overflows(), 1);
    assert_eq!(
        env.settle(&mut w),
        vec![due(
            "app",
            None,
            &[env.p("c/a.conf"), env.p("c/gone.conf"), env.p("c/new.conf")]
        )]
    );
    // The agent can rescan on its own too; nothing changed, nothing due.
    w.rescan(env.now);
    assert_eq!(env.settle(&mut w), vec![]);
    env.write("c/b.conf", "2");
    lose_events(&mut w);
    w.rescan(env.now);
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("c/b.conf")])]
    );
}

#[test]
fn real_queue_overflow() {
    let max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(usize::MAX);
    if max > 100_000 {
        eprintln!("max_queued_events is {max}; not provoking an overflow");
        return;
    }
    let mut env = Env::new();
    env.write("c/a.conf", "1");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("c/*.conf")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    // Each new file queues IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE (distinct names: no merging).
    for i in 0..max / 3 + 100 {
        fs::write(env.p(&format!("c/junk{i}")), b"x").unwrap();
    }
    // This change's events are dropped: the queue is full.
    env.write("c/a.conf", "2");
    assert_eq!(
        env.settle(&mut w),
        vec![due("app", None, &[env.p("c/a.conf")])]
    );
    assert!(w.overflows() >= 1);
}

/// Runs `f` with trace-level logging captured into a string.
fn traced(f: impl FnOnce()) -> String {
    use std::sync::{Arc, Mutex};
    let _alone = crate::logging::scoped_subscriber_lock();
    let buf = Arc::new(Mutex::new(Vec::new()));
    let writer = buf.clone();
    let sub = crate::logging::Log::to(
        crate::logging::Filter::level(tracing::level_filters::LevelFilter::TRACE),
        Box::new(move |line| writer.lock().unwrap().extend_from_slice(line)),
    );
    tracing::subscriber::with_default(sub, f);
    let bytes = buf.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn every_decision_is_traced() {
    // `RUST_LOG=trace` must answer "why did this change not restart anything".
    let mut env = Env::new();
    env.write("c/a.conf", "1");
    let mut w = Watcher::new(
        vec![rule(&[&env.p("c/*")], &["app"], None)],
        Timing::default(),
    )
    .unwrap();
    let log = traced(|| {
        env.write("c/__salt.tmp.x1", "2");
        env.write("c/a.conf", "1");
        env.write("c/a.conf", "1");
        env.write("c/other.txt", "x");
        assert_eq!(
            env.settle(&mut w),
            vec![due("app", None, &[env.p("c/other.txt")])]
        );
        env.write("c/a.conf", "1");
        assert_eq!(env.settle(&mut w), vec![]);
    });
    for line in [
        "temporary name ignored",
        "change noted; waiting for the quiet window",
        "change debounced into the action already pending",
        "content unchanged since the last action; ignored",
        "quiet window over; due",
        "quiet window over, but no content really changed; no action",
    ] {
        assert!(log.contains(line), "no `{line}` in:\n{log}");
    }
    assert!(
        log.contains("__salt.tmp.x1") && log.contains("target=app"),
        "{log}"
    );
}

/// When the first take after the events in the queue finds something due, relative to the
/// instant they were read.
fn due_after(w: &mut Watcher, read_at: Instant) -> Option<(Duration, Vec<Due>)> {
    w.read_events(read_at).unwrap();
    let at = w.next_deadline()?;
    let due = w.take_due(at);
    assert_eq!(w.next_deadline(), None, "one take empties it");
    Some((at - read_at, due))
}

#[test]
fn a_finished_write_is_due_at_once_and_anything_else_waits() {
    let mut env = Env::new();
    env.write("c/app.conf", "0");
    let timing = Timing::default();
    let mut w = Watcher::new(vec![rule(&[&env.p("c/*.conf")], &["app"], None)], timing).unwrap();
    let conf = env.p("c/app.conf");
    let app = || vec![due("app", None, std::slice::from_ref(&conf))];

    // One write in place (modify, close): due once the queue stays empty for CONFIRM.
    env.write("c/app.conf", "1");
    assert_eq!(due_after(&mut w, env.now), Some((debounce::CONFIRM, app())));
    // One rename into place, as salt and most editors write.
    env.now += Duration::from_secs(1);
    let tmp = env.p("c/.app.conf.tmp");
    fs::write(&tmp, "2").unwrap();
    fs::rename(&tmp, env.p("c/app.conf")).unwrap();
    assert_eq!(due_after(&mut w, env.now), Some((debounce::CONFIRM, app())));
    // vim's save: the file renamed away, a new one written, the backup deleted. The first event
    // is not a finished write, and by the time the rest is read it is two closes: a burst.
    env.now += Duration::from_secs(1);
    fs::rename(env.p("c/app.conf"), env.p("c/app.conf~")).unwrap();
    env.write("c/app.conf", "3");
    fs::remove_file(env.p("c/app.conf~")).unwrap();
    let (after, d) = due_after(&mut w, env.now).unwrap();
    assert!(after >= timing.quiet / 4, "waited {after:?}");
    assert_eq!(d, app());
    // A file rewritten several times before the agent reads (its own highstate: the loop is
    // blocked while salt runs): one action, after the quiet window.
    env.now += Duration::from_secs(1);
    for i in 4..8 {
        env.write("c/app.conf", &i.to_string());
    }
    assert_eq!(due_after(&mut w, env.now), Some((timing.quiet, app())));
    // A write that restores the recorded content is still nothing.
    env.now += Duration::from_secs(1);
    env.write("c/app.conf", "7");
    assert_eq!(
        due_after(&mut w, env.now),
        Some((debounce::CONFIRM, vec![]))
    );
}

#[test]
fn a_write_still_open_waits_the_whole_window_and_its_close_ends_it() {
    use std::io::Write;
    let env = Env::new();
    env.write("c/app.conf", "0");
    let timing = Timing::default();
    let mut w = Watcher::new(vec![rule(&[&env.p("c/*.conf")], &["app"], None)], timing).unwrap();
    let conf = env.p("c/app.conf");
    // Truncated and held open: the writer may be stalled before its write.
    let mut f = fs::File::create(&conf).unwrap();
    w.read_events(env.now).unwrap();
    assert_eq!(
        w.next_deadline(),
        Some(env.now + timing.quiet),
        "an open write waits the whole quiet window"
    );
    // Its write and close arrive within the window: one finished write, due at once.
    f.write_all(b"1").unwrap();
    drop(f);
    let later = env.now + Duration::from_millis(20);
    let (after, d) = due_after(&mut w, later).unwrap();
    assert_eq!(after, debounce::CONFIRM);
    assert_eq!(d, vec![due("app", None, &[conf])]);
}

#[test]
fn a_file_written_again_while_being_read_waits_for_the_writer() {
    use std::io::Write;
    let env = Env::new();
    env.write("c/app.conf", "0");
    let timing = Timing::default();
    let mut w = Watcher::new(vec![rule(&[&env.p("c/*.conf")], &["app"], None)], timing).unwrap();
    let conf = env.p("c/app.conf");
    // A finished write, read by the agent: due a millisecond later...
    env.write("c/app.conf", "1");
    w.read_events(env.now).unwrap();
    let at = w.next_deadline().unwrap();
    assert_eq!(at, env.now + debounce::CONFIRM);
    // ...but before the take the writer starts again: truncated, not yet written. The take
    // hashes an empty file; the truncate's event, queued before the truncate returned, tells it
    // the file is being written, so nothing is judged and nothing is recorded.
    let mut f = fs::File::create(&conf).unwrap();
    assert_eq!(
        w.take_due(at),
        vec![],
        "a half-written file is not acted on"
    );
    assert_eq!(
        w.next_deadline(),
        Some(at + timing.quiet),
        "it waits as a burst"
    );
    // The writer finishes with the same content: one action, for "0" -> "1".
    f.write_all(b"1").unwrap();
    drop(f);
    w.read_events(at + Duration::from_millis(5)).unwrap();
    let at2 = w.next_deadline().unwrap();
    assert_eq!(at2, at + Duration::from_millis(5) + timing.quiet);
    assert_eq!(w.take_due(at2), vec![due("app", None, &[conf])]);
    assert_eq!(w.next_deadline(), None);
}

#[test]
fn an_endless_writer_is_acted_on_at_the_maximum_delay() {
    let env = Env::new();
    env.write("c/app.conf", "0");
    let timing = Timing::default();
    let mut w = Watcher::new(vec![rule(&[&env.p("c/*.conf")], &["app"], None)], timing).unwrap();
    let conf = env.p("c/app.conf");
    env.write("c/app.conf", "1");
    w.read_events(env.now).unwrap();
    // Written again between the read and the take: it waits...
    env.write("c/app.conf", "2");
    assert_eq!(w.take_due(env.now + debounce::CONFIRM), vec![]);
    // ...and still being written at the maximum delay: acted on anyway, so an endless writer
    // cannot hold it (or spin the loop) for ever. The write seen meanwhile stays pending.
    env.write("c/app.conf", "3");
    let overdue = env.now + timing.max_delay;
    assert!(w.next_deadline().unwrap() <= overdue);
    assert_eq!(
        w.take_due(overdue),
        vec![due("app", None, std::slice::from_ref(&conf))]
    );
    assert!(
        w.next_deadline().is_some(),
        "the last write is still pending"
    );
}

/// A stall total the test sets by hand.
#[derive(Debug, Clone, Default)]
struct FakePressure(std::rc::Rc<std::cell::Cell<u64>>);

impl pressure::Pressure for FakePressure {
    fn stalled_us(&mut self) -> Option<u64> {
        Some(self.0.get())
    }
}

#[test]
fn a_finished_write_on_contended_cpus_waits_the_quiet_window() {
    let mut env = Env::new();
    env.write("c/app.conf", "0");
    let timing = Timing::default();
    let mut w = Watcher::new(vec![rule(&[&env.p("c/*.conf")], &["app"], None)], timing).unwrap();
    let stalls = FakePressure::default();
    w.consult_cpu_pressure(Box::new(stalls.clone()));
    let conf = env.p("c/app.conf");
    let app = || vec![due("app", None, std::slice::from_ref(&conf))];

    // Nobody waited for a CPU during the confirmation: acted on at once.
    env.write("c/app.conf", "1");
    assert_eq!(due_after(&mut w, env.now), Some((debounce::CONFIRM, app())));

    // 800 µs of the 1 ms confirmation had a task waiting: the writer may have been kept from
    // writing again, so the take puts it back to wait the quiet window, like a burst.
    env.now += Duration::from_secs(1);
    env.write("c/app.conf", "2");
    w.read_events(env.now).unwrap();
    let at = w.next_deadline().unwrap();
    assert_eq!(at, env.now + debounce::CONFIRM);
    stalls.0.set(stalls.0.get() + 800);
    assert_eq!(w.take_due(at), vec![], "not acted on");
    assert_eq!(w.next_deadline(), Some(env.now + timing.quiet));
    assert_eq!(w.take_due(env.now + timing.quiet), app());
    assert_eq!(w.next_deadline(), None);

    // A wake-up late enough that the writer had its time anyway: acted on.
    env.now += Duration::from_secs(1);
    env.write("c/app.conf", "3");
    w.read_events(env.now).unwrap();
    stalls.0.set(stalls.0.get() + 800);
    assert_eq!(w.take_due(env.now + Duration::from_millis(2)), app());
}

#[test]
fn a_shared_file_pending_for_another_target_does_not_hold_back_a_finished_write() {
    let env = Env::new();
    env.write("c/x.conf", "0");
    env.write("c/y.conf", "0");
    let timing = Timing::default();
    let (x, y) = (env.p("c/x.conf"), env.p("c/y.conf"));
    let mut w = Watcher::new(
        vec![
            rule(&[&x, &y], &["both"], None),
            rule(&[&x], &["only-x"], None),
        ],
        timing,
    )
    .unwrap();
    // "both" sees two files (a burst: the quiet window); "only-x" one finished write.
    env.write("c/y.conf", "1");
    env.write("c/x.conf", "1");
    w.read_events(env.now).unwrap();
    let at = w.next_deadline().unwrap();
    assert_eq!(at, env.now + debounce::CONFIRM);
    // x is still pending for "both", but nobody touched it during the take: "only-x" acts now.
    assert_eq!(
        w.take_due(at),
        vec![due("only-x", None, std::slice::from_ref(&x))]
    );
    assert_eq!(
        w.take_due(env.now + timing.quiet),
        vec![due("both", None, &[x.clone(), y.clone()])]
    );
    assert_eq!(w.next_deadline(), None);
}
