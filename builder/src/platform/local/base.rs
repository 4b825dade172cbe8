//! The local target's source: a Debian root made by debootstrap, with what a Debian cloud image
//! has before anyone provisions it (systemd, a kernel and its initramfs, DHCP on eth0, CA
//! certificates). It is cached as a tarball keyed by everything that shapes it, so the second bake
//! of the day unpacks in seconds instead of debootstrapping for minutes.

use super::process::run;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Bump when the base's contents change.
const BASE_VERSION: &str = "stackless-local-base-v1";

/// What a Debian cloud image brings that provisioning relies on.
const BASE_PACKAGES: [&str; 10] = [
    "systemd-sysv",
    "udev",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "ifupdown",
    "isc-dhcp-client",
    "ca-certificates",
    "iproute2",
    "procps",
    "netbase",
];

/// The file system label the disk image gets and the kernel command line looks for.
pub const ROOT_LABEL: &str = "stackless-root";

/// Files the base gets on top of debootstrap: (path under the root, content).
fn base_files() -> Vec<(&'static str, String)> {
    vec![
        (
            "etc/fstab",
            format!("LABEL={ROOT_LABEL} / ext4 defaults,errors=remount-ro 0 1\n"),
        ),
        (
            // `auto`, not `allow-hotplug`: network-online.target then waits for the lease
            // (otherwise the agent's first IMDS requests fail and back off, about 2.7 s a boot).
            "etc/network/interfaces",
            "# Written by builder's local base: DHCP on the first NIC (net.ifnames=0).\n\
             auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n"
                .to_string(),
        ),
        ("etc/hostname", "debian\n".to_string()),
        (
            "etc/hosts",
            "127.0.0.1 localhost\n127.0.1.1 debian\n::1 localhost ip6-localhost ip6-loopback\n"
                .to_string(),
        ),
    ]
}

/// A Debian release from a mirror.
#[derive(Debug, Clone)]
pub struct BaseSpec {
    pub release: String,
    pub mirror: String,
}

impl BaseSpec {
    /// sha256 over everything that shapes the base.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [BASE_VERSION, &self.release, &self.mirror] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        for p in BASE_PACKAGES {
            h.update(p.as_bytes());
            h.update(b"\0");
        }
        for (path, content) in base_files() {
            h.update(path.as_bytes());
            h.update(content.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// The resolved source, as the input hash and the manifest see it.
    pub fn source_id(&self) -> String {
        format!(
            "debian/{} from {} (base {})",
            self.release,
            self.mirror,
            &self.key()[..12]
        )
    }
}

/// The default cache: `$XDG_CACHE_HOME/stackless` or `~/.cache/stackless`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("stackless");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/stackless")
}

/// Where the base of `spec` is cached.
pub fn tarball(spec: &BaseSpec, cache_dir: &Path) -> PathBuf {
    cache_dir.join(format!("base-{}.tar", &spec.key()[..16]))
}

/// Fills the empty folder `root` with the base: from the cache when a fresh enough tarball of
/// exactly this base is there, else by debootstrap (and then caches it).
pub async fn prepare(
    spec: &BaseSpec,
    root: &Path,
    cache_dir: &Path,
    max_age: Duration,
) -> Result<bool> {
    let tarball = tarball(spec, cache_dir);
    let fresh = is_fresh(&tarball, max_age);
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let root_s = root.to_string_lossy().to_string();
    if fresh {
        tracing::info!(tarball = %tarball.display(), "unpacking the cached Debian base");
        unpack("unpacking the cached base", &tarball, root).await?;
        return Ok(true);
    }
    tracing::info!(release = %spec.release, mirror = %spec.mirror, "debootstrap (a few minutes; cached afterwards)");
    let include = format!("--include={}", BASE_PACKAGES.join(","));
    run(
        &format!(
            "debootstrapping Debian {} from {}",
            spec.release, spec.mirror
        ),
        "debootstrap",
        &[
            "--variant=minbase",
            &include,
            &spec.release,
            &root_s,
            &spec.mirror,
        ],
        Duration::from_secs(45 * 60),
    )
    .await?;
    for (path, content) in base_files() {
        let to = root.join(path);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&to, content).with_context(|| format!("writing {}", to.display()))?;
    }
    // apt's downloaded packages are not part of the base.
    let archives = root.join("var/cache/apt/archives");
    if let Ok(entries) = std::fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating the cache {}", cache_dir.display()))?;
    let partial = tarball.with_extension("tar.partial");
    run(
        "caching the Debian base",
        "tar",
        &[
            "-C",
            &root_s,
            "--numeric-owner",
            "--xattrs",
            "-cpf",
            &partial.to_string_lossy(),
            ".",
        ],
        Duration::from_secs(600),
    )
    .await?;
    std::fs::rename(&partial, &tarball)
        .with_context(|| format!("publishing {}", tarball.display()))?;
    Ok(false)
}

