use super::*;
use crate::aws::test_support::{role_config, start_with_roles, MotoSetup};
use crate::imds::emulator::{Emulator, EmulatorConfig};
use crate::imds::Identity;
use crate::salt::highstate::{FailedState, HighstateReport};
use crate::state::{BootRecord, HighstateRecord, RepoRecord, SyncRecord};

/// The real EC2 tagger, counting its calls.
struct Counting {
    inner: Ec2Tagger,
    calls: usize,
}

impl Tagger for Counting {
    fn write(&mut self, tags: &[(String, String)]) -> Result<(), Ec2Error> {
        self.calls += 1;
        self.inner.write(tags)
    }
}

fn world() -> (MotoSetup, Emulator, Counting) {
    let setup = start_with_roles(&[]);
    let mut identity = Identity::example();
    identity.instance_id = setup.instance_id.clone();
    let emu = Emulator::start(EmulatorConfig::new(identity).with_role(role_config(&setup.reader)))
        .expect("emulator");
    let tagger = Counting {
        inner: Ec2Tagger::new(Some(setup.moto.endpoint.clone()), Some(emu.endpoint())),
        calls: 0,
    };
    (setup, emu, tagger)
}

fn repo(commit: &str, result: &str) -> RepoRecord {
    RepoRecord {
        url: "https://git.example/r.git".into(),
        reference: "main".into(),
        commit: Some(commit.into()),
        result: result.into(),
        synced_at: now_rfc3339(),
        error: None,
    }
}

fn booted(instance_id: &str) -> State {
    let mut state = State {
        instance_id: Some(instance_id.into()),
        boot: Some(BootRecord {
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: Some("2026-01-01T00:01:00Z".into()),
            outcome: Outcome::Ready,
            error: None,
            first_boot: true,
            total_ms: 60_000,
            steps: vec![],
        }),
        ..Default::default()
    };
    state
        .repos
        .insert("salt".into(), repo(&"a".repeat(40), "updated"));
    state
        .repos
        .insert("config".into(), repo(&"c".repeat(40), "updated"));
    state
}

fn sync(state: &mut State, outcome: Outcome) {
    state.last_sync = Some(SyncRecord {
        at: now_rfc3339(),
        trigger: "schedule".into(),
        outcome,
        error: None,
        ms: 1,
        highstate_ran: false,
        steps: vec![],
    });
}

/// Writes to moto (signatures and the role's permission checked); a sync that changed
/// nothing makes no call; a new config commit does.
#[test]
fn reports_after_a_change_and_stays_quiet_after_a_no_op() {
    let (setup, _emu, mut tagger) = world();
    let mut state = booted(&setup.instance_id);
    assert!(update_with(&mut state, &mut tagger, true));
    let record = state.report.clone().expect("recorded");
    assert_eq!(record.error, None, "{record:?}");
    assert!(record.at.is_some());
    assert_eq!(record.tags[OUTCOME], "ready");

    sync(&mut state, Outcome::Ready);
    assert!(!update_with(&mut state, &mut tagger, false), "a no-op sync");
    assert_eq!(tagger.calls, 1);

    state
        .repos
        .insert("config".into(), repo(&"d".repeat(40), "updated"));
    sync(&mut state, Outcome::Ready);
    assert!(update_with(&mut state, &mut tagger, false));
    assert_eq!(tagger.calls, 2);
    assert_eq!(state.report.as_ref().unwrap().error, None);
    assert_eq!(
        state.report.as_ref().unwrap().tags[CONFIG_COMMIT],
        "d".repeat(40)
    );
}

