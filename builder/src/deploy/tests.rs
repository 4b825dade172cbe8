//! Deploys against a real moto_server: EC2 instances, ELBv2 target groups (moto reports registered
//! running instances `healthy` at once, and deregistered ones `unused`), SSM parameters for the
//! lock and the history. What moto fakes (targets that stay `initial` or turn `unhealthy`,
//! draining, throttling, instance refreshes) is in mock_tests.rs.

use super::config::{DeployConfig, DeployFile, ImageRef, Overrides};
use super::history::{Outcome, Record};
use super::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use testkit::Moto;

pub(super) const SERVICE: &str = "web";

pub(super) struct Env {
    pub _moto: Moto,
    pub config: aws_config::SdkConfig,
    pub c: Clients,
    pub tg: String,
    pub subnets: Vec<String>,
    /// Two images to deploy in turn.
    pub ami_a: String,
    pub ami_b: String,
    pub images_dir: tempfile::TempDir,
}

pub(super) async fn env() -> Env {
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let c = Clients::new(&config);
    let w = testkit::DeployWorld::create(&config).await;
    let images_dir = tempfile::tempdir().unwrap();
    Env {
        _moto: moto,
        config,
        c,
        tg: w.target_group,
        subnets: w.subnets,
        ami_a: w.amis[0].clone(),
        ami_b: w.amis[1].clone(),
        images_dir,
    }
}

pub(super) fn opts() -> DeployOptions {
    DeployOptions {
        progress: false,
        poll: Duration::from_millis(20),
        max_poll: Duration::from_millis(100),
    }
}

impl Env {
    pub fn cfg(&self, image: ImageRef, count: u32) -> DeployConfig {
        let mut c = config::merge(
            SERVICE,
            None,
            "",
            DeployFile::default(),
            &Overrides {
                image: Some(image),
                count: Some(count),
                subnets: self.subnets.clone(),
                target_groups: vec![self.tg.clone()],
                ..Default::default()
            },
        )
        .unwrap();
        c.timeouts = config::Timeouts {
            running: Duration::from_secs(20),
            ready: Duration::from_secs(10),
            healthy: Duration::from_secs(10),
            drain: Some(Duration::from_secs(10)),
            terminate: Duration::from_secs(20),
            refresh: Duration::from_secs(10),
            unhealthy_grace: Duration::ZERO,
            lookup: Duration::from_millis(300),
        };
        c
    }

    pub async fn prepare(&self, cfg: &DeployConfig) -> Prepared {
        prepare(&self.c, cfg, self.images_dir.path(), "deploy")
            .await
            .unwrap()
    }

    /// Deploys `ami` with `count` instances on the plain clients; must succeed.
    pub async fn deploy(&self, ami: &str, count: u32) -> Record {
        let p = self
            .prepare(&self.cfg(ImageRef::Ami(ami.into()), count))
            .await;
        deploy_until(&self.c, &p, &opts(), std::future::pending())
            .await
            .unwrap()
    }

