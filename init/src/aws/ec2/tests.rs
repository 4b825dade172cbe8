use super::*;
use crate::aws::test_support::{
    python_with_botocore, role_config, run_python, start_with_roles, MotoSetup,
};
use crate::imds::emulator::{Emulator, EmulatorConfig};
use crate::imds::Identity;
use std::time::Instant;

const LONG: Duration = Duration::from_secs(30);

fn emulator_for(setup: &MotoSetup) -> Emulator {
    let mut identity = Identity::example();
    identity.instance_id = setup.instance_id.clone();
    Emulator::start(EmulatorConfig::new(identity).with_role(role_config(&setup.reader)))
        .expect("emulator")
}

fn tagger(emu: &Emulator, setup: &MotoSetup) -> InstanceTagger {
    InstanceTagger::new(
        ImdsClient::new(&emu.endpoint(), LONG),
        Some(&setup.moto.endpoint),
        Duration::from_secs(20),
    )
    .expect("identity")
}

/// The instance's tags as moto holds them, read with the reader role (moto checks auth).
fn tags_in_moto(setup: &MotoSetup) -> Vec<(String, String)> {
    const READ: &str = r#"
import json, sys, boto3
a = json.loads(sys.stdin.read())
ec2 = boto3.client("ec2", endpoint_url=a["endpoint"], region_name="eu-west-1",
                   aws_access_key_id=a["key"], aws_secret_access_key=a["secret"],
                   aws_session_token=a["token"])
tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [a["id"]]}])["Tags"]
json.dump(sorted([t["Key"], t["Value"]] for t in tags), sys.stdout)
"#;
    // The setup's own keys stopped working when auth went on; the reader may describe tags.
    let input = serde_json::json!({
        "endpoint": setup.moto.endpoint, "key": setup.reader.access_key_id,
        "secret": setup.reader.secret_access_key, "token": setup.reader.token,
        "id": setup.instance_id,
    });
    let out = run_python(&python_with_botocore(), READ, input.to_string().as_bytes());
    serde_json::from_slice(&out).expect("tags JSON")
}

/// moto verifies the signature and the role's permission (IAM auth on; its policy allows
/// ec2:CreateTags), with a session token from moto's STS served by the IMDS emulator.
#[test]
fn tags_its_own_instance_in_moto_with_iam_auth_on() {
    let setup = start_with_roles(&[]);
    let emu = emulator_for(&setup);
    let mut tagger = tagger(&emu, &setup);
    assert_eq!(tagger.role.instance_id, setup.instance_id);
    let tags = vec![
        ("stackless:config-commit".to_string(), "a".repeat(40)),
        ("stackless:outcome".to_string(), "ready".to_string()),
    ];
    tagger.write(&tags).expect("tags written");
    let got = tags_in_moto(&setup);
    for t in &tags {
        assert!(got.contains(t), "{t:?} not in {got:?}");
    }
    assert!(got.contains(&("stackless:service".into(), "web".into())));

    // moto checks signatures: a wrong secret key is refused as bad credentials.
    let creds = tagger.role.credentials().unwrap();
    let mut wrong = creds.credentials.clone();
    wrong.secret_access_key.push('x');
    let call = CreateTags {
        call: request::Call {
            endpoint: &setup.moto.endpoint,
            region: "eu-west-1",
            service: "ec2",
            deadline: Instant::now() + Duration::from_secs(10),
            tls: crate::aws::tls::client_config(),
        },
        account: "123456789012",
        role: "stackless-reader",
    };
    let err = call
        .run(&setup.instance_id, &tags, &wrong)
        .expect_err("a bad signature");
    assert!(
        matches!(err, Ec2Error::CredentialsRefused { .. }),
        "{err:?}: {err}"
    );
}

#[test]
fn access_denied_names_the_action_and_the_instance_arn() {
    let setup = start_with_roles(&[]);
    let emu = emulator_for(&setup);
    emu.set_role(Some(role_config(&setup.outsider)));
    let err = tagger(&emu, &setup)
        .write(&[("stackless:outcome".into(), "ready".into())])
        .expect_err("the outsider may not tag");
    assert!(matches!(err, Ec2Error::AccessDenied { .. }), "{err:?}");
    let text = err.to_string();
    let arn = format!(
        "arn:aws:ec2:eu-west-1:123456789012:instance/{}",
        setup.instance_id
    );
    assert!(
        text.contains("ec2:CreateTags")
            && text.contains(&arn)
            && text.contains("stackless-outsider"),
        "{text}"
    );
}

#[test]
fn the_form_body_is_encoded() {
    let body = create_tags_body(
        "i-1",
        &[("stackless:problems".into(), "highstate,config repo".into())],
    );
    assert_eq!(
        body,
        "Action=CreateTags&Version=2016-11-15&ResourceId.1=i-1&Tag.1.Key=stackless%3Aproblems\
         &Tag.1.Value=highstate%2Cconfig%20repo"
    );
    assert_eq!(
        instance_arn("cn-north-1", "1", "i-2"),
        "arn:aws-cn:ec2:cn-north-1:1:instance/i-2"
    );
}

/// The tagger lives as long as the agent; credentials are fetched again hours after it was
/// made, long after its IMDS client's first deadline.
#[test]
fn credentials_are_fetched_again_after_the_imds_clients_first_deadline() {
    let setup = start_with_roles(&[]);
    let emu = emulator_for(&setup);
    let mut tagger = InstanceTagger::new(
        ImdsClient::new(&emu.endpoint(), Duration::from_millis(1500)),
        Some(&setup.moto.endpoint),
        Duration::from_secs(20),
    )
    .expect("identity");
    let tags = vec![("stackless:outcome".to_string(), "ready".to_string())];
    tagger.write(&tags).expect("tags written");
    std::thread::sleep(Duration::from_millis(2000));
    // As when the credentials near their expiry: fetched from IMDS again.
    tagger.role.forget_credentials();
    let tags = vec![("stackless:outcome".to_string(), "degraded".to_string())];
    tagger
        .write(&tags)
        .expect("written with credentials fetched after the first deadline");
    assert!(tags_in_moto(&setup).contains(&("stackless:outcome".into(), "degraded".into())));
}
