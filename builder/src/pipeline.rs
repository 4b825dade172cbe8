//! The bake: one pipeline, any target. Resolve the source, reuse an image baked from identical
//! inputs, start the machine, stage the files, provision, generalise, snapshot, publish, and
//! clean up always: on success, on failure, and on Ctrl-C or SIGTERM.

use crate::arch::{Arch, InitBinaries};
use crate::communicator::{run_checked, Communicator};
use crate::definition::ImageDef;
use crate::platform::{Artifact, Build, Target};
use crate::render::{self, RenderInputs, Rendered};
use crate::signals::interrupted;
use crate::transfer;
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// What a bake needs besides the definition and the target.
#[derive(Debug, Clone)]
pub struct BakeOptions {
    pub templates: Option<PathBuf>,
    /// The agent binaries, one per architecture at most (`--init-binary`, repeated): the bake
    /// stages the one whose ELF machine is the source image's architecture.
    pub init_binaries: Vec<PathBuf>,
    pub bootstrap: Option<PathBuf>,
    /// Bake even when an image from identical inputs exists.
    pub force: bool,
    /// Leave the machine up after a failure, for debugging.
    pub keep_on_error: bool,
    /// Where the manifest goes.
    pub manifest: PathBuf,
    /// Local builds stage the host's CA bundle and remove it when generalising.
    pub build_ca: bool,
}

/// The record of a bake, written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub image: String,
    pub target: String,
    /// The image's architecture, as EC2 names it (`x86_64`, `arm64`).
    pub arch: Arch,
    pub build_id: String,
    pub image_name: String,
    pub artifact: String,
    pub regions: BTreeMap<String, String>,
    pub source: String,
    /// The agent binary staged (its path as given; its checksum is in the input hash).
    pub init_binary: String,
    pub input_hash: String,
    /// Reused an image from identical inputs rather than baking.
    pub reused: bool,
    pub created_at: String,
    /// Milliseconds per phase, in order.
    pub phases: Vec<(String, u64)>,
    pub details: BTreeMap<String, String>,
    /// The image is made and published, but removing the build's temporary resources failed:
    /// callers print the id and still fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_error: Option<String>,
}

/// Times phases for the manifest and the log.
#[derive(Default)]
struct Phases(Vec<(String, u64)>);

impl Phases {
    async fn run<T, F: std::future::Future<Output = Result<T>>>(
        &mut self,
        name: &str,
        f: F,
    ) -> Result<T> {
        let t = Instant::now();
        tracing::info!(phase = name, "starting");
        let r = f.await.with_context(|| format!("phase `{name}`"));
        let ms = t.elapsed().as_millis() as u64;
        self.0.push((name.to_string(), ms));
        match &r {
            Ok(_) => tracing::info!(phase = name, ms, "done"),
            Err(e) => tracing::error!(phase = name, ms, "{e:#}"),
        }
        r
    }
}

/// sha256 over everything that shapes the image: the resolved source, the definition, the
/// templates as written, the init binary and the bootstrap script.
pub fn input_hash(def: &ImageDef, source: &str, rendered: &Rendered) -> String {
    let mut h = Sha256::new();
    let mut def = def.clone();
    def.files.clear(); // where the files are does not matter, what they say does
    h.update(b"stackless-input-hash-v1\0");
    h.update(source.as_bytes());
    h.update(b"\0");
    h.update(serde_json::to_vec(&def).unwrap_or_default());
    // Rendered with a fixed build id (BUILD_ID_PLACEHOLDER): the id differs per bake by design.
    for f in &rendered.files {
        h.update(f.name.as_bytes());
        h.update(b"\0");
        h.update(&f.content);
    }
    h.update(rendered.provision.as_bytes());
    h.update(rendered.generalize.as_bytes());
    h.update(rendered.seed_user_data.as_bytes());
    hex::encode(h.finalize())
}

const BUILD_ID_PLACEHOLDER: &str = "b-00000000000000-000000";

