//! What a deploy needs: `deploy/SERVICE.toml` (strict: unknown keys, bad types and bad values are
//! errors with the file, line and column) with command-line flags over it, field by field.

use serde::Deserialize;
use stackless_init::userdata::UserDataError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// A problem in a deploy file: the same located error as user-data and image definitions.
pub type ConfigError = UserDataError;

/// `deploy/SERVICE.toml` as written; every field optional so flags can fill or override it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployFile {
    /// An image definition name: the AMI id is read from its `[publish] ssm_parameter`.
    pub image: Option<Spanned<String>>,
    /// An AMI id.
    pub ami: Option<Spanned<String>>,
    /// An SSM parameter holding an AMI id.
    pub ssm_parameter: Option<Spanned<String>>,
    pub count: Option<Spanned<i64>>,
    pub instance_type: Option<Spanned<String>>,
    pub subnets: Option<Vec<Spanned<String>>>,
    pub security_groups: Option<Vec<Spanned<String>>>,
    pub instance_profile: Option<String>,
    /// User-data file, relative to this file.
    pub user_data: Option<String>,
    /// ELBv2 target group ARNs.
    pub target_groups: Option<Vec<Spanned<String>>>,
    /// Checked from where the builder runs until it answers 200: `{ip}` `{private_ip}` `{public_ip}`.
    pub health_url: Option<Spanned<String>>,
    /// What step 3 waits for after the instances run: `agent` (the stackless-init result line on
    /// the console), `status-checks` (EC2's) or `none`.
    pub ready: Option<Spanned<String>>,
    /// The former spelling of `ready = "status-checks"`.
    pub status_checks: Option<Spanned<bool>>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsFile>,
    pub tags: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub asg: Option<AsgFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    /// The new instances to be running.
    pub running: Option<Spanned<String>>,
    /// The health URL (or the status checks) to pass.
    pub ready: Option<Spanned<String>>,
    /// Every new target to be healthy in every target group.
    pub healthy: Option<Spanned<String>>,
    /// Connection draining of deregistered targets (default: the groups' deregistration delay
    /// plus two minutes).
    pub drain: Option<Spanned<String>>,
    /// Instances to terminate.
    pub terminate: Option<Spanned<String>>,
    /// How long the deploy lock holds before another deploy may take it over.
    pub lock: Option<Spanned<String>>,
    /// How long after registration an `unhealthy` new target is tolerated (a first boot may
    /// still be applying its state).
    pub unhealthy_grace: Option<Spanned<String>>,
    /// How long a rollback keeps looking for instances an interrupted boot may have started.
    pub lookup: Option<Spanned<String>>,
    /// The instance refresh of `--asg` deploys.
    pub refresh: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsgFile {
    pub name: Option<String>,
    pub min_healthy_percentage: Option<Spanned<i64>>,
    pub max_healthy_percentage: Option<Spanned<i64>>,
    pub checkpoint_percentages: Option<Vec<Spanned<i64>>>,
    pub checkpoint_delay: Option<Spanned<String>>,
    pub instance_warmup: Option<Spanned<String>>,
    pub auto_rollback: Option<bool>,
}

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageRef {
    /// An image definition; its `[publish] ssm_parameter` holds the id.
    Definition(String),
    Parameter(String),
    Ami(String),
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Definition(n) => write!(f, "image {n}"),
            ImageRef::Parameter(p) => write!(f, "SSM parameter {p}"),
            ImageRef::Ami(a) => write!(f, "{a}"),
        }
    }
}

/// The command-line flags; each given one wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub image: Option<ImageRef>,
    pub count: Option<u32>,
    pub instance_type: Option<String>,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    pub user_data: Option<PathBuf>,
    pub target_groups: Vec<String>,
    pub health_url: Option<String>,
    pub asg: Option<String>,
    pub lock_ttl: Option<Duration>,
    pub ready: Option<ReadyMode>,
    pub unhealthy_grace: Option<Duration>,
}

/// What step 3 waits for once the new instances run (besides `health_url`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadyMode {
    /// The agent's `stackless-init-result:` line on the instance console says `ready`.
    Agent,
    /// EC2's instance and system status checks pass (they say nothing about the agent).
    StatusChecks,
    /// Nothing more.
    #[default]
    None,
}

