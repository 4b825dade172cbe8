//! What the caller may do (simulated by IAM) and the instance profile the machines get.

use super::identity::Caller;
use super::Check;
use crate::aws::{describe_error, error_code};
use aws_sdk_iam::types::PolicyEvaluationDecisionType;

/// The actions a bake on AWS calls (README, "AWS set-up").
pub const BAKE_ACTIONS: &[&str] = &[
    "ec2:DescribeImages",
    "ec2:DescribeInstances",
    "ec2:DescribeSubnets",
    "ec2:DescribeVpcs",
    "ec2:DescribeSecurityGroups",
    "ec2:CreateSecurityGroup",
    "ec2:DeleteSecurityGroup",
    "ec2:RunInstances",
    "ec2:StopInstances",
    "ec2:TerminateInstances",
    "ec2:CreateTags",
    "ec2:CreateImage",
    "ec2:CopyImage",
    "ec2:DeregisterImage",
    "ec2:DeleteSnapshot",
    "ec2:DescribeSnapshots",
    "ec2:DescribeVolumes",
    "ec2:ModifyImageAttribute",
    "ec2:ModifySnapshotAttribute",
    "ec2:EnableImageDeprecation",
    "ec2:GetConsoleOutput",
    "iam:PassRole",
    "ssm:SendCommand",
    "ssm:GetCommandInvocation",
    "ssm:CancelCommand",
    "ssm:DescribeInstanceInformation",
    "ssm:GetParameter",
    "ssm:PutParameter",
];

/// With an encrypted image's KMS key.
pub const KMS_ACTIONS: &[&str] = &[
    "kms:CreateGrant",
    "kms:DescribeKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
];

/// The actions a deploy calls (README, "IAM for the deployer").
pub const DEPLOY_ACTIONS: &[&str] = &[
    "ec2:DescribeImages",
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceStatus",
    "ec2:RunInstances",
    "ec2:TerminateInstances",
    "ec2:CreateTags",
    "ec2:GetConsoleOutput",
    "iam:PassRole",
    "elasticloadbalancing:DescribeTargetGroups",
    "elasticloadbalancing:DescribeTargetGroupAttributes",
    "elasticloadbalancing:DescribeTargetHealth",
    "elasticloadbalancing:RegisterTargets",
    "elasticloadbalancing:DeregisterTargets",
    "ssm:GetParameter",
    "ssm:PutParameter",
    "ssm:DeleteParameter",
    "ssm:DeleteParameters",
    "ssm:GetParametersByPath",
];

/// With `--asg`.
pub const ASG_ACTIONS: &[&str] = &[
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:StartInstanceRefresh",
    "autoscaling:DescribeInstanceRefreshes",
    "autoscaling:CancelInstanceRefresh",
    "autoscaling:RollbackInstanceRefresh",
    "ec2:CreateLaunchTemplateVersion",
];

/// What SSM's agent calls on a managed instance (AmazonSSMManagedInstanceCore grants them).
pub const SSM_INSTANCE_ACTIONS: &[&str] = &[
    "ssm:UpdateInstanceInformation",
    "ssmmessages:CreateControlChannel",
    "ec2messages:GetMessages",
];

pub const SSM_POLICY: &str = "AmazonSSMManagedInstanceCore";

/// The outcome of a simulation: the actions denied, or why nothing could be simulated.
pub async fn simulate(
    iam: &aws_sdk_iam::Client,
    principal: &str,
    actions: &[String],
) -> Result<Vec<String>, String> {
    let mut denied = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let out = iam
            .simulate_principal_policy()
            .policy_source_arn(principal)
            .set_action_names(Some(actions.to_vec()))
            .resource_arns("*")
            .set_marker(marker.clone())
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                return Err(match error_code(&e) {
                    Some("AccessDenied" | "AccessDeniedException") => {
                        "the caller may not call iam:SimulatePrincipalPolicy".to_string()
                    }
                    _ => format!("iam:SimulatePrincipalPolicy failed: {}", describe_error(&e)),
                })
            }
        };
        for r in out.evaluation_results() {
            if r.eval_decision() != &PolicyEvaluationDecisionType::Allowed {
                denied.push(format!(
                    "{} ({})",
                    r.eval_action_name(),
                    r.eval_decision().as_str()
                ));
            }
        }
        if out.is_truncated() {
            marker = out.marker().map(str::to_string);
            if marker.is_none() {
                break;
            }
        } else {
            break;
        }
    }
    Ok(denied)
}

