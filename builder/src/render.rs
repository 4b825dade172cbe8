//! Renders an image's templates into the files and scripts a bake stages on the machine.
//! Templates come from a folder (the repository's `templates/` by default, or the user's own);
//! any template missing there falls back to the copy built into the builder.

use crate::definition::ImageDef;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::Path;

/// Where files are staged on the machine before the provisioning script installs them.
pub const STAGE: &str = "/var/tmp/stackless-build";

/// The built-in templates, so the builder works outside a checkout too.
const BUILTIN: &[(&str, &str)] = &[
    (
        "provision.sh.tera",
        include_str!("../../templates/provision.sh.tera"),
    ),
    (
        "generalize.sh.tera",
        include_str!("../../templates/generalize.sh.tera"),
    ),
    (
        "stackless-init.service.tera",
        include_str!("../../templates/stackless-init.service.tera"),
    ),
    (
        "supervisord.conf.tera",
        include_str!("../../templates/supervisord.conf.tera"),
    ),
    (
        "supervisor.service.tera",
        include_str!("../../templates/supervisor.service.tera"),
    ),
    (
        "program.conf.tera",
        include_str!("../../templates/program.conf.tera"),
    ),
    ("minion.tera", include_str!("../../templates/minion.tera")),
    (
        "init.toml.tera",
        include_str!("../../templates/init.toml.tera"),
    ),
    (
        "user-data.example.toml.tera",
        include_str!("../../templates/user-data.example.toml.tera"),
    ),
];

/// A file staged on the machine: `name` under the staging folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedFile {
    pub name: String,
    pub mode: u32,
    pub content: Vec<u8>,
}

impl StagedFile {
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.content))
    }
}

/// Everything a bake puts on the machine and runs there.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Staged files, the init binary first.
    pub files: Vec<StagedFile>,
    pub provision: String,
    pub generalize: String,
}

/// What a render needs besides the definition.
pub struct RenderInputs<'a> {
    pub templates: Option<&'a Path>,
    /// The static stackless-init binary.
    pub init_binary: &'a [u8],
    /// The salt-bootstrap script for `onedir` images.
    pub bootstrap: Option<&'a [u8]>,
    pub build_id: &'a str,
    /// Local builds add the host's CA bundle and remove it when generalising.
    pub build_ca: bool,
}

#[derive(Serialize)]
struct TemplateContext<'a> {
    image: &'a ImageDef,
    build_id: &'a str,
    stage: &'static str,
    init_sha256: String,
    bootstrap_sha256: String,
    build_ca: bool,
}

fn engine(templates: Option<&Path>) -> Result<tera::Tera> {
    let mut tera = tera::Tera::default();
    for (name, builtin) in BUILTIN {
        let text = match templates.map(|d| d.join(name)) {
            Some(p) if p.exists() => {
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?
            }
            _ => builtin.to_string(),
        };
        tera.add_raw_template(name, &text)
            .map_err(|e| anyhow::anyhow!("template {name}: {}", tera_error(&e)))?;
    }
    Ok(tera)
}

/// Tera hides the useful part of an error in its sources.
fn tera_error(e: &tera::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

pub fn render(def: &ImageDef, inputs: &RenderInputs) -> Result<Rendered> {
    let tera = engine(inputs.templates)?;
    if def.salt == crate::definition::SaltBake::Onedir && inputs.bootstrap.is_none() {
        bail!(
            "{}: salt = \"onedir\" needs the salt-bootstrap script",
            def.image
        );
    }
    let ctx = TemplateContext {
        image: def,
        build_id: inputs.build_id,
        stage: STAGE,
        init_sha256: hex::encode(Sha256::digest(inputs.init_binary)),
        bootstrap_sha256: inputs
            .bootstrap
            .map(|b| hex::encode(Sha256::digest(b)))
            .unwrap_or_default(),
        build_ca: inputs.build_ca,
    };
    let mut tctx = tera::Context::from_serialize(&ctx).context("building the template context")?;
    let one = |name: &str, tctx: &tera::Context| -> Result<String> {
        tera.render(name, tctx)
            .map_err(|e| anyhow::anyhow!("rendering {name} for {}: {}", def.image, tera_error(&e)))
    };
    let mut files = vec![
        StagedFile {
            name: "stackless-init".into(),
            mode: 0o755,
            content: inputs.init_binary.to_vec(),
        },
        StagedFile {
            name: "stackless-init.service".into(),
            mode: 0o644,
            content: one("stackless-init.service.tera", &tctx)?.into_bytes(),
        },
        StagedFile {
            name: "init.toml".into(),
            mode: 0o644,
            content: one("init.toml.tera", &tctx)?.into_bytes(),
        },
        StagedFile {
            name: "minion".into(),
            mode: 0o644,
            content: one("minion.tera", &tctx)?.into_bytes(),
        },
        StagedFile {
            name: "user-data.example.toml".into(),
            mode: 0o644,
            content: one("user-data.example.toml.tera", &tctx)?.into_bytes(),
        },
    ];
    if def.supervisor {
        files.push(StagedFile {
            name: "supervisord.conf".into(),
            mode: 0o644,
            content: one("supervisord.conf.tera", &tctx)?.into_bytes(),
        });
        files.push(StagedFile {
            name: "supervisor.service".into(),
            mode: 0o644,
            content: one("supervisor.service.tera", &tctx)?.into_bytes(),
        });
        for (name, program) in &def.programs {
            tctx.insert("name", name);
            tctx.insert("program", program);
            files.push(StagedFile {
                name: format!("program-{name}.conf"),
                mode: 0o644,
                content: one("program.conf.tera", &tctx)?.into_bytes(),
            });
        }
    }
    if let (Some(b), crate::definition::SaltBake::Onedir) = (inputs.bootstrap, def.salt) {
        files.push(StagedFile {
            name: "bootstrap-salt.sh".into(),
            mode: 0o755,
            content: b.to_vec(),
        });
    }
    let provision = one("provision.sh.tera", &tctx)?;
    let generalize = one("generalize.sh.tera", &tctx)?;
    // The rendered defaults must be what the agent accepts.
    let init_toml = String::from_utf8_lossy(&files[2].content).into_owned();
    stackless_init::userdata::parse("init.toml", &init_toml)
        .map_err(|e| anyhow::anyhow!("rendered init.toml: {e}"))?;
    Ok(Rendered {
        files,
        provision,
        generalize,
    })
}

/// `bash -n` on a script: a syntax error fails validation before any machine starts.
pub fn check_shell(name: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("bash")
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running bash -n")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{name} does not pass `bash -n`: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace("bash: ", "")
        );
    }
    Ok(())
}

/// Writes what a bake would stage and run into `out`, for review.
pub fn write_out(r: &Rendered, out: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut all: Vec<(String, u32, &[u8])> = r
        .files
        .iter()
        .map(|f| (f.name.clone(), f.mode, f.content.as_slice()))
        .collect();
    all.push(("provision.sh".into(), 0o755, r.provision.as_bytes()));
    all.push(("generalize.sh".into(), 0o755, r.generalize.as_bytes()));
    for (name, mode, content) in all {
        let p = out.join(name);
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
