//! `builder preflight`: everything a bake on AWS or a deploy needs, checked before anything is
//! made. Each check is one function returning a [`Check`]: passed, failed with the fix, or
//! unchecked with why. Checks that need an earlier one (the caller, for the IAM simulation) are
//! marked unchecked when it failed, so one missing credential gives one failure, not twenty.
//!
//! What preflight cannot know: service control policies and permission boundaries beyond what
//! `iam:SimulatePrincipalPolicy` evaluates, network ACLs and security groups on endpoints, DNS
//! inside the VPC, S3 bucket policies (the SSM agent's download), and capacity at launch time.

pub mod access;
pub mod compute;
pub mod identity;
pub mod network;
pub mod service;

#[cfg(test)]
mod tests;

use crate::definition::ImageDef;
use crate::deploy::config::DeployConfig;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Passed,
    Failed,
    Unchecked,
}

/// One check's result: one line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found (passed, failed) or why it was not checked.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn passed(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Passed,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn failed(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Failed,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn unchecked(name: &str, why: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Unchecked,
            detail: why.into(),
            fix: None,
        }
    }

    /// The check's one line.
    pub fn line(&self) -> String {
        match self.status {
            Status::Passed => format!("ok         {}: {}", self.name, self.detail),
            Status::Failed => format!(
                "FAILED     {}: {}{}",
                self.name,
                self.detail,
                self.fix
                    .as_deref()
                    .map(|f| format!(" -> fix: {f}"))
                    .unwrap_or_default()
            ),
            Status::Unchecked => format!("unchecked  {}: {}", self.name, self.detail),
        }
    }
}

/// All checks of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `bake IMAGE` or `deploy SERVICE`.
    pub subject: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.checks
            .iter()
            .filter(|c| c.status == Status::Failed)
            .count()
    }

    pub fn passed(&self) -> bool {
        self.failed() == 0
    }

    pub fn text(&self) -> String {
        self.checks.iter().map(|c| c.line() + "\n").collect()
    }

    /// The error a failed preflight ends the command with.
    pub fn error(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "preflight for {}: {} of {} checks failed (nothing was created; --skip-preflight skips the checks)",
            self.subject,
            self.failed(),
            self.checks.len()
        )
    }
}

/// The clients preflight uses.
#[derive(Clone)]
pub struct Clients {
    pub config: aws_config::SdkConfig,
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub sts: aws_sdk_sts::Client,
    pub iam: aws_sdk_iam::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
}

impl Clients {
    pub fn new(config: &aws_config::SdkConfig) -> Clients {
        Clients {
            config: config.clone(),
            ec2: aws_sdk_ec2::Client::new(config),
            ssm: aws_sdk_ssm::Client::new(config),
            sts: aws_sdk_sts::Client::new(config),
            iam: aws_sdk_iam::Client::new(config),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(config),
        }
    }
}

/// The identity checks every command starts with; None as the caller when they failed (the
/// checks after them are then marked unchecked).
async fn identity_checks(c: &Clients, checks: &mut Vec<Check>) -> Option<identity::Caller> {
    let creds = identity::credentials(&c.config).await;
    let creds_ok = creds.status == Status::Passed;
    checks.push(creds);
    let region = identity::region(&c.config);
    let region_ok = region.status == Status::Passed;
    checks.push(region);
    if !creds_ok || !region_ok {
        checks.push(Check::unchecked(
            "caller",
            "needs credentials and a region first",
        ));
        return None;
    }
    let (check, caller) = identity::caller(&c.sts).await;
    checks.push(check);
    caller
}

/// The checks for `bake IMAGE --target aws`.
pub async fn bake(c: &Clients, def: &ImageDef) -> Report {
    let mut checks = Vec::new();
    let subject = format!("bake {}", def.image);
    let Some(caller) = identity_checks(c, &mut checks).await else {
        checks.push(Check::unchecked(
            "the rest",
            "AWS cannot be asked anything until the checks above pass",
        ));
        return Report { subject, checks };
    };
    let mut actions: Vec<String> = access::BAKE_ACTIONS.iter().map(|s| s.to_string()).collect();
    if def.kms_key.is_some() {
        actions.extend(access::KMS_ACTIONS.iter().map(|s| s.to_string()));
    }
    checks.push(access::actions(&c.iam, &caller, &actions).await);
    checks.push(access::instance_profile(&c.iam, def.instance_profile.as_deref(), true).await);
    let subnet = network::subnet_for(&c.ec2, def.subnet.as_deref()).await;
    let (source_check, source) = compute::source(&c.ec2, &c.ssm, &def.source).await;
    checks.push(source_check);
    match &subnet {
        Ok(s) => {
            checks.extend(network::reach(&c.ec2, s).await);
            checks.push(
                compute::offered(&c.ec2, &def.instance_type, std::slice::from_ref(&s.zone)).await,
            );
        }
        Err(check) => {
            checks.push(check.clone());
        }
    }
    checks.push(compute::architecture(&c.ec2, &def.instance_type, source.as_ref()).await);
    if let Some(key) = &def.kms_key {
        checks.push(compute::kms_key(key));
    }
    Report { subject, checks }
}

/// The checks for `deploy SERVICE` (and `rollback`).
pub async fn deploy(c: &Clients, cfg: &DeployConfig, images_dir: &Path) -> Report {
    let mut checks = Vec::new();
    let subject = format!("deploy {}", cfg.service);
    let Some(caller) = identity_checks(c, &mut checks).await else {
        checks.push(Check::unchecked(
            "the rest",
            "AWS cannot be asked anything until the checks above pass",
        ));
        return Report { subject, checks };
    };
    let mut actions: Vec<String> = access::DEPLOY_ACTIONS
        .iter()
        .map(|s| s.to_string())
        .collect();
    if cfg.asg.is_some() {
        actions.extend(access::ASG_ACTIONS.iter().map(|s| s.to_string()));
    }
    checks.push(access::actions(&c.iam, &caller, &actions).await);
    if cfg.instance_profile.is_some() {
        checks.push(access::instance_profile(&c.iam, cfg.instance_profile.as_deref(), false).await);
    }
    let (source_check, source) = compute::deploy_image(c, &cfg.image, images_dir).await;
    checks.push(source_check);
    let (subnet_check, subnets) = network::subnets(&c.ec2, &cfg.subnets).await;
    checks.push(subnet_check);
    if cfg.asg.is_none() {
        let zones: Vec<String> = subnets.iter().map(|s| s.zone.clone()).collect();
        if !zones.is_empty() {
            checks.push(compute::offered(&c.ec2, &cfg.instance_type, &zones).await);
        }
        checks.push(compute::architecture(&c.ec2, &cfg.instance_type, source.as_ref()).await);
    }
    let vpc = subnets.first().map(|s| s.vpc.clone());
    if !cfg.target_groups.is_empty() {
        checks.extend(service::target_groups(&c.elb, &cfg.target_groups, vpc.as_deref()).await);
    }
    checks.push(service::lock(&c.ssm, &cfg.service).await);
    Report { subject, checks }
}
