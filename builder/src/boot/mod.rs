//! `builder boot out/IMAGE`: boots a locally baked image in qemu the way EC2 would run it. The
//! project's IMDS emulator serves the user-data and an instance identity on loopback and the
//! guest reaches it at 169.254.169.254 (guestfwd), host services such as git daemons reach it the
//! same way, and chosen guest ports are forwarded to the host. The serial console streams while
//! the guest boots; the run ends when `stackless-init` prints its result line (ready, degraded or
//! failed), or stays up with `--keep-running`.

pub mod console;
pub mod image;
pub mod qemu;
pub mod relay;

use anyhow::{anyhow, bail, Context, Result};
use console::{parse_result, AgentResult, Assembler};
use qemu::{Accel, GuestForward, PortForward, QemuSpec};
use serde::Serialize;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig};
use stackless_init::imds::Identity;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// The guest's address on qemu's user-mode network (what EC2 calls the private IPv4).
pub const GUEST_IP: &str = "169.254.0.15";

#[derive(Debug, Clone)]
pub struct BootOptions {
    /// `out/IMAGE`, or a manifest file.
    pub image: PathBuf,
    /// Served as user-data (none: 404, as on an instance launched without).
    pub user_data: Option<Vec<u8>>,
    pub identity: Identity,
    pub ports: Vec<PortForward>,
    pub forwards: Vec<GuestForward>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// None: KVM when /dev/kvm is usable, TCG otherwise.
    pub accel: Option<Accel>,
    /// A KVM guest whose kernel prints nothing for this long is restarted under TCG (nested
    /// virtualisation sometimes cannot run a guest kernel at all).
    pub kvm_probe: Duration,
    /// Longest wait for the agent's result.
    pub timeout: Duration,
    /// Stay up after the result until Ctrl-C.
    pub keep_running: bool,
    /// Echo the console to stderr.
    pub echo: bool,
    /// Also write the console to this file.
    pub console_log: Option<PathBuf>,
    /// The program qemu runs per forwarded connection (`builder` itself, `relay` subcommand).
    pub relay: PathBuf,
}

impl BootOptions {
    pub fn new(image: PathBuf, relay: PathBuf) -> Self {
        Self {
            image,
            user_data: None,
            identity: local_identity(),
            ports: Vec::new(),
            forwards: Vec::new(),
            memory_mib: 1024,
            cpus: 2,
            accel: None,
            kvm_probe: Duration::from_secs(15),
            timeout: Duration::from_secs(20 * 60),
            keep_running: false,
            echo: true,
            console_log: None,
            relay,
        }
    }
}

/// A fresh instance identity: a random instance id, the guest's address on the user network.
pub fn local_identity() -> Identity {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seed = format!("{nanos}-{}", std::process::id());
    let hex = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(seed.as_bytes()))
    };
    Identity {
        instance_id: format!("i-{}", &hex[..17]),
        private_ip: GUEST_IP.to_string(),
        ..Identity::example()
    }
}

/// How a boot went.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    pub image: String,
    pub instance_id: String,
    pub accel: &'static str,
    /// From qemu's start to the agent's result line.
    pub boot_to_result_ms: Option<u64>,
    /// What the agent reported.
    pub result: Option<AgentResult>,
    pub timed_out: bool,
    /// Why KVM was given up, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kvm_fallback: Option<String>,
}

impl BootReport {
    /// 0 ready, 1 failed, 2 degraded, 3 no result in time.
    pub fn exit_code(&self) -> u8 {
        match &self.result {
            Some(r) => r.exit_code(),
            None => 3,
        }
    }
}

