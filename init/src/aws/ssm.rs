//! SSM Parameter Store `GetParameter` (with decryption), signed with the instance role.
//!
//! The endpoint is, in order: `AWS_ENDPOINT_URL_SSM`, `AWS_ENDPOINT_URL` (the variables the AWS
//! SDKs read), the user-data setting, else `https://ssm.REGION.amazonaws.com`. Throttling, 5xx
//! and transport errors are retried with backoff inside one deadline; refused credentials are
//! fetched again from IMDS once. Errors name the parameter, its ARN and the IAM action to allow;
//! no error, log line or Debug output ever carries the value.

use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use super::sigv4::{self, Credentials};
use crate::imds::role::{unix_now, CredentialCache};
use crate::imds::{ImdsClient, ImdsError};

pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_SSM";
pub const GLOBAL_ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(3);
const MAX_BODY: u64 = 256 * 1024;

/// A secret value. Debug and Display never show it; the memory is zeroed when dropped.
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The value itself: hand it to git and nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        for b in bytes.iter_mut() {
            // SAFETY: a valid, aligned, exclusive reference to a byte of the vector.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Why a parameter could not be read. Display is one line, names the parameter, never its value.
#[derive(Debug)]
pub enum SsmError {
    /// The instance has no role, or IMDS failed.
    Credentials {
        parameter: String,
        source: ImdsError,
    },
    /// The role may not call ssm:GetParameter on the parameter.
    AccessDenied {
        parameter: String,
        arn: String,
        role: String,
    },
    /// SSM could not decrypt the SecureString: the role may not use the KMS key.
    KmsDenied {
        parameter: String,
        arn: String,
        role: String,
        region: String,
    },
    NotFound {
        parameter: String,
        arn: String,
    },
    /// AWS refused the credentials themselves, even fresh ones.
    CredentialsRefused {
        parameter: String,
        code: String,
    },
    /// Retrying (throttling, 5xx, network) did not succeed before the deadline.
    Deadline {
        parameter: String,
        endpoint: String,
        last_error: String,
    },
    /// Any other answer AWS gives (a bad name, a bad endpoint, ...).
    Aws {
        parameter: String,
        status: u16,
        code: String,
        message: String,
    },
}

impl fmt::Display for SsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SsmError::Credentials { parameter, source } => write!(
                f,
                "cannot read SSM parameter {parameter}: no credentials for the instance role: {source}"
            ),
            SsmError::AccessDenied { parameter, arn, role } => write!(
                f,
                "cannot read SSM parameter {parameter}: access denied; allow the instance role \
                 {role} the action ssm:GetParameter on {arn}"
            ),
            SsmError::KmsDenied {
                parameter,
                arn,
                role,
                region,
            } => write!(
                f,
                "cannot decrypt SSM parameter {parameter} ({arn}): KMS refused; allow the \
                 instance role {role} kms:Decrypt on the parameter's KMS key (with the condition \
                 kms:ViaService = ssm.{region}.amazonaws.com), and check the key policy"
            ),
            SsmError::NotFound { parameter, arn } => write!(
                f,
                "SSM parameter {parameter} does not exist ({arn}); check its name and region, or \
                 create it with `aws ssm put-parameter --name {parameter} --type SecureString \
                 --value ...`"
            ),
            SsmError::CredentialsRefused { parameter, code } => write!(
                f,
                "cannot read SSM parameter {parameter}: AWS refused the instance role's \
                 credentials ({code}); check the instance clock and the role's session"
            ),
            SsmError::Deadline {
                parameter,
                endpoint,
                last_error,
            } => write!(
                f,
                "cannot read SSM parameter {parameter} from {endpoint}: gave up when the deadline \
                 passed (last error: {last_error}); check the route to SSM (a VPC endpoint or a \
                 NAT gateway) or set {ENDPOINT_ENV}"
            ),
            SsmError::Aws {
                parameter,
                status,
                code,
                message,
            } => write!(
                f,
                "cannot read SSM parameter {parameter}: SSM answered HTTP {status} {code}: {message}"
            ),
        }
    }
}

impl std::error::Error for SsmError {}

/// The SSM endpoint: the environment's, else the user-data setting, else the region's.
pub fn endpoint(region: &str, setting: Option<&str>) -> String {
    endpoint_from(
        std::env::var(ENDPOINT_ENV).ok().as_deref(),
        std::env::var(GLOBAL_ENDPOINT_ENV).ok().as_deref(),
        setting,
        region,
    )
}