impl ReadyMode {
    pub fn parse(s: &str) -> Result<ReadyMode, String> {
        match s {
            "agent" => Ok(ReadyMode::Agent),
            "status-checks" => Ok(ReadyMode::StatusChecks),
            "none" => Ok(ReadyMode::None),
            _ => Err(format!(
                "ready `{s}` is not one of agent, status-checks, none"
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyMode::Agent => "agent",
            ReadyMode::StatusChecks => "status-checks",
            ReadyMode::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Timeouts {
    pub running: Duration,
    pub ready: Duration,
    pub healthy: Duration,
    /// None: the target groups' deregistration delay plus two minutes.
    pub drain: Option<Duration>,
    pub terminate: Duration,
    pub refresh: Duration,
    /// An `unhealthy` new target fails step 4 only this long after its registration (or at once
    /// once it had been healthy).
    pub unhealthy_grace: Duration,
    /// How long a rollback after an interrupted boot keeps looking (EC2 is eventually
    /// consistent) for instances it may have started.
    pub lookup: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            running: Duration::from_secs(10 * 60),
            ready: Duration::from_secs(15 * 60),
            healthy: Duration::from_secs(10 * 60),
            drain: None,
            terminate: Duration::from_secs(10 * 60),
            refresh: Duration::from_secs(2 * 60 * 60),
            unhealthy_grace: Duration::from_secs(5 * 60),
            lookup: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// The longest a plain deploy can take, the drain counted at `drain`: steps 2 to 4, then
    /// either step 5 or the rollback (which drains and terminates the new instances the same way),
    /// with the rollback's search for instances an interrupted boot left.
    pub fn longest(&self, drain: Duration) -> Duration {
        self.running + self.ready + self.healthy + self.lookup + drain + self.terminate
    }

    /// [`Timeouts::longest`] spelt out, for messages.
    pub fn describe_longest(&self, drain: Duration) -> String {
        let h = |d: Duration| humantime::format_duration(d).to_string();
        format!(
            "running {} + ready {} + healthy {} + lookup {} + drain {} + terminate {}",
            h(self.running),
            h(self.ready),
            h(self.healthy),
            h(self.lookup),
            h(drain),
            h(self.terminate)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AsgConfig {
    pub name: String,
    pub min_healthy_percentage: Option<i32>,
    pub max_healthy_percentage: Option<i32>,
    pub checkpoint_percentages: Vec<i32>,
    pub checkpoint_delay: Option<Duration>,
    pub instance_warmup: Option<Duration>,
    pub auto_rollback: bool,
}

/// A deploy's settings, file and flags merged and checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeployConfig {
    pub service: String,
    /// The file it came from, if there was one.
    pub file: Option<PathBuf>,
    pub image: ImageRef,
    pub count: u32,
    pub instance_type: String,
    pub subnets: Vec<String>,
    pub security_groups: Vec<String>,
    pub instance_profile: Option<String>,
    pub user_data: Option<PathBuf>,
    pub target_groups: Vec<String>,
    pub health_url: Option<String>,
    pub ready: ReadyMode,
    pub timeouts: Timeouts,
    /// None: comfortably above the sum of the deadlines (at least an hour).
    pub lock_ttl: Option<Duration>,
    pub tags: BTreeMap<String, String>,
    pub asg: Option<AsgConfig>,
}

pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";
const HEALTH_PLACEHOLDERS: [&str; 3] = ["ip", "private_ip", "public_ip"];

/// A service name: it goes into SSM parameter names and tags.
pub fn check_service(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(format!(
            "service name `{name}` must be 1 to 64 of A-Z a-z 0-9 . _ - (it names SSM parameters and tags)"
        ));
    }
    Ok(())
}

/// Checks a health URL template: http(s), known placeholders only.
pub fn check_health_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "health_url `{url}` must start with http:// or https://"
        ));
    }
    for part in url.split('{').skip(1) {
        let key = part.split('}').next().unwrap_or("");
        if !HEALTH_PLACEHOLDERS.contains(&key) {
            return Err(format!(
                "unknown placeholder `{{{key}}}` in health_url; use {{ip}} (the private address), {{private_ip}} or {{public_ip}}"
            ));
        }
    }
    Ok(())
}

/// Fills a health URL template for one instance.
pub fn render_health_url(template: &str, private_ip: &str, public_ip: &str) -> String {
    template
        .replace("{ip}", private_ip)
        .replace("{private_ip}", private_ip)
        .replace("{public_ip}", public_ip)
}

struct Located<'a> {
    file: &'a str,
    text: &'a str,
}

impl Located<'_> {
    fn err(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.file, self.text, offset, message)
    }
    fn duration(&self, v: &Spanned<String>) -> Result<Duration, ConfigError> {
        humantime::parse_duration(v.get_ref()).map_err(|e| {
            self.err(
                v.span().start,
                format!(
                    "bad duration `{}`: {e} (write it like `90s`, `10m`, `1h`)",
                    v.get_ref()
                ),
            )
        })
    }
    fn prefixed(&self, v: &Spanned<String>, prefix: &str, what: &str) -> Result<(), ConfigError> {
        if v.get_ref().starts_with(prefix) {
            Ok(())
        } else {
            Err(self.err(
                v.span().start,
                format!("`{}` is not {what} (like {prefix}...)", v.get_ref()),
            ))
        }
    }
    fn percent(&self, v: &Spanned<i64>, what: &str, min: i64) -> Result<i32, ConfigError> {
        if !(min..=100).contains(v.get_ref()) {
            return Err(self.err(v.span().start, format!("{what} must be {min} to 100")));
        }
        Ok(*v.get_ref() as i32)
    }
}

