//! Choosing qemu's accelerator for `builder boot --accel auto`.
//!
//! Whether KVM works is a property of the host, and the hosts this project runs on are nested
//! and differ: on one qemu aborts at once under KVM (the host refuses an MSR qemu sets for
//! `-cpu host`), on another the guest stays silent forever, on a third it works. So KVM is
//! tried, and every way it can fail before the guest kernel prints its banner counts as "KVM
//! is unusable here": qemu exiting (any status or signal) or staying silent past the probe
//! time. Where a cheap change is known to avoid the refusal (a CPU model without the feature
//! whose MSR the host rejects) it is tried first. The verdict is cached per host (CPU model,
//! kernel, qemu version) so later boots do not pay the probe; a changed host probes again.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The CPU model tried first under KVM.
pub const HOST_CPU: &str = "host";

/// The cache file, in the builder's cache folder.
pub const VERDICT_FILE: &str = "accel-verdict.json";

/// What identifies a host for the verdict: any change probes again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    pub cpu_model: String,
    pub kernel: String,
    pub qemu: String,
}

impl HostKey {
    /// This host, with `qemu_version` as the qemu binary printed it.
    pub fn current(qemu_version: &str) -> HostKey {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        HostKey {
            cpu_model,
            kernel,
            qemu: qemu_version.lines().next().unwrap_or("").trim().to_string(),
        }
    }
}

/// The cached answer to "does KVM work here, and with which CPU model".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub host: HostKey,
    /// The `-cpu` model a guest kernel started with under KVM; None: KVM is unusable here.
    pub kvm_cpu: Option<String>,
    /// Why: what the probe saw.
    pub reason: String,
    /// RFC 3339.
    pub probed_at: String,
}

impl Verdict {
    pub fn new(host: HostKey, kvm_cpu: Option<String>, reason: String) -> Verdict {
        Verdict {
            host,
            kvm_cpu,
            reason,
            probed_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
}

/// The verdict cache: one file, holding the verdict of the host that wrote it last.
#[derive(Debug, Clone)]
pub struct VerdictCache {
    pub path: PathBuf,
}

impl VerdictCache {
    pub fn in_dir(dir: &Path) -> VerdictCache {
        VerdictCache {
            path: dir.join(VERDICT_FILE),
        }
    }

    /// The verdict for `host`, when one was cached for exactly this host.
    pub fn load(&self, host: &HostKey) -> Option<Verdict> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        match serde_json::from_str::<Verdict>(&text) {
            Ok(v) if &v.host == host => Some(v),
            Ok(v) => {
                tracing::debug!(cached = ?v.host, now = ?host, "the host changed since the accelerator was probed; probing again");
                None
            }
            Err(e) => {
                tracing::debug!(path = %self.path.display(), "unreadable accelerator verdict ({e}); probing again");
                None
            }
        }
    }

    /// Writes the verdict (atomically: a half-written file would only cost a probe, but a
    /// reader must never see one). A cache that cannot be written costs the next boot a probe,
    /// never this boot.
    pub fn store(&self, v: &Verdict) {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap_or_default())?;
            std::fs::rename(&tmp, &self.path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %self.path.display(), "could not cache the accelerator verdict ({e}); the next boot probes again");
        }
    }
}

/// How a KVM attempt ended before the guest kernel printed its banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmFailure {
    /// qemu ended: an error exit, an abort, a refused option.
    Exited { status: String, stderr: String },
    /// No kernel banner within the probe time.
    Silent(Duration),
}

impl KvmFailure {
    pub fn describe(&self, cpu: &str) -> String {
        match self {
            KvmFailure::Exited { status, stderr } => {
                let said = first_error_lines(stderr);
                if said.is_empty() {
                    format!("qemu -cpu {cpu} under KVM ended ({status}) before the guest kernel started")
                } else {
                    format!("qemu -cpu {cpu} under KVM ended ({status}) before the guest kernel started: {said}")
                }
            }
            KvmFailure::Silent(d) => format!(
                "the guest kernel printed nothing in {d:?} under KVM with -cpu {cpu} (nested virtualisation?)"
            ),
        }
    }

