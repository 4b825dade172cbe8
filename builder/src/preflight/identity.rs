//! Who is asking: credentials (and where they came from), the region, the caller's identity.

use super::Check;
use crate::aws::{classify, describe_error};
use aws_sdk_sts::config::ProvideCredentials;

/// The caller as STS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account: String,
    pub arn: String,
}

impl Caller {
    /// The IAM principal to simulate: an assumed role's session ARN
    /// (`arn:aws:sts::1:assumed-role/R/s`) stands for the role `arn:aws:iam::1:role/R` (a role
    /// with a path needs its full ARN: [`super::access::actions`] asks IAM for it).
    pub fn principal(&self) -> (String, Option<String>) {
        if let Some(rest) = self.arn.split(":assumed-role/").nth(1) {
            let role = rest.split('/').next().unwrap_or(rest);
            let partition = self.arn.split(':').nth(1).unwrap_or("aws");
            return (
                format!("arn:{partition}:iam::{}:role/{role}", self.account),
                Some(role.to_string()),
            );
        }
        (self.arn.clone(), None)
    }
}

/// What the provider chain's name means to a person.
pub fn source_of(provider: &str) -> String {
    let p = provider.to_ascii_lowercase();
    let profile = std::env::var("AWS_PROFILE")
        .ok()
        .map(|p| format!(" `{p}`"))
        .unwrap_or_default();
    if p.contains("environment") {
        "environment variables (AWS_ACCESS_KEY_ID)".into()
    } else if p.contains("sso") {
        format!("SSO (profile{profile})")
    } else if p.contains("webidentity") {
        "web identity (AWS_WEB_IDENTITY_TOKEN_FILE)".into()
    } else if p.contains("imds") {
        "the instance role (EC2 instance metadata)".into()
    } else if p.contains("ecs") || p.contains("container") {
        "the container role (ECS)".into()
    } else if p.contains("assumerole") {
        format!("an assumed role (profile{profile})")
    } else if p.contains("profile") {
        format!("the profile{profile} (~/.aws)")
    } else if p.contains("process") {
        format!("a credential_process (profile{profile})")
    } else {
        provider.to_string()
    }
}

/// The provider's name: `Credentials` only shows it in its Debug form (the secret is redacted
/// there).
pub fn provider_name(creds: &aws_sdk_sts::config::Credentials) -> String {
    let debug = format!("{creds:?}");
    debug
        .split("provider_name: \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("unknown")
        .to_string()
}

pub async fn credentials(config: &aws_config::SdkConfig) -> Check {
    const NAME: &str = "credentials";
    let Some(provider) = config.credentials_provider() else {
        return Check::failed(
            NAME,
            "no credentials provider is configured",
            "run `aws configure`, or set AWS_PROFILE",
        );
    };
    match provider.provide_credentials().await {
        Ok(creds) => {
            if let Some(expiry) = creds.expiry() {
                if expiry <= std::time::SystemTime::now() {
                    return Check::failed(
                        NAME,
                        format!("from {}, expired", source_of(&provider_name(&creds))),
                        "refresh them: `aws sso login` for an SSO profile, else new keys",
                    );
                }
            }
            Check::passed(NAME, format!("from {}", source_of(&provider_name(&creds))))
        }
        Err(e) => {
            let chain = crate::aws::error_chain(&e);
            let fix = classify(None, &chain).map(|s| s.line).unwrap_or_else(|| {
                "run `aws configure` or `aws sso login`, or set AWS_PROFILE".into()
            });
            let detail = if chain.to_ascii_lowercase().contains("sso") {
                "the SSO session has expired or was not started"
            } else {
                "none found (environment, profile, SSO, web identity, instance role)"
            };
            Check::failed(NAME, detail, fix)
        }
    }
}

pub fn region(config: &aws_config::SdkConfig) -> Check {
    match config.region() {
        Some(r) => Check::passed("region", r.to_string()),
        None => Check::failed(
            "region",
            "none set",
            "set AWS_REGION (like AWS_REGION=eu-west-1), or `region` in the profile (`aws configure`)",
        ),
    }
}

pub async fn caller(sts: &aws_sdk_sts::Client) -> (Check, Option<Caller>) {
    const NAME: &str = "caller";
    match sts.get_caller_identity().send().await {
        Ok(out) => {
            let caller = Caller {
                account: out.account().unwrap_or_default().to_string(),
                arn: out.arn().unwrap_or_default().to_string(),
            };
            (
                Check::passed(NAME, format!("{} (account {})", caller.arn, caller.account)),
                Some(caller),
            )
        }
        Err(e) => {
            let err = describe_error(&e);
            let fix = crate::aws::setup_error(&err)
                .map(|s| s.line.clone())
                .unwrap_or_else(|| {
                    "check the credentials with `aws sts get-caller-identity`".into()
                });
            (
                Check::failed(NAME, format!("sts:GetCallerIdentity failed: {err}"), fix),
                None,
            )
        }
    }
}