/// Parses a deploy file's text (checks that need only the file).
pub fn parse(file: &str, text: &str) -> Result<DeployFile, ConfigError> {
    let data: DeployFile =
        toml::from_str(text).map_err(|e| ConfigError::from_toml(file, text, &e))?;
    let l = Located { file, text };
    let sources = [
        data.image.as_ref(),
        data.ami.as_ref(),
        data.ssm_parameter.as_ref(),
    ];
    if sources.iter().flatten().count() > 1 {
        let second = sources.iter().flatten().nth(1).expect("two sources");
        return Err(l.err(
            second.span().start,
            "give one of image, ami or ssm_parameter",
        ));
    }
    if let Some(a) = &data.ami {
        l.prefixed(a, "ami-", "an AMI id")?;
    }
    if let Some(c) = &data.count {
        if !(1..=100).contains(c.get_ref()) {
            return Err(l.err(c.span().start, "count must be 1 to 100"));
        }
    }
    for s in data.subnets.iter().flatten() {
        l.prefixed(s, "subnet-", "a subnet id")?;
    }
    for g in data.security_groups.iter().flatten() {
        l.prefixed(g, "sg-", "a security group id")?;
    }
    for t in data.target_groups.iter().flatten() {
        l.prefixed(
            t,
            "arn:",
            "a target group ARN (arn:aws:elasticloadbalancing:...)",
        )?;
    }
    if let Some(u) = &data.health_url {
        check_health_url(u.get_ref()).map_err(|m| l.err(u.span().start, m))?;
    }
    if let Some(r) = &data.ready {
        ReadyMode::parse(r.get_ref()).map_err(|m| l.err(r.span().start, m))?;
        if let Some(sc) = &data.status_checks {
            return Err(l.err(
                sc.span().start,
                "give ready = \"status-checks\" or status_checks, not both",
            ));
        }
    }
    if let Some(t) = &data.timeouts {
        for d in [
            &t.running,
            &t.ready,
            &t.healthy,
            &t.drain,
            &t.terminate,
            &t.lock,
            &t.refresh,
            &t.unhealthy_grace,
            &t.lookup,
        ]
        .into_iter()
        .flatten()
        {
            l.duration(d)?;
        }
    }
    if let Some(a) = &data.asg {
        if let Some(p) = &a.min_healthy_percentage {
            l.percent(p, "min_healthy_percentage", 0)?;
        }
        if let Some(p) = &a.max_healthy_percentage {
            if !(100..=200).contains(p.get_ref()) {
                return Err(l.err(p.span().start, "max_healthy_percentage must be 100 to 200"));
            }
        }
        let mut last = 0;
        for p in a.checkpoint_percentages.iter().flatten() {
            let v = l.percent(p, "a checkpoint percentage", 1)?;
            if v <= last {
                return Err(l.err(
                    p.span().start,
                    "checkpoint_percentages must rise (like [20, 50, 100])",
                ));
            }
            last = v;
        }
        for d in [&a.checkpoint_delay, &a.instance_warmup]
            .into_iter()
            .flatten()
        {
            l.duration(d)?;
        }
    }
    Ok(data)
}

