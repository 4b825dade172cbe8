use super::*;
use crate::definition::ImageDef;
use crate::platform::aws::ami::create_and_wait_with;
use crate::platform::aws::ami::test_support::*;
use crate::platform::Build;
use aws_sdk_ec2::types::{ResourceType, TagSpecification};
use testkit::Moto;

const HOUR: Duration = Duration::from_secs(3600);

fn temp_tags(expires: Option<&str>) -> Vec<Tag> {
    let mut t = vec![
        image::tag(tags::TEMPORARY, "true"),
        image::tag(tags::MANAGED_BY, tags::MANAGED_BY_VALUE),
    ];
    if let Some(e) = expires {
        t.push(image::tag(tags::EXPIRES_AT, e));
    }
    t
}

async fn group(ec2: &aws_sdk_ec2::Client, name: &str, tags: Vec<Tag>) -> String {
    let mut req = ec2
        .create_security_group()
        .group_name(name)
        .description("test");
    if !tags.is_empty() {
        req = req.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::SecurityGroup)
                .set_tags(Some(tags))
                .build(),
        );
    }
    req.send().await.unwrap().group_id().unwrap().to_string()
}

async fn instance(ec2: &aws_sdk_ec2::Client, group: &str, tags: Vec<Tag>) -> String {
    let images = ec2.describe_images().owners("amazon").send().await.unwrap();
    let ami = images.images()[0].image_id().unwrap().to_string();
    let mut req = ec2
        .run_instances()
        .image_id(ami)
        .min_count(1)
        .max_count(1)
        .security_group_ids(group);
    if !tags.is_empty() {
        req = req.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(tags))
                .build(),
        );
    }
    req.send().await.unwrap().instances()[0]
        .instance_id()
        .unwrap()
        .to_string()
}

async fn state(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    let out = ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    out.reservations()[0].instances()[0]
        .state()
        .unwrap()
        .name()
        .unwrap()
        .as_str()
        .to_string()
}

async fn group_exists(ec2: &aws_sdk_ec2::Client, id: &str) -> bool {
    let out = ec2.describe_security_groups().send().await.unwrap();
    out.security_groups()
        .iter()
        .any(|g| g.group_id() == Some(id))
}

#[tokio::test]
async fn removes_expired_temporary_instances_and_groups_and_nothing_else() {
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let now = SystemTime::now();
    let past = humantime::format_rfc3339_seconds(now - HOUR).to_string();
    let future = humantime::format_rfc3339_seconds(now + HOUR).to_string();

    let expired_group = group(&ec2, "expired", temp_tags(Some(&past))).await;
    let live_group = group(&ec2, "live", temp_tags(Some(&future))).await;
    let plain_group = group(&ec2, "plain", vec![]).await;
    let expired_seed = instance(&ec2, &expired_group, temp_tags(Some(&past))).await;
    let live_seed = instance(&ec2, &live_group, temp_tags(Some(&future))).await;
    let plain = instance(&ec2, &plain_group, vec![]).await;
    let unreadable = instance(&ec2, &plain_group, temp_tags(Some("next tuesday"))).await;
    let no_expiry = instance(&ec2, &plain_group, temp_tags(None)).await;
    let stopped_expired = instance(&ec2, &expired_group, temp_tags(Some(&past))).await;
    ec2.stop_instances()
        .instance_ids(&stopped_expired)
        .send()
        .await
        .unwrap();

    let dry = gc(&ec2, now, true, None).await.unwrap();
    let mut terminated = dry.instances_terminated.clone();
    terminated.sort();
    let mut want = vec![expired_seed.clone(), stopped_expired.clone()];
    want.sort();
    assert_eq!(terminated, want);
    assert_eq!(dry.groups_deleted, std::slice::from_ref(&expired_group));
    assert!(dry.images_deregistered.is_empty());
    assert_eq!(
        state(&ec2, &expired_seed).await,
        "running",
        "a dry run changes nothing"
    );
    assert!(group_exists(&ec2, &expired_group).await);
    for (id, why) in [
        (&live_seed, "not expired"),
        (&live_group, "not expired"),
        (&unreadable, "unreadable"),
        (&no_expiry, "no stackless:expires-at"),
    ] {
        assert!(
            dry.skipped
                .iter()
                .any(|s| s.starts_with(id.as_str()) && s.contains(why)),
            "{id} skipped for {why}: {:?}",
            dry.skipped
        );
    }
    assert!(
        !dry.skipped
            .iter()
            .any(|s| s.starts_with(&plain) || s.starts_with(&plain_group)),
        "untagged resources are not even mentioned"
    );

    let done = gc(&ec2, now, false, None).await.unwrap();
    assert_eq!(done.instances_terminated.len(), 2);
    assert_eq!(done.groups_deleted, std::slice::from_ref(&expired_group));
    assert_eq!(state(&ec2, &expired_seed).await, "terminated");
    assert_eq!(state(&ec2, &stopped_expired).await, "terminated");
    assert!(!group_exists(&ec2, &expired_group).await);
    for id in [&live_seed, &plain, &unreadable, &no_expiry] {
        assert_eq!(state(&ec2, id).await, "running", "{id} untouched");
    }
    assert!(group_exists(&ec2, &live_group).await && group_exists(&ec2, &plain_group).await);

    // Later, the rest expires too.
    let later = gc(&ec2, now + 2 * HOUR, false, None).await.unwrap();
    assert_eq!(later.instances_terminated, std::slice::from_ref(&live_seed));
    assert_eq!(later.groups_deleted, std::slice::from_ref(&live_group));
    assert_eq!(state(&ec2, &plain).await, "running");
}

