//! End-to-end tests of `stackless-init boot --once`: the built binary against the IMDS emulator
//! on loopback, real git repositories and the real `salt-call`.

mod common;

use common::*;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig};
use stackless_init::imds::Identity;
use std::fs;
use std::path::Path;

/// A salt tree: top matching the minion id, a file.managed rendering a grain and a pillar value.
fn salt_tree(out: &Path, extra_state: &str) -> Vec<(String, String)> {
    vec![
        ("top.sls".into(), "base:\n  'web-*':\n    - app\n".into()),
        (
            "app.sls".into(),
            format!(
                "motd:\n  file.managed:\n    - name: {}\n    - makedirs: True\n    - contents: \"role={{{{ grains['role'] }}}} greeting={{{{ pillar['greeting'] }}}}\"\n{extra_state}",
                out.display()
            ),
        ),
        ("pillar/top.sls".into(), "base:\n  '*':\n    - common\n".into()),
        ("pillar/common.sls".into(), "greeting: hello-from-pillar\n".into()),
    ]
}

fn commit(repo: &GitRepo, files: &[(String, String)], msg: &str) -> String {
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    repo.commit(&refs, msg)
}

fn user_data(salt: &GitRepo, config: Option<&GitRepo>) -> String {
    let mut s = format!(
        "minion_id = \"web-{{instance_id}}\"\ngrains = {{ role = \"frontend\", zone = \"{{az}}\" }}\n\n[salt]\nrepo = \"{}\"\nref = \"main\"\n",
        salt.url()
    );
    if let Some(c) = config {
        s.push_str(&format!("\n[config]\nrepo = \"{}\"\n", c.url()));
    }
    s
}

struct World {
    tmp: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        World {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn root(&self) -> std::path::PathBuf {
        self.tmp.path().join("root")
    }
    fn git(&self) -> std::path::PathBuf {
        let p = self.tmp.path().join("git");
        fs::create_dir_all(&p).unwrap();
        p
    }
    fn out(&self) -> std::path::PathBuf {
        self.tmp.path().join("out/motd")
    }
}

/// The machine-readable last line of a boot's console report.
fn result_line(o: &std::process::Output) -> serde_json::Value {
    let out = stdout(o);
    let last = out.lines().last().unwrap_or("");
    let json = last
        .strip_prefix("stackless-init-result: ")
        .unwrap_or_else(|| panic!("the last stdout line is not the result line: {out}"));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {last}"))
}

fn emulator(user_data: &str) -> Emulator {
    Emulator::start(
        EmulatorConfig::new(Identity::example()).with_user_data(user_data.as_bytes().to_vec()),
    )
    .expect("starting the IMDS emulator")
}

#[test]
fn boot_applies_highstate_from_git_and_reboot_is_cheap() {
    let w = World::new();
    let salt = GitRepo::new(&w.git(), "salt");
    let config = GitRepo::new(&w.git(), "config");
    let salt_sha = commit(&salt, &salt_tree(&w.out(), ""), "states");
    let config_sha = config.commit(&[("app/app.conf", "text=hello\n")], "config");
    let imds = emulator(&user_data(&salt, Some(&config)));

    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "boot failed: {}", stderr(&o));
    assert_eq!(
        fs::read_to_string(w.out()).unwrap(),
        "role=frontend greeting=hello-from-pillar\n"
    );
    // The console report: a headline, the timeline, then one line of JSON.
    assert!(
        stdout(&o).starts_with("stackless-init: boot ready in "),
        "{}",
        stdout(&o)
    );
    let r = result_line(&o);
    assert_eq!(r["outcome"], "ready");
    assert_eq!(r["error"], serde_json::Value::Null);
    assert_eq!(r["minion_id"], "web-i-0123456789abcdef0");
    assert_eq!(r["first_boot"], true);
    assert_eq!(r["status"]["highstate"]["ok"], true);

    let root = w.root();
    assert_eq!(
        fs::read_to_string(root.join("etc/salt/minion_id"))
            .unwrap()
            .trim(),
        "web-i-0123456789abcdef0"
    );
    let conf = fs::read_to_string(root.join("etc/salt/minion.d/stackless.conf")).unwrap();
    assert!(conf.contains("file_client: \"local\""), "{conf}");
    assert!(
        conf.contains("eu-west-1a"),
        "grain placeholder rendered: {conf}"
    );
    let current = fs::read_link(root.join("var/lib/stackless/repos/salt/current")).unwrap();
    assert!(current.ends_with(&salt_sha), "{current:?}");
    assert_eq!(
        fs::read_to_string(root.join("var/lib/stackless/repos/config/current/app/app.conf"))
            .unwrap(),
        "text=hello\n"
    );

