//! Image definitions: `images/NAME.toml`, strict, with `extends` (a `preseeded` image extends
//! `bare`). Each file is parsed on its own so every error names its file, line and column; the
//! chain is then merged field by field, the child winning.

use crate::arch::Arch;
use serde::{Deserialize, Serialize};
use stackless_init::userdata::{self, Document};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// A problem in a definition, located where possible: the same located error the agent uses
/// for user-data.
pub type DefinitionError = userdata::UserDataError;

/// One definition file as written; every field optional so a child can override a parent.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFile {
    /// Another definition in the same folder to start from.
    pub extends: Option<Spanned<String>>,
    /// Image name template: `{image}`, `{build_id}`, `{timestamp}` (UTC, `YYYYMMDDhhmmss`).
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    #[serde(default)]
    pub source: Option<SourceFile>,
    #[serde(default)]
    pub instance: Option<InstanceFile>,
    #[serde(default)]
    pub provision: Option<ProvisionFile>,
    /// supervisord programs baked into the image.
    #[serde(default)]
    pub programs: Option<BTreeMap<String, ProgramDef>>,
    /// Image defaults, written to `/etc/stackless/init.toml`: the user-data schema.
    pub defaults: Option<toml::Table>,
    #[serde(default)]
    pub publish: Option<PublishFile>,
    #[serde(default)]
    pub local: Option<LocalFile>,
    pub tags: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// An AMI id.
    pub ami: Option<Spanned<String>>,
    /// Owner account (or alias such as `amazon`) plus a name pattern; the newest match wins.
    pub owner: Option<String>,
    pub name: Option<String>,
    /// An SSM parameter holding an AMI id, such as the public Debian and Amazon Linux ones.
    pub ssm_parameter: Option<String>,
    pub architecture: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceFile {
    #[serde(rename = "type")]
    pub instance_type: Option<String>,
    /// The architecture the image is for, as EC2 names it: `x86_64` or `arm64`. Optional: the
    /// bake reads the source image's architecture and refuses a different one here.
    pub arch: Option<Spanned<String>>,
    pub subnet: Option<String>,
    pub instance_profile: Option<String>,
    pub volume_size: Option<Spanned<i64>>,
    pub volume_type: Option<Spanned<String>>,
    /// The seed instance shuts itself down (and so terminates) after this, whatever happens.
    pub lease_minutes: Option<Spanned<i64>>,
    /// How long the seed's SSM agent may take to come online, like `15m`.
    pub ssm_timeout: Option<Spanned<String>>,
    /// Where the seed downloads the SSM agent when its image has none: the folder holding
    /// `debian_amd64/amazon-ssm-agent.deb` and the rest; `{region}` is the seed's region.
    pub ssm_agent_url: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionFile {
    pub packages: Option<Vec<String>>,
    /// How salt gets onto the image: `none` (installed at first boot by the agent's method in
    /// `defaults`), `pip` or `onedir`.
    pub salt: Option<Spanned<String>>,
    pub salt_version: Option<String>,
    /// Install supervisord (from the distribution's packages).
    pub supervisor: Option<bool>,
    /// Deadline of the provisioning script, like `30m`.
    pub timeout: Option<Spanned<String>>,
    /// Extra shell run at the end of provisioning.
    pub script: Option<String>,
    /// Keep the SSM agent the seed's user-data installed (for images without one) in the image.
    pub keep_ssm_agent: Option<bool>,
    /// Object stores filled at bake time (`salt`, `config`): the first boot then fetches only
    /// what is newer than the image (`stackless-init seed`). Public repositories only.
    pub seed: Option<BTreeMap<String, SeedFile>>,
}

/// `[provision.seed.salt]` or `[provision.seed.config]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SeedFile {
    pub repo: Spanned<String>,
    #[serde(rename = "ref")]
    pub reference: Option<Spanned<String>>,
}