#[tokio::test]
async fn a_group_still_in_use_is_skipped_with_the_reason() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let ec2 = aws_sdk_ec2::Client::new(&shim.sdk_config(&moto).await);
    let past = humantime::format_rfc3339_seconds(SystemTime::now() - HOUR).to_string();
    let g = group(&ec2, "busy", temp_tags(Some(&past))).await;
    shim.answer(|seen| {
        (seen.action == "DeleteSecurityGroup").then(|| {
            ec2_error(
                400,
                "DependencyViolation",
                "resource has a dependent object",
            )
        })
    });
    let report = gc(&ec2, SystemTime::now(), false, None).await.unwrap();
    assert!(report.groups_deleted.is_empty());
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.starts_with(&g) && s.contains("still in use")),
        "{:?}",
        report.skipped
    );
}

#[tokio::test]
async fn deregisters_images_that_never_became_available() {
    let moto = Moto::start();
    let shim = Shim::start(&moto);
    let ec2 = aws_sdk_ec2::Client::new(&shim.sdk_config(&moto).await);
    let bare = def("bare");
    let now = SystemTime::now();
    let waits = quick(Duration::from_secs(30));
    let bake = |n: u32, ts: &'static str| {
        let (ec2, bare, waits) = (ec2.clone(), bare.clone(), waits.clone());
        async move {
            let seed = stopped_instance(&ec2).await;
            let b = if ts.is_empty() {
                build(n, "h")
            } else {
                build_at(n, ts, "h")
            };
            create_and_wait_with(&ec2, &seed, &bare, &b, &waits)
                .await
                .unwrap()
                .image_id
        }
    };
    let failed = bake(1, "").await;
    let pending_new = bake(2, "").await;
    let pending_old = bake(3, "20200101000000").await;
    let available_old = bake(4, "20200101000000").await;
    let disabled_old = bake(5, "20200101000000").await;
    let seed = stopped_instance(&ec2).await;
    let by_hand = ec2
        .create_image()
        .instance_id(&seed)
        .name("by-hand")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    for (id, st) in [
        (&failed, "failed"),
        (&pending_new, "pending"),
        (&pending_old, "pending"),
        (&disabled_old, "disabled"),
        (&by_hand, "failed"),
    ] {
        let (id, st) = (id.clone(), st.to_string());
        shim.rewrite(move |seen, body| {
            if seen.action == "DescribeImages" {
                set_image_state(&body, &id, &st, "")
            } else {
                body
            }
        });
    }

    let dry = gc(&ec2, now, true, None).await.unwrap();
    let mut gone = dry.images_deregistered.clone();
    gone.sort();
    let mut want = vec![failed.clone(), pending_old.clone()];
    want.sort();
    assert_eq!(gone, want);
    assert!(
        dry.skipped
            .iter()
            .any(|s| s.starts_with(&pending_new) && s.contains("may still be running")),
        "{:?}",
        dry.skipped
    );
    assert_eq!(own_images(&ec2).await.len(), 6);

    let done = gc(&ec2, now, false, None).await.unwrap();
    let mut gone = done.images_deregistered.clone();
    gone.sort();
    assert_eq!(gone, want);
    let mut left: Vec<String> = own_images(&ec2)
        .await
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect();
    left.sort();
    let mut want_left = vec![pending_new, available_old, disabled_old, by_hand];
    want_left.sort();
    assert_eq!(left, want_left);
}

