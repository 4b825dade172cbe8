//! `builder fleet --wait`: look at the fleet every interval until every live instance reports
//! the commit ready (0), one reports it failed or degraded or reverted from it (1, naming it and
//! its problems), or
//! the deadline passes (3, naming the stragglers). Each look lists the fleet afresh, so
//! instances launched during the wait count, and terminated ones drop out.

use super::commit::Wanted;
use super::{list, render, Instance, Selector};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub const EXIT_CONVERGED: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_TIMEOUT: u8 = 3;

/// Which repository's commit to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Repo {
    Salt,
    Config,
}

impl Repo {
    pub fn as_str(self) -> &'static str {
        match self {
            Repo::Salt => "salt",
            Repo::Config => "config",
        }
    }
}

/// What one look says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every live instance reports the commit ready (and there is at least one).
    Converged { instances: usize },
    /// These report the commit failed or degraded: `(instance, what it says)`.
    Failed(Vec<(String, String)>),
    /// Not there yet: `(instance, what it reports instead)`, and how many are.
    Pending {
        done: usize,
        stragglers: Vec<(String, String)>,
    },
}

/// The verdict over one listing.
pub fn judge(instances: &[Instance], repo: Repo, wanted: &Wanted) -> Verdict {
    let mut failed = Vec::new();
    let mut stragglers = Vec::new();
    let mut done = 0;
    for i in instances.iter().filter(|i| i.is_live()) {
        let on_it = i.commit(repo).is_some_and(|c| wanted.matches(c));
        if i.reverted_from(repo).is_some_and(|c| wanted.matches(c)) {
            // The agent tried the commit, saw it fail and went back to the last good release.
            failed.push((
                i.instance_id.clone(),
                format!(
                    "reverted to {} {}; `stackless-init status` on {} says why",
                    repo.as_str(),
                    i.commit(repo).map_or("-", render::short),
                    i.instance_id
                ),
            ));
            continue;
        }
        match (on_it, i.outcome.as_deref()) {
            (true, Some("ready")) => done += 1,
            (true, Some(outcome @ ("failed" | "degraded"))) => {
                failed.push((i.instance_id.clone(), failure(i, outcome)))
            }
            _ => stragglers.push((i.instance_id.clone(), where_it_is(i, repo))),
        }
    }
    if !failed.is_empty() {
        Verdict::Failed(failed)
    } else if stragglers.is_empty() && done > 0 {
        Verdict::Converged { instances: done }
    } else {
        Verdict::Pending { done, stragglers }
    }
}

fn failure(i: &Instance, outcome: &str) -> String {
    let mut s = outcome.to_string();
    if !i.problems.is_empty() {
        s.push_str(&format!(": {}", i.problems.join(", ")));
    }
    if let Some(n) = i.failed_states.filter(|n| *n > 0) {
        s.push_str(&format!(" ({n} failed state(s))"));
    }
    s.push_str(&format!(
        "; `stackless-init status` on {} says more",
        i.instance_id
    ));
    s
}

fn where_it_is(i: &Instance, repo: Repo) -> String {
    match (i.commit(repo), i.outcome.as_deref()) {
        (None, None) => format!("{}, no report yet", i.state),
        (c, o) => format!(
            "{} on {} {}",
            o.unwrap_or("-"),
            repo.as_str(),
            c.map_or("-", render::short)
        ),
    }
}

/// How long to wait, and how often to look.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub timeout: Duration,
    pub interval: Duration,
}

/// The end of a wait: the exit code, the last listing and the last verdict.
pub struct Ended {
    pub code: u8,
    pub instances: Vec<Instance>,
    pub verdict: Verdict,
}

/// Waits as the module says. A failed look (throttling past the SDK's retries, the network) is
/// shown and the next look tries again, up to the deadline.
pub async fn wait(
    ec2: &aws_sdk_ec2::Client,
    selector: &Selector,
    repo: Repo,
    wanted: &Wanted,
    pace: Pace,
) -> Result<Ended> {
    let start = Instant::now();
    let progress = Progress::new(&format!(
        "{selector} on {} {}",
        repo.as_str(),
        wanted.short()
    ));
    let mut last: Option<(Vec<Instance>, Verdict)> = None;
    let mut last_line = String::new();
    loop {
        match list::list(ec2, selector).await {
            Ok(instances) => {
                let verdict = judge(&instances, repo, wanted);
                match &verdict {
                    Verdict::Converged { .. } => {
                        return Ok(Ended {
                            code: EXIT_CONVERGED,
                            instances,
                            verdict,
                        })
                    }
                    Verdict::Failed(_) => {
                        return Ok(Ended {
                            code: EXIT_FAILED,
                            instances,
                            verdict,
                        })
                    }
                    Verdict::Pending { done, stragglers } => {
                        let live = done + stragglers.len();
                        let line = match stragglers.first() {
                            None => "no running instance yet".to_string(),
                            Some((id, at)) => format!(
                                "{done}/{live} ready; waiting for {id} ({at}){}",
                                if stragglers.len() > 1 {
                                    format!(" and {} more", stragglers.len() - 1)
                                } else {
                                    String::new()
                                }
                            ),
                        };
                        progress.show(&line, &mut last_line);
                    }
                }
                last = Some((instances, verdict));
            }
            Err(e) => {
                if last.is_none() {
                    // The first look failing is a set-up problem (credentials, permissions).
                    return Err(e);
                }
                progress.show(
                    &format!("listing failed, trying again: {e:#}"),
                    &mut last_line,
                );
            }
        }
        let spent = start.elapsed();
        if spent >= pace.timeout {
            let (instances, verdict) = last.expect("a look succeeded");
            return Ok(Ended {
                code: EXIT_TIMEOUT,
                instances,
                verdict,
            });
        }
        tokio::time::sleep(pace.interval.min(pace.timeout - spent)).await;
    }
}

