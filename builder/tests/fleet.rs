//! `builder fleet` through the real binary against moto: the listing with instances in every
//! state (reporting, silent, failed, degraded, on another service, terminated), an Auto Scaling
//! group, and the wait's three exits, with instances terminated and launched while it waits and
//! the commit named by a ref that real git resolves. The tags are written as the agent writes them (init's report
//! module, whose own tests write them to moto with signatures checked).

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use testkit::{Moto, REGION};

fn builder(moto: &Moto, home: &Path) -> Command {
    let mut c = testkit::bare_command(env!("CARGO_BIN_EXE_builder"), home);
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("AWS_ENDPOINT_URL", &moto.endpoint);
    c
}

use testkit::output_text as text;

/// `builder ARGS` against moto from a fresh HOME, which must exit with `code`: its stdout and
/// stderr.
fn run(moto: &Moto, args: &[&str], code: i32) -> (String, String) {
    let home = tempfile::tempdir().unwrap();
    let o = builder(moto, home.path()).args(args).output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(code), "{err}");
    (out, err)
}

struct Fleet {
    ec2: aws_sdk_ec2::Client,
    ami: String,
}

impl Fleet {
    async fn new(moto: &Moto) -> Fleet {
        let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
        let mut amis: Vec<String> = ec2
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .unwrap()
            .images()
            .iter()
            .filter_map(|i| i.image_id().map(str::to_string))
            .collect();
        amis.sort();
        Fleet {
            ec2,
            ami: amis[0].clone(),
        }
    }

    /// Runs an instance of `service`; returns its id.
    async fn launch(&self, service: &str) -> String {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(
                Tag::builder()
                    .key("stackless:service")
                    .value(service)
                    .build(),
            )
            .build();
        self.ec2
            .run_instances()
            .image_id(&self.ami)
            .min_count(1)
            .max_count(1)
            .tag_specifications(tags)
            .send()
            .await
            .unwrap()
            .instances()[0]
            .instance_id()
            .unwrap()
            .to_string()
    }

    /// Tags `id` as the agent reports.
    async fn report(&self, id: &str, config: &str, outcome: &str, problems: &str, failed: u32) {
        let tags = [
            ("stackless:salt-commit", "a".repeat(40)),
            ("stackless:config-commit", config.to_string()),
            ("stackless:outcome", outcome.to_string()),
            ("stackless:failed-states", failed.to_string()),
            ("stackless:problems", problems.to_string()),
            ("stackless:reported-at", "2026-01-01T00:00:00Z".to_string()),
        ];
        let mut call = self.ec2.create_tags().resources(id);
        for (k, v) in tags {
            call = call.tags(Tag::builder().key(k).value(v).build());
        }
        call.send().await.unwrap();
    }

    async fn terminate(&self, id: &str) {
        self.ec2
            .terminate_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
    }
}

const OLD: &str = "0123456789abcdef0123456789abcdef01234567";

/// A git repository with one commit; its URL and the commit.
fn repo(dir: &Path) -> (String, String) {
    let git = |args: &[&str]| testkit::git(dir, args);
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(dir.join("app.conf"), "v2\n").unwrap();
    git(&["add", "app.conf"]);
    git(&["commit", "-q", "-m", "v2"]);
    (
        format!("file://{}", dir.display()),
        git(&["rev-parse", "HEAD"]),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_every_state_as_a_table_and_as_json() {
    let moto = Moto::start();
    let fleet = Fleet::new(&moto).await;
    let new = "c".repeat(40);
    let ready = fleet.launch("web").await;
    fleet.report(&ready, &new, "ready", "", 0).await;
    let silent = fleet.launch("web").await;
    let failed = fleet.launch("web").await;
    fleet
        .report(&failed, &new, "failed", "config-repo", 0)
        .await;
    let degraded = fleet.launch("web").await;
    fleet
        .report(&degraded, OLD, "degraded", "highstate", 2)
        .await;
    let gone = fleet.launch("web").await;
    fleet.terminate(&gone).await;
    let other = fleet.launch("api").await;

    let (out, _) = run(&moto, &["fleet", "web"], 0);
    for id in [&ready, &silent, &failed, &degraded] {
        assert!(out.contains(id.as_str()), "{id} missing:\n{out}");
    }
    assert!(!out.contains(&gone) && !out.contains(&other), "{out}");
    assert!(out.contains("4 instance(s)"), "{out}");
    assert!(out.contains("cccccccccccc x2"), "{out}");
    assert!(
        out.contains(&format!("{failed} failed (config-repo)"))
            && out.contains(&format!("{degraded} degraded (highstate)")),
        "{out}"
    );
    assert!(out.contains(&format!("silent  {silent}")), "{out}");

    let (out, _) = run(&moto, &["fleet", "web", "--output", "json"], 0);
    let j: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let rows = j["instances"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let row = rows
        .iter()
        .find(|r| r["instance_id"] == degraded.as_str())
        .unwrap();
    assert_eq!(row["failed_states"], 2);
    assert_eq!(row["config_commit"], OLD);
    assert_eq!(row["zone"], format!("{REGION}a"));
    let row = rows
        .iter()
        .find(|r| r["instance_id"] == silent.as_str())
        .unwrap();
    assert_eq!(row["outcome"], serde_json::Value::Null);
}

/// Stderr lines of a running builder, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns every line seen.
fn until(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) {
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return;
                }
            }
            Err(e) => panic!("no line with {needle} ({e}); saw {seen:#?}"),
        }
    }
}

