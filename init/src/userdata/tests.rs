use super::*;

fn id() -> Identity {
    Identity::example()
}

fn doc(text: &str) -> Document {
    parse("user-data", text).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> UserDataError {
    parse("user-data", text).expect_err("should be rejected")
}

const FULL: &str = r#"
minion_id = "web-{instance_id}"
grains = { role = "web", env = "prod", where = "{az}", weight = 3 }

[salt]
repo = "https://github.com/acme/salt.git"
ref = "v2"

[config]
repo = "https://github.com/acme/app-config.git"

[sync]
schedule = "*/5 * * * *"
splay = "2m"
highstate = "always"

[[watch]]
paths = ["/etc/app/*.conf"]
restart = ["app"]
signal = "HUP"
"#;

#[test]
fn full_document_resolves() {
    let s = resolve(&Document::default(), &doc(FULL), &id()).unwrap();
    assert_eq!(s.minion_id, "web-i-0123456789abcdef0");
    assert_eq!(s.grains["role"].as_str(), Some("web"));
    assert_eq!(s.grains["where"].as_str(), Some("eu-west-1a"));
    assert_eq!(s.grains["weight"].as_integer(), Some(3));
    let repo = s.salt.repo.unwrap();
    assert_eq!(
        (repo.url.as_str(), repo.reference.as_str()),
        ("https://github.com/acme/salt.git", "v2")
    );
    assert_eq!(s.config.unwrap().reference, DEFAULT_REF);
    assert_eq!(s.sync.schedule, Schedule::Cron("*/5 * * * *".into()));
    assert_eq!(s.sync.splay, Duration::from_secs(120));
    assert_eq!(s.sync.highstate, HighstateMode::Always);
    assert_eq!(s.watch.len(), 1);
    assert_eq!(s.salt.states_dir, ".");
    assert_eq!(s.salt.pillar_dir, "pillar");
}

#[test]
fn lone_line_is_the_minion_id() {
    let d = doc("db-primary\n");
    let s = resolve(&Document::default(), &d, &id()).unwrap();
    assert_eq!(s.minion_id, "db-primary");
    let e = err("  db primary!\n");
    assert_eq!((e.line, e.column), (1, 3), "{e}");
    assert!(e.message.contains("only A-Z"), "{e}");
}

#[test]
fn empty_user_data_uses_instance_id() {
    let s = resolve(&Document::default(), &doc(""), &id()).unwrap();
    assert_eq!(s.minion_id, "i-0123456789abcdef0");
    assert_eq!(s.sync.schedule, Schedule::Cron(DEFAULT_SCHEDULE.into()));
    assert_eq!(
        s.supervisor_socket,
        PathBuf::from(DEFAULT_SUPERVISOR_SOCKET)
    );
}

#[test]
fn unknown_key_is_located() {
    let e = err("minion_id = \"a\"\n[salt]\nrepo = \"x\"\nbranch = \"main\"\n");
    assert_eq!((e.line, e.column), (4, 1), "{e}");
    assert!(e.message.contains("unknown field `branch`"), "{e}");
    assert!(e.to_string().starts_with("user-data:4:1: "), "{e}");
}

#[test]
fn bad_placeholder_points_at_it() {
    let e = err("minion_id = \"web-{instance}\"\n");
    assert_eq!((e.line, e.column), (1, 18), "{e}");
    assert!(e.message.contains("unknown placeholder"), "{e}");
    let e = err("[grains]\nrole = \"{rolez}\"\n");
    assert_eq!((e.line, e.column), (2, 9), "{e}");
    assert!(e.message.contains("grain `role`"), "{e}");
}

#[test]
fn minion_id_rules() {
    let e = err("minion_id = \"web server\"\n");
    assert_eq!((e.line, e.column), (1, 13));
    let long = "x".repeat(65);
    assert!(err(&format!("minion_id = \"{long}\""))
        .message
        .contains("1 to 64"));
    // A placeholder that renders too long is caught at resolve time, still located.
    let d = doc(&format!(
        "minion_id = \"{}-{{instance_id}}\"",
        "y".repeat(44)
    ));
    let mut long_id = id();
    long_id.instance_id.push_str("ffff");
    let e = resolve(&Document::default(), &d, &long_id).unwrap_err();
    assert_eq!((e.line, e.column), (1, 13), "{e}");
}

#[test]
fn bad_schedule_and_durations_are_located() {
    let e = err("[sync]\nschedule = \"*/15 * * *\"\n");
    assert_eq!((e.line, e.column), (2, 12), "{e}");
    assert!(e.message.contains("4 fields"));
    let e = err("[sync]\nsplay = \"soon\"\n");
    assert_eq!((e.line, e.column), (2, 9), "{e}");
    let e = err("[sync]\nhighstate = \"sometimes\"\n");
    assert_eq!(e.line, 2, "{e}");
    let e = err("[salt]\ntimeout = \"forever\"\n");
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn watch_rules_are_checked() {
    let e = err("[[watch]]\npaths = [\"etc/app.conf\"]\nrestart = [\"app\"]\n");
    assert_eq!((e.line, e.column), (2, 10), "{e}");
    let e = err("[[watch]]\npaths = [\"/etc/app.conf\"]\nrestart = [\"systemd:\"]\n");
    assert_eq!(e.line, 3, "{e}");
    let e = err("[[watch]]\npaths = [\"/etc/app.conf\"]\nrestart = [\"app\"]\nsignal = \"BOOM\"\n");
    assert_eq!((e.line, e.column), (4, 10), "{e}");
    let e = err("[[watch]]\npaths = [\"/etc/app.conf\"]\nrestart = []\n");
    assert!(e.message.contains("at least one"), "{e}");
    assert!(parse("u", "[[watch]]\npaths = [\"/a\"]\nrestart = [\"group:*\", \"systemd:nginx.service\"]\nsignal = \"SIGHUP\"").is_ok());
}

#[test]
fn states_dir_must_stay_inside_the_repo() {
    let e = err("[salt]\nstates_dir = \"../etc\"\n");
    assert_eq!((e.line, e.column), (2, 14), "{e}");
    assert!(err("[salt]\npillar_dir = \"/srv/pillar\"\n")
        .message
        .contains("inside the repository"));
}

#[test]
fn syntax_error_is_located() {
    let e = err("minion_id = \"a\"\n[salt\nrepo = 1\n");
    assert_eq!(e.line, 2, "{e}");
    let e = err("[salt]\nrepo = 5\n");
    assert_eq!((e.line, e.column), (2, 8), "{e}");
}

#[test]
fn cloud_init_documents_are_named() {
    let e = err("#cloud-config\npackages: [nginx]\n");
    assert!(e.message.contains("cloud-init"), "{e}");
}

#[test]
fn gzip_is_detected_by_magic() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(FULL.as_bytes()).unwrap();
    let bytes = gz.finish().unwrap();
    let d = load("user-data", &bytes).unwrap();
    assert_eq!(d.text, FULL);
    assert!(load("user-data", &[0x1f, 0x8b, 1, 2, 3])
        .unwrap_err()
        .message
        .contains("gzip"));
    assert!(load("user-data", &[b'a', 0xff, b'\n'])
        .unwrap_err()
        .message
        .contains("UTF-8"));
}

#[test]
fn user_data_wins_over_defaults() {
    let defaults = parse(
        "/etc/stackless/init.toml",
        "minion_id = \"base-{instance_id}\"\ngrains = { env = \"dev\", tier = \"1\" }\n\
         [salt]\ninstall = \"none\"\nrepo = \"https://d/salt.git\"\n[sync]\nschedule = \"@every 1m\"\n\
         [supervisor]\nsocket = \"/tmp/s.sock\"\n[[watch]]\npaths = [\"/etc/a\"]\nrestart = [\"a\"]\n",
    )
    .unwrap();
    let user = doc("grains = { env = \"prod\" }\n[salt]\nref = \"stable\"\n[[watch]]\npaths = [\"/etc/b\"]\nrestart = [\"b\"]\n");
    let s = resolve(&defaults, &user, &id()).unwrap();
    assert_eq!(s.minion_id, "base-i-0123456789abcdef0");
    assert_eq!(s.grains["env"].as_str(), Some("prod"));
    assert_eq!(s.grains["tier"].as_str(), Some("1"));
    let repo = s.salt.repo.unwrap();
    assert_eq!(
        (repo.url.as_str(), repo.reference.as_str()),
        ("https://d/salt.git", "stable")
    );
    assert_eq!(s.salt.install.method, InstallMethod::None);
    assert_eq!(s.sync.schedule, Schedule::Every(Duration::from_secs(60)));
    assert_eq!(s.supervisor_socket, PathBuf::from("/tmp/s.sock"));
    assert_eq!(s.watch.len(), 2);
}

#[test]
fn documents_round_trip_through_toml() {
    // The builder renders user-data from these types; what it writes must parse back.
    let d = doc(FULL);
    let text = toml::to_string(&d.data).unwrap();
    let again = doc(&text);
    let (a, b) = (
        resolve(&Document::default(), &d, &id()).unwrap(),
        resolve(&Document::default(), &again, &id()).unwrap(),
    );
    assert_eq!(a, b);
}

#[test]
fn watch_files_hold_only_watch_rules() {
    let rules = parse_watch_file(
        "app.toml",
        "[[watch]]\npaths = [\"/etc/app/*.conf\"]\nrestart = [\"app\"]\n",
    )
    .unwrap();
    assert_eq!(rules.len(), 1);
    let e = parse_watch_file("app.toml", "minion_id = \"x\"\n").unwrap_err();
    assert_eq!(
        (e.file.as_str(), e.line, e.column),
        ("app.toml", 1, 1),
        "{e}"
    );
    let e = parse_watch_file(
        "app.toml",
        "[[watch]]\npaths = [\"/a\"]\nrestart = [\"app\"]\nsignal = \"NOPE\"\n",
    )
    .unwrap_err();
    assert_eq!(e.line, 4, "{e}");
    assert!(parse_watch_file("empty.toml", "").unwrap().is_empty());
}

#[test]
fn a_comment_alone_is_empty_user_data() {
    let s = resolve(&Document::default(), &doc("# nothing here yet\n"), &id()).unwrap();
    assert_eq!(s.minion_id, "i-0123456789abcdef0");
}

#[test]
fn absurd_durations_are_refused_with_their_place() {
    let e = err("[sync]\nsplay = \"400d\"\n");
    assert_eq!((e.line, e.column), (2, 9), "{e}");
    assert!(e.message.contains("maximum"), "{e}");
    assert!(err("[sync]\nschedule = \"@every 500000000y\"\n")
        .message
        .contains("maximum"));
    assert!(err("[watcher]\nquiet = \"9999h\"\n")
        .message
        .contains("maximum"));
    assert!(err("[salt]\ntimeout = \"9999d\"\n")
        .message
        .contains("maximum"));
}

const PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2Vy\n-----END CERTIFICATE-----\n";

#[test]
fn ca_certificates_resolve_and_defaults_supply_them() {
    let text = format!(
        "minion_id = \"web\"\nca_certificates = \"\"\"\n# the proxy's CA\n{PEM}{PEM}\"\"\"\n"
    );
    let s = resolve(&Document::default(), &doc(&text), &id()).unwrap();
    assert_eq!(
        s.ca_certificates.as_deref(),
        Some(format!("{PEM}{PEM}").as_str())
    );
    // From the image defaults when user-data has none; user-data wins otherwise.
    let defaults = parse("init.toml", &format!("ca_certificates = '''\n{PEM}'''\n")).unwrap();
    let s = resolve(&defaults, &doc("minion_id = \"web\"\n"), &id()).unwrap();
    assert_eq!(s.ca_certificates.as_deref(), Some(PEM));
    let s = resolve(&defaults, &doc(&text), &id()).unwrap();
    assert_eq!(
        s.ca_certificates.as_deref(),
        Some(format!("{PEM}{PEM}").as_str())
    );
    let s = resolve(&Document::default(), &doc("minion_id = \"web\"\n"), &id()).unwrap();
    assert_eq!(s.ca_certificates, None);
}

#[test]
fn bad_ca_certificates_are_located() {
    // Not PEM at all: the value's first character.
    let e = err("minion_id = \"web\"\nca_certificates = \"not a certificate\"\n");
    assert_eq!((e.line, e.column), (2, 20), "{e}");
    assert!(e.message.contains("no certificate found"), "{e}");
    // A BEGIN without its END, inside a multi-line string: the BEGIN line itself.
    let e = err("ca_certificates = \"\"\"\n-----BEGIN CERTIFICATE-----\nMIIBszCC\n\"\"\"\n");
    assert_eq!((e.line, e.column), (2, 1), "{e}");
    assert!(
        e.message.contains("has no `-----END CERTIFICATE-----`"),
        "{e}"
    );
    // An END without a BEGIN, indented, in a literal string.
    let e = err("ca_certificates = '''\nx\n  -----END CERTIFICATE-----\n'''\n");
    assert_eq!((e.line, e.column), (3, 3), "{e}");
    // A bad base64 character.
    let e = err(&format!(
        "ca_certificates = '''\n{}'''\n",
        PEM.replace("QUJD", "").replace("Q2Vy", "Q2V!")
    ));
    assert_eq!((e.line, e.column), (3, 24), "{e}");
    assert_eq!(e.file, "user-data");
}

#[test]
fn a_systemd_unit_starting_with_a_dash_is_refused() {
    let e = err("[[watch]]\npaths = [\"/etc/app.conf\"]\nrestart = [\"app\", \"systemd:--now\"]\n");
    // Points at the unit name, after `systemd:`.
    assert_eq!((e.line, e.column), (3, 28), "{e}");
    assert!(e.message.contains("`--now` starts with `-`"), "{e}");
    let e = parse_watch_file(
        "w.toml",
        "[[watch]]\npaths = [\"/a\"]\nrestart = [\"systemd:-x\"]\n",
    )
    .unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    // A dash inside a name is fine.
    assert!(parse(
        "u",
        "[[watch]]\npaths = [\"/a\"]\nrestart = [\"systemd:my-app.service\"]"
    )
    .is_ok());
}

#[test]
fn timeouts_default_and_are_checked() {
    let s = resolve(&Document::default(), &Document::default(), &id()).unwrap();
    assert_eq!(s.timeouts, Timeouts::default());
    assert_eq!(s.timeouts.git, Duration::from_secs(300));
    assert_eq!(s.timeouts.salt_install, Duration::from_secs(1800));
    assert_eq!(s.timeouts.trust, Duration::from_secs(300));
    assert_eq!(s.timeouts.systemctl, Duration::from_secs(180));

    let defaults = doc("[timeouts]\ngit = \"2m\"\ntrust = \"1m\"\n");
    let user = doc("[timeouts]\ngit = \"90s\"\nsystemctl = \"30s\"\nsalt_install = \"1h\"\n");
    let s = resolve(&defaults, &user, &id()).unwrap();
    assert_eq!(
        s.timeouts,
        Timeouts {
            git: Duration::from_secs(90),
            salt_install: Duration::from_secs(3600),
            trust: Duration::from_secs(60),
            systemctl: Duration::from_secs(30),
        }
    );

    let e = err("[timeouts]\ngit = \"soon\"\n");
    assert_eq!((e.line, e.column), (2, 7), "{e}");
    let e = err("[timeouts]\nsystemctl = \"0s\"\n");
    assert!(
        e.message
            .contains("[timeouts] systemctl `0s` is shorter than 1s"),
        "{e}"
    );
    let e = err("[timeouts]\ntrust = \"2days\"\n");
    assert!(e.message.contains("maximum"), "{e}");
    let e = err("[timeouts]\npip = \"1m\"\n");
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn release_failure_policies_resolve_and_bad_values_are_located() {
    let s = resolve(&Document::default(), &doc(FULL), &id()).unwrap();
    assert_eq!(s.releases, ReleaseSettings::default());
    assert_eq!(s.releases.config_on_failure, ConfigOnFailure::Revert);
    assert_eq!(s.releases.salt_on_failure, SaltOnFailure::Retry);
    let text = "[salt]\nrepo = \"https://x/salt.git\"\non_failure = \"revert\"\n\
                [config]\nrepo = \"https://x/config.git\"\non_failure = \"keep\"\ngrace = \"12s\"\n";
    let s = resolve(&Document::default(), &doc(text), &id()).unwrap();
    assert_eq!(s.releases.config_on_failure, ConfigOnFailure::Keep);
    assert_eq!(s.releases.config_grace, Duration::from_secs(12));
    assert_eq!(s.releases.salt_on_failure, SaltOnFailure::Revert);

    let e = err("[config]\nrepo = \"https://x/c.git\"\ngrace = \"soon\"\n");
    assert_eq!((e.line, e.column), (3, 9), "{e}");
    let e = err("[config]\nrepo = \"https://x/c.git\"\non_failure = \"ignore\"\n");
    assert_eq!((e.line, e.column), (3, 14), "{e}");
    assert!(e.to_string().contains("is not one of: revert, keep"), "{e}");
    let e = err("[salt]\nrepo = \"https://x/s.git\"\non_failure = \"keep\"\n");
    assert_eq!((e.line, e.column), (3, 14), "{e}");
}
