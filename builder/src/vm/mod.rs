//! `builder boot out/IMAGE`: runs a locally baked image in a qemu virtual machine the way EC2
//! would run it (named `vm` so it is not confused with the agent's boot sequence). The
//! project's IMDS emulator serves the user-data and an instance identity on loopback and the
//! guest reaches it at 169.254.169.254 (guestfwd), host services such as git daemons reach it the
//! same way, and chosen guest ports are forwarded to the host. The serial console streams while
//! the guest boots; the run ends when `stackless-init` prints its result line (ready, degraded or
//! failed), or stays up with `--keep-running`.

pub mod accel;
pub mod local_image;
pub mod qemu;
pub mod relay;
pub mod role;

use crate::console::{parse_result, AgentResult, Assembler};
use anyhow::{anyhow, bail, Context, Result};
use qemu::{Accel, GuestForward, PortForward, QemuSpec};
use serde::Serialize;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig, DEFAULT_MAC};
use stackless_init::imds::Identity;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// The qemu program of a local boot.
pub const QEMU: &str = "qemu-system-x86_64";

/// The guest's address on qemu's user-mode network (what EC2 calls the private IPv4).
pub const GUEST_IP: &str = "169.254.0.15";

#[derive(Debug, Clone)]
pub struct BootOptions {
    /// `out/IMAGE`, or a manifest file.
    pub image: PathBuf,
    /// Served as user-data (none: 404, as on an instance launched without).
    pub user_data: Option<Vec<u8>>,
    /// Served as the instance role's credentials (none: no instance profile).
    pub role: Option<stackless_init::imds::emulator::RoleConfig>,
    pub identity: Identity,
    pub ports: Vec<PortForward>,
    pub forwards: Vec<GuestForward>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// None (auto): KVM when it gets a guest kernel to start here, TCG otherwise (see `accel`).
    pub accel: Option<Accel>,
    /// Under auto, a KVM guest whose kernel prints nothing for this long counts as KVM being
    /// unusable (nested virtualisation sometimes cannot run a guest kernel at all).
    pub kvm_probe: Duration,
    /// The qemu program (looked up on PATH unless it has a slash).
    pub qemu: PathBuf,
    /// The KVM device auto checks before trying KVM at all.
    pub kvm_device: PathBuf,
    /// Where auto keeps its verdict per host; None probes on every boot.
    pub cache_dir: Option<PathBuf>,
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
            role: None,
            identity: local_identity(),
            ports: Vec::new(),
            forwards: Vec::new(),
            memory_mib: 1024,
            cpus: 2,
            accel: None,
            kvm_probe: Duration::from_secs(15),
            qemu: PathBuf::from(QEMU),
            kvm_device: PathBuf::from("/dev/kvm"),
            cache_dir: None,
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
    /// The `-cpu` model under KVM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Why this accelerator: the flag, the cached verdict, or what the probe saw.
    pub accel_reason: String,
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
    let img = local_image::LocalImage::load(&opts.image)?;
    let work = tempfile::Builder::new()
        .prefix("stackless-boot-")
        .tempdir()
        .context("creating a folder for the boot's disk overlay")?;
    let overlay = work.path().join("overlay.qcow2");
    img.overlay(&overlay).await?;

    // The guest's NIC and the metadata's `mac` are one address, as on EC2.
    let emulator_mac = DEFAULT_MAC.to_string();
    let mut emulator_cfg = EmulatorConfig::new(Identity {
        image_id: img.build_id.clone(),
        ..opts.identity.clone()
    });
    if let Some(ud) = &opts.user_data {
        emulator_cfg = emulator_cfg.with_user_data(ud.clone());
    }
    if let Some(role) = &opts.role {
        emulator_cfg = emulator_cfg.with_role(role.clone());
    }
    let emulator =
        Emulator::start(emulator_cfg).context("starting the instance metadata emulator")?;
    let mut forwards = vec![GuestForward {
        guest: qemu::imds_guest_addr(),
        host: emulator.addr(),
    }];
    forwards.extend(opts.forwards.iter().cloned());

