//! The fleet for people (a table, then a summary) and for scripts (JSON).

use super::wait::{Ended, Verdict};
use super::Instance;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::SystemTime;

/// The first 12 characters of a commit.
pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// How long ago `rfc3339` was, to the second (`-` when unknown).
pub fn age(rfc3339: Option<&str>, now: SystemTime) -> String {
    rfc3339
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .map_or("-".into(), |t| {
            let secs = now.duration_since(t).unwrap_or_default().as_secs();
            humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
        })
}

/// The table and the summary.
pub fn table(instances: &[Instance], now: SystemTime) -> String {
    let dash = |v: Option<&str>| v.map_or("-".to_string(), |v| short(v).to_string());
    let rows: Vec<[String; 9]> = instances
        .iter()
        .map(|i| {
            let mut outcome = i.outcome.clone().unwrap_or_else(|| "-".into());
            if !i.problems.is_empty() {
                outcome = format!("{outcome} ({})", i.problems.join(","));
            }
            [
                i.instance_id.clone(),
                i.state.clone(),
                i.zone.clone(),
                i.image_id.clone(),
                i.launch_time.clone().unwrap_or_else(|| "-".into()),
                dash(i.salt_commit.as_deref()),
                dash(i.config_commit.as_deref()),
                outcome,
                age(i.reported_at.as_deref(), now),
            ]
        })
        .collect();
    let head = [
        "INSTANCE", "STATE", "ZONE", "IMAGE", "LAUNCHED", "SALT", "CONFIG", "OUTCOME", "REPORTED",
    ];
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&mut out, &head);
    for r in &rows {
        line(&mut out, &r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out.push('\n');
    out.push_str(&summary(instances));
    out
}

/// `N instances`, how many on each commit, which failed and which never reported.
pub fn summary(instances: &[Instance]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} instance(s)", instances.len());
    for (name, get) in [
        (
            "salt",
            (|i: &Instance| i.salt_commit.clone()) as fn(&Instance) -> Option<String>,
        ),
        ("config", |i: &Instance| i.config_commit.clone()),
    ] {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut unknown = 0;
        for i in instances {
            match get(i) {
                Some(c) => *counts.entry(short(&c).to_string()).or_default() += 1,
                None => unknown += 1,
            }
        }
        if !instances.is_empty() {
            let mut parts: Vec<String> = counts.iter().map(|(c, n)| format!("{c} x{n}")).collect();
            if unknown > 0 {
                parts.push(format!("(no report) x{unknown}"));
            }
            let _ = writeln!(out, "{name:<7} {}", parts.join(", "));
        }
    }
    let bad: Vec<String> = instances
        .iter()
        .filter(|i| matches!(i.outcome.as_deref(), Some("failed" | "degraded")))
        .map(|i| {
            let mut s = format!("{} {}", i.instance_id, i.outcome.as_deref().unwrap_or(""));
            if !i.problems.is_empty() {
                s.push_str(&format!(" ({})", i.problems.join(",")));
            }
            s
        })
        .collect();
    if !bad.is_empty() {
        let _ = writeln!(out, "failed  {}", bad.join("; "));
    }
    let reverted: Vec<String> = instances
        .iter()
        .filter(|i| !i.reverted.is_empty())
        .map(|i| {
            let from: Vec<String> = i
                .reverted
                .iter()
                .map(|(r, c)| format!("{r} {}", short(c)))
                .collect();
            format!("{} from {}", i.instance_id, from.join(", "))
        })
        .collect();
    if !reverted.is_empty() {
        let _ = writeln!(out, "reverted {}", reverted.join("; "));
    }
    let silent: Vec<&str> = instances
        .iter()
        .filter(|i| i.outcome.is_none())
        .map(|i| i.instance_id.as_str())
        .collect();
    if !silent.is_empty() {
        let _ = writeln!(out, "silent  {}", silent.join(" "));
    }
    out
}

/// The listing as JSON.
pub fn json(instances: &[Instance]) -> serde_json::Value {
    serde_json::json!({ "instances": instances })
}

