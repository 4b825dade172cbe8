use super::*;
use crate::platform::aws::ami::test_support::*;
use crate::platform::aws::ami::{create_and_wait_with, tag_map};
use crate::platform::aws::tags;
use std::time::{Duration, Instant};
use testkit::Moto;

const ACCOUNT: &str = "111122223333";
const PARAMETER: &str = "/stackless/test/bare";

async fn baked(ec2: &aws_sdk_ec2::Client, def: &ImageDef, build: &Build) -> ImageInfo {
    let seed = stopped_instance(ec2).await;
    create_and_wait_with(ec2, &seed, def, build, &quick(Duration::from_secs(30)))
        .await
        .unwrap()
}

fn publishing_def() -> ImageDef {
    let mut def = def("bare");
    def.regions = vec![
        "us-east-2".into(),
        "eu-central-1".into(),
        "eu-west-1".into(),
        "us-east-2".into(),
    ];
    def.accounts = vec![ACCOUNT.into()];
    def.deprecate_after = Some(Duration::from_secs(365 * 24 * 3600));
    def.ssm_parameter = Some(PARAMETER.into());
    def
}

/// EnableImageDeprecation is not in moto 5.2.5: the shim answers it as AWS does.
fn answer_deprecation(shim: &Shim) {
    shim.answer(|seen| {
        (seen.action == "EnableImageDeprecation").then(|| ec2_ok("EnableImageDeprecation"))
    });
}

