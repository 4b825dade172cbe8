//! A bad commit never takes a service down: the built agent, resident, with the real
//! supervisord, git and salt, reverts a config release whose program fails to start (or dies
//! within the grace), quarantines the commit across ticks and restarts of the agent, applies
//! the next good commit, and with `[salt] on_failure = "revert"` re-applies the last good
//! states after a failing highstate.

mod common;

use common::*;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig};
use stackless_init::imds::Identity;
use stackless_init::supervisor::ProcessState;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A line only the program prints: it must reach the agent's log and nothing else.
const OUTPUT_MARK: &str = "app-output-7f3a: refusing this configuration";

struct Setup {
    tmp: tempfile::TempDir,
    sup: Supervisord,
    config: GitRepo,
}

impl Setup {
    /// supervisord running `app`, a script that reads the published `app/app.conf`: `bad`
    /// makes it exit at start, `dies` makes it exit 1 s after a good start.
    fn new(startsecs: u32) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisord::start(&tmp.path().join("sup"), &[]);
        let config = GitRepo::new(&tmp.path().join("git"), "config");
        let s = Setup { tmp, sup, config };
        let script = s.path("app.sh");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nconf=$(cat {cur}/app/app.conf)\ncase \"$conf\" in\n\
                 *bad*) echo \"{OUTPUT_MARK}\" >&2; exit 1;;\n\
                 *dies*) sleep 1; echo \"{OUTPUT_MARK}\" >&2; exit 2;;\nesac\nexec sleep 1000\n",
                cur = s.current().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let conf = format!(
            "[program:app]\ncommand={}\nautostart=false\nstartsecs={startsecs}\nstartretries=1\n\
             autorestart=false\nstopwaitsecs=5\nstopasgroup=true\nkillasgroup=true\n",
            script.display()
        );
        fs::write(s.sup.conf_dir().join("app.conf"), conf).unwrap();
        s.sup.client().update(None).unwrap();
        s
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    fn root(&self) -> PathBuf {
        self.path("root")
    }
    fn current(&self) -> PathBuf {
        self.root().join("var/lib/stackless/repos/config/current")
    }
    fn user_data(&self, salt: Option<&GitRepo>, extra: &str) -> String {
        let mut ud = format!(
            "minion_id = \"web-{{instance_id}}\"\n[supervisor]\nsocket = \"{}\"\nconf_dir = \"{}\"\n\
             [config]\nrepo = \"{}\"\ngrace = \"2s\"\n[sync]\nschedule = \"@every 1s\"\n\
             [[watch]]\npaths = [\"{}/app/*.conf\"]\nrestart = [\"app\"]\n",
            self.sup.socket().display(),
            self.sup.conf_dir().display(),
            self.config.url(),
            self.current().display()
        );
        if let Some(r) = salt {
            ud.push_str(&format!("[salt]\nrepo = \"{}\"\n{extra}", r.url()));
        }
        ud
    }
    /// Boots the agent and starts `app` on the published release, as salt would.
    fn boot(&self, ud: &str) -> (Emulator, Agent) {
        let imds = Emulator::start(
            EmulatorConfig::new(Identity::example()).with_user_data(ud.as_bytes().to_vec()),
        )
        .unwrap();
        let agent = Agent::spawn(&self.root(), &imds.endpoint());
        assert_eq!(agent.wait_ready(120), 0, "boot not ready: {}", agent.log());
        (imds, agent)
    }
    fn app(&self) -> stackless_init::supervisor::ProcessInfo {
        self.sup.client().process_info("app").unwrap()
    }
}

fn config_release(root: &Path) -> serde_json::Value {
    status(root)["releases"]["config"].clone()
}