/// Each IAM action the command needs, simulated for the caller.
pub async fn actions(iam: &aws_sdk_iam::Client, caller: &Caller, actions: &[String]) -> Check {
    const NAME: &str = "IAM actions";
    let (mut principal, role) = caller.principal();
    if let Some(role) = role {
        // A role with a path: IAM knows its full ARN.
        if let Ok(out) = iam.get_role().role_name(&role).send().await {
            if let Some(arn) = out.role().map(|r| r.arn()) {
                principal = arn.to_string();
            }
        }
    }
    match simulate(iam, &principal, actions).await {
        Ok(denied) if denied.is_empty() => Check::passed(
            NAME,
            format!("all {} allowed for {principal}", actions.len()),
        ),
        Ok(denied) => Check::failed(
            NAME,
            format!(
                "{} of {} not allowed for {principal}: {}",
                denied.len(),
                actions.len(),
                denied.join(", ")
            ),
            "grant them to the caller (README, AWS set-up / IAM for the deployer)",
        ),
        Err(why) => Check::unchecked(
            NAME,
            format!("{why}; the {} actions are unchecked", actions.len()),
        ),
    }
}

/// The profile's name, from a name or an ARN.
pub fn profile_name(profile: &str) -> &str {
    if profile.starts_with("arn:") {
        profile.rsplit('/').next().unwrap_or(profile)
    } else {
        profile
    }
}

/// The instance profile exists, and (for a seed, `needs_ssm`) its role carries SSM's
/// managed-instance permissions.
pub async fn instance_profile(
    iam: &aws_sdk_iam::Client,
    name: Option<&str>,
    needs_ssm: bool,
) -> Check {
    const NAME: &str = "instance profile";
    let Some(given) = name else {
        return if needs_ssm {
            Check::failed(
                NAME,
                "none set: the seed cannot register with SSM without one",
                format!("set [instance] instance_profile to a profile whose role has {SSM_POLICY}"),
            )
        } else {
            Check::passed(NAME, "none set")
        };
    };
    // A name or an ARN (`arn:aws:iam::1:instance-profile/path/NAME`): IAM looks it up by name.
    let name = profile_name(given);
    let out = match iam.get_instance_profile().instance_profile_name(name).send().await {
        Ok(o) => o,
        Err(e) if error_code(&e) == Some("NoSuchEntity") => {
            return Check::failed(
                NAME,
                format!("{name} does not exist"),
                format!("create it (aws iam create-instance-profile --instance-profile-name {name}) with a role that has {SSM_POLICY}, or name another"),
            )
        }
        Err(e) if matches!(error_code(&e), Some("AccessDenied" | "AccessDeniedException")) => {
            return Check::unchecked(
                NAME,
                format!("{name}: the caller may not call iam:GetInstanceProfile"),
            )
        }
        Err(e) => {
            return Check::failed(
                NAME,
                format!("{name}: iam:GetInstanceProfile failed: {}", describe_error(&e)),
                "check the name and the caller's IAM access",
            )
        }
    };
    let Some(role) = out.instance_profile().and_then(|p| p.roles().first()) else {
        return Check::failed(
            NAME,
            format!("{name} has no role"),
            format!("add a role with {SSM_POLICY}: aws iam add-role-to-instance-profile --instance-profile-name {name} --role-name ROLE"),
        );
    };
    let role_name = role.role_name().to_string();
    if !needs_ssm {
        return Check::passed(NAME, format!("{name} (role {role_name})"));
    }
    let attached = iam
        .list_attached_role_policies()
        .role_name(&role_name)
        .send()
        .await;
    if let Ok(out) = &attached {
        if out
            .attached_policies()
            .iter()
            .any(|p| p.policy_name() == Some(SSM_POLICY))
        {
            return Check::passed(
                NAME,
                format!("{name} (role {role_name}, {SSM_POLICY} attached)"),
            );
        }
    }
    let wanted: Vec<String> = SSM_INSTANCE_ACTIONS.iter().map(|s| s.to_string()).collect();
    match simulate(iam, role.arn(), &wanted).await {
        Ok(denied) if denied.is_empty() => Check::passed(
            NAME,
            format!("{name} (role {role_name} may call SSM's managed-instance actions)"),
        ),
        Ok(denied) => Check::failed(
            NAME,
            format!("{name}: role {role_name} lacks {}", denied.join(", ")),
            format!("aws iam attach-role-policy --role-name {role_name} --policy-arn arn:aws:iam::aws:policy/{SSM_POLICY}"),
        ),
        Err(why) => match attached {
            // Its inline policies may grant the actions: unknown, not failed.
            Ok(_) => Check::unchecked(
                NAME,
                format!("{name}: role {role_name} does not have {SSM_POLICY} attached, and its own policies could not be simulated ({why}); if the seed never registers with SSM: aws iam attach-role-policy --role-name {role_name} --policy-arn arn:aws:iam::aws:policy/{SSM_POLICY}"),
            ),
            Err(_) => Check::unchecked(
                NAME,
                format!("{name} exists (role {role_name}); its policies could not be read ({why})"),
            ),
        },
    }
}