/// A repository whose objects the image carries.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Seed {
    /// `salt` or `config`.
    pub name: String,
    pub repo: String,
    pub reference: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProgramDef {
    pub command: String,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub directory: Option<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub autostart: Option<bool>,
    #[serde(default)]
    pub startsecs: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PublishFile {
    pub regions: Option<Vec<String>>,
    pub accounts: Option<Vec<String>>,
    pub encrypted: Option<bool>,
    pub kms_key: Option<String>,
    /// Deprecate the image this long after creation, like `365d`.
    pub deprecate_after: Option<Spanned<String>>,
    /// SSM parameter that receives the new id (`aws:ec2:image` data type).
    pub ssm_parameter: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalFile {
    /// Debian release debootstrap installs.
    pub release: Option<String>,
    pub mirror: Option<String>,
    /// Disk size, like `4G`.
    pub disk_size: Option<String>,
}

/// Where the seed image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Ami(String),
    Search {
        owner: String,
        name: String,
        architecture: String,
    },
    Parameter(String),
}

/// How salt is put on the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SaltBake {
    None,
    Pip,
    Onedir,
}

/// A resolved definition: the whole `extends` chain merged and checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageDef {
    /// The definition's name (its file stem).
    pub image: String,
    /// The files it came from, parent first.
    pub files: Vec<PathBuf>,
    pub name_template: String,
    pub description: String,
    pub source: Source,
    /// `[instance] arch`, when the definition says it (the source image's architecture decides
    /// otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<Arch>,
    pub instance_type: String,
    pub subnet: Option<String>,
    pub instance_profile: Option<String>,
    pub volume_size: i64,
    pub volume_type: String,
    pub lease_minutes: i64,
    /// How long the seed's SSM agent may take to come online.
    pub ssm_wait: Option<std::time::Duration>,
    /// Where the seed downloads the SSM agent when its image has none (`{region}` filled in).
    pub ssm_agent_url: String,
    /// Keep that agent in the image (by default generalising removes it).
    pub keep_ssm_agent: bool,
    pub packages: Vec<String>,
    pub salt: SaltBake,
    pub salt_version: String,
    pub supervisor: bool,
    pub provision_timeout: std::time::Duration,
    pub provision_script: Option<String>,
    /// Object stores filled at bake time.
    pub seeds: Vec<Seed>,
    pub programs: BTreeMap<String, ProgramDef>,
    /// The image defaults as TOML text (valid user-data).
    pub defaults_toml: String,
    pub regions: Vec<String>,
    pub accounts: Vec<String>,
    pub encrypted: bool,
    pub kms_key: Option<String>,
    pub deprecate_after: Option<std::time::Duration>,
    pub ssm_parameter: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub local_release: String,
    pub local_mirror: String,
    pub local_disk_size: String,
}

/// AWS's regional download of the SSM agent (`{region}` is the seed's region).
pub const SSM_AGENT_URL: &str = "https://s3.{region}.amazonaws.com/amazon-ssm-{region}/latest";

const VOLUME_TYPES: [&str; 5] = ["gp3", "gp2", "io1", "io2", "standard"];

/// A parsed file with its text, for locating later problems.
struct Parsed {
    file: String,
    text: String,
    data: ImageFile,
}

impl Parsed {
    fn err(&self, offset: usize, message: impl Into<String>) -> DefinitionError {
        DefinitionError::at(&self.file, &self.text, offset, message)
    }
}

fn parse_file(path: &Path) -> Result<Parsed, DefinitionError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| DefinitionError::whole(&file, format!("cannot read the definition: {e}")))?;
    let data: ImageFile =
        toml::from_str(&text).map_err(|e| DefinitionError::from_toml(&file, &text, &e))?;
    let p = Parsed { file, text, data };
    check_file(&p)?;
    Ok(p)
}