    /// The MSR qemu said the host refused (`failed to set MSR 0x10a to ...`).
    pub fn rejected_msr(&self) -> Option<u32> {
        let KvmFailure::Exited { stderr, .. } = self else {
            return None;
        };
        let at = stderr.find("failed to set MSR 0x")?;
        let hex: String = stderr[at + "failed to set MSR 0x".len()..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        u32::from_str_radix(&hex, 16).ok()
    }
}

/// The CPU feature qemu programs through each MSR a host is known to refuse; turning the feature
/// off keeps qemu from setting the MSR.
const MSR_FEATURES: &[(u32, &str)] = &[
    (0x10a, "arch-capabilities"), // IA32_ARCH_CAPABILITIES
    (0x48, "spec-ctrl"),          // IA32_SPEC_CTRL
    (0x122, "tsx-ctrl"),          // IA32_TSX_CTRL
    (0x6e0, "tsc-deadline"),      // IA32_TSC_DEADLINE
    (0x1d9, "pdcm"),              // IA32_DEBUGCTL
];

/// The next CPU model worth trying after `failure` with `cpu`, when a cheap change is known to
/// avoid it: the host refused an MSR, so the feature behind it goes; an MSR with no known
/// feature falls back once to the plain `qemu64` model. A silent guest gets no second try:
/// each costs the whole probe time.
pub fn next_cpu(cpu: &str, failure: &KvmFailure) -> Option<String> {
    let msr = failure.rejected_msr()?;
    match MSR_FEATURES.iter().find(|(m, _)| *m == msr) {
        Some((_, feature)) => {
            let off = format!("-{feature}");
            if cpu.split(',').any(|f| f == off) {
                None
            } else {
                Some(format!("{cpu},{off}"))
            }
        }
        None if cpu != "qemu64" => Some("qemu64".into()),
        None => None,
    }
}

/// The lines of qemu's stderr that say what went wrong, joined (at most three).
fn first_error_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let picked: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("error") || l.contains("Assertion") || l.contains("failed"))
        .copied()
        .take(3)
        .collect();
    if picked.is_empty() {
        lines.into_iter().take(3).collect::<Vec<_>>().join(" / ")
    } else {
        picked.join(" / ")
    }
}

/// Whether the KVM device opens for reading and writing; the error when it does not.
pub fn kvm_device_usable(device: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{} cannot be opened for reading and writing ({e})",
                device.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abort(stderr: &str) -> KvmFailure {
        KvmFailure::Exited {
            status: "signal: 6 (SIGABRT)".into(),
            stderr: stderr.into(),
        }
    }

    const MSR_ABORT: &str = "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069\nqemu-system-x86_64: ../../target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\n";

    #[test]
    fn a_refused_msr_turns_its_feature_off_once() {
        let f = abort(MSR_ABORT);
        assert_eq!(f.rejected_msr(), Some(0x10a));
        assert_eq!(
            next_cpu("host", &f).as_deref(),
            Some("host,-arch-capabilities")
        );
        // The same refusal with the feature already off: nothing cheap is left.
        assert_eq!(next_cpu("host,-arch-capabilities", &f), None);
        let d = f.describe("host");
        assert!(d.contains("SIGABRT"), "{d}");
        assert!(d.contains("failed to set MSR 0x10a"), "{d}");
        assert!(d.contains("Assertion"), "{d}");
    }

    #[test]
    fn an_unknown_msr_tries_qemu64_once_and_other_failures_nothing() {
        let f = abort("qemu-system-x86_64: error: failed to set MSR 0x777 to 0x1\n");
        assert_eq!(next_cpu("host", &f).as_deref(), Some("qemu64"));
        assert_eq!(next_cpu("qemu64", &f), None);
        let refused = KvmFailure::Exited {
            status: "exit status: 1".into(),
            stderr: "qemu-system-x86_64: -accel kvm: Could not access KVM kernel module: Permission denied\n".into(),
        };
        assert_eq!(next_cpu("host", &refused), None);
        assert!(refused.describe("host").contains("Could not access KVM"));
        let silent = KvmFailure::Silent(Duration::from_secs(15));
        assert_eq!(next_cpu("host", &silent), None);
        assert!(silent.describe("host").contains("printed nothing in 15s"));
    }

    #[test]
    fn the_verdict_is_kept_per_host_and_a_changed_host_probes_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = VerdictCache::in_dir(&dir.path().join("sub"));
        let host = HostKey {
            cpu_model: "AMD EPYC".into(),
            kernel: "6.1.0".into(),
            qemu: "QEMU emulator version 10.0.2".into(),
        };
        assert_eq!(cache.load(&host), None);
        let v = Verdict::new(host.clone(), None, "qemu aborted".into());
        cache.store(&v);
        assert_eq!(cache.load(&host), Some(v));
        let newer_qemu = HostKey {
            qemu: "QEMU emulator version 10.1.0".into(),
            ..host.clone()
        };
        assert_eq!(cache.load(&newer_qemu), None);
        let other_kernel = HostKey {
            kernel: "6.12.0".into(),
            ..host.clone()
        };
        assert_eq!(cache.load(&other_kernel), None);
        std::fs::write(&cache.path, "{not json").unwrap();
        assert_eq!(cache.load(&host), None);
    }

    #[test]
    fn this_host_has_a_key() {
        let k = HostKey::current("QEMU emulator version 9.9.9 (x)\nCopyright");
        assert_eq!(k.qemu, "QEMU emulator version 9.9.9 (x)");
        assert!(!k.kernel.is_empty() && k.kernel != "unknown", "{k:?}");
        assert!(!k.cpu_model.is_empty(), "{k:?}");
    }

    #[test]
    fn a_missing_device_is_named() {
        let e = kvm_device_usable(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(e.contains("/nonexistent/kvm cannot be opened"), "{e}");
    }
}