#[tokio::test]
async fn copies_shares_deprecates_and_publishes_the_parameter() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    answer_deprecation(&shim);
    let config = shim.sdk_config(&moto).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let def = publishing_def();
    let build1 = build(1, "hash-1");
    let image = baked(&ec2, &def, &build1).await;

    let started = SystemTime::now();
    let art = publish_with(
        &config,
        &def,
        &build1,
        &image,
        &quick(Duration::from_secs(30)),
    )
    .await
    .unwrap();

    // The home image is published as it is (not encrypted), with copies in the two other regions.
    assert_eq!(art.id, image.image_id);
    assert_eq!(
        art.regions.keys().map(String::as_str).collect::<Vec<_>>(),
        ["eu-central-1", "eu-west-1", "us-east-2"]
    );
    assert_eq!(art.regions["eu-west-1"], image.image_id);
    assert_eq!(
        shim.seen_action("CopyImage").len(),
        2,
        "one copy per other region, the home region and duplicates skipped"
    );
    for region in ["us-east-2", "eu-central-1"] {
        let copy = &art.regions[region];
        let client = ec2_for(&config, region);
        let img = crate::platform::aws::ami::describe(&client, copy)
            .await
            .unwrap()
            .expect("the copy exists in its region");
        assert_eq!(
            img.name(),
            Some(def.image_name(&build1.id, &build1.timestamp).as_str())
        );
        let t = tag_map(img.tags());
        assert_eq!(
            t.get(tags::BUILD_ID),
            Some(&build1.id),
            "copy tagged in {region}: {t:?}"
        );
        assert_eq!(t.get(tags::INPUT_HASH).map(String::as_str), Some("hash-1"));
        assert_eq!(
            t.get(COPY_OF),
            Some(&format!("eu-west-1/{}", image.image_id))
        );
        let snaps = crate::platform::aws::ami::snapshots_of(&img);
        assert_eq!(art.details[&format!("snapshots.{region}")], snaps.join(","));
        for s in &snaps {
            assert_eq!(
                tags_of(&client, s).await.get(tags::BUILD_ID),
                Some(&build1.id),
                "copy snapshot {s} tagged"
            );
        }
        // Copy requests are idempotent and ask for the tags.
        let req = shim
            .seen_action("CopyImage")
            .into_iter()
            .find(|s| s.region == region)
            .unwrap();
        assert_eq!(req.param("SourceRegion"), Some("eu-west-1"));
        assert_eq!(req.param("SourceImageId"), Some(image.image_id.as_str()));
        assert_eq!(
            req.param("ClientToken"),
            Some(format!("{}-{region}", build1.id).as_str())
        );
        assert_eq!(req.param("TagSpecification.1.ResourceType"), Some("image"));
        assert_eq!(req.param("Encrypted"), None);
    }
    // The home image knows its copies (for content-addressed reuse).
    let home_tags = tags_of(&ec2, &image.image_id).await;
    assert_eq!(
        home_tags.get("stackless:copy:us-east-2"),
        Some(&art.regions["us-east-2"])
    );

    // Shared with the account in every region, snapshots included.
    for (region, id) in &art.regions {
        let client = ec2_for(&config, region);
        let lp = client
            .describe_image_attribute()
            .image_id(id)
            .attribute("launchPermission".into())
            .send()
            .await
            .unwrap();
        let users: Vec<_> = lp
            .launch_permissions()
            .iter()
            .filter_map(|p| p.user_id())
            .collect();
        assert_eq!(users, [ACCOUNT], "launch permission in {region}");
        let img = crate::platform::aws::ami::describe(&client, id)
            .await
            .unwrap()
            .unwrap();
        for s in crate::platform::aws::ami::snapshots_of(&img) {
            let cv = client
                .describe_snapshot_attribute()
                .snapshot_id(&s)
                .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
                .send()
                .await
                .unwrap();
            let users: Vec<_> = cv
                .create_volume_permissions()
                .iter()
                .filter_map(|p| p.user_id())
                .collect();
            assert_eq!(
                users,
                [ACCOUNT],
                "createVolumePermission of {s} in {region}"
            );
        }
    }

    // Deprecation in every region, a year from now.
    let dep = shim.seen_action("EnableImageDeprecation");
    let mut dep_regions: Vec<_> = dep.iter().map(|s| s.region.clone()).collect();
    dep_regions.sort();
    assert_eq!(dep_regions, ["eu-central-1", "eu-west-1", "us-east-2"]);
    for d in &dep {
        let at = humantime::parse_rfc3339_weak(d.param("DeprecateAt").unwrap()).unwrap();
        let year = Duration::from_secs(365 * 24 * 3600);
        assert!(
            at >= started + year - Duration::from_secs(5)
                && at <= SystemTime::now() + year + Duration::from_secs(5)
        );
        assert_eq!(d.param("ImageId"), Some(art.regions[&d.region].as_str()));
    }
    assert!(art.details.contains_key("deprecate_at"));
    assert!(!art.details.contains_key("deprecation_failed"));

    // The parameter names the home image, as an aws:ec2:image.
    let ssm = aws_sdk_ssm::Client::new(&config);
    let p = ssm.get_parameter().name(PARAMETER).send().await.unwrap();
    let p = p.parameter().unwrap();
    assert_eq!(p.value(), Some(image.image_id.as_str()));
    assert_eq!(p.data_type(), Some(PARAMETER_DATA_TYPE));
    assert_eq!(art.details["ssm_parameter"], PARAMETER);
    assert_eq!(art.details["ssm_parameter_version"], "1");
    assert!(!art.details.contains_key("ssm_parameter_previous"));
    assert_eq!(art.details["snapshots"], image.snapshot_ids.join(","));
    assert_eq!(art.details["shared_with"], ACCOUNT);

    // A second bake replaces the value; the first stays in the parameter's history.
    let build2 = build(2, "hash-2");
    let image2 = baked(&ec2, &def, &build2).await;
    let art2 = publish_with(
        &config,
        &def,
        &build2,
        &image2,
        &quick(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    assert_eq!(art2.details["ssm_parameter_previous"], image.image_id);
    assert_eq!(art2.details["ssm_parameter_version"], "2");
    let history = ssm
        .get_parameter_history()
        .name(PARAMETER)
        .send()
        .await
        .unwrap();
    let values: Vec<_> = history
        .parameters()
        .iter()
        .filter_map(|p| p.value())
        .collect();
    assert_eq!(values, [image.image_id.as_str(), image2.image_id.as_str()]);
}

#[tokio::test]
async fn a_refused_deprecation_is_recorded_and_the_image_still_published() {
    // Against moto alone, whose EnableImageDeprecation fails.
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let mut def = def("bare");
    def.deprecate_after = Some(Duration::from_secs(24 * 3600));
    def.ssm_parameter = Some(PARAMETER.into());
    let b = build(1, "h");
    let image = baked(&ec2, &def, &b).await;
    let art = publish_with(&config, &def, &b, &image, &quick(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(
        art.details["deprecation_failed"].starts_with(&format!("eu-west-1/{}", image.image_id)),
        "{:?}",
        art.details
    );
    assert_eq!(
        current_parameter(&aws_sdk_ssm::Client::new(&config), PARAMETER)
            .await
            .unwrap(),
        Some(image.image_id)
    );
}

#[tokio::test]
async fn an_encrypted_definition_publishes_an_encrypted_copy_under_the_real_name() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let config = shim.sdk_config(&moto).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let mut def = def("bare");
    def.encrypted = true;
    def.kms_key = Some("alias/stackless".into());
    def.regions = vec!["us-east-2".into()];
    def.ssm_parameter = Some(PARAMETER.into());
    let b = build(1, "h");
    let intermediate = baked(&ec2, &def, &b).await;

    let art = publish_with(
        &config,
        &def,
        &b,
        &intermediate,
        &quick(Duration::from_secs(30)),
    )
    .await
    .unwrap();

    assert_ne!(art.id, intermediate.image_id);
    let name = def.image_name(&b.id, &b.timestamp);
    let home = crate::platform::aws::ami::describe(&ec2, &art.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(home.name(), Some(name.as_str()));
    assert_eq!(
        tag_map(home.tags()).get(COPY_OF),
        Some(&format!("eu-west-1/{}", intermediate.image_id))
    );
    assert!(
        crate::platform::aws::ami::describe(&ec2, &intermediate.image_id)
            .await
            .unwrap()
            .is_none(),
        "the unencrypted intermediate is gone"
    );
    assert_eq!(art.details["encrypted_from"], intermediate.image_id);
    let copies = shim.seen_action("CopyImage");
    assert_eq!(copies.len(), 2);
    for c in &copies {
        assert_eq!(c.param("Encrypted"), Some("true"));
        assert_eq!(c.param("KmsKeyId"), Some("alias/stackless"));
        assert_eq!(c.param("Name"), Some(name.as_str()));
    }
    let home_copy = copies.iter().find(|c| c.region == "eu-west-1").unwrap();
    assert_eq!(
        home_copy.param("SourceImageId"),
        Some(intermediate.image_id.as_str())
    );
    let region_copy = copies.iter().find(|c| c.region == "us-east-2").unwrap();
    assert_eq!(
        region_copy.param("SourceImageId"),
        Some(art.id.as_str()),
        "other regions copy the encrypted image"
    );
    assert_eq!(
        current_parameter(&aws_sdk_ssm::Client::new(&config), PARAMETER)
            .await
            .unwrap(),
        Some(art.id.clone())
    );
}

#[tokio::test]
async fn a_copy_that_never_finishes_hits_the_deadline_and_all_copies_are_removed() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let config = shim.sdk_config(&moto).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let mut def = publishing_def();
    def.regions = vec!["us-east-2".into(), "eu-central-1".into()];
    let b = build(1, "h");
    let image = baked(&ec2, &def, &b).await;
    shim.rewrite(|seen, body| match seen.param("ImageId.1") {
        Some(id) if seen.action == "DescribeImages" && seen.region == "us-east-2" => {
            set_image_state(&body, id, "pending", "")
        }
        _ => body,
    });

    let e = publish_with(
        &config,
        &def,
        &b,
        &image,
        &quick(Duration::from_millis(500)),
    )
    .await
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("timed out") && msg.contains("us-east-2 pending"),
        "{msg}"
    );
    assert!(
        msg.contains("the copies it made were deregistered"),
        "{msg}"
    );
    for region in ["us-east-2", "eu-central-1"] {
        let direct = ec2_for(&moto.sdk_config().await, region);
        assert!(
            own_images(&direct).await.is_empty(),
            "no copy left in {region}"
        );
    }
    assert!(
        crate::platform::aws::ami::describe(&ec2, &image.image_id)
            .await
            .unwrap()
            .is_some(),
        "the given image is the caller's to remove"
    );
    assert_eq!(
        current_parameter(&aws_sdk_ssm::Client::new(&config), PARAMETER)
            .await
            .unwrap(),
        None,
        "nothing published"
    );
}

#[tokio::test]
async fn a_failed_copy_fails_fast_with_its_reason() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let config = shim.sdk_config(&moto).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let mut def = def("bare");
    def.regions = vec!["eu-central-1".into()];
    let b = build(1, "h");
    let image = baked(&ec2, &def, &b).await;
    shim.rewrite(|seen, body| match seen.param("ImageId.1") {
        Some(id) if seen.action == "DescribeImages" && seen.region == "eu-central-1" => set_image_state(
            &body,
            id,
            "failed",
            "<stateReason><code>Client.InternalError</code><message>Copy of snapshot failed</message></stateReason>",
        ),
        _ => body,
    });
    let start = Instant::now();
    let e = publish_with(&config, &def, &b, &image, &quick(Duration::from_secs(120)))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(20));
    let msg = format!("{e:#}");
    assert!(
        msg.contains("the copy in eu-central-1 failed") && msg.contains("Copy of snapshot failed"),
        "{msg}"
    );
    assert!(
        own_images(&ec2_for(&moto.sdk_config().await, "eu-central-1"))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_refused_copy_names_its_region_and_removes_the_others() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let config = shim.sdk_config(&moto).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let mut def = def("bare");
    def.regions = vec!["us-east-2".into(), "eu-central-1".into()];
    let b = build(1, "h");
    let image = baked(&ec2, &def, &b).await;
    shim.answer(|seen| {
        (seen.action == "CopyImage" && seen.region == "eu-central-1").then(|| {
            ec2_error(
                400,
                "ResourceLimitExceeded",
                "You have reached your quota of concurrent image copies",
            )
        })
    });
    let e = publish_with(&config, &def, &b, &image, &quick(Duration::from_secs(30)))
        .await
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("eu-central-1") && msg.contains("ResourceLimitExceeded"),
        "{msg}"
    );
    assert!(
        own_images(&ec2_for(&moto.sdk_config().await, "us-east-2"))
            .await
            .is_empty(),
        "the other copy removed"
    );
}

