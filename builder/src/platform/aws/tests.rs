//! The AWS target against real parts: a moto_server for EC2 (and SSM parameters), and the SSM
//! shim in front of it that really runs what the builder sends (see testing/ssm_shim.rs).

use super::*;
use crate::aws::tag_spec;
use crate::communicator::run_checked;
use crate::communicator::ssm;
use crate::definition;
use crate::render::StagedFile;
use crate::transfer;
use aws_sdk_ec2::types::{Filter, ResourceType, Tag};
use aws_sdk_ec2::types::{HttpTokensState, InstanceAttributeName};
use base64::Engine;
use testkit::ssm_shim::{create_instance_profile, ShimOptions, SsmShim};
use testkit::Moto;

const PROFILE: &str = "stackless-test-builder";

struct Env {
    // Dropped in this order: the shim first (it forwards to moto).
    shim: SsmShim,
    _moto: Moto,
    config: aws_config::SdkConfig,
    ec2: aws_sdk_ec2::Client,
    _defs: tempfile::TempDir,
    def: ImageDef,
}

async fn env(shim: ShimOptions) -> Env {
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let shim = SsmShim::start(&moto.endpoint, shim);
    create_instance_profile(&moto.endpoint, PROFILE);
    let defs = tempfile::tempdir().unwrap();
    std::fs::write(
        defs.path().join("seedtest.toml"),
        format!(
            r#"name = "stackless-seedtest-{{timestamp}}"
[source]
owner = "amazon"
name = "al2023-ami-2023.*-kernel-6.12-x86_64"
[instance]
type = "t3.micro"
instance_profile = "{PROFILE}"
volume_size = 12
volume_type = "gp3"
lease_minutes = 45
[tags]
team = "platform"
"#
        ),
    )
    .unwrap();
    let def = definition::load(defs.path(), "seedtest").unwrap();
    let ec2 = aws_sdk_ec2::Client::new(&config);
    Env {
        shim,
        _moto: moto,
        config,
        ec2,
        _defs: defs,
        def,
    }
}

/// The seed's user-data as a bake renders it.
fn seed_user_data(def: &crate::definition::ImageDef) -> String {
    crate::render::render(
        def,
        &crate::render::RenderInputs {
            templates: None,
            init_binary: b"x",
            bootstrap: None,
            build_id: "b-test",
            build_ca: false,
        },
    )
    .unwrap()
    .seed_user_data
}

fn opts() -> AwsOptions {
    AwsOptions {
        ssm_wait: Duration::from_secs(20),
        command_poll: Duration::from_millis(50),
        console_poll: Duration::from_millis(50),
        instance_wait: Duration::from_secs(30),
        delete_wait: Duration::from_secs(10),
        progress: false,
    }
}

impl Env {
    fn target(&self, opts: AwsOptions) -> AwsTarget {
        AwsTarget::new(self.config.clone(), opts).with_ssm_client(self.shim.client(&self.config))
    }

    async fn build(&self, target: &mut AwsTarget, id: &str) -> Build {
        let source = target.resolve_source(&self.def).await.unwrap();
        Build {
            id: id.into(),
            timestamp: "20240102030405".into(),
            image_name: self.def.image_name(id, "20240102030405"),
            input_hash: "0".repeat(64),
            source: source.id,
            arch: source.arch,
            seed_user_data: seed_user_data(&self.def),
        }
    }

    async fn instance(&self, id: &str) -> aws_sdk_ec2::types::Instance {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
        out.reservations()[0].instances()[0].clone()
    }

    async fn state(&self, id: &str) -> String {
        self.instance(id)
            .await
            .state()
            .unwrap()
            .name()
            .unwrap()
            .as_str()
            .to_string()
    }

    async fn group_exists(&self, id: &str) -> bool {
        let out = self
            .ec2
            .describe_security_groups()
            .filters(Filter::builder().name("group-id").values(id).build())
            .send()
            .await
            .unwrap();
        !out.security_groups().is_empty()
    }
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect()
}

