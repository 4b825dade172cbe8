//! `stackless-init`: dispatch only; the command line is parsed by `stackless_init::cli`, the
//! engine is the library.

use stackless_init::boot::{self, BootOptions};
use stackless_init::cli::{self, Command, Parsed};
use stackless_init::imds::Identity;
use stackless_init::lifecycle::{self, WaitResult};
use stackless_init::paths::Layout;
use stackless_init::state::Outcome;
use stackless_init::state::State;
use stackless_init::{resident, status, sync, userdata};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    // git runs GIT_ASKPASS with the prompt as its only argument: the agent points it at itself
    // and names the secret's file in STACKLESS_ASKPASS_FILE.
    if std::env::var_os(stackless_init::gitauth::ASKPASS_FILE_ENV).is_some() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if let [prompt] = args.as_slice() {
            if prompt.starts_with("Username") || prompt.starts_with("Password") {
                return match stackless_init::gitauth::askpass_main(prompt) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("stackless-init askpass: {e:#}");
                        ExitCode::from(1)
                    }
                };
            }
        }
    }
    let cli = match cli::parse(std::env::args_os().skip(1), &|k| std::env::var_os(k)) {
        Ok(Parsed::Run(cli)) => cli,
        Ok(Parsed::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose, cli.quiet);
    let layout = Layout::new(&cli.root);
    match run(cli.command, &layout) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("stackless-init: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command, layout: &Layout) -> anyhow::Result<u8> {
    match command {
        Command::Askpass { prompt } => {
            stackless_init::gitauth::askpass_main(&prompt)?;
            Ok(0)
        }
        Command::Seed {
            repo,
            url,
            reference,
            timeout,
        } => {
            let spec = stackless_init::repos::RepoSpec {
                url,
                reference,
                credentials: None,
                group: None,
            };
            let commit =
                stackless_init::repos::seed(layout, &repo, &spec, Duration::from_secs(timeout))?;
            println!(
                "seeded the {repo} object store with {} from {} ({})",
                stackless_init::repos::short(&commit),
                spec.url,
                spec.reference
            );
            Ok(0)
        }
        Command::CheckParameter {
            name,
            endpoint,
            deadline,
        } => {
            let deadline = Duration::from_secs(deadline);
            let imds = stackless_init::imds::ImdsClient::from_env(deadline);
            let mut reader = stackless_init::aws::ssm::ParameterReader::new(
                imds,
                endpoint.as_deref(),
                deadline,
            )?;
            let value = reader.get(&name)?;
            println!(
                "readable: {name} ({} bytes) from {}",
                value.expose().len(),
                reader.role.endpoint
            );
            Ok(0)
        }
        Command::Boot {
            once,
            imds_deadline,
            wait_for,
        } => {
            let opts = BootOptions {
                imds_deadline: Duration::from_secs(imds_deadline),
                wait_for,
                ..Default::default()
            };
            if !once {
                // SIGTERM during the boot waits for the boot to finish, then the resident loop
                // obeys it; no git or salt-call is orphaned half-way.
                resident::block_signals()?;
            }
            lifecycle::clear_marker(layout)?;
            lifecycle::status("booting");
            let result = boot::run(layout, &opts);
            let reason = result.error.as_deref();
            if let Some(e) = reason {
                eprintln!("stackless-init: boot {}: {e}", result.outcome.as_str());
            }
            let line = match reason {
                Some(e) => format!("{}: {e}", result.outcome.as_str()),
                None => result.outcome.as_str().to_string(),
            };
            if once || result.outcome == Outcome::Failed {
                announce(layout, &result.state, result.outcome, reason, &line)?;
                return Ok(result.exit_code() as u8);
            }
            // Watchers and schedule first, then readiness: ready means the agent is on duty.
            let mut agent = match resident::start(layout, &result) {
                Ok(a) => a,
                Err(e) => {
                    let why = format!("starting resident mode: {e:#}");
                    let line = format!("failed: {why}");
                    announce(layout, &result.state, Outcome::Failed, Some(&why), &line)?;
                    return Err(anyhow::anyhow!(why));
                }
            };
            announce(layout, &result.state, result.outcome, reason, &line)?;
            tracing::info!("boot {}; resident", result.outcome.as_str());
            Ok(agent.serve()? as u8)
        }
        Command::Sync { lock_wait } => {
            let record = sync::run_now(layout, Duration::from_secs(lock_wait))?;
            for s in &record.steps {
                let ok = if s.ok { "ok" } else { "FAIL" };
                println!(
                    "{:>8} ms  {ok:<4}  {:<12} {}",
                    s.ms,
                    s.name,
                    s.detail.as_deref().unwrap_or("")
                );
            }
            println!("sync {} in {} ms", record.outcome.as_str(), record.ms);
            if let Some(e) = &record.error {
                eprintln!("stackless-init: sync {}: {e}", record.outcome.as_str());
            }
            Ok(match record.outcome {
                Outcome::Ready | Outcome::Running => 0,
                Outcome::Failed => 1,
                Outcome::Degraded => 2,
            })
        }
        Command::Wait { timeout } => {
            match lifecycle::wait(layout, timeout.map(Duration::from_secs)) {
                WaitResult::Done(outcome, reason) => {
                    if reason.is_empty() {
                        println!("{}", outcome.as_str());
                    } else {
                        println!("{}: {reason}", outcome.as_str());
                    }
                    Ok(match outcome {
                        Outcome::Ready | Outcome::Running => 0,
                        Outcome::Failed => 1,
                        Outcome::Degraded => 2,
                    })
                }
                WaitResult::TimedOut => {
                    eprintln!(
                        "stackless-init: the boot has not finished after {} s",
                        timeout.unwrap_or(0)
                    );
                    Ok(3)
                }
            }
        }
        Command::Check {
            user_data,
            defaults,
            json,
        } => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
            };
            let defaults = match &defaults {
                Some(p) => userdata::load(&p.display().to_string(), &read(p)?)?,
                None => userdata::Document::default(),
            };
            let user = userdata::load(&user_data.display().to_string(), &read(&user_data)?)?;
            // Placeholders are rendered with a sample identity: the real one exists only at boot.
            let settings = userdata::resolve(&defaults, &user, &Identity::example())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&settings)?);
            } else {
                println!(
                    "{}: ok (minion id {} on instance {})",
                    user_data.display(),
                    settings.minion_id,
                    Identity::example().instance_id
                );
            }
            Ok(0)
        }
        Command::Releases {
            pin,
            unpin,
            lock_wait,
        } => {
            let wait = Duration::from_secs(lock_wait);
            if let Some((repo, commit)) = pin {
                let full = stackless_init::releases::pin(layout, &repo, &commit, wait)?;
                println!("{repo} pinned at {full}; `stackless-init releases --unpin {repo}` follows the ref again");
            } else if let Some(repo) = unpin {
                match stackless_init::releases::unpin(layout, &repo, wait)? {
                    Some(c) => println!("{repo} unpinned (was {c}); the next sync follows the ref"),
                    None => println!("{repo} was not pinned"),
                }
            } else {
                let state = State::load(layout)?.unwrap_or_default();
                print!("{}", stackless_init::releases::render(layout, &state));
            }
            Ok(0)
        }
        Command::Status { json } => {
            let state = State::load(layout)?.unwrap_or_default();
            if json {
                println!("{}", status::render_json(&state));
            } else {
                print!("{}", status::render(&state));
            }
            Ok(0)
        }
    }
}

/// The end of a boot, whatever its outcome: the ready marker, `READY=1` with a status line, and
/// the boot report on stdout (the console, through the unit's `StandardOutput=journal+console`),
/// its machine-readable line last and flushed. The marker's error, if any, comes after the report.
fn announce(
    layout: &Layout,
    state: &State,
    outcome: Outcome,
    reason: Option<&str>,
    line: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    let marker = lifecycle::write_marker(layout, outcome, reason);
    lifecycle::ready(line);
    let report = status::console_report(state, outcome, reason);
    // A closed stdout must not turn a boot into a failure: the marker and the record remain.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(report.as_bytes()).and_then(|()| out.flush());
    marker
}

fn init_logging(verbose: u8, quiet: bool) {
    use stackless_init::logging::{self, Filter};
    use tracing::level_filters::LevelFilter;
    let level = match (quiet, verbose) {
        (true, _) => LevelFilter::ERROR,
        (false, 0) => LevelFilter::INFO,
        (false, 1) => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    // RUST_LOG as `target=level,...`; one the agent cannot read leaves the level as it is.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| Filter::parse(&v))
        .unwrap_or_else(|| Filter::level(level));
    logging::init(filter);
}
