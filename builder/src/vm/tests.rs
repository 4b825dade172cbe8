//! The accelerator choice of `--accel auto`, driven through `boot` with a stand-in qemu: a
//! script that behaves as a host's qemu does under KVM (aborts on a refused MSR, hangs, works)
//! and, under TCG, prints a kernel banner and the agent's result line as a real boot would.
//! The real qemu and a real kernel are exercised by tests/e2e-local.sh with the same stand-ins.

use super::*;
use std::path::Path;

const RESULT: &str = r#"stackless-init-result: {"outcome":"ready","total_ms":42}"#;

/// How the stand-in's KVM behaves.
enum Kvm {
    /// Every KVM start aborts on MSR 0x10a, as on a nested host that refuses it.
    AbortsOnMsr,
    /// Only `-cpu host` aborts; without arch-capabilities the guest starts.
    AbortsWithHostCpuOnly,
    /// The guest stays silent.
    Hangs,
    Works,
}

struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new(kvm: Kvm) -> World {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("out");
        std::fs::create_dir_all(img.join("b-1")).unwrap();
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(img.join("b-1/disk.qcow2"))
            .arg("16M")
            .status()
            .expect("qemu-img (scripts/install-local-deps.sh installs qemu-utils)");
        assert!(status.success());
        std::fs::write(img.join("b-1/vmlinuz"), b"kernel").unwrap();
        std::fs::write(img.join("b-1/initrd.img"), b"initrd").unwrap();
        std::fs::write(
            img.join("manifest-local.json"),
            r#"{"target":"local","build_id":"b-1","image_name":"stand-in","details":{"disk":"b-1/disk.qcow2","kernel":"b-1/vmlinuz","initrd":"b-1/initrd.img","cmdline":"console=ttyS0"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("kvm"), b"").unwrap();
        let under_kvm = match kvm {
            Kvm::AbortsOnMsr => "abort",
            Kvm::AbortsWithHostCpuOnly => r#"case " $* " in *" -cpu host "*) abort;; esac; boots"#,
            Kvm::Hangs => "exec sleep 600",
            Kvm::Works => "boots",
        };
        let script = format!(
            r#"#!/bin/sh
ulimit -c 0
echo "$*" >> "{log}"
abort() {{
    echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069" >&2
    echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion 'ret == cpu->kvm_msr_buf->nmsrs' failed." >&2
    kill -ABRT $$
}}
boots() {{
    echo "[    0.000000] Linux version 6.1.0-stand-in"
    echo '{result}'
    exec sleep 600
}}
case " $* " in
    *" --version "*) echo "QEMU emulator version 10.0.2 (stand-in)"; exit 0;;
    *" -accel kvm "*) {under_kvm};;
esac
boots
"#,
            log = dir.path().join("qemu.log").display(),
            result = RESULT,
        );
        let qemu = dir.path().join("qemu-system-x86_64");
        std::fs::write(&qemu, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        World { dir }
    }

    fn options(&self) -> BootOptions {
        let mut o = BootOptions::new(self.dir.path().join("out"), PathBuf::from("/bin/true"));
        o.qemu = self.dir.path().join("qemu-system-x86_64");
        o.kvm_device = self.dir.path().join("kvm");
        o.cache_dir = Some(self.dir.path().join("cache"));
        o.kvm_probe = Duration::from_secs(2);
        o.timeout = Duration::from_secs(60);
        o.echo = false;
        o
    }

    async fn boot(&self, o: &BootOptions) -> Result<BootReport> {
        boot(o, std::future::pending()).await
    }

    /// The `-cpu` of each KVM start so far, in order; then forgets them.
    fn kvm_starts(&self) -> Vec<String> {
        let log = self.dir.path().join("qemu.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        text.lines()
            .filter(|l| l.contains("-accel kvm"))
            .map(|l| {
                l.split(" -cpu ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .unwrap_or("?")
                    .to_string()
            })
            .collect()
    }

    fn cached(&self) -> accel::Verdict {
        let text = std::fs::read_to_string(self.dir.path().join("cache").join(accel::VERDICT_FILE))
            .expect("a cached verdict");
        serde_json::from_str(&text).unwrap()
    }
}

fn assert_ready(r: &BootReport) {
    let outcome = r.result.as_ref().map(|r| r.outcome.as_str());
    assert_eq!(outcome, Some("ready"), "{r:?}");
}

#[tokio::test]
async fn a_qemu_that_aborts_under_kvm_falls_back_to_tcg_and_the_verdict_is_cached() {
    let w = World::new(Kvm::AbortsOnMsr);
    let r = w.boot(&w.options()).await.unwrap();
    assert_ready(&r);
    assert_eq!(r.accel, "tcg");
    // The cheap way round the refused MSR was tried before giving up.
    assert_eq!(w.kvm_starts(), ["host", "host,-arch-capabilities"]);
    let why = r.kvm_fallback.as_deref().unwrap();
    assert!(why.contains("SIGABRT"), "{why}");
    assert!(why.contains("failed to set MSR 0x10a"), "{why}");
    assert_eq!(r.accel_reason, why);
    let v = w.cached();
    assert_eq!(v.kvm_cpu, None);
    assert!(v.reason.contains("SIGABRT"), "{v:?}");

    // The next boot on this host pays no probe, and says why it runs under TCG.
    let r = w.boot(&w.options()).await.unwrap();
    assert_ready(&r);
    assert_eq!(r.accel, "tcg");
    assert!(w.kvm_starts().is_empty());
    assert!(r.accel_reason.contains("cached in"), "{}", r.accel_reason);
    assert!(r.accel_reason.contains("SIGABRT"), "{}", r.accel_reason);
    assert_eq!(r.kvm_fallback, None);
}

#[tokio::test]
async fn a_cpu_model_without_the_refused_msr_is_kept_when_it_works() {
    let w = World::new(Kvm::AbortsWithHostCpuOnly);
    let r = w.boot(&w.options()).await.unwrap();
    assert_ready(&r);
    assert_eq!(r.accel, "kvm");
    assert_eq!(r.cpu.as_deref(), Some("host,-arch-capabilities"));
    assert_eq!(w.kvm_starts(), ["host", "host,-arch-capabilities"]);
    assert_eq!(
        w.cached().kvm_cpu.as_deref(),
        Some("host,-arch-capabilities")
    );

    let r = w.boot(&w.options()).await.unwrap();
    assert_ready(&r);
    assert_eq!(r.accel, "kvm");
    assert_eq!(w.kvm_starts(), ["host,-arch-capabilities"]);
    assert!(
        r.accel_reason.contains("KVM works here"),
        "{}",
        r.accel_reason
    );
}

#[tokio::test]
async fn a_silent_kvm_guest_is_given_up_after_the_probe() {
    let w = World::new(Kvm::Hangs);
    let r = w.boot(&w.options()).await.unwrap();
    assert_ready(&r);
    assert_eq!(r.accel, "tcg");
    assert_eq!(w.kvm_starts(), ["host"]);
    let why = r.kvm_fallback.unwrap();
    assert!(why.contains("printed nothing in 2s"), "{why}");
    assert_eq!(w.cached().kvm_cpu, None);
}

#[tokio::test]
async fn working_kvm_is_used_and_remembered() {
    let w = World::new(Kvm::Works);
    let r = w.boot(&w.options()).await.unwrap();
    assert_ready(&r);
    assert_eq!((r.accel, r.cpu.as_deref()), ("kvm", Some("host")));
    assert_eq!(w.cached().kvm_cpu.as_deref(), Some("host"));
}

#[tokio::test]
async fn a_changed_host_probes_again() {
    let w = World::new(Kvm::Works);
    let stale = accel::Verdict::new(
        accel::HostKey {
            cpu_model: "another CPU".into(),
            kernel: "another kernel".into(),
            qemu: "QEMU emulator version 10.0.2 (stand-in)".into(),
        },
        None,
        "qemu aborted".into(),
    );
    accel::VerdictCache::in_dir(&w.dir.path().join("cache")).store(&stale);
    let r = w.boot(&w.options()).await.unwrap();
    assert_eq!(r.accel, "kvm", "{r:?}");
    assert_eq!(w.kvm_starts(), ["host"]);
    assert_eq!(w.cached().kvm_cpu.as_deref(), Some("host"));
}

#[tokio::test]
async fn an_explicit_kvm_fails_loudly_with_qemus_words() {
    let w = World::new(Kvm::AbortsOnMsr);
    let mut o = w.options();
    o.accel = Some(Accel::Kvm);
    let e = w.boot(&o).await.unwrap_err().to_string();
    assert!(e.contains("failed to set MSR 0x10a"), "{e}");
    assert!(e.contains("SIGABRT"), "{e}");
    assert_eq!(w.kvm_starts(), ["host"]);
    assert!(!w
        .dir
        .path()
        .join("cache")
        .join(accel::VERDICT_FILE)
        .exists());
}

#[tokio::test]
async fn no_kvm_device_means_tcg_without_trying() {
    let w = World::new(Kvm::Works);
    let mut o = w.options();
    o.kvm_device = Path::new("/nonexistent/kvm").to_path_buf();
    let r = w.boot(&o).await.unwrap();
    assert_ready(&r);
    assert_eq!(r.accel, "tcg");
    assert!(w.kvm_starts().is_empty());
    assert!(
        r.accel_reason.contains("/nonexistent/kvm"),
        "{}",
        r.accel_reason
    );
}
