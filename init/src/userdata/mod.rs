//! The user-data schema, shared with the builder: parsing, validation and merging over the
//! image defaults (`/etc/stackless/init.toml`, the same schema).
//!
//! Everything is checked before anything is applied, and every problem names its file, line and
//! column. The builder validates and renders user-data with these very types, so the two
//! programs can never disagree about the format.

pub mod credentials;
mod error;
pub mod pem;
pub mod placeholders;
pub mod schedule;
pub mod specs;

pub use credentials::{CredentialsSection, KnownHosts, RepoCredentials};
pub use error::{line_column, UserDataError};
pub use schedule::Schedule;
pub use specs::{InstallMethod, InstallSpec, RepoSpec};

use crate::imds::Identity;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

/// EC2 refuses user-data over 16 KB (before base64); the builder enforces it.
pub const EC2_USER_DATA_LIMIT: usize = 16 * 1024;
/// Gzip bombs stop here.
const MAX_DECOMPRESSED: u64 = 1024 * 1024;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// One user-data or defaults document, as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserData {
    /// Template of the salt minion id; placeholders allowed. Default `{instance_id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minion_id: Option<Spanned<String>>,
    /// Salt grains; string values may use placeholders.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub grains: BTreeMap<String, Spanned<toml::Value>>,
    /// Extra certificate authorities to trust (one or more PEM certificates), installed into
    /// the system trust store before salt is installed or a repository is fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt: Option<SaltSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<RepoSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<SupervisorSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watcher: Option<WatcherSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportSection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<WatchRule>,
}

/// `[report]`: the tags the agent writes on its own instance (what `builder fleet` reads).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSection {
    /// Default true; false makes no EC2 call at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<Spanned<bool>>,
}

/// `[aws]`: how the agent reaches AWS (repository credentials from SSM, its report in EC2 tags).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSection {
    /// The SSM endpoint (a VPC endpoint, FIPS, a test server). `AWS_ENDPOINT_URL_SSM` and
    /// `AWS_ENDPOINT_URL` in the agent's environment win over it, as in the AWS SDKs.
    pub ssm_endpoint: Option<Spanned<String>>,
    /// The EC2 endpoint for the report's tags. `AWS_ENDPOINT_URL_EC2` and `AWS_ENDPOINT_URL`
    /// win over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ec2_endpoint: Option<Spanned<String>>,
}

/// `[timeouts]`: deadlines of the programs the agent runs. A program still running at its
/// deadline is killed with everything it started. (A highstate's is `[salt] timeout`.)
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    /// Each git command: ls-remote, fetch, checkout (default `5m`).
    pub git: Option<Spanned<String>>,
    /// Each step of installing salt: `python -m venv`, `pip install`, the salt-bootstrap
    /// download and its run (default `30m`).
    pub salt_install: Option<Spanned<String>>,
    /// `update-ca-certificates` or `update-ca-trust` (default `5m`).
    pub trust: Option<Spanned<String>>,
    /// Each `systemctl` call of a watch action (default `3m`: a restart waits for the unit).
    pub systemctl: Option<Spanned<String>>,
}

/// `[watcher]`: how changes are coalesced.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WatcherSection {
    /// Quiet window: act once no change arrived for this long (default `100ms`).
    pub quiet: Option<Spanned<String>>,
    /// Act at the latest this long after the first change of a burst (default `2s`).
    pub max_delay: Option<Spanned<String>>,
}

/// `[salt]`: the states repository and how salt itself gets onto the machine.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SaltSection {
    pub repo: Option<Spanned<String>>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// Folder of the states inside the repository (default: its root).
    pub states_dir: Option<Spanned<String>>,
    /// Folder of the pillar inside the repository (default `pillar`).
    pub pillar_dir: Option<Spanned<String>>,
    /// `pip`, `onedir` or `none`: how to install salt when the image lacks it.
    pub install: Option<InstallMethod>,
    /// Pinned salt version for `pip` and `onedir`.
    pub version: Option<String>,
    pub bootstrap_url: Option<String>,
    pub bootstrap_sha256: Option<String>,
    /// Explicit path of `salt-call`.
    pub salt_call: Option<PathBuf>,
    /// Deadline of one highstate, like `30m`.
    pub timeout: Option<Spanned<String>>,
    /// `[salt.credentials]`: the repository's secret, in SSM.
    pub credentials: Option<CredentialsSection>,
    /// What a failed highstate on a new commit does: `retry` (default) or `revert`.
    pub on_failure: Option<Spanned<String>>,
}