fn endpoint_from(
    ssm_env: Option<&str>,
    global_env: Option<&str>,
    setting: Option<&str>,
    region: &str,
) -> String {
    let chosen = [ssm_env, global_env, setting]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|v| !v.is_empty());
    match chosen {
        Some(endpoint) => endpoint.trim_end_matches('/').to_string(),
        None if region.starts_with("cn-") => format!("https://ssm.{region}.amazonaws.com.cn"),
        None => format!("https://ssm.{region}.amazonaws.com"),
    }
}

fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The parameter's ARN, as IAM policies name it.
pub fn parameter_arn(name: &str, region: &str, account: &str) -> String {
    if name.starts_with("arn:") {
        return name.to_string();
    }
    let account = if account.is_empty() {
        "ACCOUNT"
    } else {
        account
    };
    format!(
        "arn:{}:ssm:{region}:{account}:parameter/{}",
        partition(region),
        name.trim_start_matches('/')
    )
}

/// Reads parameters for the agent: the role's credentials from IMDS (cached, refreshed before
/// they expire), the region and account from the identity document.
pub struct ParameterReader {
    pub region: String,
    pub account: String,
    pub endpoint: String,
    imds: ImdsClient,
    cache: CredentialCache,
    deadline: Duration,
    /// Read when the reader is made: after the boot's trust step.
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl ParameterReader {
    /// `imds` must be able to answer for the whole of `deadline`.
    pub fn new(
        mut imds: ImdsClient,
        endpoint_setting: Option<&str>,
        deadline: Duration,
    ) -> Result<Self, ImdsError> {
        let identity = imds.identity()?;
        Ok(ParameterReader {
            endpoint: endpoint(&identity.region, endpoint_setting),
            region: identity.region,
            account: identity.account_id,
            imds,
            cache: CredentialCache::new(),
            deadline,
            tls: super::tls::client_config(),
        })
    }

    /// The decrypted value of `name`.
    pub fn get(&mut self, name: &str) -> Result<Secret, SsmError> {
        let deadline = Instant::now() + self.deadline;
        let mut refreshed = false;
        loop {
            let creds = self
                .cache
                .get(&mut self.imds, unix_now())
                .map_err(|source| SsmError::Credentials {
                    parameter: name.to_string(),
                    source,
                })?
                .clone();
            let call = GetParameter {
                endpoint: &self.endpoint,
                region: &self.region,
                account: &self.account,
                role: &creds.role,
                deadline,
                tls: self.tls.clone(),
            };
            match call.run(name, &creds.credentials) {
                Err(SsmError::CredentialsRefused { .. }) if !refreshed => {
                    // Rotated or revoked under us: fetch them again, once.
                    tracing::info!(
                        parameter = name,
                        "SSM refused the cached role credentials; fetching new ones"
                    );
                    self.cache.invalidate();
                    refreshed = true;
                }
                result => return result,
            }
        }
    }
}

/// One GetParameter call with its retries.
pub struct GetParameter<'a> {
    pub endpoint: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    /// The role name, for error messages.
    pub role: &'a str,
    pub deadline: Instant,
    /// What to trust ([`super::tls::client_config`]).
    pub tls: std::sync::Arc<rustls::ClientConfig>,
}

enum Attempt {
    Done(Result<Secret, SsmError>),
    Retry(String),
}

