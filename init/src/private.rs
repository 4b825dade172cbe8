//! Private repositories: the secret is read from SSM with the instance role right before a sync,
//! handed to git through [`GitAuth`] (files under `/run/stackless`, removed after the sync) and
//! dropped. A secret that cannot be read fails the sync like an unreachable repository does:
//! the last good release stays published and the error names the parameter, never its value.

use crate::aws::ssm::{ParameterReader, Secret};
use crate::gitauth::GitAuth;
use crate::imds::ImdsClient;
use crate::paths::Layout;
use crate::repos::{self, RepoSpec, SyncOutcome};
use crate::userdata::{KnownHosts, RepoCredentials, Settings};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;

/// How long reading the secrets of one repository may take (IMDS and SSM, retries included).
pub const SECRET_DEADLINE: Duration = Duration::from_secs(60);
/// The askpass program git runs; the agent itself unless set (tests point it at the build).
pub const ASKPASS_ENV: &str = "STACKLESS_ASKPASS";

/// Where a repository's secrets come from: SSM in production, anything in tests.
pub trait SecretSource {
    fn get(&mut self, parameter: &str) -> Result<Secret>;
}

/// SSM through the instance role (IMDS endpoint from the environment).
pub struct Ssm {
    pub endpoint_setting: Option<String>,
    reader: Option<ParameterReader>,
}

impl Ssm {
    pub fn new(endpoint_setting: Option<String>) -> Self {
        Ssm {
            endpoint_setting,
            reader: None,
        }
    }
}

impl SecretSource for Ssm {
    fn get(&mut self, parameter: &str) -> Result<Secret> {
        if self.reader.is_none() {
            let imds = ImdsClient::from_env(SECRET_DEADLINE);
            let reader =
                ParameterReader::new(imds, self.endpoint_setting.as_deref(), SECRET_DEADLINE)
                    .with_context(|| {
                        format!("reading SSM parameter {parameter}: the instance identity")
                    })?;
            self.reader = Some(reader);
        }
        let reader = self.reader.as_mut().expect("set just now");
        Ok(reader.get(parameter)?)
    }
}

/// Syncs a repository, public or private (see [`repos::sync`]).
pub fn sync(
    layout: &Layout,
    name: &str,
    spec: &RepoSpec,
    settings: &Settings,
    policy: &repos::Policy,
) -> Result<SyncOutcome> {
    let Some(creds) = &spec.credentials else {
        return repos::sync_with_auth(layout, name, spec, settings.timeouts.git, None, policy);
    };
    SSM.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell
            .as_ref()
            .is_none_or(|s| s.endpoint_setting != settings.ssm_endpoint)
        {
            *cell = Some(Ssm::new(settings.ssm_endpoint.clone()));
        }
        let source = cell.as_mut().expect("set just now");
        sync_with_source(
            layout,
            name,
            spec,
            creds,
            settings.timeouts.git,
            source,
            policy,
        )
    })
}

thread_local! {
    // One reader for the agent's life: its IMDS token and the role's credentials are reused by
    // every sync (and refreshed before they expire), not fetched again at every tick.
    static SSM: std::cell::RefCell<Option<Ssm>> = const { std::cell::RefCell::new(None) };
}

/// [`sync`] with the secrets from `source`.
pub fn sync_with_source(
    layout: &Layout,
    name: &str,
    spec: &RepoSpec,
    creds: &RepoCredentials,
    timeout: Duration,
    source: &mut dyn SecretSource,
    policy: &repos::Policy,
) -> Result<SyncOutcome> {
    let auth = match git_auth(layout, creds, source) {
        Ok(auth) => auth,
        Err(e) => {
            let e = e.context(format!(
                "syncing repository {name} from {} (ref {}): the credentials in SSM parameter {}",
                spec.url,
                spec.reference,
                creds.parameter()
            ));
            return repos::keep_last(name, Err(e), repos::current_commit(layout, name));
        }
    };
    repos::sync_with_auth(layout, name, spec, timeout, Some(&auth), policy)
    // `auth` drops here: its folder under /run/stackless goes with it.
}

fn git_auth(
    layout: &Layout,
    creds: &RepoCredentials,
    source: &mut dyn SecretSource,
) -> Result<GitAuth> {
    let run_dir = layout.run_dir();
    match creds {
        RepoCredentials::Token {
            parameter,
            username,
        } => {
            let token = source.get(parameter)?;
            GitAuth::https_token(&run_dir, username, &token, &askpass_program()?)
                .with_context(|| format!("SSM parameter {parameter}"))
        }
        RepoCredentials::SshKey {
            parameter,
            known_hosts,
        } => {
            let key = source.get(parameter)?;
            let hosts = match known_hosts {
                KnownHosts::Inline(text) => text.clone(),
                KnownHosts::Parameter(p) => {
                    let text = source.get(p)?.expose().to_string();
                    crate::userdata::credentials::check_known_hosts(&text)
                        .map_err(|m| anyhow::anyhow!("SSM parameter {p} (known hosts): {m}"))?;
                    text
                }
            };
            GitAuth::ssh_key(&run_dir, &key, &hosts)
                .with_context(|| format!("SSM parameter {parameter}"))
        }
    }
}

fn askpass_program() -> Result<PathBuf> {
    match std::env::var_os(ASKPASS_ENV) {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe()
            .context("finding the agent's own program (git's askpass helper)"),
    }
}
