//! What moto fakes, faked precisely with aws-smithy-mocks: moto reports every registered running
//! instance `healthy` at once and every deregistered one gone at once, and has no instance
//! refreshes (StartInstanceRefresh is not implemented in moto 5.2). The mocked clients sit in front
//! of the same moto (`allow_passthrough`): only the calls a rule matches are answered by the rule,
//! everything else (RunInstances, RegisterTargets, the SSM lock and history ...) reaches moto, so
//! the tests still assert real outcomes there.

use super::config::{AsgConfig, ImageRef};
use super::history::{Outcome, Record};
use super::tests::{env, opts, Env, SERVICE};
use super::*;
use aws_sdk_autoscaling::operation::describe_instance_refreshes::DescribeInstanceRefreshesOutput;
use aws_sdk_autoscaling::operation::start_instance_refresh::StartInstanceRefreshOutput;
use aws_sdk_autoscaling::types::{InstanceRefresh, InstanceRefreshStatus};
use aws_sdk_elasticloadbalancingv2::error::ErrorMetadata;
use aws_sdk_elasticloadbalancingv2::operation::describe_target_health::{
    DescribeTargetHealthError, DescribeTargetHealthOutput,
};
use aws_sdk_elasticloadbalancingv2::types::{
    TargetDescription, TargetHealth, TargetHealthDescription, TargetHealthReasonEnum,
    TargetHealthStateEnum,
};
use aws_sdk_elasticloadbalancingv2::Client as Elb;
use aws_smithy_mocks::{mock, MockResponseInterceptor, Rule, RuleMode};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn interceptor(rules: &[&Rule]) -> MockResponseInterceptor {
    let mut i = MockResponseInterceptor::new()
        .rule_mode(RuleMode::MatchAny)
        .allow_passthrough();
    for r in rules {
        i = i.with_rule(r);
    }
    i
}

/// The deploy's clients with ELBv2 answered by `rules` first, moto otherwise.
fn with_elb(env: &Env, rules: &[&Rule]) -> Clients {
    let conf = aws_sdk_elasticloadbalancingv2::config::Builder::from(&env.config)
        .interceptor(interceptor(rules))
        .build();
    Clients {
        elb: Elb::from_conf(conf),
        ..env.c.clone()
    }
}

/// The deploy's clients with SSM answered by `rules` first, moto otherwise.
fn with_ssm(env: &Env, rules: &[&Rule]) -> Clients {
    let conf = aws_sdk_ssm::config::Builder::from(&env.config)
        .interceptor(interceptor(rules))
        .build();
    Clients {
        ssm: aws_sdk_ssm::Client::from_conf(conf),
        ..env.c.clone()
    }
}

/// The deploy's clients with EC2 answered by `rules` first, moto otherwise.
fn with_ec2(env: &Env, rules: &[&Rule]) -> Clients {
    let conf = aws_sdk_ec2::config::Builder::from(&env.config)
        .interceptor(interceptor(rules))
        .build();
    Clients {
        ec2: aws_sdk_ec2::Client::from_conf(conf),
        ..env.c.clone()
    }
}

fn with_asg(env: &Env, rules: &[&Rule]) -> Clients {
    let conf = aws_sdk_autoscaling::config::Builder::from(&env.config)
        .interceptor(interceptor(rules))
        .build();
    Clients {
        asg: aws_sdk_autoscaling::Client::from_conf(conf),
        ..env.c.clone()
    }
}

fn ids_of(targets: &[TargetDescription]) -> Vec<String> {
    targets
        .iter()
        .filter_map(|t| t.id())
        .map(str::to_string)
        .collect()
}

fn health_output(
    targets: &[TargetDescription],
    state: TargetHealthStateEnum,
    reason: Option<TargetHealthReasonEnum>,
) -> DescribeTargetHealthOutput {
    DescribeTargetHealthOutput::builder()
        .set_target_health_descriptions(Some(
            targets
                .iter()
                .map(|t| {
                    TargetHealthDescription::builder()
                        .target(t.clone())
                        .target_health(
                            TargetHealth::builder()
                                .state(state.clone())
                                .set_reason(reason.clone())
                                .build(),
                        )
                        .build()
                })
                .collect(),
        ))
        .build()
}

