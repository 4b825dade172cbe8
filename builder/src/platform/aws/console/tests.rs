use super::*;
use crate::communicator::ssm::SsmCommunicator;
use aws_sdk_ec2::error::ErrorMetadata;
use aws_sdk_ec2::operation::get_console_output::{GetConsoleOutputError, GetConsoleOutputOutput};
use aws_sdk_ssm::operation::describe_instance_information::DescribeInstanceInformationOutput;
use aws_smithy_mocks::{mock, MockResponseInterceptor, Rule, RuleMode};

const LINE: &str = "stackless-seed: FAILED: downloading the SSM agent from https://s3.eu-west-1.amazonaws.com/amazon-ssm-eu-west-1/latest/debian_amd64/amazon-ssm-agent.deb: curl: (28) Connection timed out (the subnet needs a route out (a NAT or internet gateway) or an S3 gateway endpoint to reach the agent's download, and SSM's endpoints ssm, ssmmessages and ec2messages)";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn interceptor(rules: &[&Rule]) -> MockResponseInterceptor {
    let mut i = MockResponseInterceptor::new().rule_mode(RuleMode::MatchAny);
    for r in rules {
        i = i.with_rule(r);
    }
    i
}

/// An EC2 client answered only by `rules` (no network, no moto).
fn ec2(rules: &[&Rule]) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("eu-west-1"))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "AKIDTEST", "secret", None, None, "test",
        ))
        .http_client(aws_smithy_mocks::create_mock_http_client())
        .interceptor(interceptor(rules))
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

fn ssm(rules: &[&Rule]) -> aws_sdk_ssm::Client {
    let conf = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new("eu-west-1"))
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(
            "AKIDTEST", "secret", None, None, "test",
        ))
        .http_client(aws_smithy_mocks::create_mock_http_client())
        .interceptor(interceptor(rules))
        .build();
    aws_sdk_ssm::Client::from_conf(conf)
}

#[test]
fn the_failure_line_is_found_behind_console_prefixes() {
    let console = format!(
        "[    0.000000] Linux version 6.1.0-28-cloud-amd64\r\n\
         [   14.201337] cloud-init[612]: stackless-seed: the image has no SSM agent; downloading x\r\n\
         [   44.512000] cloud-init[612]: {LINE}\r\n\
         [   44.600000] cloud-init[612]: 2026-12-02 16:00:00,000 - cc_scripts_user.py[WARNING]: Failed to run module scripts_user\r\n"
    );
    assert_eq!(seed_failure(&console).as_deref(), Some(LINE));
    // Printed twice (cloud-init's output and the console itself): one line, the last.
    let twice = format!("{LINE}\nstackless-seed: FAILED: verifying the SSM agent: no\n");
    assert_eq!(
        seed_failure(&twice).as_deref(),
        Some("stackless-seed: FAILED: verifying the SSM agent: no")
    );
    assert_eq!(
        seed_failure("stackless-seed: the image has the SSM agent; nothing installed\n"),
        None
    );
    assert_eq!(seed_failure(""), None);
    assert_eq!(
        seed_failure("stackless-seed: FAILED: \n"),
        None,
        "a bare prefix says nothing"
    );
}

#[test]
fn console_output_is_base64_and_plain_text_is_taken_as_it_is() {
    assert_eq!(decode(&b64("hello\nworld\n")), "hello\nworld\n");
    assert_eq!(decode("not base64 at all!"), "not base64 at all!");
}

#[tokio::test]
async fn the_watch_reads_the_latest_console_and_falls_back_when_latest_is_refused() {
    let refused = mock!(aws_sdk_ec2::Client::get_console_output)
        .match_requests(|r| r.latest() == Some(true))
        .then_error(|| {
            GetConsoleOutputError::generic(
                ErrorMetadata::builder()
                    .code("UnsupportedOperation")
                    .message("latest is only for Nitro instances")
                    .build(),
            )
        });
    let plain = mock!(aws_sdk_ec2::Client::get_console_output)
        .match_requests(|r| r.latest().is_none() && r.instance_id() == Some("i-seed"))
        .then_output(|| {
            GetConsoleOutputOutput::builder()
                .instance_id("i-seed")
                .output(b64(&format!("boot\ncloud-init[1]: {LINE}\n")))
                .build()
        });
    let watch = ConsoleWatch::new(ec2(&[&refused, &plain]), "i-seed", Duration::ZERO);
    let why = watch.failure().await.expect("the failure line");
    assert!(why.contains(LINE), "{why}");
    assert!(
        why.contains("aws ec2 get-console-output --instance-id i-seed"),
        "{why}"
    );
    // Refused once, then asked without `Latest` from there on.
    assert!(watch.failure().await.is_some());
    assert_eq!((refused.num_calls(), plain.num_calls()), (1, 2));
}

#[tokio::test]
async fn the_wait_for_ssm_fails_at_once_on_the_seeds_failure_line() {
    // SSM never sees the agent; the console shows the user-data's failure after a while.
    let unregistered = mock!(aws_sdk_ssm::Client::describe_instance_information)
        .then_output(|| DescribeInstanceInformationOutput::builder().build());
    let console = mock!(aws_sdk_ec2::Client::get_console_output)
        .sequence()
        .output(|| GetConsoleOutputOutput::builder().build())
        .times(2)
        .output(|| {
            GetConsoleOutputOutput::builder()
                .output(b64(&format!("[   44.5] cloud-init[612]: {LINE}\n")))
                .build()
        })
        .repeatedly()
        .build();
    let comm = SsmCommunicator::new(
        ssm(&[&unregistered]),
        "i-seed",
        Duration::from_millis(10),
        false,
    );
    let watch = ConsoleWatch::new(ec2(&[&console]), "i-seed", Duration::ZERO);
    let start = Instant::now();
    let e = comm
        .wait_online_watching(Duration::from_secs(600), || watch.failure())
        .await
        .unwrap_err()
        .to_string();
    assert!(start.elapsed() < Duration::from_secs(10), "not at once");
    assert!(
        e.contains(LINE) && e.contains("i-seed to come online"),
        "{e}"
    );
    assert!(!e.starts_with("timed out after"), "{e}");
    assert_eq!(console.num_calls(), 3);
    assert_eq!(unregistered.num_calls(), 2);
}

#[tokio::test]
async fn a_console_that_cannot_be_read_does_not_stop_the_wait() {
    let denied = mock!(aws_sdk_ec2::Client::get_console_output).then_error(|| {
        GetConsoleOutputError::generic(
            ErrorMetadata::builder()
                .code("UnauthorizedOperation")
                .message("not allowed")
                .build(),
        )
    });
    let watch = ConsoleWatch::new(ec2(&[&denied]), "i-seed", Duration::ZERO);
    assert_eq!(watch.failure().await, None);
    assert_eq!(watch.failure().await, None);
    let e = watch.read().await.unwrap_err().to_string();
    assert!(e.contains("ec2:GetConsoleOutput"), "{e}");
}

#[tokio::test]
async fn the_console_is_read_at_most_every_interval() {
    let quiet = mock!(aws_sdk_ec2::Client::get_console_output).then_output(|| {
        GetConsoleOutputOutput::builder()
            .output(b64("boot\n"))
            .build()
    });
    let watch = ConsoleWatch::new(ec2(&[&quiet]), "i-seed", Duration::from_secs(3600));
    for _ in 0..5 {
        assert_eq!(watch.failure().await, None);
    }
    assert_eq!(quiet.num_calls(), 1);
}