#[tokio::test]
async fn sharing_an_image_encrypted_with_the_default_key_is_refused_up_front() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let config = shim.sdk_config(&moto).await;
    let mut def = def("bare");
    def.encrypted = true;
    def.accounts = vec![ACCOUNT.into()];
    let info = ImageInfo {
        image_id: "ami-12345678".into(),
        snapshot_ids: vec![],
    };
    let e = publish_with(
        &config,
        &def,
        &build(1, "h"),
        &info,
        &quick(Duration::from_secs(5)),
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("kms_key"), "{e:#}");
    assert!(shim.seen().is_empty(), "nothing was called");
}

#[test]
fn kms_keys_per_region() {
    assert_eq!(
        kms_key_for("alias/x", "eu-west-1", "us-east-2").unwrap(),
        "alias/x"
    );
    assert_eq!(
        kms_key_for("mrk-1234", "eu-west-1", "us-east-2").unwrap(),
        "mrk-1234"
    );
    assert_eq!(
        kms_key_for("1234abcd-12ab", "eu-west-1", "eu-west-1").unwrap(),
        "1234abcd-12ab"
    );
    assert!(kms_key_for("1234abcd-12ab", "eu-west-1", "us-east-2")
        .unwrap_err()
        .to_string()
        .contains("one region"));
    assert_eq!(
        kms_key_for(
            "arn:aws:kms:eu-west-1:111122223333:key/mrk-1",
            "eu-west-1",
            "us-east-2"
        )
        .unwrap(),
        "arn:aws:kms:us-east-2:111122223333:key/mrk-1"
    );
    assert_eq!(
        kms_key_for(
            "arn:aws:kms:eu-west-1:111122223333:alias/x",
            "eu-west-1",
            "us-east-2"
        )
        .unwrap(),
        "arn:aws:kms:us-east-2:111122223333:alias/x"
    );
    let e = kms_key_for(
        "arn:aws:kms:eu-west-1:111122223333:key/abcd",
        "eu-west-1",
        "us-east-2",
    )
    .unwrap_err();
    assert!(e.to_string().contains("single-region"), "{e}");
    assert!(kms_key_for("arn:aws:s3:::bucket", "eu-west-1", "eu-west-1").is_err());
}
