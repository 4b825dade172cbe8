//! The boot sequence (DESIGN.md, steps 1-5): image defaults, IMDS, user-data, per-instance
//! set-up, repositories, highstate. Every step is timed into the state record.

use crate::imds::{Identity, ImdsClient};
use crate::lock::SyncLock;
use crate::paths::Layout;
use crate::repos::{self, RepoSpec, SyncOutcome};
use crate::salt::config::{write_minion_config, MinionConfig};
use crate::salt::highstate;
use crate::salt::install::{ensure_installed, InstallOutcome};
use crate::state::{
    now_rfc3339, BootRecord, HighstateRecord, Outcome, RepoRecord, State, Step, STATE_VERSION,
};
use crate::userdata::{self, Document, HighstateMode, Settings};
use anyhow::{anyhow, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Knobs of one boot run.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Total time IMDS may take to answer, retries included.
    pub imds_deadline: Duration,
    /// Longest wait for another sync to let go of the lock.
    pub lock_wait: Duration,
    /// Deadline of each git command.
    pub git_timeout: Duration,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            imds_deadline: Duration::from_secs(120),
            lock_wait: Duration::from_secs(30 * 60),
            git_timeout: Duration::from_secs(300),
        }
    }
}

/// How a boot ended; `state` is what was saved.
#[derive(Debug)]
pub struct BootResult {
    pub outcome: Outcome,
    pub error: Option<String>,
    pub state: State,
}

impl BootResult {
    /// 0 ready, 1 failed, 2 degraded (the `wait` convention).
    pub fn exit_code(&self) -> i32 {
        match self.outcome {
            Outcome::Ready | Outcome::Running => 0,
            Outcome::Failed => 1,
            Outcome::Degraded => 2,
        }
    }
}

/// Times steps and keeps the first problem of each severity.
struct Timeline {
    started: Instant,
    steps: Vec<Step>,
    degraded: Vec<String>,
}

impl Timeline {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            steps: Vec::new(),
            degraded: Vec::new(),
        }
    }

    /// Runs a step; records its time, whether it passed, and a detail line.
    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, Option<String>)>,
    ) -> Result<T> {
        let t = Instant::now();
        tracing::debug!(step = name, "starting");
        let r = f();
        let ms = t.elapsed().as_millis() as u64;
        match r {
            Ok((v, detail)) => {
                tracing::info!(
                    step = name,
                    ms,
                    detail = detail.as_deref().unwrap_or(""),
                    "done"
                );
                self.steps.push(Step {
                    name: name.into(),
                    ms,
                    ok: true,
                    detail,
                });
                Ok(v)
            }
            Err(e) => {
                let detail = format!("{e:#}");
                tracing::error!(step = name, ms, "{detail}");
                self.steps.push(Step {
                    name: name.into(),
                    ms,
                    ok: false,
                    detail: Some(detail),
                });
                Err(e)
            }
        }
    }

    /// Marks the last step as not ok without failing the boot.
    fn degrade(&mut self, reason: String) {
        if let Some(s) = self.steps.last_mut() {
            s.ok = false;
        }
        tracing::warn!("{reason}");
        self.degraded.push(reason);
    }

    fn total_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Runs the boot sequence once and saves the record. Never panics on bad input: every problem
/// ends as a `failed` or `degraded` outcome with a one-line reason.
pub fn run(layout: &Layout, opts: &BootOptions) -> BootResult {
    let started_at = now_rfc3339();
    let mut tl = Timeline::new();
    let previous = State::load(layout).unwrap_or_else(|e| {
        tracing::warn!("{e:#}; starting with a fresh record");
        None
    });
    let mut state = State {
        version: STATE_VERSION,
        ..Default::default()
    };
    let mut first_boot = true;

    let result = sequence(layout, opts, &mut tl, &mut state, previous, &mut first_boot);
    let (outcome, error) = match result {
        Err(e) => (Outcome::Failed, Some(format!("{e:#}"))),
        Ok(()) if !tl.degraded.is_empty() => (Outcome::Degraded, Some(tl.degraded.join("; "))),
        Ok(()) => (Outcome::Ready, None),
    };
    state.boot = Some(BootRecord {
        started_at,
        finished_at: Some(now_rfc3339()),
        outcome,
        error: error.clone(),
        first_boot,
        total_ms: tl.total_ms(),
        steps: std::mem::take(&mut tl.steps),
    });
    let error = match state.save(layout) {
        Ok(()) => error,
        Err(e) => {
            tracing::error!("{e:#}");
            Some(error.map_or(format!("{e:#}"), |x| format!("{x}; {e:#}")))
        }
    };
    BootResult {
        outcome,
        error,
        state,
    }
}