    /// Instance id to (state, AMI) for every instance moto knows.
    pub async fn instances(&self) -> BTreeMap<String, (String, String)> {
        let out = self.c.ec2.describe_instances().send().await.unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap().to_string(),
                    (
                        i.state().unwrap().name().unwrap().as_str().to_string(),
                        i.image_id().unwrap().to_string(),
                    ),
                )
            })
            .collect()
    }

    pub async fn running(&self) -> Vec<String> {
        self.instances()
            .await
            .into_iter()
            .filter(|(_, (s, _))| s == "running")
            .map(|(id, _)| id)
            .collect()
    }

    /// Registered targets and their health, as moto has them.
    pub async fn targets(&self) -> BTreeMap<String, String> {
        target_groups::health(&self.c.elb, &self.tg, None)
            .await
            .unwrap()
    }

    pub async fn lock(&self) -> Option<String> {
        lock::read(&self.c.ssm, SERVICE)
            .await
            .unwrap()
            .map(|(raw, _)| raw)
    }

    pub async fn history(&self) -> Vec<Record> {
        history::list(&self.c.ssm, SERVICE).await.unwrap()
    }

    pub async fn tags(&self, id: &str) -> BTreeMap<String, String> {
        let out = self
            .c
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
        out.reservations()[0].instances()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
            .collect()
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A health endpoint on loopback answering `status` to every request.
pub(super) struct HealthServer {
    server: Arc<tiny_http::Server>,
    pub url: String,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
}

impl HealthServer {
    pub fn start(status: u16) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, h) = (server.clone(), hits.clone());
        std::thread::spawn(move || {
            for req in s.incoming_requests() {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ =
                    req.respond(tiny_http::Response::from_string("ok").with_status_code(status));
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

#[tokio::test]
async fn a_clean_deploy_replaces_the_old_instances() {
    let env = env().await;
    let health = HealthServer::start(200);

    // A first deploy: nothing to replace.
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_a.clone()), 2);
    cfg.health_url = Some(health.url.clone());
    let p = env.prepare(&cfg).await;
    assert!(p.old.is_empty());
    let first = deploy_until(&env.c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(first.outcome, Outcome::Succeeded);
    assert_eq!(first.instances.len(), 2);
    assert!(
        health.hits.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the health URL was checked for each"
    );
    assert_eq!(sorted(env.running().await), sorted(first.instances.clone()));
    let tags = env.tags(&first.instances[0]).await;
    assert_eq!(tags[instances::SERVICE], SERVICE);
    assert_eq!(tags[instances::DEPLOY_ID], first.deploy_id);
    assert_eq!(tags[instances::AMI], env.ami_a);
    assert_eq!(tags["Name"], SERVICE);

    // The second replaces them: the new ones registered and healthy, the old ones gone.
    let p = env
        .prepare(&env.cfg(ImageRef::Ami(env.ami_b.clone()), 2))
        .await;
    assert_eq!(sorted(ids(&p.old)), sorted(first.instances.clone()));
    let second = deploy_until(&env.c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(second.outcome, Outcome::Succeeded);
    assert_eq!(
        sorted(second.replaced.clone()),
        sorted(first.instances.clone())
    );
    let all = env.instances().await;
    for id in &first.instances {
        assert_eq!(all[id].0, "terminated", "{id}");
    }
    for id in &second.instances {
        assert_eq!(all[id], ("running".to_string(), env.ami_b.clone()), "{id}");
    }
    let targets = env.targets().await;
    assert_eq!(
        targets,
        second
            .instances
            .iter()
            .map(|id| (id.clone(), "healthy".to_string()))
            .collect::<BTreeMap<_, _>>()
    );
    assert_eq!(env.lock().await, None, "the lock is released");
    let h = env.history().await;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].deploy_id, second.deploy_id, "newest first");
    assert_eq!(h[0].image, env.ami_b);
    assert_eq!(h[0].instances, second.instances);
    assert_eq!(h[1].image, env.ami_a);
    let names: Vec<&str> = h[0].steps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "take the deploy lock",
            "boot the new instances",
            "wait until they run and are ready",
            "register with the target groups",
            "deregister and terminate the old instances"
        ]
    );
}

#[tokio::test]
async fn plan_changes_nothing() {
    let env = env().await;
    let before = env.deploy(&env.ami_a, 1).await;
    let instances = env.instances().await;
    let p = env
        .prepare(&env.cfg(ImageRef::Ami(env.ami_b.clone()), 2))
        .await;
    let text = p.describe();
    assert!(text.contains("plan: nothing is changed"), "{text}");
    assert!(
        text.contains(&format!("2/6 boot 2 t3.micro from {}", env.ami_b)),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "5/6 if the lock is still this deploy's: deregister {}",
            before.instances[0]
        )),
        "{text}"
    );
    assert!(text.contains("lock       free"), "{text}");
    // Nothing changed: no instance, no lock, no record.
    assert_eq!(env.instances().await, instances);
    assert_eq!(env.lock().await, None);
    assert_eq!(env.history().await.len(), 1);
    assert_eq!(env.targets().await.len(), 1);
}

#[tokio::test]
async fn a_second_concurrent_deploy_is_refused() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // Another deploy holds the lock, for another hour.
    let theirs = lock::LockRecord::new("d-other", SystemTime::now(), Duration::from_secs(3600));
    assert_eq!(
        lock::acquire(&env.c.ssm, SERVICE, &theirs, SystemTime::now())
            .await
            .unwrap(),
        lock::Taken::Fresh
    );
    let held = env.lock().await.unwrap();
    let p = env
        .prepare(&env.cfg(ImageRef::Ami(env.ami_b.clone()), 1))
        .await;
    assert!(p.describe().contains("held by deploy d-other"));
    let e = format!(
        "{:#}",
        deploy_until(&env.c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("step 1/6 take the deploy lock")
            && e.contains("another deploy of web is running: deploy d-other"),
        "{e}"
    );
    assert_eq!(env.running().await, old.instances, "nothing booted");
    assert_eq!(env.lock().await, Some(held), "their lock is left alone");
    assert_eq!(
        env.history().await.len(),
        1,
        "a refused deploy is no deploy"
    );
}

