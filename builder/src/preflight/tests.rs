//! Preflight against a real moto_server: a world with and without the instance profile, subnets
//! with and without a route or endpoints, an instance type not offered in a zone, a deploy's
//! target group and lock. moto does not implement iam:SimulatePrincipalPolicy, so the IAM
//! actions come out "unchecked" here, as they do for a caller who may not simulate.

use super::*;
use crate::definition;
use crate::deploy::config::{self, DeployFile, ImageRef, Overrides};
use aws_sdk_ec2::types::{Filter, VpcEndpointType};
use testkit::{DeployWorld, Moto};

struct World {
    _moto: Moto,
    config: aws_config::SdkConfig,
    c: Clients,
    defs: tempfile::TempDir,
}

async fn world() -> World {
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let c = Clients::new(&config);
    World {
        _moto: moto,
        config,
        c,
        defs: tempfile::tempdir().unwrap(),
    }
}

impl World {
    /// A definition from moto's Amazon Linux images, with `[instance]` lines added.
    fn def(&self, instance: &str) -> ImageDef {
        std::fs::write(
            self.defs.path().join("pf.toml"),
            format!(
                r#"name = "stackless-pf-{{timestamp}}"
[source]
owner = "amazon"
name = "al2023-ami-2023.*-kernel-6.12-x86_64"
[instance]
{instance}
"#
            ),
        )
        .unwrap();
        definition::load(self.defs.path(), "pf").unwrap()
    }

    /// An instance profile whose role has a policy named AmazonSSMManagedInstanceCore (moto
    /// loads AWS's managed policies only when told to; a customer policy of the same name stands
    /// in) unless `ssm` is false.
    async fn profile(&self, name: &str, ssm: bool) {
        let iam = &self.c.iam;
        let role = format!("{name}-role");
        iam.create_role()
            .role_name(&role)
            .assume_role_policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#)
            .send()
            .await
            .unwrap();
        if ssm {
            let policy = iam
                .create_policy()
                .policy_name(access::SSM_POLICY)
                .policy_document(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["ssm:UpdateInstanceInformation","ssmmessages:*","ec2messages:*"],"Resource":"*"}]}"#)
                .send()
                .await
                .unwrap();
            iam.attach_role_policy()
                .role_name(&role)
                .policy_arn(policy.policy().unwrap().arn().unwrap())
                .send()
                .await
                .unwrap();
        }
        iam.create_instance_profile()
            .instance_profile_name(name)
            .send()
            .await
            .unwrap();
        iam.add_role_to_instance_profile()
            .instance_profile_name(name)
            .role_name(&role)
            .send()
            .await
            .unwrap();
    }

    /// A new VPC with one subnet in `zone` and nothing else: no route out, no endpoints.
    async fn bare_subnet(&self, cidr: &str, zone: &str) -> (String, String) {
        let ec2 = &self.c.ec2;
        let vpc = ec2
            .create_vpc()
            .cidr_block(cidr)
            .send()
            .await
            .unwrap()
            .vpc()
            .unwrap()
            .vpc_id()
            .unwrap()
            .to_string();
        let subnet = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(cidr.replace("0.0/16", "1.0/24"))
            .availability_zone(zone)
            .send()
            .await
            .unwrap()
            .subnet()
            .unwrap()
            .subnet_id()
            .unwrap()
            .to_string();
        (vpc, subnet)
    }

    async fn main_table(&self, vpc: &str) -> String {
        self.c
            .ec2
            .describe_route_tables()
            .filters(Filter::builder().name("vpc-id").values(vpc).build())
            .filters(
                Filter::builder()
                    .name("association.main")
                    .values("true")
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .route_tables()[0]
            .route_table_id()
            .unwrap()
            .to_string()
    }

    /// An internet gateway attached to the VPC and a default route to it in its main table.
    async fn route_to_igw(&self, vpc: &str) {
        let ec2 = &self.c.ec2;
        let table = self.main_table(vpc).await;
        let t = ec2
            .describe_route_tables()
            .route_table_ids(&table)
            .send()
            .await
            .unwrap();
        if t.route_tables()[0]
            .routes()
            .iter()
            .any(|r| r.destination_cidr_block() == Some("0.0.0.0/0"))
        {
            return;
        }
        let igw = ec2
            .create_internet_gateway()
            .send()
            .await
            .unwrap()
            .internet_gateway()
            .unwrap()
            .internet_gateway_id()
            .unwrap()
            .to_string();
        ec2.attach_internet_gateway()
            .internet_gateway_id(&igw)
            .vpc_id(vpc)
            .send()
            .await
            .unwrap();
        ec2.create_route()
            .route_table_id(&table)
            .destination_cidr_block("0.0.0.0/0")
            .gateway_id(&igw)
            .send()
            .await
            .unwrap();
    }

    async fn default_vpc(&self) -> String {
        self.c
            .ec2
            .describe_vpcs()
            .filters(Filter::builder().name("isDefault").values("true").build())
            .send()
            .await
            .unwrap()
            .vpcs()[0]
            .vpc_id()
            .unwrap()
            .to_string()
    }

    /// The default VPC's default subnet in `zone`.
    async fn default_subnet(&self, zone: &str) -> String {
        self.c
            .ec2
            .describe_subnets()
            .filters(
                Filter::builder()
                    .name("default-for-az")
                    .values("true")
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("availability-zone")
                    .values(zone)
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .subnets()[0]
            .subnet_id()
            .unwrap()
            .to_string()
    }
}

fn check<'a>(r: &'a Report, name: &str) -> &'a Check {
    r.checks
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no check {name} in\n{}", r.text()))
}

