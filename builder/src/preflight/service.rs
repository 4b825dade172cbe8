//! A deploy's service: its target groups and its deploy lock.

use super::Check;
use crate::aws::{describe_error, error_code};
use crate::deploy::lock;

/// Each target group exists, sits in the subnets' VPC, and what its health check asks.
pub async fn target_groups(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    arns: &[String],
    vpc: Option<&str>,
) -> Vec<Check> {
    const NAME: &str = "target group";
    let out = match elb
        .describe_target_groups()
        .set_target_group_arns(Some(arns.to_vec()))
        .send()
        .await
    {
        Ok(o) => o,
        Err(e) if error_code(&e) == Some("TargetGroupNotFound") => {
            return vec![Check::failed(
                NAME,
                format!(
                    "not found among {}: {}",
                    arns.join(", "),
                    describe_error(&e)
                ),
                "name target groups that exist in this region (--target-group, target_groups)",
            )]
        }
        Err(e) => {
            return vec![Check::unchecked(
                NAME,
                format!(
                    "elasticloadbalancing:DescribeTargetGroups failed: {}",
                    describe_error(&e)
                ),
            )]
        }
    };
    let mut checks = Vec::new();
    for arn in arns {
        let Some(tg) = out
            .target_groups()
            .iter()
            .find(|t| t.target_group_arn() == Some(arn.as_str()))
        else {
            checks.push(Check::failed(
                NAME,
                format!("{arn} not found"),
                "name target groups that exist in this region",
            ));
            continue;
        };
        let name = tg.target_group_name().unwrap_or(arn);
        let health = format!(
            "health check {} :{} {} every {}s, healthy after {}",
            tg.health_check_protocol()
                .map(|p| p.as_str())
                .unwrap_or("?"),
            tg.health_check_port().unwrap_or("traffic-port"),
            tg.health_check_path().unwrap_or(""),
            tg.health_check_interval_seconds().unwrap_or(0),
            tg.healthy_threshold_count().unwrap_or(0)
        );
        let tg_vpc = tg.vpc_id().unwrap_or_default();
        match vpc {
            Some(v) if v != tg_vpc => checks.push(Check::failed(
                NAME,
                format!("{name} is in {tg_vpc}, the subnets in {v}"),
                "use subnets of the target group's VPC, or a target group in theirs",
            )),
            _ => checks.push(Check::passed(NAME, format!("{name} in {tg_vpc}, {health}"))),
        }
    }
    checks
}

/// Who holds the service's deploy lock.
pub async fn lock(ssm: &aws_sdk_ssm::Client, service: &str) -> Check {
    const NAME: &str = "deploy lock";
    let param = lock::parameter(service);
    match lock::read(ssm, service).await {
        Ok(None) => Check::passed(NAME, format!("free ({param})")),
        Ok(Some((_, Some(rec)))) => {
            if rec.expired(std::time::SystemTime::now()).unwrap_or(false) {
                Check::passed(
                    NAME,
                    format!(
                        "held by an expired {}: the deploy takes it over",
                        rec.describe()
                    ),
                )
            } else {
                Check::failed(
                    NAME,
                    format!("held by {}", rec.describe()),
                    format!("wait for that deploy to end; if it died, the lock frees at its expiry (or delete {param})"),
                )
            }
        }
        Ok(Some((raw, None))) => Check::failed(
            NAME,
            format!("{param} holds `{raw}`, not a lock record"),
            format!("delete the parameter {param} if no deploy is running"),
        ),
        Err(e) => Check::unchecked(NAME, format!("{e:#}")),
    }
}
