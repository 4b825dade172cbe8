//! The subnet: it exists, and a machine in it can reach SSM (and the SSM agent's download).

use super::Check;
use crate::aws::filter;
use crate::aws::{describe_error, error_code};
use aws_sdk_ec2::types::{RouteState, RouteTable, VpcEndpoint};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    pub id: String,
    pub vpc: String,
    pub zone: String,
    pub public_ip: bool,
    /// Named by the definition, rather than the default VPC's.
    pub given: bool,
}

fn info(s: &aws_sdk_ec2::types::Subnet, given: bool) -> SubnetInfo {
    SubnetInfo {
        id: s.subnet_id().unwrap_or_default().to_string(),
        vpc: s.vpc_id().unwrap_or_default().to_string(),
        zone: s.availability_zone().unwrap_or_default().to_string(),
        public_ip: s.map_public_ip_on_launch().unwrap_or(false),
        given,
    }
}

/// The seed's subnet: the definition's, else the default VPC's first default subnet (where
/// RunInstances puts an instance without one).
pub async fn subnet_for(
    ec2: &aws_sdk_ec2::Client,
    subnet: Option<&str>,
) -> Result<SubnetInfo, Check> {
    const NAME: &str = "subnet";
    if let Some(id) = subnet {
        let (check, found) = subnets(ec2, &[id.to_string()]).await;
        return found.into_iter().next().ok_or(check);
    }
    let vpcs = ec2
        .describe_vpcs()
        .filters(filter("isDefault", "true"))
        .send()
        .await
        .map_err(|e| {
            Check::failed(
                NAME,
                format!("looking for the default VPC: {}", describe_error(&e)),
                "set [instance] subnet",
            )
        })?;
    let Some(vpc) = vpcs.vpcs().first().and_then(|v| v.vpc_id()) else {
        return Err(Check::failed(
            NAME,
            "none set, and the region has no default VPC",
            "set [instance] subnet to a subnet id",
        ));
    };
    let out = ec2
        .describe_subnets()
        .filters(filter("vpc-id", vpc))
        .send()
        .await
        .map_err(|e| {
            Check::failed(
                NAME,
                format!("listing the default VPC's subnets: {}", describe_error(&e)),
                "set [instance] subnet",
            )
        })?;
    let mut found: Vec<SubnetInfo> = out
        .subnets()
        .iter()
        .filter(|s| s.default_for_az() == Some(true))
        .map(|s| info(s, false))
        .collect();
    found.sort_by(|a, b| a.zone.cmp(&b.zone));
    found.into_iter().next().ok_or_else(|| {
        Check::failed(
            NAME,
            format!("none set, and the default VPC {vpc} has no default subnet"),
            "set [instance] subnet to a subnet id",
        )
    })
}

/// The deploy's subnets: they exist and share one VPC.
pub async fn subnets(ec2: &aws_sdk_ec2::Client, ids: &[String]) -> (Check, Vec<SubnetInfo>) {
    const NAME: &str = "subnets";
    if ids.is_empty() {
        return (
            Check::passed(NAME, "none set (EC2 picks a default subnet)"),
            Vec::new(),
        );
    }
    match ec2
        .describe_subnets()
        .set_subnet_ids(Some(ids.to_vec()))
        .send()
        .await
    {
        Ok(out) => {
            let found: Vec<SubnetInfo> = out.subnets().iter().map(|s| info(s, true)).collect();
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !found.iter().any(|f| &f.id == *id))
                .collect();
            if !missing.is_empty() {
                return (
                    Check::failed(
                        NAME,
                        format!("not found: {missing:?}"),
                        "name subnets that exist in this region",
                    ),
                    found,
                );
            }
            let mut vpcs: Vec<&str> = found.iter().map(|f| f.vpc.as_str()).collect();
            vpcs.sort();
            vpcs.dedup();
            if vpcs.len() > 1 {
                return (
                    Check::failed(
                        NAME,
                        format!("in more than one VPC: {vpcs:?}"),
                        "name subnets of one VPC",
                    ),
                    found,
                );
            }
            (
                Check::passed(
                    NAME,
                    found
                        .iter()
                        .map(|f| format!("{} ({}, {})", f.id, f.vpc, f.zone))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                found,
            )
        }
        Err(e) if error_code(&e) == Some("InvalidSubnetID.NotFound") => (
            Check::failed(
                NAME,
                format!("not found: {}", describe_error(&e)),
                "name subnets that exist in this region (check AWS_REGION)",
            ),
            Vec::new(),
        ),
        Err(e) => (
            Check::failed(
                NAME,
                format!("ec2:DescribeSubnets failed: {}", describe_error(&e)),
                "check the subnet ids and the caller's ec2:DescribeSubnets",
            ),
            Vec::new(),
        ),
    }
}

