//! The deploy history: one SSM parameter per deploy, `/stackless/deploy/SERVICE/history/DEPLOY_ID`,
//! holding a JSON record (service, image, instances, outcome, step timings). Deploy ids start with
//! their UTC time, so they sort by age. Failed and rolled-back deploys are recorded too, marked as
//! such: `rollback` picks the last *successful* image before the current one. The newest
//! [`KEEP`] records are kept.

use crate::aws::aws_error;
use crate::aws::error_code as aws_code;
use anyhow::{Context, Result};
use aws_sdk_ssm::types::ParameterType;
use serde::{Deserialize, Serialize};

/// Records kept per service.
pub const KEEP: usize = 50;
/// Standard SSM parameters hold 4 KB; records are trimmed to fit.
const MAX_VALUE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The new instances serve; the old ones are gone.
    Succeeded,
    /// The new instances serve, but removing the old ones failed part-way (the error says which).
    SucceededWithErrors,
    /// Failed or interrupted before the switch: the new instances were removed, the old ones kept.
    RolledBack,
    /// Failed, and the new image may still run somewhere: removing the new instances failed too,
    /// or (`--asg`) the instance refresh failed, was cancelled, failed to roll back, or was only
    /// asked to roll back. The error says what is left.
    Failed,
}

impl Outcome {
    pub fn serves_new_image(self) -> bool {
        matches!(self, Outcome::Succeeded | Outcome::SucceededWithErrors)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::SucceededWithErrors => "succeeded-with-errors",
            Outcome::RolledBack => "rolled-back",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub deploy_id: String,
    pub service: String,
    /// The AMI id deployed.
    pub image: String,
    /// How it was asked for: `image preseeded`, `SSM parameter ...`, the id itself.
    pub image_ref: String,
    /// `deploy`, `rollback` or `asg`.
    pub kind: String,
    pub outcome: Outcome,
    pub instances: Vec<String>,
    pub replaced: Vec<String>,
    pub owner: String,
    pub started: String,
    pub finished: String,
    /// Milliseconds per step, in order.
    pub steps: Vec<(String, u64)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `--asg`: the group, the launch template version and the instance refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asg: Option<String>,
}

pub fn prefix(service: &str) -> String {
    format!("/stackless/deploy/{service}/history")
}

/// The record as it is stored: trimmed to fit a standard parameter.
pub fn encode(record: &Record) -> Result<String> {
    let mut r = record.clone();
    let mut json = serde_json::to_string(&r)?;
    if json.len() > MAX_VALUE {
        if let Some(e) = &mut r.error {
            let cut: String = e.chars().take(600).collect();
            *e = format!("{cut}...");
        }
        json = serde_json::to_string(&r)?;
    }
    if json.len() > MAX_VALUE {
        r.steps.clear();
        json = serde_json::to_string(&r)?;
    }
    while json.len() > MAX_VALUE && !r.replaced.is_empty() {
        r.replaced.pop();
        json = serde_json::to_string(&r)?;
    }
    Ok(json)
}

/// Writes one deploy's record, then prunes the oldest beyond [`KEEP`].
pub async fn record(ssm: &aws_sdk_ssm::Client, record: &Record) -> Result<()> {
    let name = format!("{}/{}", prefix(&record.service), record.deploy_id);
    ssm.put_parameter()
        .name(&name)
        .value(encode(record)?)
        .r#type(ParameterType::String)
        .overwrite(true)
        .description("stackless deploy record")
        .send()
        .await
        .map_err(aws_error)
        .with_context(|| format!("recording the deploy in {name} (needs ssm:PutParameter)"))?;
    let all = list(ssm, &record.service).await?;
    if all.len() > KEEP {
        let old: Vec<String> = all[KEEP..]
            .iter()
            .map(|r| format!("{}/{}", prefix(&r.service), r.deploy_id))
            .collect();
        for chunk in old.chunks(10) {
            if let Err(e) = ssm
                .delete_parameters()
                .set_names(Some(chunk.to_vec()))
                .send()
                .await
            {
                tracing::warn!("pruning old deploy records: {}", aws_error(e));
            }
        }
    }
    Ok(())
}

/// Every record of the service, newest first. Unreadable records are skipped with a warning.
pub async fn list(ssm: &aws_sdk_ssm::Client, service: &str) -> Result<Vec<Record>> {
    let path = prefix(service);
    let mut out = Vec::new();
    let mut pages = ssm
        .get_parameters_by_path()
        .path(&path)
        .recursive(false)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = match page {
            Ok(p) => p,
            Err(e) if aws_code(&e) == Some("ParameterNotFound") => break,
            Err(e) => {
                return Err(aws_error(e)).with_context(|| {
                    format!(
                        "reading the deploy history under {path} (needs ssm:GetParametersByPath)"
                    )
                })
            }
        };
        for p in page.parameters() {
            let name = p.name().unwrap_or_default();
            match serde_json::from_str::<Record>(p.value().unwrap_or_default()) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("skipping the unreadable deploy record {name}: {e}"),
            }
        }
    }
    out.sort_by(|a, b| b.deploy_id.cmp(&a.deploy_id));
    Ok(out)
}

