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
    (
        "seed-user-data.sh.tera",
        include_str!("../../templates/seed-user-data.sh.tera"),
    ),
    (
        SSM_AGENT_KEY,
        include_str!("../../templates/ssm-agent-key.asc"),
    ),
];

/// The template file holding the public key the SSM agent's signature is checked against.
pub const SSM_AGENT_KEY: &str = "ssm-agent-key.asc";

/// EC2 takes at most 16 KB of user-data.
pub const USER_DATA_LIMIT: usize = 16 * 1024;

/// The line the seed's user-data prints on the console when it fails; the builder looks for it.
pub const SEED_FAILURE_PREFIX: &str = "stackless-seed: FAILED:";

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
    /// The AWS seed's user-data: the lease first, then the SSM agent's install where the image
    /// has none (`sh`, run by cloud-init).
    pub seed_user_data: String,
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
    /// The SSM agent's signing key, unarmored and base64 (what `base64 -d` turns into a keyring).
    ssm_agent_key: String,
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
    let key_text = tera
        .render(SSM_AGENT_KEY, &tera::Context::new())
        .map_err(|e| anyhow::anyhow!("reading {SSM_AGENT_KEY}: {}", tera_error(&e)))?;
    let ssm_agent_key = public_key_base64(&key_text).with_context(|| {
        format!(
            "{SSM_AGENT_KEY} (the key the seed checks the SSM agent's signature with; AWS's is in the \
             builder's templates/{SSM_AGENT_KEY})"
        )
    })?;
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
        ssm_agent_key,
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
    let seed_user_data = format!(
        "{}{}",
        crate::platform::aws::instance::lease_user_data(def.lease_minutes),
        one("seed-user-data.sh.tera", &tctx)?
    );
    if seed_user_data.len() > USER_DATA_LIMIT {
        bail!(
            "{}: the seed's user-data is {} bytes; EC2 takes at most {USER_DATA_LIMIT} (seed-user-data.sh.tera)",
            def.image,
            seed_user_data.len()
        );
    }
    // The rendered defaults must be what the agent accepts.
    let init_toml = String::from_utf8_lossy(&files[2].content).into_owned();
    stackless_init::userdata::parse("init.toml", &init_toml)
        .map_err(|e| anyhow::anyhow!("rendered init.toml: {e}"))?;
    Ok(Rendered {
        files,
        provision,
        generalize,
        seed_user_data,
    })
}

/// The body of an ASCII-armored OpenPGP public key, checked (armor, CRC-24 checksum, a public key
/// packet first) and returned as base64 lines. Text before the BEGIN line is ignored (comments).
pub fn public_key_base64(armored: &str) -> Result<String> {
    use base64::Engine;
    const BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
    const END: &str = "-----END PGP PUBLIC KEY BLOCK-----";
    let mut lines = armored.lines().map(str::trim_end);
    if !lines.any(|l| l == BEGIN) {
        bail!("no `{BEGIN}` line: not an armored OpenPGP public key");
    }
    // Armor headers (`Version: ...`) up to the first blank line.
    let mut lines = lines.skip_while(|l| !l.is_empty()).skip(1);
    let mut body = Vec::new();
    let mut crc = None;
    let mut ended = false;
    for l in lines.by_ref() {
        if l == END {
            ended = true;
            break;
        }
        if let Some(c) = l.strip_prefix('=') {
            crc = Some(c.to_string());
        } else if !l.is_empty() {
            body.push(l.to_string());
        }
    }
    if !ended {
        bail!("no `{END}` line");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes = b64
        .decode(body.concat())
        .context("the key's body is not base64")?;
    if let Some(c) = crc {
        let want = b64
            .decode(&c)
            .context("the key's checksum line is not base64")?;
        let got = crc24(&bytes).to_be_bytes();
        if want.as_slice() != &got[1..] {
            bail!("the key's checksum does not match its body: the key is damaged");
        }
    }
    // A public key packet: old format tag 6 (0x98..0x9b) or new format (0xc6).
    match bytes.first() {
        Some(0x98..=0x9b | 0xc6) => {}
        _ => bail!("the block does not start with a public key packet"),
    }
    Ok(body.join("\n"))
}

/// OpenPGP's armor checksum (RFC 4880, 6.1).
fn crc24(data: &[u8]) -> u32 {
    let mut crc: u32 = 0xB7_04CE;
    for b in data {
        crc ^= u32::from(*b) << 16;
        for _ in 0..8 {
            crc <<= 1;
            if crc & 0x100_0000 != 0 {
                crc ^= 0x186_4CFB;
            }
        }
    }
    crc & 0xFF_FFFF
}

/// `sh -n` (dash on Debian) on a POSIX sh script.
pub fn check_sh(name: &str, script: &str) -> Result<()> {
    syntax_check("sh", name, script)
}

/// Checks the seed's user-data: `sh -n` clean, and the lease is its first command (a failure in
/// anything after it must not leave the seed running).
pub fn check_seed_user_data(name: &str, script: &str, lease_minutes: i64) -> Result<()> {
    check_sh(name, script)?;
    let first = script
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    let lease = format!("shutdown -h +{lease_minutes}");
    if !script.starts_with("#!/bin/sh\n") || first != Some(lease.as_str()) {
        bail!(
            "{name}: the lease (`{lease}`) must be the first command after `#!/bin/sh`; found {:?}",
            first.unwrap_or("nothing")
        );
    }
    Ok(())
}

/// `bash -n` on a script: a syntax error fails validation before any machine starts.
pub fn check_shell(name: &str, script: &str) -> Result<()> {
    syntax_check("bash", name, script)
}

fn syntax_check(shell: &str, name: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new(shell)
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {shell} -n"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{name} does not pass `{shell} -n`: {}",
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .replace(&format!("{shell}: "), "")
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
    all.push((
        "seed-user-data.sh".into(),
        0o644,
        r.seed_user_data.as_bytes(),
    ));
    for (name, mode, content) in all {
        let p = out.join(name);
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