/// A seed is `salt` or `config`, from a URL the provisioning script can quote and that holds no
/// credentials (a baked secret would be in every snapshot), at a ref git accepts.
fn check_seed(p: &Parsed, name: &str, seed: &SeedFile) -> Result<(), DefinitionError> {
    let repo = &seed.repo;
    if !["salt", "config"].contains(&name) {
        return Err(p.err(
            repo.span().start,
            format!("[provision.seed.{name}]: the repositories are `salt` and `config`"),
        ));
    }
    let url = repo.get_ref();
    if stackless_init::userdata::credentials::credentials_in_url(url).is_some() {
        return Err(p.err(
            repo.span().start,
            "the seed URL has credentials in it: they would be baked into every image; \
             seed from a public URL (private repositories get their credentials from SSM at boot)",
        ));
    }
    let scheme = ["https://", "http://", "git://", "file://"]
        .iter()
        .any(|s| url.starts_with(s));
    if !scheme
        || url
            .chars()
            .any(|c| c.is_whitespace() || "'\\\"`$".contains(c))
    {
        return Err(p.err(
            repo.span().start,
            "repo must be an https://, http://, git:// or file:// URL without spaces, quotes, `$` or backslashes",
        ));
    }
    if let Some(r) = &seed.reference {
        let v = r.get_ref();
        let bad = |c: char| c.is_whitespace() || c.is_control() || "*?[\\~^:'\"`$".contains(c);
        if v.is_empty() || v.starts_with('-') || v.contains("..") || v.chars().any(bad) {
            return Err(p.err(
                r.span().start,
                "ref must be a branch, a tag or a full commit sha",
            ));
        }
    }
    Ok(())
}