#[tokio::test]
async fn a_ready_world_passes_every_check_it_can_make() {
    let w = world().await;
    w.profile("pf-builder", true).await;
    w.route_to_igw(&w.default_vpc().await).await;
    let r = bake(
        &w.c,
        &w.def("type = \"t3.small\"\ninstance_profile = \"pf-builder\""),
    )
    .await;
    assert!(r.passed(), "{}", r.text());
    assert_eq!(check(&r, "credentials").status, Status::Passed);
    assert!(
        check(&r, "credentials").detail.contains("moto"),
        "{}",
        r.text()
    );
    assert_eq!(check(&r, "region").detail, "eu-west-1");
    assert!(
        check(&r, "caller").detail.contains("arn:aws"),
        "{}",
        r.text()
    );
    // moto cannot simulate: said, not failed.
    assert_ne!(check(&r, "IAM actions").status, Status::Failed);
    assert!(check(&r, "instance profile")
        .detail
        .contains("AmazonSSMManagedInstanceCore"));
    assert_eq!(
        check(&r, "SSM reach").status,
        Status::Passed,
        "{}",
        r.text()
    );
    assert_eq!(check(&r, "SSM agent download").status, Status::Passed);
    assert_eq!(check(&r, "source image").status, Status::Passed);
    assert_eq!(
        check(&r, "instance type").status,
        Status::Passed,
        "{}",
        r.text()
    );
    assert_eq!(
        check(&r, "instance type offered").status,
        Status::Passed,
        "{}",
        r.text()
    );
    // Every check is one line.
    assert!(r.checks.iter().all(|c| !c.line().contains('\n')));
}

#[tokio::test]
async fn a_missing_or_roleless_or_absent_profile_fails_with_the_fix() {
    let w = world().await;
    let r = bake(&w.c, &w.def("instance_profile = \"nope\"")).await;
    let c = check(&r, "instance profile");
    assert_eq!(c.status, Status::Failed, "{}", r.text());
    assert!(c.detail.contains("nope does not exist"));
    assert!(c
        .fix
        .as_deref()
        .unwrap()
        .contains("create-instance-profile"));
    assert!(!r.passed());
    assert!(r.error().to_string().contains("nothing was created"));

    let r = bake(&w.c, &w.def("")).await;
    assert_eq!(check(&r, "instance profile").status, Status::Failed);

    // A role without SSM's policy: moto cannot simulate its inline policies, so unknown.
    w.profile("pf-nossm", false).await;
    let r = bake(&w.c, &w.def("instance_profile = \"pf-nossm\"")).await;
    let c = check(&r, "instance profile");
    assert_ne!(c.status, Status::Passed, "{}", r.text());
    assert!(c.detail.contains("attach-role-policy"), "{}", r.text());
}