fn sequence(
    layout: &Layout,
    opts: &BootOptions,
    tl: &mut Timeline,
    state: &mut State,
    previous: Option<State>,
    first_boot: &mut bool,
) -> Result<()> {
    // 1. Image defaults.
    let defaults = tl.step("defaults", || {
        let path = layout.defaults_file();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let doc = userdata::load(&path.display().to_string(), &bytes)?;
                Ok((doc, Some(path.display().to_string())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Document::default(), Some("none (no init.toml)".into())))
            }
            Err(e) => Err(anyhow!(e).context(format!("reading {}", path.display()))),
        }
    })?;

    // 2. IMDS: user-data and identity.
    let mut imds = ImdsClient::from_env(opts.imds_deadline);
    let (raw_user_data, identity): (Option<Vec<u8>>, Identity) = tl.step("imds", || {
        let ud = imds.user_data().context("reading user-data from IMDS")?;
        let id = imds
            .identity()
            .context("reading the instance identity from IMDS")?;
        let detail = format!(
            "{} {} {}, user-data {}",
            id.instance_id,
            id.availability_zone,
            id.instance_type,
            ud.as_ref()
                .map_or("none".to_string(), |u| format!("{} bytes", u.len()))
        );
        Ok(((ud, id), Some(detail)))
    })?;
    state.instance_id = Some(identity.instance_id.clone());

    // 3. User-data over defaults, rendered for this instance. Nothing is written before this passes.
    let settings: Settings = tl.step("user-data", || {
        let user = match &raw_user_data {
            Some(bytes) => userdata::load("user-data", bytes)?,
            None => Document::default(),
        };
        let s = userdata::resolve(&defaults, &user, &identity)?;
        let detail = format!("minion id {}", s.minion_id);
        Ok((s, Some(detail)))
    })?;
    state.minion_id = Some(settings.minion_id.clone());

    // A record of another instance (an image baked with one) is not ours: start afresh.
    let previous =
        previous.filter(|p| p.instance_id.as_deref() == Some(identity.instance_id.as_str()));
    *first_boot = previous.is_none();
    if let Some(p) = &previous {
        state.repos = p.repos.clone();
        state.highstate = p.highstate.clone();
    }

    // 4. Salt: its configuration (rewritten only when it changed) and the program itself.
    let salt_current = layout.repo_current("salt");
    tl.step("minion-config", || {
        let changed = write_minion_config(
            layout,
            &MinionConfig {
                minion_id: &settings.minion_id,
                grains: &settings.grains,
                file_root: inside(&salt_current, &settings.salt.states_dir),
                pillar_root: inside(&salt_current, &settings.salt.pillar_dir),
            },
        )?;
        Ok((
            (),
            Some(if changed { "written" } else { "unchanged" }.into()),
        ))
    })?;
    let needs_salt =
        settings.salt.repo.is_some() && settings.sync.highstate != HighstateMode::Never;
    let salt_call: Option<PathBuf> = if needs_salt {
        Some(tl.step("salt-install", || {
            let spec = &settings.salt.install;
            match ensure_installed(layout, spec, settings.salt.salt_call.as_deref())? {
                InstallOutcome::AlreadyPresent(p) => {
                    let d = format!("present at {}", p.display());
                    Ok((p, Some(d)))
                }
                InstallOutcome::Installed(p) => {
                    let d = format!(
                        "installed salt {} by {:?} at {}",
                        spec.version,
                        spec.method,
                        p.display()
                    );
                    Ok((p, Some(d)))
                }
            }
        })?)
    } else {
        None
    };

    // 5. Repositories and highstate, under the lock every sync takes.
    let _lock = tl.step("lock", || {
        let l = SyncLock::acquire(layout, opts.lock_wait)?;
        Ok((l, None))
    })?;
    let mut salt_commit = None;
    for (name, spec) in [("salt", &settings.salt.repo), ("config", &settings.config)] {
        let Some(spec) = spec else { continue };
        let outcome = tl.step(&format!("sync-{name}"), || {
            let o = repos::sync(layout, name, spec, opts.git_timeout)
                .with_context(|| format!("syncing the {name} repository"))?;
            let d = describe(&o);
            Ok((o, Some(d)))
        });
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                record_repo(state, name, spec, None, "failed", Some(format!("{e:#}")));
                return Err(e);
            }
        };
        if let SyncOutcome::KeptLast { error, commit } = &outcome {
            tl.degrade(format!(
                "{name} repository: fetch failed, kept the last good release {}: {error}",
                short(commit)
            ));
        }
        let result = match &outcome {
            SyncOutcome::Updated { .. } => "updated",
            SyncOutcome::Unchanged { .. } => "unchanged",
            SyncOutcome::KeptLast { .. } => "kept-last",
        };
        let error = match &outcome {
            SyncOutcome::KeptLast { error, .. } => Some(error.clone()),
            _ => None,
        };
        record_repo(
            state,
            name,
            spec,
            Some(outcome.commit().to_string()),
            result,
            error,
        );
        if name == "salt" {
            salt_commit = Some(outcome.commit().to_string());
        }
    }

    if let (Some(salt_call), Some(commit)) = (salt_call, salt_commit) {
        let at = now_rfc3339();
        let report = tl.step("highstate", || {
            let r = highstate::run(
                layout,
                &salt_call,
                &settings.minion_id,
                settings.salt.timeout,
            )?;
            let d = r.summary();
            Ok((r, Some(d)))
        });
        match report {
            Ok(report) => {
                if !report.ok {
                    tl.degrade(format!("highstate: {}", report.summary()));
                }
                state.highstate = Some(HighstateRecord {
                    report,
                    commit: Some(commit),
                    at,
                    error: None,
                });
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tl.degrade(format!("highstate: {msg}"));
                state.highstate = Some(HighstateRecord {
                    report: Default::default(),
                    commit: Some(commit),
                    at,
                    error: Some(msg),
                });
            }
        }
    }
    Ok(())
}

