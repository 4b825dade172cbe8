//! The packages layer: the Debian base with a definition's apt packages already installed,
//! cached beside the base as the folder `layer-KEY.d`. Installing them (python3 byte-compiles its
//! stdlib, dpkg unpacks gcc) is most of a re-bake's provisioning; with the layer, provision.sh's
//! own `apt-get install` finds everything there and only upgrades what the mirror has newer.
//!
//! A build does not copy the layer: it mounts it as the lower layer of an overlay (`overlay.rs`)
//! and writes into its own folder, so a build starts with one mount and its cleanup removes only
//! what it wrote. Where an overlay cannot be used (another file system, a container without the
//! mount) the layer is copied into the build root instead. The folder is never written once
//! published: a remade layer is published under the same name and the old folder is renamed
//! aside, removed once no build holds it (each build holds a shared `flock` on it).
//!
//! The layer is made with none of the build's host-specific changes: the host's CA bundle is
//! copied and trusted only after it is made, apt's cache is unmounted and the root's own
//! `archives` emptied, and policy-rc.d and the host's resolv.conf are undone before it is
//! published. So it holds nothing the image could not have had from the mirror alone. A mirror
//! behind an intercepting proxy (`build_ca`) is reached with the host's bundle handed to apt
//! alone, in a file removed before the layer is published.

use super::base::{self, BaseSpec};
use super::caches::{self, BindCache};
use super::mounts::{remove_tree, Mounts};
use super::overlay::{self, OverlayRoot};
use super::process::run;
use crate::communicator::chroot::{ChrootCommunicator, BUILD_CA_IN_ROOT, HOST_CA_BUNDLE};
use crate::communicator::run_checked;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Bump when what goes into a layer changes (not its packages: they are in the key).
const LAYER_VERSION: &str = "stackless-local-layer-v1";

/// apt-get update and install of a few hundred MB of packages, with room for a slow mirror.
const INSTALL_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Copying a layer where no overlay can be mounted.
const COPY_DEADLINE: Duration = Duration::from_secs(10 * 60);

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

    fn name(&self) -> String {
        format!("layer-{}", &self.key()[..16])
    }

    /// The published layer: a folder, the root file system as apt left it.
    pub fn dir(&self, cache_dir: &Path) -> PathBuf {
        cache_dir.join(format!("{}.d", self.name()))
    }
}

/// How a build root got the layer's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// Mounted as the lower layer of an overlay; the build writes into `upper` beside the root.
    Overlay,
    /// Copied, where no overlay could be mounted.
    Copy,
}

/// A build root filled from the layer. Holds the layer (its lock, and the overlay mount) until
/// `release` or drop; the root must have nothing mounted inside it by then.
#[derive(Debug)]
pub struct LayerRoot {
    /// Whether the layer was there already (else this build made it).
    pub cached: bool,
    pub filled: Filled,
    /// The layer's folder (the overlay's lower layer).
    pub layer: PathBuf,
    overlay: Option<OverlayRoot>,
    lock: Option<LayerLock>,
}

impl LayerRoot {
    /// Unmounts the overlay and lets the layer go. Safe more than once.
    pub fn release(&mut self) -> Result<()> {
        if let Some(o) = self.overlay.as_mut() {
            o.unmount()?;
        }
        self.overlay = None;
        self.lock = None;
        Ok(())
    }
}

/// A shared `flock` on a published layer folder: a remade layer's old folder is removed only
/// when no build holds it.
#[derive(Debug)]
struct LayerLock(#[allow(dead_code)] File);

impl LayerLock {
    /// Holds the layer published at `dir`; `None` if it is not there (or was replaced while
    /// the lock was being taken).
    fn shared(dir: &Path) -> Result<Option<LayerLock>> {
        let f = match File::open(dir) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("opening {}", dir.display())),
        };
        super::flock::shared(&f)
            .with_context(|| format!("locking the packages layer {}", dir.display()))?;
        // Renamed aside (and maybe removed) between the open and the lock: not the layer.
        let held = f
            .metadata()
            .with_context(|| format!("reading {}", dir.display()))?;
        match std::fs::metadata(dir) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => Ok(Some(LayerLock(f))),
            _ => Ok(None),
        }
    }

    /// Whether nobody holds `dir` (an exclusive lock taken and given back at once).
    fn unused(dir: &Path) -> bool {
        // Closing the file gives the lock back at once.
        File::open(dir).is_ok_and(|f| matches!(super::flock::try_exclusive(&f), Ok(true)))
    }
}

