//! The report: what this instance applied, written as tags on the instance itself, where anyone
//! with `ec2:DescribeInstances` reads it (`builder fleet`) and nothing else must run.
//!
//! Tags: `stackless:salt-commit`, `stackless:config-commit`, `stackless:outcome` (ready,
//! degraded, failed), `stackless:failed-states`, `stackless:problems` (short kinds such as
//! `highstate`, `config-repo`, `restart`; never an error text, which could quote a secret) and
//! `stackless:reported-at`. They are written only when they differ from the last ones written,
//! so a sync that changed nothing makes no call. Reporting never fails a boot or a sync: a
//! failure is recorded (a denial once, with the policy it needs) and the next change tries again.

use crate::aws::ec2::{Ec2Error, InstanceTagger};
use crate::imds::ImdsClient;
use crate::state::{now_rfc3339, Outcome, ReportRecord, State};
use crate::userdata::Settings;
use std::collections::BTreeMap;
use std::time::Duration;

pub const SALT_COMMIT: &str = "stackless:salt-commit";
pub const CONFIG_COMMIT: &str = "stackless:config-commit";
pub const OUTCOME: &str = "stackless:outcome";
pub const FAILED_STATES: &str = "stackless:failed-states";
pub const PROBLEMS: &str = "stackless:problems";
pub const REPORTED_AT: &str = "stackless:reported-at";
/// The commits the agent reverted and quarantined (`config:SHA,salt:SHA`), `none` without one:
/// a fleet waiting for a commit learns that an instance went back from it.
pub const REVERTED: &str = "stackless:reverted";
/// Every key the agent writes: the `aws:TagKeys` of its policy.
pub const KEYS: [&str; 7] = [
    SALT_COMMIT,
    CONFIG_COMMIT,
    OUTCOME,
    FAILED_STATES,
    PROBLEMS,
    REVERTED,
    REPORTED_AT,
];
/// How long one report may take (IMDS and EC2, retries included): short, it runs in a boot.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Where the tags go: EC2 in production.
pub trait Tagger {
    fn write(&mut self, tags: &[(String, String)]) -> Result<(), Ec2Error>;
}

/// EC2 through the instance role; IMDS is asked for the identity at the first write.
pub struct Ec2Tagger {
    pub endpoint_setting: Option<String>,
    /// The IMDS endpoint; `None` for the environment's (the default).
    pub imds_endpoint: Option<String>,
    tagger: Option<InstanceTagger>,
}

impl Ec2Tagger {
    pub fn new(endpoint_setting: Option<String>, imds_endpoint: Option<String>) -> Self {
        Ec2Tagger {
            endpoint_setting,
            imds_endpoint,
            tagger: None,
        }
    }
}

impl Tagger for Ec2Tagger {
    fn write(&mut self, tags: &[(String, String)]) -> Result<(), Ec2Error> {
        if self.tagger.is_none() {
            let imds = match &self.imds_endpoint {
                Some(e) => ImdsClient::new(e, DEADLINE),
                None => ImdsClient::from_env(DEADLINE),
            };
            let t = InstanceTagger::new(imds, self.endpoint_setting.as_deref(), DEADLINE)
                .map_err(Ec2Error::Credentials)?;
            self.tagger = Some(t);
        }
        self.tagger.as_mut().expect("set just now").write(tags)
    }
}

thread_local! {
    // One tagger for the agent's life: the IMDS token and the role's credentials are reused.
    static EC2: std::cell::RefCell<Option<Ec2Tagger>> = const { std::cell::RefCell::new(None) };
}

/// Reports `state` when it changed since the last report, recording how it went in
/// `state.report`; the caller saves the state. `settings` is `None` when the boot failed before
/// user-data resolved: then the defaults apply (reporting on, the region's endpoint). `force`
/// writes even unchanged tags (after a boot, so the report's time says the instance is back).
pub fn update(state: &mut State, settings: Option<&Settings>, force: bool) {
    if !settings.is_none_or(|s| s.report) {
        state.report = Some(ReportRecord {
            enabled: false,
            ..Default::default()
        });
        return;
    }
    let endpoint = settings.and_then(|s| s.ec2_endpoint.clone());
    EC2.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|t| t.endpoint_setting != endpoint) {
            *cell = Some(Ec2Tagger::new(endpoint.clone(), None));
        }
        update_with(state, cell.as_mut().expect("set just now"), force);
    })
}