    let mut choice = choose_accel(opts).await;
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
        accel: choice.accel.as_str(),
        cpu: choice.cpu.clone(),
        accel_reason: choice.reason.clone(),
        boot_to_result_ms: None,
        result: None,
        timed_out: false,
        kvm_fallback: None,
    };
    if choice.accel == Accel::Tcg && choice.cached {
        // Said once per boot, so a slow TCG boot is never a mystery.
        tracing::info!("booting under TCG: {}", choice.reason);
    }
    // What each KVM attempt that failed before the guest kernel started ran into.
    let mut kvm_failures: Vec<String> = Vec::new();
    tokio::pin!(stop);
    loop {
        let spec = QemuSpec {
            accel: choice.accel,
            cpu: choice.cpu.clone(),
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
            kernel: img.kernel.clone(),
            initrd: img.initrd.clone(),
            cmdline: img.cmdline.clone(),
            disk: overlay.clone(),
            ports: opts.ports.clone(),
            forwards: forwards.clone(),
            relay: opts.relay.clone(),
            instance_id: opts.identity.instance_id.clone(),
            instance_type: opts.identity.instance_type.clone(),
            mac: emulator_mac.clone(),
        };
        tracing::info!(image = %report.image, instance = %opts.identity.instance_id, accel = choice.accel.as_str(), cpu = ?choice.cpu, imds = %emulator.addr(), "booting");
        let mut child = spawn_qemu(&opts.qemu, &spec)?;
        let started = Instant::now();
        let mut stdout = child.stdout.take().context("qemu's console pipe")?;
        let mut chunk = vec![0u8; 16 * 1024];
        let mut console = Assembler::default();
        let mut recent: VecDeque<String> = VecDeque::with_capacity(40);
        let mut kernel_started = false;
        let deadline = tokio::time::sleep(opts.timeout);
        tokio::pin!(deadline);
        // Only an automatically chosen KVM is judged; an explicit --accel kvm fails loudly.
        let probing = choice.probing;
        let probe = tokio::time::sleep(opts.kvm_probe);
        tokio::pin!(probe);
        let mut kvm_failed: Option<accel::KvmFailure> = None;
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
                        if probing && !kernel_started {
                            kvm_failed = Some(accel::KvmFailure::Exited { status: status.to_string(), stderr });
                            break Ok(());
                        }
                        break Err(anyhow!(
                            "qemu ended ({status}) before the agent reported{}\n--- last console lines ---\n{}",
                            if stderr.trim().is_empty() { String::new() } else { format!("; qemu said: {}", stderr.trim()) },
                            recent.iter().cloned().collect::<Vec<_>>().join("\n")
                        ));
                    }
                    let mut reported = false;
                    for line in console.push(&chunk[..n]) {
                        if !kernel_started && line.text.contains("Linux version") {
                            kernel_started = true;
                            if probing {
                                choice.kernel_started();
                            }
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
                    kvm_failed = Some(accel::KvmFailure::Silent(opts.kvm_probe));
                    break Ok(());
                }
                _ = &mut deadline, if report.result.is_none() => {
                    report.timed_out = true;
                    break Ok(());
                }
                why = &mut stop => {
                    kill_whole(&mut child).await;
                    if report.result.is_some() {
                        tracing::info!("{why}; stopped the machine");
                        break Ok(());
                    }
                    break Err(anyhow!("{why}; stopped the machine before the agent reported"));
                }
            }
        };
        kill_whole(&mut child).await;
        if let Some(f) = log.as_mut() {
            let _ = f.flush();
        }
        if let Some(failure) = kvm_failed {
            // Nothing reached the disk: the guest kernel never started, so the same overlay
            // boots again.
            let cpu = choice.cpu.clone().unwrap_or_else(|| accel::HOST_CPU.into());
            kvm_failures.push(failure.describe(&cpu));
            if let Some(next) = accel::next_cpu(&cpu, &failure) {
                tracing::info!(
                    "{}; trying KVM again with -cpu {next}",
                    failure.describe(&cpu)
                );
                choice.cpu = Some(next);
                report.cpu = choice.cpu.clone();
                continue;
            }
            let why = format!(
                "KVM is unusable here: {}; booting under TCG",
                kvm_failures.join("; then ")
            );
            tracing::warn!("{why}");
            choice.kvm_unusable(kvm_failures.join("; then "));
            report.kvm_fallback = Some(why.clone());
            report.accel_reason = why;
            report.accel = choice.accel.as_str();
            report.cpu = None;
            continue;
        }
        ended?;
        break;
    }
    drop(emulator);
    Ok(report)
}

/// The accelerator a boot starts with, why, and (under auto) the verdict cache it keeps true.
struct AccelChoice {
    accel: Accel,
    /// `-cpu` under KVM.
    cpu: Option<String>,
    /// KVM chosen by auto: its failures before the guest kernel starts fall back to TCG.
    probing: bool,
    reason: String,
    /// The choice came from the cache.
    cached: bool,
    cache: Option<(accel::VerdictCache, accel::HostKey)>,
}