/// The deploy file of a service, when it exists: `DIR/SERVICE.toml`.
pub fn file_path(dir: &Path, service: &str) -> PathBuf {
    dir.join(format!("{service}.toml"))
}

/// Reads `DIR/SERVICE.toml` if it exists and merges the flags over it.
pub fn load(dir: &Path, service: &str, flags: &Overrides) -> Result<DeployConfig, ConfigError> {
    check_service(service).map_err(|m| ConfigError::whole(service, m))?;
    let path = file_path(dir, service);
    if !path.exists() {
        return merge(service, None, "", DeployFile::default(), flags);
    }
    let file = path.display().to_string();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::whole(&file, format!("cannot read the deploy file: {e}")))?;
    let data = parse(&file, &text)?;
    merge(service, Some(&path), &text, data, flags)
}

fn strings(v: Option<Vec<Spanned<String>>>) -> Vec<String> {
    v.unwrap_or_default()
        .into_iter()
        .map(Spanned::into_inner)
        .collect()
}

/// Flags over the file, field by field; lists given on the command line replace the file's.
pub fn merge(
    service: &str,
    path: Option<&Path>,
    text: &str,
    data: DeployFile,
    flags: &Overrides,
) -> Result<DeployConfig, ConfigError> {
    let file = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("deploy of {service}"));
    let l = Located { file: &file, text };
    let dur = |v: &Option<Spanned<String>>, default: Duration| -> Result<Duration, ConfigError> {
        match v {
            Some(v) => l.duration(v),
            None => Ok(default),
        }
    };

    let image = match &flags.image {
        Some(i) => i.clone(),
        None => {
            if let Some(i) = data.image {
                ImageRef::Definition(i.into_inner())
            } else if let Some(a) = data.ami {
                ImageRef::Ami(a.into_inner())
            } else if let Some(p) = data.ssm_parameter {
                ImageRef::Parameter(p.into_inner())
            } else {
                return Err(ConfigError::whole(
                    &file,
                    "no image: give image, ami or ssm_parameter in the deploy file, or --image, --ami or --ssm-parameter",
                ));
            }
        }
    };
    if let ImageRef::Ami(a) = &image {
        if !a.starts_with("ami-") {
            return Err(ConfigError::whole(
                &file,
                format!("--ami `{a}` is not an AMI id (like ami-0123456789abcdef0)"),
            ));
        }
    }
    let count = match (flags.count, &data.count) {
        (Some(c), _) => c,
        (None, Some(c)) => *c.get_ref() as u32,
        (None, None) => 1,
    };
    if !(1..=100).contains(&count) {
        return Err(ConfigError::whole(&file, "--count must be 1 to 100"));
    }
    let pick = |flag: &Vec<String>, file: Option<Vec<Spanned<String>>>| {
        if flag.is_empty() {
            strings(file)
        } else {
            flag.clone()
        }
    };
    let subnets = pick(&flags.subnets, data.subnets);
    let security_groups = pick(&flags.security_groups, data.security_groups);
    let target_groups = pick(&flags.target_groups, data.target_groups);
    for (list, prefix, what) in [
        (&subnets, "subnet-", "a subnet id"),
        (&security_groups, "sg-", "a security group id"),
        (&target_groups, "arn:", "a target group ARN"),
    ] {
        if let Some(bad) = list.iter().find(|v| !v.starts_with(prefix)) {
            return Err(ConfigError::whole(
                &file,
                format!("`{bad}` is not {what} (like {prefix}...)"),
            ));
        }
    }
    let health_url = match (&flags.health_url, data.health_url) {
        (Some(u), _) => {
            check_health_url(u).map_err(|m| ConfigError::whole(&file, m))?;
            Some(u.clone())
        }
        (None, u) => u.map(Spanned::into_inner),
    };
    let user_data = match (&flags.user_data, data.user_data) {
        (Some(u), _) => Some(u.clone()),
        (None, Some(u)) => {
            let base = path.and_then(Path::parent).unwrap_or(Path::new("."));
            Some(base.join(u))
        }
        (None, None) => None,
    };
    let t = data.timeouts.unwrap_or_default();
    let d = Timeouts::default();
    let timeouts = Timeouts {
        running: dur(&t.running, d.running)?,
        ready: dur(&t.ready, d.ready)?,
        healthy: dur(&t.healthy, d.healthy)?,
        drain: match &t.drain {
            Some(v) => Some(l.duration(v)?),
            None => None,
        },
        terminate: dur(&t.terminate, d.terminate)?,
        refresh: dur(&t.refresh, d.refresh)?,
        unhealthy_grace: match flags.unhealthy_grace {
            Some(g) => g,
            None => dur(&t.unhealthy_grace, d.unhealthy_grace)?,
        },
        lookup: dur(&t.lookup, d.lookup)?,
    };
    let ready = match (flags.ready, &data.ready, &data.status_checks) {
        (Some(r), _, _) => r,
        (None, Some(r), _) => {
            ReadyMode::parse(r.get_ref()).map_err(|m| l.err(r.span().start, m))?
        }
        (None, None, Some(sc)) if *sc.get_ref() => ReadyMode::StatusChecks,
        _ => ReadyMode::None,
    };
    let lock_ttl = match (flags.lock_ttl, &t.lock) {
        (Some(v), _) => Some(v),
        (None, Some(v)) => Some(l.duration(v)?),
        (None, None) => None,
    };
    let asg = {
        let a = data.asg.unwrap_or_default();
        match flags.asg.clone().or(a.name.clone()) {
            None => None,
            Some(name) => Some(AsgConfig {
                name,
                min_healthy_percentage: a.min_healthy_percentage.map(|p| *p.get_ref() as i32),
                max_healthy_percentage: a.max_healthy_percentage.map(|p| *p.get_ref() as i32),
                checkpoint_percentages: a
                    .checkpoint_percentages
                    .unwrap_or_default()
                    .iter()
                    .map(|p| *p.get_ref() as i32)
                    .collect(),
                checkpoint_delay: match &a.checkpoint_delay {
                    Some(v) => Some(l.duration(v)?),
                    None => None,
                },
                instance_warmup: match &a.instance_warmup {
                    Some(v) => Some(l.duration(v)?),
                    None => None,
                },
                auto_rollback: a.auto_rollback.unwrap_or(true),
            }),
        }
    };
    if let Some(a) = &asg {
        if a.auto_rollback
            && a.min_healthy_percentage == Some(100)
            && a.max_healthy_percentage.is_none()
        {
            return Err(ConfigError::whole(
                &file,
                "[asg] min_healthy_percentage = 100 needs max_healthy_percentage above 100 (EC2 Auto Scaling must launch before it terminates)",
            ));
        }
    }
    Ok(DeployConfig {
        service: service.to_string(),
        file: path.map(Path::to_path_buf),
        image,
        count,
        instance_type: flags
            .instance_type
            .clone()
            .or(data.instance_type.map(Spanned::into_inner))
            .unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.into()),
        subnets,
        security_groups,
        instance_profile: flags.instance_profile.clone().or(data.instance_profile),
        user_data,
        target_groups,
        health_url,
        ready,
        timeouts,
        lock_ttl,
        tags: data.tags.unwrap_or_default(),
        asg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deploy files are written by hand: any text gets a located error, never a panic.
    #[test]
    fn fuzzing_deploy_files_finds_no_panic_or_hang() {
        let dir = testkit::repo_root().join("deploy");
        let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect();
        testkit::fuzz::run("deploy-file", &seeds, |data| {
            let _ = parse("deploy/web.toml", &String::from_utf8_lossy(data));
        });
    }

    const FULL: &str = r#"image = "preseeded"
count = 3
instance_type = "t3.small"
subnets = ["subnet-a", "subnet-b"]
security_groups = ["sg-1"]
instance_profile = "web"
user_data = "web-user-data.toml"
target_groups = ["arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/web/1"]
health_url = "http://{ip}:8080/health"
ready = "agent"
[timeouts]
healthy = "5m"
unhealthy_grace = "3m"
lock = "2h"
[tags]
team = "web"
[asg]
name = "web-asg"
min_healthy_percentage = 90
checkpoint_percentages = [50, 100]
checkpoint_delay = "2m"
"#;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn reads_the_file_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "web.toml", FULL);
        let c = load(dir.path(), "web", &Overrides::default()).unwrap();
        assert_eq!(c.image, ImageRef::Definition("preseeded".into()));
        assert_eq!(c.count, 3);
        assert_eq!(c.subnets, ["subnet-a", "subnet-b"]);
        assert_eq!(c.user_data, Some(dir.path().join("web-user-data.toml")));
        assert_eq!(c.timeouts.healthy, Duration::from_secs(300));
        assert_eq!(c.timeouts.running, Timeouts::default().running);
        assert_eq!(c.lock_ttl, Some(Duration::from_secs(7200)));
        assert_eq!(c.ready, ReadyMode::Agent);
        assert_eq!(c.timeouts.unhealthy_grace, Duration::from_secs(180));
        assert_eq!(c.timeouts.lookup, Duration::from_secs(60));
        let asg = c.asg.unwrap();
        assert_eq!(asg.name, "web-asg");
        assert_eq!(asg.checkpoint_percentages, [50, 100]);
        assert!(asg.auto_rollback);

        let flags = Overrides {
            image: Some(ImageRef::Ami("ami-123".into())),
            count: Some(5),
            subnets: vec!["subnet-z".into()],
            user_data: Some("other.toml".into()),
            ..Default::default()
        };
        let c = load(dir.path(), "web", &flags).unwrap();
        assert_eq!(c.image, ImageRef::Ami("ami-123".into()));
        assert_eq!(c.count, 5);
        assert_eq!(c.subnets, ["subnet-z"]);
        assert_eq!(c.security_groups, ["sg-1"], "not given: the file's");
        assert_eq!(c.user_data, Some(PathBuf::from("other.toml")));
    }

    #[test]
    fn flags_alone_are_enough_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let flags = Overrides {
            image: Some(ImageRef::Parameter("/stackless/images/web".into())),
            ..Default::default()
        };
        let c = load(dir.path(), "api", &flags).unwrap();
        assert_eq!(c.file, None);
        assert_eq!(c.count, 1);
        assert_eq!(c.instance_type, DEFAULT_INSTANCE_TYPE);
        let e = load(dir.path(), "api", &Overrides::default()).unwrap_err();
        assert!(e.message.contains("no image"), "{e}");
    }

    #[test]
    fn errors_name_the_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "count = 3\nimage = \"x\"\ncolour = 1\n",
                "3:1",
                "unknown field `colour`",
            ),
            ("count = 0\n", "1:9", "count must be 1 to 100"),
            (
                "ami = \"ami-1\"\nimage = \"x\"\n",
                "",
                "one of image, ami or ssm_parameter",
            ),
            ("ami = \"img-1\"\n", "1:7", "not an AMI id"),
            ("subnets = [\"sub-1\"]\n", "1:12", "not a subnet id"),
            (
                "target_groups = [\"web\"]\n",
                "1:18",
                "not a target group ARN",
            ),
            (
                "health_url = \"http://{host}/\"\n",
                "1:14",
                "unknown placeholder `{host}`",
            ),
            (
                "[timeouts]\nhealthy = \"5 parsecs\"\n",
                "2:11",
                "bad duration",
            ),
            (
                "[asg]\ncheckpoint_percentages = [50, 20]\n",
                "2:31",
                "must rise",
            ),
            ("count = \"3\"\n", "1:9", "invalid type"),
            (
                "ready = \"ssh\"\n",
                "1:9",
                "not one of agent, status-checks, none",
            ),
        ];
        for (text, at, message) in cases {
            write(dir.path(), "bad.toml", text);
            let e = load(dir.path(), "bad", &Overrides::default()).unwrap_err();
            let shown = e.to_string();
            assert!(shown.contains("bad.toml"), "{shown}");
            if !at.is_empty() {
                assert!(
                    shown.contains(&format!("bad.toml:{at}:")),
                    "{text:?}: {shown}"
                );
            }
            assert!(shown.contains(message), "{text:?}: {shown}");
        }
        let e = load(dir.path(), "no/such", &Overrides::default()).unwrap_err();
        assert!(e.message.contains("service name"), "{e}");
    }

    #[test]
    fn health_urls_take_the_instance_addresses() {
        assert_eq!(
            render_health_url("http://{ip}:8080/h?p={public_ip}", "10.0.0.5", "3.3.3.3"),
            "http://10.0.0.5:8080/h?p=3.3.3.3"
        );
        assert!(check_health_url("ftp://x").is_err());
        assert!(check_health_url("http://{private_ip}/health").is_ok());
    }
}
