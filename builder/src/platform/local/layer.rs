//! The packages layer: the Debian base with a definition's apt packages already installed,
//! cached beside the base as `layer-KEY.tar`. Installing them (python3 byte-compiles its stdlib,
//! dpkg unpacks gcc) is most of a re-bake's provisioning; with the layer, provision.sh's own
//! `apt-get install` finds everything there and only upgrades what the mirror has newer.
//!
//! The layer is made with none of the build's host-specific changes: the host's CA bundle is
//! copied and trusted only after it is made, apt's cache is unmounted and the root's own
//! `archives` emptied, and policy-rc.d and the host's resolv.conf are undone before it is tarred.
//! So it holds nothing the image could not have had from the mirror alone. A mirror behind an
//! intercepting proxy (`build_ca`) is reached with the host's bundle handed to apt alone, in a
//! file removed before the tarball is made.

use super::base::{self, BaseSpec};
use super::caches::{self, BindCache};
use super::mounts::Mounts;
use super::process::run;
use crate::communicator::chroot::{ChrootCommunicator, BUILD_CA_IN_ROOT, HOST_CA_BUNDLE};
use crate::communicator::run_checked;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Bump when what goes into a layer changes (not its packages: they are in the key).
const LAYER_VERSION: &str = "stackless-local-layer-v1";

/// apt-get update and install of a few hundred MB of packages, with room for a slow mirror.
const INSTALL_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Where the host's CA bundle waits for apt while the layer is made (never trusted system-wide).
const APT_CA_IN_ROOT: &str = "var/tmp/stackless-layer-ca.pem";

/// A base and the packages to put on it.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    pub base_key: String,
    /// Sorted and without duplicates: the same set is the same layer.
    pub packages: Vec<String>,
}

impl LayerSpec {
    /// The definition's packages, and `supervisor` when provision.sh installs it with apt.
    /// `None` when there is nothing to install: the base alone is the layer.
    pub fn new(base: &BaseSpec, packages: &[String], supervisor: bool) -> Option<LayerSpec> {
        let mut packages: Vec<String> = packages.to_vec();
        if supervisor {
            packages.push("supervisor".into());
        }
        packages.sort();
        packages.dedup();
        if packages.is_empty() {
            return None;
        }
        Some(LayerSpec {
            base_key: base.key(),
            packages,
        })
    }

    /// sha256 over the base's key and the package list.
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        for part in [LAYER_VERSION, &self.base_key] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        for p in &self.packages {
            h.update(p.as_bytes());
            h.update(b"\0");
        }
        hex::encode(h.finalize())
    }

    pub fn tarball(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join(format!("layer-{}.tar", &self.key()[..16]))
    }
}

/// Fills the empty folder `root` with the base and the layer's packages: unpacked from the
/// cached layer when a fresh one is there, else installed on the base (prepared as usual) and
/// cached. `apt_cache` is apt's host cache to lend while installing. Returns whether the layer
/// came from the cache. Either way the root has no build-only changes when this returns.
pub async fn prepare(
    spec: &BaseSpec,
    layer: &LayerSpec,
    root: &Path,
    cache_dir: &Path,
    max_age: Duration,
    apt_cache: Option<&Path>,
    build_ca: bool,
) -> Result<bool> {
    let tarball = layer.tarball(cache_dir);
    if base::is_fresh(&tarball, max_age) {
        tracing::info!(tarball = %tarball.display(), "unpacking the cached packages layer");
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let what = format!("unpacking the cached packages layer {}", tarball.display());
        base::unpack(&what, &tarball, root).await?;
        return Ok(true);
    }
    base::prepare(spec, root, cache_dir, max_age).await?;
    tracing::info!(packages = %layer.packages.join(" "), "installing the packages layer (cached afterwards)");
    install(layer, root, apt_cache, max_age, build_ca)
        .await
        .with_context(|| {
            format!(
                "making the packages layer: installing {} on the Debian base (apt's output below; \
                 check [provision] packages and the [local] mirror; nothing was cached)",
                layer.packages.join(" ")
            )
        })?;
    check_clean(root)?;
    // Dated as its base: the layer ages with the Debian it was made on and is remade with it.
    let base_made = std::fs::metadata(base::tarball(spec, cache_dir))
        .and_then(|m| m.modified())
        .ok();
    // A layer that cannot be cached (a full disk) costs the next bake time, not this one.
    if let Err(e) = cache(root, &tarball, base_made).await {
        tracing::warn!("{e:#}; baking on without caching the packages layer");
    }
    Ok(false)
}