/// The image a build makes of a stopped seed (available at once in moto), never published.
async fn made_image(ec2: &aws_sdk_ec2::Client, def: &ImageDef, b: &Build) -> String {
    let seed = stopped_instance(ec2).await;
    create_and_wait_with(ec2, &seed, def, b, &quick(Duration::from_secs(30)))
        .await
        .unwrap()
        .image_id
}

#[tokio::test]
async fn an_ended_build_loses_what_it_left_at_once_but_not_an_image_that_went_live() {
    let moto = Moto::start();
    let config = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let ssm = aws_sdk_ssm::Client::new(&config);
    let bare = def("bare");
    let now = SystemTime::now();
    let future = humantime::format_rfc3339_seconds(now + HOUR).to_string();
    let tagged = |b: &Build| {
        let mut t = temp_tags(Some(&future));
        t.push(image::tag(tags::BUILD_ID, &b.id));
        t
    };
    // A bake killed while making its image: its lease runs for another hour.
    let killed = build(1, "h");
    let killed_group = group(&ec2, "killed", tagged(&killed)).await;
    let killed_seed = instance(&ec2, &killed_group, tagged(&killed)).await;
    let half_made = made_image(&ec2, &bare, &killed).await;
    // One killed after writing the parameter, before tagging the image published: it is live.
    let live = build(2, "h");
    let named = made_image(&ec2, &bare, &live).await;
    ssm.put_parameter()
        .name("/stackless/images/bare")
        .value(&named)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    // One still running.
    let running = build(3, "h");
    let running_group = group(&ec2, "running", tagged(&running)).await;
    let running_image = made_image(&ec2, &bare, &running).await;

    // Without --build, nothing of it has expired yet.
    let plain = gc(&ec2, now, false, None).await.unwrap();
    assert!(
        plain.instances_terminated.is_empty()
            && plain.groups_deleted.is_empty()
            && plain.images_deregistered.is_empty(),
        "{plain:?}"
    );

    let parameter_of = |name: &str| (name == "bare").then(|| "/stackless/images/bare".to_string());
    let builds = [killed.id.clone(), live.id.clone()];
    let ended = Ended {
        builds: &builds,
        ssm: &ssm,
        parameter_of: &parameter_of,
    };
    let done = gc(&ec2, now, false, Some(&ended)).await.unwrap();
    assert_eq!(
        done.instances_terminated,
        std::slice::from_ref(&killed_seed)
    );
    assert_eq!(done.groups_deleted, std::slice::from_ref(&killed_group));
    assert_eq!(done.images_deregistered, std::slice::from_ref(&half_made));
    assert!(
        done.skipped
            .iter()
            .any(|s| s.starts_with(&named) && s.contains("names it")),
        "{:?}",
        done.skipped
    );
    assert_eq!(state(&ec2, &killed_seed).await, "terminated");
    assert!(!group_exists(&ec2, &killed_group).await);
    assert!(group_exists(&ec2, &running_group).await);
    let mut left: Vec<String> = own_images(&ec2)
        .await
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect();
    left.sort();
    let mut want = vec![named, running_image];
    want.sort();
    assert_eq!(left, want);
}

#[test]
fn build_start_comes_from_the_build_id() {
    let t = build_started("b-20240102030405-abcdef").unwrap();
    assert_eq!(
        humantime::format_rfc3339_seconds(t).to_string(),
        "2024-01-02T03:04:05Z"
    );
    assert!(build_started("b-2024").is_none());
    assert!(build_started("x-20240102030405-abcdef").is_none());
}

#[test]
fn expiry_is_read_from_the_tag() {
    let now = SystemTime::now();
    let at = |d: SystemTime| {
        vec![image::tag(
            tags::EXPIRES_AT,
            &humantime::format_rfc3339_seconds(d).to_string(),
        )]
    };
    assert_eq!(expired(&at(now - HOUR), now), Ok(true));
    assert_eq!(expired(&at(now + HOUR), now), Ok(false));
    assert!(expired(&[], now)
        .unwrap_err()
        .contains("no stackless:expires-at"));
    assert!(expired(&[image::tag(tags::EXPIRES_AT, "soon")], now)
        .unwrap_err()
        .contains("unreadable"));
}