fn assert_temporary_tags(tags: &BTreeMap<String, String>, build: &str, what: &str) {
    assert_eq!(
        tags.get(super::tags::BUILD_ID).map(String::as_str),
        Some(build),
        "{what}: {tags:?}"
    );
    assert_eq!(
        tags.get(super::tags::IMAGE).map(String::as_str),
        Some("seedtest"),
        "{what}"
    );
    assert_eq!(
        tags.get(super::tags::TEMPORARY).map(String::as_str),
        Some("true"),
        "{what}"
    );
    assert_eq!(
        tags.get(super::tags::MANAGED_BY).map(String::as_str),
        Some(super::tags::MANAGED_BY_VALUE),
        "{what}"
    );
    assert_eq!(
        tags.get("Name").map(String::as_str),
        Some(format!("stackless-build seedtest {build}").as_str()),
        "{what}"
    );
    assert_eq!(
        tags.get("team").map(String::as_str),
        Some("platform"),
        "{what}: the definition's tags too"
    );
    let expires = humantime::parse_rfc3339(&tags[super::tags::EXPIRES_AT]).unwrap();
    let ahead = expires.duration_since(SystemTime::now()).unwrap();
    assert!(
        ahead > Duration::from_secs(40 * 60) && ahead <= Duration::from_secs(45 * 60),
        "{what}: the lease is 45 minutes: {ahead:?}"
    );
}