/// apt-get install in the root, with the build-only changes it needs made and undone around it.
async fn install(
    layer: &LayerSpec,
    root: &Path,
    apt_cache: Option<&Path>,
    max_age: Duration,
    build_ca: bool,
) -> Result<()> {
    for p in &layer.packages {
        // The definition checks these too; they go into a shell command line.
        if p.is_empty()
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.:=_~".contains(c))
        {
            bail!("package name `{p}` is not a package name");
        }
    }
    super::write_policy_rc_d(root)?;
    super::copy_host_resolv_conf(root)?;
    // An HTTPS mirror through the build host's intercepting proxy: apt alone gets its bundle.
    let apt_ca = if build_ca && Path::new(HOST_CA_BUNDLE).is_file() {
        let to = root.join(APT_CA_IN_ROOT);
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::copy(HOST_CA_BUNDLE, &to)
            .with_context(|| format!("copying the host's CA bundle {HOST_CA_BUNDLE} for apt"))?;
        format!(" -o Acquire::https::CAInfo=/{APT_CA_IN_ROOT}")
    } else {
        String::new()
    };
    let mut mounts = Mounts::mount(root)?;
    let mut apt = match apt_cache {
        Some(host) if root.join(caches::APT_IN_ROOT).is_dir() => {
            BindCache::mount(host, root, caches::APT_IN_ROOT, 0o755, max_age)?
        }
        _ => None,
    };
    // No CA or pip environment: the layer is made before the host's CA is trusted.
    let comm = ChrootCommunicator::new(root.to_owned(), false);
    let result = run_checked(
        &comm,
        "installing the packages layer",
        &format!(
            "apt-get{apt_ca} update -qq && apt-get{apt_ca} install -y -qq --no-install-recommends {}",
            layer.packages.join(" ")
        ),
        INSTALL_DEADLINE,
    )
    .await;
    // Unmounted whatever apt did: the cache first, then the kernel file systems. apt's own
    // failure is the one worth reporting when both happen (Drop retries the unmounting).
    let unmounted = match apt.as_mut() {
        Some(c) => c
            .unmount()
            .context("unmounting apt's cache after the layer's install"),
        None => Ok(()),
    }
    .and_then(|_| {
        mounts
            .unmount()
            .context("unmounting the root after the layer's install")
    });
    result?;
    unmounted?;
    undo_build_changes(root)
}

