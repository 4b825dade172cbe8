//! `builder fleet`: what every instance of a service (or an Auto Scaling group) says it applied,
//! read from the tags the agent writes on its own instance (init's `report` module), and
//! `--wait` for a commit: 0 when every running instance reports it ready, 1 as soon as one
//! reports it failed or degraded, 3 at the deadline.
//!
//! One paginated `DescribeInstances` per look ([`list`]), the verdict over the rows ([`wait`]),
//! the table, summary and JSON ([`render`]), the commit a ref names ([`commit`]).

pub mod commit;
pub mod list;
pub mod render;
pub mod wait;

/// The tag keys: the agent's own (it writes them, `stackless_init::report`), the service tag
/// deploys put on instances, and the one Auto Scaling puts on its instances.
pub mod tags {
    pub use stackless_init::report::{
        CONFIG_COMMIT, FAILED_STATES, OUTCOME, PROBLEMS, REPORTED_AT, REVERTED, SALT_COMMIT,
    };
    pub const SERVICE: &str = "stackless:service";
    pub const ASG: &str = "aws:autoscaling:groupName";
}

/// Which instances: those tagged with the service, or those of an Auto Scaling group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Service(String),
    Asg(String),
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Service(s) => write!(f, "service {s}"),
            Selector::Asg(a) => write!(f, "Auto Scaling group {a}"),
        }
    }
}

/// One instance and its last report (`None` fields: no report yet).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Instance {
    pub instance_id: String,
    /// pending, running, stopping or shutting-down.
    pub state: String,
    pub zone: String,
    pub image_id: String,
    /// RFC 3339.
    pub launch_time: Option<String>,
    pub salt_commit: Option<String>,
    pub config_commit: Option<String>,
    /// ready, reverted, degraded or failed.
    pub outcome: Option<String>,
    pub failed_states: Option<u32>,
    /// Short problem kinds (`highstate`, `config-repo`, `restart`).
    pub problems: Vec<String>,
    /// The commits the agent reverted from and quarantined: `(repository, commit)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reverted: Vec<(String, String)>,
    /// RFC 3339.
    pub reported_at: Option<String>,
}

impl Instance {
    /// Whether it is meant to be up: pending or running (not stopping or shutting down).
    pub fn is_live(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "running")
    }

    /// The commit it reports for `repo`.
    pub fn commit(&self, repo: wait::Repo) -> Option<&str> {
        match repo {
            wait::Repo::Salt => self.salt_commit.as_deref(),
            wait::Repo::Config => self.config_commit.as_deref(),
        }
    }

    /// The commit of `repo` it reverted from, if any.
    pub fn reverted_from(&self, repo: wait::Repo) -> Option<&str> {
        self.reverted
            .iter()
            .find(|(r, _)| r == repo.as_str())
            .map(|(_, c)| c.as_str())
    }
}