    let s = status(&root);
    assert_eq!(s["minion_id"], "web-i-0123456789abcdef0");
    assert_eq!(s["instance_id"], "i-0123456789abcdef0");
    assert_eq!(s["boot"]["outcome"], "ready");
    assert_eq!(s["boot"]["first_boot"], true);
    let steps: Vec<&str> = s["boot"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    for want in [
        "defaults",
        "imds",
        "user-data",
        "trust",
        "minion-config",
        "salt-install",
        "sync-salt",
        "sync-config",
        "highstate",
    ] {
        assert!(steps.contains(&want), "step {want} missing from {steps:?}");
    }
    assert!(s["boot"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["ok"] == true && x["ms"].is_u64()));
    assert_eq!(s["repos"]["salt"]["commit"], salt_sha.as_str());
    assert_eq!(s["repos"]["config"]["commit"], config_sha.as_str());
    assert_eq!(s["highstate"]["ok"], true);
    assert_eq!(s["highstate"]["total"], 1);
    assert_eq!(s["highstate"]["changed"], 1);
    assert_eq!(s["highstate"]["failed"].as_array().unwrap().len(), 0);

    // Human status reads like a timeline.
    let human = stdout(&init(&root, &imds.endpoint(), &["status"]));
    assert!(human.contains("boot       ready in"), "{human}");
    assert!(
        human.contains("highstate  ok: 1 states, 1 changed, 0 failed"),
        "{human}"
    );

    // A reboot of the same instance: nothing new upstream, the state converged.
    let o = init(&root, &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "reboot failed: {}", stderr(&o));
    let s = status(&root);
    assert_eq!(s["boot"]["first_boot"], false);
    assert_eq!(s["repos"]["salt"]["result"], "unchanged");
    assert_eq!(s["highstate"]["changed"], 0);

    // The state file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(root.join("var/lib/stackless/state.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_baked_state_of_another_instance_is_not_trusted() {
    let w = World::new();
    let salt = GitRepo::new(&w.git(), "salt");
    commit(&salt, &salt_tree(&w.out(), ""), "states");
    let imds = emulator(&user_data(&salt, None));
    let root = w.root();
    fs::create_dir_all(root.join("var/lib/stackless")).unwrap();
    fs::write(
        root.join("var/lib/stackless/state.json"),
        r#"{"version":1,"instance_id":"i-0seed0000000000000","minion_id":"seed","boot":null,"repos":{},"highstate":null}"#,
    )
    .unwrap();
    let o = init(&root, &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = status(&root);
    assert_eq!(s["boot"]["first_boot"], true);
    assert_eq!(s["instance_id"], "i-0123456789abcdef0");
}

#[test]
fn imds_down_until_the_deadline_is_a_clear_failure() {
    let w = World::new();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_stackless-init"))
        .args([
            "--root",
            w.root().to_str().unwrap(),
            "boot",
            "--once",
            "--imds-deadline",
            "2",
        ])
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("stackless-init: boot failed:") && last.contains("IMDS"),
        "{err}"
    );
    // Bounded: the deadline, not the default two minutes.
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
    assert!(
        !w.root().join("etc/salt").exists(),
        "nothing configured without IMDS"
    );
    assert_eq!(status(&w.root())["boot"]["outcome"], "failed");
}

#[test]
fn imds_disabled_fails_fast_with_the_fix() {
    let w = World::new();
    let imds = emulator("web-1");
    imds.set_disabled(true);
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("disabled") && err.contains("modify-instance-metadata-options"),
        "{err}"
    );
    // Fails fast: one token request, no retry loop.
    let puts = imds.requests().iter().filter(|r| r.method == "PUT").count();
    assert_eq!(puts, 1, "{:?}", imds.requests());
}

#[test]
fn a_token_expiring_mid_run_is_refreshed() {
    let w = World::new();
    let imds = emulator("gzip-or-not\n");
    imds.set_token_max_uses(Some(1));
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reqs = imds.requests();
    assert!(
        reqs.iter().any(|r| r.status == 401),
        "a 401 was served: {reqs:?}"
    );
    assert!(
        reqs.iter().filter(|r| r.method == "PUT").count() >= 2,
        "token refreshed: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.had_token),
        "{reqs:?}"
    );
    assert_eq!(
        fs::read_to_string(w.root().join("etc/salt/minion_id"))
            .unwrap()
            .trim(),
        "gzip-or-not"
    );
}

#[test]
fn gzip_user_data_is_read() {
    use std::io::Write;
    let w = World::new();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(b"minion_id = \"db-{region}\"\n").unwrap();
    let imds = Emulator::start(
        EmulatorConfig::new(Identity::example()).with_user_data(gz.finish().unwrap()),
    )
    .unwrap();
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::read_to_string(w.root().join("etc/salt/minion_id"))
            .unwrap()
            .trim(),
        "db-eu-west-1"
    );
}