/// `[config]`: the application configuration repository.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepoSection {
    pub repo: Option<Spanned<String>>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// `[config.credentials]`: the repository's secret, in SSM.
    pub credentials: Option<CredentialsSection>,
    /// The group the programs run as, which may then read the releases (dirs 0750, files
    /// 0640). Without it, root alone reads them.
    pub group: Option<Spanned<String>>,
    /// What a release whose programs fail to start does: `revert` (default) or `keep`.
    pub on_failure: Option<Spanned<String>>,
    /// How long a restarted program must stay up past its `startsecs` for its release to be
    /// good (default `5s`).
    pub grace: Option<Spanned<String>>,
}

/// `[config] on_failure` (checked as a string: a located error names the choices).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigOnFailure {
    /// Flip `current` back to the last good release, act again, quarantine the commit.
    #[default]
    Revert,
    /// Leave the bad release published (the verdict is still recorded).
    Keep,
}

/// `[salt] on_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaltOnFailure {
    /// Keep the new states and retry the highstate with back-off.
    #[default]
    Retry,
    /// Re-apply the last good release's states and quarantine the commit.
    Revert,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HighstateMode {
    /// Only when the salt repository has a new commit (and at boot).
    #[default]
    OnChange,
    Always,
    Never,
}

/// `[sync]`: when to pull.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    pub schedule: Option<Spanned<String>>,
    pub splay: Option<Spanned<String>>,
    pub highstate: Option<HighstateMode>,
}

/// `[supervisor]`: how to reach supervisord.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSection {
    pub socket: Option<PathBuf>,
    /// Folder of program definitions; a change there re-reads and updates supervisord.
    pub conf_dir: Option<PathBuf>,
}

/// `[[watch]]`: restart programs when files change.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WatchRule {
    pub paths: Vec<Spanned<String>>,
    pub restart: Vec<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Spanned<String>>,
}

/// Signals a watch rule may send instead of restarting.
pub const SIGNALS: [&str; 7] = ["HUP", "USR1", "USR2", "INT", "QUIT", "TERM", "WINCH"];

/// A parsed and validated document together with where it came from, so later problems
/// (a rendered minion id that breaks the rules) can still point into it.
#[derive(Debug, Clone, Default)]
pub struct Document {
    pub file: String,
    pub text: String,
    pub data: UserData,
}

impl Document {
    fn error_at(&self, offset: usize, message: impl Into<String>) -> UserDataError {
        UserDataError::at(&self.file, &self.text, offset, message)
    }

    /// Byte offset of a character inside a spanned string value: exact for plain strings,
    /// the value's opening quote otherwise.
    fn offset_in(&self, value: &Spanned<String>, inner: usize) -> usize {
        let span = value.span();
        let raw = self.text.get(span.clone()).unwrap_or("");
        let quoted = raw.len() > 1 && (raw.starts_with('"') || raw.starts_with('\''));
        if quoted && raw[1..].starts_with(value.get_ref().as_str()) {
            span.start + 1 + inner
        } else {
            span.start
        }
    }

    /// Byte offset of a character inside a spanned multi-line value (`"""` or `'''`): found by
    /// looking for the value in the raw text, the value's opening quote when escapes hide it.
    fn offset_in_block(&self, value: &Spanned<String>, inner: usize) -> usize {
        let span = value.span();
        let raw = self.text.get(span.clone()).unwrap_or("");
        match raw.find(value.get_ref().as_str()) {
            Some(i) if !value.get_ref().is_empty() => span.start + i + inner,
            _ => span.start,
        }
    }
}

/// Turns raw user-data bytes into text: gunzips when the gzip magic is there, requires UTF-8.
pub fn decode(file: &str, bytes: &[u8]) -> Result<String, UserDataError> {
    let bytes = if bytes.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .take(MAX_DECOMPRESSED + 1)
            .read_to_end(&mut out)
            .map_err(|e| {
                UserDataError::whole(file, format!("gzip data could not be decompressed: {e}"))
            })?;
        if out.len() as u64 > MAX_DECOMPRESSED {
            return Err(UserDataError::whole(
                file,
                "decompressed user-data is over 1 MiB",
            ));
        }
        out
    } else {
        bytes.to_vec()
    };
    String::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_column(
            &String::from_utf8_lossy(&e.as_bytes()[..e.utf8_error().valid_up_to()]),
            usize::MAX,
        );
        UserDataError {
            file: file.into(),
            line,
            column,
            message: "user-data is not UTF-8 text".into(),
        }
    })
}

