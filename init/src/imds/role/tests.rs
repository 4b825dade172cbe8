use super::*;
use crate::imds::emulator::{Emulator, EmulatorConfig, RoleConfig};
use crate::imds::Identity;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

fn role(key: &str, expiration: i64) -> RoleConfig {
    RoleConfig {
        name: "stackless-web".to_string(),
        access_key_id: key.to_string(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_string(),
        token: "IQoJb3JpZ2luX2VjEXAMPLETOKEN//+=".to_string(),
        expiration: rfc3339(expiration),
    }
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(unix, 0)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[test]
fn reads_the_role_credentials() {
    let expires = unix_now() + 6 * 3600;
    let emu = Emulator::start(
        EmulatorConfig::new(Identity::example()).with_role(role("ASIAEXAMPLE1", expires)),
    )
    .expect("emulator");
    let mut client = ImdsClient::new(&emu.endpoint(), LONG);
    let creds = client.role_credentials().expect("credentials");
    assert_eq!(creds.role, "stackless-web");
    assert_eq!(creds.credentials.access_key_id, "ASIAEXAMPLE1");
    assert_eq!(
        creds.credentials.session_token.as_deref(),
        Some("IQoJb3JpZ2luX2VjEXAMPLETOKEN//+=")
    );
    assert_eq!(creds.expiration, expires);
    let paths: Vec<String> = emu.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/latest/api/token",
            "/latest/meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/security-credentials/stackless-web"
        ]
    );
}

#[test]
fn no_instance_profile_says_so() {
    let emu = Emulator::start(EmulatorConfig::new(Identity::example())).expect("emulator");
    let mut client = ImdsClient::new(&emu.endpoint(), LONG);
    let err = client.role_credentials().expect_err("no role");
    assert!(matches!(err, ImdsError::NoRole), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("no IAM role") && text.contains("associate-iam-instance-profile"),
        "{text}"
    );
}

#[test]
fn cache_refreshes_before_expiration() {
    let now = unix_now();
    let emu = Emulator::start(
        EmulatorConfig::new(Identity::example()).with_role(role("ASIAFIRST", now + 3600)),
    )
    .expect("emulator");
    let mut client = ImdsClient::new(&emu.endpoint(), LONG);
    let mut cache = CredentialCache::new();
    assert_eq!(
        cache
            .get(&mut client, now)
            .unwrap()
            .credentials
            .access_key_id,
        "ASIAFIRST"
    );
    // EC2 rotated the credentials; the cached ones still have long to live: no request.
    emu.set_role(Some(role("ASIASECOND", now + 7200)));
    let before = emu.requests().len();
    assert_eq!(
        cache
            .get(&mut client, now + 60)
            .unwrap()
            .credentials
            .access_key_id,
        "ASIAFIRST"
    );
    assert_eq!(emu.requests().len(), before);
    // Within the margin of the expiration: fetched again.
    let later = now + 3600 - REFRESH_MARGIN_SECS + 1;
    assert_eq!(
        cache
            .get(&mut client, later)
            .unwrap()
            .credentials
            .access_key_id,
        "ASIASECOND"
    );
    cache.invalidate();
    emu.set_role(Some(role("ASIATHIRD", now + 7200)));
    assert_eq!(
        cache
            .get(&mut client, now)
            .unwrap()
            .credentials
            .access_key_id,
        "ASIATHIRD"
    );
}

#[test]
fn errors_never_quote_the_secret() {
    let emu = Emulator::start(
        EmulatorConfig::new(Identity::example()).with_role(RoleConfig {
            expiration: "tomorrow".to_string(),
            ..role("ASIAEXAMPLE1", 0)
        }),
    )
    .expect("emulator");
    let mut client = ImdsClient::new(&emu.endpoint(), LONG);
    let err = client.role_credentials().expect_err("bad expiration");
    let text = err.to_string();
    assert!(text.contains("Expiration"), "{text}");
    assert!(!text.contains("EXAMPLEKEY") && !text.contains("EXAMPLETOKEN"));
}

/// botocore's own IMDS fetchers (the ones the AWS CLI uses on EC2) read region, user-data and
/// role credentials from the emulator exactly as from EC2.
#[test]
fn botocore_reads_the_emulator() {
    let python = crate::aws::test_support::python_with_botocore();
    let expires = unix_now() + 6 * 3600;
    let mut identity = Identity::example();
    identity.region = "ap-southeast-2".to_string();
    identity.availability_zone = "ap-southeast-2b".to_string();
    let emu = Emulator::start(
        EmulatorConfig::new(identity)
            .with_user_data("[salt]\nrepo = \"x\"\n")
            .with_role(role("ASIABOTOCORE", expires)),
    )
    .expect("emulator");
    let script = r#"
import json, sys
from botocore.utils import IMDSFetcher, InstanceMetadataFetcher, InstanceMetadataRegionFetcher
base = sys.argv[1] + "/"
region = InstanceMetadataRegionFetcher(timeout=2, num_attempts=2, base_url=base).retrieve_region()
creds = InstanceMetadataFetcher(timeout=2, num_attempts=2, base_url=base).retrieve_iam_role_credentials()
fetcher = IMDSFetcher(timeout=2, num_attempts=2, base_url=base)
token = fetcher._fetch_metadata_token()
user_data = fetcher._get_request("latest/user-data", None, token).text
json.dump({"region": region, "creds": creds, "user_data": user_data}, sys.stdout)
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(emu.endpoint())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(got["region"], "ap-southeast-2", "{got}");
    assert_eq!(got["user_data"], "[salt]\nrepo = \"x\"\n");
    let creds = &got["creds"];
    assert_eq!(creds["role_name"], "stackless-web", "{got}");
    assert_eq!(creds["access_key"], "ASIABOTOCORE");
    assert_eq!(
        creds["secret_key"],
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    );
    assert_eq!(creds["token"], "IQoJb3JpZ2luX2VjEXAMPLETOKEN//+=");
    assert_eq!(creds["expiry_time"], rfc3339(expires));
    // botocore asked with the trailing slash EC2 tolerates, and got an answer.
    assert!(emu
        .requests()
        .iter()
        .any(|r| r.path == "/latest/meta-data/placement/availability-zone/" && r.status == 200));
}