#[test]
fn no_user_data_boots_with_the_instance_id() {
    let w = World::new();
    let imds = Emulator::start(EmulatorConfig::new(Identity::example())).unwrap();
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::read_to_string(w.root().join("etc/salt/minion_id"))
            .unwrap()
            .trim(),
        "i-0123456789abcdef0"
    );
}

#[test]
fn bad_user_data_names_line_and_column_and_writes_nothing() {
    let w = World::new();
    let imds =
        emulator("minion_id = \"web\"\n[salt]\nrepo = \"file:///nowhere\"\nbranch = \"main\"\n");
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("user-data:4:1: unknown field `branch`"),
        "{err}"
    );
    let r = result_line(&o);
    assert_eq!(r["outcome"], "failed");
    assert!(
        r["error"].as_str().unwrap().contains("user-data:4:1"),
        "{r}"
    );
    assert!(
        !w.root().join("etc/salt").exists(),
        "no salt configuration written"
    );
    assert!(
        !w.root().join("var/lib/stackless/repos").exists(),
        "no repository touched"
    );
    let s = status(&w.root());
    assert_eq!(s["boot"]["outcome"], "failed");
    assert!(s["boot"]["error"]
        .as_str()
        .unwrap()
        .contains("user-data:4:1"));
}

const PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2Vy\n-----END CERTIFICATE-----\n";

#[test]
fn ca_certificates_are_trusted_kept_and_removed() {
    let w = World::new();
    let root = w.root();
    // A stand-in update-ca-certificates inside the root (the host's is never used under --root).
    let tool = root.join("usr/sbin/update-ca-certificates");
    let calls = w.tmp.path().join("calls");
    fs::create_dir_all(tool.parent().unwrap()).unwrap();
    fs::write(
        &tool,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .unwrap();
    fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let crt = root.join("usr/local/share/ca-certificates/stackless-user-data.crt");
    let ncalls = || {
        fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .count()
    };

    let with = format!("minion_id = \"web\"\nca_certificates = '''\n{PEM}'''\n");
    for round in 0..2 {
        let imds = emulator(&with);
        let o = init(&root, &imds.endpoint(), &["boot", "--once"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(fs::read_to_string(&crt).unwrap(), PEM);
        // The second boot finds the same certificate: no refresh.
        assert_eq!(ncalls(), 1, "round {round}");
    }
    let s = status(&root);
    let trust = s["boot"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "trust")
        .unwrap();
    assert!(
        trust["detail"].as_str().unwrap().contains("unchanged"),
        "{trust}"
    );

    let imds = emulator("minion_id = \"web\"\n");
    let o = init(&root, &imds.endpoint(), &["boot", "--once"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!crt.exists());
    assert_eq!(ncalls(), 2);
}

#[test]
fn ca_certificates_without_markers_fail_the_boot_with_their_place() {
    let w = World::new();
    let imds = emulator("minion_id = \"web\"\nca_certificates = \"\"\"\nMIIBszCC\n-----END CERTIFICATE-----\n\"\"\"\n");
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(1));
    let r = result_line(&o);
    assert_eq!(r["outcome"], "failed");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains("user-data:4:1: ca_certificates: `-----END CERTIFICATE-----` without"),
        "{e}"
    );
}

#[test]
fn image_defaults_errors_name_the_defaults_file() {
    let w = World::new();
    let defaults = w.root().join("etc/stackless/init.toml");
    fs::create_dir_all(defaults.parent().unwrap()).unwrap();
    fs::write(&defaults, "[sync]\nschedule = \"every day\"\n").unwrap();
    let imds = emulator("web-1");
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("{}:2:12:", defaults.display())),
        "{}",
        stderr(&o)
    );
}

#[test]
fn unreachable_git_keeps_the_last_good_release() {
    let w = World::new();
    let salt = GitRepo::new(&w.git(), "salt");
    let sha = commit(&salt, &salt_tree(&w.out(), ""), "states");
    let imds = emulator(&user_data(&salt, None));
    let root = w.root();
    assert!(init(&root, &imds.endpoint(), &["boot", "--once"])
        .status
        .success());

    // The git host goes away.
    fs::rename(&salt.bare, w.tmp.path().join("moved.git")).unwrap();
    fs::remove_file(w.out()).unwrap();
    let o = init(&root, &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(2), "degraded: {}", stderr(&o));
    assert!(
        stderr(&o).contains("kept the last good release"),
        "{}",
        stderr(&o)
    );
    let s = status(&root);
    assert_eq!(s["boot"]["outcome"], "degraded");
    assert_eq!(s["repos"]["salt"]["result"], "kept-last");
    assert_eq!(s["repos"]["salt"]["commit"], sha.as_str());
    assert!(
        fs::read_link(root.join("var/lib/stackless/repos/salt/current"))
            .unwrap()
            .ends_with(&sha)
    );
    // Highstate still ran from the last good release.
    assert_eq!(s["highstate"]["ok"], true);
    assert!(w.out().exists());
}