/// Boots the image and follows it until the agent reports (or past that with `keep_running`),
/// `timeout`, qemu's end, or `stop`.
pub async fn boot(
    opts: &BootOptions,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<BootReport> {
    let img = image::LocalImage::load(&opts.image)?;
    let work = tempfile::Builder::new()
        .prefix("stackless-boot-")
        .tempdir()
        .context("creating a folder for the boot's disk overlay")?;
    let overlay = work.path().join("overlay.qcow2");
    img.overlay(&overlay).await?;

    let mut emulator_cfg = EmulatorConfig::new(Identity {
        image_id: img.build_id.clone(),
        ..opts.identity.clone()
    });
    if let Some(ud) = &opts.user_data {
        emulator_cfg = emulator_cfg.with_user_data(ud.clone());
    }
    let emulator =
        Emulator::start(emulator_cfg).context("starting the instance metadata emulator")?;
    let mut forwards = vec![GuestForward {
        guest: qemu::imds_guest_addr(),
        host: emulator.addr(),
    }];
    forwards.extend(opts.forwards.iter().cloned());

    let mut accel = match opts.accel {
        Some(a) => a,
        None if qemu::kvm_usable() => Accel::Kvm,
        None => Accel::Tcg,
    };
    let mut log = match &opts.console_log {
        Some(p) => Some(std::io::LineWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("creating the console log {}", p.display()))?,
        )),
        None => None,
    };
    let mut report = BootReport {
        image: img.describe(),
        instance_id: opts.identity.instance_id.clone(),
        accel: accel.as_str(),
        boot_to_result_ms: None,
        result: None,
        timed_out: false,
        kvm_fallback: None,
    };
    tokio::pin!(stop);
    loop {
        let spec = QemuSpec {
            accel,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            kernel: img.kernel.clone(),
            initrd: img.initrd.clone(),
            cmdline: img.cmdline.clone(),
            disk: overlay.clone(),
            ports: opts.ports.clone(),
            forwards: forwards.clone(),
            relay: opts.relay.clone(),
        };
        tracing::info!(image = %report.image, instance = %opts.identity.instance_id, accel = accel.as_str(), imds = %emulator.addr(), "booting");
        let mut child = spawn_qemu(&spec)?;
        let started = Instant::now();
        let mut stdout = child.stdout.take().context("qemu's console pipe")?;
        let mut chunk = vec![0u8; 16 * 1024];
        let mut console = Assembler::default();
        let mut recent: VecDeque<String> = VecDeque::with_capacity(40);
        let mut kernel_started = false;
        let deadline = tokio::time::sleep(opts.timeout);
        tokio::pin!(deadline);
        // Only an automatically chosen KVM is probed; an explicit --accel kvm is left alone.
        let probing = accel == Accel::Kvm && opts.accel.is_none();
        let probe = tokio::time::sleep(opts.kvm_probe);
        tokio::pin!(probe);
        let mut restart_tcg = false;
        let ended: Result<()> = loop {
            tokio::select! {
                n = stdout.read(&mut chunk) => {
                    let n = n.context("reading qemu's console")?;
                    if n == 0 {
                        let status = child.wait().await.context("waiting for qemu")?;
                        if report.result.is_some() {
                            break Ok(());
                        }
                        let stderr = read_stderr(&mut child).await;
                        break Err(anyhow!(
                            "qemu ended ({status}) before the agent reported{}\n--- last console lines ---\n{}",
                            if stderr.trim().is_empty() { String::new() } else { format!("; qemu said: {}", stderr.trim()) },
                            recent.iter().cloned().collect::<Vec<_>>().join("\n")
                        ));
                    }
                    let mut reported = false;
                    for line in console.push(&chunk[..n]) {
                        if line.text.contains("Linux version") {
                            kernel_started = true;
                        }
                        if opts.echo {
                            eprintln!("{}", line.unshown);
                        }
                        if let Some(f) = log.as_mut() {
                            let _ = writeln!(f, "{}", line.unshown);
                        }
                        if recent.len() == 40 {
                            recent.pop_front();
                        }
                        recent.push_back(line.text.clone());
                        if report.result.is_some() {
                            continue;
                        }
                        match parse_result(&line.text) {
                            None => {}
                            // Kernel messages can garble a console line; the agent's state is
                            // still there, and the deadline still applies.
                            Some(Err(e)) => tracing::warn!("{e}; still waiting"),
                            Some(Ok(r)) => {
                                report.boot_to_result_ms = Some(started.elapsed().as_millis() as u64);
                                report.result = Some(r);
                                reported = true;
                            }
                        }
                    }
                    if reported {
                        if !opts.keep_running {
                            break Ok(());
                        }
                        eprintln!(
                            "builder: the agent reported; the machine stays up{}. Ctrl-C stops it.",
                            ports_note(&opts.ports)
                        );
                    }
                }
                // A line without its newline for a moment (a login prompt) is shown as it is.
                _ = tokio::time::sleep(Duration::from_millis(300)), if console.has_unshown() => {
                    if let Some(part) = console.take_partial() {
                        if opts.echo {
                            eprint!("{part}");
                        }
                        if let Some(f) = log.as_mut() {
                            let _ = write!(f, "{part}");
                            let _ = f.flush();
                        }
                    }
                }
                _ = &mut probe, if probing && !kernel_started => {
                    restart_tcg = true;
                    break Ok(());
                }
                _ = &mut deadline, if report.result.is_none() => {
                    report.timed_out = true;
                    break Ok(());
                }
                why = &mut stop => {
                    let _ = child.kill().await;
                    if report.result.is_some() {
                        tracing::info!("{why}; stopped the machine");
                        break Ok(());
                    }
                    break Err(anyhow!("{why}; stopped the machine before the agent reported"));
                }
            }
        };
        let _ = child.kill().await;
        let _ = child.wait().await;
        if let Some(f) = log.as_mut() {
            let _ = f.flush();
        }
        if restart_tcg {
            let why = format!(
                "KVM did not get the guest kernel to print anything in {:?} (nested virtualisation?); booting again under TCG",
                opts.kvm_probe
            );
            tracing::warn!("{why}");
            report.kvm_fallback = Some(why);
            accel = Accel::Tcg;
            report.accel = accel.as_str();
            continue;
        }
        ended?;
        break;
    }
    drop(emulator);
    Ok(report)
}

fn ports_note(ports: &[PortForward]) -> String {
    if ports.is_empty() {
        return String::new();
    }
    let list: Vec<String> = ports
        .iter()
        .map(|p| format!("127.0.0.1:{} -> guest {}", p.host, p.guest))
        .collect();
    format!(" ({})", list.join(", "))
}

fn spawn_qemu(spec: &QemuSpec) -> Result<Child> {
    let args = qemu::args(spec);
    tracing::debug!("qemu-system-x86_64 {}", args.join(" "));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: Ctrl-C reaches the builder, which stops qemu and cleans up.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill qemu if the builder
    // dies without cleaning up (SIGKILL, a crash), so no machine outlives its builder.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("qemu-system-x86_64 is not installed; run scripts/install-local-deps.sh (qemu from bookworm-backports)")
            } else {
                anyhow!("starting qemu-system-x86_64: {e}")
            }
        })
}

async fn read_stderr(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.read_to_string(&mut s)).await;
    }
    s
}

/// Refuses user-data the emulator could not serve (EC2's 16 KB limit).
pub fn check_user_data_size(data: &[u8]) -> Result<()> {
    let limit = stackless_init::userdata::EC2_USER_DATA_LIMIT;
    if data.len() > limit {
        bail!(
            "the user-data is {} bytes; EC2 accepts at most {limit} (gzip it: stackless-init reads gzip-compressed user-data)",
            data.len()
        );
    }
    Ok(())
}
