//! `[salt.credentials]` and `[config.credentials]`: where a private repository's secret lives.
//!
//! ```toml
//! [salt]
//! repo = "https://github.com/acme/states.git"
//! [salt.credentials]
//! token_parameter = "/stackless/github-token"   # an SSM SecureString, used as the password
//! username = "x-access-token"                   # the default
//!
//! [config]
//! repo = "git@github.com:acme/app-config.git"
//! [config.credentials]
//! ssh_key_parameter = "/stackless/deploy-key"   # an SSM SecureString holding the private key
//! known_hosts = "github.com ssh-ed25519 AAAAC3Nza..."   # or known_hosts_parameter = "/..."
//! ```
//!
//! The secret itself never appears in user-data: a URL with credentials in it is refused.

use super::{Document, UserDataError};
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub const DEFAULT_TOKEN_USERNAME: &str = "x-access-token";

/// The credentials table as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSection {
    pub token_parameter: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub ssh_key_parameter: Option<Spanned<String>>,
    pub known_hosts: Option<Spanned<String>>,
    pub known_hosts_parameter: Option<Spanned<String>>,
}

/// How the agent authenticates to a repository. Only parameter names: never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RepoCredentials {
    /// HTTPS basic auth: `username` and the SecureString in `parameter` as the password.
    Token { parameter: String, username: String },
    /// SSH with the private key in `parameter`, trusting only `known_hosts`.
    SshKey {
        parameter: String,
        known_hosts: KnownHosts,
    },
}

impl RepoCredentials {
    /// The parameter holding the secret.
    pub fn parameter(&self) -> &str {
        match self {
            RepoCredentials::Token { parameter, .. }
            | RepoCredentials::SshKey { parameter, .. } => parameter,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KnownHosts {
    /// known_hosts lines, as written in user-data (host keys are public).
    Inline(String),
    /// An SSM parameter holding known_hosts lines.
    Parameter(String),
}

/// What kind of URL a repository has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlKind {
    Https,
    /// `http://`: never with a token (it would cross the network in clear).
    Http,
    /// `ssh://` or scp-like `user@host:path`.
    Ssh,
    /// A local path, `file://`, `git://` or anything else.
    Other,
}

pub fn url_kind(url: &str) -> UrlKind {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") {
        UrlKind::Https
    } else if lower.starts_with("http://") {
        UrlKind::Http
    } else if lower.starts_with("ssh://")
        || lower.starts_with("git+ssh://")
        || (!url.contains("://") && scp_like(url))
    {
        UrlKind::Ssh
    } else {
        UrlKind::Other
    }
}

/// `[user@]host:path`, as git reads it: a colon before any slash.
fn scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), Some(slash)) => colon > 0 && colon < slash,
        (Some(colon), None) => colon > 0,
        _ => false,
    }
}

