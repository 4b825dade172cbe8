//! The deploy lock: one SSM parameter per service, `/stackless/deploy/SERVICE/lock`, created with
//! `PutParameter` without overwrite. That call is an atomic create-if-absent: the deploy that
//! creates it holds the lock, any other gets `ParameterAlreadyExists` and is refused with who holds
//! it. A lock past its expiry (its holder was killed) is taken over: deleted, then created again
//! without overwrite, so of two deploys taking over the same stale lock at most one wins the
//! create. (SSM has no conditional delete: the taker re-reads the lock just before deleting it and
//! only deletes the stale value it saw, which leaves a window of one API round trip.)

use crate::aws::aws_error;
use crate::aws::error_code as aws_code;
use anyhow::{bail, Context, Result};
use aws_sdk_ssm::types::ParameterType;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime};

/// What the lock parameter holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub deploy_id: String,
    /// `user@host`.
    pub owner: String,
    pub pid: u32,
    /// RFC 3339.
    pub started: String,
    pub expires: String,
}

impl LockRecord {
    pub fn new(deploy_id: &str, now: SystemTime, ttl: Duration) -> Self {
        LockRecord {
            deploy_id: deploy_id.to_string(),
            owner: owner(),
            pid: std::process::id(),
            started: stamp(now),
            expires: stamp(now + ttl),
        }
    }

    /// Ok(true) when past its expiry; an unreadable expiry is never guessed at.
    pub fn expired(&self, now: SystemTime) -> Result<bool> {
        let at = humantime::parse_rfc3339_weak(&self.expires)
            .with_context(|| format!("the lock's expiry `{}` is not a time", self.expires))?;
        Ok(at <= now)
    }

    pub fn describe(&self) -> String {
        format!(
            "deploy {} by {} (pid {}), started {}, expires {}",
            self.deploy_id, self.owner, self.pid, self.started, self.expires
        )
    }
}

pub fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `user@host` of this process.
pub fn owner() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}

pub fn parameter(service: &str) -> String {
    format!("/stackless/deploy/{service}/lock")
}

/// What taking the lock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    Fresh,
    /// Took over an expired lock; what it held.
    TookOver(LockRecord),
}

async fn create(ssm: &aws_sdk_ssm::Client, name: &str, record: &LockRecord) -> Result<bool> {
    let value = serde_json::to_string(record)?;
    match ssm
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(ParameterType::String)
        .description("stackless deploy lock: the deploy that holds it; removed when it ends")
        .overwrite(false)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if aws_code(&e) == Some("ParameterAlreadyExists") => Ok(false),
        Err(e) => Err(aws_error(e)).with_context(|| {
            format!("creating the deploy lock {name} (needs ssm:PutParameter on it)")
        }),
    }
}

/// The lock as it is now: None when nobody holds it. The raw value comes with it, for messages.
pub async fn read(
    ssm: &aws_sdk_ssm::Client,
    service: &str,
) -> Result<Option<(String, Option<LockRecord>)>> {
    let name = parameter(service);
    match ssm.get_parameter().name(&name).send().await {
        Ok(out) => {
            let raw = out
                .parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .to_string();
            let rec = serde_json::from_str::<LockRecord>(&raw).ok();
            Ok(Some((raw, rec)))
        }
        Err(e) if aws_code(&e) == Some("ParameterNotFound") => Ok(None),
        Err(e) => Err(aws_error(e))
            .with_context(|| format!("reading the deploy lock {name} (needs ssm:GetParameter)")),
    }
}