#[tokio::test]
async fn a_subnet_without_a_route_or_endpoints_cannot_reach_ssm() {
    let w = world().await;
    w.profile("pf-builder", true).await;
    let (vpc, subnet) = w.bare_subnet("10.9.0.0/16", "eu-west-1a").await;
    let def = w.def(&format!(
        "type = \"t3.small\"\ninstance_profile = \"pf-builder\"\nsubnet = \"{subnet}\""
    ));
    let r = bake(&w.c, &def).await;
    let ssm = check(&r, "SSM reach");
    assert_eq!(ssm.status, Status::Failed, "{}", r.text());
    assert!(ssm.detail.contains("no 0.0.0.0/0 route"), "{}", ssm.detail);
    assert!(ssm.fix.as_deref().unwrap().contains("endpoints"));
    assert_eq!(check(&r, "SSM agent download").status, Status::Failed);
    assert!(!r.passed());

    // The three interface endpoints, and S3's gateway endpoint in the subnet's table.
    let table = w.main_table(&vpc).await;
    for service in ["ssm", "ssmmessages", "ec2messages"] {
        w.c.ec2
            .create_vpc_endpoint()
            .vpc_id(&vpc)
            .vpc_endpoint_type(VpcEndpointType::Interface)
            .service_name(format!("com.amazonaws.eu-west-1.{service}"))
            .subnet_ids(&subnet)
            .send()
            .await
            .unwrap();
    }
    let r = bake(&w.c, &def).await;
    assert_eq!(
        check(&r, "SSM reach").status,
        Status::Passed,
        "{}",
        r.text()
    );
    assert!(check(&r, "SSM reach").detail.contains("VPC endpoints"));
    assert_eq!(check(&r, "SSM agent download").status, Status::Failed);
    w.c.ec2
        .create_vpc_endpoint()
        .vpc_id(&vpc)
        .vpc_endpoint_type(VpcEndpointType::Gateway)
        .service_name("com.amazonaws.eu-west-1.s3")
        .route_table_ids(&table)
        .send()
        .await
        .unwrap();
    let r = bake(&w.c, &def).await;
    assert_eq!(
        check(&r, "SSM agent download").status,
        Status::Passed,
        "{}",
        r.text()
    );
    assert!(r.passed(), "{}", r.text());
}