/// Parses and validates a document. A document of one line with no `=` is a minion id alone.
pub fn parse(file: &str, text: &str) -> Result<Document, UserDataError> {
    let trimmed = text.trim();
    let first = trimmed.lines().next().unwrap_or("");
    if first.starts_with("#cloud-config") || first.starts_with("#!") {
        return Err(UserDataError::at(
            file,
            text,
            text.find(first).unwrap_or(0),
            "this is a cloud-init document or a script, not stackless user-data (TOML)",
        ));
    }
    if !trimmed.is_empty()
        && !trimmed.contains('\n')
        && !trimmed.contains('=')
        && !trimmed.starts_with('[')
        && !trimmed.starts_with('#')
    {
        let start = text.find(trimmed).unwrap_or(0);
        // A JSON string is a TOML basic string once DEL is escaped too.
        let quoted = serde_json::Value::String(trimmed.to_string())
            .to_string()
            .replace('\u{7f}', "\\u007F");
        let wrapped = format!("minion_id = {quoted}");
        let mut doc = parse_toml(file, &wrapped)?;
        // Point positions at the original text: the id starts where the line does.
        doc.text = text.to_string();
        if let Some(id) = &doc.data.minion_id {
            let id = id.get_ref().clone();
            doc.data.minion_id = Some(Spanned::new(start..start + id.len(), id));
        }
        validate(&doc)?;
        return Ok(doc);
    }
    let doc = parse_toml(file, text)?;
    validate(&doc)?;
    Ok(doc)
}

fn parse_toml(file: &str, text: &str) -> Result<Document, UserDataError> {
    match toml::from_str::<UserData>(text) {
        Ok(data) => Ok(Document {
            file: file.into(),
            text: text.into(),
            data,
        }),
        Err(e) => Err(UserDataError::from_toml(file, text, &e)),
    }
}