#[test]
fn unreachable_salt_git_on_first_boot_is_degraded_and_config_still_syncs() {
    let w = World::new();
    let config = GitRepo::new(&w.git(), "config");
    let sha = config.commit(&[("app.conf", "x=1\n")], "config");
    let imds = emulator(&format!(
        "[salt]\nrepo = \"file://{}/none.git\"\n[config]\nrepo = \"{}\"\n",
        w.tmp.path().display(),
        config.url()
    ));
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("syncing the salt repository"),
        "{}",
        stderr(&o)
    );
    let s = status(&w.root());
    assert_eq!(s["repos"]["salt"]["result"], "failed");
    assert_eq!(
        s["repos"]["config"]["commit"],
        sha.as_str(),
        "the config repository is independent"
    );
    assert!(s["highstate"].is_null(), "no highstate without states");
}

#[test]
fn a_failed_boot_keeps_the_last_record() {
    let w = World::new();
    let salt = GitRepo::new(&w.git(), "salt");
    let sha = commit(&salt, &salt_tree(&w.out(), ""), "states");
    let imds = emulator(&user_data(&salt, None));
    assert!(init(&w.root(), &imds.endpoint(), &["boot", "--once"])
        .status
        .success());
    // The next boot cannot reach IMDS at all.
    imds.set_disabled(true);
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(1));
    let s = status(&w.root());
    assert_eq!(s["boot"]["outcome"], "failed");
    assert_eq!(
        s["minion_id"], "web-i-0123456789abcdef0",
        "what the instance is stays known"
    );
    assert_eq!(s["repos"]["salt"]["commit"], sha.as_str());
    assert_eq!(s["highstate"]["ok"], true);
}

#[test]
fn a_failing_state_is_reported_by_id() {
    let w = World::new();
    let salt = GitRepo::new(&w.git(), "salt");
    let broken = "broken-step:\n  cmd.run:\n    - name: 'echo nope >&2; exit 3'\n";
    commit(&salt, &salt_tree(&w.out(), broken), "a failing state");
    let imds = emulator(&user_data(&salt, None));
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let s = status(&w.root());
    assert_eq!(s["boot"]["outcome"], "degraded");
    assert_eq!(s["highstate"]["ok"], false);
    assert_eq!(s["highstate"]["total"], 2);
    let failed = s["highstate"]["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["id"], "broken-step");
    assert!(stderr(&o).contains("broken-step"), "{}", stderr(&o));
    // The passing state still applied.
    assert!(w.out().exists());
}

#[test]
fn a_render_error_is_reported_as_such() {
    let w = World::new();
    let salt = GitRepo::new(&w.git(), "salt");
    let mut tree = salt_tree(&w.out(), "");
    tree[1].1 = "motd:\n  file.managed:\n    - contents: {{ grains['role'] \n".into();
    commit(&salt, &tree, "bad jinja");
    let imds = emulator(&user_data(&salt, None));
    let o = init(&w.root(), &imds.endpoint(), &["boot", "--once"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let s = status(&w.root());
    assert_eq!(s["highstate"]["ok"], false);
    let errors = s["highstate"]["render_errors"]
        .as_array()
        .expect("render_errors present");
    assert!(!errors.is_empty());
    assert!(errors[0].as_str().unwrap().contains("app"), "{errors:?}");
}

#[test]
fn check_validates_without_applying() {
    let w = World::new();
    fs::create_dir_all(w.tmp.path()).unwrap();
    let good = w.tmp.path().join("good.toml");
    fs::write(
        &good,
        "minion_id = \"web-{instance_id}\"\n[sync]\nschedule = \"@every 5m\"\n",
    )
    .unwrap();
    let o = init(
        &w.root(),
        "http://127.0.0.1:9",
        &["check", "--user-data", good.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("ok (minion id web-i-0123456789abcdef0"),
        "{}",
        stdout(&o)
    );

    let bad = w.tmp.path().join("bad.toml");
    fs::write(
        &bad,
        "minion_id = \"web-{instance_id}\"\n\n[sync]\nschedule = \"*/5 * *\"\n",
    )
    .unwrap();
    let o = init(
        &w.root(),
        "http://127.0.0.1:9",
        &["check", "--user-data", bad.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!("{}:4:12: cron schedule", bad.display())),
        "{}",
        stderr(&o)
    );
    assert!(!w.root().exists(), "check writes nothing");
}