/// Takes the service's lock for `record.deploy_id`, or says who holds it.
pub async fn acquire(
    ssm: &aws_sdk_ssm::Client,
    service: &str,
    record: &LockRecord,
    now: SystemTime,
) -> Result<Taken> {
    let name = parameter(service);
    if create(ssm, &name, record).await? {
        return Ok(Taken::Fresh);
    }
    let Some((raw, held)) = read(ssm, service).await? else {
        // Released between our create and our read: one more try, no more.
        if create(ssm, &name, record).await? {
            return Ok(Taken::Fresh);
        }
        bail!(
            "another deploy of {service} took the lock {name} just now; try again once it is done"
        );
    };
    let Some(held) = held else {
        bail!(
            "the deploy lock {name} holds `{raw}`, which is not a lock this builder wrote; if no deploy of {service} runs, \
             remove it with `aws ssm delete-parameter --name {name}`"
        );
    };
    if !held.expired(now)? {
        bail!(
            "another deploy of {service} is running: {}. Wait for it to end; if it was killed, its lock expires at {} \
             (or remove it with `aws ssm delete-parameter --name {name}` once you are sure)",
            held.describe(),
            held.expires
        );
    }
    tracing::warn!(
        "taking over the expired deploy lock of {service}: {}",
        held.describe()
    );
    // Delete only the stale value we saw: not a lock another taker has just written.
    if let Some((again, _)) = read(ssm, service).await? {
        if again == raw {
            match ssm.delete_parameter().name(&name).send().await {
                Ok(_) => {}
                Err(e) if aws_code(&e) == Some("ParameterNotFound") => {}
                Err(e) => {
                    return Err(aws_error(e)).with_context(|| {
                        format!(
                            "removing the expired deploy lock {name} (needs ssm:DeleteParameter)"
                        )
                    })
                }
            }
        }
    }
    if create(ssm, &name, record).await? {
        Ok(Taken::TookOver(held))
    } else {
        bail!(
            "another deploy of {service} took over the expired lock {name} first; try again once it is done"
        )
    }
}

/// Ok when this deploy still holds the lock and it has not expired; otherwise why not. A lock that
/// cannot be read counts as lost: whoever acts on it must not assume it is still theirs.
pub async fn still_ours(
    ssm: &aws_sdk_ssm::Client,
    service: &str,
    deploy_id: &str,
    now: SystemTime,
) -> Result<()> {
    let name = parameter(service);
    match read(ssm, service)
        .await
        .with_context(|| format!("could not confirm that deploy {deploy_id} still holds {name}"))?
    {
        None => bail!("the deploy lock {name} is gone: deploy {deploy_id} no longer holds it"),
        Some((_, Some(rec))) if rec.deploy_id == deploy_id => {
            if rec.expired(now)? {
                bail!(
                    "the deploy lock {name} of deploy {deploy_id} expired at {}: another deploy may take it over",
                    rec.expires
                );
            }
            Ok(())
        }
        Some((_, Some(rec))) => bail!(
            "the deploy lock {name} is no longer deploy {deploy_id}'s: {} holds it",
            rec.describe()
        ),
        Some((raw, None)) => {
            bail!("the deploy lock {name} is no longer deploy {deploy_id}'s: it holds `{raw}`")
        }
    }
}

/// Releases the lock if this deploy still holds it. A lock someone else holds is left alone.
pub async fn release(ssm: &aws_sdk_ssm::Client, service: &str, deploy_id: &str) -> Result<()> {
    let name = parameter(service);
    match read(ssm, service).await? {
        None => {
            tracing::warn!("the deploy lock {name} was already gone");
            Ok(())
        }
        Some((_, Some(rec))) if rec.deploy_id == deploy_id => {
            match ssm.delete_parameter().name(&name).send().await {
                Ok(_) => Ok(()),
                Err(e) if aws_code(&e) == Some("ParameterNotFound") => Ok(()),
                Err(e) => Err(aws_error(e)).with_context(|| {
                    format!(
                        "releasing the deploy lock {name} (needs ssm:DeleteParameter); remove it with \
                         `aws ssm delete-parameter --name {name}`"
                    )
                }),
            }
        }
        Some((raw, _)) => {
            tracing::warn!(
                "the deploy lock {name} is no longer this deploy's ({deploy_id}): it holds `{raw}`; left alone"
            );
            Ok(())
        }
    }
}
