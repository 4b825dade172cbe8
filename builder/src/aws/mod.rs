//! What bake and deploy share about AWS: one line per SDK error, the error codes that mean
//! "throttled", tag filters and tag specifications, the waiter, and terminating instances.
//! Each bake step and each deploy step is its own module elsewhere; what they all need about
//! talking to AWS lives here once.

pub mod instances;
pub mod waiter;

use anyhow::anyhow;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_ec2::types::{
    Filter, IamInstanceProfileSpecification, ResourceType, Tag, TagSpecification,
};
use std::collections::BTreeMap;

/// An SDK error as one line: the service's code and message when it answered, else the whole
/// chain (a connection that failed, a timeout).
pub fn aws_error<E>(e: E) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error,
{
    describe_error(&e)
}

/// [`aws_error`] for an error still needed afterwards.
pub fn describe_error<E>(e: &E) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error,
{
    let chain = error_chain(e);
    if let Some(setup) = classify(e.code(), &chain) {
        return anyhow::Error::new(setup);
    }
    match (e.code(), e.message()) {
        (Some(code), Some(msg)) => anyhow!("{code}: {msg}"),
        (Some(code), None) => anyhow!("{code}"),
        _ => anyhow!("{}", DisplayErrorContext(e)),
    }
}

/// A problem with the caller's AWS set-up (no credentials, an expired SSO session, no or a wrong
/// region, an endpoint that cannot be reached) rather than with the request: one line naming the
/// fix. `main` prints only this line when an error's chain holds one, since the context around it
/// ("listing images needs ec2:DescribeImages") would point the wrong way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError {
    pub kind: SetupKind,
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupKind {
    NoCredentials,
    SsoExpired,
    CredentialsExpired,
    CredentialsRejected,
    NoRegion,
    Unreachable,
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

impl std::error::Error for SetupError {}

impl SetupError {
    /// Whether it can happen half-way through a command (credentials expire, the network
    /// drops), when what the command was doing still matters; a missing credential or region
    /// stops the first call.
    pub fn mid_run(&self) -> bool {
        matches!(
            self.kind,
            SetupKind::SsoExpired | SetupKind::CredentialsExpired | SetupKind::Unreachable
        )
    }
}

/// The set-up error somewhere in an anyhow chain, if any.
pub fn setup_error(e: &anyhow::Error) -> Option<&SetupError> {
    e.chain().find_map(|c| c.downcast_ref::<SetupError>())
}

/// Every error in the source chain, each as its Display and Debug text (the SDK hides the
/// provider chain's reason in the Debug form of some sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cur {
        out.push_str(&c.to_string());
        out.push('\n');
        out.push_str(&format!("{c:?}"));
        out.push('\n');
        cur = c.source();
    }
    out
}

/// Classifies an SDK failure by the service's error code, or else by the text of its source
/// chain (dispatch and construction failures carry no code).
pub fn classify(code: Option<&str>, chain: &str) -> Option<SetupError> {
    let setup = |kind, line: &str| {
        Some(SetupError {
            kind,
            line: line.to_string(),
        })
    };
    match code {
        Some("ExpiredToken" | "ExpiredTokenException" | "RequestExpired") => {
            return setup(
                SetupKind::CredentialsExpired,
                "the AWS credentials have expired: refresh them (`aws sso login` for an SSO profile, else new keys via `aws configure` or your credentials process)",
            )
        }
        Some(
            "InvalidClientTokenId"
            | "UnrecognizedClientException"
            | "AuthFailure"
            | "SignatureDoesNotMatch"
            | "InvalidAccessKeyId",
        ) => {
            return setup(
                SetupKind::CredentialsRejected,
                "AWS rejected the credentials (unknown key or bad secret): check them with `aws sts get-caller-identity`, fix them with `aws configure`, or pick another profile with AWS_PROFILE",
            )
        }
        Some(_) => return None,
        None => {}
    }
    let lower = chain.to_ascii_lowercase();
    let has = |s: &str| lower.contains(s);
    if has("sso") && (has("expired") || has("token has expired") || has("refresh")) {
        return setup(
            SetupKind::SsoExpired,
            "the AWS SSO session has expired or was never started: run `aws sso login` (with --profile NAME, or AWS_PROFILE set to the profile)",
        );
    }
    if has("expiredtoken")
        || has("token has expired")
        || has("security token included in the request is expired")
    {
        return setup(
            SetupKind::CredentialsExpired,
            "the AWS credentials have expired: refresh them (`aws sso login` for an SSO profile, else new keys via `aws configure`)",
        );
    }
    if has("credentialsnotloaded")
        || has("no providers in chain provided credentials")
        || has("failed to load credentials")
        || has("the credential provider was not enabled")
        || has("no credentials provider")
    {
        return setup(
            SetupKind::NoCredentials,
            "no AWS credentials found: run `aws configure` (or `aws sso login`), set AWS_PROFILE to a configured profile, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        );
    }
    if has("providererror") && has("credential") {
        return setup(
            SetupKind::NoCredentials,
            "the AWS credentials could not be loaded (the profile's provider failed): check the profile with `aws sts get-caller-identity`, run `aws configure` or `aws sso login`, or set AWS_PROFILE",
        );
    }
    if has("missing region") || has("a region must be set") || has("no region") {
        return setup(
            SetupKind::NoRegion,
            "no AWS region set: set AWS_REGION (like AWS_REGION=eu-west-1), or `region` in your profile (`aws configure`)",
        );
    }
    if has("dns error")
        || has("failed to lookup address")
        || has("name or service not known")
        || has("no such host")
        || has("nodename nor servname")
    {
        return setup(
            SetupKind::Unreachable,
            "the AWS endpoint's name does not resolve: check AWS_REGION (is it a real region, like eu-west-1?), AWS_ENDPOINT_URL if set, and this machine's DNS",
        );
    }
    if has("connection refused")
        || has("timed out")
        || has("timeouterror")
        || has("network is unreachable")
        || has("connection reset")
        || has("io error")
    {
        return setup(
            SetupKind::Unreachable,
            "the AWS endpoint cannot be reached: check the network (proxy, firewall, HTTPS_PROXY), AWS_ENDPOINT_URL if set, and AWS_REGION",
        );
    }
    None
}

/// The service's error code (`InvalidAMIID.NotFound`), if the service answered with one.
pub fn error_code<E: ProvideErrorMetadata>(e: &E) -> Option<&str> {
    e.code()
}

/// Codes AWS answers with when it throttles: waits keep going on them.
pub fn is_throttling(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "Throttling"
                | "ThrottlingException"
                | "ThrottledException"
                | "RequestLimitExceeded"
                | "RequestThrottled"
                | "TooManyRequestsException"
                | "SlowDown"
        )
    )
}

