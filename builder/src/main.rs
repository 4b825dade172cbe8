//! `builder`: argument parsing only; the engine is the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use stackless_builder::arch::{self, Arch};
use stackless_builder::definition::{self, ImageDef};
use stackless_builder::deploy;
use stackless_builder::pipeline::{self, BakeOptions};
use stackless_builder::platform::aws::{self, AwsOptions, AwsTarget};
use stackless_builder::platform::local::{LocalOptions, LocalTarget};
use stackless_builder::preflight;
use stackless_builder::render::{self, RenderInputs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "builder",
    version,
    about = "Bakes stackless images and deploys them"
)]
struct Cli {
    /// Folder of image definitions.
    #[arg(
        long = "images-dir",
        global = true,
        default_value = "images",
        env = "STACKLESS_IMAGES"
    )]
    images_dir: PathBuf,
    /// Your own templates folder (missing files fall back to the built-in ones).
    #[arg(long, global = true, env = "STACKLESS_TEMPLATES")]
    templates: Option<PathBuf>,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// `json` for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    Aws,
    Local,
}

#[derive(Subcommand)]
enum Command {
    /// Bake an image; prints its id as the last line of stdout.
    Bake {
        image: String,
        #[arg(long, value_enum, default_value_t = TargetKind::Aws)]
        target: TargetKind,
        /// A static stackless-init (scripts/build-init.sh builds them); repeat it, once per
        /// architecture: the bake stages the one whose ELF machine is the source image's
        /// architecture and refuses, before launching anything, when none is. Default: the
        /// agents build-init.sh left in target/ (x86_64-unknown-linux-musl,
        /// aarch64-unknown-linux-musl), those that exist.
        #[arg(long = "init-binary", value_name = "FILE")]
        init_binary: Vec<PathBuf>,
        /// The salt-bootstrap script, for `salt = "onedir"` images.
        #[arg(long)]
        bootstrap: Option<PathBuf>,
        /// Bake even if an image from identical inputs exists.
        #[arg(long)]
        force: bool,
        /// `--target local`: bake from the cached Debian base alone, without the packages layer,
        /// the pip wheelhouse or apt's package cache, as a bake on a fresh machine would (to
        /// check that an image does not depend on them, or to time a bake without them).
        #[arg(long)]
        no_cache: bool,
        /// Keep the seed machine after a failure, for debugging (the message says how to remove it).
        #[arg(long)]
        keep_on_error: bool,
        /// Where to write the manifest (default out/IMAGE/manifest-TARGET.json).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Do not run the preflight checks first (`--target aws`).
        #[arg(long)]
        skip_preflight: bool,
    },
    /// Check everything a bake on AWS (`preflight IMAGE`) or a deploy (`preflight --deploy
    /// SERVICE`) needs, creating nothing: credentials, region, caller, IAM actions, instance
    /// profile, subnet reach to SSM, source image and instance type, target groups, deploy lock.
    /// Exits 1 when a check fails.
    Preflight {
        /// The image definition a bake would build.
        #[arg(value_name = "IMAGE", required_unless_present = "deploy")]
        definition: Option<String>,
        /// Check a deploy of this service instead (its deploy file and the flags below).
        #[arg(long, value_name = "SERVICE", conflicts_with = "definition")]
        deploy: Option<String>,
        #[command(flatten)]
        args: DeployArgs,
    },
    /// Check definitions and render every template (the scripts also pass `bash -n`, the seed's
    /// user-data `sh -n` with the lease first).
    Validate { names: Vec<String> },
    /// Write what a bake would stage and run, for review (the seed's user-data too).
    Render {
        image: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate user-data with the agent's own types, gzip it when that helps, refuse it over 16 KB.
    UserData {
        file: PathBuf,
        /// Merge under the image's defaults when checking.
        #[arg(long)]
        image: Option<String>,
        /// Write the user-data to send here (gzipped when smaller).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Remove what killed builds left behind (expired temporary instances and groups, half-made images).
    Gc {
        #[arg(long)]
        dry_run: bool,
        /// A build you know is over (killed: its id is in its log): remove what it left now, not
        /// when its lease ends, and the images it made but never published. Repeat for more.
        #[arg(long = "build", value_name = "BUILD_ID")]
        builds: Vec<String>,
    },
    /// List or prune baked images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Replace a service's instances behind its load balancer; rolls back when anything fails.
    Deploy {
        service: String,
        #[command(flatten)]
        args: DeployArgs,
        /// Print what would happen; change nothing.
        #[arg(long)]
        plan: bool,
        /// Show the service's deploys, newest first.
        #[arg(long, conflicts_with = "plan")]
        history: bool,
        /// Do not run the preflight checks first.
        #[arg(long)]
        skip_preflight: bool,
    },
    /// Deploy the image of the last successful deploy before the current one.
    Rollback {
        service: String,
        #[command(flatten)]
        args: DeployArgs,
        /// Print what would happen; change nothing.
        #[arg(long)]
        plan: bool,
        /// Do not run the preflight checks first.
        #[arg(long)]
        skip_preflight: bool,
    },
    /// What every instance of a service says it applied (the agent's report tags): a table and a
    /// summary, or `--output json`. With --wait, exits 0 when every running instance reports the
    /// commit ready, 1 as soon as one reports it failed or degraded, 3 at the deadline.
    Fleet(FleetArgs),
    /// Boot a locally baked image in qemu with an emulated metadata service; exits 0 when the
    /// agent reports ready, 1 failed, 2 degraded, 3 when it did not report in time.
    Boot(BootArgs),
    /// Join stdin/stdout to a TCP address (what qemu's guestfwd runs per connection).
    #[command(hide = true)]
    Relay { addr: String },
}

#[derive(clap::Args)]
struct BootArgs {
    /// The image's folder (out/IMAGE) or its manifest.
    image: PathBuf,
    /// Served as the instance's user-data (validated first; broken user-data still boots, so the
    /// agent's own report can be seen).
    #[arg(long)]
    user_data: Option<PathBuf>,
    /// The instance id the metadata service reports [default: a random i-...].
    #[arg(long)]
    instance_id: Option<String>,
    /// Serve these credentials as the instance role (the JSON `aws sts assume-role` prints), so
    /// the agent reads its SSM parameters with a real role; default: no instance profile.
    #[arg(long)]
    role_credentials: Option<PathBuf>,
    /// Forward a host port on 127.0.0.1 to a guest port: HOST:GUEST (repeatable).
    #[arg(long = "port", value_parser = stackless_builder::vm::qemu::parse_port_forward)]
    ports: Vec<stackless_builder::vm::qemu::PortForward>,
    /// Let the guest reach a host service: GUEST_IP:PORT=HOST:PORT, such as
    /// 169.254.0.100:9418=127.0.0.1:9418 for a git daemon (repeatable).
    #[arg(long = "forward", value_parser = stackless_builder::vm::qemu::parse_guest_forward)]
    forwards: Vec<stackless_builder::vm::qemu::GuestForward>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// kvm, tcg, or auto: KVM when the guest kernel starts under it on this host (probed once
    /// per host and cached: any failure before the kernel's banner falls back to TCG).
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Under auto, how long a KVM guest may stay silent before KVM counts as unusable.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    kvm_probe: std::time::Duration,
    /// The KVM device auto checks before trying KVM.
    #[arg(
        long,
        env = "STACKLESS_KVM_DEVICE",
        default_value = "/dev/kvm",
        hide = true
    )]
    kvm_device: PathBuf,
    /// Longest wait for the agent's report.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Leave the machine up after the agent reported; Ctrl-C stops it.
    #[arg(long)]
    keep_running: bool,
    /// Write the serial console to this file too.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Do not echo the serial console.
    #[arg(long)]
    no_console: bool,
}