/// How a subnet gets out of its VPC, per its route table's 0.0.0.0/0 route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteOut {
    Nat(String),
    InternetGateway(String),
    /// A transit gateway, a NAT instance or a peering: maybe out, maybe not.
    Other(String),
    None,
}

/// The route table that applies to the subnet: its explicit association, else the VPC's main.
pub async fn route_table(
    ec2: &aws_sdk_ec2::Client,
    subnet: &SubnetInfo,
) -> Result<Option<RouteTable>, String> {
    let explicit = ec2
        .describe_route_tables()
        .filters(filter("association.subnet-id", &subnet.id))
        .send()
        .await
        .map_err(|e| format!("ec2:DescribeRouteTables failed: {}", describe_error(&e)))?;
    if let Some(t) = explicit.route_tables().first() {
        return Ok(Some(t.clone()));
    }
    let main = ec2
        .describe_route_tables()
        .filters(filter("vpc-id", &subnet.vpc))
        .filters(filter("association.main", "true"))
        .send()
        .await
        .map_err(|e| format!("ec2:DescribeRouteTables failed: {}", describe_error(&e)))?;
    Ok(main.route_tables().first().cloned())
}

pub fn route_out(table: &RouteTable) -> RouteOut {
    let mut out = RouteOut::None;
    for r in table.routes() {
        if r.destination_cidr_block() != Some("0.0.0.0/0")
            || r.state() == Some(&RouteState::Blackhole)
        {
            continue;
        }
        if let Some(nat) = r.nat_gateway_id() {
            return RouteOut::Nat(nat.to_string());
        }
        if let Some(gw) = r.gateway_id().filter(|g| g.starts_with("igw-")) {
            out = RouteOut::InternetGateway(gw.to_string());
        } else if out == RouteOut::None {
            let via = r
                .transit_gateway_id()
                .or(r.instance_id())
                .or(r.vpc_peering_connection_id())
                .or(r.network_interface_id())
                .or(r.gateway_id());
            if let Some(via) = via {
                out = RouteOut::Other(via.to_string());
            }
        }
    }
    out
}

/// Whether an endpoint of the VPC serves `service` (`ssm`, `s3`) and is usable.
fn endpoint_for<'a>(
    endpoints: &'a [VpcEndpoint],
    region: &str,
    service: &str,
) -> Option<&'a VpcEndpoint> {
    let name = format!("com.amazonaws.{region}.{service}");
    endpoints.iter().find(|e| {
        e.service_name() == Some(name.as_str())
            && !matches!(
                e.state().map(|s| s.as_str().to_ascii_lowercase()),
                Some(ref s) if s == "deleted" || s == "deleting" || s == "failed" || s == "rejected"
            )
    })
}

