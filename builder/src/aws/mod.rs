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
    match (e.code(), e.message()) {
        (Some(code), Some(msg)) => anyhow!("{code}: {msg}"),
        (Some(code), None) => anyhow!("{code}"),
        _ => anyhow!("{}", DisplayErrorContext(e)),
    }
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
}
