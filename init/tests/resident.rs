//! End-to-end tests of resident mode: the built `stackless-init boot` staying up with the real
//! supervisord, real inotify, real git and real salt.

mod common;

use common::*;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig};
use stackless_init::imds::Identity;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Setup {
    tmp: tempfile::TempDir,
    sup: Supervisord,
}

impl Setup {
    fn new(programs: &[(&str, &str)]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisord::start(&tmp.path().join("sup"), programs);
        fs::create_dir_all(tmp.path().join("app")).unwrap();
        Setup { tmp, sup }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    fn root(&self) -> PathBuf {
        self.path("root")
    }
    /// User-data with the supervisord of this setup and `extra` appended.
    fn user_data(&self, extra: &str) -> String {
        format!(
            "minion_id = \"web-{{instance_id}}\"\n[supervisor]\nsocket = \"{}\"\nconf_dir = \"{}\"\n{extra}",
            self.sup.socket().display(),
            self.sup.conf_dir().display()
        )
    }
    fn boot(&self, user_data: &str) -> (Emulator, Agent) {
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

fn rule(paths: &str, restart: &str, signal: Option<&str>) -> String {
    let signal = signal
        .map(|s| format!("signal = \"{s}\"\n"))
        .unwrap_or_default();
    format!("\n[[watch]]\npaths = [\"{paths}\"]\nrestart = [\"{restart}\"]\n{signal}")
}

/// Waits long enough for any stray second action to have happened: several quiet windows.
fn settle() {
    std::thread::sleep(Duration::from_millis(800));
}

#[test]
fn a_rename_over_write_restarts_the_program_exactly_once() {
    let s = Setup::new(&[("app", "sleep 1000"), ("other", "sleep 1000")]);
    let conf = s.path("app/app.conf");
    fs::write(&conf, "greeting=hello\n").unwrap();
    let (_imds, agent) = s.boot(&s.user_data(&rule(
        &format!("{}/app/*.conf", s.tmp.path().display()),
        "app",
        None,
    )));
    let (pid, other) = (s.sup.pid("app"), s.sup.pid("other"));

    write_by_rename(&conf, "greeting=bonjour\n");
    wait_for("one restart of app", 15, || {
        program_count(&s.root(), "app", "restarts") == 1
    });
    settle();
    assert_eq!(
        program_count(&s.root(), "app", "restarts"),
        1,
        "{}",
        agent.log()
    );
    let new_pid = s.sup.pid("app");
    assert_ne!(new_pid, pid, "app was restarted");
    assert_eq!(s.sup.pid("other"), other, "other programs are left alone");
    let st = status(&s.root());
    assert_eq!(st["watch"]["programs"]["app"]["pid"], new_pid);
    assert_eq!(st["watch"]["programs"]["app"]["last_outcome"], "ok");
    assert!(st["watch"]["programs"]["app"]["paths"][0]
        .as_str()
        .unwrap()
        .ends_with("app/app.conf"));

    // Write in place and delete-then-recreate count too, once each.
    fs::write(&conf, "greeting=hallo\n").unwrap();
    wait_for("a second restart", 15, || {
        program_count(&s.root(), "app", "restarts") == 2
    });
    fs::remove_file(&conf).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&conf, "greeting=ciao\n").unwrap();
    wait_for("a third restart", 15, || {
        program_count(&s.root(), "app", "restarts") == 3
    });
    settle();
    assert_eq!(program_count(&s.root(), "app", "restarts"), 3);
}

#[test]
fn a_burst_of_500_writes_restarts_each_program_once() {
    let s = Setup::new(&[
        ("app", "sleep 1000"),
        ("worker", "sleep 1000"),
        ("idle", "sleep 1000"),
    ]);
    let dir = s.tmp.path().join("app");
    for f in ["a.conf", "b.conf", "c.conf"] {
        fs::write(dir.join(f), "0").unwrap();
    }
    let d = dir.display();
    let ud = s.user_data(&format!(
        "[watcher]\nquiet = \"300ms\"\nmax_delay = \"10s\"\n{}{}{}",
        rule(&format!("{d}/a.conf"), "app", None),
        rule(&format!("{d}/b.conf"), "worker", None),
        rule(&format!("{d}/c.conf"), "idle", None),
    ));
    let (_imds, agent) = s.boot(&ud);
    let idle = s.sup.pid("idle");
    for i in 0..500 {
        let f = if i % 2 == 0 { "a.conf" } else { "b.conf" };
        if i % 3 == 0 {
            write_by_rename(&dir.join(f), &format!("{i}"));
        } else {
            fs::write(dir.join(f), format!("{i}")).unwrap();
        }
    }
    wait_for("app and worker restarted", 20, || {
        program_count(&s.root(), "app", "restarts") >= 1
            && program_count(&s.root(), "worker", "restarts") >= 1
    });
    settle();
    assert_eq!(
        program_count(&s.root(), "app", "restarts"),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(
        program_count(&s.root(), "worker", "restarts"),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(program_count(&s.root(), "idle", "restarts"), 0);
    assert_eq!(s.sup.pid("idle"), idle);
}

#[test]
fn an_unchanged_rewrite_restarts_nothing() {
    let s = Setup::new(&[("app", "sleep 1000")]);
    let conf = s.path("app/app.conf");
    fs::write(&conf, "same\n").unwrap();
    let (_imds, _agent) = s.boot(&s.user_data(&rule(
        &format!("{}/app/*.conf", s.tmp.path().display()),
        "app",
        None,
    )));
    let pid = s.sup.pid("app");
    write_by_rename(&conf, "same\n");
    fs::write(&conf, "same\n").unwrap();
    // Salt's and editors' temporary files match the glob but never trigger.
    fs::write(s.path("app/__salt.tmp.app.conf"), "x").unwrap();

    settle();
    assert_eq!(program_count(&s.root(), "app", "restarts"), 0);
    assert_eq!(s.sup.pid("app"), pid);
    // The watcher is live: a real change still restarts.
    fs::write(&conf, "changed\n").unwrap();
    wait_for("a restart after a real change", 15, || {
        program_count(&s.root(), "app", "restarts") == 1
    });
}

#[test]
fn signal_hup_reloads_instead_of_restarting() {
    let s = Setup::new(&[]);
    let marker = s.path("hup-received");
    let cmd = format!(
        "sh -c 'trap \"echo hup >> {}\" HUP; while :; do sleep 0.1; done'",
        marker.display()
    );
    fs::write(s.sup.conf_dir().join("web.conf"), program_conf("web", &cmd)).unwrap();
    s.sup.client().update(None).unwrap();
    wait_for("web to run", 10, || {
        s.sup
            .client()
            .process_info("web")
            .map(|i| i.pid != 0)
            .unwrap_or(false)
    });
    let conf = s.path("app/web.conf");
    fs::write(&conf, "a").unwrap();
    let (_imds, _agent) = s.boot(&s.user_data(&rule(
        &format!("{}/app/web.conf", s.tmp.path().display()),
        "web",
        Some("HUP"),
    )));
    let pid = s.sup.pid("web");
    fs::write(&conf, "b").unwrap();
    wait_for("the HUP marker", 15, || marker.exists());
    assert_eq!(fs::read_to_string(&marker).unwrap(), "hup\n");
    assert_eq!(s.sup.pid("web"), pid, "signalled, not restarted");
    assert_eq!(program_count(&s.root(), "web", "signals"), 1);
    assert_eq!(program_count(&s.root(), "web", "restarts"), 0);
}

#[test]
fn a_changed_program_definition_is_updated() {
    let s = Setup::new(&[("app", "sleep 1000")]);
    let (_imds, agent) = s.boot(&s.user_data(""));
    let pid = s.sup.pid("app");
    write_by_rename(
        &s.sup.conf_dir().join("app.conf"),
        &program_conf("app", "sleep 2000"),
    );
    wait_for("supervisord update of app", 15, || {
        program_count(&s.root(), "app", "updates") == 1
    });
    let info = s.sup.client().process_info("app").unwrap();
    assert_ne!(info.pid, pid, "{}", agent.log());
    let cmdline = fs::read_to_string(format!("/proc/{}/cmdline", info.pid)).unwrap();
    assert!(
        cmdline.contains("2000"),
        "runs the new command: {cmdline:?}"
    );
    // A new program definition is added.
    fs::write(
        s.sup.conf_dir().join("extra.conf"),
        program_conf("extra", "sleep 1000"),
    )
    .unwrap();
    wait_for("extra added", 15, || {
        s.sup
            .client()
            .process_info("extra")
            .map(|i| i.pid != 0)
            .unwrap_or(false)
    });
}

#[test]
fn a_rule_added_to_watch_d_takes_effect_without_a_restart() {
    let s = Setup::new(&[("app", "sleep 1000")]);
    let (_imds, agent) = s.boot(&s.user_data(""));
    let agent_pid = agent.child.id();
    let conf = s.path("app/late.conf");
    fs::write(&conf, "1").unwrap();
    let watch_d = s.root().join("etc/stackless/watch.d");
    fs::create_dir_all(&watch_d).unwrap();
    write_by_rename(
        &watch_d.join("late.toml"),
        &format!(
            "[[watch]]\npaths = [\"{}\"]\nrestart = [\"app\"]\n",
            conf.display()
        ),
    );
    wait_for("the new rule in status", 15, || {
        status(&s.root())["watch"]["rules"]
            .as_array()
            .is_some_and(|r| {
                r.iter()
                    .any(|x| x["source"].as_str().unwrap_or("").ends_with("late.toml"))
            })
    });
    fs::write(&conf, "2").unwrap();
    wait_for("a restart by the new rule", 15, || {
        program_count(&s.root(), "app", "restarts") == 1
    });
    assert_eq!(agent.child.id(), agent_pid);

    // A broken rule file is reported and skipped; the agent keeps going.
    fs::write(watch_d.join("broken.toml"), "[[watch]]\npaths = \"nope\"\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    fs::write(&conf, "3").unwrap();
    wait_for("still restarting", 15, || {
        program_count(&s.root(), "app", "restarts") == 2
    });
    assert!(agent.log().contains("broken.toml"), "{}", agent.log());
}

fn repo_user_data(
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

#[test]
fn a_config_commit_reaches_the_watchers_through_a_scheduled_sync() {
    let s = Setup::new(&[("app", "sleep 1000")]);
    let config = GitRepo::new(&s.path("git"), "config");
    config.commit(&[("app/app.conf", "text=one\n"), ("README", "x")], "one");
    let current = s.root().join("var/lib/stackless/repos/config/current");
    let ud = repo_user_data(
        &s,
        None,
        Some(&config),
        &rule(&format!("{}/app/*.conf", current.display()), "app", None),
    );
    let (_imds, agent) = s.boot(&ud);
    let pid = s.sup.pid("app");

    // A commit that does not touch the watched file flips `current` but restarts nothing.
    config.commit(&[("README", "y")], "docs");
    wait_for("the docs commit published", 15, || {
        fs::read_to_string(current.join("README")).is_ok_and(|t| t == "y")
    });
    settle();
    assert_eq!(
        program_count(&s.root(), "app", "restarts"),
        0,
        "{}",
        agent.log()
    );

    let sha = config.commit(&[("app/app.conf", "text=two\n")], "two");
    wait_for("a restart after the config commit", 20, || {
        program_count(&s.root(), "app", "restarts") == 1
    });
    assert_eq!(
        fs::read_to_string(current.join("app/app.conf")).unwrap(),
        "text=two\n"
    );
    assert_ne!(s.sup.pid("app"), pid);
    let st = status(&s.root());
    assert_eq!(st["repos"]["config"]["commit"], sha.as_str());
    assert_eq!(st["last_sync"]["trigger"], "schedule");
    assert_eq!(st["schedule"]["schedule"], "@every 1s");
    settle();
    assert_eq!(program_count(&s.root(), "app", "restarts"), 1);
}

fn salt_state(marker: &Path, value: &str) -> Vec<(String, String)> {
    vec![
        ("top.sls".into(), "base:\n  '*':\n    - app\n".into()),
        (
            "app.sls".into(),
            format!("marker:\n  file.managed:\n    - name: {}\n    - makedirs: True\n    - contents: {value}\n", marker.display()),
        ),
    ]
}

fn commit_files(repo: &GitRepo, files: &[(String, String)], msg: &str) -> String {
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    repo.commit(&refs, msg)
}

#[test]
fn a_salt_commit_reruns_highstate_and_no_commit_does_not() {
    let s = Setup::new(&[]);
    let salt = GitRepo::new(&s.path("git"), "salt");
    let marker = s.path("out/marker");
    commit_files(&salt, &salt_state(&marker, "one"), "one");
    let (_imds, agent) = s.boot(&repo_user_data(&s, Some(&salt), None, ""));
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "one");
    let first_at = status(&s.root())["highstate"]["at"].clone();

    // Ticks pass with nothing new upstream: syncs happen, highstate does not.
    wait_for("two scheduled syncs", 15, || {
        status(&s.root())["last_sync"]["trigger"] == "schedule"
    });
    std::thread::sleep(Duration::from_millis(2500));
    let st = status(&s.root());
    assert_eq!(st["last_sync"]["highstate_ran"], false);
    assert_eq!(st["highstate"]["at"], first_at, "{}", agent.log());

    let sha = commit_files(&salt, &salt_state(&marker, "two"), "two");
    wait_for("the new state applied", 30, || {
        fs::read_to_string(&marker).is_ok_and(|t| t.trim() == "two")
    });
    wait_for("highstate recorded", 10, || {
        status(&s.root())["highstate"]["commit"] == sha.as_str()
    });
    assert_eq!(status(&s.root())["highstate"]["ok"], true);
}

#[test]
fn a_failed_highstate_is_retried_until_it_converges() {
    let s = Setup::new(&[]);
    let salt = GitRepo::new(&s.path("git"), "salt");
    let flag = s.path("flag");
    let files = vec![
        (
            "top.sls".to_string(),
            "base:\n  '*':\n    - app\n".to_string(),
        ),
        (
            "app.sls".to_string(),
            format!(
                "needs-flag:\n  cmd.run:\n    - name: test -f {}\n",
                flag.display()
            ),
        ),
    ];
    commit_files(&salt, &files, "needs a flag");
    let imds = Emulator::start(
        EmulatorConfig::new(Identity::example())
            .with_user_data(repo_user_data(&s, Some(&salt), None, "").into_bytes()),
    )
    .unwrap();
    let agent = Agent::spawn(&s.root(), &imds.endpoint());
    assert_eq!(
        agent.wait_ready(120),
        2,
        "a failed highstate boots degraded: {}",
        agent.log()
    );
    assert_eq!(status(&s.root())["highstate"]["ok"], false);

    // No new commit: the retry on a later tick converges once the world is fixed.
    fs::write(&flag, "").unwrap();
    wait_for("a retried highstate that passes", 40, || {
        status(&s.root())["highstate"]["ok"] == true
    });
    let st = status(&s.root());
    assert_eq!(st["schedule"]["highstate_failures"], 0);
    assert_eq!(st["last_sync"]["outcome"], "ready");
}

#[test]
fn wait_reports_ready_degraded_failed_and_timeout() {
    let s = Setup::new(&[]);
    // Nothing booted yet: times out with 3.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stackless-init"))
        .args([
            "--root",
            s.root().to_str().unwrap(),
            "wait",
            "--timeout",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));

    // Broken user-data: the resident boot fails, says why, and exits 1.
    let imds = Emulator::start(
        EmulatorConfig::new(Identity::example())
            .with_user_data(b"[sync]\nschedule = \"x\"\n".to_vec()),
    )
    .unwrap();
    let mut agent = Agent::spawn(&s.root(), &imds.endpoint());
    assert_eq!(agent.wait_ready(60), 1);
    assert_eq!(agent.child.wait().unwrap().code(), Some(1));
    assert!(agent.log().contains("user-data:2:12"), "{}", agent.log());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stackless-init"))
        .args(["--root", s.root().to_str().unwrap(), "wait"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("failed: user-data:2:12"),
        "{o:?}"
    );

    // A good boot: ready, 0, and the agent stays resident until SIGTERM, which it obeys with 0.
    imds.set_user_data(Some(s.user_data("").into_bytes()));
    // A reboot empties /run (a tmpfs); here the test does it.
    fs::remove_dir_all(s.root().join("run")).unwrap();
    let mut agent = Agent::spawn(&s.root(), &imds.endpoint());
    assert_eq!(agent.wait_ready(60), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent.child.try_wait().unwrap().is_none(), "resident");
    assert_eq!(agent.terminate().code(), Some(0));
}

#[test]
fn sigterm_during_a_sync_leaves_a_complete_release() {
    let s = Setup::new(&[]);
    let salt = GitRepo::new(&s.path("git"), "salt");
    let marker = s.path("out/marker");
    commit_files(&salt, &salt_state(&marker, "one"), "one");
    // A slow git: every fetch takes two seconds, so SIGTERM lands in the middle of one.
    let bin = s.path("slow-bin");
    fs::create_dir_all(&bin).unwrap();
    let real_git = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "command -v git"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let started = s.path("fetch-started");
    fs::write(
        bin.join("git"),
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" fetch \"*) touch {}; sleep 2;; esac\nexec {} \"$@\"\n",
            started.display(),
            real_git.trim()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(bin.join("git"), fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), test_path());
    let ud = repo_user_data(&s, Some(&salt), None, "");
    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(ud.into_bytes()))
            .unwrap();
    let mut agent = Agent::spawn_with_path(&s.root(), &imds.endpoint(), &path);
    assert_eq!(agent.wait_ready(120), 0, "{}", agent.log());
    let current = s.root().join("var/lib/stackless/repos/salt/current");
    let first = fs::read_link(&current).unwrap();

    let _ = fs::remove_file(&started);
    let sha = commit_files(&salt, &salt_state(&marker, "two"), "two");
    wait_for("a scheduled fetch in progress", 20, || started.exists());
    assert_eq!(
        fs::read_link(&current).unwrap(),
        first,
        "mid-fetch: not flipped yet"
    );
    let code = agent.terminate();
    assert_eq!(code.code(), Some(0), "{}", agent.log());
    // The agent finished the sync it was in: the new release is complete and published.
    let target = fs::read_link(&current).unwrap();
    assert!(target.ends_with(&sha), "{target:?}");
    let release = current.parent().unwrap().join(&target);
    assert!(
        release.join("top.sls").exists() && release.join("app.sls").exists(),
        "complete release"
    );
    let leftovers: Vec<_> = fs::read_dir(release.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no half-made releases: {leftovers:?}");
    assert_eq!(
        status(&s.root())["highstate"]["commit"],
        sha.as_str(),
        "{}",
        agent.log()
    );
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "two");
}

#[test]
fn a_manual_sync_runs_through_the_same_lock() {
    let s = Setup::new(&[]);
    let salt = GitRepo::new(&s.path("git"), "salt");
    let marker = s.path("out/marker");
    commit_files(&salt, &salt_state(&marker, "one"), "one");
    let ud = repo_user_data(&s, Some(&salt), None, "").replace("@every 1s", "@every 1h");
    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(ud.into_bytes()))
            .unwrap();
    let o = init(&s.root(), &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    commit_files(&salt, &salt_state(&marker, "two"), "two");
    let o = init(&s.root(), &imds.endpoint(), &["sync"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("highstate"), "{}", stdout(&o));
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "two");
    assert_eq!(status(&s.root())["last_sync"]["trigger"], "manual");

    // While another holder has the lock, a manual sync waits and then gives up with a clear error.
    let _held = stackless_init::lock::SyncLock::acquire(
        &stackless_init::paths::Layout::new(s.root()),
        Duration::from_secs(5),
    )
    .unwrap();
    let o = init(&s.root(), &imds.endpoint(), &["sync", "--lock-wait", "1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("sync.lock"), "{}", stderr(&o));
}