#[tokio::test]
async fn an_internet_gateway_route_needs_public_ips() {
    let w = world().await;
    w.profile("pf-builder", true).await;
    let (vpc, subnet) = w.bare_subnet("10.8.0.0/16", "eu-west-1b").await;
    w.route_to_igw(&vpc).await;
    let def = w.def(&format!(
        "type = \"t3.small\"\ninstance_profile = \"pf-builder\"\nsubnet = \"{subnet}\""
    ));
    let r = bake(&w.c, &def).await;
    let ssm = check(&r, "SSM reach");
    assert_eq!(ssm.status, Status::Failed, "{}", r.text());
    assert!(ssm.detail.contains("no public IPs"), "{}", ssm.detail);
    w.c.ec2
        .modify_subnet_attribute()
        .subnet_id(&subnet)
        .map_public_ip_on_launch(
            aws_sdk_ec2::types::AttributeBooleanValue::builder()
                .value(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let r = bake(&w.c, &def).await;
    assert_eq!(
        check(&r, "SSM reach").status,
        Status::Passed,
        "{}",
        r.text()
    );
    assert_eq!(check(&r, "SSM agent download").status, Status::Passed);
}

#[tokio::test]
async fn an_instance_type_not_offered_in_the_zone_or_of_another_architecture_fails() {
    let w = world().await;
    w.profile("pf-builder", true).await;
    w.route_to_igw(&w.default_vpc().await).await;
    // moto's offerings: c8a.large in eu-west-1a and b, not c.
    let subnet = w.default_subnet("eu-west-1c").await;
    let r = bake(
        &w.c,
        &w.def(&format!(
            "type = \"c8a.large\"\ninstance_profile = \"pf-builder\"\nsubnet = \"{subnet}\""
        )),
    )
    .await;
    let c = check(&r, "instance type offered");
    assert_eq!(c.status, Status::Failed, "{}", r.text());
    assert!(
        c.detail.contains("not offered in eu-west-1c"),
        "{}",
        c.detail
    );
    assert!(c
        .fix
        .as_deref()
        .unwrap()
        .contains("describe-instance-type-offerings"));

    let r = bake(
        &w.c,
        &w.def("type = \"t4g.small\"\ninstance_profile = \"pf-builder\""),
    )
    .await;
    let c = check(&r, "instance type");
    assert_eq!(c.status, Status::Failed, "{}", r.text());
    assert!(c.detail.contains("arm64"), "{}", c.detail);

    let r = bake(
        &w.c,
        &w.def("type = \"t9.nonesuch\"\ninstance_profile = \"pf-builder\""),
    )
    .await;
    assert_eq!(
        check(&r, "instance type").status,
        Status::Failed,
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn a_deploy_checks_its_target_groups_and_its_lock() {
    let w = world().await;
    let dw = DeployWorld::create(&w.config).await;
    let cfg = |tgs: Vec<String>| {
        config::merge(
            "pfweb",
            None,
            "",
            DeployFile::default(),
            &Overrides {
                image: Some(ImageRef::Ami(dw.amis[0].clone())),
                count: Some(1),
                subnets: dw.subnets.clone(),
                target_groups: tgs,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let r = deploy(&w.c, &cfg(vec![dw.target_group.clone()]), w.defs.path()).await;
    assert!(r.passed(), "{}", r.text());
    let tg = check(&r, "target group");
    assert!(
        tg.detail.contains(&dw.vpc) && tg.detail.contains("health check"),
        "{}",
        tg.detail
    );
    assert!(check(&r, "deploy lock").detail.starts_with("free"));
    assert_eq!(check(&r, "image").status, Status::Passed);

    // A target group in another VPC.
    let other =
        w.c.ec2
            .create_vpc()
            .cidr_block("10.7.0.0/16")
            .send()
            .await
            .unwrap();
    let other_vpc = other.vpc().unwrap().vpc_id().unwrap();
    let elsewhere =
        w.c.elb
            .create_target_group()
            .name("elsewhere")
            .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
            .port(80)
            .vpc_id(other_vpc)
            .send()
            .await
            .unwrap()
            .target_groups()[0]
            .target_group_arn()
            .unwrap()
            .to_string();
    let r = deploy(&w.c, &cfg(vec![elsewhere]), w.defs.path()).await;
    assert_eq!(
        check(&r, "target group").status,
        Status::Failed,
        "{}",
        r.text()
    );

    // Someone holds the lock.
    let held = crate::deploy::lock::LockRecord::new(
        "d-other",
        std::time::SystemTime::now(),
        std::time::Duration::from_secs(3600),
    );
    w.c.ssm
        .put_parameter()
        .name(crate::deploy::lock::parameter("pfweb"))
        .value(serde_json::to_string(&held).unwrap())
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let r = deploy(&w.c, &cfg(vec![dw.target_group.clone()]), w.defs.path()).await;
    let lock = check(&r, "deploy lock");
    assert_eq!(lock.status, Status::Failed, "{}", r.text());
    assert!(lock.detail.contains("d-other"));
}

#[test]
fn a_failed_check_names_its_fix_on_one_line() {
    let c = Check::failed("subnet", "gone", "name another");
    assert_eq!(c.line(), "FAILED     subnet: gone -> fix: name another");
    let j = serde_json::to_value(&c).unwrap();
    assert_eq!(j["status"], "failed");
    assert_eq!(j["fix"], "name another");
    let u = serde_json::to_value(Check::unchecked("KMS key", "why")).unwrap();
    assert!(u.get("fix").is_none());
}

#[test]
fn an_assumed_role_is_simulated_as_its_role() {
    let c = identity::Caller {
        account: "123456789012".into(),
        arn: "arn:aws:sts::123456789012:assumed-role/deployer/gha-42".into(),
    };
    assert_eq!(
        c.principal(),
        (
            "arn:aws:iam::123456789012:role/deployer".to_string(),
            Some("deployer".to_string())
        )
    );
    assert!(identity::source_of("EnvironmentVariable").contains("environment"));
    assert!(identity::source_of("SSO").contains("SSO"));
    assert!(identity::source_of("WebIdentityToken").contains("web identity"));
    assert!(identity::source_of("IMDSv2").contains("instance role"));
    assert_eq!(
        access::profile_name("arn:aws:iam::123456789012:instance-profile/ops/web"),
        "web"
    );
    assert_eq!(access::profile_name("web"), "web");
}