impl AccelChoice {
    fn fixed(accel: Accel, reason: &str) -> AccelChoice {
        AccelChoice {
            accel,
            cpu: (accel == Accel::Kvm).then(|| accel::HOST_CPU.to_string()),
            probing: false,
            reason: reason.to_string(),
            cached: false,
            cache: None,
        }
    }

    /// The guest kernel started under KVM: remember the CPU model that got it there.
    fn kernel_started(&mut self) {
        if let (Some((cache, host)), Some(cpu)) = (&self.cache, &self.cpu) {
            if !self.cached {
                let reason = format!("the guest kernel started under KVM with -cpu {cpu}");
                cache.store(&accel::Verdict::new(
                    host.clone(),
                    Some(cpu.clone()),
                    reason,
                ));
            }
        }
    }

    /// KVM failed every way worth trying: TCG from now on, and on this host until it changes.
    fn kvm_unusable(&mut self, why: String) {
        if let Some((cache, host)) = &self.cache {
            cache.store(&accel::Verdict::new(host.clone(), None, why));
        }
        self.accel = Accel::Tcg;
        self.cpu = None;
        self.probing = false;
    }
}

/// `--accel auto`: TCG when the KVM device does not open; else the cached verdict for this host;
/// else KVM with `-cpu host`, judged until the guest kernel prints its banner.
async fn choose_accel(opts: &BootOptions) -> AccelChoice {
    match opts.accel {
        Some(Accel::Tcg) => return AccelChoice::fixed(Accel::Tcg, "--accel tcg"),
        Some(Accel::Kvm) => return AccelChoice::fixed(Accel::Kvm, "--accel kvm"),
        None => {}
    }
    if let Err(e) = accel::kvm_device_usable(&opts.kvm_device) {
        return AccelChoice::fixed(Accel::Tcg, &format!("KVM is unusable here: {e}"));
    }
    let qemu = opts.qemu.to_string_lossy();
    let cache = match (&opts.cache_dir, qemu_version(&qemu).await) {
        (Some(dir), Some(version)) => Some((
            accel::VerdictCache::in_dir(dir),
            accel::HostKey::current(&version),
        )),
        _ => None,
    };
    if let Some((c, host)) = &cache {
        if let Some(v) = c.load(host) {
            let mut choice = AccelChoice {
                accel: Accel::Tcg,
                cpu: None,
                probing: false,
                reason: String::new(),
                cached: true,
                cache: cache.clone(),
            };
            match v.kvm_cpu {
                Some(cpu) => {
                    choice.reason = format!(
                        "KVM works here with -cpu {cpu} (verdict of {} cached in {})",
                        v.probed_at,
                        c.path.display()
                    );
                    choice.accel = Accel::Kvm;
                    choice.cpu = Some(cpu);
                    // Still judged: a host can change in ways the key does not see.
                    choice.probing = true;
                }
                None => {
                    choice.reason = format!(
                        "KVM is unusable here: {} (verdict of {} cached in {}; delete it to probe again)",
                        v.reason,
                        v.probed_at,
                        c.path.display()
                    );
                }
            }
            return choice;
        }
    }
    AccelChoice {
        accel: Accel::Kvm,
        cpu: Some(accel::HOST_CPU.into()),
        probing: true,
        reason: "probing KVM: the guest kernel must start under it".into(),
        cached: false,
        cache,
    }
}

/// `qemu --version`'s first line, None when qemu does not answer (the boot then says why).
async fn qemu_version(qemu: &str) -> Option<String> {
    crate::platform::local::process::run(
        "asking qemu its version",
        qemu,
        &["--version"],
        Duration::from_secs(20),
    )
    .await
    .ok()
    .and_then(|out| out.lines().next().map(|l| l.trim().to_string()))
    .filter(|l| !l.is_empty())
}

/// Kills qemu's whole process group (a wrapper script's children too) and reaps it.
async fn kill_whole(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: killpg only sends a signal; qemu leads its own group (process_group(0)).
        unsafe {
            libc::killpg(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
    let _ = child.wait().await;
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

fn spawn_qemu(program: &std::path::Path, spec: &QemuSpec) -> Result<Child> {
    let args = qemu::args(spec);
    tracing::debug!("{} {}", program.display(), args.join(" "));
    let mut cmd = Command::new(program);
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
                anyhow!("{} is not installed; run scripts/install-local-deps.sh (qemu from bookworm-backports)", program.display())
            } else {
                anyhow!("starting {}: {e}", program.display())
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

#[cfg(test)]
mod tests;