#[tokio::test]
async fn start_launches_a_locked_down_seed_reachable_over_ssm_and_cleanup_removes_it() {
    let env = env(ShimOptions {
        online_after: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let mut target = env.target(opts());
    let build = env.build(&mut target, "b-20240102030405-aaaaaa").await;
    let comm = target.start(&env.def, &build).await.unwrap();

    let id = target.created().instance.clone().unwrap();
    let group = target.created().security_group.clone().unwrap();
    assert_eq!(comm.describe(), format!("{id} over SSM"));

    // The seed as EC2 has it.
    let inst = env.instance(&id).await;
    assert_eq!(
        inst.state().unwrap().name(),
        Some(&InstanceStateName::Running)
    );
    assert_eq!(
        inst.metadata_options().unwrap().http_tokens(),
        Some(&HttpTokensState::Required),
        "IMDSv2 only"
    );
    assert!(inst
        .iam_instance_profile()
        .unwrap()
        .arn()
        .unwrap()
        .ends_with(&format!("/{PROFILE}")));
    assert_eq!(
        inst.client_token(),
        Some(build.id.as_str()),
        "ClientToken is the build id"
    );
    assert_eq!(inst.image_id(), Some(build.source.as_str()));
    assert_eq!(inst.instance_type().unwrap().as_str(), "t3.micro");
    let groups: Vec<_> = inst
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id())
        .collect();
    assert_eq!(groups, vec![group.as_str()]);
    assert_temporary_tags(&tag_map(inst.tags()), &build.id, "instance");

    let attr = |a: InstanceAttributeName| {
        env.ec2
            .describe_instance_attribute()
            .instance_id(&id)
            .attribute(a)
            .send()
    };
    let ud = attr(InstanceAttributeName::UserData).await.unwrap();
    let ud = base64::engine::general_purpose::STANDARD
        .decode(ud.user_data().unwrap().value().unwrap())
        .unwrap();
    let ud = String::from_utf8(ud).unwrap();
    assert!(
        ud.starts_with("#!/bin/sh\nshutdown -h +45\n"),
        "the lease first: {ud}"
    );
    assert_eq!(ud, seed_user_data(&env.def), "the rendered seed user-data");
    let sd = attr(InstanceAttributeName::InstanceInitiatedShutdownBehavior)
        .await
        .unwrap();
    assert_eq!(
        sd.instance_initiated_shutdown_behavior().unwrap().value(),
        Some("terminate")
    );

    // Its root volume: the definition's size and type, tagged like the instance.
    let vols = env
        .ec2
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(&id)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let root = &vols.volumes()[0];
    assert_eq!(
        (root.size(), root.volume_type().unwrap().as_str()),
        (Some(12), "gp3")
    );
    assert_temporary_tags(&tag_map(root.tags()), &build.id, "volume");

    // The group: no inbound rules at all, tagged.
    let sg = env
        .ec2
        .describe_security_groups()
        .group_ids(&group)
        .send()
        .await
        .unwrap();
    let sg = &sg.security_groups()[0];
    assert!(
        sg.ip_permissions().is_empty(),
        "no inbound rules: {:?}",
        sg.ip_permissions()
    );
    assert_temporary_tags(&tag_map(sg.tags()), &build.id, "security group");

    // A command really runs, in bash, and comes back with its output.
    let out = comm
        .run(
            "hello",
            "set -o pipefail\necho \"hi from $0\"; echo warn >&2",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            out.exit_code,
            out.stdout.as_str(),
            out.stderr.as_str(),
            out.truncated
        ),
        (0, "hi from bash\n", "warn\n", false)
    );
    let sent = env.shim.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].instance_id.as_str(), sent[0].document.as_str()),
        (id.as_str(), "AWS-RunShellScript")
    );
    assert_eq!(
        sent[0].commands,
        vec![ssm::wrap(
            "set -o pipefail\necho \"hi from $0\"; echo warn >&2"
        )]
    );
    assert_eq!(sent[0].execution_timeout.as_deref(), Some("30"));
    assert_eq!(sent[0].comment, "stackless: hello");

    // Cleanup terminates the seed, then deletes the group.
    let notes = target.cleanup(&build, false, false).await.unwrap();
    assert_eq!(
        notes,
        vec![
            format!("terminated seed instance {id}"),
            format!("deleted security group {group}")
        ]
    );
    assert_eq!(env.state(&id).await, "terminated");
    assert!(!env.group_exists(&group).await, "the group is gone");
    assert_eq!(target.created(), &Created::default());
    // And it is safe to run again.
    assert_eq!(
        target.cleanup(&build, false, false).await.unwrap(),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn the_upload_stream_reassembles_files_on_the_instance_byte_for_byte() {
    let env = env(ShimOptions {
        in_progress_for: Duration::ZERO,
        ..Default::default()
    })
    .await;
    let mut target = env.target(opts());
    let build = env.build(&mut target, "b-20240102030405-bbbbbb").await;
    let comm = target.start(&env.def, &build).await.unwrap();
    let id = target.created().instance.clone().unwrap();

    let mut x = 0x9e3779b97f4a7c15u64;
    let noise: Vec<u8> = (0..150_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let files = vec![
        StagedFile {
            name: "stackless-init".into(),
            mode: 0o755,
            content: noise,
        },
        StagedFile {
            name: "init.toml".into(),
            mode: 0o644,
            content: b"[sync]\nschedule = \"@hourly\"\n".to_vec(),
        },
    ];
    let commands = transfer::upload_commands(&files);
    assert!(
        commands.len() >= 3,
        "150 KB of noise spans several commands"
    );
    for (i, c) in commands.iter().enumerate() {
        run_checked(
            comm.as_ref(),
            &format!("upload {}/{}", i + 1, commands.len()),
            c,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    let stage = env.shim.stage(&id);
    use std::os::unix::fs::PermissionsExt;
    for f in &files {
        let p = stage.join(&f.name);
        assert_eq!(std::fs::read(&p).unwrap(), f.content, "{}", f.name);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            f.mode,
            "{}",
            f.name
        );
    }
    // Every command went over SSM as sent, and each stayed under the document limit.
    let sent = env.shim.sent();
    assert_eq!(sent.len(), commands.len());
    for (s, c) in sent.iter().zip(&commands) {
        assert_eq!(s.commands, vec![ssm::wrap(c)]);
        assert!(
            s.commands[0].len() < ssm::MAX_DOCUMENT_BYTES - 1024,
            "{} bytes",
            s.commands[0].len()
        );
    }

    // A script runs from the stage with bash, and sees the staged files.
    let script = "set -euo pipefail\ncmp stackless-init \"$STACKLESS_STAGE/stackless-init\"\nsha256sum init.toml > sums\necho provisioned\n";
    let out = run_checked(
        comm.as_ref(),
        "provisioning",
        &transfer::script_command("provision.sh", script),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(out.stdout, "provisioned\n");
    assert!(std::fs::read_to_string(stage.join("sums"))
        .unwrap()
        .ends_with("  init.toml\n"));

    target.cleanup(&build, false, false).await.unwrap();
}

#[tokio::test]
async fn failures_timeouts_and_cut_output_are_reported() {
    let env = env(ShimOptions::default()).await;
    let mut target = env.target(opts());
    let build = env.build(&mut target, "b-20240102030405-cccccc").await;
    let comm = target.start(&env.def, &build).await.unwrap();
    let id = target.created().instance.clone().unwrap();
    let t = Duration::from_secs(30);

    // A failing command: its exit code and stderr come back; run_checked says what failed where.
    let failing =
        "echo 'Reading package lists...'\necho 'E: Unable to locate package nosuch' >&2\nexit 100";
    let out = comm.run("installing packages", failing, t).await.unwrap();
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (100, "Reading package lists...\n")
    );
    assert_eq!(out.stderr, "E: Unable to locate package nosuch\n");
    let e = run_checked(comm.as_ref(), "installing packages", failing, t)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "installing packages failed on {id} over SSM (exit 100)"
        )),
        "{e}"
    );
    assert!(e.contains("Unable to locate package nosuch"), "{e}");

    // Output past what SSM returns is cut, and flagged.
    let out = comm
        .run(
            "noisy",
            "for i in $(seq 1 5000); do echo \"line $i of noisy output\"; done",
            t,
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.chars().count(), ssm::STDOUT_LIMIT);
    assert!(out.truncated);
    let out = comm.run("quiet", "echo fine", t).await.unwrap();
    assert!(!out.truncated);

    // A command over its time limit is stopped by SSM, and the error says which step and what to do.
    let e = comm
        .run(
            "provisioning",
            "echo started; sleep 30",
            Duration::from_secs(1),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("provisioning timed out on {id}")) && e.contains("[provision] timeout"),
        "{e}"
    );
    assert!(
        e.contains("started"),
        "the last output is in the error: {e}"
    );

    target.cleanup(&build, true, false).await.unwrap();
}