/// What the layer must not carry from this build: the root goes back to what the mirror gave.
fn undo_build_changes(root: &Path) -> Result<()> {
    let policy = root.join(super::POLICY_RC_D);
    std::fs::remove_file(&policy).with_context(|| format!("removing {}", policy.display()))?;
    let resolv = root.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::fs::write(&resolv, "").with_context(|| format!("emptying {}", resolv.display()))?;
    let ca = root.join(APT_CA_IN_ROOT);
    if ca.exists() {
        std::fs::remove_file(&ca).with_context(|| format!("removing {}", ca.display()))?;
    }
    // Packages apt downloaded into the root itself (its cache was lent to another bake).
    for dir in [
        root.join(caches::APT_IN_ROOT),
        root.join(caches::APT_IN_ROOT).join("partial"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    std::fs::remove_file(e.path())
                        .with_context(|| format!("removing {}", e.path().display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Refuses to cache a root that still has anything of the build host in it.
fn check_clean(root: &Path) -> Result<()> {
    let mut found = Vec::new();
    for p in [
        BUILD_CA_IN_ROOT,
        APT_CA_IN_ROOT,
        super::POLICY_RC_D,
        caches::PIP_IN_ROOT,
    ] {
        if std::fs::symlink_metadata(root.join(p)).is_ok() {
            found.push(format!("/{p}"));
        }
    }
    if std::fs::metadata(root.join("etc/resolv.conf")).is_ok_and(|m| m.len() > 0) {
        found.push("a non-empty /etc/resolv.conf".into());
    }
    if let Ok(entries) = std::fs::read_dir(root.join(caches::APT_IN_ROOT)) {
        if entries
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "deb"))
        {
            found.push(format!("packages in /{}", caches::APT_IN_ROOT));
        }
    }
    if !found.is_empty() {
        bail!(
            "the packages layer would carry build-only files ({}); not caching it",
            found.join(", ")
        );
    }
    Ok(())
}

/// Tars the root to `tarball` through a `.partial` of this process, dated `made`, renamed when
/// whole.
async fn cache(root: &Path, tarball: &Path, made: Option<SystemTime>) -> Result<()> {
    let dir = tarball.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the cache {}", dir.display()))?;
    let partial = tarball.with_extension(format!("tar.{}.partial", std::process::id()));
    let made = run(
        &format!("caching the packages layer as {}", tarball.display()),
        "tar",
        &[
            "-C",
            &root.to_string_lossy(),
            "--numeric-owner",
            "--xattrs",
            "-cpf",
            &partial.to_string_lossy(),
            ".",
        ],
        Duration::from_secs(600),
    )
    .await
    .and_then(|_| match made {
        Some(t) => std::fs::File::options()
            .write(true)
            .open(&partial)
            .and_then(|f| f.set_modified(t))
            .with_context(|| format!("dating {}", partial.display())),
        None => Ok(()),
    })
    .and_then(|_| {
        std::fs::rename(&partial, tarball)
            .with_context(|| format!("publishing {}", tarball.display()))
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made?;
    tracing::info!(tarball = %tarball.display(), "packages layer cached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::local::mounts::mounted_under;

    fn bookworm() -> BaseSpec {
        BaseSpec {
            release: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_key_is_the_base_and_the_package_set() {
        let base = bookworm();
        let a = LayerSpec::new(&base, &strings(&["git", "curl"]), true).unwrap();
        let b = LayerSpec::new(&base, &strings(&["curl", "git", "git"]), true).unwrap();
        assert_eq!(a.packages, strings(&["curl", "git", "supervisor"]));
        assert_eq!(a.key(), b.key(), "order and duplicates do not matter");
        let c = LayerSpec::new(&base, &strings(&["curl", "git"]), false).unwrap();
        assert_ne!(a.key(), c.key(), "supervisor is one of the packages");
        let mut other = base.clone();
        other.release = "trixie".into();
        let d = LayerSpec::new(&other, &strings(&["git", "curl"]), true).unwrap();
        assert_ne!(a.key(), d.key(), "another base, another layer");
        assert!(LayerSpec::new(&base, &[], false).is_none());
        let t = a.tarball(Path::new("/c"));
        assert_eq!(t, PathBuf::from(format!("/c/layer-{}.tar", &a.key()[..16])));
    }

    #[test]
    fn bare_and_preseeded_share_one_layer() {
        let images = testkit::repo_root().join("images");
        let key = |name: &str| {
            let d = crate::definition::load(&images, name).unwrap();
            let base = BaseSpec {
                release: d.local_release.clone(),
                mirror: d.local_mirror.clone(),
            };
            LayerSpec::new(&base, &d.packages, d.supervisor)
                .unwrap()
                .key()
        };
        assert_eq!(key("bare"), key("preseeded"));
    }

    #[test]
    fn a_root_with_build_only_files_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/resolv.conf"), "").unwrap();
        check_clean(root).unwrap();
        std::fs::write(root.join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        let ca = root.join(BUILD_CA_IN_ROOT);
        std::fs::create_dir_all(ca.parent().unwrap()).unwrap();
        std::fs::write(&ca, "cert").unwrap();
        std::fs::create_dir_all(root.join(caches::APT_IN_ROOT)).unwrap();
        std::fs::write(root.join(caches::APT_IN_ROOT).join("gcc.deb"), "deb").unwrap();
        let apt_ca = root.join(APT_CA_IN_ROOT);
        std::fs::create_dir_all(apt_ca.parent().unwrap()).unwrap();
        std::fs::write(&apt_ca, "cert").unwrap();
        let e = format!("{:#}", check_clean(root).unwrap_err());
        for part in [
            "stackless-build-host.crt",
            "stackless-layer-ca.pem",
            "non-empty /etc/resolv.conf",
            "packages in /var/cache/apt/archives",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
    }

    fn have(program: &str) -> bool {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn tar_list(tarball: &Path) -> Vec<String> {
        let out = std::process::Command::new("tar")
            .arg("-tf")
            .arg(tarball)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_start_matches("./").to_string())
            .collect()
    }

    /// A real layer (the tiny `hello` package) on the cached base, in a scratch cache whose base
    /// is the shared one: nothing of the build host in it, apt's download in the host's cache
    /// only, and the second prepare unpacks it. Needs root, debootstrap, chroot and the mirror.
    #[tokio::test]
    async fn a_layer_holds_the_packages_and_nothing_of_the_build_host() {
        // SAFETY: geteuid has no preconditions.
        let root_user = unsafe { libc::geteuid() } == 0;
        if !root_user || !have("debootstrap") || !have("chroot") {
            let why = "needs root, debootstrap and chroot";
            // CI installs all of it (scripts/install-*-deps.sh): there, a skip would hide a test.
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return;
        }
        let week = Duration::from_secs(7 * 24 * 3600);
        let spec = bookworm();
        let shared = base::default_cache_dir();
        let base_name = format!("base-{}.tar", &spec.key()[..16]);
        let work = tempfile::tempdir().unwrap();
        if !base::is_fresh(&shared.join(&base_name), week) {
            // Debootstraps once (minutes), as seed_tests does; cached for every later run.
            base::prepare(&spec, &work.path().join("scratch"), &shared, week)
                .await
                .unwrap();
            std::fs::remove_dir_all(work.path().join("scratch")).unwrap();
        }
        let cache = work.path().join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::os::unix::fs::symlink(shared.join(&base_name), cache.join(&base_name)).unwrap();
        let apt = caches::apt_host_dir(&cache, "bookworm", "x86_64");
        let layer = LayerSpec::new(&spec, &strings(&["hello"]), false).unwrap();

        let root = work.path().join("root");
        let cached = prepare(&spec, &layer, &root, &cache, week, Some(&apt), true)
            .await
            .unwrap();
        assert!(!cached);
        let root = root.canonicalize().unwrap();
        assert!(mounted_under(&root).unwrap().is_empty());
        assert!(root.join("usr/bin/hello").exists());
        let tarball = layer.tarball(&cache);
        let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(
            modified(&tarball),
            modified(&cache.join(&base_name)),
            "the layer ages with its base"
        );
        let listed = tar_list(&tarball);
        assert!(listed.iter().any(|p| p == "usr/bin/hello"));
        // Made with build_ca: the host's bundle reached apt and stayed out of the layer.
        for bad in [
            BUILD_CA_IN_ROOT,
            APT_CA_IN_ROOT,
            super::super::POLICY_RC_D,
            caches::PIP_IN_ROOT,
        ] {
            assert!(
                !listed.iter().any(|p| p.starts_with(bad)),
                "{bad} is in the layer"
            );
        }
        assert!(
            !listed.iter().any(|p| p.ends_with(".deb")),
            "a downloaded package is in the layer"
        );
        assert!(
            !listed.iter().any(|p| p.ends_with(".partial")),
            "no partial file left"
        );
        assert_eq!(
            std::fs::metadata(root.join("etc/resolv.conf"))
                .unwrap()
                .len(),
            0
        );
        // apt's download went to the host's cache, not the root.
        assert!(std::fs::read_dir(&apt)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("hello_")));
        assert!(std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().ends_with(".partial")));

        // The next build unpacks it.
        let again = work.path().join("again");
        assert!(prepare(&spec, &layer, &again, &cache, week, None, false)
            .await
            .unwrap());
        assert!(again.join("usr/bin/hello").exists());
        assert!(!again.join(super::super::POLICY_RC_D).exists());

        // A package apt cannot install fails the bake plainly, caches nothing, leaves no mounts.
        let bad = LayerSpec::new(&spec, &strings(&["stackless-no-such-package"]), false).unwrap();
        let broken = work.path().join("broken");
        let e = format!(
            "{:#}",
            prepare(&spec, &bad, &broken, &cache, week, Some(&apt), false)
                .await
                .unwrap_err()
        );
        assert!(
            e.contains("making the packages layer: installing stackless-no-such-package")
                && e.contains("Unable to locate package"),
            "{e}"
        );
        assert!(mounted_under(&broken.canonicalize().unwrap())
            .unwrap()
            .is_empty());
        assert!(!bad.tarball(&cache).exists());
        assert!(std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("partial")));
    }
}