/// The outsider role may not tag: the denial is recorded once, with the policy it needs, shown
/// by `status`, and not tried again until the report changes.
#[test]
fn a_denial_is_recorded_once_and_shown_in_status() {
    let (setup, emu, mut tagger) = world();
    emu.set_role(Some(role_config(&setup.outsider)));
    let mut state = booted(&setup.instance_id);
    assert!(update_with(&mut state, &mut tagger, true));
    let record = state.report.clone().unwrap();
    assert!(record.denied, "{record:?}");
    let error = record.error.unwrap();
    assert!(
        error.contains("ec2:CreateTags")
            && error.contains(&format!("instance/{}", setup.instance_id)),
        "{error}"
    );
    sync(&mut state, Outcome::Ready);
    assert!(!update_with(&mut state, &mut tagger, false));
    assert_eq!(tagger.calls, 1, "a denial is not retried at every sync");

    let text = crate::status::render(&state);
    assert_eq!(text.matches("ec2:CreateTags").count(), 1, "{text}");
    assert!(text.contains("report     FAILED"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&crate::status::render_json(&state)).unwrap();
    assert_eq!(json["report"]["denied"], true);
}

/// An instance without a role (IMDS serves no credentials) is told once, like a denial: the
/// no-op syncs that follow make no IMDS call, and a change tries again.
#[test]
fn no_role_is_recorded_once_and_not_retried_at_every_sync() {
    let (setup, emu, mut tagger) = world();
    emu.set_role(None);
    let mut state = booted(&setup.instance_id);
    assert!(update_with(&mut state, &mut tagger, true));
    let record = state.report.clone().unwrap();
    assert!(record.denied, "{record:?}");
    assert!(record.no_role, "{record:?}");
    assert!(record.error.clone().unwrap().contains("no IAM role"));
    // Shown as what it is: not sent, no failure.
    let shown = crate::status::render(&state);
    assert!(
        shown.contains("report     not sent: the instance has no IAM role"),
        "{shown}"
    );
    assert!(!shown.contains("FAILED"), "{shown}");
    sync(&mut state, Outcome::Ready);
    assert!(!update_with(&mut state, &mut tagger, false));
    assert_eq!(tagger.calls, 1, "no role is not retried at every sync");
    state
        .repos
        .insert("config".into(), repo(&"e".repeat(40), "updated"));
    sync(&mut state, Outcome::Ready);
    assert!(
        update_with(&mut state, &mut tagger, false),
        "a change tries again"
    );
    assert_eq!(tagger.calls, 2);
}

#[test]
fn outcome_problems_and_failed_states() {
    let mut state = booted("i-1");
    assert_eq!(tags_for(&state).unwrap()[PROBLEMS], "");
    // A highstate that failed earlier still stands after a sync that did not retry it.
    state.highstate = Some(HighstateRecord {
        report: HighstateReport {
            ok: false,
            total: 3,
            failed: vec![FailedState {
                id: "app".into(),
                function: "cmd.run".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        commit: Some("a".repeat(40)),
        at: now_rfc3339(),
        error: None,
    });
    state
        .repos
        .insert("config".into(), repo(&"c".repeat(40), "kept-last"));
    sync(&mut state, Outcome::Ready);
    let tags = tags_for(&state).unwrap();
    assert_eq!(tags[OUTCOME], "degraded");
    assert_eq!(tags[FAILED_STATES], "1");
    assert_eq!(tags[PROBLEMS], "config-repo,highstate");

    let mut failed = booted("i-1");
    failed.repos.clear();
    failed.boot.as_mut().unwrap().outcome = Outcome::Failed;
    let tags = tags_for(&failed).unwrap();
    assert_eq!(
        (
            tags[OUTCOME].as_str(),
            tags[PROBLEMS].as_str(),
            tags[SALT_COMMIT].as_str()
        ),
        ("failed", "boot", "none")
    );
    assert_eq!(tags_for(&State::default()), None, "no boot yet");
}

#[test]
fn a_revert_says_which_commit_it_went_back_from() {
    let mut state = booted("i-1");
    assert_eq!(tags_for(&state).unwrap()[REVERTED], "none");
    let bad = "b".repeat(40);
    crate::releases::mark_bad(&mut state, "config", &bad, "restart: web is FATAL", true);
    sync(&mut state, Outcome::Ready);
    let tags = tags_for(&state).unwrap();
    assert_eq!(tags[OUTCOME], "reverted");
    assert_eq!(tags[REVERTED], format!("config:{bad}"));
    // The reason is the agent's own words, kept in status: never in a tag.
    assert!(!tags.values().any(|v| v.contains("FATAL")), "{tags:?}");
    // A problem that stands on top of it still says degraded.
    state.repos.get_mut("config").unwrap().result = "kept-last".into();
    assert_eq!(tags_for(&state).unwrap()[OUTCOME], "degraded");
}

#[test]
fn switched_off_makes_no_call() {
    let mut state = booted("i-1");
    let settings = crate::userdata::resolve(
        &Default::default(),
        &crate::userdata::parse("user-data", "[report]\nenabled = false\n").unwrap(),
        &Identity::example(),
    )
    .unwrap();
    // No IMDS and no EC2 exist here: any call would fail and be recorded as an error.
    update(&mut state, Some(&settings), true);
    let record = state.report.unwrap();
    assert!(!record.enabled && record.error.is_none() && record.at.is_none());
}