/// How a wait ended, for people: the line that matters (on stderr) comes from [`wait_line`].
pub fn wait_line(ended: &Ended, what: &str) -> String {
    match &ended.verdict {
        Verdict::Converged { instances } => {
            format!("converged: {instances} instance(s) report {what} ready")
        }
        Verdict::Failed(culprits) => {
            let list: Vec<String> = culprits
                .iter()
                .map(|(id, why)| format!("{id}: {why}"))
                .collect();
            format!("failed on {what}: {}", list.join("; "))
        }
        Verdict::Pending { done, stragglers } if stragglers.is_empty() => {
            format!("timed out: no running instance reported {what} ({done} ready)")
        }
        Verdict::Pending { done, stragglers } => {
            let list: Vec<String> = stragglers
                .iter()
                .map(|(id, at)| format!("{id} ({at})"))
                .collect();
            format!(
                "timed out waiting for {what}: {done} ready, {} not: {}",
                stragglers.len(),
                list.join(", ")
            )
        }
    }
}

/// How a wait ended, for scripts.
pub fn wait_json(ended: &Ended, repo: &str, commit: &str) -> serde_json::Value {
    let (result, names): (&str, Vec<serde_json::Value>) = match &ended.verdict {
        Verdict::Converged { .. } => ("converged", vec![]),
        Verdict::Failed(c) => (
            "failed",
            c.iter()
                .map(|(id, why)| serde_json::json!({"instance_id": id, "error": why}))
                .collect(),
        ),
        Verdict::Pending { stragglers, .. } => (
            "timeout",
            stragglers
                .iter()
                .map(|(id, at)| serde_json::json!({"instance_id": id, "reports": at}))
                .collect(),
        ),
    };
    serde_json::json!({
        "result": result, "repo": repo, "commit": commit,
        "culprits_or_stragglers": names, "instances": ended.instances,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_summary() {
        let now = humantime::parse_rfc3339("2026-01-01T00:10:00Z").unwrap();
        let mk = |id: &str, config: Option<&str>, outcome: Option<&str>| Instance {
            instance_id: id.into(),
            state: "running".into(),
            zone: "eu-west-1a".into(),
            image_id: "ami-1".into(),
            launch_time: Some("2026-01-01T00:00:00Z".into()),
            salt_commit: config.map(|_| "a".repeat(40)),
            config_commit: config.map(str::to_string),
            outcome: outcome.map(str::to_string),
            failed_states: None,
            problems: if outcome == Some("failed") {
                vec!["highstate".into()]
            } else {
                vec![]
            },
            reverted: if outcome == Some("reverted") {
                vec![("config".into(), "d".repeat(40))]
            } else {
                vec![]
            },
            reported_at: config.map(|_| "2026-01-01T00:08:30Z".to_string()),
        };
        let c = "c".repeat(40);
        let fleet = vec![
            mk("i-1", Some(&c), Some("ready")),
            mk("i-2", Some(&c), Some("failed")),
            mk("i-3", None, None),
            mk("i-4", Some(&c), Some("reverted")),
        ];
        let text = table(&fleet, now);
        assert!(text.starts_with("INSTANCE  STATE    ZONE"), "{text}");
        assert!(
            text.contains("cccccccccccc  ready") && text.contains("1m 30s"),
            "{text}"
        );
        assert!(text.contains("4 instance(s)"), "{text}");
        assert!(
            text.contains("config  cccccccccccc x3, (no report) x1"),
            "{text}"
        );
        assert!(text.contains("failed  i-2 failed (highstate)"), "{text}");
        assert!(
            text.contains("reverted i-4 from config dddddddddddd"),
            "{text}"
        );
        assert!(text.contains("silent  i-3"), "{text}");
        let j = json(&fleet);
        assert_eq!(j["instances"][1]["outcome"], "failed");
        assert_eq!(j["instances"][2]["config_commit"], serde_json::Value::Null);
    }
}