/// A load balancer whose new targets (any not in `old`) report `state` until they are
/// deregistered; then moto answers (gone). Old targets are moto's (healthy).
fn new_targets_stay(
    old: &[String],
    state: TargetHealthStateEnum,
    reason: Option<TargetHealthReasonEnum>,
) -> (Rule, Rule) {
    let deregistered = Arc::new(Mutex::new(HashSet::<String>::new()));
    let d = deregistered.clone();
    // Never matches: notes what was deregistered and lets moto do it.
    let watch = mock!(Elb::deregister_targets)
        .match_requests(move |r| {
            d.lock().unwrap().extend(ids_of(r.targets()));
            false
        })
        .then_output(|| unreachable!());
    let old: HashSet<String> = old.iter().cloned().collect();
    let health = mock!(Elb::describe_target_health)
        .match_requests(move |r| {
            let gone = deregistered.lock().unwrap();
            ids_of(r.targets())
                .iter()
                .any(|id| !old.contains(id) && !gone.contains(id))
        })
        .then_compute_output(move |r| health_output(r.targets(), state.clone(), reason.clone()));
    (watch, health)
}

async fn assert_rolled_back(env: &Env, old: &Record, e: &str) {
    assert!(
        e.contains("rolled back: deregistered and terminated the new instances"),
        "{e}"
    );
    let all = env.instances().await;
    for (id, (state, _)) in &all {
        if old.instances.contains(id) {
            assert_eq!(state, "running", "old {id} untouched");
        } else {
            assert_eq!(state, "terminated", "new {id} removed");
        }
    }
    assert_eq!(
        env.targets().await,
        old.instances
            .iter()
            .map(|id| (id.clone(), "healthy".to_string()))
            .collect::<BTreeMap<_, _>>(),
        "the old instances still serve, and only they are registered"
    );
    assert_eq!(env.lock().await, None, "the lock is released");
    let h = env.history().await;
    assert_eq!(h[0].outcome, Outcome::RolledBack);
    assert!(
        h[0].error.as_deref().unwrap_or("").contains("step 4/6"),
        "{:?}",
        h[0]
    );
}

#[tokio::test]
async fn an_unhealthy_new_instance_rolls_back_with_the_old_ones_untouched() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 2).await;
    let (watch, health) = new_targets_stay(
        &old.instances,
        TargetHealthStateEnum::Unhealthy,
        Some(TargetHealthReasonEnum::ResponseCodeMismatch),
    );
    let c = with_elb(&env, &[&watch, &health]);
    let p = env
        .prepare(&env.cfg(ImageRef::Ami(env.ami_b.clone()), 2))
        .await;
    let e = format!(
        "{:#}",
        deploy_until(&c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("step 4/6 register with the target groups")
            && e.contains("is unhealthy")
            && e.contains("Target.ResponseCodeMismatch"),
        "{e}"
    );
    assert!(health.num_calls() >= 1);
    assert_rolled_back(&env, &old, &e).await;
}

#[tokio::test]
async fn unhealthy_then_healthy_within_the_grace_succeeds() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // The new target is unhealthy for its first three looks (a first boot still applying its
    // state), then moto answers: healthy.
    let o = old.instances.clone();
    let looks = std::sync::atomic::AtomicUsize::new(0);
    let unhealthy = mock!(Elb::describe_target_health)
        .match_requests(move |r| {
            ids_of(r.targets()).iter().any(|id| !o.contains(id))
                && looks.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3
        })
        .then_compute_output(|r| {
            health_output(
                r.targets(),
                TargetHealthStateEnum::Unhealthy,
                Some(TargetHealthReasonEnum::FailedHealthChecks),
            )
        });
    let c = with_elb(&env, &[&unhealthy]);
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_b.clone()), 1);
    cfg.timeouts.unhealthy_grace = Duration::from_secs(10);
    let p = env.prepare(&cfg).await;
    let r = deploy_until(&c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(unhealthy.num_calls(), 3, "tolerated three unhealthy looks");
    assert_eq!(r.replaced, old.instances);
    assert_eq!(env.running().await, r.instances);
}

#[tokio::test]
async fn targets_that_stay_initial_hit_the_deadline_and_roll_back() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    let (watch, health) = new_targets_stay(
        &old.instances,
        TargetHealthStateEnum::Initial,
        Some(TargetHealthReasonEnum::InitialHealthChecking),
    );
    let c = with_elb(&env, &[&watch, &health]);
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_b.clone()), 1);
    cfg.timeouts.healthy = Duration::from_millis(500);
    let p = env.prepare(&cfg).await;
    let e = format!(
        "{:#}",
        deploy_until(&c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("timed out") && e.contains("initial (Elb.InitialHealthChecking)"),
        "{e}"
    );
    assert!(health.num_calls() >= 2, "looked more than once");
    assert_rolled_back(&env, &old, &e).await;
}