/// Fills the empty or missing folder `root` with the base and the layer's packages: from the
/// cached layer when a fresh one is there, else installed on the base (prepared as usual) and
/// published first. The root is an overlay on the layer where one can be mounted (its upper and
/// work folders are `upper` and `overlay-work` beside it), a copy elsewhere. `apt_cache` is
/// apt's host cache to lend while installing. The root has no build-only changes when this
/// returns.
pub async fn prepare(
    spec: &BaseSpec,
    layer: &LayerSpec,
    root: &Path,
    cache_dir: &Path,
    max_age: Duration,
    apt_cache: Option<&Path>,
    build_ca: bool,
) -> Result<LayerRoot> {
    prune(cache_dir, layer);
    let dir = layer.dir(cache_dir);
    let mut cached = true;
    let lock = loop {
        if base::is_fresh(&dir, max_age) {
            if let Some(lock) = LayerLock::shared(&dir)? {
                break lock;
            }
            // Replaced while locking: take the new one.
            continue;
        }
        cached = false;
        make(spec, layer, cache_dir, max_age, apt_cache, build_ca).await?;
        if let Some(lock) = LayerLock::shared(&dir)? {
            break lock;
        }
    };
    let (filled, overlay) = fill(&dir, root, true).await?;
    tracing::info!(layer = %dir.display(), cached, filled = ?filled, "build root on the packages layer");
    Ok(LayerRoot {
        cached,
        filled,
        layer: dir,
        overlay,
        lock: Some(lock),
    })
}

/// Makes the layer in a folder of this process and publishes it as `layer.dir(cache_dir)`,
/// renaming an expired one aside.
async fn make(
    spec: &BaseSpec,
    layer: &LayerSpec,
    cache_dir: &Path,
    max_age: Duration,
    apt_cache: Option<&Path>,
    build_ca: bool,
) -> Result<()> {
    let dir = layer.dir(cache_dir);
    let partial = cache_dir.join(format!("{}.partial-{}", layer.name(), std::process::id()));
    remove_tree(&partial)?;
    let made = async {
        base::prepare(spec, &partial, cache_dir, max_age).await?;
        tracing::info!(packages = %layer.packages.join(" "), "installing the packages layer (cached afterwards)");
        install(layer, &partial, apt_cache, max_age, build_ca)
            .await
            .with_context(|| {
                format!(
                    "making the packages layer: installing {} on the Debian base (apt's output below; \
                     check [provision] packages and the [local] mirror; nothing was cached)",
                    layer.packages.join(" ")
                )
            })?;
        check_clean(&partial)?;
        // Dated as its base: the layer ages with the Debian it was made on and is remade with it.
        if let Ok(t) = std::fs::metadata(base::tarball(spec, cache_dir)).and_then(|m| m.modified())
        {
            File::open(&partial)
                .and_then(|f| f.set_modified(t))
                .with_context(|| format!("dating {}", partial.display()))?;
        }
        if std::fs::symlink_metadata(&dir).is_ok() {
            let aside = cache_dir.join(format!(
                "{}.old-{}-{}",
                layer.name(),
                std::process::id(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or_default()
            ));
            std::fs::rename(&dir, &aside)
                .with_context(|| format!("renaming the expired layer {} aside", dir.display()))?;
        }
        std::fs::rename(&partial, &dir)
            .with_context(|| format!("publishing the packages layer {}", dir.display()))?;
        tracing::info!(layer = %dir.display(), "packages layer cached");
        anyhow::Ok(())
    }
    .await;
    if made.is_err() {
        if let Err(e) = remove_tree(&partial) {
            tracing::warn!("{e:#}");
        }
    }
    made
}

/// Gives the empty or missing `root` the layer's files: an overlay where one can be mounted
/// (and `try_overlay`), else a copy.
async fn fill(dir: &Path, root: &Path, try_overlay: bool) -> Result<(Filled, Option<OverlayRoot>)> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let beside = root
        .parent()
        .with_context(|| format!("the build root {} has no parent folder", root.display()))?;
    let why_not = if try_overlay {
        overlay::unusable(dir, beside)
    } else {
        Some("overlays are not used here".to_string())
    };
    match why_not {
        None => match OverlayRoot::mount(
            dir,
            &beside.join("upper"),
            &beside.join("overlay-work"),
            root,
        ) {
            Ok(o) => return Ok((Filled::Overlay, Some(o))),
            Err(e) => tracing::warn!("{e:#}; copying the packages layer instead"),
        },
        Some(why) => tracing::info!("copying the packages layer: {why}"),
    }
    let from = format!("{}/.", dir.display());
    run(
        &format!(
            "copying the packages layer {} into the build root",
            dir.display()
        ),
        "cp",
        &["-a", "--reflink=auto", &from, &root.to_string_lossy()],
        COPY_DEADLINE,
    )
    .await?;
    Ok((Filled::Copy, None))
}

