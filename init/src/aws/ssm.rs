//! SSM Parameter Store `GetParameter` (with decryption), signed with the instance role.
//!
//! The endpoint is, in order: `AWS_ENDPOINT_URL_SSM`, `AWS_ENDPOINT_URL` (the variables the AWS
//! SDKs read), the user-data setting, else `https://ssm.REGION.amazonaws.com`. Throttling, 5xx
//! and transport errors are retried with backoff inside one deadline; refused credentials are
//! fetched again from IMDS once. Errors name the parameter, its ARN and the IAM action to allow;
//! no error, log line or Debug output ever carries the value.

use std::fmt;
use std::time::{Duration, Instant};

use super::request::{self, InstanceRole};
use super::sigv4::Credentials;
use crate::imds::{ImdsClient, ImdsError};

pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_SSM";
pub use super::request::GLOBAL_ENDPOINT_ENV;

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
    request::endpoint("ssm", ENDPOINT_ENV, region, setting)
}

#[cfg(test)]
fn endpoint_from(
    ssm_env: Option<&str>,
    global_env: Option<&str>,
    setting: Option<&str>,
    region: &str,
) -> String {
    request::endpoint_from(ssm_env, global_env, setting, "ssm", region)
}

/// The parameter's ARN, as IAM policies name it.
pub fn parameter_arn(name: &str, region: &str, account: &str) -> String {
    if name.starts_with("arn:") {
        return name.to_string();
    }
    let resource = format!("parameter/{}", name.trim_start_matches('/'));
    request::arn("ssm", region, account, &resource)
}

/// Reads parameters for the agent, as the instance's role.
pub struct ParameterReader {
    pub role: InstanceRole,
    /// Read when the reader is made: after the boot's trust step.
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl ParameterReader {
    /// `imds` must be able to answer for the whole of `deadline`.
    pub fn new(
        imds: ImdsClient,
        endpoint_setting: Option<&str>,
        deadline: Duration,
    ) -> Result<Self, ImdsError> {
        Ok(ParameterReader {
            role: InstanceRole::new(imds, "ssm", ENDPOINT_ENV, endpoint_setting, deadline)?,
            tls: super::tls::client_config(),
        })
    }

    /// The decrypted value of `name`.
    pub fn get(&mut self, name: &str) -> Result<Secret, SsmError> {
        self.role.call(
            &self.tls,
            |source| SsmError::Credentials {
                parameter: name.to_string(),
                source,
            },
            |e| matches!(e, SsmError::CredentialsRefused { .. }),
            |instance, call, creds| {
                GetParameter {
                    endpoint: call.endpoint,
                    region: call.region,
                    account: &instance.account,
                    role: &creds.role,
                    deadline: call.deadline,
                    tls: call.tls,
                }
                .run(name, &creds.credentials)
            },
        )
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

impl GetParameter<'_> {
    pub fn run(&self, name: &str, credentials: &Credentials) -> Result<Secret, SsmError> {
        let body = serde_json::json!({ "Name": name, "WithDecryption": true }).to_string();
        let call = request::Call {
            endpoint: self.endpoint,
            region: self.region,
            service: "ssm",
            deadline: self.deadline,
            tls: self.tls.clone(),
        };
        let headers = [
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Target", "AmazonSSM.GetParameter"),
        ];
        match call.post(&headers, body.as_bytes(), credentials) {
            request::Answer::Ok(text) => self.value(name, &text),
            request::Answer::Error {
                status,
                code,
                message,
            } => Err(self.failure(name, status, code, message)),
            request::Answer::GaveUp { last_error } => Err(SsmError::Deadline {
                parameter: name.to_string(),
                endpoint: self.endpoint.to_string(),
                last_error,
            }),
        }
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

    fn failure(&self, name: &str, status: u16, code: String, message: String) -> SsmError {
        let arn = parameter_arn(name, self.region, self.account);
        let parameter = name.to_string();
        let lower = message.to_ascii_lowercase();
        let kms = code.starts_with("KMS.") || lower.contains("kms");
        match code.as_str() {
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
            c if request::credentials_refused(c) => {
                SsmError::CredentialsRefused { parameter, code }
            }
            _ => SsmError::Aws {
                parameter,
                status,
                code,
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests;
