//! EC2 `CreateTags` on the agent's own instance (the Query API: a form-encoded POST, version
//! 2016-11-15), signed with the instance role. The endpoint is, in order:
//! `AWS_ENDPOINT_URL_EC2`, `AWS_ENDPOINT_URL`, the user-data `[aws] ec2_endpoint`, else
//! `https://ec2.REGION.amazonaws.com`. Errors name the action to allow and the instance's ARN.

use std::fmt;
use std::time::Duration;

use super::request::{self, Answer, InstanceRole};
use super::sigv4::{uri_encode, Credentials};
use crate::imds::{ImdsClient, ImdsError};

pub const ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL_EC2";
const API_VERSION: &str = "2016-11-15";

/// Why tags could not be written. Display is one line.
#[derive(Debug)]
pub enum Ec2Error {
    /// The instance has no role, or IMDS failed.
    Credentials(ImdsError),
    /// The role may not tag this instance.
    AccessDenied { instance_arn: String, role: String },
    /// AWS refused the credentials themselves, even fresh ones.
    CredentialsRefused { code: String },
    /// Retrying (throttling, 5xx, network) did not succeed before the deadline.
    Deadline {
        endpoint: String,
        last_error: String,
    },
    Aws {
        status: u16,
        code: String,
        message: String,
    },
}

impl Ec2Error {
    /// A refusal that stands until someone changes the instance's set-up (no role, IMDS off, a
    /// policy without the permission, credentials AWS refuses): trying again at every sync would
    /// only cost calls. Throttling, 5xx and the network are retried; they are not standing.
    /// The instance has no role to report with (or IMDS is off): a set-up without reporting
    /// rather than a failure, such as a VM outside EC2.
    pub fn is_no_role(&self) -> bool {
        matches!(
            self,
            Ec2Error::Credentials(ImdsError::NoRole | ImdsError::Disabled)
        )
    }

    pub fn is_standing(&self) -> bool {
        matches!(
            self,
            Ec2Error::AccessDenied { .. }
                | Ec2Error::CredentialsRefused { .. }
                | Ec2Error::Credentials(ImdsError::NoRole | ImdsError::Disabled)
        )
    }
}

impl fmt::Display for Ec2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ec2Error::Credentials(e) => {
                write!(f, "no credentials for the instance role: {e}")
            }
            Ec2Error::AccessDenied { instance_arn, role } => write!(
                f,
                "access denied; allow the instance role {role} the action ec2:CreateTags on \
                 {instance_arn} (see the README's reporting policy)"
            ),
            Ec2Error::CredentialsRefused { code } => write!(
                f,
                "AWS refused the instance role's credentials ({code}); check the instance clock \
                 and the role's session"
            ),
            Ec2Error::Deadline {
                endpoint,
                last_error,
            } => write!(
                f,
                "gave up on {endpoint} when the deadline passed (last error: {last_error}); check \
                 the route to EC2 (a VPC endpoint or a NAT gateway) or set {ENDPOINT_ENV}"
            ),
            Ec2Error::Aws {
                status,
                code,
                message,
            } => write!(f, "EC2 answered HTTP {status} {code}: {message}"),
        }
    }
}

impl std::error::Error for Ec2Error {}

/// The instance's ARN, as IAM policies name it.
pub fn instance_arn(region: &str, account: &str, instance_id: &str) -> String {
    request::arn("ec2", region, account, &format!("instance/{instance_id}"))
}

/// The form body of `CreateTags` on one resource.
pub fn create_tags_body(resource: &str, tags: &[(String, String)]) -> String {
    let mut body = format!(
        "Action=CreateTags&Version={API_VERSION}&ResourceId.1={}",
        uri_encode(resource.as_bytes())
    );
    for (i, (k, v)) in tags.iter().enumerate() {
        let n = i + 1;
        body.push_str(&format!(
            "&Tag.{n}.Key={}&Tag.{n}.Value={}",
            uri_encode(k.as_bytes()),
            uri_encode(v.as_bytes())
        ));
    }
    body
}

/// One `CreateTags` call with its retries.
pub struct CreateTags<'a> {
    pub call: request::Call<'a>,
    pub account: &'a str,
    /// The role name, for error messages.
    pub role: &'a str,
}

impl CreateTags<'_> {
    pub fn run(
        &self,
        instance_id: &str,
        tags: &[(String, String)],
        credentials: &Credentials,
    ) -> Result<(), Ec2Error> {
        let body = create_tags_body(instance_id, tags);
        let headers = [(
            "Content-Type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )];
        match self.call.post(&headers, body.as_bytes(), credentials) {
            Answer::Ok(_) => Ok(()),
            Answer::GaveUp { last_error } => Err(Ec2Error::Deadline {
                endpoint: self.call.endpoint.to_string(),
                last_error,
            }),
            Answer::Error {
                status,
                code,
                message,
            } => Err(match code.as_str() {
                // EC2 says UnauthorizedOperation; moto with IAM auth says AccessDenied.
                "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => {
                    Ec2Error::AccessDenied {
                        instance_arn: instance_arn(self.call.region, self.account, instance_id),
                        role: self.role.to_string(),
                    }
                }
                c if request::credentials_refused(c) => Ec2Error::CredentialsRefused { code },
                _ => Ec2Error::Aws {
                    status,
                    code,
                    message,
                },
            }),
        }
    }
}

/// Writes tags on this instance, as its role.
pub struct InstanceTagger {
    pub role: InstanceRole,
}

impl InstanceTagger {
    pub fn new(
        imds: ImdsClient,
        endpoint_setting: Option<&str>,
        deadline: Duration,
    ) -> Result<Self, ImdsError> {
        Ok(InstanceTagger {
            role: InstanceRole::new(imds, "ec2", ENDPOINT_ENV, endpoint_setting, deadline)?,
        })
    }

    /// The instance's ARN.
    pub fn arn(&self) -> String {
        let role = &self.role;
        instance_arn(&role.region, &role.account, &role.instance_id)
    }

    /// Writes `tags` (replacing the values of the same keys).
    pub fn write(&mut self, tags: &[(String, String)]) -> Result<(), Ec2Error> {
        // Made per write: the trust store may have changed since (the boot's trust step).
        let tls = super::tls::client_config();
        self.role.call(
            &tls,
            Ec2Error::Credentials,
            |e| matches!(e, Ec2Error::CredentialsRefused { .. }),
            |instance, call, creds| {
                CreateTags {
                    call,
                    account: &instance.account,
                    role: &creds.role,
                }
                .run(&instance.instance_id, tags, &creds.credentials)
            },
        )
    }
}

#[cfg(test)]
mod tests;
