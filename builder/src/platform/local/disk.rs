//! The generalised root turned into a bootable qcow2: `mke2fs -d` fills an ext4 file system
//! straight from the folder (no loop mounts, no root-only block devices), `qemu-img` compresses
//! it to a sparse qcow2, and the image's own kernel and initramfs sit beside it for direct boot.

use super::base::{kernel_of, ROOT_LABEL};
use super::process::run;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The kernel command line of a local image: the whole disk is the root file system, the serial
/// port is the console (as on EC2), and the first NIC is eth0.
pub const KERNEL_CMDLINE: &str = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0";

/// What `builder boot` needs.
#[derive(Debug, Clone)]
pub struct DiskImage {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub size_bytes: u64,
}

/// "4G", "512M", "8192K", or plain bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K') | Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') | Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('G') | Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('T') | Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num.parse().with_context(|| {
        format!("disk size {s:?}: expected a number with K, M, G or T, such as 4G")
    })?;
    let bytes = n
        .checked_mul(mult)
        .with_context(|| format!("disk size {s:?} is too large"))?;
    if bytes < 256 << 20 {
        bail!("disk size {s:?} is below 256M; a Debian root needs more");
    }
    Ok(bytes)
}

/// Writes `disk.qcow2`, `vmlinuz` and `initrd.img` into `out` (which must exist).
pub async fn make(root: &Path, out: &Path, size: &str) -> Result<DiskImage> {
    let size_bytes = parse_size(size)?;
    let (kernel_src, initrd_src) = kernel_of(root)?;
    let raw = out.join("disk.raw");
    let disk = out.join("disk.qcow2");
    {
        let f =
            std::fs::File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
        f.set_len(size_bytes)
            .with_context(|| format!("sizing {} to {size}", raw.display()))?;
    }
    let raw_s = raw.to_string_lossy().to_string();
    let result = async {
        run(
            "filling the root file system (mke2fs -d)",
            "mke2fs",
            &[
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                ROOT_LABEL,
                "-d",
                &root.to_string_lossy(),
                &raw_s,
            ],
            Duration::from_secs(30 * 60),
        )
        .await?;
        run(
            "converting the disk to qcow2",
            "qemu-img",
            &["convert", "-O", "qcow2", &raw_s, &disk.to_string_lossy()],
            Duration::from_secs(30 * 60),
        )
        .await
    }
    .await;
    let _ = std::fs::remove_file(&raw);
    result?;
    let kernel = out.join("vmlinuz");
    let initrd = out.join("initrd.img");
    std::fs::copy(&kernel_src, &kernel)
        .with_context(|| format!("copying the kernel {}", kernel_src.display()))?;
    std::fs::copy(&initrd_src, &initrd)
        .with_context(|| format!("copying the initramfs {}", initrd_src.display()))?;
    Ok(DiskImage {
        disk,
        kernel,
        initrd,
        size_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_their_units() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("4X")
            .unwrap_err()
            .to_string()
            .contains("expected a number"));
        assert!(parse_size("1M")
            .unwrap_err()
            .to_string()
            .contains("below 256M"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }

    #[tokio::test]
    async fn a_folder_becomes_a_qcow2_with_the_kernel_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hello"), "world").unwrap();
        std::fs::write(root.join("boot/vmlinuz-6.1.0-1-cloud-amd64"), "kernel").unwrap();
        std::fs::write(root.join("boot/initrd.img-6.1.0-1-cloud-amd64"), "initrd").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let d = make(&root, &out, "300M").await.unwrap();
        assert!(!out.join("disk.raw").exists());
        assert_eq!(std::fs::read_to_string(&d.kernel).unwrap(), "kernel");
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&d.disk)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 300u64 << 20);
        // The file really is in the file system: read it back with debugfs from a raw copy.
        let raw = dir.path().join("check.raw");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&d.disk)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success());
        let cat = std::process::Command::new("debugfs")
            .args(["-R", "cat /etc/hello"])
            .arg(&raw)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "world");
    }
}
