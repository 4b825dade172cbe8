//! `stackless-init status`: the boot timeline and the last sync, for people (like
//! `cloud-init analyze`, in milliseconds) or as JSON for scripts.

use crate::repos::short;
use crate::state::{Outcome, State};
use std::fmt::Write;

/// Prefix of the boot report's last line, for programs reading the console.
pub const RESULT_PREFIX: &str = "stackless-init-result: ";

/// The human report.
pub fn render(state: &State) -> String {
    let mut out = String::new();
    let dash = "-".to_string();
    let _ = writeln!(
        out,
        "instance   {}",
        state.instance_id.as_ref().unwrap_or(&dash)
    );
    let _ = writeln!(
        out,
        "minion id  {}",
        state.minion_id.as_ref().unwrap_or(&dash)
    );
    match &state.boot {
        None => {
            let _ = writeln!(out, "boot       not run yet");
        }
        Some(b) => {
            let kind = if b.first_boot {
                "first boot of this instance"
            } else {
                "reboot"
            };
            let _ = writeln!(
                out,
                "boot       {} in {} ms, {} ({kind})",
                b.outcome.as_str(),
                b.total_ms,
                b.finished_at.as_deref().unwrap_or(&b.started_at)
            );
            if let Some(e) = &b.error {
                let _ = writeln!(out, "  reason   {e}");
            }
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "  {:>8}  {:>8}  {:<4}  {:<16} detail",
                "start ms", "ms", "ok", "step"
            );
            let mut at = 0u64;
            for s in &b.steps {
                let ok = if s.ok { "ok" } else { "FAIL" };
                let _ = writeln!(
                    out,
                    "  {:>8}  {:>8}  {:<4}  {:<16} {}",
                    at,
                    s.ms,
                    ok,
                    s.name,
                    s.detail.as_deref().unwrap_or("")
                );
                at += s.ms;
            }
        }
    }
    if !state.repos.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "repos");
        for (name, r) in &state.repos {
            let commit = r.commit.as_deref().map(short).unwrap_or("-");
            let _ = writeln!(
                out,
                "  {name:<7} {commit:<12}  {:<9} {}@{}  ({})",
                r.result, r.url, r.reference, r.synced_at
            );
            if let Some(e) = &r.error {
                let _ = writeln!(out, "          error: {e}");
            }
        }
    }
    for (name, r) in &state.releases {
        let good = r.good.as_deref().map(short).unwrap_or("-");
        let _ = write!(out, "  {name:<7} last good {good}");
        if let Some(p) = &r.pinned {
            let _ = write!(out, ", pinned at {}", short(p));
        }
        if r.reverts > 0 {
            let _ = write!(out, ", {} revert(s)", r.reverts);
        }
        out.push('\n');
        if let Some(v) = &r.last_revert {
            let _ = writeln!(
                out,
                "          reverted {} -> {} at {} ({} ms): {}",
                short(&v.commit),
                short(v.to.as_deref().unwrap_or("-")),
                v.at,
                v.ms.unwrap_or(0),
                v.reason.as_deref().unwrap_or("")
            );
        }
        if let Some(q) = &r.quarantined {
            let _ = writeln!(
                out,
                "          quarantined {} since {} until upstream moves on",
                short(&q.commit),
                q.at
            );
        }
    }
    if let Some(h) = &state.highstate {
        let _ = writeln!(out);
        let verdict = if h.error.is_none() && h.report.ok {
            "ok"
        } else {
            "FAILED"
        };
        let _ = writeln!(
            out,
            "highstate  {verdict}: {} in {} ms at {} (salt {})",
            h.error
                .as_deref()
                .map_or_else(|| h.report.summary(), str::to_string),
            h.report.ms,
            h.at,
            h.commit.as_deref().map(short).unwrap_or("-")
        );
        for f in &h.report.failed {
            let _ = writeln!(out, "  failed   {} ({})", f.id, f.describe());
        }
        for e in &h.report.render_errors {
            let _ = writeln!(out, "  render   {e}");
        }
    }
    if let Some(sync) = &state.last_sync {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "last sync  {} ({}) in {} ms at {}{}",
            sync.outcome.as_str(),
            sync.trigger,
            sync.ms,
            sync.at,
            if sync.highstate_ran {
                ", highstate ran"
            } else {
                ""
            }
        );
        if let Some(e) = &sync.error {
            let _ = writeln!(out, "  reason   {e}");
        }
    }
    if let Some(s) = &state.schedule {
        let _ = writeln!(
            out,
            "schedule   {} (splay offset {} ms), next sync {}",
            s.schedule,
            s.splay_ms,
            s.next_tick.as_deref().unwrap_or("-")
        );
        if s.highstate_failures > 0 {
            let _ = writeln!(
                out,
                "  highstate failed {} time(s) in a row; retrying with backoff",
                s.highstate_failures
            );
        }
    }
    if let Some(r) = &state.report {
        let _ = writeln!(out);
        let tag = |k: &str| r.tags.get(k).map_or("-", String::as_str);
        match (&r.error, &r.at) {
            _ if !r.enabled => {
                let _ = writeln!(out, "report     off ([report] enabled = false)");
            }
            (Some(_), _) if r.no_role => {
                let _ = writeln!(
                    out,
                    "report     not sent: the instance has no IAM role (attach one allowed \
                     ec2:CreateTags to report, or set [report] enabled = false)"
                );
            }
            (Some(e), _) => {
                let _ = writeln!(
                    out,
                    "report     FAILED{}: {e}",
                    if r.denied {
                        " (not tried again until something changes)"
                    } else {
                        ""
                    }
                );
            }
            (None, Some(at)) => {
                let _ = writeln!(
                    out,
                    "report     {} (salt {}, config {}) in the instance's tags at {at}",
                    tag(crate::report::OUTCOME),
                    short(tag(crate::report::SALT_COMMIT)),
                    short(tag(crate::report::CONFIG_COMMIT)),
                );
            }
            (None, None) => {}
        }
    }
    if let Some(w) = &state.watch {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "watchers   {} rule(s) on {} folder(s), {} queue overflow(s)",
            w.rules.len(),
            w.watched_dirs,
            w.overflows
        );
        for r in &w.rules {
            let action = r
                .signal
                .as_ref()
                .map_or("restart".to_string(), |s| format!("signal {s}"));
            let _ = writeln!(
                out,
                "  {} -> {action} {}  ({})",
                r.paths.join(" "),
                r.restart.join(" "),
                r.source
            );
        }
        for (name, p) in &w.programs {
            let _ = writeln!(
                out,
                "  {name:<16} restarts {} signals {} updates {} failures {}; last {} {} in {} ms at {}",
                p.restarts, p.signals, p.updates, p.failures, p.last_action, p.last_outcome, p.last_ms, p.last_at
            );
        }
    }
    out
}

