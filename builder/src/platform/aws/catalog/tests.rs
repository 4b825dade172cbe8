use super::*;
use crate::platform::aws::ami::test_support::*;
use crate::platform::aws::ami::{create_and_wait_with, ImageInfo};
use crate::platform::aws::publish::PARAMETER_DATA_TYPE;
use crate::platform::Build;
use aws_sdk_ssm::types::ParameterType;
use std::time::Duration;
use testkit::Moto;

/// Bakes an image; moto's creation dates have whole seconds, so each bake waits one out to keep
/// "newest" well defined.
async fn bake(ec2: &aws_sdk_ec2::Client, def: &ImageDef, build: &Build) -> ImageInfo {
    let img = bake_unpublished(ec2, def, build).await;
    // What publish does last.
    ec2.create_tags()
        .resources(&img.image_id)
        .tags(image::tag(tags::PUBLISHED, "true"))
        .send()
        .await
        .unwrap();
    img
}

async fn bake_unpublished(ec2: &aws_sdk_ec2::Client, def: &ImageDef, build: &Build) -> ImageInfo {
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let seed = stopped_instance(ec2).await;
    create_and_wait_with(ec2, &seed, def, build, &quick(Duration::from_secs(30)))
        .await
        .unwrap()
}

#[tokio::test]
async fn an_image_whose_publishing_never_finished_is_not_reused() {
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let bare = def("bare");
    let _half = bake_unpublished(&ec2, &bare, &build(1, "h")).await;
    assert!(find_by_input_hash(&ec2, &bare, "h")
        .await
        .unwrap()
        .is_none());
}

