//! The instance role's credentials from IMDS (`meta-data/iam/security-credentials/`), and a
//! cache that fetches new ones before the old ones expire.

use super::{ImdsClient, ImdsError};
use crate::aws::sigv4::Credentials;

const ROLE_LIST_PATH: &str = "/latest/meta-data/iam/security-credentials/";
/// Fetch new credentials when the cached ones have less than this left. EC2 rotates them about
/// an hour before they expire and the SDKs refresh within 5 to 15 minutes of the end.
pub const REFRESH_MARGIN_SECS: i64 = 15 * 60;

/// Role credentials and when they expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub role: String,
    pub credentials: Credentials,
    /// Seconds since the Unix epoch.
    pub expiration: i64,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsDocument {
    #[serde(default)]
    code: Option<String>,
    access_key_id: String,
    secret_access_key: String,
    token: String,
    expiration: String,
}

impl ImdsClient {
    /// The credentials of the instance profile's role. A missing instance profile is
    /// [`ImdsError::NoRole`].
    pub fn role_credentials(&mut self) -> Result<RoleCredentials, ImdsError> {
        let list = self.get(ROLE_LIST_PATH)?.ok_or(ImdsError::NoRole)?;
        let list = String::from_utf8_lossy(&list);
        let role = list
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or(ImdsError::NoRole)?
            .to_string();
        if !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
        {
            return Err(ImdsError::Invalid {
                what: self.what(ROLE_LIST_PATH),
                detail: "the role name is not an IAM role name".to_string(),
            });
        }
        let path = format!("{ROLE_LIST_PATH}{role}");
        let what = self.what(&path);
        let body = self.get(&path)?.ok_or(ImdsError::NoRole)?;
        credentials_from(role, what, &body)
    }
}

/// Reads the credentials document IMDS serves for `role` (`what` says where it came from).
pub(crate) fn credentials_from(
    role: String,
    what: String,
    body: &[u8],
) -> Result<RoleCredentials, ImdsError> {
    // Never quote the body in an error: it holds the secret key.
    let doc: CredentialsDocument =
        serde_json::from_slice(body).map_err(|e| ImdsError::Invalid {
            what: what.clone(),
            detail: format!(
                "the credentials document is not the JSON EC2 serves (at line {}, column {})",
                e.line(),
                e.column()
            ),
        })?;
    if let Some(code) = doc.code.as_deref().filter(|c| *c != "Success") {
        return Err(ImdsError::Invalid {
            what,
            detail: format!("the credentials document says Code {code:?}, not \"Success\""),
        });
    }
    let expiration =
        crate::aws::sigv4::parse_utc(&doc.expiration).ok_or_else(|| ImdsError::Invalid {
            what: what.clone(),
            detail: format!(
                "Expiration {:?} is not an RFC 3339 UTC time",
                doc.expiration
            ),
        })?;
    Ok(RoleCredentials {
        role,
        credentials: Credentials {
            access_key_id: doc.access_key_id,
            secret_access_key: doc.secret_access_key,
            session_token: Some(doc.token),
        },
        expiration,
    })
}

/// Role credentials kept between uses, fetched again when less than [`REFRESH_MARGIN_SECS`] is
/// left (or when a caller says they were refused).
#[derive(Debug, Default)]
pub struct CredentialCache {
    cached: Option<RoleCredentials>,
}

impl CredentialCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Valid credentials at `now` (Unix seconds), from the cache or from `imds`.
    pub fn get(&mut self, imds: &mut ImdsClient, now: i64) -> Result<&RoleCredentials, ImdsError> {
        let fresh = self
            .cached
            .as_ref()
            .is_some_and(|c| c.expiration - now > REFRESH_MARGIN_SECS);
        if !fresh {
            let creds = imds.role_credentials()?;
            tracing::debug!(
                role = %creds.role,
                expires_in_secs = creds.expiration - now,
                "fetched the instance role's credentials from IMDS"
            );
            self.cached = Some(creds);
        }
        Ok(self.cached.as_ref().expect("cached just now"))
    }

    /// Forget the cached credentials (AWS refused them).
    pub fn invalidate(&mut self) {
        self.cached = None;
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