/// Prefix of the line a revert prints on the console, for programs reading it.
pub const REVERT_PREFIX: &str = "stackless-init-revert: ";

/// What a revert prints on the console (stdout: the journal and the serial console), as it
/// happens: a line for people and one of JSON after [`REVERT_PREFIX`]. The agent's own words
/// only (commits, supervisord's states): never program output or file contents.
pub fn revert_report(repo: &str, r: &crate::state::Verdict) -> String {
    let one = crate::timeline::one_line(r.reason.as_deref().unwrap_or(""));
    let to = r.to.as_deref().unwrap_or("");
    let ms = r.ms.unwrap_or(0);
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let json = format!(
        "{{\"repo\":{},\"outcome\":\"reverted\",\"from\":{},\"to\":{},\"reason\":{},\"at\":{},\"ms\":{}}}",
        q(repo),
        q(&r.commit),
        q(to),
        q(&one),
        q(&r.at),
        ms
    );
    format!(
        "stackless-init: {repo} release {} reverted to {} after {} ms: {one}\n{REVERT_PREFIX}{json}\n",
        short(&r.commit),
        short(to),
        ms
    )
}

/// The JSON report: the state record as saved.
pub fn render_json(state: &State) -> String {
    serde_json::to_string_pretty(state).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The boot report printed on the console (stdout) when a boot has finished, like
/// cloud-init's "finished" line: a headline, the human status report, and a last line of JSON
/// after [`RESULT_PREFIX`] for programs (the `builder boot` console reader, scripts over
/// `aws ec2 get-console-output`). `outcome` and `error` are the final ones, which may be worse
/// than the boot record's when resident mode could not start.
pub fn console_report(state: &State, outcome: Outcome, error: Option<&str>) -> String {
    let boot = state.boot.as_ref();
    let total_ms = boot.map_or(0, |b| b.total_ms);
    let first_boot = boot.is_some_and(|b| b.first_boot);
    let dash = "-";
    let mut out = String::new();
    let _ = write!(
        out,
        "stackless-init: boot {} in {total_ms} ms (instance {}, minion {})",
        outcome.as_str(),
        state.instance_id.as_deref().unwrap_or(dash),
        state.minion_id.as_deref().unwrap_or(dash),
    );
    if let Some(e) = error {
        let _ = write!(out, ": {}", crate::timeline::one_line(e));
    }
    out.push('\n');
    for line in render(state).lines().filter(|l| !l.trim().is_empty()) {
        let _ = writeln!(out, "stackless-init:   {line}");
    }
    let head = serde_json::json!({
        "outcome": outcome.as_str(),
        "error": error,
        "total_ms": total_ms,
        "instance_id": state.instance_id,
        "minion_id": state.minion_id,
        "first_boot": first_boot,
    })
    .to_string();
    // The state record on one line: `status --json`'s pretty form without its line breaks and
    // indentation. A JSON string cannot hold a raw line break (serde_json escapes it), so every
    // break is between tokens. One serialiser of the record where a second, into a
    // `serde_json::Value`, was 11 KiB of the static agent (issue 18).
    let status: String = render_json(state).lines().map(str::trim_start).collect();
    let head = head.strip_suffix('}').unwrap_or(&head);
    let _ = writeln!(out, "{RESULT_PREFIX}{head},\"status\":{status}}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BootRecord, Step};

    #[test]
    fn a_revert_prints_one_line_for_people_and_one_of_json() {
        let r = crate::state::Verdict {
            commit: "b".repeat(40),
            verdict: "reverted".into(),
            at: "2026-12-03T04:40:05Z".into(),
            reason: Some("restart: web is FATAL\nnot RUNNING".into()),
            to: Some("a".repeat(40)),
            ms: Some(2710),
        };
        let text = revert_report("config", &r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("config release bbbbbbbbbbbb reverted to aaaaaaaaaaaa after 2710 ms")
        );
        let json: serde_json::Value =
            serde_json::from_str(lines[1].strip_prefix(REVERT_PREFIX).unwrap()).unwrap();
        assert_eq!(json["outcome"], "reverted");
        assert_eq!(json["from"], r.commit.as_str());
        assert_eq!(json["to"], "a".repeat(40).as_str());
    }

    #[test]
    fn human_output_lists_steps_with_start_offsets() {
        let state = State {
            instance_id: Some("i-1".into()),
            minion_id: Some("web-1".into()),
            boot: Some(BootRecord {
                started_at: "2026-01-01T00:00:00Z".into(),
                finished_at: Some("2026-01-01T00:00:01Z".into()),
                outcome: Outcome::Degraded,
                error: Some("highstate: 1 of 2 failed".into()),
                first_boot: true,
                total_ms: 30,
                steps: vec![
                    Step {
                        name: "imds".into(),
                        ms: 10,
                        ok: true,
                        detail: None,
                    },
                    Step {
                        name: "highstate".into(),
                        ms: 20,
                        ok: false,
                        detail: Some("1 of 2 failed".into()),
                    },
                ],
            }),
            ..Default::default()
        };
        let text = render(&state);
        assert!(text.contains("boot       degraded in 30 ms"), "{text}");
        assert!(text.contains("reason   highstate: 1 of 2 failed"), "{text}");
        let hs = text
            .lines()
            .find(|l| l.contains("highstate ") && l.contains("FAIL"))
            .unwrap();
        assert!(
            hs.trim_start().starts_with("10 "),
            "second step starts at 10 ms: {hs}"
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(&state)).unwrap();
        assert_eq!(json["boot"]["steps"][1]["ok"], false);
    }

    #[test]
    fn console_report_ends_with_one_line_of_json() {
        let mut state = State {
            instance_id: Some("i-0abc".into()),
            minion_id: Some("web-i-0abc".into()),
            boot: Some(BootRecord {
                started_at: "2026-01-01T00:00:00Z".into(),
                finished_at: Some("2026-01-01T00:00:04Z".into()),
                outcome: Outcome::Ready,
                error: None,
                first_boot: true,
                total_ms: 4312,
                steps: vec![Step {
                    name: "imds".into(),
                    ms: 12,
                    ok: true,
                    detail: Some("i-0abc\nsecond line".into()),
                }],
            }),
            ..Default::default()
        };
        let text = console_report(&state, Outcome::Ready, None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "stackless-init: boot ready in 4312 ms (instance i-0abc, minion web-i-0abc)"
        );
        assert!(lines[1..lines.len() - 1]
            .iter()
            .all(|l| l.starts_with("stackless-init:   ")));
        assert!(lines.iter().any(|l| l.contains("imds")), "{text}");
        let last = lines.last().unwrap();
        let json: serde_json::Value =
            serde_json::from_str(last.strip_prefix(RESULT_PREFIX).unwrap()).unwrap();
        assert_eq!(json["outcome"], "ready");
        assert_eq!(json["error"], serde_json::Value::Null);
        assert_eq!(json["total_ms"], 4312);
        assert_eq!(json["instance_id"], "i-0abc");
        assert_eq!(json["minion_id"], "web-i-0abc");
        assert_eq!(json["first_boot"], true);
        assert_eq!(json["status"]["boot"]["steps"][0]["name"], "imds");
        // The record whole, its multi-line detail included, as `status --json` has it.
        assert_eq!(json["status"], serde_json::to_value(&state).unwrap());
        assert_eq!(
            json["status"]["boot"]["steps"][0]["detail"],
            "i-0abc\nsecond line"
        );
        assert!(text.ends_with("}\n"));

        // Failed before IMDS: no ids, the reason in the headline and the JSON, still one line.
        state = State::default();
        let text = console_report(&state, Outcome::Failed, Some("user-data:2:1: bad\nkey"));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("stackless-init: boot failed in 0 ms (instance -, minion -): "),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(lines.last().unwrap().strip_prefix(RESULT_PREFIX).unwrap())
                .unwrap();
        assert_eq!(json["outcome"], "failed");
        assert_eq!(json["error"], "user-data:2:1: bad\nkey");
        assert_eq!(json["minion_id"], serde_json::Value::Null);
        assert_eq!(json["first_boot"], false);
    }
}