#[tokio::test]
async fn an_instance_that_never_reaches_ssm_fails_clearly_and_is_cleaned_up() {
    let env = env(ShimOptions {
        online_after: None,
        ..Default::default()
    })
    .await;
    let mut target = env.target(AwsOptions {
        ssm_wait: Duration::from_millis(500),
        ..opts()
    });
    let build = env.build(&mut target, "b-20240102030405-dddddd").await;
    let e = format!("{:#}", target.start(&env.def, &build).await.err().unwrap());
    let id = target.created().instance.clone().unwrap();
    assert!(
        e.contains(&format!(
            "reaching seed instance {id} in eu-west-1 over SSM"
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "timed out after 0s waiting for {id} to come online in SSM"
        )),
        "{e}"
    );
    assert!(e.contains("AmazonSSMManagedInstanceCore"), "{e}");
    assert!(
        env.shim.ops().iter().all(|op| op != "SendCommand"),
        "nothing sent to an offline instance"
    );

    let group = target.created().security_group.clone().unwrap();
    target.cleanup(&build, true, false).await.unwrap();
    assert_eq!(env.state(&id).await, "terminated");
    assert!(!env.group_exists(&group).await);
}

#[tokio::test]
async fn a_parameter_source_resolves_through_the_shim_which_forwards_to_moto() {
    let env = env(ShimOptions::default()).await;
    let mut target = env.target(opts());
    let ami = target.resolve_source(&env.def).await.unwrap();
    let ssm = env.shim.client(&env.config);
    ssm.put_parameter()
        .name("/test/seed")
        .value(&ami.id)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let def = ImageDef {
        source: definition::Source::Parameter("/test/seed".into()),
        ..env.def.clone()
    };
    assert_eq!(target.resolve_source(&def).await.unwrap(), ami);
    assert_eq!(env.shim.ops(), vec!["PutParameter", "GetParameter"]);
}

