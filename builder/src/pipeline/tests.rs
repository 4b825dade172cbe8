//! Whole bakes against a real moto_server, with the SSM shim running the command stream for real
//! (in a scratch folder: the test templates only check and record, they never touch the host).

use super::*;
use crate::arch::fake_elf_header;
use crate::definition;
use crate::platform::aws::{tags, AwsOptions, AwsTarget};
use aws_sdk_ec2::types::Filter;
use testkit::ssm_shim::{create_instance_profile, ShimOptions, SsmShim};
use testkit::Moto;

const PROFILE: &str = "stackless-test-builder";

struct Env {
    shim: SsmShim,
    moto: Moto,
    config: aws_config::SdkConfig,
    ec2: aws_sdk_ec2::Client,
    dir: tempfile::TempDir,
    def: ImageDef,
    /// The x86_64 agent (an ELF header, then noise).
    binary: Vec<u8>,
    /// The aarch64 agent, beside it.
    arm_binary: Vec<u8>,
}

/// Templates that prove the stream worked without changing the host: the provisioning checks
/// the staged binary against its checksum and records it, generalising records too.
fn write_templates(dir: &Path, fail_provision: bool) {
    let t = dir.join("templates");
    std::fs::create_dir_all(&t).unwrap();
    let fail = if fail_provision {
        "echo 'apt-get: unable to locate package nope' >&2\nexit 7\n"
    } else {
        ""
    };
    std::fs::write(
        t.join("provision.sh.tera"),
        format!(
            "#!/bin/bash\nset -euo pipefail\nstage=\"${{STACKLESS_STAGE:-{{{{ stage }}}}}}\"\n\
             echo \"{{{{ init_sha256 }}}}  $stage/stackless-init\" | sha256sum -c --quiet\n\
             echo provisioned {{{{ image.image }}}} > \"$stage/provisioned\"\necho 'stackless-provision: done'\n{fail}"
        ),
    )
    .unwrap();
    std::fs::write(
        t.join("generalize.sh.tera"),
        "#!/bin/bash\nset -euo pipefail\nstage=\"${STACKLESS_STAGE:-{{ stage }}}\"\necho generalized > \"$stage/../generalized\"\n",
    )
    .unwrap();
}

