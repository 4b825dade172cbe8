//! Issue #6, end to end: the real `builder` binary, deploying against a real moto_server, gets a
//! real SIGINT while step 3 waits for a health URL that never answers 200, and rolls back: exit
//! 1, the new instance terminated, the old one still running and registered, the lock released
//! and the deploy recorded `rolled-back`. (`deploy/tests.rs` interrupts through an injected stop
//! future; this goes through the binary's own signal handling.)
//!
//! The test refuses any endpoint but loopback, so it can never touch a real AWS account.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVICE: &str = "web";
use testkit::{Moto, REGION};

/// A health endpoint on loopback answering 503 to every request, counting them.
struct HealthServer {
    server: Arc<tiny_http::Server>,
    url: String,
    hits: Arc<AtomicUsize>,
}

impl HealthServer {
    fn start() -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let (s, h) = (server.clone(), hits.clone());
        std::thread::spawn(move || {
            for req in s.incoming_requests() {
                h.fetch_add(1, Ordering::SeqCst);
                let _ =
                    req.respond(tiny_http::Response::from_string("starting").with_status_code(503));
            }
        });
        // The instance's address goes into the query: the request itself stays on loopback.
        HealthServer {
            server,
            url: format!("http://127.0.0.1:{port}/health?instance={{ip}}"),
            hits,
        }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

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

/// The world the deploy runs in: a target group, one old instance of the service registered in
/// it, a security group and a second AMI to deploy.
struct World {
    tg: String,
    subnet: String,
    security_group: String,
    old: String,
    new_ami: String,
}

async fn world(config: &aws_config::SdkConfig) -> World {
    let ec2 = aws_sdk_ec2::Client::new(config);
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(config);
    let testkit::DeployWorld {
        vpc,
        subnets,
        target_group: tg,
        amis,
    } = testkit::DeployWorld::create(config).await;
    let subnet = subnets[0].clone();
    let security_group = ec2
        .create_security_group()
        .group_name("web")
        .description("web")
        .vpc_id(&vpc)
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_string();
    // The instance an earlier deploy left serving: tagged as the service's, registered.
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    let old = ec2
        .run_instances()
        .image_id(&amis[0])
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .subnet_id(&subnet)
        .security_group_ids(&security_group)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                .tags(tag("Name", SERVICE))
                .tags(tag("stackless:service", SERVICE))
                .tags(tag("stackless:deploy-id", "d-20260101000000000-000000"))
                .tags(tag("stackless:ami", &amis[0]))
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
        .target_group_arn(&tg)
        .targets(
            aws_sdk_elasticloadbalancingv2::types::TargetDescription::builder()
                .id(&old)
                .build(),
        )
        .send()
        .await
        .unwrap();
    World {
        tg,
        subnet,
        security_group,
        old,
        new_ami: amis[1].clone(),
    }
}

/// Every instance moto knows: id to (state, the `stackless:deploy-id` tag).
async fn instances(ec2: &aws_sdk_ec2::Client) -> Vec<(String, String, Option<String>)> {
    let out = ec2.describe_instances().send().await.unwrap();
    let mut v: Vec<_> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap().to_string(),
                i.state().unwrap().name().unwrap().as_str().to_string(),
                i.tags()
                    .iter()
                    .find(|t| t.key() == Some("stackless:deploy-id"))
                    .and_then(|t| t.value())
                    .map(str::to_string),
            )
        })
        .collect();
    v.sort();
    v
}