#[tokio::test]
async fn throttled_health_reads_are_retried() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // Two throttled answers, then the rule is spent and moto answers.
    let throttled = mock!(Elb::describe_target_health)
        .match_requests(|r| !r.targets().is_empty())
        .sequence()
        .error(|| {
            DescribeTargetHealthError::generic(
                ErrorMetadata::builder()
                    .code("Throttling")
                    .message("Rate exceeded")
                    .build(),
            )
        })
        .times(2)
        .build();
    let c = with_elb(&env, &[&throttled]);
    let p = env
        .prepare(&env.cfg(ImageRef::Ami(env.ami_b.clone()), 1))
        .await;
    let r = deploy_until(&c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(throttled.num_calls(), 2);
    assert_eq!(r.replaced, old.instances);
    assert_eq!(env.running().await, r.instances);
}

#[tokio::test]
async fn old_targets_are_terminated_only_after_draining() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // The old target drains for three looks after its deregistration; the instance must still
    // run all that time.
    let deregistered = Arc::new(Mutex::new(false));
    let d = deregistered.clone();
    let old_id = old.instances[0].clone();
    let o = old_id.clone();
    let watch = mock!(Elb::deregister_targets)
        .match_requests(move |r| {
            if ids_of(r.targets()).contains(&o) {
                *d.lock().unwrap() = true;
            }
            false
        })
        .then_output(|| unreachable!());
    let seen_running = Arc::new(Mutex::new(Vec::new()));
    let (o, dd) = (old_id.clone(), deregistered.clone());
    let looks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let l = looks.clone();
    let drained_at = Arc::new(Mutex::new(None));
    let da = drained_at.clone();
    let draining = mock!(Elb::describe_target_health)
        .match_requests(move |r| {
            let draining = *dd.lock().unwrap()
                && ids_of(r.targets()).contains(&o)
                && l.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3;
            if draining {
                *da.lock().unwrap() = Some(Instant::now());
            }
            draining
        })
        .then_compute_output(|r| {
            health_output(
                r.targets(),
                TargetHealthStateEnum::Draining,
                Some(TargetHealthReasonEnum::DeregistrationInProgress),
            )
        });
    let c = with_elb(&env, &[&watch, &draining]);
    let p = env
        .prepare(&env.cfg(ImageRef::Ami(env.ami_b.clone()), 1))
        .await;
    let ec2 = env.c.ec2.clone();
    let (s, o) = (seen_running.clone(), old_id.clone());
    let watcher = tokio::spawn(async move {
        loop {
            let out = ec2
                .describe_instances()
                .instance_ids(&o)
                .send()
                .await
                .unwrap();
            let state = out.reservations()[0].instances()[0]
                .state()
                .unwrap()
                .name()
                .unwrap()
                .as_str()
                .to_string();
            s.lock().unwrap().push((Instant::now(), state));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let r = deploy_until(&c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    watcher.abort();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(draining.num_calls(), 3, "waited through the draining");
    assert_eq!(env.instances().await[&old_id].0, "terminated");
    let drain_ms = r
        .steps
        .iter()
        .find(|(n, _)| n == "deregister and terminate the old instances")
        .unwrap()
        .1;
    assert!(
        drain_ms >= 20,
        "three looks at 20 ms and more: {drain_ms} ms"
    );
    // The instance ran until the last draining look, and was terminated only after it.
    let drained = (*drained_at.lock().unwrap()).expect("the last draining look");
    let seen = seen_running.lock().unwrap().clone();
    let before: Vec<&String> = seen
        .iter()
        .filter(|(t, _)| *t < drained)
        .map(|(_, s)| s)
        .collect();
    assert!(!before.is_empty(), "watched while it drained");
    assert!(
        before.iter().all(|s| *s == "running"),
        "terminated before draining finished: {seen:?}"
    );
}

async fn asg_env(env: &Env) -> String {
    let lt = env
        .c
        .ec2
        .create_launch_template()
        .launch_template_name("web")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(&env.ami_a)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let lt_id = lt
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    env.c
        .asg
        .create_auto_scaling_group()
        .auto_scaling_group_name("web-asg")
        .launch_template(
            aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                .launch_template_id(&lt_id)
                .version("$Latest")
                .build(),
        )
        .min_size(1)
        .max_size(4)
        .desired_capacity(2)
        .vpc_zone_identifier(env.subnets.join(","))
        .send()
        .await
        .unwrap();
    lt_id
}

fn asg_cfg(env: &Env) -> config::DeployConfig {
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_b.clone()), 1);
    cfg.target_groups.clear();
    cfg.asg = Some(AsgConfig {
        name: "web-asg".into(),
        min_healthy_percentage: Some(90),
        max_healthy_percentage: Some(120),
        checkpoint_percentages: vec![50, 100],
        checkpoint_delay: Some(Duration::from_secs(60)),
        instance_warmup: None,
        auto_rollback: true,
    });
    cfg
}

fn refresh(
    status: InstanceRefreshStatus,
    percent: i32,
    reason: &str,
) -> DescribeInstanceRefreshesOutput {
    DescribeInstanceRefreshesOutput::builder()
        .instance_refreshes(
            InstanceRefresh::builder()
                .instance_refresh_id("r-1")
                .auto_scaling_group_name("web-asg")
                .status(status)
                .percentage_complete(percent)
                .status_reason(reason)
                .build(),
        )
        .build()
}

/// StartInstanceRefresh answered by a rule that keeps the request for the test to look at.
fn start_rule(seen: Arc<Mutex<Option<String>>>) -> Rule {
    mock!(aws_sdk_autoscaling::Client::start_instance_refresh)
        .match_requests(move |r| {
            *seen.lock().unwrap() = Some(format!("{r:?}"));
            true
        })
        .then_output(|| {
            StartInstanceRefreshOutput::builder()
                .instance_refresh_id("r-1")
                .build()
        })
}

#[tokio::test]
async fn an_asg_deploy_adds_a_launch_template_version_and_follows_the_refresh() {
    let env = env().await;
    let lt_id = asg_env(&env).await;
    let seen = Arc::new(Mutex::new(None));
    let start = start_rule(seen.clone());
    let follow = mock!(aws_sdk_autoscaling::Client::describe_instance_refreshes)
        .sequence()
        .output(|| refresh(InstanceRefreshStatus::Pending, 0, ""))
        .output(|| {
            refresh(
                InstanceRefreshStatus::InProgress,
                50,
                "Waiting for checkpoint",
            )
        })
        .output(|| refresh(InstanceRefreshStatus::Successful, 100, ""))
        .build();
    let c = with_asg(&env, &[&start, &follow]);
    let cfg = asg_cfg(&env);
    let p = prepare(&c, &cfg, env.images_dir.path(), "asg")
        .await
        .unwrap();
    let plan = p.describe();
    assert!(
        plan.contains(
            "start an instance refresh of web-asg: min healthy 90%, checkpoints [50, 100]"
        ),
        "{plan}"
    );
    let r = deploy_until(&c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert_eq!(r.kind, "asg");
    assert_eq!(follow.num_calls(), 3, "followed to the end");

    // The new launch template version boots the new image, from the group's version.
    let versions = env
        .c
        .ec2
        .describe_launch_template_versions()
        .launch_template_id(&lt_id)
        .versions("2")
        .send()
        .await
        .unwrap();
    let v = &versions.launch_template_versions()[0];
    assert_eq!(
        v.launch_template_data().unwrap().image_id(),
        Some(env.ami_b.as_str())
    );
    // (EC2 copies the rest from SourceVersion; moto 5.2 ignores SourceVersion, so the instance
    // type of version 1 cannot be checked here.)
    assert!(v.version_description().unwrap().contains(&p.deploy_id));
    let sent = seen.lock().unwrap().clone().unwrap();
    for want in [
        "min_healthy_percentage: Some(90)",
        "max_healthy_percentage: Some(120)",
        "checkpoint_percentages: Some([50, 100])",
        "checkpoint_delay: Some(60)",
        "auto_rollback: Some(true)",
        "skip_matching: Some(true)",
        "version: Some(\"2\")",
    ] {
        assert!(sent.contains(want), "{want} in {sent}");
    }
    assert_eq!(env.lock().await, None);
    let h = env.history().await;
    assert_eq!(h[0].kind, "asg");
    assert!(
        h[0].asg
            .as_deref()
            .unwrap()
            .contains("version 2 refresh r-1"),
        "{:?}",
        h[0]
    );
}

#[tokio::test]
async fn a_failing_instance_refresh_is_reported_and_recorded() {
    let env = env().await;
    asg_env(&env).await;
    let start = start_rule(Arc::new(Mutex::new(None)));
    let follow = mock!(aws_sdk_autoscaling::Client::describe_instance_refreshes)
        .sequence()
        .output(|| refresh(InstanceRefreshStatus::InProgress, 30, ""))
        .output(|| {
            refresh(
                InstanceRefreshStatus::RollbackInProgress,
                30,
                "instances failed their health checks",
            )
        })
        .output(|| {
            refresh(
                InstanceRefreshStatus::RollbackSuccessful,
                100,
                "instances failed their health checks",
            )
        })
        .build();
    let c = with_asg(&env, &[&start, &follow]);
    let p = prepare(&c, &asg_cfg(&env), env.images_dir.path(), "asg")
        .await
        .unwrap();
    let e = format!(
        "{:#}",
        deploy_until(&c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("step 4/5 follow the instance refresh")
            && e.contains("ended RollbackSuccessful: instances failed their health checks"),
        "{e}"
    );
    assert_eq!(env.lock().await, None);
    let h = env.history().await;
    assert_eq!(h[0].outcome, Outcome::RolledBack);
    assert!(
        rollback_image(&env.c, SERVICE).await.is_err(),
        "a failed refresh never counts as what serves"
    );
}

#[tokio::test]
async fn a_lock_lost_before_the_switch_leaves_every_instance_serving() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // The deploy creates its lock (moto), but every read of it finds another deploy's: as if it
    // had outlived its lock and another deploy had taken it over.
    let other = lock::LockRecord::new("d-other", SystemTime::now(), Duration::from_secs(3600));
    let json = serde_json::to_string(&other).unwrap();
    let read = mock!(aws_sdk_ssm::Client::get_parameter)
        .match_requests(|r| r.name() == Some(lock::parameter(SERVICE).as_str()))
        .then_output(move || {
            aws_sdk_ssm::operation::get_parameter::GetParameterOutput::builder()
                .parameter(
                    aws_sdk_ssm::types::Parameter::builder()
                        .name(lock::parameter(SERVICE))
                        .value(json.clone())
                        .build(),
                )
                .build()
        });
    let c = with_ssm(&env, &[&read]);
    let p = env
        .prepare(&env.cfg(ImageRef::Ami(env.ami_b.clone()), 1))
        .await;
    let e = format!(
        "{:#}",
        deploy_until(&c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("is no longer deploy")
            && e.contains("d-other")
            && e.contains("step 5 was not run"),
        "{e}"
    );
    let running = env.running().await;
    assert!(
        running.contains(&old.instances[0]),
        "old untouched: {running:?}"
    );
    assert_eq!(running.len(), 2, "the new one serves too: {running:?}");
    let h = env.history().await;
    assert_eq!(h[0].outcome, Outcome::SucceededWithErrors);
    assert!(h[0].replaced.is_empty());
    assert!(h[0]
        .error
        .as_deref()
        .unwrap()
        .contains("step 5 was not run"));
    assert_eq!(env.targets().await.len(), 2, "both registered");
}

fn console(
    outcome: &str,
    error: Option<&str>,
) -> aws_sdk_ec2::operation::get_console_output::GetConsoleOutputOutput {
    use base64::Engine;
    let result = serde_json::json!({ "outcome": outcome, "error": error, "total_ms": 4312 });
    let text = format!(
        "[    4.2] cloud-init: skipped\r\nstackless-init: boot {outcome} in 4312 ms\r\n{esc}[0mstackless-init-result: {result}\r\n",
        esc = '\u{1b}'
    );
    aws_sdk_ec2::operation::get_console_output::GetConsoleOutputOutput::builder()
        .output(base64::engine::general_purpose::STANDARD.encode(text))
        .build()
}

#[tokio::test]
async fn ready_agent_waits_for_the_agents_result_on_the_console() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // Nothing on the console at first, then the agent's result.
    let out = mock!(aws_sdk_ec2::Client::get_console_output)
        .match_requests(|r| r.latest() == Some(true))
        .sequence()
        .output(|| {
            aws_sdk_ec2::operation::get_console_output::GetConsoleOutputOutput::builder().build()
        })
        .output(|| console("ready", None))
        .repeatedly()
        .build();
    let c = with_ec2(&env, &[&out]);
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_b.clone()), 1);
    cfg.ready = config::ReadyMode::Agent;
    let p = env.prepare(&cfg).await;
    assert!(
        p.describe().contains("the agent reports ready"),
        "{}",
        p.describe()
    );
    let r = deploy_until(&c, &p, &opts(), std::future::pending())
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    assert!(out.num_calls() >= 2, "looked until the result came");
    assert_eq!(r.replaced, old.instances);
}

