//! `imds-emulator`: the IMDSv2 emulator as a program, for local boots and for running
//! `stackless-init` by hand. It prints `AWS_EC2_METADATA_SERVICE_ENDPOINT=http://ADDR` once it
//! listens, then serves until SIGINT or SIGTERM. Never part of a shipped image.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use stackless_init::imds::emulator::{Emulator, EmulatorConfig, DEFAULT_MAC};
use stackless_init::imds::{Identity, ENDPOINT_ENV};

/// Serve an emulated EC2 instance metadata service (IMDSv2, tokens required).
#[derive(Debug, Parser)]
#[command(name = "imds-emulator", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1338")]
    listen: String,
    /// File served as user-data (without it, /latest/user-data answers 404).
    #[arg(long, value_name = "FILE")]
    user_data: Option<std::path::PathBuf>,
    #[arg(long, value_name = "ID", default_value_t = Identity::example().instance_id)]
    instance_id: String,
    #[arg(long, value_name = "R", default_value_t = Identity::example().region)]
    region: String,
    /// Availability zone [default: the region's first, such as eu-west-1a].
    #[arg(long, value_name = "AZ")]
    az: Option<String>,
    #[arg(long, value_name = "T", default_value_t = Identity::example().instance_type)]
    instance_type: String,
    #[arg(long, value_name = "IP", default_value_t = Identity::example().private_ip)]
    local_ipv4: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imds-emulator: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let user_data = match &args.user_data {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read the user-data file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let availability_zone = args.az.unwrap_or_else(|| format!("{}a", args.region));
    let identity = Identity {
        instance_id: args.instance_id,
        region: args.region,
        availability_zone,
        instance_type: args.instance_type,
        private_ip: args.local_ipv4,
        ..Identity::example()
    };

    // Block the signals before any thread starts, so every thread inherits the mask and only
    // the wait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals
        .thread_block()
        .map_err(|e| format!("cannot block SIGINT and SIGTERM: {e}"))?;

    let cfg = EmulatorConfig {
        user_data,
        identity,
        role: None,
        mac: DEFAULT_MAC.to_string(),
    };
    let emulator = Emulator::start_on(&args.listen, cfg).map_err(|e| e.to_string())?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ENDPOINT_ENV}={}", emulator.endpoint())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
    drop(stdout);

    signals
        .wait()
        .map_err(|e| format!("waiting for SIGINT or SIGTERM failed: {e}"))?;
    drop(emulator);
    Ok(())
}