#[derive(clap::Args)]
struct FleetArgs {
    /// The service: instances tagged stackless:service=SERVICE.
    #[arg(required_unless_present = "asg", conflicts_with = "asg")]
    service: Option<String>,
    /// The instances of this Auto Scaling group instead.
    #[arg(long)]
    asg: Option<String>,
    /// Wait until the fleet has applied --config or --salt.
    #[arg(long, requires = "commit")]
    wait: bool,
    /// The config repository commit to wait for: a sha (short or full) or a ref (HEAD, a
    /// branch, a tag) resolved with `git ls-remote --repo`.
    #[arg(long, value_name = "REF", group = "commit", requires = "wait")]
    config: Option<String>,
    /// The salt repository commit to wait for (as --config).
    #[arg(long, value_name = "REF", group = "commit", requires = "wait")]
    salt: Option<String>,
    /// The repository a ref is resolved in (`git ls-remote` URL; no credentials in it).
    #[arg(long, value_name = "URL")]
    repo: Option<String>,
    /// Longest wait.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Time between looks (one paginated DescribeInstances each).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    interval: std::time::Duration,
}

/// What a deploy takes on the command line; each flag wins over `deploy/SERVICE.toml`.
#[derive(clap::Args)]
struct DeployArgs {
    /// An image definition name: its [publish] ssm_parameter holds the AMI id.
    #[arg(long, conflicts_with_all = ["ami", "ssm_parameter"])]
    image: Option<String>,
    /// An AMI id.
    #[arg(long, conflicts_with = "ssm_parameter")]
    ami: Option<String>,
    /// An SSM parameter holding an AMI id.
    #[arg(long)]
    ssm_parameter: Option<String>,
    /// How many instances to boot.
    #[arg(long)]
    count: Option<u32>,
    #[arg(long)]
    instance_type: Option<String>,
    /// Subnet ids, spread over in turn (repeat the flag).
    #[arg(long = "subnet")]
    subnets: Vec<String>,
    /// Security group ids (repeat the flag).
    #[arg(long = "security-group")]
    security_groups: Vec<String>,
    #[arg(long)]
    instance_profile: Option<String>,
    /// User-data TOML, validated with the agent's own types.
    #[arg(long)]
    user_data: Option<PathBuf>,
    /// ELBv2 target group ARNs (repeat the flag).
    #[arg(long = "target-group")]
    target_groups: Vec<String>,
    /// Wait until this answers 200 for every new instance: {ip} {private_ip} {public_ip}.
    #[arg(long)]
    health_url: Option<String>,
    /// What the readiness step waits for once the instances run: agent (the stackless-init result
    /// on the instance console), status-checks (EC2's) or none.
    #[arg(long, value_parser = deploy::config::ReadyMode::parse)]
    ready: Option<deploy::config::ReadyMode>,
    /// How long after registration an unhealthy new target is tolerated, like `5m`.
    #[arg(long, value_parser = humantime::parse_duration)]
    unhealthy_grace: Option<std::time::Duration>,
    /// Put the image into this Auto Scaling group's launch template and run an instance refresh.
    #[arg(long)]
    asg: Option<String>,
    /// How long the deploy lock holds before another deploy may take it over, like `2h`.
    #[arg(long, value_parser = humantime::parse_duration)]
    lock_ttl: Option<std::time::Duration>,
    /// Folder of deploy files (`SERVICE.toml`).
    #[arg(long, default_value = "deploy", env = "STACKLESS_DEPLOY")]
    deploy_dir: PathBuf,
}