fn published(s: &Setup) -> String {
    fs::read_link(s.current())
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn a_config_commit_whose_program_exits_at_start_is_reverted_and_quarantined() {
    let s = Setup::new(1);
    let good = s.config.commit(&[("app/app.conf", "text=one\n")], "one");
    let ud = s.user_data(None, "");
    let (imds, mut agent) = s.boot(&ud);
    s.sup.client().restart("app").unwrap();
    wait_for("the first release judged good", 20, || {
        config_release(&s.root())["good"] == good.as_str()
    });
    let pid = s.app().pid;

    let bad = s.config.commit(&[("app/app.conf", "bad\n")], "breaks app");
    wait_for("the bad release reverted", 60, || {
        config_release(&s.root())["last_revert"]["commit"] == bad.as_str()
    });
    wait_for("app running again", 20, || {
        s.app().state == ProcessState::Running
    });
    let info = s.app();
    assert_ne!(info.pid, pid, "app was restarted on the old configuration");
    assert_eq!(published(&s), good);
    assert_eq!(
        fs::read_to_string(s.current().join("app/app.conf")).unwrap(),
        "text=one\n"
    );
    let st = status(&s.root());
    let rel = &st["releases"]["config"];
    assert_eq!(rel["quarantined"]["commit"], bad.as_str(), "{st:#}");
    assert_eq!(rel["last_revert"]["to"], good.as_str());
    assert_eq!(rel["reverts"], 1);
    let reason = rel["last_revert"]["reason"].as_str().unwrap();
    assert!(reason.contains("app"), "{reason}");
    assert_eq!(st["repos"]["config"]["commit"], good.as_str());
    // The program's own words are in the log, and only there.
    wait_for("the program's output in the log", 10, || {
        agent.log().contains(OUTPUT_MARK)
    });
    let state_json = fs::read_to_string(s.root().join("var/lib/stackless/state.json")).unwrap();
    assert!(!state_json.contains(OUTPUT_MARK));
    let human = stdout(&init(&s.root(), "http://127.0.0.1:9", &["status"]));
    assert!(
        human.contains(&format!("reverted {}", &bad[..12])),
        "{human}"
    );
    assert!(!human.contains(OUTPUT_MARK));
    let listed = stdout(&init(&s.root(), "http://127.0.0.1:9", &["releases"]));
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&good) && l.contains("good") && l.contains("current")),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&bad) && l.contains("bad") && l.contains("quarantined")),
        "{listed}"
    );

    // Upstream still at the bad commit: the next ticks leave the good release alone. The
    // revert's own restart is recorded once the watcher's window has passed: count from there.
    wait_for("the revert's restart recorded", 15, || {
        program_count(&s.root(), "app", "restarts") >= 1
    });
    std::thread::sleep(Duration::from_secs(1));
    let restarts = program_count(&s.root(), "app", "restarts");
    std::thread::sleep(Duration::from_secs(4));
    let st = status(&s.root());
    assert_eq!(st["repos"]["config"]["result"], "quarantined", "{st:#}");
    assert_eq!(st["releases"]["config"]["reverts"], 1);
    assert_eq!(program_count(&s.root(), "app", "restarts"), restarts);
    assert_eq!(published(&s), good);

    // Nor after the agent restarts (a reboot runs the same boot).
    agent.terminate();
    drop(imds);
    let (_imds, agent) = s.boot(&ud);
    std::thread::sleep(Duration::from_secs(3));
    let st = status(&s.root());
    assert_eq!(published(&s), good, "{}", agent.log());
    assert_eq!(st["releases"]["config"]["reverts"], 1);
    assert_eq!(
        st["releases"]["config"]["quarantined"]["commit"],
        bad.as_str()
    );
    assert_eq!(s.app().pid, info.pid, "app was left alone");

    // A later good commit is applied, and ends the quarantine.
    let next = s
        .config
        .commit(&[("app/app.conf", "text=three\n")], "fixed");
    wait_for("the fixed release judged good", 40, || {
        config_release(&s.root())["good"] == next.as_str()
    });
    let st = status(&s.root());
    assert_eq!(published(&s), next);
    assert!(st["releases"]["config"]["quarantined"].is_null(), "{st:#}");
    assert_eq!(st["releases"]["config"]["reverts"], 1);
    assert_eq!(s.app().state, ProcessState::Running);
    assert_ne!(s.app().pid, info.pid);

    // The operator's escape hatch: pin the first release by hand; the agent restarts app on it.
    let o = init(
        &s.root(),
        "http://127.0.0.1:9",
        &["releases", "--pin", "config", &good[..10]],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(published(&s), good);
    wait_for("app restarted on the pinned release", 20, || {
        program_count(&s.root(), "app", "restarts") >= restarts + 2
    });
    std::thread::sleep(Duration::from_secs(3));
    let st = status(&s.root());
    assert_eq!(published(&s), good, "the schedule keeps the pin");
    assert_eq!(st["repos"]["config"]["result"], "pinned");
    assert_eq!(st["releases"]["config"]["pinned"], good.as_str());
    let o = init(
        &s.root(),
        "http://127.0.0.1:9",
        &["releases", "--unpin", "config"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("the ref followed again", 20, || published(&s) == next);
}

#[test]
fn a_program_that_dies_within_the_grace_fails_its_release() {
    // startsecs=0: RUNNING at once, so the restart itself succeeds; the grace catches it.
    let s = Setup::new(0);
    let good = s.config.commit(&[("app/app.conf", "text=one\n")], "one");
    let (_imds, agent) = s.boot(&s.user_data(None, ""));
    s.sup.client().restart("app").unwrap();
    wait_for("the first release judged good", 20, || {
        config_release(&s.root())["good"] == good.as_str()
    });
    let bad = s.config.commit(&[("app/app.conf", "dies\n")], "dies late");
    wait_for("the late death reverted", 60, || {
        config_release(&s.root())["last_revert"]["commit"] == bad.as_str()
    });
    let reason = config_release(&s.root())["last_revert"]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("EXITED"), "{reason}");
    wait_for("app running on the good release", 20, || {
        s.app().state == ProcessState::Running
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(s.app().state, ProcessState::Running, "{}", agent.log());
    assert_eq!(published(&s), good);
}

#[test]
fn a_salt_commit_that_fails_under_revert_reapplies_the_previous_tree() {
    let s = Setup::new(1);
    s.config.commit(&[("app/app.conf", "text=one\n")], "one");
    let salt = GitRepo::new(&s.path("git"), "salt");
    let marker = s.path("out/marker");
    let state = |value: &str, extra: &str| {
        vec![
            ("top.sls".to_string(), "base:\n  '*':\n    - app\n".to_string()),
            (
                "app.sls".to_string(),
                format!(
                    "marker:\n  file.managed:\n    - name: {}\n    - makedirs: True\n    - contents: {value}\n{extra}",
                    marker.display()
                ),
            ),
        ]
    };
    let commit = |files: Vec<(String, String)>, msg: &str| {
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        salt.commit(&refs, msg)
    };
    let one = commit(state("one", ""), "one");
    let ud = s.user_data(Some(&salt), "on_failure = \"revert\"\n");
    let (_imds, agent) = s.boot(&ud);
    assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "one");
    assert_eq!(status(&s.root())["releases"]["salt"]["good"], one.as_str());

    let two = commit(
        state("two", "broken:\n  cmd.run:\n    - name: 'false'\n"),
        "two, with a failing state",
    );
    wait_for("the failing salt commit reverted", 60, || {
        status(&s.root())["releases"]["salt"]["last_revert"]["commit"] == two.as_str()
    });
    let st = status(&s.root());
    assert_eq!(
        fs::read_to_string(&marker).unwrap().trim(),
        "one",
        "the previous tree was applied again: {}",
        agent.log()
    );
    assert_eq!(st["highstate"]["commit"], one.as_str(), "{st:#}");
    assert_eq!(st["highstate"]["ok"], true);
    assert_eq!(
        st["releases"]["salt"]["quarantined"]["commit"],
        two.as_str()
    );
    let link = fs::read_link(s.root().join("var/lib/stackless/repos/salt/current")).unwrap();
    assert!(link.ends_with(&one), "{link:?}");
    // Not applied again on the next ticks.
    let at = st["highstate"]["at"].clone();
    std::thread::sleep(Duration::from_secs(3));
    let st = status(&s.root());
    assert_eq!(st["highstate"]["at"], at);
    assert_eq!(st["releases"]["salt"]["reverts"], 1);
}