fn validate(doc: &Document) -> Result<(), UserDataError> {
    let d = &doc.data;
    if let Some(id) = &d.minion_id {
        placeholders::check(id.get_ref())
            .map_err(|e| doc.error_at(doc.offset_in(id, e.offset), e.message))?;
        // Literal characters are checked now; rendered values are checked again at boot.
        let sample = placeholders::render(id.get_ref(), &Identity::example())
            .map_err(|e| doc.error_at(doc.offset_in(id, e.offset), e.message))?;
        check_minion_id(&sample).map_err(|m| doc.error_at(id.span().start, m))?;
    }
    for (name, value) in &d.grains {
        if let toml::Value::String(s) = value.get_ref() {
            let as_string = Spanned::new(value.span(), s.clone());
            placeholders::check(s).map_err(|e| {
                doc.error_at(
                    doc.offset_in(&as_string, e.offset),
                    format!("grain `{name}`: {}", e.message),
                )
            })?;
        }
    }
    if let Some(ca) = &d.ca_certificates {
        pem::split_certificates(ca.get_ref()).map_err(|e| {
            doc.error_at(
                doc.offset_in_block(ca, e.offset),
                format!("ca_certificates: {}", e.message),
            )
        })?;
    }
    if let Some(salt) = &d.salt {
        check_repo(
            doc,
            "salt",
            salt.repo.as_ref().map(|r| r.get_ref().as_str()),
            salt.reference.as_deref(),
        )?;
        credentials::validate(doc, "salt", salt.repo.as_ref(), salt.credentials.as_ref())?;
        for dir in [&salt.states_dir, &salt.pillar_dir].into_iter().flatten() {
            let p = std::path::Path::new(dir.get_ref());
            let escapes = p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir));
            if escapes {
                return Err(doc.error_at(
                    dir.span().start,
                    format!(
                        "`{}` must be a folder inside the repository (relative, no `..`)",
                        dir.get_ref()
                    ),
                ));
            }
        }
        check_choice(
            doc,
            salt.on_failure.as_ref(),
            "[salt] on_failure",
            &["retry", "revert"],
        )?;
        if let Some(t) = &salt.timeout {
            schedule::parse_bounded(t.get_ref(), "[salt] timeout", Duration::from_secs(86_400))
                .map_err(|m| doc.error_at(t.span().start, m))?;
        }
        if let Some(sum) = &salt.bootstrap_sha256 {
            if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(UserDataError::whole(
                    &doc.file,
                    "[salt] bootstrap_sha256 must be 64 hexadecimal characters",
                ));
            }
        }
    }
    if let Some(config) = &d.config {
        check_repo(
            doc,
            "config",
            config.repo.as_ref().map(|r| r.get_ref().as_str()),
            config.reference.as_deref(),
        )?;
        if let Some(g) = &config.group {
            let name = g.get_ref();
            let ok = !name.is_empty()
                && name.len() <= 32
                && !name.starts_with('-')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !ok {
                return Err(doc.error_at(
                    g.span().start,
                    format!("[config] group `{name}` is not a group name"),
                ));
            }
        }
        credentials::validate(
            doc,
            "config",
            config.repo.as_ref(),
            config.credentials.as_ref(),
        )?;
        check_choice(
            doc,
            config.on_failure.as_ref(),
            "[config] on_failure",
            &["revert", "keep"],
        )?;
        if let Some(g) = &config.grace {
            schedule::parse_bounded(g.get_ref(), "[config] grace", Duration::from_secs(600))
                .map_err(|m| doc.error_at(g.span().start, m))?;
        }
    }
    if let Some(sync) = &d.sync {
        if let Some(s) = &sync.schedule {
            Schedule::parse(s.get_ref()).map_err(|m| doc.error_at(s.span().start, m))?;
        }
        if let Some(s) = &sync.splay {
            schedule::parse_bounded(s.get_ref(), "splay", Duration::from_secs(86_400))
                .map_err(|m| doc.error_at(s.span().start, m))?;
        }
    }
    if let Some(w) = &d.watcher {
        for v in [&w.quiet, &w.max_delay].into_iter().flatten() {
            schedule::parse_bounded(v.get_ref(), "[watcher] window", Duration::from_secs(600))
                .map_err(|m| doc.error_at(v.span().start, m))?;
        }
    }
    if let Some(t) = &d.timeouts {
        for (v, key) in [
            (&t.git, "git"),
            (&t.salt_install, "salt_install"),
            (&t.trust, "trust"),
            (&t.systemctl, "systemctl"),
        ] {
            let Some(v) = v else { continue };
            let what = format!("[timeouts] {key}");
            let d = schedule::parse_bounded(v.get_ref(), &what, Duration::from_secs(86_400))
                .map_err(|m| doc.error_at(v.span().start, m))?;
            if d < Duration::from_secs(1) {
                return Err(doc.error_at(
                    v.span().start,
                    format!("{what} `{}` is shorter than 1s", v.get_ref()),
                ));
            }
        }
    }
    let endpoints = d.aws.as_ref().map_or([None, None], |a| {
        [
            a.ssm_endpoint.as_ref().map(|e| ("ssm", e)),
            a.ec2_endpoint.as_ref().map(|e| ("ec2", e)),
        ]
    });
    for (service, e) in endpoints.into_iter().flatten() {
        let v = e.get_ref();
        // Signed requests carry the role's session token: plain http only to this machine.
        let loopback = [
            "http://127.",
            "http://localhost:",
            "http://localhost/",
            "http://[::1]",
        ]
        .iter()
        .any(|p| v.starts_with(p));
        let ok = (v.starts_with("https://") || loopback)
            && credentials::credentials_in_url(v).is_none()
            && !v.contains(char::is_whitespace);
        if !ok {
            return Err(doc.error_at(
                e.span().start,
                format!(
                    "[aws] {service}_endpoint must be an https:// URL (http:// only on loopback) \
                     without credentials, such as \
                     https://vpce-0123-abcd.{service}.eu-west-1.vpce.amazonaws.com"
                ),
            ));
        }
    }
    validate_watch(doc, &d.watch)
}