async fn env() -> Env {
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let shim = SsmShim::start(&moto.endpoint, ShimOptions::default());
    create_instance_profile(&moto.endpoint, PROFILE);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.toml"),
        format!(
            r#"name = "stackless-web-{{build_id}}"
[source]
owner = "amazon"
name = "al2023-ami-2023.*-kernel-6.12-x86_64"
[instance]
type = "t3.micro"
instance_profile = "{PROFILE}"
[publish]
ssm_parameter = "/stackless/images/web"
regions = ["us-west-2"]
[tags]
team = "platform"
"#
        ),
    )
    .unwrap();
    write_templates(dir.path(), false);
    let def = definition::load(dir.path(), "web").unwrap();
    // Incompressible, so the upload spans several SendCommands; an ELF header first, for the
    // machine the bake matches against the source image.
    let noise = |mut x: u64| -> Vec<u8> {
        (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut binary = fake_elf_header(Arch::X86_64);
    binary.extend(noise(0x2545f4914f6cdd1d));
    std::fs::write(dir.path().join("stackless-init"), &binary).unwrap();
    let mut arm_binary = fake_elf_header(Arch::Arm64);
    arm_binary.extend(noise(0x9e3779b97f4a7c15));
    std::fs::write(dir.path().join("stackless-init-aarch64"), &arm_binary).unwrap();
    let ec2 = aws_sdk_ec2::Client::new(&config);
    Env {
        shim,
        moto,
        config,
        ec2,
        dir,
        def,
        binary,
        arm_binary,
    }
}

impl Env {
    fn target(&self) -> AwsTarget {
        let opts = AwsOptions {
            ssm_wait: Duration::from_secs(20),
            command_poll: Duration::from_millis(50),
            console_poll: Duration::from_millis(50),
            instance_wait: Duration::from_secs(30),
            delete_wait: Duration::from_secs(10),
            progress: false,
        };
        AwsTarget::new(self.config.clone(), opts).with_ssm_client(self.shim.client(&self.config))
    }

    fn options(&self, force: bool) -> BakeOptions {
        BakeOptions {
            templates: Some(self.dir.path().join("templates")),
            init_binaries: vec![self.dir.path().join("stackless-init")],
            bootstrap: None,
            force,
            keep_on_error: false,
            manifest: self.dir.path().join("out/manifest.json"),
            build_ca: false,
        }
    }

    /// Instances of a build that are not terminated.
    async fn live_instances(&self, build_id: &str) -> Vec<String> {
        let out = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{}", tags::BUILD_ID))
                    .values(build_id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect()
    }

    async fn groups(&self, build_id: &str) -> Vec<String> {
        let out = self
            .ec2
            .describe_security_groups()
            .filters(
                Filter::builder()
                    .name(format!("tag:{}", tags::BUILD_ID))
                    .values(build_id)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        out.security_groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect()
    }

    /// Every build id the builder tagged an instance with.
    async fn build_ids(&self) -> Vec<String> {
        let out = self.ec2.describe_instances().send().await.unwrap();
        let mut ids: Vec<String> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.tags())
            .filter(|t| t.key() == Some(tags::BUILD_ID))
            .filter_map(|t| t.value().map(str::to_string))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[tokio::test]
async fn a_whole_bake_leaves_an_image_and_nothing_else() {
    let env = env().await;
    let mut target = env.target();
    let m = bake_until(
        &mut target,
        &env.def,
        &env.options(false),
        std::future::pending(),
    )
    .await
    .unwrap();

    // The image exists, is available and tagged with the build and the input hash.
    let img = env
        .ec2
        .describe_images()
        .image_ids(&m.artifact)
        .send()
        .await
        .unwrap();
    let img = &img.images()[0];
    assert_eq!(img.state().map(|s| s.as_str()), Some("available"));
    let tag = |k: &str| {
        img.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .map(str::to_string)
    };
    assert_eq!(tag(tags::BUILD_ID).as_deref(), Some(m.build_id.as_str()));
    assert_eq!(
        tag(tags::INPUT_HASH).as_deref(),
        Some(m.input_hash.as_str())
    );
    assert_eq!(tag("team").as_deref(), Some("platform"));
    assert_eq!(
        img.name(),
        Some(format!("stackless-web-{}", m.build_id).as_str())
    );
    // Copied to the other region.
    assert!(
        m.regions.contains_key("us-west-2") && m.regions.contains_key("eu-west-1"),
        "{:?}",
        m.regions
    );

    // The seed is gone, and its temporary group.
    assert!(env.live_instances(&m.build_id).await.is_empty());
    assert!(env.groups(&m.build_id).await.is_empty());

    // The parameter points at the image.
    let ssm = aws_sdk_ssm::Client::new(&env.config);
    let p = ssm
        .get_parameter()
        .name("/stackless/images/web")
        .send()
        .await
        .unwrap();
    assert_eq!(
        p.parameter().and_then(|p| p.value()),
        Some(m.artifact.as_str())
    );

    // The manifest is written, with every phase timed.
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.dir.path().join("out/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(written["artifact"], m.artifact.as_str());
    assert_eq!(written["reused"], false);
    let phases: Vec<&str> = written["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    for want in [
        "resolve-source",
        "start",
        "upload",
        "provision",
        "generalize",
        "snapshot",
        "cleanup",
    ] {
        assert!(phases.contains(&want), "{want} missing from {phases:?}");
    }

    // On the "instance", the staged binary is byte for byte the input, and the scripts ran.
    let seed = env.shim.sent()[0].instance_id.clone();
    let stage = env.shim.stage(&seed);
    assert_eq!(
        std::fs::read(stage.join("stackless-init")).unwrap(),
        env.binary
    );
    assert_eq!(
        std::fs::read_to_string(stage.join("provisioned")).unwrap(),
        "provisioned web\n"
    );
    assert!(stage.parent().unwrap().join("generalized").exists());
    for s in env.shim.sent() {
        assert_eq!(s.document, "AWS-RunShellScript");
        let size: usize = s.commands.iter().map(|c| c.len()).sum();
        assert!(
            size < 64 * 1024,
            "every SendCommand stays under the document limit: {size}"
        );
    }
}

#[tokio::test]
async fn identical_inputs_reuse_the_image_and_force_bakes_anew() {
    let env = env().await;
    let first = bake_until(
        &mut env.target(),
        &env.def,
        &env.options(false),
        std::future::pending(),
    )
    .await
    .unwrap();
    let sends = env.shim.sent().len();
    let again = bake_until(
        &mut env.target(),
        &env.def,
        &env.options(false),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert!(again.reused);
    assert_eq!(again.artifact, first.artifact);
    assert_eq!(env.shim.sent().len(), sends, "no machine was started");
    assert_eq!(env.build_ids().await.len(), 1, "no second seed");
    let forced = bake_until(
        &mut env.target(),
        &env.def,
        &env.options(true),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert!(!forced.reused);
    assert_ne!(forced.artifact, first.artifact);
    assert_eq!(forced.input_hash, first.input_hash);
}

#[tokio::test]
async fn a_failed_provisioning_cleans_up_and_says_why() {
    let env = env().await;
    write_templates(env.dir.path(), true);
    let e = bake_until(
        &mut env.target(),
        &env.def,
        &env.options(false),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("provisioning failed") && msg.contains("exit 7"),
        "{msg}"
    );
    assert!(
        msg.contains("unable to locate package nope"),
        "stderr is shown: {msg}"
    );
    let ids = env.build_ids().await;
    assert_eq!(ids.len(), 1);
    assert!(
        env.live_instances(&ids[0]).await.is_empty(),
        "seed terminated"
    );
    assert!(env.groups(&ids[0]).await.is_empty(), "group deleted");
    let images = env
        .ec2
        .describe_images()
        .owners("self")
        .filters(
            Filter::builder()
                .name(format!("tag:{}", tags::BUILD_ID))
                .values(&ids[0])
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(images.images().is_empty(), "no image from a failed build");
    assert!(!env.dir.path().join("out/manifest.json").exists());
}

/// Interrupts a bake once `reached` says the bake got to a phase, then checks nothing is left.
async fn interrupt_when(env: &Env, what: &'static str, reached: impl Fn(&Env) -> bool) {
    let stop = async {
        loop {
            if reached(env) {
                return "interrupted (test)";
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let e = bake_until(&mut env.target(), &env.def, &env.options(true), stop)
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("interrupted"), "{what}: {e:#}");
    for id in env.build_ids().await {
        assert!(
            env.live_instances(&id).await.is_empty(),
            "{what}: an instance of {id} is still up"
        );
        assert!(
            env.groups(&id).await.is_empty(),
            "{what}: a group of {id} is left"
        );
    }
}

#[tokio::test]
async fn an_interrupt_in_any_phase_leaves_no_instance_and_no_group() {
    let env = env().await;
    // While waiting for SSM (the instance exists, nothing was sent yet).
    interrupt_when(&env, "start", |e| {
        e.shim
            .ops()
            .iter()
            .any(|o| o == "DescribeInstanceInformation")
    })
    .await;
    // During the upload.
    interrupt_when(&env, "upload", |e| e.shim.sent().len() >= 2).await;
    // During provisioning: commands stay in progress long enough to be caught.
    env.shim.set_in_progress_for(Duration::from_secs(3));
    let n = env.shim.sent().len();
    interrupt_when(&env, "provision", move |e| {
        e.shim
            .sent()
            .iter()
            .skip(n)
            .any(|s| s.commands.iter().any(|c| c.contains("provision.sh")))
    })
    .await;
}

impl Env {
    /// Both agents, arm64 first (the order does not matter).
    fn both_agents(&self, force: bool) -> BakeOptions {
        BakeOptions {
            init_binaries: vec![
                self.dir.path().join("stackless-init-aarch64"),
                self.dir.path().join("stackless-init"),
            ],
            ..self.options(force)
        }
    }

    /// An arm64 definition: Amazon's arm64 image in moto, `[instance]` as given.
    fn arm_def(&self, name: &str, instance: &str) -> ImageDef {
        std::fs::write(
            self.dir.path().join(format!("{name}.toml")),
            format!(
                r#"name = "stackless-{name}-{{build_id}}"
[source]
owner = "amazon"
name = "al2023-ami-2023.*-kernel-6.12-arm64"
architecture = "arm64"
[instance]
instance_profile = "{PROFILE}"
{instance}
[publish]
ssm_parameter = "/stackless/images/{name}"
"#
            ),
        )
        .unwrap();
        definition::load(self.dir.path(), name).unwrap()
    }

    /// Every instance moto has, in any state.
    async fn all_instances(&self) -> usize {
        let out = self.ec2.describe_instances().send().await.unwrap();
        out.reservations().iter().map(|r| r.instances().len()).sum()
    }

    /// The image's tags and the parameter's description, after a bake.
    async fn published(&self, m: &Manifest, parameter: &str) -> (BTreeMap<String, String>, String) {
        let img = self
            .ec2
            .describe_images()
            .image_ids(&m.artifact)
            .send()
            .await
            .unwrap();
        let tags = img.images()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
            .collect();
        let ssm = aws_sdk_ssm::Client::new(&self.config);
        let meta = ssm
            .describe_parameters()
            .parameter_filters(
                aws_sdk_ssm::types::ParameterStringFilter::builder()
                    .key("Name")
                    .values(parameter)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        let description = meta.parameters()[0]
            .description()
            .unwrap_or_default()
            .to_string();
        let value = ssm.get_parameter().name(parameter).send().await.unwrap();
        assert_eq!(
            value.parameter().and_then(|p| p.value()),
            Some(m.artifact.as_str()),
            "{parameter} names the image"
        );
        (tags, description)
    }

    /// The agent the seed received.
    fn staged_agent(&self) -> Vec<u8> {
        let seed = self.shim.sent()[0].instance_id.clone();
        std::fs::read(self.shim.stage(&seed).join("stackless-init")).unwrap()
    }
}

#[tokio::test]
async fn an_arm64_bake_stages_the_aarch64_agent_and_says_arm64() {
    let env = env().await;
    let def = env.arm_def("web-arm64", "type = \"t4g.micro\"");
    let m = bake_until(
        &mut env.target(),
        &def,
        &env.both_agents(false),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(env.staged_agent(), env.arm_binary, "the aarch64 agent");
    assert_eq!(m.arch, Arch::Arm64);
    assert!(m.init_binary.ends_with("stackless-init-aarch64"), "{m:?}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.dir.path().join("out/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(written["arch"], "arm64");
    let (tags, description) = env.published(&m, "/stackless/images/web-arm64").await;
    assert_eq!(tags[tags::ARCH], "arm64");
    assert!(
        description.contains("web-arm64 image for arm64"),
        "{description}"
    );

    // The same options bake the x86_64 definition with the x86_64 agent.
    let m = bake_until(
        &mut env.target(),
        &env.def,
        &env.both_agents(false),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(m.arch, Arch::X86_64);
    let last = env.shim.sent().last().unwrap().instance_id.clone();
    assert_eq!(
        std::fs::read(env.shim.stage(&last).join("stackless-init")).unwrap(),
        env.binary
    );
    let (tags, _) = env.published(&m, "/stackless/images/web").await;
    assert_eq!(tags[tags::ARCH], "x86_64");
}

#[tokio::test]
async fn a_mismatch_is_refused_before_anything_is_launched() {
    let env = env().await;
    let x86_only = env.options(false);
    let agent = env.dir.path().join("stackless-init").display().to_string();

    // An arm64 image, only the x86_64 agent.
    let def = env.arm_def("web-arm64", "type = \"t4g.micro\"");
    let e = format!(
        "{:#}",
        bake_until(&mut env.target(), &def, &x86_only, std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("`web-arm64` (source ami-")
            && e.contains("is arm64, but no stackless-init binary given is")
            && e.contains(&format!("{agent} is x86_64 (ELF machine x86-64)"))
            && e.contains("scripts/build-init.sh --arch aarch64"),
        "{e}"
    );

    // An arm64 image on an x86_64 instance type.
    let def = env.arm_def("web-arm64-t3", "type = \"t3.micro\"");
    let e = format!(
        "{:#}",
        bake_until(
            &mut env.target(),
            &def,
            &env.both_agents(false),
            std::future::pending()
        )
        .await
        .unwrap_err()
    );
    assert!(
        e.contains("t3.micro runs x86_64, the image ami-")
            && e.contains("is arm64")
            && e.contains("t4g.small"),
        "{e}"
    );

    // [instance] arch that is not the source's.
    let def = env.arm_def("web-arm64-says-x86", "type = \"t4g.micro\"");
    let def = ImageDef {
        arch: Some(Arch::X86_64),
        ..def
    };
    let e = format!(
        "{:#}",
        bake_until(
            &mut env.target(),
            &def,
            &env.both_agents(false),
            std::future::pending()
        )
        .await
        .unwrap_err()
    );
    assert!(
        e.contains("[instance] arch = \"x86_64\", but its source image ami-")
            && e.contains("is arm64"),
        "{e}"
    );

    // Nothing was launched or created: no RunInstances, no group, no command.
    assert_eq!(env.all_instances().await, 0, "no instance in moto");
    assert!(env.build_ids().await.is_empty());
    assert!(env.shim.sent().is_empty(), "no command sent");
    let groups = env
        .ec2
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("tag-key")
                .values(tags::BUILD_ID)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(groups.security_groups().is_empty(), "no security group");
    assert!(!env.dir.path().join("out/manifest.json").exists());
}

/// `builder bake preseeded-arm64`: the shipped definition, its source pointed at moto's arm64
/// image (moto serves no /aws/service/debian parameter, and refuses to store one).
#[tokio::test]
async fn the_shipped_preseeded_arm64_bakes_with_the_aarch64_agent() {
    let env = env().await;
    let shipped = testkit::repo_root().join("images");
    let mut def = definition::load(&shipped, "preseeded-arm64").unwrap();
    create_instance_profile(&env.moto.endpoint, def.instance_profile.as_deref().unwrap());
    let arm_ami = crate::platform::aws::source::resolve(
        &env.ec2,
        &aws_sdk_ssm::Client::new(&env.config),
        &crate::definition::Source::Search {
            owner: "amazon".into(),
            name: "al2023-ami-2023.*-kernel-6.12-arm64".into(),
            architecture: "arm64".into(),
        },
    )
    .await
    .unwrap();
    let ssm = aws_sdk_ssm::Client::new(&env.config);
    ssm.put_parameter()
        .name("/test/debian/bookworm/latest/arm64")
        .value(&arm_ami.image_id)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    def.source = crate::definition::Source::Parameter("/test/debian/bookworm/latest/arm64".into());

    let m = bake_until(
        &mut env.target(),
        &def,
        &env.both_agents(false),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(m.image, "preseeded-arm64");
    assert_eq!(m.source, arm_ami.image_id);
    assert_eq!(m.arch, Arch::Arm64);
    assert_eq!(env.staged_agent(), env.arm_binary, "the aarch64 agent");
    let seed = env.shim.sent()[0].instance_id.clone();
    let inst = env
        .ec2
        .describe_instances()
        .instance_ids(&seed)
        .send()
        .await
        .unwrap();
    let inst = &inst.reservations()[0].instances()[0];
    assert_eq!(
        inst.instance_type().map(|t| t.as_str()),
        Some(def.instance_type.as_str())
    );
    assert!(def.instance_type.starts_with("t4g."));
    let (tags, description) = env.published(&m, "/stackless/images/preseeded-arm64").await;
    assert_eq!(tags[tags::ARCH], "arm64");
    assert_eq!(tags[tags::IMAGE], "preseeded-arm64");
    assert!(description.contains("for arm64"), "{description}");
}
