//! Issue 19, the builder's rows: the real `builder` binary, baking or deploying against a real
//! moto_server (bakes reach their seed through the SSM Run Command shim), SIGKILLed at a random
//! point, then what the product offers to recover: `builder gc --build` after a bake, the next
//! deploy after a deploy. Each round counts what was left behind ([`testkit::faults::Tally`]).
//!
//! Loopback only: the builder is refused any endpoint but a local moto.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use testkit::faults::{rounds, Rng, Tally};
use testkit::{Moto, REGION};

const IMAGE: &str = "web";
const PARAMETER: &str = "/stackless/images/web";
const PROFILE: &str = "stackless-test-builder";
const SERVICE: &str = "web";
const BUILD_ID_TAG: &str = "stackless:build-id";
const LOCK: &str = "/stackless/deploy/web/lock";

/// A child process killed on drop, so a failed assertion leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The `builder` binary run in `dir`, pointed at moto alone (and SSM at `ssm`, the Run Command
/// shim, when given): no variable, profile or instance metadata of the test's environment.
fn builder(moto: &Moto, ssm: Option<&str>, dir: &Path) -> Command {
    let local = |e: &str| e.starts_with("http://127.0.0.1:");
    assert!(local(&moto.endpoint), "tests only run against a local moto");
    let mut cmd = testkit::bare_command(env!("CARGO_BIN_EXE_builder"), dir);
    cmd.current_dir(dir)
        .env("AWS_ENDPOINT_URL", &moto.endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("NO_COLOR", "1");
    if let Some(ssm) = ssm {
        assert!(local(ssm), "tests only run against a local SSM shim");
        cmd.env("AWS_ENDPOINT_URL_SSM", ssm);
    }
    cmd
}

/// Runs `cmd` with its stderr in `log` until `armed` holds for that stderr, lets it run `delay`
/// longer, then SIGKILLs it. Returns its stderr up to then, and whether the kill found it still
/// running (false: it had ended by itself).
fn kill_when(
    cmd: &mut Command,
    log: &Path,
    armed: impl Fn(&str) -> bool,
    delay: Duration,
) -> (String, bool) {
    let stderr = std::fs::File::create(log).unwrap();
    let mut child = Running(
        cmd.stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting builder"),
    );
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let start = Instant::now();
    while !armed(&read()) {
        if child.0.try_wait().unwrap().is_some() {
            return (read(), false);
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the kill point never came:\n{}",
            read()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(delay);
    let running = child.0.try_wait().unwrap().is_none();
    if running {
        // Child::kill is SIGKILL: no handler runs, nothing is cleaned up.
        child.0.kill().unwrap();
        child.0.wait().unwrap();
    }
    (read(), running)
}

/// Runs `cmd` to its end (at most two minutes): success, stdout, stderr.
fn run(cmd: &mut Command) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Running(
        cmd.stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("starting builder"),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            // Hung: killed, and counted as failed by the caller.
            let _ = child.0.kill();
            break child.0.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status.success(), read(&out), read(&err))
}

fn tag<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn tag_filter(key: &str, value: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// A point a run can be killed at: `marker` in its log, then up to `max_ms` more.
struct KillPoint {
    marker: &'static str,
    landed: &'static str,
    max_ms: u64,
}

impl KillPoint {
    const fn new(marker: &'static str, landed: &'static str, max_ms: u64) -> KillPoint {
        KillPoint {
            marker,
            landed,
            max_ms,
        }
    }
}

/// A random kill point of `points` and a random delay within it.
fn pick<'a>(rng: &mut Rng, points: &'a [KillPoint]) -> (&'a KillPoint, Duration) {
    let p = rng.pick(points);
    (p, Duration::from_millis(rng.range(0, p.max_ms + 1)))
}

/// Where the kill landed: the last of `points` the log had reached, in order.
fn landed(points: &[KillPoint], log: &str, killed: bool, before: &str) -> String {
    if !killed {
        return "after it ended".into();
    }
    points
        .iter()
        .rev()
        .find(|p| log.contains(p.marker))
        .map_or(before, |p| p.landed)
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// A bake killed, then `builder gc`.

/// What a bake needs on disk: the definition, test templates that only check and record (the
/// shim runs them for real, in a scratch folder), and an x86_64 agent (an ELF header and noise).
fn bake_inputs(dir: &Path) {
    std::fs::write(
        dir.join(format!("{IMAGE}.toml")),
        format!(
            "name = \"stackless-web-{{build_id}}\"\n[source]\nowner = \"amazon\"\n\
             name = \"al2023-ami-2023.*-kernel-6.12-x86_64\"\n[instance]\ntype = \"t3.micro\"\n\
             instance_profile = \"{PROFILE}\"\n[publish]\nssm_parameter = \"{PARAMETER}\"\n"
        ),
    )
    .unwrap();
    let t = dir.join("templates");
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(
        t.join("provision.sh.tera"),
        "#!/bin/bash\nset -euo pipefail\nstage=\"${STACKLESS_STAGE:-{{ stage }}}\"\n\
         echo \"{{ init_sha256 }}  $stage/stackless-init\" | sha256sum -c --quiet\n\
         echo provisioned > \"$stage/provisioned\"\n",
    )
    .unwrap();
    std::fs::write(
        t.join("generalize.sh.tera"),
        "#!/bin/bash\nset -euo pipefail\necho generalized\n",
    )
    .unwrap();
    let mut agent = stackless_builder::arch::fake_elf_header(stackless_builder::arch::Arch::X86_64);
    agent.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(dir.join("stackless-init"), agent).unwrap();
}

/// Where a bake can be killed: once its log shows `marker` (a phase starting, or a milestone
/// within one), up to `max_ms` later (about how long that part takes against moto). The last
/// marker the log shows at the kill names where it landed.
const BAKE_POINTS: [KillPoint; 8] = [
    KillPoint::new("starting phase=\"start\"", "start: group and seed", 100),
    KillPoint::new("launched seed instance", "start: waiting for SSM", 50),
    KillPoint::new("starting phase=\"upload\"", "upload", 1100),
    KillPoint::new("starting phase=\"provision\"", "provision", 1100),
    KillPoint::new("starting phase=\"generalize\"", "generalize", 1100),
    KillPoint::new(
        "starting phase=\"snapshot\"",
        "snapshot: stopping the seed",
        2600,
    ),
    KillPoint::new(" created from ", "snapshot: image made, publishing", 120),
    KillPoint::new("starting phase=\"cleanup\"", "cleanup", 60),
];

/// The build id the bake logged (`bake build=b-...`), if it got that far.
fn build_id(log: &str) -> Option<String> {
    log.split_whitespace()
        .find_map(|w| w.strip_prefix("build="))
        .map(|b| b.trim_matches('"').to_string())
}

/// What the build left that is not its finished image: instances not terminated, security
/// groups, images neither published nor named by the parameter, and a parameter naming an image
/// that is gone.
async fn bake_leftovers(
    ec2: &aws_sdk_ec2::Client,
    ssm: &aws_sdk_ssm::Client,
    build: &str,
) -> Vec<String> {
    let mut left = Vec::new();
    let by_build = tag_filter(BUILD_ID_TAG, build);
    let reservations = ec2
        .describe_instances()
        .filters(by_build.clone())
        .send()
        .await
        .unwrap();
    for i in reservations
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
    {
        let state = i.state().and_then(|s| s.name()).map(|n| n.as_str());
        if !matches!(state, Some("terminated" | "shutting-down")) {
            left.push(format!(
                "instance {} {}",
                i.instance_id().unwrap_or_default(),
                state.unwrap_or("?")
            ));
        }
    }
    let groups = ec2
        .describe_security_groups()
        .filters(by_build.clone())
        .send()
        .await
        .unwrap();
    for g in groups.security_groups() {
        left.push(format!(
            "security group {}",
            g.group_id().unwrap_or_default()
        ));
    }
    let live = ssm
        .get_parameter()
        .name(PARAMETER)
        .send()
        .await
        .ok()
        .and_then(|p| p.parameter()?.value().map(str::to_string));
    let images = ec2
        .describe_images()
        .owners("self")
        .filters(by_build)
        .send()
        .await
        .unwrap();
    for img in images.images() {
        let id = img.image_id().unwrap_or_default();
        let published = tag(img.tags(), "stackless:published") == Some("true");
        if !published && live.as_deref() != Some(id) {
            left.push(format!(
                "image {id} {}",
                img.state().map(|s| s.as_str()).unwrap_or("?")
            ));
        }
    }
    // The parameter is what deploys follow: naming an image that is gone, it is broken.
    if let Some(live) = live {
        if !image_exists(ec2, &live).await {
            left.push(format!("{PARAMETER} names {live}, which is gone"));
        }
    }
    left
}

/// Snapshots of no image. (A snapshot may carry no build tag: where CreateImage cannot tag
/// snapshots, they are tagged only once the image is available.)
async fn orphan_snapshots(ec2: &aws_sdk_ec2::Client) -> BTreeSet<String> {
    let images = ec2.describe_images().owners("self").send().await.unwrap();
    let used: BTreeSet<&str> = images
        .images()
        .iter()
        .flat_map(|i| i.block_device_mappings())
        .filter_map(|m| m.ebs()?.snapshot_id())
        .collect();
    let snapshots = ec2
        .describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap();
    snapshots
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id())
        .filter(|id| !used.contains(id))
        .map(str::to_string)
        .collect()
}

async fn image_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> bool {
    ec2.describe_images()
        .image_ids(id)
        .send()
        .await
        .is_ok_and(|o| !o.images().is_empty())
}

/// What no bake should ever create: key pairs, SSM documents, parameters besides the published
/// one.
async fn strays(ec2: &aws_sdk_ec2::Client, ssm: &aws_sdk_ssm::Client) -> Vec<String> {
    let mut left = Vec::new();
    for k in ec2.describe_key_pairs().send().await.unwrap().key_pairs() {
        left.push(format!("key pair {}", k.key_name().unwrap_or_default()));
    }
    let documents = ssm
        .list_documents()
        .filters(
            aws_sdk_ssm::types::DocumentKeyValuesFilter::builder()
                .key("Owner")
                .values("Self")
                .build(),
        )
        .send()
        .await
        .unwrap();
    for d in documents.document_identifiers() {
        left.push(format!("SSM document {}", d.name().unwrap_or_default()));
    }
    let parameters = ssm.describe_parameters().send().await.unwrap();
    for p in parameters.parameters() {
        if p.name() != Some(PARAMETER) {
            left.push(format!("SSM parameter {}", p.name().unwrap_or_default()));
        }
    }
    left
}

#[test]
fn a_bake_killed_anywhere_leaves_nothing_once_gc_has_run() {
    let fault = "builder bake killed (SIGKILL) at a random phase, then builder gc";
    let n = rounds(3);
    let mut rng = Rng::new(fault);
    let mut t = Tally::new(fault, &["resources"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let moto = Moto::start();
    let shim = testkit::ssm_shim::SsmShim::start(&moto.endpoint, Default::default());
    testkit::ssm_shim::create_instance_profile(&moto.endpoint, PROFILE);
    let config = rt.block_on(moto.sdk_config());
    let (ec2, ssm) = (
        aws_sdk_ec2::Client::new(&config),
        aws_sdk_ssm::Client::new(&config),
    );
    let dir = tempfile::tempdir().unwrap();
    bake_inputs(dir.path());
    let images_dir = dir.path().to_str().unwrap();

    for round in 1..=n {
        let (point, delay) = pick(&mut rng, &BAKE_POINTS);
        let orphans_before = rt.block_on(orphan_snapshots(&ec2));
        let log = dir.path().join(format!("bake-{round}.log"));
        let (baked, killed) = kill_when(
            builder(&moto, Some(&shim.endpoint), dir.path())
                .args(["--images-dir", images_dir, "--templates", "templates"])
                .args(["bake", IMAGE, "--force", "--skip-preflight"])
                .args(["--init-binary", "stackless-init"])
                .args(["--manifest", &format!("manifest-{round}.json")]),
            &log,
            |l| l.contains(point.marker),
            delay,
        );
        let landed = landed(&BAKE_POINTS, &baked, killed, "resolving the source");

        let mut gc = builder(&moto, Some(&shim.endpoint), dir.path());
        gc.args(["--images-dir", images_dir, "gc"]);
        let build = build_id(&baked);
        if let Some(b) = &build {
            gc.args(["--build", b]);
        }
        let (gc_ok, gc_out, gc_err) = run(&mut gc);
        let mut left = match &build {
            Some(b) => rt.block_on(bake_leftovers(&ec2, &ssm, b)),
            None => Vec::new(),
        };
        left.extend(rt.block_on(strays(&ec2, &ssm)));
        let orphans = rt.block_on(orphan_snapshots(&ec2));
        left.extend(
            orphans
                .difference(&orphans_before)
                .map(|id| format!("snapshot {id} of no image")),
        );
        if !gc_ok {
            left.push(format!("gc failed: {gc_err}"));
        }
        eprintln!(
            "round {round}: killed {delay:?} after `{}` ({landed}), build {build:?}; gc: {}",
            point.marker,
            gc_out.trim()
        );
        t.round(
            &landed,
            &[("resources", left.len() as u64, left.join(", "))],
        );
    }
    t.finish();
}

// ---------------------------------------------------------------------------------------------
// A deploy killed, then the next deploy.

/// The deploy file: deadlines short enough for moto, and a lock that lives only as long as they
/// add up to (running + ready + healthy + lookup + drain + terminate = 19 s), so the lock a
/// killed deploy leaves expires soon.
const DEPLOY_FILE: &str = "[timeouts]\nrunning = \"5s\"\nready = \"1s\"\nhealthy = \"5s\"\n\
    drain = \"2s\"\nterminate = \"5s\"\nlookup = \"1s\"\nunhealthy_grace = \"0s\"\nlock = \"20s\"\n";

/// The world the deploys run in: the target group, a subnet and security group, an image, and
/// one instance of the service serving.
struct World {
    tg: String,
    subnet: String,
    security_group: String,
    ami: String,
}

async fn world(config: &aws_config::SdkConfig) -> World {
    let ec2 = aws_sdk_ec2::Client::new(config);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(config);
    let w = testkit::DeployWorld::create(config).await;
    let security_group = ec2
        .create_security_group()
        .group_name(SERVICE)
        .description(SERVICE)
        .vpc_id(&w.vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    // What an earlier deploy left serving: tagged as the service's, registered.
    let t = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    let old = ec2
        .run_instances()
        .image_id(&w.amis[0])
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(&w.subnets[0])
        .security_group_ids(&security_group)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(t("stackless:service", SERVICE))
                .tags(t("stackless:deploy-id", "d-20260101000000000-000000"))
                .build(),
        )
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_string();
    elb.register_targets()
        .target_group_arn(&w.target_group)
        .targets(
            aws_sdk_elasticloadbalancingv2::types::TargetDescription::builder()
                .id(old)
                .build(),
        )
        .send()
        .await
        .unwrap();
    World {
        tg: w.target_group,
        subnet: w.subnets[0].clone(),
        security_group,
        ami: w.amis[1].clone(),
    }
}

/// `builder --output json deploy web ...`, the same every time.
fn deploy(moto: &Moto, dir: &Path, w: &World) -> Command {
    let mut cmd = builder(moto, None, dir);
    cmd.args(["--output", "json", "deploy", SERVICE])
        .args(["--ami", &w.ami, "--count", "1"])
        .args(["--subnet", &w.subnet])
        .args(["--security-group", &w.security_group])
        .args(["--target-group", &w.tg])
        .args(["--deploy-dir", "deploy"]);
    cmd
}

/// Where a deploy can be killed (see [`BAKE_POINTS`]): its steps take tens of milliseconds
/// against moto.
const DEPLOY_POINTS: [KillPoint; 9] = [
    KillPoint::new("step 1/6", "step 1/6 take the deploy lock", 15),
    KillPoint::new("step 2/6", "step 2/6 boot the new instances", 15),
    KillPoint::new("INFO booted ", "step 2/6: booted", 5),
    KillPoint::new("step 3/6", "step 3/6 wait until they run", 20),
    KillPoint::new("step 4/6", "step 4/6 register with the target groups", 10),
    KillPoint::new(
        "INFO registered ",
        "step 4/6: registered, waiting until healthy",
        15,
    ),
    KillPoint::new("step 5/6", "step 5/6 deregister the old instances", 30),
    KillPoint::new(
        "INFO deregistered ",
        "step 5/6: deregistered, draining, terminating",
        50,
    ),
    KillPoint::new(
        "step 6/6",
        "step 6/6 record the deploy, release the lock",
        15,
    ),
];

/// Waits until the deploy lock, if any is left, has expired: a killed deploy's lock is only
/// taken over then.
fn wait_for_lock_expiry(rt: &tokio::runtime::Runtime, ssm: &aws_sdk_ssm::Client) {
    let lock = rt.block_on(ssm.get_parameter().name(LOCK).send());
    let Some(value) = lock
        .ok()
        .and_then(|l| l.parameter()?.value().map(str::to_string))
    else {
        return;
    };
    let record: serde_json::Value = serde_json::from_str(&value).unwrap();
    let expires = humantime::parse_rfc3339_weak(record["expires"].as_str().unwrap()).unwrap();
    // The expiry is to the second; a second more and the next deploy sees it passed.
    let wait = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    std::thread::sleep(wait + Duration::from_secs(1));
}

/// The service's instances not terminated (nor on their way), and the target group's targets
/// with their health.
async fn serving(
    ec2: &aws_sdk_ec2::Client,
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    tg: &str,
) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let out = ec2
        .describe_instances()
        .filters(tag_filter("stackless:service", SERVICE))
        .send()
        .await
        .unwrap();
    let live = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            !matches!(
                i.state().and_then(|s| s.name()).map(|n| n.as_str()),
                Some("terminated" | "shutting-down")
            )
        })
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    let health = elb
        .describe_target_health()
        .target_group_arn(tg)
        .send()
        .await
        .unwrap();
    let targets = health
        .target_health_descriptions()
        .iter()
        .map(|d| {
            (
                d.target()
                    .and_then(|t| t.id())
                    .unwrap_or_default()
                    .to_string(),
                d.target_health()
                    .and_then(|h| h.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    (live, targets)
}

#[test]
fn a_deploy_killed_anywhere_is_replaced_by_the_next_one() {
    let fault = "builder deploy killed (SIGKILL) at a random step, then the next deploy";
    let n = rounds(3);
    let mut rng = Rng::new(fault);
    let mut t = Tally::new(fault, &["resources", "fleet"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let moto = Moto::start();
    let config = rt.block_on(moto.sdk_config());
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let w = rt.block_on(world(&config));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("deploy")).unwrap();
    std::fs::write(
        dir.path().join("deploy").join(format!("{SERVICE}.toml")),
        DEPLOY_FILE,
    )
    .unwrap();

    for round in 1..=n {
        let (point, delay) = pick(&mut rng, &DEPLOY_POINTS);
        let log = dir.path().join(format!("deploy-{round}.log"));
        let (killed_log, killed) = kill_when(
            &mut deploy(&moto, dir.path(), &w),
            &log,
            |l| l.contains(point.marker),
            delay,
        );
        let landed = landed(&DEPLOY_POINTS, &killed_log, killed, "preparing");

        wait_for_lock_expiry(&rt, &ssm);
        let (ok, out, err) = run(&mut deploy(&moto, dir.path(), &w));
        let record: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let new: BTreeSet<String> = record["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i.as_str().map(str::to_string))
            .collect();
        let (live, targets) = rt.block_on(serving(&ec2, &elb, &w.tg));

        let mut leaked: Vec<String> = live.difference(&new).cloned().collect();
        let lock = rt.block_on(ssm.get_parameter().name(LOCK).send());
        if lock.is_ok() {
            leaked.push("the deploy lock".into());
        }
        let exactly_new = ok
            && record["outcome"] == "succeeded"
            && !new.is_empty()
            && targets.keys().cloned().collect::<BTreeSet<_>>() == new
            && targets.values().all(|h| h == "healthy");
        let fleet = if exactly_new {
            String::new()
        } else {
            format!(
                "the next deploy (ok: {ok}, outcome {}) left targets {targets:?}, its instances {new:?}: {}",
                record["outcome"],
                err.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
            )
        };
        eprintln!(
            "round {round}: killed {delay:?} after `{}` ({landed}); serving {targets:?}",
            point.marker
        );
        t.round(
            &landed,
            &[
                ("resources", leaked.len() as u64, leaked.join(", ")),
                ("fleet", u64::from(!exactly_new), fleet),
            ],
        );
    }
    t.finish();
}