impl DeployArgs {
    fn overrides(&self) -> deploy::config::Overrides {
        use deploy::config::ImageRef;
        deploy::config::Overrides {
            image: match (&self.image, &self.ami, &self.ssm_parameter) {
                (Some(i), _, _) => Some(ImageRef::Definition(i.clone())),
                (_, Some(a), _) => Some(ImageRef::Ami(a.clone())),
                (_, _, Some(p)) => Some(ImageRef::Parameter(p.clone())),
                _ => None,
            },
            count: self.count,
            instance_type: self.instance_type.clone(),
            subnets: self.subnets.clone(),
            security_groups: self.security_groups.clone(),
            instance_profile: self.instance_profile.clone(),
            user_data: self.user_data.clone(),
            target_groups: self.target_groups.clone(),
            health_url: self.health_url.clone(),
            asg: self.asg.clone(),
            lock_ttl: self.lock_ttl,
            ready: self.ready,
            unhealthy_grace: self.unhealthy_grace,
        }
    }
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// The builder's images, newest first; `*` marks the one the image's SSM parameter points at.
    List { image: Option<String> },
    /// Deregister all but the newest N (never the published one) and delete their snapshots.
    Prune {
        image: String,
        #[arg(long)]
        keep: usize,
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Relay { addr } = &cli.command {
        // No logging: stdout and stdin belong to the guest's connection.
        return match stackless_builder::vm::relay::relay(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("builder: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    init_logging(cli.verbose, cli.quiet);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("builder: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = if let Command::Boot(args) = &cli.command {
        runtime.block_on(boot_command(&cli, args))
    } else if let Command::Fleet(args) = &cli.command {
        runtime.block_on(fleet_command(&cli, args))
    } else {
        runtime.block_on(run(cli)).map(|()| 0)
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A set-up problem (no credentials, no region, no network) is the line worth
            // reading: what the command was doing when it hit it would point the wrong way. Those
            // that can strike half-way (expiry, the network) keep the rest on a second line, as
            // it may say what a failed cleanup left behind.
            match stackless_builder::aws::setup_error(&e) {
                Some(setup) => {
                    eprintln!("builder: {setup}");
                    if setup.mid_run() {
                        let context: Vec<String> = e
                            .chain()
                            .take_while(|c| {
                                c.downcast_ref::<stackless_builder::aws::SetupError>()
                                    .is_none()
                            })
                            .map(|c| c.to_string())
                            .collect();
                        if !context.is_empty() {
                            eprintln!("builder: (while: {})", context.join(": "));
                        }
                    }
                }
                None => eprintln!("builder: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

/// `builder fleet`: the listing, or the wait's exit code (0, 1, 3).
async fn fleet_command(cli: &Cli, args: &FleetArgs) -> Result<u8> {
    use stackless_builder::fleet::{self, commit, list, render, wait};
    let selector = match (&args.service, &args.asg) {
        (_, Some(asg)) => fleet::Selector::Asg(asg.clone()),
        (Some(service), None) => fleet::Selector::Service(service.clone()),
        (None, None) => bail!("fleet takes a SERVICE or --asg NAME"),
    };
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let now = std::time::SystemTime::now;
    if !args.wait {
        let instances = list::list(&ec2, &selector).await?;
        if cli.output == Output::Json {
            println!("{}", render::json(&instances));
        } else {
            print!("{}", render::table(&instances, now()));
        }
        return Ok(0);
    }
    let (repo, reference) = match (&args.config, &args.salt) {
        (Some(r), _) => (wait::Repo::Config, r),
        (None, Some(r)) => (wait::Repo::Salt, r),
        (None, None) => bail!("--wait takes --config REF or --salt REF"),
    };
    let wanted = commit::resolve(
        reference,
        args.repo.as_deref(),
        std::time::Duration::from_secs(60),
    )
    .await?;
    let pace = wait::Pace {
        timeout: args.timeout,
        interval: args.interval,
    };
    let ended = wait::wait(&ec2, &selector, repo, &wanted, pace).await?;
    let what = format!(
        "{} {} ({})",
        repo.as_str(),
        wanted.short(),
        wanted.reference
    );
    if cli.output == Output::Json {
        println!(
            "{}",
            render::wait_json(&ended, repo.as_str(), &wanted.commit)
        );
    } else {
        print!("{}", render::table(&ended.instances, now()));
    }
    eprintln!("builder: {}", render::wait_line(&ended, &what));
    Ok(ended.code)
}

fn load(cli: &Cli, image: &str) -> Result<ImageDef> {
    Ok(definition::load(&cli.images_dir, image)?)
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Boot(_) | Command::Fleet(_) | Command::Relay { .. } => {
            bail!("internal: `boot`, `fleet` and `relay` are dispatched by main")
        }
        Command::Validate { names } => {
            let names = if names.is_empty() {
                definition::list(&cli.images_dir)
                    .with_context(|| format!("listing {}", cli.images_dir.display()))?
            } else {
                names.clone()
            };
            if names.is_empty() {
                bail!("no image definitions in {}", cli.images_dir.display());
            }
            for name in names {
                let def = load(&cli, &name)?;
                let r = render::render(&def, &placeholder_inputs(cli.templates.as_deref()))?;
                render::check_shell(&format!("{name}: provision.sh"), &r.provision)?;
                render::check_shell(&format!("{name}: generalize.sh"), &r.generalize)?;
                render::check_seed_user_data(
                    &format!("{name}: seed-user-data.sh"),
                    &r.seed_user_data,
                    def.lease_minutes,
                )?;
                println!(
                    "{name}: ok ({} files; seed user-data {} bytes, its lease {} minutes; from {})",
                    r.files.len(),
                    r.seed_user_data.len(),
                    def.lease_minutes,
                    files_of(&def)
                );
            }
            Ok(())
        }
        Command::Render { image, out } => {
            let def = load(&cli, image)?;
            let arch = def.arch.unwrap_or(Arch::X86_64);
            let bin = std::fs::read(arch.default_init_binary()).ok();
            let mut inputs = placeholder_inputs(cli.templates.as_deref());
            if let Some(b) = &bin {
                inputs.init_binary = b;
            }
            let r = render::render(&def, &inputs)?;
            render::write_out(&r, out)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::UserData { file, image, out } => {
            user_data(&cli, file, image.as_deref(), out.as_deref())
        }
        Command::Bake {
            image,
            target,
            init_binary,
            bootstrap,
            force,
            no_cache,
            keep_on_error,
            manifest,
            skip_preflight,
        } => {
            if *no_cache && *target != TargetKind::Local {
                bail!(
                    "--no-cache is for --target local: a bake on AWS keeps no caches between bakes"
                );
            }
            let def = load(&cli, image)?;
            let kind = match target {
                TargetKind::Aws => "aws",
                TargetKind::Local => "local",
            };
            let opts = BakeOptions {
                templates: cli.templates.clone(),
                init_binaries: if init_binary.is_empty() {
                    arch::default_init_binaries(Path::new("."))
                } else {
                    init_binary.clone()
                },
                bootstrap: bootstrap.clone(),
                force: *force,
                keep_on_error: *keep_on_error,
                manifest: manifest.clone().unwrap_or_else(|| {
                    Path::new("out")
                        .join(image)
                        .join(format!("manifest-{kind}.json"))
                }),
                build_ca: *target == TargetKind::Local,
            };
            let m = match target {
                TargetKind::Aws => {
                    let config =
                        aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                    if !*skip_preflight {
                        let c = preflight::Clients::new(&config);
                        gate(&cli, preflight::bake(&c, &def).await)?;
                    }
                    let defaults = AwsOptions::default();
                    let aws_opts = AwsOptions {
                        progress: !cli.quiet,
                        ssm_wait: def.ssm_wait.unwrap_or(defaults.ssm_wait),
                        ..defaults
                    };
                    let mut t = AwsTarget::new(config, aws_opts);
                    pipeline::bake(&mut t, &def, &opts).await?
                }
                TargetKind::Local => {
                    let out_dir = Path::new("out").join(image);
                    let mut local = LocalOptions::new(out_dir, opts.manifest.clone());
                    if *no_cache {
                        local.packages_layer = false;
                        local.provision_caches = false;
                    }
                    let mut t = LocalTarget::new(local);
                    pipeline::bake(&mut t, &def, &opts).await?
                }
            };
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                if !cli.quiet {
                    let place = if m.regions.is_empty() {
                        m.artifact.clone()
                    } else {
                        m.regions
                            .iter()
                            .map(|(r, a)| format!("{r}={a}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    eprintln!(
                        "builder: {} {} ({place}), manifest {}",
                        if m.reused { "reused" } else { "baked" },
                        m.image_name,
                        opts.manifest.display()
                    );
                }
                println!("{}", m.artifact);
            }
            match &m.cleanup_error {
                Some(e) => bail!("{e}"),
                None => Ok(()),
            }
        }
        Command::Deploy {
            service,
            args,
            plan,
            history,
            skip_preflight,
        } => deploy_command(&cli, service, args, *plan, *history, false, *skip_preflight).await,
        Command::Rollback {
            service,
            args,
            plan,
            skip_preflight,
        } => deploy_command(&cli, service, args, *plan, false, true, *skip_preflight).await,
        Command::Preflight {
            definition,
            deploy,
            args,
        } => {
            let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let c = preflight::Clients::new(&config);
            let report = match (definition, deploy) {
                (_, Some(service)) => {
                    let cfg = deploy::config::load(&args.deploy_dir, service, &args.overrides())?;
                    preflight::deploy(&c, &cfg, &cli.images_dir).await
                }
                (Some(image), None) => preflight::bake(&c, &load(&cli, image)?).await,
                (None, None) => bail!("preflight takes an IMAGE or --deploy SERVICE"),
            };
            if cli.output == Output::Json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.text());
            }
            if report.passed() {
                Ok(())
            } else {
                Err(report.error())
            }
        }
        Command::Gc { dry_run, builds } => {
            let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let ec2 = aws_sdk_ec2::Client::new(&config);
            let ssm = aws_sdk_ssm::Client::new(&config);
            let parameter_of = parameter_of(&cli.images_dir);
            let ended = aws::gc::Ended {
                builds,
                ssm: &ssm,
                parameter_of: &parameter_of,
            };
            let r = aws::gc::gc(&ec2, std::time::SystemTime::now(), *dry_run, Some(&ended)).await?;
            let verb = if *dry_run { "would remove" } else { "removed" };
            println!(
                "{verb}: instances {:?}, security groups {:?}, images {:?}",
                r.instances_terminated, r.groups_deleted, r.images_deregistered
            );
            for s in &r.skipped {
                println!("skipped: {s}");
            }
            Ok(())
        }
        Command::Images { command } => {
            let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let ec2 = aws_sdk_ec2::Client::new(&config);
            let ssm = aws_sdk_ssm::Client::new(&config);
            match command {
                ImagesCommand::List { image } => {
                    let parameter_of = parameter_of(&cli.images_dir);
                    let rows =
                        aws::catalog::list(&ec2, &ssm, image.as_deref(), &parameter_of).await?;
                    if cli.output == Output::Json {
                        println!("{}", serde_json::to_string(&rows.iter().map(|r| serde_json::json!({
                            "image_id": r.image_id, "name": r.name, "image": r.image, "created": r.created,
                            "state": r.state, "build_id": r.build_id, "input_hash": r.input_hash, "published": r.published,
                        })).collect::<Vec<_>>())?);
                    } else {
                        for r in rows {
                            let mark = if r.published { "*" } else { " " };
                            println!(
                                "{mark} {:<21} {:<10} {:<22} {:<10} {}",
                                r.image_id, r.image, r.created, r.state, r.name
                            );
                        }
                    }
                }
                ImagesCommand::Prune {
                    image,
                    keep,
                    dry_run,
                } => {
                    let def = load(&cli, image)?;
                    let r = aws::catalog::prune(&ec2, &ssm, &def, *keep, *dry_run).await?;
                    let verb = if *dry_run {
                        "would deregister"
                    } else {
                        "deregistered"
                    };
                    println!("kept: {:?}", r.kept);
                    println!(
                        "{verb}: {:?} (snapshots {:?})",
                        r.deregistered, r.snapshots_deleted
                    );
                }
            }
            Ok(())
        }
    }
}

async fn deploy_command(
    cli: &Cli,
    service: &str,
    args: &DeployArgs,
    plan: bool,
    history: bool,
    rollback: bool,
    skip_preflight: bool,
) -> Result<()> {
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let clients = deploy::Clients::new(&config);
    if history {
        deploy::config::check_service(service).map_err(|m| anyhow::anyhow!(m))?;
        let records = deploy::history::list(&clients.ssm, service).await?;
        if cli.output == Output::Json {
            println!("{}", serde_json::to_string(&records)?);
        } else if records.is_empty() {
            println!("no deploys of {service} recorded");
        } else {
            print!("{}", deploy::history::table(&records));
        }
        return Ok(());
    }
    let mut flags = args.overrides();
    let kind = if rollback {
        if flags.image.is_some() {
            bail!("rollback takes its image from the history; use `builder deploy {service} --ami ...` to deploy another");
        }
        let (current, previous) = deploy::rollback_image(&clients, service).await?;
        tracing::info!(
            "{service} runs {} (deploy {}); rolling back to {} (deploy {}, {})",
            current.image,
            current.deploy_id,
            previous.image,
            previous.deploy_id,
            previous.started
        );
        flags.image = Some(deploy::config::ImageRef::Ami(previous.image.clone()));
        "rollback"
    } else if flags.asg.is_some() {
        "asg"
    } else {
        "deploy"
    };
    let cfg = deploy::config::load(&args.deploy_dir, service, &flags)?;
    let kind = if cfg.asg.is_some() && !rollback {
        "asg"
    } else {
        kind
    };
    if !plan && !skip_preflight {
        let c = preflight::Clients::new(&config);
        gate(cli, preflight::deploy(&c, &cfg, &cli.images_dir).await)?;
    }
    let prepared = deploy::prepare(&clients, &cfg, &cli.images_dir, kind).await?;
    if plan {
        if cli.output == Output::Json {
            println!("{}", serde_json::to_string(&prepared)?);
        } else {
            print!("{}", prepared.describe());
        }
        return Ok(());
    }
    let opts = deploy::DeployOptions {
        progress: !cli.quiet,
        ..Default::default()
    };
    let record = deploy::deploy(&clients, &prepared, &opts).await?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(&record)?);
    } else {
        if !cli.quiet {
            eprintln!(
                "builder: {} {} of {} is live: {} on {}{}",
                kind,
                record.deploy_id,
                service,
                record.image,
                if record.instances.is_empty() {
                    "-".to_string()
                } else {
                    record.instances.join(" ")
                },
                if record.replaced.is_empty() {
                    String::new()
                } else {
                    format!(" (replaced {})", record.replaced.join(" "))
                }
            );
        }
        println!("{}", record.deploy_id);
    }
    Ok(())
}

/// Runs before a bake or a deploy creates anything: the checks' lines on stderr (stdout is the
/// command's result), and an error when one failed.
fn gate(cli: &Cli, report: preflight::Report) -> Result<()> {
    if !report.passed() || !cli.quiet {
        eprint!("{}", report.text());
    }
    if report.passed() {
        Ok(())
    } else {
        Err(report.error())
    }
}

fn files_of(def: &ImageDef) -> String {
    def.files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" < ")
}

/// Validation and review renders need no real binary.
fn placeholder_inputs(templates: Option<&Path>) -> RenderInputs<'_> {
    RenderInputs {
        templates,
        init_binary: b"(the stackless-init binary goes here)",
        bootstrap: Some(b"#!/bin/sh\n# the salt-bootstrap script goes here\n"),
        build_id: "b-render",
        build_ca: false,
    }
}

fn user_data(cli: &Cli, file: &Path, image: Option<&str>, out: Option<&Path>) -> Result<()> {
    let defaults = match image {
        Some(i) => load(cli, i)?.defaults_document(),
        None => stackless_init::userdata::Document::default(),
    };
    let p = stackless_builder::user_data::prepare(file, &defaults)?;
    let how = if p.gzipped { "gzipped" } else { "plain" };
    if let Some(out) = out {
        std::fs::write(out, &p.bytes).with_context(|| format!("writing {}", out.display()))?;
    }
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::json!({"file": file, "ok": true, "bytes": p.text_bytes, "payload_bytes": p.bytes.len(), "gzipped": p.gzipped, "minion_id": p.minion_id})
        );
    } else {
        println!(
            "{}: ok ({} bytes, {} bytes {how}{}); minion id on a sample instance: {}",
            file.display(),
            p.text_bytes,
            p.bytes.len(),
            out.map(|o| format!(", written to {}", o.display()))
                .unwrap_or_default(),
            p.minion_id
        );
    }
    Ok(())
}

async fn boot_command(cli: &Cli, a: &BootArgs) -> Result<u8> {
    use stackless_builder::vm::{self, qemu::Accel, BootOptions};
    let relay =
        std::env::current_exe().context("finding the builder binary (for qemu's relays)")?;
    let mut opts = BootOptions::new(a.image.clone(), relay);
    if let Some(f) = &a.user_data {
        let raw =
            std::fs::read(f).with_context(|| format!("reading the user-data {}", f.display()))?;
        vm::check_user_data_size(&raw)?;
        // Broken user-data still boots: the point may be to see how the agent reports it.
        if let Err(e) = stackless_init::userdata::load(&f.display().to_string(), &raw) {
            tracing::warn!(
                "the user-data does not validate; booting anyway so the agent reports it: {e}"
            );
        }
        opts.user_data = Some(raw);
    }
    if let Some(id) = &a.instance_id {
        opts.identity.instance_id = id.clone();
    }
    if let Some(f) = &a.role_credentials {
        opts.role = Some(vm::role::load(f)?);
    }
    opts.ports = a.ports.clone();
    opts.forwards = a.forwards.clone();
    opts.memory_mib = a.memory;
    opts.cpus = a.cpus;
    opts.accel = match a.accel.as_str() {
        "auto" => None,
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        other => bail!("--accel {other:?}: expected auto, kvm or tcg"),
    };
    opts.kvm_probe = a.kvm_probe;
    opts.kvm_device = a.kvm_device.clone();
    opts.cache_dir = Some(stackless_builder::platform::local::base::default_cache_dir());
    opts.timeout = a.timeout;
    opts.keep_running = a.keep_running;
    opts.echo = !a.no_console && !cli.quiet;
    opts.console_log = a.console_log.clone();
    let report = vm::boot(&opts, stackless_builder::signals::interrupted()).await?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let secs = |ms: Option<u64>| {
            ms.map(|m| format!("{:.1} s", m as f64 / 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        match &report.result {
            Some(r) => println!(
                "{}: {}{} (boot to result {}, agent {}; {} under {}: {})",
                report.instance_id,
                r.outcome,
                r.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default(),
                secs(report.boot_to_result_ms),
                secs(r.total_ms),
                report.image,
                report.accel,
                report.accel_reason
            ),
            None => println!(
                "{}: no report from the agent within {:?} ({} under {})",
                report.instance_id, a.timeout, report.image, report.accel
            ),
        }
    }
    Ok(report.exit_code())
}

/// The SSM parameter each definition in `images_dir` publishes to, by definition name (a
/// definition that does not load publishes nowhere).
fn parameter_of(images_dir: &Path) -> impl Fn(&str) -> Option<String> {
    let defs: Vec<ImageDef> = definition::list(images_dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| definition::load(images_dir, n).ok())
        .collect();
    move |name: &str| {
        defs.iter()
            .find(|d| d.image == name)
            .and_then(|d| d.ssm_parameter.clone())
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