/// The subnet's way to SSM, and to the SSM agent's download in S3.
pub async fn reach(ec2: &aws_sdk_ec2::Client, subnet: &SubnetInfo) -> Vec<Check> {
    const SSM: &str = "SSM reach";
    const AGENT: &str = "SSM agent download";
    let region = ec2
        .config()
        .region()
        .map(|r| r.to_string())
        .unwrap_or_default();
    let which = if subnet.given {
        format!("subnet {} ({})", subnet.id, subnet.vpc)
    } else {
        format!("default subnet {} ({}, none set)", subnet.id, subnet.vpc)
    };
    let table = match route_table(ec2, subnet).await {
        Ok(t) => t,
        Err(why) => {
            return vec![
                Check::unchecked(SSM, format!("{which}: {why}")),
                Check::unchecked(AGENT, format!("{which}: {why}")),
            ]
        }
    };
    let endpoints = match ec2
        .describe_vpc_endpoints()
        .filters(filter("vpc-id", &subnet.vpc))
        .send()
        .await
    {
        Ok(o) => o.vpc_endpoints().to_vec(),
        Err(e) => {
            let why = format!("ec2:DescribeVpcEndpoints failed: {}", describe_error(&e));
            return vec![
                Check::unchecked(SSM, format!("{which}: {why}")),
                Check::unchecked(AGENT, format!("{which}: {why}")),
            ];
        }
    };
    let out = table.as_ref().map(route_out).unwrap_or(RouteOut::None);
    let table_id = table
        .as_ref()
        .and_then(|t| t.route_table_id())
        .unwrap_or("none")
        .to_string();
    // Whether the route out carries the seed's traffic: a NAT does; an internet gateway only
    // for a public IP (the launch asks for none; the subnet's MapPublicIpOnLaunch decides).
    let (out_ok, out_said) = match &out {
        RouteOut::Nat(n) => (true, format!("0.0.0.0/0 via NAT gateway {n} in {table_id}")),
        RouteOut::InternetGateway(g) if subnet.public_ip => (
            true,
            format!("0.0.0.0/0 via internet gateway {g} in {table_id}, public IPs on launch"),
        ),
        RouteOut::InternetGateway(g) => (
            false,
            format!("0.0.0.0/0 via internet gateway {g} in {table_id}, but the subnet gives no public IPs"),
        ),
        RouteOut::Other(v) => (true, format!("0.0.0.0/0 via {v} in {table_id} (assumed to lead out)")),
        RouteOut::None => (false, format!("no 0.0.0.0/0 route in {table_id}")),
    };
    let missing: Vec<&str> = ["ssm", "ssmmessages", "ec2messages"]
        .into_iter()
        .filter(|s| endpoint_for(&endpoints, &region, s).is_none())
        .collect();
    let fix_route = "add VPC interface endpoints for ssm, ssmmessages and ec2messages, or a 0.0.0.0/0 route to a NAT gateway (or an internet gateway with public IPs on launch), or set [instance] subnet to a subnet that has them";
    let ssm = if missing.is_empty() {
        Check::passed(
            SSM,
            format!("{which}: VPC endpoints for ssm, ssmmessages and ec2messages"),
        )
    } else if out_ok {
        Check::passed(SSM, format!("{which}: {out_said}"))
    } else {
        Check::failed(
            SSM,
            format!(
                "{which}: {out_said}, no VPC endpoint for {}",
                missing.join(", ")
            ),
            fix_route,
        )
    };
    let s3 = endpoint_for(&endpoints, &region, "s3")
        .filter(|e| e.route_table_ids().iter().any(|t| t == &table_id));
    let agent = if let Some(e) = s3 {
        Check::passed(
            AGENT,
            format!(
                "{which}: S3 gateway endpoint {} in {table_id}",
                e.vpc_endpoint_id().unwrap_or("?")
            ),
        )
    } else if out_ok {
        Check::passed(AGENT, format!("{which}: {out_said}"))
    } else {
        Check::failed(
            AGENT,
            format!("{which}: {out_said}, no S3 gateway endpoint in it; the seed downloads the SSM agent from S3 when the image has none (Debian's have none)"),
            format!("add an S3 gateway endpoint (com.amazonaws.{region}.s3) to route table {table_id}, or a route out; if the source image has its own agent, --skip-preflight"),
        )
    };
    vec![ssm, agent]
}