#[tokio::test]
async fn a_refused_launch_says_what_to_check_and_leaves_nothing() {
    let env = env(ShimOptions::default()).await;
    let mut target = env.target(opts());
    let def = ImageDef {
        instance_profile: Some("no-such-profile".into()),
        ..env.def.clone()
    };
    let build = env.build(&mut target, "b-20240102030405-dead00").await;
    let e = format!("{:#}", target.start(&def, &build).await.err().unwrap());
    assert!(
        e.contains("launching the seed instance (t3.micro from ami-"),
        "{e}"
    );
    assert!(
        e.contains("instance profile no-such-profile") && e.contains("iam:PassRole"),
        "{e}"
    );
    assert!(target.created().instance.is_none());
    let group = target.created().security_group.clone().unwrap();
    let notes = target.cleanup(&build, true, false).await.unwrap();
    assert_eq!(notes, vec![format!("deleted security group {group}")]);
    assert!(!env.group_exists(&group).await);
}

#[tokio::test]
async fn a_start_cancelled_half_way_is_cleaned_up() {
    // Ctrl-C while waiting for SSM: the pipeline drops the start future, then cleans up.
    let env = env(ShimOptions {
        online_after: None,
        ..Default::default()
    })
    .await;
    let mut target = env.target(opts());
    let build = env.build(&mut target, "b-20240102030405-abcabc").await;
    let cancelled =
        tokio::time::timeout(Duration::from_secs(2), target.start(&env.def, &build)).await;
    assert!(cancelled.is_err(), "still waiting for SSM when cancelled");
    let id = target
        .created()
        .instance
        .clone()
        .expect("the launch was recorded");
    let group = target.created().security_group.clone().unwrap();
    target.cleanup(&build, true, false).await.unwrap();
    assert_eq!(env.state(&id).await, "terminated");
    assert!(!env.group_exists(&group).await);
}

#[tokio::test]
async fn cleanup_finds_what_a_cancelled_call_never_recorded_by_the_build_tag() {
    let env = env(ShimOptions::default()).await;
    let mut first = env.target(opts());
    let build = env.build(&mut first, "b-20240102030405-eeeeee").await;

    // What a run cancelled mid-call leaves: a group, a seed and a half-made image, all tagged
    // with the build but none recorded by the target that cleans up.
    let tags = temporary_tags(&env.def, &build, SystemTime::now());
    let vpc = security_group::vpc_for(&env.ec2, None).await.unwrap();
    let group = security_group::create(&env.ec2, &vpc, &build.id, &tags)
        .await
        .unwrap();
    let source = source::describe(&env.ec2, &build.source).await.unwrap();
    let lost = instance::launch(&env.ec2, &env.def, &build, &source, &group, &tags)
        .await
        .unwrap();
    // Another build's seed, in the VPC's default group: cleanup must leave it alone.
    let default_group = env
        .ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values("default")
                .build(),
        )
        .filters(Filter::builder().name("vpc-id").values(&vpc).build())
        .send()
        .await
        .unwrap()
        .security_groups()[0]
        .group_id()
        .unwrap()
        .to_string();
    let other_build = Build {
        id: "b-20240102030405-111111".into(),
        ..build.clone()
    };
    let other_tags = temporary_tags(&env.def, &other_build, SystemTime::now());
    let other = instance::launch(
        &env.ec2,
        &env.def,
        &other_build,
        &source,
        &default_group,
        &other_tags,
    )
    .await
    .unwrap();
    let half = env
        .ec2
        .create_image()
        .instance_id(&lost)
        .name("half-made")
        .tag_specifications(tag_spec(
            ResourceType::Image,
            &BTreeMap::from([(super::tags::BUILD_ID.to_string(), build.id.clone())]),
        ))
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();

    let mut fresh = env.target(opts());
    assert_eq!(fresh.created(), &Created::default());
    let notes = fresh.cleanup(&build, true, false).await.unwrap();
    assert!(
        notes.contains(&format!("terminated seed instance {lost}")),
        "{notes:?}"
    );
    assert!(
        notes.contains(&format!("deleted security group {group}")),
        "{notes:?}"
    );
    assert!(
        notes.contains(&format!(
            "deregistered the half-made image {half} and deleted its snapshots"
        )),
        "{notes:?}"
    );
    assert_eq!(env.state(&lost).await, "terminated");
    assert!(!env.group_exists(&group).await);
    assert_eq!(
        env.state(&other).await,
        "running",
        "another build's seed is not touched"
    );
    let left = env.ec2.describe_images().image_ids(&half).send().await;
    assert!(
        left.map(|o| o.images().is_empty()).unwrap_or(true),
        "the half-made image is gone"
    );
}