impl GetParameter<'_> {
    pub fn run(&self, name: &str, credentials: &Credentials) -> Result<Secret, SsmError> {
        let mut delay = BACKOFF_START;
        let mut last_error = String::from("no request could be made before the deadline");
        loop {
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match self.once(name, credentials, remaining) {
                Attempt::Done(result) => return result,
                Attempt::Retry(error) => {
                    tracing::debug!(parameter = name, "GetParameter: {error}; retrying");
                    last_error = error;
                }
            }
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if delay >= remaining {
                break;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(BACKOFF_CAP);
        }
        Err(SsmError::Deadline {
            parameter: name.to_string(),
            endpoint: self.endpoint.to_string(),
            last_error,
        })
    }

    fn once(&self, name: &str, credentials: &Credentials, remaining: Duration) -> Attempt {
        let body = serde_json::json!({ "Name": name, "WithDecryption": true }).to_string();
        let host = host_of(self.endpoint);
        let headers = vec![
            ("Host".to_string(), host.to_string()),
            (
                "Content-Type".to_string(),
                "application/x-amz-json-1.1".to_string(),
            ),
            (
                "X-Amz-Target".to_string(),
                "AmazonSSM.GetParameter".to_string(),
            ),
        ];
        let amz_date = sigv4::amz_date(unix_now());
        let signed = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: headers.clone(),
                body: body.as_bytes(),
            },
            &sigv4::Scope {
                region: self.region,
                service: "ssm",
                amz_date: &amz_date,
                content_sha256_header: false,
            },
            credentials,
        );
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT.min(remaining))
            .timeout(REQUEST_TIMEOUT.min(remaining))
            .redirects(0)
            .user_agent(concat!("stackless-init/", env!("CARGO_PKG_VERSION")))
            .tls_config(self.tls.clone())
            .build();
        let mut request = agent.post(&format!("{}/", self.endpoint));
        for (n, v) in &headers {
            request = request.set(n, v);
        }
        for (n, v) in &signed.headers {
            request = request.set(n, v);
        }
        let (status, response) = match request.send_bytes(body.as_bytes()) {
            Ok(response) => (response.status(), response),
            Err(ureq::Error::Status(status, response)) => (status, response),
            Err(ureq::Error::Transport(t)) => return Attempt::Retry(format!("{t}")),
        };
        let mut text = Vec::new();
        if let Err(e) = response.into_reader().take(MAX_BODY).read_to_end(&mut text) {
            return Attempt::Retry(format!("reading the answer failed: {e}"));
        }
        if status == 200 {
            return Attempt::Done(self.value(name, &text));
        }
        self.failure(name, status, &text)
    }

    fn value(&self, name: &str, body: &[u8]) -> Result<Secret, SsmError> {
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(rename = "Parameter")]
            parameter: Parameter,
        }
        #[derive(serde::Deserialize)]
        struct Parameter {
            #[serde(rename = "Value")]
            value: String,
        }
        // The error must not quote the body: it holds the value.
        serde_json::from_slice::<Answer>(body)
            .map(|a| Secret::new(a.parameter.value))
            .map_err(|_| SsmError::Aws {
                parameter: name.to_string(),
                status: 200,
                code: "InvalidResponse".to_string(),
                message: "the answer is not a GetParameter result; check the SSM endpoint"
                    .to_string(),
            })
    }

    fn failure(&self, name: &str, status: u16, body: &[u8]) -> Attempt {
        let (code, message) = error_code(body);
        let arn = parameter_arn(name, self.region, self.account);
        let parameter = name.to_string();
        let lower = message.to_ascii_lowercase();
        let kms = code.starts_with("KMS.") || lower.contains("kms");
        let error = match code.as_str() {
            "ThrottlingException"
            | "Throttling"
            | "TooManyRequestsException"
            | "RequestLimitExceeded" => {
                return Attempt::Retry(format!("HTTP {status} {code}"));
            }
            _ if status == 429 || status >= 500 => {
                return Attempt::Retry(format!("HTTP {status} {code}"));
            }
            "ParameterNotFound" => SsmError::NotFound { parameter, arn },
            c if kms
                && (c.contains("AccessDenied") || c.starts_with("KMS.") || c == "InvalidKeyId") =>
            {
                SsmError::KmsDenied {
                    parameter,
                    arn,
                    role: self.role.to_string(),
                    region: self.region.to_string(),
                }
            }
            "AccessDeniedException" | "AccessDenied" => SsmError::AccessDenied {
                parameter,
                arn,
                role: self.role.to_string(),
            },
            "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch" => SsmError::CredentialsRefused { parameter, code },
            _ => SsmError::Aws {
                parameter,
                status,
                code,
                message: message.chars().take(300).collect(),
            },
        };
        Attempt::Done(Err(error))
    }
}

/// `__type` (without its namespace prefix) and `message` of an AWS JSON error, or what can be
/// made of an XML one (moto answers some authentication errors in XML).
fn error_code(body: &[u8]) -> (String, String) {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let code = value["__type"]
            .as_str()
            .or(value["code"].as_str())
            .unwrap_or("")
            .rsplit('#')
            .next()
            .unwrap_or("")
            .to_string();
        let message = value["message"]
            .as_str()
            .or(value["Message"].as_str())
            .unwrap_or("")
            .to_string();
        return (code, message);
    }
    let text = String::from_utf8_lossy(body);
    let between = |open: &str, close: &str| {
        text.split_once(open)
            .and_then(|(_, rest)| rest.split_once(close))
            .map(|(v, _)| v.trim().to_string())
            .unwrap_or_default()
    };
    (
        between("<Code>", "</Code>"),
        between("<Message>", "</Message>"),
    )
}

/// `host[:port]` of `scheme://host[:port]/...`.
fn host_of(endpoint: &str) -> &str {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

#[cfg(test)]
mod tests;