#[tokio::test]
async fn a_stale_lock_is_taken_over() {
    let env = env().await;
    let long_ago = SystemTime::now() - Duration::from_secs(7200);
    let stale = lock::LockRecord::new("d-killed", long_ago, Duration::from_secs(3600));
    lock::acquire(&env.c.ssm, SERVICE, &stale, long_ago)
        .await
        .unwrap();
    let record = env.deploy(&env.ami_a, 1).await;
    assert_eq!(record.outcome, Outcome::Succeeded);
    assert_eq!(env.lock().await, None, "taken over, then released");
    assert_eq!(env.running().await, record.instances);
}

#[tokio::test]
async fn rollback_redeploys_the_previous_image() {
    let env = env().await;
    let a = env.deploy(&env.ami_a, 1).await;
    let b = env.deploy(&env.ami_b, 1).await;
    let (current, previous) = rollback_image(&env.c, SERVICE).await.unwrap();
    assert_eq!(current.deploy_id, b.deploy_id);
    assert_eq!(previous.deploy_id, a.deploy_id);
    assert_eq!(previous.image, env.ami_a);

    let p = prepare(
        &env.c,
        &env.cfg(ImageRef::Ami(previous.image.clone()), 1),
        env.images_dir.path(),
        "rollback",
    )
    .await
    .unwrap();
    let back = deploy_until(&env.c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(back.kind, "rollback");
    assert_eq!(back.replaced, b.instances);
    let all = env.instances().await;
    assert_eq!(
        all[&back.instances[0]],
        ("running".to_string(), env.ami_a.clone())
    );
    assert_eq!(all[&b.instances[0]].0, "terminated");
    assert_eq!(env.history().await[0].kind, "rollback");
}

#[tokio::test]
async fn rollback_needs_a_previous_image() {
    let env = env().await;
    let e = rollback_image(&env.c, SERVICE)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no successful deploy of web"), "{e}");
    env.deploy(&env.ami_a, 1).await;
    let e = rollback_image(&env.c, SERVICE)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("only ever been deployed successfully with one image"),
        "{e}"
    );
}

#[tokio::test]
async fn sigint_during_the_wait_rolls_back() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // The new instance never answers 200: the deploy waits in step 3 until the interrupt.
    let health = HealthServer::start(503);
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_b.clone()), 1);
    cfg.health_url = Some(health.url.clone());
    let p = env.prepare(&cfg).await;
    let hits = health.hits.clone();
    let stop = async move {
        while hits.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        "interrupted (Ctrl-C)"
    };
    let e = format!(
        "{:#}",
        deploy_until(&env.c, &p, &opts(), stop).await.unwrap_err()
    );
    assert!(
        e.contains("step 3/6 wait until they run and are ready: interrupted (Ctrl-C)"),
        "{e}"
    );
    assert!(
        e.contains("rolled back: terminated the new instances"),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "the old instances {} were not touched",
            old.instances[0]
        )),
        "{e}"
    );
    let all = env.instances().await;
    let new: Vec<&String> = all
        .keys()
        .filter(|id| !old.instances.contains(id))
        .collect();
    assert_eq!(new.len(), 1);
    assert_eq!(all[new[0]].0, "terminated", "the new instance is gone");
    assert_eq!(env.running().await, old.instances, "the old one still runs");
    assert_eq!(
        env.targets().await,
        BTreeMap::from([(old.instances[0].clone(), "healthy".to_string())]),
        "and still serves"
    );
    assert_eq!(env.lock().await, None);
    let h = env.history().await;
    assert_eq!(h[0].outcome, Outcome::RolledBack);
    assert!(
        h[0].error.as_deref().unwrap_or("").contains("interrupted"),
        "{:?}",
        h[0]
    );
    // A rolled-back deploy never counts as what serves.
    let e = rollback_image(&env.c, SERVICE)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("one image ({})", env.ami_a)), "{e}");
}