#[tokio::test]
async fn keep_leaves_the_seed_and_says_how_to_remove_it() {
    let env = env(ShimOptions::default()).await;
    let mut target = env.target(opts());
    let build = env.build(&mut target, "b-20240102030405-ffffff").await;
    target.start(&env.def, &build).await.unwrap();
    let id = target.created().instance.clone().unwrap();
    let group = target.created().security_group.clone().unwrap();

    let notes = target.cleanup(&build, true, true).await.unwrap();
    assert!(
        notes[0].starts_with(&format!("kept seed instance {id} of build {}", build.id)),
        "{notes:?}"
    );
    assert!(
        notes[0].contains(&format!(
            "aws ssm start-session --region eu-west-1 --target {id}"
        )),
        "{notes:?}"
    );
    assert!(notes[0].contains("when its lease ends (at 20"), "{notes:?}");
    assert_eq!(
        notes[1..],
        [
            format!("aws ec2 terminate-instances --region eu-west-1 --instance-ids {id}"),
            format!("aws ec2 wait instance-terminated --region eu-west-1 --instance-ids {id}"),
            format!("aws ec2 delete-security-group --region eu-west-1 --group-id {group}"),
        ]
    );
    assert_eq!(env.state(&id).await, "running");
    assert!(env.group_exists(&group).await);

    // Without keep, a later cleanup removes both.
    target.cleanup(&build, true, false).await.unwrap();
    assert_eq!(env.state(&id).await, "terminated");
    assert!(!env.group_exists(&group).await);
}

#[tokio::test]
async fn snapshot_stops_the_seed_and_makes_the_image_that_cleanup_keeps() {
    let env = env(ShimOptions::default()).await;
    let mut target = env.target(opts());
    let build = env.build(&mut target, "b-20240102030405-999999").await;
    target.start(&env.def, &build).await.unwrap();
    let id = target.created().instance.clone().unwrap();

    let artifact = target.snapshot(&env.def, &build).await.unwrap();
    assert!(artifact.id.starts_with("ami-"), "{artifact:?}");
    assert_eq!(
        target.created().image.as_deref(),
        Some(artifact.id.as_str())
    );
    assert!(target.created().published);
    assert_eq!(env.state(&id).await, "stopped");

    // A cleanup after a failure later on (writing the manifest, say) keeps the published image.
    target.cleanup(&build, true, false).await.unwrap();
    assert_eq!(env.state(&id).await, "terminated");
    let img = env
        .ec2
        .describe_images()
        .image_ids(&artifact.id)
        .send()
        .await
        .unwrap();
    assert_eq!(img.images().len(), 1, "the published image stays");
}

#[tokio::test]
async fn snapshot_before_start_is_an_error() {
    let env = env(ShimOptions::default()).await;
    let mut target = env.target(opts());
    let build = env.build(&mut target, "b-20240102030405-000000").await;
    let e = target
        .snapshot(&env.def, &build)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no seed instance"), "{e}");
}