/// The `builder` binary, pointed at moto alone: no AWS variable of the test's environment leaks
/// in, no profile or instance metadata is consulted.
fn builder(endpoint: &str, dir: &Path) -> Command {
    assert!(
        endpoint.starts_with("http://127.0.0.1:"),
        "the builder only runs against a local moto, not {endpoint}"
    );
    // Empty AWS configuration files: no profile of the user's is read.
    let (config_file, credentials_file) = (dir.join("aws-config"), dir.join("aws-credentials"));
    std::fs::write(&config_file, "").unwrap();
    std::fs::write(&credentials_file, "").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_builder"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") || k.to_string_lossy().starts_with("STACKLESS_")
        {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", config_file)
        .env("AWS_SHARED_CREDENTIALS_FILE", credentials_file)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn sigint_during_the_wait_rolls_back() {
    let t0 = Instant::now();
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
    let health = HealthServer::start();

    // Short deadlines, except step 3's: it must still be waiting when the signal comes.
    let dir = tempfile::tempdir().unwrap();
    let deploy_dir = dir.path().join("deploy");
    std::fs::create_dir(&deploy_dir).unwrap();
    std::fs::write(
        deploy_dir.join(format!("{SERVICE}.toml")),
        "[timeouts]\nrunning = \"30s\"\nready = \"5m\"\nhealthy = \"20s\"\ndrain = \"20s\"\n\
         terminate = \"30s\"\nlookup = \"2s\"\nunhealthy_grace = \"0s\"\n",
    )
    .unwrap();
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    let child = builder(&moto.endpoint, dir.path())
        .arg("deploy")
        .arg(SERVICE)
        .args(["--ami", &w.new_ami, "--count", "1"])
        .args(["--subnet", &w.subnet])
        .args(["--security-group", &w.security_group])
        .args(["--target-group", &w.tg])
        .args(["--health-url", &health.url])
        .arg("--deploy-dir")
        .arg(&deploy_dir)
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("starting builder");
    let mut child = Running(child);
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    // Step 3: the new instance runs and its health URL has been asked (and said 503).
    let start = Instant::now();
    while health.hits.load(Ordering::SeqCst) < 1 {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "builder exited {status} before step 3 waited:\n{}",
                stderr()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the deploy never reached the health check:\n{}",
            stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = rt.block_on(instances(&ec2));
    let new: Vec<&(String, String, Option<String>)> =
        before.iter().filter(|(id, _, _)| *id != w.old).collect();
    assert_eq!(new.len(), 1, "one new instance booted: {before:?}");
    let (new_id, new_state, new_deploy) = new[0].clone();
    assert_eq!(new_state, "running", "{before:?}");
    let deploy_id = new_deploy.expect("the new instance carries its deploy id");
    let lock = rt
        .block_on(
            ssm.get_parameter()
                .name(format!("/stackless/deploy/{SERVICE}/lock"))
                .send(),
        )
        .expect("the deploy holds its lock while it waits");
    assert!(
        lock.parameter()
            .unwrap()
            .value()
            .unwrap()
            .contains(&deploy_id),
        "{lock:?}"
    );

    // The real signal, to the real process.
    let pid = child.0.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(60),
            "builder did not exit within 60s of SIGINT:\n{}",
            stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rollback_time = signalled.elapsed();
    let err = stderr();
    assert_eq!(
        status.code(),
        Some(1),
        "exit 1, not killed by the signal: {status}\n{err}"
    );
    assert!(
        err.contains("step 3/6 wait until they run and are ready: interrupted (Ctrl-C)"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "rolled back: terminated the new instances {new_id}"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("the old instances {} were not touched", w.old)),
        "{err}"
    );

    // In moto: the new instance is gone, the old one runs and serves.
    let after = rt.block_on(instances(&ec2));
    for (id, state, _) in &after {
        if *id == new_id {
            assert!(
                state == "terminated" || state == "shutting-down",
                "the new instance {id} is {state}"
            );
        } else {
            assert_eq!(*id, w.old, "no other instance: {after:?}");
            assert_eq!(state, "running", "the old instance still runs");
        }
    }
    let targets: Vec<(String, String)> = rt
        .block_on(elb.describe_target_health().target_group_arn(&w.tg).send())
        .unwrap()
        .target_health_descriptions()
        .iter()
        .map(|d| {
            (
                d.target().unwrap().id().unwrap().to_string(),
                d.target_health()
                    .and_then(|h| h.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        targets,
        [(w.old.clone(), "healthy".to_string())],
        "the old instance is still registered and serving, the new one is not"
    );

    // The lock is released.
    let lock = rt.block_on(
        ssm.get_parameter()
            .name(format!("/stackless/deploy/{SERVICE}/lock"))
            .send(),
    );
    match lock {
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_parameter_not_found()) => {}
        other => panic!("the lock is still there: {other:?}"),
    }

    // The history, as `builder deploy web --history --output json` shows it.
    let out = builder(&moto.endpoint, dir.path())
        .args(["deploy", SERVICE, "--history", "--output", "json"])
        .arg("--deploy-dir")
        .arg(&deploy_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = history.as_array().expect("a list of records");
    assert_eq!(records.len(), 1, "{history:#}");
    let r = &records[0];
    assert_eq!(r["deploy_id"], deploy_id.as_str(), "{r:#}");
    assert_eq!(r["outcome"], "rolled-back", "{r:#}");
    assert_eq!(r["image"], w.new_ami.as_str(), "{r:#}");
    assert_eq!(r["instances"], serde_json::json!([new_id]), "{r:#}");
    assert!(
        r["error"]
            .as_str()
            .unwrap_or("")
            .contains("interrupted (Ctrl-C)"),
        "{r:#}"
    );

    eprintln!(
        "deploy_signal: rolled back {:.1}s after SIGINT; {:.1}s in all",
        rollback_time.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