/// Exit 0: one instance is already there, one is terminated while the builder waits and one
/// launched then, and the commit is `HEAD` of a real repository.
#[tokio::test(flavor = "multi_thread")]
async fn wait_converges_with_instances_terminated_and_launched_meanwhile() {
    let moto = Moto::start();
    let fleet = Fleet::new(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let (url, head) = repo(dir.path());
    let ready = fleet.launch("web").await;
    fleet.report(&ready, &head, "ready", "", 0).await;
    let doomed = fleet.launch("web").await;
    fleet.report(&doomed, OLD, "ready", "", 0).await;

    let home = tempfile::tempdir().unwrap();
    let mut child = builder(&moto, home.path())
        .args(["fleet", "web", "--wait", "--config", "HEAD", "--repo", &url])
        .args(["--interval", "300ms", "--timeout", "5m", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut child);
    let mut seen = Vec::new();
    until(&rx, &format!("waiting for {doomed}"), &mut seen);
    fleet.terminate(&doomed).await;
    let late = fleet.launch("web").await;
    until(&rx, &format!("waiting for {late}"), &mut seen);
    fleet.report(&late, &head, "ready", "", 0).await;
    let out = child.wait_with_output().unwrap();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        seen.push(l);
    }
    assert_eq!(out.status.code(), Some(0), "{seen:#?}");
    assert!(
        seen.iter().any(|l| l.contains("converged: 2 instance(s)")),
        "{seen:#?}"
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(j["result"], "converged");
    assert_eq!(j["commit"], head.as_str());
    let ids: Vec<&str> = j["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&late.as_str()) && !ids.contains(&doomed.as_str()),
        "{ids:?}"
    );
}

/// Exit 1 as soon as an instance reports the commit degraded, naming it and its problem, even
/// while another has not reported yet.
#[tokio::test(flavor = "multi_thread")]
async fn wait_fails_naming_the_culprit() {
    let moto = Moto::start();
    let fleet = Fleet::new(&moto).await;
    let new = "d".repeat(40);
    let ok = fleet.launch("web").await;
    fleet.report(&ok, &new, "ready", "", 0).await;
    let bad = fleet.launch("web").await;
    fleet.report(&bad, &new, "degraded", "highstate", 3).await;
    let _silent = fleet.launch("web").await;

    let (out, err) = run(
        &moto,
        &[
            "fleet",
            "web",
            "--wait",
            "--config",
            &new[..8],
            "--interval",
            "1s",
            "--timeout",
            "5m",
        ],
        1,
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("builder: failed on config dddddddd")
            && last.contains(&bad)
            && last.contains("degraded: highstate (3 failed state(s))")
            && !last.contains(&ok),
        "{err}"
    );
    assert!(out.contains("INSTANCE"), "the table is printed too: {out}");
}

/// Exit 3 at the deadline, naming the stragglers and what they report instead.
#[tokio::test(flavor = "multi_thread")]
async fn wait_times_out_naming_the_stragglers() {
    let moto = Moto::start();
    let fleet = Fleet::new(&moto).await;
    let new = "e".repeat(40);
    let ok = fleet.launch("web").await;
    fleet.report(&ok, &new, "ready", "", 0).await;
    let behind = fleet.launch("web").await;
    fleet.report(&behind, OLD, "ready", "", 0).await;
    let silent = fleet.launch("web").await;

    let (_, err) = run(
        &moto,
        &[
            "fleet",
            "web",
            "--wait",
            "--config",
            &new,
            "--interval",
            "500ms",
            "--timeout",
            "2s",
        ],
        3,
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("timed out")
            && last.contains("1 ready, 2 not")
            && last.contains(&format!("{behind} (ready on config 0123456789ab)"))
            && last.contains(&format!("{silent} ("))
            && last.contains("no report yet"),
        "{err}"
    );
}

/// `--asg NAME`: the instances Auto Scaling launched (tagged aws:autoscaling:groupName by it),
/// whatever their service tag.
#[tokio::test(flavor = "multi_thread")]
async fn lists_the_instances_of_an_auto_scaling_group() {
    use aws_sdk_ec2::types::RequestLaunchTemplateData;
    let moto = Moto::start();
    let fleet = Fleet::new(&moto).await;
    let config = moto.sdk_config().await;
    fleet
        .ec2
        .create_launch_template()
        .launch_template_name("web")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(&fleet.ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap();
    aws_sdk_autoscaling::Client::new(&config)
        .create_auto_scaling_group()
        .auto_scaling_group_name("web-asg")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_name("web")
                .build(),
        )
        .min_size(2)
        .max_size(2)
        .desired_capacity(2)
        .availability_zones(format!("{REGION}a"))
        .send()
        .await
        .unwrap();
    let outside = fleet.launch("web").await;

    let (out, _) = run(&moto, &["fleet", "--asg", "web-asg", "--output", "json"], 0);
    let j: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let ids: Vec<&str> = j["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{out}");
    assert!(!ids.contains(&outside.as_str()), "{out}");
}