/// `b-YYYYMMDDhhmmss-xxxxxx` and the UTC timestamp.
pub fn new_build_id() -> (String, String) {
    let ts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let compact: String = ts.chars().filter(|c| c.is_ascii_digit()).take(14).collect();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let rand =
        hex::encode(Sha256::digest(format!("{nanos}{}", std::process::id())))[..6].to_string();
    (format!("b-{compact}-{rand}"), compact)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// Bakes `def` on `target`, stopping and cleaning up on Ctrl-C or SIGTERM. The artifact's id is
/// what callers print last.
pub async fn bake(target: &mut dyn Target, def: &ImageDef, opts: &BakeOptions) -> Result<Manifest> {
    bake_until(target, def, opts, interrupted()).await
}

/// `bake`, interrupted when `stop` resolves (with the reason) instead of on a signal: tests
/// interrupt each phase this way without signalling the whole test process.
pub async fn bake_until(
    target: &mut dyn Target,
    def: &ImageDef,
    opts: &BakeOptions,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<Manifest> {
    let binaries = InitBinaries::load(&opts.init_binaries)?;
    let bootstrap = match &opts.bootstrap {
        Some(p) => Some(read(p, "the salt-bootstrap script")?),
        None => None,
    };
    let mut phases = Phases::default();
    let resolved = phases
        .run("resolve-source", target.resolve_source(def))
        .await?;
    // The agent of the image's architecture, or a refusal naming every binary given: before
    // anything is launched.
    let agent = binaries.for_arch(
        resolved.arch,
        &format!("`{}` (source {})", def.image, resolved.id),
    )?;
    tracing::info!(arch = %resolved.arch, init_binary = %agent.path.display(), "the agent for the image's architecture");
    let init_binary = &agent.bytes;
    let init_path = agent.path.display().to_string();
    let source = resolved.id;
    let for_hash = render::render(
        def,
        &RenderInputs {
            templates: opts.templates.as_deref(),
            init_binary,
            bootstrap: bootstrap.as_deref(),
            build_id: BUILD_ID_PLACEHOLDER,
            build_ca: opts.build_ca,
        },
    )?;
    let hash = input_hash(def, &source, &for_hash);
    let (id, timestamp) = new_build_id();
    let mut build = Build {
        image_name: def.image_name(&id, &timestamp),
        id,
        timestamp,
        input_hash: hash.clone(),
        source,
        arch: resolved.arch,
        seed_user_data: String::new(),
    };
    tracing::info!(build = %build.id, image = %build.image_name, input_hash = %hash, "bake");

    if !opts.force {
        if let Some(existing) = phases
            .run("find-existing", target.find_existing(def, &hash))
            .await?
        {
            tracing::info!(id = %existing.id, "an image from identical inputs exists; reusing it (--force bakes anew)");
            let m = manifest(
                def,
                target.kind(),
                &build,
                &init_path,
                &existing,
                true,
                phases.0,
            );
            write_manifest(&opts.manifest, &m)?;
            return Ok(m);
        }
    }
    let rendered = render::render(
        def,
        &RenderInputs {
            templates: opts.templates.as_deref(),
            init_binary,
            bootstrap: bootstrap.as_deref(),
            build_id: &build.id,
            build_ca: opts.build_ca,
        },
    )?;
    render::check_shell("provision.sh", &rendered.provision)?;
    render::check_shell("generalize.sh", &rendered.generalize)?;
    render::check_seed_user_data(
        "the seed's user-data",
        &rendered.seed_user_data,
        def.lease_minutes,
    )?;
    build.seed_user_data = rendered.seed_user_data.clone();

    let result = {
        let run = run_phases(target, def, &build, &rendered, &mut phases);
        tokio::select! {
            r = run => r,
            why = stop => Err(anyhow!("{why}; cleaning up")),
        }
    };
    let failed = result.is_err();
    let keep = failed && opts.keep_on_error;
    // Cleanup runs whatever happened, and a second Ctrl-C does not stop it.
    let cleanup = phases
        .run("cleanup", target.cleanup(&build, failed, keep))
        .await;
    match (result, cleanup) {
        (Ok(artifact), cleanup) => {
            let mut m = manifest(
                def,
                target.kind(),
                &build,
                &init_path,
                &artifact,
                false,
                phases.0,
            );
            if let Err(e) = cleanup {
                m.cleanup_error = Some(format!(
                    "the image {} was made and published, but cleaning up the build failed: {e:#}; run `builder gc` to remove what is left",
                    artifact.id
                ));
            }
            write_manifest(&opts.manifest, &m)?;
            Ok(m)
        }
        (Err(e), Ok(notes)) => {
            let mut e = e;
            for n in notes {
                e = e.context(n);
            }
            Err(e)
        }
        (Err(e), Err(c)) => Err(e.context(format!("cleanup failed too ({c:#}); run `builder gc`"))),
    }
}

async fn run_phases(
    target: &mut dyn Target,
    def: &ImageDef,
    build: &Build,
    rendered: &Rendered,
    phases: &mut Phases,
) -> Result<Artifact> {
    let comm = phases.run("start", target.start(def, build)).await?;
    let upload = transfer::upload_commands(&rendered.files);
    let total = upload.len();
    phases
        .run("upload", async {
            for (i, c) in upload.iter().enumerate() {
                run_checked(
                    comm.as_ref(),
                    &format!("upload {}/{total}", i + 1),
                    c,
                    Duration::from_secs(300),
                )
                .await?;
            }
            Ok(())
        })
        .await?;
    let out = phases
        .run(
            "provision",
            run_checked(
                comm.as_ref(),
                "provisioning",
                &transfer::script_command("provision.sh", &rendered.provision),
                def.provision_timeout,
            ),
        )
        .await?;
    show_output("provision", &out.stdout, out.truncated);
    target.provisioned().await?;
    let out = phases
        .run(
            "generalize",
            run_checked(
                comm.as_ref(),
                "generalising",
                &transfer::script_command("generalize.sh", &rendered.generalize),
                Duration::from_secs(600),
            ),
        )
        .await?;
    show_output("generalize", &out.stdout, out.truncated);
    drop::<std::sync::Arc<dyn Communicator>>(comm);
    phases.run("snapshot", target.snapshot(def, build)).await
}

fn show_output(what: &str, stdout: &str, truncated: bool) {
    for line in stdout.lines() {
        tracing::info!("{what}: {line}");
    }
    if truncated {
        tracing::warn!(
            "{what}: the output above was cut by the transport (SSM keeps 24,000 characters)"
        );
    }
}

fn manifest(
    def: &ImageDef,
    kind: &str,
    build: &Build,
    init_binary: &str,
    a: &Artifact,
    reused: bool,
    phases: Vec<(String, u64)>,
) -> Manifest {
    Manifest {
        image: def.image.clone(),
        target: kind.to_string(),
        arch: build.arch,
        build_id: build.id.clone(),
        image_name: build.image_name.clone(),
        artifact: a.id.clone(),
        regions: a.regions.clone(),
        source: build.source.clone(),
        init_binary: init_binary.to_string(),
        input_hash: build.input_hash.clone(),
        reused,
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        phases,
        details: a.details.clone(),
        cleanup_error: None,
    }
}

fn write_manifest(path: &Path, m: &Manifest) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut json = serde_json::to_vec_pretty(m)?;
    json.push(b'\n');
    std::fs::write(path, json).with_context(|| format!("writing the manifest {}", path.display()))
}

#[cfg(test)]
mod tests;