fn record_repo(
    state: &mut State,
    name: &str,
    spec: &RepoSpec,
    commit: Option<String>,
    result: &str,
    error: Option<String>,
) {
    let commit = commit.or_else(|| state.repos.get(name).and_then(|r| r.commit.clone()));
    state.repos.insert(
        name.to_string(),
        RepoRecord {
            url: spec.url.clone(),
            reference: spec.reference.clone(),
            commit,
            result: result.into(),
            synced_at: now_rfc3339(),
            error,
        },
    );
}

fn describe(o: &SyncOutcome) -> String {
    match o {
        SyncOutcome::Updated {
            commit,
            previous: Some(p),
        } => format!("{} -> {}", short(p), short(commit)),
        SyncOutcome::Updated {
            commit,
            previous: None,
        } => format!("published {}", short(commit)),
        SyncOutcome::Unchanged { commit } => format!("unchanged at {}", short(commit)),
        SyncOutcome::KeptLast { commit, .. } => format!("fetch failed, kept {}", short(commit)),
    }
}

/// `base/dir`, or `base` itself for `.`.
fn inside(base: &std::path::Path, dir: &str) -> PathBuf {
    match dir.trim_matches('/') {
        "" | "." => base.to_path_buf(),
        d => base.join(d),
    }
}

pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
