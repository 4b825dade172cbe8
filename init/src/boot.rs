//! The boot sequence (DESIGN.md, steps 1-5): image defaults, IMDS, user-data, per-instance
//! set-up, repositories, highstate. Every step is timed into the state record.

use crate::imds::{Identity, ImdsClient};
use crate::lock::SyncLock;
use crate::paths::Layout;
use crate::salt::config::{write_minion_config, MinionConfig};
use crate::salt::install::{ensure_installed, InstallOutcome};
use crate::salt::warm::WarmSaltCall;
use crate::settings;
use crate::state::{now_rfc3339, BootRecord, Outcome, State, STATE_VERSION};
use crate::sync::{self, Trigger};
use crate::timeline::{one_line, Timeline};
use crate::trust;
use crate::userdata::{self, Document, HighstateMode, Settings};
use anyhow::{Context, Result};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Knobs of one boot run.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Total time IMDS may take to answer, retries included.
    pub imds_deadline: Duration,
    /// Longest wait for another sync to let go of the lock.
    pub lock_wait: Duration,
    /// systemd units waited for once salt-call is warming up (`--wait-for`, [`crate::wait_for`]).
    pub wait_for: Vec<String>,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            imds_deadline: Duration::from_secs(120),
            lock_wait: Duration::from_secs(30 * 60),
            wait_for: Vec::new(),
        }
    }
}

/// How a boot ended; `state` is what was saved. `settings` is there when user-data resolved.
#[derive(Debug)]
pub struct BootResult {
    pub outcome: Outcome,
    pub error: Option<String>,
    pub state: State,
    pub settings: Option<Settings>,
    pub salt_call: Option<PathBuf>,
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

/// What the sequence hands back to `run`.
#[derive(Default)]
struct Progress {
    first_boot: bool,
    settings: Option<Settings>,
    salt_call: Option<PathBuf>,
    /// Held until the record is saved, so a waiting sync reads this boot's record.
    lock: Option<SyncLock>,
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
    let mut progress = Progress {
        first_boot: true,
        ..Default::default()
    };