/// A spinner on a terminal; plain lines, only when they change, otherwise.
struct Progress(Option<ProgressBar>);

impl Progress {
    fn new(what: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            eprintln!("waiting for {what}");
            return Progress(None);
        }
        let pb = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]") {
            pb.set_style(style);
        }
        pb.set_prefix(format!("waiting for {what}"));
        pb.enable_steady_tick(Duration::from_millis(200));
        Progress(Some(pb))
    }

    fn show(&self, line: &str, last: &mut String) {
        match &self.0 {
            Some(pb) => pb.set_message(line.to_string()),
            None if line != last.as_str() => eprintln!("{line}"),
            None => {}
        }
        *last = line.to_string();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, state: &str, config: Option<&str>, outcome: Option<&str>) -> Instance {
        Instance {
            instance_id: id.into(),
            state: state.into(),
            zone: "eu-west-1a".into(),
            image_id: "ami-1".into(),
            launch_time: None,
            salt_commit: None,
            config_commit: config.map(str::to_string),
            outcome: outcome.map(str::to_string),
            failed_states: None,
            problems: vec![],
            reverted: vec![],
            reported_at: None,
        }
    }

    fn wanted(c: &str) -> Wanted {
        Wanted {
            reference: c.into(),
            commit: c.into(),
        }
    }

    #[test]
    fn the_verdict_over_every_state() {
        let new = "b".repeat(40);
        let old = "a".repeat(40);
        let w = wanted(&new[..7]);
        let mut fleet = vec![
            instance("i-1", "running", Some(&new), Some("ready")),
            instance("i-2", "running", Some(&old), Some("ready")),
            instance("i-3", "pending", None, None),
            // Going away: not waited for.
            instance("i-4", "shutting-down", Some(&old), Some("failed")),
        ];
        let v = judge(&fleet, Repo::Config, &w);
        let Verdict::Pending { done, stragglers } = v else {
            panic!("{v:?}")
        };
        assert_eq!(done, 1);
        assert_eq!(
            stragglers,
            vec![
                ("i-2".into(), "ready on config aaaaaaaaaaaa".into()),
                ("i-3".into(), "pending, no report yet".into())
            ]
        );
        // Failed on an older commit is not the new commit failing.
        fleet[1].outcome = Some("failed".into());
        assert!(matches!(
            judge(&fleet, Repo::Config, &w),
            Verdict::Pending { .. }
        ));

        fleet[1] = instance("i-2", "running", Some(&new), Some("ready"));
        fleet[2] = instance("i-3", "running", Some(&new), Some("degraded"));
        fleet[2].problems = vec!["highstate".into()];
        fleet[2].failed_states = Some(2);
        let v = judge(&fleet, Repo::Config, &w);
        assert_eq!(
            v,
            Verdict::Failed(vec![(
                "i-3".into(),
                "degraded: highstate (2 failed state(s)); `stackless-init status` on i-3 says more"
                    .into()
            )])
        );
        fleet[2].outcome = Some("ready".into());
        assert_eq!(
            judge(&fleet, Repo::Config, &w),
            Verdict::Converged { instances: 3 }
        );
        // The salt commit is another question.
        assert!(matches!(
            judge(&fleet, Repo::Salt, &w),
            Verdict::Pending { .. }
        ));
        // Back on the old release after trying the new commit: that is the commit failing.
        fleet[2] = instance("i-3", "running", Some(&old), Some("reverted"));
        fleet[2].reverted = vec![("config".into(), new.clone())];
        assert_eq!(
            judge(&fleet, Repo::Config, &w),
            Verdict::Failed(vec![(
                "i-3".into(),
                "reverted to config aaaaaaaaaaaa; `stackless-init status` on i-3 says why".into()
            )])
        );
        // Reverted from an older commit: a straggler on the new one, not a failure of it.
        fleet[2].reverted = vec![("config".into(), "c".repeat(40))];
        assert!(matches!(
            judge(&fleet, Repo::Config, &w),
            Verdict::Pending { .. }
        ));
        // No instance at all is not converged.
        assert!(matches!(
            judge(&[], Repo::Config, &w),
            Verdict::Pending { done: 0, .. }
        ));
    }
}
