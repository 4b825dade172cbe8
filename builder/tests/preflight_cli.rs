//! Issue #20 through the real `builder` binary: with no AWS credentials at all every command
//! says so in one line naming the fix; and a bake against moto that would fail preflight stops
//! there, launching nothing. The moto tests refuse any endpoint but loopback.

use std::path::Path;
use std::process::Command;
use testkit::{Moto, REGION};

/// The builder with an empty environment: a fresh HOME (no ~/.aws), no AWS_* variables, no
/// instance metadata.
fn bare(home: &Path) -> Command {
    let mut c = testkit::bare_command(env!("CARGO_BIN_EXE_builder"), home);
    c.current_dir(testkit::repo_root());
    c
}

use testkit::output_text as text;

#[test]
fn no_credentials_is_one_line_naming_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let o = bare(home.path())
        .env("AWS_REGION", REGION)
        .args(["images", "list"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("builder:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("no AWS credentials found"), "{err}");
    assert!(
        lines[0].contains("aws configure") && lines[0].contains("AWS_PROFILE"),
        "{err}"
    );
    assert!(!err.contains("DispatchFailure"), "{err}");
    assert!(!err.contains("ec2:DescribeImages"), "{err}");

    // Without a region either: the region is what is missing first.
    let o = bare(home.path())
        .args(["gc", "--dry-run"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("DispatchFailure"), "{err}");
    assert!(
        err.contains("AWS_REGION") || err.contains("aws configure"),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("builder:")).count(),
        1,
        "{err}"
    );
}

#[test]
fn preflight_without_credentials_fails_its_first_check_and_asks_aws_nothing_more() {
    let home = tempfile::tempdir().unwrap();
    let o = bare(home.path())
        .env("AWS_REGION", REGION)
        .args(["preflight", "bare"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let first = out.lines().next().unwrap_or_default();
    assert!(first.starts_with("FAILED     credentials:"), "{out}");
    assert!(first.contains("aws configure"), "{out}");
    assert!(out.contains("ok         region: eu-west-1"), "{out}");
    assert!(out.contains("unchecked  caller"), "{out}");

    let o = bare(home.path())
        .env("AWS_REGION", REGION)
        .args(["--output", "json", "preflight", "bare"])
        .output()
        .unwrap();
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["checks"][0]["name"], "credentials");
    assert_eq!(v["checks"][0]["status"], "failed");
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_bake_that_fails_preflight_launches_nothing() {
    let moto = Moto::start();
    assert!(moto.endpoint.starts_with("http://127.0.0.1:"));
    let home = tempfile::tempdir().unwrap();
    let defs = tempfile::tempdir().unwrap();
    std::fs::write(
        defs.path().join("pf.toml"),
        r#"name = "stackless-pf-{timestamp}"
[source]
owner = "amazon"
name = "al2023-ami-2023.*-kernel-6.12-x86_64"
[instance]
type = "t3.small"
instance_profile = "no-such-profile"
"#,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let o = bare(home.path())
        .env("AWS_REGION", REGION)
        .env("AWS_ENDPOINT_URL", &moto.endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_MAX_ATTEMPTS", "3")
        .arg("--images-dir")
        .arg(defs.path())
        .args(["bake", "pf", "--target", "aws"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(
        err.contains("FAILED     instance profile: no-such-profile does not exist"),
        "{err}"
    );
    assert!(
        err.contains("ok         credentials: from environment variables"),
        "{err}"
    );
    assert!(err.contains("builder: preflight for bake pf: "), "{err}");
    assert!(err.contains("nothing was created"), "{err}");
    assert!(out.is_empty(), "{out}");

    // Nothing in moto: no instance, no security group beyond the defaults.
    let instances = testkit::ssm_shim::moto_query(
        &moto.endpoint,
        "ec2",
        &[("Action", "DescribeInstances"), ("Version", "2016-11-15")],
    )
    .unwrap();
    assert!(!instances.contains("<instanceId>"), "{instances}");
    let groups = testkit::ssm_shim::moto_query(
        &moto.endpoint,
        "ec2",
        &[
            ("Action", "DescribeSecurityGroups"),
            ("Version", "2016-11-15"),
        ],
    )
    .unwrap();
    assert!(!groups.contains("stackless"), "{groups}");
}

#[test]
fn an_unreachable_endpoint_says_so_then_what_was_being_done() {
    let home = tempfile::tempdir().unwrap();
    // A loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = bare(home.path())
        .env("AWS_REGION", REGION)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_MAX_ATTEMPTS", "1")
        .args(["images", "list"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("builder:")).collect();
    assert!(lines[0].contains("cannot be reached"), "{err}");
    assert!(lines[0].contains("AWS_REGION"), "{err}");
    assert!(lines.len() <= 2, "{err}");
    assert!(!err.contains("DispatchFailure"), "{err}");
}