/// Whether the cached tarball is there and younger than `max_age`.
pub(super) fn is_fresh(tarball: &Path, max_age: Duration) -> bool {
    std::fs::metadata(tarball)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < max_age)
}

/// Unpacks a cached root tarball (owners, modes and xattrs as they were) into `root`.
pub(super) async fn unpack(what: &str, tarball: &Path, root: &Path) -> Result<()> {
    run(
        what,
        "tar",
        &[
            "-C",
            &root.to_string_lossy(),
            "--numeric-owner",
            "--xattrs",
            "-xpf",
            &tarball.to_string_lossy(),
        ],
        Duration::from_secs(600),
    )
    .await
    .map(drop)
}

/// The newest kernel and its initramfs in the root's /boot.
pub fn kernel_of(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = root.join("boot");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort_by_key(|p| version_key(&p.to_string_lossy()));
    let kernel = kernels.pop().with_context(|| {
        format!(
            "no kernel (vmlinuz-*) in {}: the base lacks linux-image",
            boot.display()
        )
    })?;
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    let initrd = boot.join(format!("initrd.img-{version}"));
    if !initrd.exists() {
        anyhow::bail!(
            "the kernel {} has no initramfs {}",
            kernel.display(),
            initrd.display()
        );
    }
    Ok((kernel, initrd))
}

/// Orders "6.1.0-10" after "6.1.0-9": digit runs compare as numbers.
fn version_key(s: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut digits = String::new();
    let mut text = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !text.is_empty() {
                key.push((0, std::mem::take(&mut text)));
            }
            digits.push(c);
        } else {
            if !digits.is_empty() {
                key.push((digits.parse().unwrap_or(u64::MAX), String::new()));
                digits.clear();
            }
            text.push(c);
        }
    }
    if !digits.is_empty() {
        key.push((digits.parse().unwrap_or(u64::MAX), String::new()));
    }
    if !text.is_empty() {
        key.push((0, text));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_the_release_and_mirror() {
        let a = BaseSpec {
            release: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
        };
        let mut b = a.clone();
        b.release = "trixie".into();
        let mut c = a.clone();
        c.mirror = "http://mirror.example/debian".into();
        assert_ne!(a.key(), b.key());
        assert_ne!(a.key(), c.key());
        assert_eq!(a.key(), a.clone().key());
        assert!(a
            .source_id()
            .starts_with("debian/bookworm from http://deb.debian.org/debian (base "));
    }

    #[test]
    fn the_newest_kernel_and_its_initramfs_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        let e = kernel_of(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no kernel"), "{e}");
        for n in [
            "vmlinuz-6.1.0-1-cloud-amd64",
            "vmlinuz-6.1.0-10-cloud-amd64",
            "vmlinuz-6.1.0-9-cloud-amd64",
            "initrd.img-6.1.0-10-cloud-amd64",
        ] {
            std::fs::write(boot.join(n), "x").unwrap();
        }
        let (k, i) = kernel_of(dir.path()).unwrap();
        assert!(
            k.ends_with("vmlinuz-6.1.0-10-cloud-amd64"),
            "10 is newer than 9: {k:?}"
        );
        assert!(i.ends_with("initrd.img-6.1.0-10-cloud-amd64"));
        std::fs::remove_file(&i).unwrap();
        assert!(kernel_of(dir.path())
            .unwrap_err()
            .to_string()
            .contains("no initramfs"));
    }
}