/// Removes what earlier builds left in the cache: expired layers no build holds, half-made ones
/// of processes that are gone, and the tarballs of the layer's earlier form.
fn prune(cache_dir: &Path, layer: &LayerSpec) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    let name = layer.name();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        // The earlier form of every layer: a tarball unpacked into each build.
        if file.starts_with("layer-") && file.ends_with(".tar") {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a packages layer tarball (layers are folders now)")
                }
                Err(e) => tracing::warn!("removing {}: {e}", path.display()),
            }
            continue;
        }
        let Some(rest) = file.strip_prefix(&format!("{name}.")) else {
            continue;
        };
        let stale = if rest.starts_with("old-") && LayerLock::unused(&path) {
            remove_tree(&path)
        } else if let Some(pid) = rest.strip_prefix("partial-") {
            if Path::new("/proc").join(pid).exists() {
                continue;
            }
            remove_tree(&path)
        } else {
            continue;
        };
        match stale {
            Ok(()) => tracing::info!(path = %path.display(), "removed a stale packages layer"),
            Err(e) => tracing::warn!(
                "removing the stale packages layer {}: {e:#}",
                path.display()
            ),
        }
    }
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
        let t = a.dir(Path::new("/c"));
        assert_eq!(t, PathBuf::from(format!("/c/layer-{}.d", &a.key()[..16])));
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

    /// Every path under `dir`, relative to it.
    fn list(dir: &Path) -> Vec<String> {
        let out = std::process::Command::new("find")
            .arg(dir)
            .args(["-mindepth", "1", "-printf", "%P\\n"])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A real layer (the tiny `hello` package) on the cached base, in a scratch cache whose base
    /// is the shared one: nothing of the build host in it, apt's download in the host's cache
    /// only; the next builds mount it (or copy it) and their writes stay their own; an expired
    /// layer is removed only when no build holds it. Needs root, debootstrap, chroot, the mirror.
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
        let work_path = work.path().canonicalize().unwrap();
        let work = &work_path;
        if !base::is_fresh(&shared.join(&base_name), week) {
            // Debootstraps once (minutes), as seed_tests does; cached for every later run.
            base::prepare(&spec, &work.join("scratch"), &shared, week)
                .await
                .unwrap();
            std::fs::remove_dir_all(work.join("scratch")).unwrap();
        }
        let cache = work.join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::os::unix::fs::symlink(shared.join(&base_name), cache.join(&base_name)).unwrap();
        let apt = caches::apt_host_dir(&cache, "bookworm", "x86_64");
        let layer = LayerSpec::new(&spec, &strings(&["hello"]), false).unwrap();
        // The earlier form, and what dead and living builds left half-made.
        let name = layer.name();
        std::fs::write(cache.join(format!("{name}.tar")), "old form").unwrap();
        std::fs::create_dir_all(cache.join(format!("{name}.partial-999999999/etc"))).unwrap();
        let living = cache.join(format!("{name}.partial-1"));
        std::fs::create_dir_all(&living).unwrap();

        let root = work.join("b1/root");
        let mut first = prepare(&spec, &layer, &root, &cache, week, Some(&apt), true)
            .await
            .unwrap();
        assert!(!first.cached);
        // Both are in one scratch folder: an overlay unless the kernel refuses the mount.
        assert_eq!(
            overlay::unusable(&layer.dir(&cache), &work.join("b1")),
            None
        );
        assert_eq!(first.filled, Filled::Overlay);
        assert!(
            !cache.join(format!("{name}.tar")).exists(),
            "the old form is removed"
        );
        assert!(!cache.join(format!("{name}.partial-999999999")).exists());
        assert!(
            living.exists(),
            "a living process's half-made layer is left alone"
        );
        std::fs::remove_dir_all(&living).unwrap();
        assert_eq!(
            mounted_under(&root).unwrap().len(),
            usize::from(first.filled == Filled::Overlay)
        );
        assert!(root.join("usr/bin/hello").exists());
        let dir = layer.dir(&cache);
        assert_eq!(first.layer, dir);
        let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        assert_eq!(
            modified(&dir),
            modified(&cache.join(&base_name)),
            "the layer ages with its base"
        );
        let listed = list(&dir);
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
        assert_eq!(
            std::fs::metadata(dir.join("etc/resolv.conf"))
                .unwrap()
                .len(),
            0
        );
        // apt's download went to the host's cache, not the root.
        assert!(std::fs::read_dir(&apt)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("hello_")));
        let names = |c: &Path| -> Vec<String> {
            std::fs::read_dir(c)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        };
        assert!(names(&cache).iter().all(|n| !n.contains("partial")));

        // What a build writes is its own: not in the layer, not in the next build.
        std::fs::write(root.join("etc/written-by-b1"), "b1").unwrap();
        std::fs::remove_file(root.join("usr/bin/hello")).unwrap();
        assert!(!dir.join("etc/written-by-b1").exists());
        assert!(dir.join("usr/bin/hello").exists());
        if first.filled == Filled::Overlay {
            assert!(work.join("b1/upper/etc/written-by-b1").exists());
        }
        let second_root = work.join("b2/root");
        let mut second = prepare(&spec, &layer, &second_root, &cache, week, None, false)
            .await
            .unwrap();
        assert!(second.cached);
        assert!(second_root.join("usr/bin/hello").exists());
        assert!(!second_root.join("etc/written-by-b1").exists());
        assert!(!second_root.join(super::super::POLICY_RC_D).exists());

        // Where no overlay can be mounted, the layer is copied, with the same files.
        let copied = work.join("b3/root");
        let (filled, none) = fill(&dir, &copied, false).await.unwrap();
        assert_eq!((filled, none.is_none()), (Filled::Copy, true));
        assert_eq!(list(&copied).len(), listed.len());
        assert!(copied.join("usr/bin/hello").exists());
        assert_eq!(
            std::fs::metadata(copied.join("usr/bin/hello"))
                .unwrap()
                .mode(),
            std::fs::metadata(dir.join("usr/bin/hello")).unwrap().mode()
        );

        // An expired layer renamed aside stays while a build holds it, and goes after.
        let aside = cache.join(format!("{name}.old-1-1"));
        std::fs::rename(&dir, &aside).unwrap();
        prune(&cache, &layer);
        assert!(aside.exists(), "two builds still hold it");
        first.release().unwrap();
        first.release().unwrap();
        assert!(mounted_under(&root).unwrap().is_empty());
        prune(&cache, &layer);
        assert!(aside.exists(), "one build still holds it");
        assert!(
            second_root.join("usr/bin/hello").exists(),
            "and still reads it"
        );
        second.release().unwrap();
        prune(&cache, &layer);
        assert!(!aside.exists(), "nobody holds it any more");

        // A package apt cannot install fails the bake plainly, caches nothing, leaves no mounts.
        let bad = LayerSpec::new(&spec, &strings(&["stackless-no-such-package"]), false).unwrap();
        let broken = work.join("b4/root");
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
        assert!(mounted_under(&cache).unwrap().is_empty());
        assert!(mounted_under(work).unwrap().is_empty());
        assert!(!bad.dir(&cache).exists());
        assert!(names(&cache).iter().all(|n| !n.contains("partial")));
    }
}