async fn point(ssm: &aws_sdk_ssm::Client, parameter: &str, id: &str) {
    ssm.put_parameter()
        .name(parameter)
        .value(id)
        .r#type(ParameterType::String)
        .data_type(PARAMETER_DATA_TYPE)
        .overwrite(true)
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn finds_the_newest_available_image_with_the_input_hash() {
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let bare = def("bare");
    let other = def("preseeded");
    let _old = bake(&ec2, &bare, &build(1, "same")).await;
    let new_build = build(2, "same");
    let new = bake(&ec2, &bare, &new_build).await;
    let _different = bake(&ec2, &bare, &build(3, "different")).await;
    let _other_def = bake(&ec2, &other, &build(4, "same")).await;
    ec2.create_tags()
        .resources(&new.image_id)
        .tags(image::tag("stackless:copy:us-east-2", "ami-0copy"))
        .send()
        .await
        .unwrap();

    let found = find_by_input_hash(&ec2, &bare, "same")
        .await
        .unwrap()
        .expect("an image with that hash");
    assert_eq!(found.id, new.image_id);
    assert_eq!(found.regions.get("eu-west-1"), Some(&new.image_id));
    assert_eq!(
        found.regions.get("us-east-2").map(String::as_str),
        Some("ami-0copy")
    );
    assert_eq!(found.details["reused"], "true");
    assert_eq!(found.details["build_id"], new_build.id);
    assert_eq!(found.details["snapshots"], new.snapshot_ids.join(","));

    assert!(find_by_input_hash(&ec2, &bare, "nothing-like-it")
        .await
        .unwrap()
        .is_none());
    assert!(find_by_input_hash(&ec2, &def("unknown"), "same")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn an_image_that_is_not_available_is_not_reused() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let ec2 = aws_sdk_ec2::Client::new(&shim.sdk_config(&moto).await);
    let bare = def("bare");
    let img = bake(&ec2, &bare, &build(1, "h")).await;
    // Moto lists it under the state=available filter; the answer says pending, and the builder
    // checks the state itself rather than trust every endpoint's filters.
    let id = img.image_id.clone();
    shim.rewrite(move |seen, body| {
        if seen.action == "DescribeImages" {
            set_image_state(&body, &id, "pending", "")
        } else {
            body
        }
    });
    assert!(find_by_input_hash(&ec2, &bare, "h")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn lists_the_builders_images_newest_first_marking_the_published_ones() {
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let a1 = bake(&ec2, &def("bare"), &build(1, "h1")).await;
    let b1 = bake(&ec2, &def("preseeded"), &build(2, "h2")).await;
    let a2_build = build(3, "h3");
    let a2 = bake(&ec2, &def("bare"), &a2_build).await;
    // Not the builder's: an image made by hand from the same seed.
    let seed = stopped_instance(&ec2).await;
    ec2.create_image()
        .instance_id(&seed)
        .name("by-hand")
        .send()
        .await
        .unwrap();
    point(&ssm, "/p/bare", &a1.image_id).await;

    let parameter_of = |image: &str| match image {
        "bare" => Some("/p/bare".to_string()),
        "preseeded" => Some("/p/preseeded".to_string()), // never set
        _ => None,
    };
    let rows = list(&ec2, &ssm, None, &parameter_of).await.unwrap();
    let ids: Vec<_> = rows.iter().map(|r| r.image_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            a2.image_id.as_str(),
            b1.image_id.as_str(),
            a1.image_id.as_str()
        ]
    );
    let published: Vec<_> = rows
        .iter()
        .filter(|r| r.published)
        .map(|r| r.image_id.as_str())
        .collect();
    assert_eq!(published, [a1.image_id.as_str()]);
    let r = &rows[0];
    assert_eq!(
        (r.image.as_str(), r.state.as_str(), r.input_hash.as_str()),
        ("bare", "available", "h3")
    );
    assert_eq!(r.build_id, a2_build.id);
    assert!(r.name.starts_with("stackless-bare-") && !r.created.is_empty());

    let only: Vec<_> = list(&ec2, &ssm, Some("preseeded"), &parameter_of)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.image_id)
        .collect();
    assert_eq!(only, [b1.image_id]);
}

#[tokio::test]
async fn prune_keeps_the_newest_n_and_the_published_one() {
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let mut bare = def("bare");
    bare.ssm_parameter = Some("/p/bare".into());
    let mut made = Vec::new();
    for n in 1..=5 {
        made.push(bake(&ec2, &bare, &build(n, &format!("h{n}"))).await);
    }
    let other = bake(&ec2, &def("preseeded"), &build(9, "h9")).await;
    // The oldest is the published one (a rollback, say).
    point(&ssm, "/p/bare", &made[0].image_id).await;

    let dry = prune(&ec2, &ssm, &bare, 2, true).await.unwrap();
    assert_eq!(
        dry.kept,
        [
            made[4].image_id.clone(),
            made[3].image_id.clone(),
            made[0].image_id.clone()
        ]
    );
    assert_eq!(
        dry.deregistered,
        [made[2].image_id.clone(), made[1].image_id.clone()]
    );
    let mut doomed_snaps: Vec<String> = made[2]
        .snapshot_ids
        .iter()
        .chain(&made[1].snapshot_ids)
        .cloned()
        .collect();
    assert_eq!(dry.snapshots_deleted, doomed_snaps);
    assert_eq!(own_images(&ec2).await.len(), 6, "a dry run removes nothing");

    let done = prune(&ec2, &ssm, &bare, 2, false).await.unwrap();
    assert_eq!(done, dry);
    let mut left: Vec<String> = own_images(&ec2)
        .await
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect();
    left.sort();
    let mut expected = vec![
        made[0].image_id.clone(),
        made[3].image_id.clone(),
        made[4].image_id.clone(),
        other.image_id.clone(),
    ];
    expected.sort();
    assert_eq!(left, expected);
    let snaps = ec2
        .describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap();
    let have: Vec<_> = snaps
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id())
        .collect();
    doomed_snaps.retain(|s| have.contains(&s.as_str()));
    assert!(doomed_snaps.is_empty(), "snapshots left: {doomed_snaps:?}");

    // --keep 0 still keeps the published image.
    let zero = prune(&ec2, &ssm, &bare, 0, false).await.unwrap();
    assert_eq!(zero.kept, [made[0].image_id.clone()]);
    assert_eq!(
        zero.deregistered,
        [made[4].image_id.clone(), made[3].image_id.clone()]
    );
}

#[tokio::test]
async fn prune_leaves_images_that_are_not_available() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let config = shim.sdk_config(&moto).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let bare = def("bare");
    let old = bake(&ec2, &bare, &build(1, "h")).await;
    let baking = bake(&ec2, &bare, &build(2, "h")).await;
    let id = baking.image_id.clone();
    shim.rewrite(move |seen, body| {
        if seen.action == "DescribeImages" {
            set_image_state(&body, &id, "pending", "")
        } else {
            body
        }
    });
    let report = prune(&ec2, &ssm, &bare, 0, false).await.unwrap();
    assert_eq!(report.kept, [baking.image_id]);
    assert_eq!(report.deregistered, [old.image_id]);
}

#[tokio::test]
async fn prune_removes_nothing_when_it_cannot_tell_which_image_is_published() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let config = shim.sdk_config(&moto).await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let mut bare = def("bare");
    bare.ssm_parameter = Some("/p/bare".into());
    bake(&ec2, &bare, &build(1, "h")).await;
    bake(&ec2, &bare, &build(2, "h")).await;
    shim.answer(|seen| {
        (seen.action == "GetParameter").then(|| {
            json_error(
                400,
                "AccessDeniedException",
                "not authorized to perform: ssm:GetParameter",
            )
        })
    });
    let e = prune(&ec2, &ssm, &bare, 0, false).await.unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("none is removed") && msg.contains("AccessDenied") && msg.contains("/p/bare"),
        "{msg}"
    );
    assert_eq!(own_images(&ec2).await.len(), 2);
}