/// Byte range of the credentials inside a URL (`user:password@` or `token@` of http(s), or
/// `user:password@` of ssh), if it has any. A plain ssh user (`git@`) is not a credential.
pub fn credentials_in_url(url: &str) -> Option<std::ops::Range<usize>> {
    let (scheme_end, kind) = match url.find("://") {
        Some(i) => (i + 3, url_kind(url)),
        None => return None,
    };
    let authority_end = url[scheme_end..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let at = authority.rfind('@')?;
    let userinfo = &authority[..at];
    let secret = match kind {
        UrlKind::Https | UrlKind::Http | UrlKind::Other => !userinfo.is_empty(),
        UrlKind::Ssh => userinfo.contains(':'),
    };
    secret.then(|| scheme_end..scheme_end + at + 1)
}

/// Checks a repository's URL and credentials table; `section` is `salt` or `config`.
pub(super) fn validate(
    doc: &Document,
    section: &str,
    repo: Option<&Spanned<String>>,
    creds: Option<&CredentialsSection>,
) -> Result<Option<RepoCredentials>, UserDataError> {
    if let Some(repo) = repo {
        if let Some(range) = credentials_in_url(repo.get_ref()) {
            let option = match url_kind(repo.get_ref()) {
                UrlKind::Ssh => format!("[{section}.credentials] ssh_key_parameter"),
                _ => format!("[{section}.credentials] token_parameter (and `username`)"),
            };
            // Never repeat the URL: it holds the secret.
            return Err(doc.error_at(
                doc.offset_in(repo, range.start),
                format!(
                    "[{section}] repo has credentials in its URL; they would show in `ps`, \
                     .git/config, logs and the state record. Remove them, keep the secret in an \
                     SSM SecureString parameter and name it with {option}"
                ),
            ));
        }
    }
    let Some(c) = creds else { return Ok(None) };
    let at = |v: &Spanned<String>| v.span().start;
    let first = [
        &c.token_parameter,
        &c.ssh_key_parameter,
        &c.username,
        &c.known_hosts,
        &c.known_hosts_parameter,
    ]
    .into_iter()
    .flatten()
    .next();
    let Some(first) = first else {
        return Err(UserDataError::whole(
            &doc.file,
            format!(
                "[{section}.credentials] is empty: set token_parameter (HTTPS) or \
                 ssh_key_parameter with known_hosts (SSH)"
            ),
        ));
    };
    let Some(repo) = repo else {
        return Err(doc.error_at(
            at(first),
            format!("[{section}.credentials] without a [{section}] repo"),
        ));
    };
    let kind = url_kind(repo.get_ref());
    for p in [
        &c.token_parameter,
        &c.ssh_key_parameter,
        &c.known_hosts_parameter,
    ]
    .into_iter()
    .flatten()
    {
        check_parameter_name(p.get_ref()).map_err(|m| doc.error_at(at(p), m))?;
    }
    match (&c.token_parameter, &c.ssh_key_parameter) {
        (Some(_), Some(ssh)) => Err(doc.error_at(
            at(ssh),
            format!(
                "[{section}.credentials] has both token_parameter and ssh_key_parameter; a \
                 repository uses one: a token for an https:// URL, a key for an SSH one"
            ),
        )),
        (None, None) => Err(doc.error_at(
            at(first),
            format!(
                "[{section}.credentials] needs token_parameter (HTTPS) or ssh_key_parameter (SSH)"
            ),
        )),
        (Some(token), None) => {
            if let Some(v) = c.known_hosts.as_ref().or(c.known_hosts_parameter.as_ref()) {
                return Err(doc.error_at(
                    at(v),
                    format!(
                        "[{section}.credentials] known_hosts and known_hosts_parameter are for \
                         ssh_key_parameter; an HTTPS token is checked against the CA \
                         certificates (ca_certificates) instead"
                    ),
                ));
            }
            if kind != UrlKind::Https {
                return Err(doc.error_at(
                    at(token),
                    format!(
                        "[{section}.credentials] token_parameter needs an https:// repo URL (a \
                         token would cross plain http:// in clear; SSH URLs take \
                         ssh_key_parameter)"
                    ),
                ));
            }
            let username = match &c.username {
                Some(u) => {
                    let name = u.get_ref();
                    if name.is_empty()
                        || name.contains(':')
                        || name.chars().any(|ch| ch.is_whitespace() || ch.is_control())
                    {
                        return Err(doc.error_at(
                            at(u),
                            format!(
                                "[{section}.credentials] username must be non-empty, without \
                                 `:` or spaces"
                            ),
                        ));
                    }
                    name.clone()
                }
                None => DEFAULT_TOKEN_USERNAME.to_string(),
            };
            Ok(Some(RepoCredentials::Token {
                parameter: token.get_ref().clone(),
                username,
            }))
        }
        (None, Some(key)) => {
            if let Some(u) = &c.username {
                return Err(doc.error_at(
                    at(u),
                    format!(
                        "[{section}.credentials] username goes with token_parameter; for SSH put \
                         the user in the URL (git@host:path)"
                    ),
                ));
            }
            if kind != UrlKind::Ssh {
                return Err(doc.error_at(
                    at(key),
                    format!(
                        "[{section}.credentials] ssh_key_parameter needs an SSH repo URL \
                         (ssh://git@host/path or git@host:path)"
                    ),
                ));
            }
            let known_hosts = match (&c.known_hosts, &c.known_hosts_parameter) {
                (Some(_), Some(p)) => {
                    return Err(doc.error_at(
                        at(p),
                        format!(
                            "[{section}.credentials] has both known_hosts and \
                             known_hosts_parameter; use one"
                        ),
                    ))
                }
                (None, None) => {
                    return Err(doc.error_at(
                        at(key),
                        format!(
                            "[{section}.credentials] ssh_key_parameter needs the host keys to \
                             trust: known_hosts (lines as in ~/.ssh/known_hosts, from \
                             `ssh-keyscan HOST` checked against the host's published \
                             fingerprints) or known_hosts_parameter; the agent never trusts a \
                             host key on first use"
                        ),
                    ))
                }
                (Some(inline), None) => {
                    check_known_hosts(inline.get_ref()).map_err(|m| {
                        doc.error_at(
                            at(inline),
                            format!("[{section}.credentials] known_hosts: {m}"),
                        )
                    })?;
                    KnownHosts::Inline(inline.get_ref().clone())
                }
                (None, Some(p)) => KnownHosts::Parameter(p.get_ref().clone()),
            };
            Ok(Some(RepoCredentials::SshKey {
                parameter: key.get_ref().clone(),
                known_hosts,
            }))
        }
    }
}

/// SSM parameter names: `[A-Za-z0-9_.-/]`, at most 2048 characters, or a parameter ARN.
fn check_parameter_name(name: &str) -> Result<(), String> {
    let bare = match name.strip_prefix("arn:") {
        Some(_) => name.split_once(":parameter").map(|(_, n)| n).unwrap_or(""),
        None => name,
    };
    let ok = !bare.is_empty()
        && bare.len() <= 2048
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not an SSM parameter name (letters, digits and _ . - /, such as \
             /stackless/github-token) or a parameter ARN"
        ))
    }
}

/// Each non-empty, non-comment line: `HOSTS KEYTYPE BASE64KEY [comment]` (or a marker first).
pub fn check_known_hosts(text: &str) -> Result<(), String> {
    let mut entries = 0;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first().is_some_and(|f| f.starts_with('@')) {
            fields.remove(0);
        }
        let valid = fields.len() >= 3
            && (fields[1].starts_with("ssh-")
                || fields[1].starts_with("ecdsa-")
                || fields[1].starts_with("sk-"))
            && fields[2]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
        if !valid {
            return Err(format!(
                "line {} is not `HOST KEYTYPE KEY` (as `ssh-keyscan HOST` prints)",
                i + 1
            ));
        }
        entries += 1;
    }
    if entries == 0 {
        return Err("no host keys".to_string());
    }
    Ok(())
}