/// The image a rollback goes back to: the newest successful deploy is what serves now; the one to
/// return to is the newest successful deploy before it with a different image, skipping images a
/// later successful `rollback` rolled away from (so a second `rollback` does not bring back the
/// image the first one removed). An image deployed again after such a rollback counts again.
pub fn previous_image(records: &[Record]) -> Option<(&Record, &Record)> {
    let good: Vec<&Record> = records
        .iter()
        .filter(|r| r.outcome.serves_new_image())
        .collect();
    let current = *good.first()?;
    let mut rejected = std::collections::BTreeSet::<&str>::new();
    for (i, r) in good.iter().enumerate() {
        if i > 0 && r.image != current.image && !rejected.contains(r.image.as_str()) {
            return Some((current, r));
        }
        if let Some(replaced) = rolled_away(&good, i) {
            rejected.insert(replaced);
        }
    }
    None
}

/// The image the successful deploy `good[i]` rolled away from, when it is a rollback: what served
/// before it.
fn rolled_away<'a>(good: &[&'a Record], i: usize) -> Option<&'a str> {
    let r = good.get(i)?;
    let before = good.get(i + 1)?;
    (r.kind == "rollback" && before.image != r.image).then_some(before.image.as_str())
}

/// When the newest successful deploy is a rollback: it and the image it rolled away from.
pub fn last_rollback(records: &[Record]) -> Option<(&Record, &str)> {
    let good: Vec<&Record> = records
        .iter()
        .filter(|r| r.outcome.serves_new_image())
        .collect();
    Some((*good.first()?, rolled_away(&good, 0)?))
}

/// The history as a table for people.
pub fn table(records: &[Record]) -> String {
    let mut s = format!(
        "{:<27} {:<9} {:<22} {:<21} {:<21} {}\n",
        "DEPLOY", "KIND", "OUTCOME", "STARTED", "IMAGE", "INSTANCES"
    );
    for r in records {
        s.push_str(&format!(
            "{:<27} {:<9} {:<22} {:<21} {:<21} {}\n",
            r.deploy_id,
            r.kind,
            r.outcome.as_str(),
            r.started,
            r.image,
            if r.instances.is_empty() {
                "-".to_string()
            } else {
                r.instances.join(",")
            }
        ));
        if let Some(e) = &r.error {
            let first: String = e.chars().take(160).collect();
            s.push_str(&format!("    {first}\n"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rec(id: &str, image: &str, outcome: Outcome) -> Record {
        Record {
            deploy_id: id.into(),
            service: "web".into(),
            image: image.into(),
            image_ref: image.into(),
            kind: "deploy".into(),
            outcome,
            instances: vec!["i-1".into()],
            replaced: vec![],
            owner: "me@here".into(),
            started: "2026-01-01T00:00:00Z".into(),
            finished: "2026-01-01T00:05:00Z".into(),
            steps: vec![("boot".into(), 10)],
            error: None,
            asg: None,
        }
    }

    #[test]
    fn rollback_goes_to_the_last_good_image_before_the_current_one() {
        use Outcome::*;
        let records = vec![
            rec("d-5", "ami-c", RolledBack),
            rec("d-4", "ami-b", Succeeded),
            rec("d-3", "ami-b", Succeeded),
            rec("d-2", "ami-x", Failed),
            rec("d-1", "ami-a", Succeeded),
        ];
        let (current, previous) = previous_image(&records).unwrap();
        assert_eq!(current.deploy_id, "d-4");
        assert_eq!(previous.image, "ami-a");
        assert!(
            previous_image(&records[..3]).is_none(),
            "only ami-b ever served"
        );
        assert!(previous_image(&[]).is_none());
    }

    #[test]
    fn a_second_rollback_does_not_bring_back_the_image_the_first_removed() {
        use Outcome::*;
        let rollback = |id, image| Record {
            kind: "rollback".into(),
            ..rec(id, image, Succeeded)
        };
        // ami-a was good, ami-b broke, `rollback` went back to ami-a.
        let mut records = vec![
            rollback("d-3", "ami-a"),
            rec("d-2", "ami-b", Succeeded),
            rec("d-1", "ami-a", Succeeded),
        ];
        assert!(
            previous_image(&records).is_none(),
            "going back again would redeploy the broken ami-b"
        );
        let (r, from) = last_rollback(&records).unwrap();
        assert_eq!((r.deploy_id.as_str(), from), ("d-3", "ami-b"));
        // An older good image is still there to go back to.
        records.push(rec("d-0", "ami-z", Succeeded));
        assert_eq!(previous_image(&records).unwrap().1.image, "ami-z");
        // ami-b deployed again on purpose after the rollback counts again.
        records.insert(0, rec("d-5", "ami-c", Succeeded));
        records.insert(1, rec("d-4", "ami-b", Succeeded));
        assert_eq!(previous_image(&records).unwrap().1.deploy_id, "d-4");
        assert!(last_rollback(&records).is_none());
    }

    #[test]
    fn records_are_trimmed_to_fit_a_standard_parameter() {
        let mut r = rec("d-1", "ami-a", Outcome::Failed);
        r.error = Some("x".repeat(10_000));
        r.replaced = (0..300).map(|i| format!("i-{i:017}")).collect();
        let json = encode(&r).unwrap();
        assert!(json.len() <= MAX_VALUE, "{}", json.len());
        let back: Record = serde_json::from_str(&json).unwrap();
        assert!(back.error.unwrap().ends_with("..."));
        assert_eq!(back.instances, ["i-1"]);
    }
}