/// [`update`] through `tagger`. Returns whether a call was made.
pub fn update_with(state: &mut State, tagger: &mut dyn Tagger, force: bool) -> bool {
    if state.instance_id.is_none() {
        // IMDS never answered: there is no instance to tag.
        return false;
    }
    let Some(tags) = tags_for(state) else {
        return false;
    };
    let mut record = state.report.clone().unwrap_or_default();
    record.enabled = true;
    if !force && record.tags == tags && (record.error.is_none() || record.denied) {
        // Written already (or refused for a standing reason, such as a denial or no role: the
        // next change tries again).
        state.report = Some(record);
        return false;
    }
    let at = now_rfc3339();
    let mut all: Vec<(String, String)> = tags.clone().into_iter().collect();
    all.push((REPORTED_AT.to_string(), at.clone()));
    match tagger.write(&all) {
        Ok(()) => {
            tracing::info!(
                outcome = tags.get(OUTCOME).map(String::as_str),
                "reported on the instance's tags"
            );
            record.at = Some(at);
            record.error = None;
            record.denied = false;
            record.no_role = false;
        }
        Err(e) => {
            let denied = e.is_standing();
            let no_role = e.is_no_role();
            let message = format!("writing the report tags: {e}");
            if denied && record.denied {
                tracing::debug!("{message}");
            } else if no_role {
                // No role is a set-up (a VM outside EC2, reporting never granted), not a fault.
                tracing::info!("report not sent: {e}");
            } else {
                tracing::warn!("{message}");
            }
            record.error = Some(message);
            record.denied = denied;
            record.no_role = no_role;
        }
    }
    record.tags = tags;
    state.report = Some(record);
    true
}

/// The tags for `state`, `reported-at` aside; `None` before any boot finished.
pub fn tags_for(state: &State) -> Option<BTreeMap<String, String>> {
    let boot = state.boot.as_ref()?;
    // The later of the boot and the last sync says how the instance is.
    let mut outcome = match &state.last_sync {
        Some(s) if s.at >= boot.started_at => s.outcome,
        _ => boot.outcome,
    };
    if outcome == Outcome::Running {
        return None;
    }
    let mut problems: Vec<String> = Vec::new();
    for (name, r) in &state.repos {
        if r.result != "updated" && r.result != "unchanged" {
            problems.push(format!("{name}-repo"));
        }
    }
    let mut failed_states = 0;
    if let Some(h) = &state.highstate {
        failed_states = h.report.failed.len() + h.report.render_errors.len();
        if h.error.is_some() || !h.report.ok {
            problems.push("highstate".into());
        }
    }
    if let Some(w) = &state.watch {
        if w.programs.values().any(|p| p.last_outcome != "ok") {
            problems.push("restart".into());
        }
    }
    // A quarantined commit: the agent went back from it to the last good release.
    let reverted: Vec<String> = ["config", "salt"]
        .iter()
        .filter_map(|name| {
            let q = state.releases.get(*name)?.quarantined.as_ref()?;
            Some(format!("{name}:{}", q.commit))
        })
        .collect();
    if outcome == Outcome::Ready && !problems.is_empty() {
        // A problem older than the last sync (a highstate not retried yet) still stands.
        outcome = Outcome::Degraded;
    }
    if outcome == Outcome::Failed && problems.is_empty() {
        problems.push("boot".into());
    }
    let commit = |name: &str| {
        state
            .repos
            .get(name)
            .and_then(|r| r.commit.clone())
            .unwrap_or_else(|| "none".into())
    };
    let outcome = match outcome {
        // Running on the last good release after a revert: the service is up, the commit is not.
        Outcome::Ready if !reverted.is_empty() => "reverted",
        o => o.as_str(),
    };
    let mut tags = BTreeMap::new();
    tags.insert(SALT_COMMIT.to_string(), commit("salt"));
    tags.insert(CONFIG_COMMIT.to_string(), commit("config"));
    tags.insert(OUTCOME.to_string(), outcome.to_string());
    tags.insert(
        REVERTED.to_string(),
        if reverted.is_empty() {
            "none".to_string()
        } else {
            reverted.join(",")
        },
    );
    tags.insert(FAILED_STATES.to_string(), failed_states.to_string());
    tags.insert(PROBLEMS.to_string(), problems.join(","));
    Some(tags)
}

#[cfg(test)]
mod tests;
