//! The fleet in one paginated `DescribeInstances` (1,000 a page): a 10,000-instance fleet is ten
//! calls per look.

use super::{tags, Instance, Selector};
use crate::aws::{aws_error, filter};
use anyhow::{Context, Result};
use aws_sdk_ec2::primitives::DateTimeFormat;
use aws_sdk_ec2::types::Filter;

/// The states listed: up, or on the way down (still reporting).
pub const STATES: [&str; 4] = ["pending", "running", "stopping", "shutting-down"];

/// The instances `selector` names, sorted by id.
pub async fn list(ec2: &aws_sdk_ec2::Client, selector: &Selector) -> Result<Vec<Instance>> {
    let by = match selector {
        Selector::Service(s) => filter(&format!("tag:{}", tags::SERVICE), s),
        Selector::Asg(a) => filter(&format!("tag:{}", tags::ASG), a),
    };
    let states = Filter::builder()
        .name("instance-state-name")
        .set_values(Some(STATES.iter().map(|s| s.to_string()).collect()))
        .build();
    let mut pages = ec2
        .describe_instances()
        .filters(by)
        .filters(states)
        .max_results(1000)
        .into_paginator()
        .send();
    let mut out = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(aws_error).with_context(|| {
            format!("listing the instances of {selector} (needs ec2:DescribeInstances)")
        })?;
        for r in page.reservations() {
            out.extend(r.instances().iter().map(row));
        }
    }
    out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    Ok(out)
}

fn row(i: &aws_sdk_ec2::types::Instance) -> Instance {
    let tag = |k: &str| {
        i.tags()
            .iter()
            .find(|t| t.key() == Some(k))
            .and_then(|t| t.value())
            .map(str::trim)
            .filter(|v| !v.is_empty() && *v != "none")
            .map(str::to_string)
    };
    Instance {
        instance_id: i.instance_id().unwrap_or_default().to_string(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map_or("unknown".into(), |n| n.as_str().to_string()),
        zone: i
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or_default()
            .to_string(),
        image_id: i.image_id().unwrap_or_default().to_string(),
        launch_time: i
            .launch_time()
            .and_then(|t| t.fmt(DateTimeFormat::DateTime).ok()),
        salt_commit: tag(tags::SALT_COMMIT),
        config_commit: tag(tags::CONFIG_COMMIT),
        outcome: tag(tags::OUTCOME),
        failed_states: tag(tags::FAILED_STATES).and_then(|n| n.parse().ok()),
        problems: tag(tags::PROBLEMS)
            .map(|p| {
                p.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
        reverted: tag(tags::REVERTED)
            .map(|v| {
                v.split(',')
                    .filter_map(|e| e.trim().split_once(':'))
                    .map(|(r, c)| (r.to_string(), c.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        reported_at: tag(tags::REPORTED_AT),
    }
}