#[tokio::test]
async fn an_agent_that_reports_failed_rolls_back_in_step_3() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    let out = mock!(aws_sdk_ec2::Client::get_console_output)
        .then_output(|| console("failed", Some("user-data:3:5: unknown key `colour`")));
    let c = with_ec2(&env, &[&out]);
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_b.clone()), 1);
    cfg.ready = config::ReadyMode::Agent;
    let p = env.prepare(&cfg).await;
    let e = format!(
        "{:#}",
        deploy_until(&c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("step 3/6 wait until they run and are ready")
            && e.contains(": the agent reported failed: user-data:3:5: unknown key `colour`")
            && e.contains("instance i-")
            && e.contains("rolled back: terminated the new instances"),
        "{e}"
    );
    let running = env.running().await;
    assert_eq!(running, old.instances, "only the old one runs");
    let h = env.history().await;
    assert_eq!(h[0].outcome, Outcome::RolledBack);
    assert_eq!(env.lock().await, None);
}

#[tokio::test]
async fn a_rollback_after_a_cut_short_boot_keeps_looking_for_its_instances() {
    let env = env().await;
    let old = env.deploy(&env.ami_a, 1).await;
    // Two subnets: the first RunInstances boots (moto), the second fails, so the deploy never
    // learns the first one's id. The tag lookup finds nothing twice (eventual consistency).
    let second = env.subnets[1].clone();
    let boot = mock!(aws_sdk_ec2::Client::run_instances)
        .match_requests(move |r| r.subnet_id() == Some(second.as_str()))
        .then_error(|| {
            aws_sdk_ec2::operation::run_instances::RunInstancesError::generic(
                aws_sdk_ec2::error::ErrorMetadata::builder()
                    .code("InsufficientInstanceCapacity")
                    .message("no capacity")
                    .build(),
            )
        });
    let unseen = mock!(aws_sdk_ec2::Client::describe_instances)
        .match_requests(|r| {
            r.filters()
                .iter()
                .any(|f| f.name() == Some(&format!("tag:{}", instances::DEPLOY_ID)))
        })
        .sequence()
        .output(|| {
            aws_sdk_ec2::operation::describe_instances::DescribeInstancesOutput::builder().build()
        })
        .times(2)
        .build();
    let c = with_ec2(&env, &[&boot, &unseen]);
    let mut cfg = env.cfg(ImageRef::Ami(env.ami_b.clone()), 2);
    cfg.timeouts.lookup = Duration::from_secs(5);
    let p = env.prepare(&cfg).await;
    let e = format!(
        "{:#}",
        deploy_until(&c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("step 2/6 boot the new instances")
            && e.contains("rolled back: terminated the new instances i-"),
        "{e}"
    );
    assert_eq!(unseen.num_calls(), 2, "looked again after finding nothing");
    assert_eq!(
        env.running().await,
        old.instances,
        "the booted one was found and removed"
    );
}

#[tokio::test]
async fn a_failed_refresh_without_auto_rollback_is_recorded_failed() {
    let env = env().await;
    asg_env(&env).await;
    let start = start_rule(Arc::new(Mutex::new(None)));
    let follow = mock!(aws_sdk_autoscaling::Client::describe_instance_refreshes)
        .sequence()
        .output(|| refresh(InstanceRefreshStatus::InProgress, 50, ""))
        .output(|| {
            refresh(
                InstanceRefreshStatus::Failed,
                50,
                "instances failed their health checks",
            )
        })
        .build();
    let c = with_asg(&env, &[&start, &follow]);
    let mut cfg = asg_cfg(&env);
    cfg.asg.as_mut().unwrap().auto_rollback = false;
    let p = prepare(&c, &cfg, env.images_dir.path(), "asg")
        .await
        .unwrap();
    let e = format!(
        "{:#}",
        deploy_until(&c, &p, &opts(), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("ended Failed") && e.contains("may run the new image"),
        "{e}"
    );
    let h = env.history().await;
    assert_eq!(h[0].outcome, Outcome::Failed, "half the group may run it");
}