fn validate_watch(doc: &Document, rules: &[WatchRule]) -> Result<(), UserDataError> {
    for rule in rules {
        for p in &rule.paths {
            if !p.get_ref().starts_with('/') {
                return Err(doc.error_at(
                    p.span().start,
                    format!("watch path `{}` must be absolute", p.get_ref()),
                ));
            }
        }
        if rule.paths.is_empty() || rule.restart.is_empty() {
            let at = rule
                .paths
                .first()
                .or(rule.restart.first())
                .map_or(0, |s| s.span().start);
            return Err(doc.error_at(
                at,
                "a [[watch]] rule needs at least one path and one program to restart",
            ));
        }
        for r in &rule.restart {
            let t = r.get_ref();
            let unit = t.strip_prefix("systemd:");
            if t.is_empty() || unit == Some("") || t.contains(char::is_whitespace) {
                return Err(doc.error_at(
                    r.span().start,
                    format!("restart target `{t}` must be a supervisord program, `group:*` or `systemd:UNIT`"),
                ));
            }
            if unit.is_some_and(|u| u.starts_with('-')) {
                // systemctl would read it as an option.
                return Err(doc.error_at(
                    doc.offset_in(r, "systemd:".len()),
                    format!(
                        "systemd unit `{}` starts with `-`; unit names never do",
                        unit.unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(sig) = &rule.signal {
            let name = sig.get_ref().trim_start_matches("SIG");
            if !SIGNALS.contains(&name) {
                return Err(doc.error_at(
                    sig.span().start,
                    format!(
                        "unknown signal `{}`; use one of {}",
                        sig.get_ref(),
                        SIGNALS.join(" ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_repo(
    doc: &Document,
    section: &str,
    repo: Option<&str>,
    reference: Option<&str>,
) -> Result<(), UserDataError> {
    if repo.is_some_and(|r| r.trim().is_empty()) {
        return Err(UserDataError::whole(
            &doc.file,
            format!("[{section}] repo is empty"),
        ));
    }
    if reference.is_some_and(|r| r.trim().is_empty() || r.starts_with('-')) {
        return Err(UserDataError::whole(
            &doc.file,
            format!("[{section}] ref must name a branch, tag or commit"),
        ));
    }
    Ok(())
}

/// Salt minion ids here: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn check_minion_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!(
            "minion id `{id}` must be 1 to 64 characters long (it is {})",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "minion id `{id}` has `{c}`; only A-Z a-z 0-9 . _ - are allowed"
        ));
    }
    Ok(())
}

/// What the agent does, after user-data is merged over the defaults and rendered for this instance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    pub minion_id: String,
    pub grains: toml::Table,
    /// Extra CA certificates (PEM, normalised), user-data's or else the image defaults'.
    pub ca_certificates: Option<String>,
    pub salt: SaltSettings,
    pub config: Option<RepoSpec>,
    pub sync: SyncSettings,
    pub supervisor_socket: PathBuf,
    pub supervisor_conf_dir: PathBuf,
    #[serde(with = "humantime_serde_compat")]
    pub watch_quiet: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub watch_max_delay: Duration,
    pub timeouts: Timeouts,
    /// `[aws] ssm_endpoint`, when set.
    pub ssm_endpoint: Option<String>,
    /// `[aws] ec2_endpoint`, when set.
    pub ec2_endpoint: Option<String>,
    /// `[report] enabled` (default true): write the report tags on this instance.
    pub report: bool,
    /// What a bad release does (`[config] on_failure`, `[config] grace`, `[salt] on_failure`).
    pub releases: ReleaseSettings,
    #[serde(skip)]
    pub watch: Vec<WatchRule>,
}

/// How releases are judged and what a bad one does.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReleaseSettings {
    pub config_on_failure: ConfigOnFailure,
    #[serde(with = "humantime_serde_compat")]
    pub config_grace: Duration,
    pub salt_on_failure: SaltOnFailure,
}

impl Default for ReleaseSettings {
    fn default() -> Self {
        Self {
            config_on_failure: ConfigOnFailure::Revert,
            config_grace: DEFAULT_CONFIG_GRACE,
            salt_on_failure: SaltOnFailure::Retry,
        }
    }
}

/// Deadlines of the programs the agent runs (`[timeouts]`), each with the setting's name for
/// the error of a program killed at it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Timeouts {
    #[serde(with = "humantime_serde_compat")]
    pub git: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub salt_install: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub trust: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub systemctl: Duration,
}

impl Timeouts {
    pub const GIT: &'static str = "[timeouts] git";
    pub const SALT_INSTALL: &'static str = "[timeouts] salt_install";
    pub const TRUST: &'static str = "[timeouts] trust";
    pub const SYSTEMCTL: &'static str = "[timeouts] systemctl";
    /// A highstate's deadline lives in `[salt]`.
    pub const HIGHSTATE: &'static str = "[salt] timeout";
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            git: DEFAULT_GIT_TIMEOUT,
            salt_install: DEFAULT_SALT_INSTALL_TIMEOUT,
            trust: DEFAULT_TRUST_TIMEOUT,
            systemctl: DEFAULT_SYSTEMCTL_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SaltSettings {
    pub repo: Option<RepoSpec>,
    pub states_dir: String,
    pub pillar_dir: String,
    pub install: InstallSpec,
    pub salt_call: Option<PathBuf>,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncSettings {
    #[serde(serialize_with = "display")]
    pub schedule: Schedule,
    #[serde(with = "humantime_serde_compat")]
    pub splay: Duration,
    pub highstate: HighstateMode,
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

pub const DEFAULT_REF: &str = "main";
pub const DEFAULT_SCHEDULE: &str = "*/15 * * * *";
pub const DEFAULT_SUPERVISOR_SOCKET: &str = "/run/supervisor.sock";
pub const DEFAULT_SUPERVISOR_CONF_DIR: &str = "/etc/supervisor/conf.d";
pub const DEFAULT_WATCH_QUIET: Duration = Duration::from_millis(100);
pub const DEFAULT_WATCH_MAX_DELAY: Duration = Duration::from_secs(2);
pub const DEFAULT_HIGHSTATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_GIT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_SALT_INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_TRUST_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(3 * 60);
pub const DEFAULT_CONFIG_GRACE: Duration = Duration::from_secs(5);

/// A key whose value is one of `allowed`.
fn check_choice(
    doc: &Document,
    value: Option<&Spanned<String>>,
    key: &str,
    allowed: &[&str],
) -> Result<(), UserDataError> {
    match value {
        Some(v) if !allowed.contains(&v.get_ref().as_str()) => Err(doc.error_at(
            v.span().start,
            format!(
                "{key} `{}` is not one of: {}",
                v.get_ref(),
                allowed.join(", ")
            ),
        )),
        _ => Ok(()),
    }
}

/// Merges user-data over the image defaults and renders placeholders for this instance.
/// User-data wins field by field; grains merge key by key; watch rules add up.
pub fn resolve(
    defaults: &Document,
    user: &Document,
    id: &Identity,
) -> Result<Settings, UserDataError> {
    let (d, u) = (&defaults.data, &user.data);

    // The minion id, checked again now that placeholders have their real values.
    let (id_doc, id_template) = match (&u.minion_id, &d.minion_id) {
        (Some(t), _) => (Some(user), Some(t)),
        (None, Some(t)) => (Some(defaults), Some(t)),
        (None, None) => (None, None),
    };
    let minion_id = match (id_doc, id_template) {
        (Some(doc), Some(t)) => {
            let rendered = placeholders::render(t.get_ref(), id)
                .map_err(|e| doc.error_at(doc.offset_in(t, e.offset), e.message))?;
            check_minion_id(&rendered).map_err(|m| doc.error_at(t.span().start, m))?;
            rendered
        }
        _ => {
            check_minion_id(&id.instance_id)
                .map_err(|m| UserDataError::whole("instance identity", m))?;
            id.instance_id.clone()
        }
    };

    let mut grains = toml::Table::new();
    for (doc, map) in [(defaults, &d.grains), (user, &u.grains)] {
        for (k, v) in map {
            let value = match v.get_ref() {
                toml::Value::String(s) => {
                    toml::Value::String(placeholders::render(s, id).map_err(|e| {
                        doc.error_at(v.span().start, format!("grain `{k}`: {}", e.message))
                    })?)
                }
                other => other.clone(),
            };
            grains.insert(k.clone(), value);
        }
    }

    // Validated by `parse`; normalised here to the certificate blocks alone.
    let ca_certificates = match u.ca_certificates.as_ref().or(d.ca_certificates.as_ref()) {
        Some(v) => {
            let doc = if u.ca_certificates.is_some() {
                user
            } else {
                defaults
            };
            let certs = pem::split_certificates(v.get_ref()).map_err(|e| {
                doc.error_at(
                    doc.offset_in_block(v, e.offset),
                    format!("ca_certificates: {}", e.message),
                )
            })?;
            Some(certs.concat())
        }
        None => None,
    };

    let (ds, us) = (
        d.salt.clone().unwrap_or_default(),
        u.salt.clone().unwrap_or_default(),
    );
    let pick = |a: Option<String>, b: Option<String>| a.or(b);
    let salt_repo = match us.repo.as_ref().or(ds.repo.as_ref()) {
        Some(url) => Some(RepoSpec {
            url: url.get_ref().clone(),
            reference: pick(us.reference.clone(), ds.reference.clone())
                .unwrap_or_else(|| DEFAULT_REF.into()),
            credentials: resolve_credentials(
                (user, us.credentials.as_ref()),
                (defaults, ds.credentials.as_ref()),
                "salt",
                url,
                us.repo.is_some(),
            )?,
            // Only salt-call (root) reads the states and the whole pillar.
            group: None,
        }),
        None => None,
    };
    let mut install = InstallSpec::default();
    if let Some(m) = us.install.or(ds.install) {
        install.method = m;
    }
    if let Some(v) = pick(us.version.clone(), ds.version.clone()) {
        install.version = v;
    }
    if let Some(v) = pick(us.bootstrap_url.clone(), ds.bootstrap_url.clone()) {
        install.bootstrap_url = v;
    }
    if let Some(v) = pick(us.bootstrap_sha256.clone(), ds.bootstrap_sha256.clone()) {
        install.bootstrap_sha256 = v;
    }
    let timeout = match us.timeout.as_ref().or(ds.timeout.as_ref()) {
        Some(t) => schedule::parse_duration(t.get_ref()).unwrap_or(DEFAULT_HIGHSTATE_TIMEOUT),
        None => DEFAULT_HIGHSTATE_TIMEOUT,
    };
    let salt = SaltSettings {
        repo: salt_repo,
        states_dir: pick(
            us.states_dir.map(|s| s.into_inner()),
            ds.states_dir.map(|s| s.into_inner()),
        )
        .unwrap_or_else(|| ".".into()),
        pillar_dir: pick(
            us.pillar_dir.map(|s| s.into_inner()),
            ds.pillar_dir.map(|s| s.into_inner()),
        )
        .unwrap_or_else(|| "pillar".into()),
        install,
        salt_call: us.salt_call.or(ds.salt_call),
        timeout,
    };

    let (dc, uc) = (
        d.config.clone().unwrap_or_default(),
        u.config.clone().unwrap_or_default(),
    );
    let config = match uc.repo.as_ref().or(dc.repo.as_ref()) {
        Some(url) => Some(RepoSpec {
            url: url.get_ref().clone(),
            reference: pick(uc.reference.clone(), dc.reference.clone())
                .unwrap_or_else(|| DEFAULT_REF.into()),
            credentials: resolve_credentials(
                (user, uc.credentials.as_ref()),
                (defaults, dc.credentials.as_ref()),
                "config",
                url,
                uc.repo.is_some(),
            )?,
            group: uc
                .group
                .clone()
                .or(dc.group.clone())
                .map(Spanned::into_inner),
        }),
        None => None,
    };

    let (dy, uy) = (
        d.sync.clone().unwrap_or_default(),
        u.sync.clone().unwrap_or_default(),
    );
    let schedule = match uy.schedule.as_ref().or(dy.schedule.as_ref()) {
        Some(s) => Schedule::parse(s.get_ref()).unwrap_or(Schedule::Cron(DEFAULT_SCHEDULE.into())),
        None => Schedule::Cron(DEFAULT_SCHEDULE.into()),
    };
    let splay = uy
        .splay
        .as_ref()
        .or(dy.splay.as_ref())
        .and_then(|s| schedule::parse_duration(s.get_ref()).ok())
        .unwrap_or_default();
    let sync = SyncSettings {
        schedule,
        splay,
        highstate: uy.highstate.or(dy.highstate).unwrap_or_default(),
    };

    let supervisor_socket = u
        .supervisor
        .as_ref()
        .and_then(|s| s.socket.clone())
        .or_else(|| d.supervisor.as_ref().and_then(|s| s.socket.clone()))
        .unwrap_or_else(|| DEFAULT_SUPERVISOR_SOCKET.into());

    let supervisor_conf_dir = u
        .supervisor
        .as_ref()
        .and_then(|s| s.conf_dir.clone())
        .or_else(|| d.supervisor.as_ref().and_then(|s| s.conf_dir.clone()))
        .unwrap_or_else(|| DEFAULT_SUPERVISOR_CONF_DIR.into());
    let (dw, uw) = (
        d.watcher.clone().unwrap_or_default(),
        u.watcher.clone().unwrap_or_default(),
    );
    let duration = |a: Option<Spanned<String>>, b: Option<Spanned<String>>, default: Duration| {
        a.or(b)
            .and_then(|v| schedule::parse_duration(v.get_ref()).ok())
            .unwrap_or(default)
    };
    let watch_quiet = duration(uw.quiet, dw.quiet, DEFAULT_WATCH_QUIET);
    let watch_max_delay =
        duration(uw.max_delay, dw.max_delay, DEFAULT_WATCH_MAX_DELAY).max(watch_quiet);

    let (dt, ut) = (
        d.timeouts.clone().unwrap_or_default(),
        u.timeouts.clone().unwrap_or_default(),
    );
    let timeouts = Timeouts {
        git: duration(ut.git, dt.git, DEFAULT_GIT_TIMEOUT),
        salt_install: duration(
            ut.salt_install,
            dt.salt_install,
            DEFAULT_SALT_INSTALL_TIMEOUT,
        ),
        trust: duration(ut.trust, dt.trust, DEFAULT_TRUST_TIMEOUT),
        systemctl: duration(ut.systemctl, dt.systemctl, DEFAULT_SYSTEMCTL_TIMEOUT),
    };

    let ssm_endpoint = u
        .aws
        .as_ref()
        .and_then(|a| a.ssm_endpoint.clone())
        .or_else(|| d.aws.as_ref().and_then(|a| a.ssm_endpoint.clone()))
        .map(Spanned::into_inner);
    let ec2_endpoint = u
        .aws
        .as_ref()
        .and_then(|a| a.ec2_endpoint.clone())
        .or_else(|| d.aws.as_ref().and_then(|a| a.ec2_endpoint.clone()))
        .map(Spanned::into_inner);
    let report = u
        .report
        .as_ref()
        .and_then(|r| r.enabled.clone())
        .or_else(|| d.report.as_ref().and_then(|r| r.enabled.clone()))
        .is_none_or(Spanned::into_inner);
    let choice = |a: &Option<Spanned<String>>, b: &Option<Spanned<String>>| {
        a.as_ref().or(b.as_ref()).map(|v| v.get_ref().clone())
    };
    let releases = ReleaseSettings {
        config_on_failure: match choice(&uc.on_failure, &dc.on_failure).as_deref() {
            Some("keep") => ConfigOnFailure::Keep,
            _ => ConfigOnFailure::Revert,
        },
        config_grace: duration(uc.grace.clone(), dc.grace.clone(), DEFAULT_CONFIG_GRACE),
        salt_on_failure: match choice(&us.on_failure, &ds.on_failure).as_deref() {
            Some("revert") => SaltOnFailure::Revert,
            _ => SaltOnFailure::Retry,
        },
    };
    let watch = d.watch.iter().chain(&u.watch).cloned().collect();
    Ok(Settings {
        minion_id,
        grains,
        ca_certificates,
        salt,
        config,
        sync,
        supervisor_socket,
        supervisor_conf_dir,
        watch_quiet,
        watch_max_delay,
        timeouts,
        ssm_endpoint,
        ec2_endpoint,
        report,
        releases,
        watch,
    })
}

/// The credentials table of user-data, else of the image defaults when the repository URL is
/// still the image's; checked against the URL that won.
fn resolve_credentials(
    user: (&Document, Option<&CredentialsSection>),
    defaults: (&Document, Option<&CredentialsSection>),
    section: &str,
    url: &Spanned<String>,
    user_moved_repo: bool,
) -> Result<Option<RepoCredentials>, UserDataError> {
    let (doc, creds) = match (user, defaults) {
        ((doc, Some(c)), _) => (doc, c),
        // The image's secret goes only to the image's repository: user-data that moves the
        // repository elsewhere brings its own credentials or none.
        (_, (doc, Some(c))) if !user_moved_repo => (doc, c),
        _ => return Ok(None),
    };
    credentials::validate(doc, section, Some(url), Some(creds))
}

/// A file of watch rules in `/etc/stackless/watch.d/` (salt states may manage these): the same
/// `[[watch]]` tables as user-data, and nothing else.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WatchFile {
    #[serde(default)]
    pub watch: Vec<WatchRule>,
}

/// Parses and validates a watch.d file.
pub fn parse_watch_file(file: &str, text: &str) -> Result<Vec<WatchRule>, UserDataError> {
    let data: WatchFile =
        toml::from_str(text).map_err(|e| UserDataError::from_toml(file, text, &e))?;
    let doc = Document {
        file: file.into(),
        text: text.into(),
        data: UserData::default(),
    };
    validate_watch(&doc, &data.watch)?;
    Ok(data.watch)
}

/// Decodes, parses and validates raw user-data bytes (from IMDS or a file).
pub fn load(file: &str, bytes: &[u8]) -> Result<Document, UserDataError> {
    let text = decode(file, bytes)?;
    parse(file, &text)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod credentials_tests;
