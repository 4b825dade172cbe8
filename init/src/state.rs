//! The agent's record of what it did: `/var/lib/stackless/state.json`, written atomically, 0600.
//! `status` reads it; the next boot reads it to tell a new instance from a reboot.

use crate::fsutil::write_atomic;
use crate::paths::Layout;
use crate::salt::highstate::HighstateReport;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::SystemTime;

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The instance this record belongs to; a record of another instance (baked into an
    /// image, say) is never trusted.
    pub instance_id: Option<String>,
    pub minion_id: Option<String>,
    /// The identity IMDS gave at the last boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::imds::Identity>,
    pub boot: Option<BootRecord>,
    #[serde(default)]
    pub repos: BTreeMap<String, RepoRecord>,
    pub highstate: Option<HighstateRecord>,
    /// The last sync after the boot (scheduled or manual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<SyncRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchRecord>,
    /// The last report on the instance's tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportRecord>,
    /// Per repository (`salt`, `config`): the last good release, the quarantined commit, the
    /// verdicts and the last revert. Commits and the agent's own words only: never file contents
    /// or program output (they may hold secrets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub releases: BTreeMap<String, ReleasesRecord>,
}

/// What the agent last reported on its instance's tags ([`crate::report`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportRecord {
    /// `[report] enabled`.
    pub enabled: bool,
    /// The tags last written or tried (`stackless:reported-at` aside).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// When they were last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// Why the last try failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last try was denied: not tried again until the tags change.
    #[serde(default)]
    pub denied: bool,
    /// The last try found no instance role to report with: not sent, which is no failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_role: bool,
}

/// What the agent knows of one repository's releases.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleasesRecord {
    /// The last release everything it triggered succeeded with: what a revert goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub good: Option<String>,
    /// A bad commit (its verdict): not applied again until the remote tip moves to another
    /// commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<Verdict>,
    /// Pinned by hand (`stackless-init releases --pin`): syncs keep this release and do not
    /// follow the ref until `unpin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Verdicts of recent commits, oldest first, at most [`MAX_VERDICTS`].
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
    /// The last revert: `commit` is the bad commit, `to` the release published again, `ms`
    /// the time from the bad release's publication to the revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_revert: Option<Verdict>,
    #[serde(default)]
    pub reverts: u64,
}

/// How many verdicts a repository's record keeps.
pub const MAX_VERDICTS: usize = 20;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub commit: String,
    /// `good`, `bad`, `pinned` or (a revert) `reverted`.
    pub verdict: String,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A revert's: the release published again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A revert's: from the bad release's publication to the revert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncRecord {
    pub at: String,
    /// `schedule` or `manual`.
    pub trigger: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub ms: u64,
    pub highstate_ran: bool,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    pub schedule: String,
    pub splay_ms: u64,
    /// When the next sync starts (splay included).
    pub next_tick: Option<String>,
    /// Highstate failures in a row; retries back off over ticks.
    #[serde(default)]
    pub highstate_failures: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchRecord {
    pub rules: Vec<RuleRecord>,
    pub watched_dirs: usize,
    pub overflows: u64,
    /// Per restart target (supervisord program, `group:*`, `systemd:UNIT`).
    pub programs: BTreeMap<String, ProgramRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleRecord {
    pub source: String,
    pub paths: Vec<String>,
    pub restart: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgramRecord {
    pub restarts: u64,
    pub signals: u64,
    pub updates: u64,
    pub failures: u64,
    /// `restart`, `signal HUP` or `update`.
    pub last_action: String,
    /// `ok` or the error.
    pub last_outcome: String,
    pub last_at: String,
    pub last_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The changed files that caused the last action.
    #[serde(default)]
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Still running.
    Running,
    /// Everything passed.
    Ready,
    /// Booted and usable, with a problem to look at (a failed highstate, a stale repository).
    Degraded,
    /// The boot could not do its work.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Ready => "ready",
            Outcome::Degraded => "degraded",
            Outcome::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootRecord {
    pub started_at: String,
    pub finished_at: Option<String>,
    pub outcome: Outcome,
    /// The one-line reason when the outcome is not `ready`.
    pub error: Option<String>,
    /// The first boot of this instance (per-instance work ran).
    pub first_boot: bool,
    pub total_ms: u64,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub ms: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoRecord {
    pub url: String,
    #[serde(rename = "ref")]
    pub reference: String,
    /// The published commit (`current`).
    pub commit: Option<String>,
    /// `updated`, `unchanged` or `kept-last`.
    pub result: String,
    pub synced_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HighstateRecord {
    #[serde(flatten)]
    pub report: HighstateReport,
    /// The salt repository commit the highstate ran from.
    pub commit: Option<String>,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl State {
    /// Reads the record; `Ok(None)` when there is none yet.
    pub fn load(layout: &Layout) -> Result<Option<State>> {
        let path = layout.state_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).map(Some).with_context(|| {
            format!(
                "{} is not a stackless state file; move it away to start afresh",
                path.display()
            )
        })
    }

    pub fn save(&self, layout: &Layout) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(self)?;
        json.push(b'\n');
        write_atomic(&layout.state_file(), &json, 0o600).with_context(|| {
            format!(
                "saving the agent state to {}",
                layout.state_file().display()
            )
        })
    }
}

/// Now, as RFC 3339 in UTC to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saves_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        assert_eq!(State::load(&layout).unwrap(), None);
        let mut s = State {
            version: STATE_VERSION,
            instance_id: Some("i-1".into()),
            ..Default::default()
        };
        s.repos.insert(
            "salt".into(),
            RepoRecord {
                url: "file:///x".into(),
                reference: "main".into(),
                commit: Some("a".repeat(40)),
                result: "updated".into(),
                synced_at: now_rfc3339(),
                error: None,
            },
        );
        s.save(&layout).unwrap();
        let mode = std::fs::metadata(layout.state_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(State::load(&layout).unwrap(), Some(s));
        std::fs::write(layout.state_file(), "{").unwrap();
        let e = State::load(&layout).unwrap_err().to_string();
        assert!(e.contains("not a stackless state file"), "{e}");
    }
}