    let result = sequence(
        layout,
        opts,
        &mut tl,
        &mut state,
        previous.clone(),
        &mut progress,
    );
    if result.is_err() && state.instance_id.is_none() {
        // Failed before IMDS said which instance this is: keep the last record, new boot entry.
        if let Some(p) = previous {
            state = p;
        }
    }
    let (outcome, error) = match result {
        Err(e) => (Outcome::Failed, Some(one_line(&format!("{e:#}")))),
        Ok(()) if !tl.degraded.is_empty() => (Outcome::Degraded, Some(tl.degraded.join("; "))),
        Ok(()) => (Outcome::Ready, None),
    };
    state.boot = Some(BootRecord {
        started_at,
        finished_at: Some(now_rfc3339()),
        outcome,
        error: error.clone(),
        first_boot: progress.first_boot,
        total_ms: tl.total_ms(),
        steps: std::mem::take(&mut tl.steps),
    });
    // After every boot, even one that failed: the fleet must see a failure too.
    crate::report::update(&mut state, progress.settings.as_ref(), true);
    let error = match state.save(layout) {
        Ok(()) => error,
        Err(e) => {
            tracing::error!("{e:#}");
            Some(error.map_or(format!("{e:#}"), |x| format!("{x}; {e:#}")))
        }
    };
    drop(progress.lock.take());
    BootResult {
        outcome,
        error,
        state,
        settings: progress.settings,
        salt_call: progress.salt_call,
    }
}

fn sequence(
    layout: &Layout,
    opts: &BootOptions,
    tl: &mut Timeline,
    state: &mut State,
    previous: Option<State>,
    progress: &mut Progress,
) -> Result<()> {
    // 1. Image defaults.
    let defaults = tl.step("defaults", || {
        let doc = settings::load_defaults(layout)?;
        let detail = if doc.file.is_empty() {
            "none (no init.toml)".to_string()
        } else {
            doc.file.clone()
        };
        Ok((doc, Some(detail)))
    })?;

    // 1b. salt-call, when the image has it, starts importing salt now: the highstate comes
    // after IMDS and the repositories (and, early in boot, DHCP), and most of a salt-call's start
    // is that import. User-data may choose another salt-call or no highstate: then it is killed.
    let configured = defaults
        .data
        .salt
        .as_ref()
        .and_then(|s| s.salt_call.clone());
    let warm = Cell::new(
        crate::salt::install::find_salt_call(layout, configured.as_deref())
            .and_then(|p| WarmSaltCall::start(&p)),
    );

    // 1c. What the unit used to be ordered after, now that the warm-up runs meanwhile.
    if !opts.wait_for.is_empty() {
        tl.step("wait-for", || {
            Ok((
                (),
                Some(crate::wait_for::wait(&opts.wait_for, opts.imds_deadline)),
            ))
        })?;
    }

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
    // A record of another instance (an image baked with one) is not ours: start afresh.
    let previous =
        previous.filter(|p| p.instance_id.as_deref() == Some(identity.instance_id.as_str()));
    progress.first_boot = previous.is_none();
    if let Some(p) = previous {
        state.minion_id = p.minion_id;
        state.identity = p.identity;
        state.repos = p.repos;
        state.highstate = p.highstate;
        state.watch = p.watch;
        state.schedule = p.schedule;
        state.last_sync = p.last_sync;
        state.report = p.report;
        state.releases = p.releases;
    }

    // 3. User-data over defaults, rendered for this instance. Nothing is written before this passes.
    let (user, settings): (Document, Settings) = tl.step("user-data", || {
        let user = match &raw_user_data {
            Some(bytes) => userdata::load("user-data", bytes)?,
            None => Document::default(),
        };
        let s = userdata::resolve(&defaults, &user, &identity)?;
        let detail = format!("minion id {}", s.minion_id);
        Ok(((user, s), Some(detail)))
    })?;
    state.minion_id = Some(settings.minion_id.clone());
    state.identity = Some(identity.clone());
    settings::save_user_data(layout, &user)?;

    // 4a. Extra certificate authorities, before anything below reaches the network (salt's pip
    // install, git over https). Every boot, so a removed `ca_certificates` is removed too.
    tl.step("trust", || {
        let tool = trust::Tool::discover(layout);
        let detail = trust::apply(
            layout,
            settings.ca_certificates.as_deref(),
            tool.as_ref(),
            settings.timeouts.trust,
        )
        .context("trusting the user-data ca_certificates")?;
        Ok(((), Some(detail)))
    })?;
    // pip upgraded from PyPI trusts its own certifi bundle, so it is pointed at the system
    // bundle that now holds the extra CAs. git (and curl for salt-bootstrap) use OpenSSL's
    // default CA file, the system bundle, already.
    let ca_bundle = settings
        .ca_certificates
        .as_ref()
        .and_then(|_| trust::system_bundle(layout));

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
            let configured = settings.salt.salt_call.as_deref();
            let timeout = settings.timeouts.salt_install;
            match ensure_installed(layout, spec, configured, ca_bundle.as_deref(), timeout)? {
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
    if salt_call.is_none() {
        drop(warm.take());
    }
    progress.salt_call = salt_call.clone();
    progress.settings = Some(settings.clone());

    // 5. Repositories and highstate, under the lock every sync takes.
    progress.lock = Some(tl.step("lock", || {
        Ok((SyncLock::acquire(layout, opts.lock_wait)?, None))
    })?);
    let ctx = sync::SyncContext {
        layout,
        settings: &settings,
        salt_call: salt_call.as_deref(),
        warm: Some(&warm),
    };
    sync::run(ctx, state, tl, Trigger::Boot, false)?;
    Ok(())
}

/// `base/dir`, or `base` itself for `.`.
pub(crate) fn inside(base: &Path, dir: &str) -> PathBuf {
    match dir.trim_matches('/') {
        "" | "." => base.to_path_buf(),
        d => base.join(d),
    }
}