/// A describe filter with one value.
pub fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// The filter for resources tagged `key=value`.
pub fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// Tags for a resource created by RunInstances, CreateSecurityGroup and the like.
pub fn tag_spec(kind: ResourceType, tags: &BTreeMap<String, String>) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .build()
}

/// An instance profile given by name or by ARN, as RunInstances and launch templates take it.
pub fn instance_profile(profile: &str) -> IamInstanceProfileSpecification {
    let spec = IamInstanceProfileSpecification::builder();
    if profile.starts_with("arn:") {
        spec.arn(profile).build()
    } else {
        spec.name(profile).build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_profile_is_a_name_or_an_arn() {
        let arn = "arn:aws:iam::123456789012:instance-profile/web";
        assert_eq!(instance_profile(arn).arn(), Some(arn));
        assert_eq!(instance_profile("web").name(), Some("web"));
        assert_eq!(instance_profile("web").arn(), None);
    }

    #[test]
    fn throttling_codes_are_known_and_others_are_not() {
        assert!(is_throttling(Some("RequestLimitExceeded")));
        assert!(is_throttling(Some("ThrottlingException")));
        assert!(!is_throttling(Some("InvalidInstanceID.NotFound")));
        assert!(!is_throttling(None));
    }

    #[test]
    fn setup_errors_get_one_line_with_the_fix() {
        let no_creds = "dispatch failure\nDispatchFailure(DispatchFailure { source: ConnectorError { kind: Other(None), source: CredentialsNotLoaded(CredentialsNotLoaded { source: Some(\"no providers in chain provided credentials\") }) } })";
        let e = classify(None, no_creds).unwrap();
        assert_eq!(e.kind, SetupKind::NoCredentials);
        assert!(e.line.contains("aws configure") && e.line.contains("AWS_PROFILE"));
        assert!(!e.line.contains('\n'));
        let sso = classify(
            None,
            "ProviderError { source: \"the SSO token has expired\" }",
        )
        .unwrap();
        assert_eq!(sso.kind, SetupKind::SsoExpired);
        assert!(sso.line.contains("aws sso login"));
        let region = classify(
            None,
            "ResolveEndpointError { message: \"Invalid Configuration: Missing Region\" }",
        )
        .unwrap();
        assert_eq!(region.kind, SetupKind::NoRegion);
        assert!(region.line.contains("AWS_REGION"));
        let dns = classify(
            None,
            "io error: dns error: failed to lookup address information",
        )
        .unwrap();
        assert_eq!(dns.kind, SetupKind::Unreachable);
        assert!(dns.line.contains("AWS_REGION"));
        let refused =
            classify(None, "tcp connect error: Connection refused (os error 111)").unwrap();
        assert_eq!(refused.kind, SetupKind::Unreachable);
        assert_eq!(
            classify(Some("ExpiredToken"), "").unwrap().kind,
            SetupKind::CredentialsExpired
        );
        assert_eq!(
            classify(Some("AuthFailure"), "").unwrap().kind,
            SetupKind::CredentialsRejected
        );
        assert_eq!(
            classify(Some("InvalidAMIID.NotFound"), "connection refused"),
            None
        );
        assert_eq!(classify(None, "some other failure"), None);
    }
}