/// Checks that need only one file.
fn check_file(p: &Parsed) -> Result<(), DefinitionError> {
    let d = &p.data;
    if let Some(i) = &d.instance {
        if let Some(v) = &i.arch {
            if Arch::from_ec2(v.get_ref()).is_none() {
                return Err(p.err(
                    v.span().start,
                    format!(
                        "arch must be `x86_64` or `arm64` (EC2's names), not `{}`",
                        v.get_ref()
                    ),
                ));
            }
        }
        if let Some(v) = &i.volume_size {
            if !(1..=16384).contains(v.get_ref()) {
                return Err(p.err(v.span().start, "volume_size is in GiB, 1 to 16384"));
            }
        }
        if let Some(v) = &i.volume_type {
            if !VOLUME_TYPES.contains(&v.get_ref().as_str()) {
                return Err(p.err(
                    v.span().start,
                    format!("volume_type must be one of {}", VOLUME_TYPES.join(", ")),
                ));
            }
        }
        if let Some(v) = &i.lease_minutes {
            if !(10..=1440).contains(v.get_ref()) {
                return Err(p.err(v.span().start, "lease_minutes must be 10 to 1440"));
            }
        }
        if let Some(v) = &i.ssm_timeout {
            duration(p, v)?;
        }
        if let Some(v) = &i.ssm_agent_url {
            let u = v.get_ref();
            let scheme = u.starts_with("https://") || u.starts_with("http://");
            if !scheme
                || u.len() < 10
                || u.chars()
                    .any(|c| c.is_whitespace() || "'\\\"`$".contains(c))
            {
                return Err(p.err(
                    v.span().start,
                    "ssm_agent_url must be an http:// or https:// URL without spaces, quotes, `$` or backslashes",
                ));
            }
        }
    }
    if let Some(pr) = &d.provision {
        if let Some(s) = &pr.salt {
            if !["none", "pip", "onedir"].contains(&s.get_ref().as_str()) {
                return Err(p.err(s.span().start, "salt must be `none`, `pip` or `onedir`"));
            }
        }
        if let Some(t) = &pr.timeout {
            duration(p, t)?;
        }
        for (name, seed) in pr.seed.iter().flatten() {
            check_seed(p, name, seed)?;
        }
        for pkg in pr.packages.iter().flatten() {
            if pkg.is_empty()
                || !pkg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.:=_~".contains(c))
            {
                return Err(DefinitionError::whole(
                    &p.file,
                    format!("package name `{pkg}` is not a package name"),
                ));
            }
        }
    }
    if let Some(pb) = &d.publish {
        if let Some(t) = &pb.deprecate_after {
            duration(p, t)?;
        }
        for a in pb.accounts.iter().flatten() {
            if a.len() != 12 || !a.chars().all(|c| c.is_ascii_digit()) {
                return Err(DefinitionError::whole(
                    &p.file,
                    format!("account `{a}` is not a 12-digit AWS account id"),
                ));
            }
        }
    }
    if let Some(name) = &d.name {
        for part in name.get_ref().split('{').skip(1) {
            let key = part.split('}').next().unwrap_or("");
            if !["image", "build_id", "timestamp"].contains(&key) {
                return Err(p.err(name.span().start, format!("unknown placeholder `{{{key}}}` in name; use {{image}} {{build_id}} {{timestamp}}")));
            }
        }
    }
    if let Some(src) = &d.source {
        let n = [
            src.ami.is_some(),
            src.ssm_parameter.is_some(),
            src.owner.is_some() || src.name.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if n > 1 {
            return Err(DefinitionError::whole(
                &p.file,
                "[source] takes one of: ami, ssm_parameter, or owner plus name",
            ));
        }
        if let Some(ami) = &src.ami {
            if !ami.get_ref().starts_with("ami-") {
                return Err(p.err(ami.span().start, "ami must look like ami-0123456789abcdef0"));
            }
        }
    }
    if let Some(defaults) = &d.defaults {
        // The image defaults are user-data: checked with the agent's own types, located at the
        // first `[defaults` header or key.
        let text = toml::to_string(defaults).unwrap_or_default();
        if let Err(e) = userdata::parse("defaults", &text) {
            let at = p
                .text
                .find("[defaults")
                .or_else(|| p.text.find("defaults"))
                .unwrap_or(0);
            return Err(p.err(
                at,
                format!("[defaults] is not valid stackless user-data: {}", e.message),
            ));
        }
    }
    Ok(())
}

fn duration(p: &Parsed, v: &Spanned<String>) -> Result<std::time::Duration, DefinitionError> {
    humantime::parse_duration(v.get_ref()).map_err(|e| {
        p.err(
            v.span().start,
            format!("bad duration `{}`: {e}", v.get_ref()),
        )
    })
}

/// Loads `DIR/IMAGE.toml` and its `extends` chain.
pub fn load(dir: &Path, image: &str) -> Result<ImageDef, DefinitionError> {
    let mut chain: Vec<Parsed> = Vec::new();
    let mut next = Some(image.to_string());
    while let Some(name) = next.take() {
        let path = dir.join(format!("{name}.toml"));
        if !path.exists() {
            return Err(match chain.last() {
                None => DefinitionError::whole(
                    &path.display().to_string(),
                    format!(
                        "no image definition `{name}` (looked for {})",
                        path.display()
                    ),
                ),
                Some(child) => {
                    let ext = child.data.extends.as_ref().expect("extends set");
                    child.err(
                        ext.span().start,
                        format!("extends `{name}`, but {} does not exist", path.display()),
                    )
                }
            });
        }
        if chain.iter().any(|p| Path::new(&p.file) == path) {
            let child = chain.last().expect("a child");
            let ext = child.data.extends.as_ref().expect("extends set");
            return Err(child.err(
                ext.span().start,
                format!("extends `{name}`, which extends back: a cycle"),
            ));
        }
        let parsed = parse_file(&path)?;
        next = parsed.data.extends.as_ref().map(|e| e.get_ref().clone());
        chain.push(parsed);
    }
    chain.reverse(); // parent first
    resolve(image, &chain)
}

fn resolve(image: &str, chain: &[Parsed]) -> Result<ImageDef, DefinitionError> {
    // Last writer wins, parent first.
    macro_rules! pick {
        ($($f:tt)+) => {{
            let mut v = None;
            for p in chain {
                #[allow(clippy::needless_question_mark)]
                let found = (|| -> Option<_> { Some(p.data.$($f)+.clone()?) })();
                if let Some(x) = found {
                    v = Some(x);
                }
            }
            v
        }};
    }
    let child = chain.last().expect("at least one file");
    let leaf = &child.file;
    let arch = pick!(instance.as_ref()?.arch).and_then(|a| Arch::from_ec2(a.get_ref()));

    let source = {
        let mut src = None;
        for p in chain {
            if let Some(s) = &p.data.source {
                if s != &SourceFile::default() {
                    src = Some(s.clone());
                }
            }
        }
        let s = src.ok_or_else(|| {
            DefinitionError::whole(
                leaf,
                "[source] is missing: give ami, ssm_parameter, or owner plus name",
            )
        })?;
        if let Some(ami) = s.ami {
            Source::Ami(ami.into_inner())
        } else if let Some(param) = s.ssm_parameter {
            Source::Parameter(param)
        } else {
            match (s.owner, s.name) {
                (Some(owner), Some(name)) => {
                    let architecture = match (s.architecture, arch) {
                        (Some(a), Some(want)) if a != want.ec2() => {
                            return Err(DefinitionError::whole(
                                leaf,
                                format!("[source] architecture `{a}` and [instance] arch `{want}` differ: the image is one or the other"),
                            ))
                        }
                        (Some(a), _) => a,
                        (None, Some(want)) => want.ec2().to_string(),
                        (None, None) => "x86_64".into(),
                    };
                    Source::Search {
                        owner,
                        name,
                        architecture,
                    }
                }
                _ => {
                    return Err(DefinitionError::whole(
                        leaf,
                        "[source] owner and name go together",
                    ))
                }
            }
        }
    };

    let mut tags = BTreeMap::new();
    let mut programs = BTreeMap::new();
    let mut defaults = toml::Table::new();
    for p in chain {
        tags.extend(p.data.tags.clone().unwrap_or_default());
        programs.extend(p.data.programs.clone().unwrap_or_default());
        if let Some(d) = &p.data.defaults {
            merge_tables(&mut defaults, d);
        }
    }
    let defaults_toml = toml::to_string(&defaults).unwrap_or_default();
    // The merged defaults must still be valid user-data.
    userdata::parse("defaults", &defaults_toml)
        .map_err(|e| DefinitionError::whole(leaf, format!("merged [defaults]: {e}")))?;
    for (name, prog) in &programs {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(DefinitionError::whole(
                leaf,
                format!("program name `{name}` may use only A-Z a-z 0-9 - _ ."),
            ));
        }
        if prog.command.trim().is_empty() {
            return Err(DefinitionError::whole(
                leaf,
                format!("program `{name}` has an empty command"),
            ));
        }
        let one_line = |s: &str| !s.contains('\n') && !s.contains('\r');
        let fields = [
            Some(&prog.command),
            prog.user.as_ref(),
            prog.directory.as_ref(),
        ];
        if !fields.iter().flatten().all(|s| one_line(s))
            || !prog
                .environment
                .iter()
                .all(|(k, v)| one_line(k) && one_line(v) && !v.contains('"') && !k.contains('='))
        {
            return Err(DefinitionError::whole(
                leaf,
                format!("program `{name}`: values must be one line, and environment values may not hold `\"`"),
            ));
        }
    }

    let parse_d =
        |v: Option<Spanned<String>>| v.and_then(|s| humantime::parse_duration(s.get_ref()).ok());
    let salt_version = pick!(provision.as_ref()?.salt_version)
        .unwrap_or_else(|| stackless_init::salt::install::DEFAULT_SALT_VERSION.to_string());
    if salt_version.is_empty()
        || !salt_version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+-".contains(c))
    {
        return Err(DefinitionError::whole(
            leaf,
            format!("salt_version `{salt_version}` is not a version (like 3008.4)"),
        ));
    }
    let seeds: Vec<Seed> = pick!(provision.as_ref()?.seed)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, s)| Seed {
            name,
            repo: s.repo.into_inner(),
            reference: s
                .reference
                .map(|r| r.into_inner())
                .unwrap_or_else(|| "main".into()),
        })
        .collect();
    let packages: Vec<String> = pick!(provision.as_ref()?.packages).unwrap_or_default();
    if !seeds.is_empty() && !packages.iter().any(|p| p == "git") {
        return Err(DefinitionError::whole(
            leaf,
            "[provision.seed] fetches with git at bake time: add `git` to [provision] packages",
        ));
    }
    let salt = match pick!(provision.as_ref()?.salt)
        .map(|s| s.into_inner())
        .as_deref()
    {
        Some("pip") => SaltBake::Pip,
        Some("onedir") => SaltBake::Onedir,
        _ => SaltBake::None,
    };
    Ok(ImageDef {
        image: image.to_string(),
        files: chain.iter().map(|p| PathBuf::from(&p.file)).collect(),
        name_template: pick!(name)
            .map(|s| s.into_inner())
            .unwrap_or_else(|| "stackless-{image}-{timestamp}".into()),
        description: pick!(description).unwrap_or_else(|| format!("stackless {image} image")),
        source,
        arch,
        instance_type: pick!(instance.as_ref()?.instance_type).unwrap_or_else(|| "t3.small".into()),
        subnet: pick!(instance.as_ref()?.subnet),
        instance_profile: pick!(instance.as_ref()?.instance_profile),
        volume_size: pick!(instance.as_ref()?.volume_size)
            .map(|s| s.into_inner())
            .unwrap_or(8),
        volume_type: pick!(instance.as_ref()?.volume_type)
            .map(|s| s.into_inner())
            .unwrap_or_else(|| "gp3".into()),
        lease_minutes: pick!(instance.as_ref()?.lease_minutes)
            .map(|s| s.into_inner())
            .unwrap_or(120),
        ssm_wait: parse_d(pick!(instance.as_ref()?.ssm_timeout)),
        ssm_agent_url: pick!(instance.as_ref()?.ssm_agent_url)
            .map(|s| s.into_inner().trim_end_matches('/').to_string())
            .unwrap_or_else(|| SSM_AGENT_URL.into()),
        keep_ssm_agent: pick!(provision.as_ref()?.keep_ssm_agent).unwrap_or(false),
        packages,
        salt,
        salt_version,
        supervisor: pick!(provision.as_ref()?.supervisor).unwrap_or(true),
        provision_timeout: parse_d(pick!(provision.as_ref()?.timeout))
            .unwrap_or(std::time::Duration::from_secs(30 * 60)),
        provision_script: pick!(provision.as_ref()?.script),
        seeds,
        programs,
        defaults_toml,
        regions: pick!(publish.as_ref()?.regions).unwrap_or_default(),
        accounts: pick!(publish.as_ref()?.accounts).unwrap_or_default(),
        encrypted: pick!(publish.as_ref()?.encrypted).unwrap_or(false),
        kms_key: pick!(publish.as_ref()?.kms_key),
        deprecate_after: parse_d(pick!(publish.as_ref()?.deprecate_after)),
        ssm_parameter: pick!(publish.as_ref()?.ssm_parameter),
        tags,
        local_release: pick!(local.as_ref()?.release).unwrap_or_else(|| "bookworm".into()),
        local_mirror: pick!(local.as_ref()?.mirror)
            .unwrap_or_else(|| "http://deb.debian.org/debian".into()),
        local_disk_size: pick!(local.as_ref()?.disk_size).unwrap_or_else(|| "4G".into()),
    })
}

/// Deep merge: tables merge key by key, everything else is replaced.
fn merge_tables(into: &mut toml::Table, from: &toml::Table) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge_tables(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The names of all definitions in a folder.
pub fn list(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names)
}

impl ImageDef {
    /// The image name for a build.
    pub fn image_name(&self, build_id: &str, timestamp: &str) -> String {
        self.name_template
            .replace("{image}", &self.image)
            .replace("{build_id}", build_id)
            .replace("{timestamp}", timestamp)
    }

    /// The defaults as a parsed document (for the agent's types).
    pub fn defaults_document(&self) -> Document {
        userdata::parse("defaults", &self.defaults_toml).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
