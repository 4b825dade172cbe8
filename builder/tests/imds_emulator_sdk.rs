//! The IMDS emulator (which `builder boot` serves to local guests) read by the AWS SDK for Rust's
//! own IMDS client, region provider and credentials provider, exactly as they read EC2's:
//! IMDSv2 token, user-data, region from the identity document, role credentials (the SDK first
//! asks the extended credentials path, which the emulator, like EC2 without it, answers 404).

use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::imds::region::ImdsRegionProvider;
use aws_sdk_sts::config::ProvideCredentials;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig, RoleConfig};
use stackless_init::imds::Identity;

fn role() -> RoleConfig {
    RoleConfig {
        name: "web-instance".into(),
        access_key_id: "ASIAEMULATOR00000001".into(),
        secret_access_key: "emulated/secret/key".into(),
        token: "emulated-session-token".into(),
        expiration: "2099-01-01T00:00:00Z".into(),
    }
}

fn client(emu: &Emulator) -> aws_config::imds::Client {
    aws_config::imds::Client::builder()
        .endpoint(emu.endpoint())
        .expect("the emulator's endpoint is a URL")
        .build()
}

#[tokio::test]
async fn the_sdk_reads_region_user_data_and_role_credentials() {
    let emu = Emulator::start(
        EmulatorConfig::new(Identity::example())
            .with_user_data(b"minion_id = \"web\"\n".to_vec())
            .with_role(role()),
    )
    .expect("emulator");

    let user_data = client(&emu).get("/latest/user-data").await.unwrap();
    assert_eq!(user_data.as_ref(), "minion_id = \"web\"\n");

    let region = ImdsRegionProvider::builder()
        .imds_client(client(&emu))
        .build()
        .region()
        .await;
    assert_eq!(region.as_ref().map(|r| r.as_ref()), Some("eu-west-1"));

    let creds = ImdsCredentialsProvider::builder()
        .imds_client(client(&emu))
        .build()
        .provide_credentials()
        .await
        .expect("role credentials");
    assert_eq!(creds.access_key_id(), "ASIAEMULATOR00000001");
    assert_eq!(creds.secret_access_key(), "emulated/secret/key");
    assert_eq!(creds.session_token(), Some("emulated-session-token"));
    let expiry = creds.expiry().expect("an expiration");
    assert_eq!(
        expiry
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        4_070_908_800
    );
}

#[tokio::test]
async fn the_sdk_finds_no_role_where_there_is_none() {
    let emu = Emulator::start(EmulatorConfig::new(Identity::example())).expect("emulator");
    let err = ImdsCredentialsProvider::builder()
        .imds_client(client(&emu))
        .build()
        .provide_credentials()
        .await
        .expect_err("no role, no credentials");
    // The SDK says the instance has no profile (EC2's 404), not that IMDS is broken.
    let text = format!("{err:?}");
    assert!(
        text.contains("CredentialsNotLoaded") || text.contains("not loaded"),
        "{text}"
    );
}