#[tokio::test]
async fn an_image_name_resolves_through_its_ssm_parameter_and_user_data_is_checked() {
    let env = env().await;
    std::fs::write(
        env.images_dir.path().join("web.toml"),
        "[source]\nami = \"ami-0123456789abcdef0\"\n[publish]\nssm_parameter = \"/stackless/images/web\"\n[defaults]\ngrains = { role = \"web\" }\n",
    )
    .unwrap();
    env.c
        .ssm
        .put_parameter()
        .name("/stackless/images/web")
        .value(&env.ami_b)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let ud = env.images_dir.path().join("user-data.toml");
    std::fs::write(&ud, "minion_id = \"web-{instance_id}\"\n").unwrap();
    let mut cfg = env.cfg(ImageRef::Definition("web".into()), 1);
    cfg.user_data = Some(ud.clone());
    let p = env.prepare(&cfg).await;
    assert_eq!(p.ami, env.ami_b);
    assert_eq!(p.image_ref, "image web via /stackless/images/web");
    assert_eq!(
        p.user_data.as_ref().unwrap().minion_id,
        "web-i-0123456789abcdef0"
    );
    let r = deploy_until(&env.c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(
        env.tags(&r.instances[0]).await[crate::platform::aws::tags::IMAGE],
        "web"
    );

    // A bad placeholder stops the deploy before anything is made.
    std::fs::write(&ud, "minion_id = \"web-{hostname}\"\n").unwrap();
    let e = format!(
        "{:#}",
        prepare(&env.c, &cfg, env.images_dir.path(), "deploy")
            .await
            .unwrap_err()
    );
    assert!(e.contains("user-data.toml:1:"), "{e}");
}

#[tokio::test]
async fn fewer_instances_than_now_healthy_are_refused() {
    let env = env().await;
    env.deploy(&env.ami_a, 2).await;
    let e = format!(
        "{:#}",
        prepare(
            &env.c,
            &env.cfg(ImageRef::Ami(env.ami_b.clone()), 1),
            env.images_dir.path(),
            "deploy"
        )
        .await
        .unwrap_err()
    );
    assert!(
        e.contains("2 instances of web are healthy") && e.contains("--count 2"),
        "{e}"
    );
}

#[tokio::test]
async fn what_a_killed_deploy_registered_is_replaced_not_counted() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // A deploy killed (SIGKILL) in step 4: its instance booted and registered, its lock expired.
    let killed = "d-killed";
    let no_tags = BTreeMap::new();
    let launch = instances::Launch {
        service: SERVICE,
        deploy_id: killed,
        ami: &env.ami_b,
        image_name: None,
        count: 1,
        instance_type: "t3.micro",
        subnets: &env.subnets,
        security_groups: &[],
        instance_profile: None,
        user_data: None,
        extra_tags: &no_tags,
    };
    let left = instances::launch(&env.c.ec2, &launch).await.unwrap();
    target_groups::register(&env.c.elb, &env.tg, &left)
        .await
        .unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(7200);
    let stale = lock::LockRecord::new(killed, long_ago, Duration::from_secs(3600));
    lock::acquire(&env.c.ssm, SERVICE, &stale, long_ago)
        .await
        .unwrap();
    assert_eq!(env.targets().await.len(), 2, "both serve");

    // The same deploy again, with the same count: the killed one's instance is no capacity to keep.
    let next = env.deploy(&env.ami_b, 1).await;
    assert_eq!(next.outcome, Outcome::Succeeded);
    assert_eq!(
        sorted(next.replaced.clone()),
        sorted([old.instances, left].concat())
    );
    assert_eq!(env.running().await, next.instances);
    assert_eq!(
        env.targets().await.into_keys().collect::<Vec<_>>(),
        next.instances
    );
    assert_eq!(env.lock().await, None);
}

#[test]
fn deploy_ids_sort_by_time() {
    let a = new_deploy_id();
    std::thread::sleep(Duration::from_millis(3));
    let b = new_deploy_id();
    assert!(a < b, "{a} {b}");
    assert!(
        a.starts_with("d-") && a.len() == "d-20260101000000000-abcdef".len(),
        "{a}"
    );
}

#[test]
fn the_example_deploy_file_and_its_user_data_are_valid() {
    let root = testkit::repo_root();
    let c = config::load(&root.join("deploy"), "web", &Overrides::default()).unwrap();
    assert_eq!(c.image, ImageRef::Definition("preseeded".into()));
    assert_eq!(c.count, 2);
    let ud = c.user_data.clone().unwrap();
    assert!(ud.ends_with("deploy/web-user-data.toml"), "{ud:?}");
    let def = crate::definition::load(&root.join("images"), "preseeded").unwrap();
    let p = crate::user_data::prepare(&ud, &def.defaults_document()).unwrap();
    assert!(p.minion_id.starts_with("web-i-"), "{}", p.minion_id);
}

#[tokio::test]
async fn a_lock_lifetime_below_the_deadlines_is_refused() {
    let env = env().await;
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_a.clone()), 1);
    // running 20s + ready 10s + healthy 10s + lookup 300ms + drain 10s + terminate 20s.
    cfg.lock_ttl = Some(Duration::from_secs(30));
    let e = format!(
        "{:#}",
        prepare(&env.c, &cfg, env.images_dir.path(), "deploy")
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("lifetime 30s")
            && e.contains("step deadlines 1m 11s")
            && e.contains("lookup 300ms"),
        "{e}"
    );
    cfg.lock_ttl = Some(Duration::from_secs(71));
    let p = env.prepare(&cfg).await;
    assert_eq!(p.lock_ttl, Duration::from_secs(71));
}
