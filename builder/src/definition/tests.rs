use super::*;

fn repo_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images")
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

#[test]
fn the_shipped_definitions_load() {
    let bare = load(&repo_images(), "bare").unwrap();
    assert_eq!(bare.salt, SaltBake::None);
    assert_eq!(
        bare.source,
        Source::Parameter("/aws/service/debian/release/bookworm/latest/amd64".into())
    );
    assert_eq!(
        bare.ssm_parameter.as_deref(),
        Some("/stackless/images/bare")
    );
    let pre = load(&repo_images(), "preseeded").unwrap();
    assert_eq!(pre.salt, SaltBake::Pip);
    assert_eq!(pre.source, bare.source, "inherited from bare");
    assert_eq!(pre.instance_type, bare.instance_type);
    assert_eq!(pre.tags["stackless:image"], "preseeded");
    assert_eq!(
        pre.ssm_parameter.as_deref(),
        Some("/stackless/images/preseeded")
    );
    assert_eq!(pre.files.len(), 2);
    assert!(
        pre.defaults_toml.contains("schedule"),
        "{}",
        pre.defaults_toml
    );
    assert_eq!(
        list(&repo_images()).unwrap(),
        vec!["bare", "bare-arm64", "preseeded", "preseeded-arm64"]
    );
    assert_eq!(bare.arch, None, "x86_64 by its source");
}

#[test]
fn the_arm64_definitions_differ_from_theirs_only_in_the_architecture() {
    for (arm, parent) in [("bare-arm64", "bare"), ("preseeded-arm64", "preseeded")] {
        let a = load(&repo_images(), arm).unwrap();
        let p = load(&repo_images(), parent).unwrap();
        assert_eq!(a.arch, Some(crate::arch::Arch::Arm64), "{arm}");
        assert_eq!(
            a.source,
            Source::Parameter("/aws/service/debian/release/bookworm/latest/arm64".into()),
            "{arm}"
        );
        assert!(a.instance_type.starts_with("t4g."), "{arm}: Graviton");
        assert_eq!(
            a.ssm_parameter.as_deref(),
            Some(format!("/stackless/images/{arm}").as_str())
        );
        assert_eq!(a.tags["stackless:image"], arm);
        // Everything else is the parent's.
        assert_eq!(a.salt, p.salt, "{arm}");
        assert_eq!(a.packages, p.packages, "{arm}");
        assert_eq!(a.defaults_toml, p.defaults_toml, "{arm}");
        assert_eq!(a.provision_timeout, p.provision_timeout, "{arm}");
        assert_eq!(a.encrypted, p.encrypted, "{arm}");
    }
}

#[test]
fn arch_is_checked_and_steers_an_image_search() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad",
        "[source]\nami = \"ami-1\"\n[instance]\narch = \"aarch64\"\n",
    );
    let e = load(dir.path(), "bad").unwrap_err().to_string();
    assert!(
        e.contains("bad.toml:4:8") && e.contains("arch must be `x86_64` or `arm64`"),
        "{e}"
    );
    write(
        dir.path(),
        "search",
        "[source]\nowner = \"amazon\"\nname = \"al2023-*\"\n[instance]\narch = \"arm64\"\n",
    );
    let d = load(dir.path(), "search").unwrap();
    assert_eq!(
        d.source,
        Source::Search {
            owner: "amazon".into(),
            name: "al2023-*".into(),
            architecture: "arm64".into()
        }
    );
    write(
        dir.path(),
        "both",
        "[source]\nowner = \"amazon\"\nname = \"al2023-*\"\narchitecture = \"x86_64\"\n[instance]\narch = \"arm64\"\n",
    );
    let e = load(dir.path(), "both").unwrap_err().to_string();
    assert!(
        e.contains("[source] architecture `x86_64` and [instance] arch `arm64` differ"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_located() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "x",
        "[source]\nami = \"ami-1\"\n\n[instance]\nflavour = \"big\"\n",
    );
    let e = load(dir.path(), "x").unwrap_err();
    assert_eq!((e.line, e.column), (5, 1), "{e}");
    assert!(e.message.contains("unknown field `flavour`"), "{e}");
    assert!(e.file.ends_with("x.toml"));
}

#[test]
fn values_are_checked_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a",
        "[source]\nami = \"ami-1\"\n[instance]\nvolume_type = \"ssd\"\n",
    );
    let e = load(dir.path(), "a").unwrap_err();
    assert_eq!((e.line, e.column), (4, 15), "{e}");
    write(dir.path(), "b", "[source]\nami = \"i-1\"\n");
    assert_eq!(load(dir.path(), "b").unwrap_err().line, 2);
    write(
        dir.path(),
        "c",
        "[source]\nami = \"ami-1\"\n[provision]\nsalt = \"apt\"\n",
    );
    assert_eq!(load(dir.path(), "c").unwrap_err().line, 4);
    write(
        dir.path(),
        "d",
        "name = \"x-{date}\"\n[source]\nami = \"ami-1\"\n",
    );
    assert!(load(dir.path(), "d")
        .unwrap_err()
        .message
        .contains("{date}"));
    write(
        dir.path(),
        "e",
        "[source]\nami = \"ami-1\"\nssm_parameter = \"/p\"\n",
    );
    assert!(load(dir.path(), "e")
        .unwrap_err()
        .message
        .contains("one of"));
    write(
        dir.path(),
        "f",
        "[source]\nami = \"ami-1\"\n[publish]\naccounts = [\"12\"]\n",
    );
    assert!(load(dir.path(), "f")
        .unwrap_err()
        .message
        .contains("12-digit"));
}

#[test]
fn defaults_are_checked_as_user_data() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a",
        "[source]\nami = \"ami-1\"\n\n[defaults.sync]\nschedule = \"soon\"\n",
    );
    let e = load(dir.path(), "a").unwrap_err();
    assert!(e.message.contains("not valid stackless user-data"), "{e}");
    assert_eq!(e.line, 4, "{e}");
}

#[test]
fn extends_merges_and_finds_problems() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "base", "[source]\nami = \"ami-1\"\n[tags]\nteam = \"a\"\n[defaults.sync]\nschedule = \"@hourly\"\nsplay = \"1m\"\n");
    write(
        dir.path(),
        "child",
        "extends = \"base\"\n[tags]\nrole = \"b\"\n[defaults.sync]\nsplay = \"5m\"\n",
    );
    let d = load(dir.path(), "child").unwrap();
    assert_eq!(d.source, Source::Ami("ami-1".into()));
    assert_eq!(d.tags.len(), 2);
    assert!(
        d.defaults_toml.contains("@hourly") && d.defaults_toml.contains("5m"),
        "{}",
        d.defaults_toml
    );
    write(dir.path(), "orphan", "extends = \"nowhere\"\n");
    let e = load(dir.path(), "orphan").unwrap_err();
    assert_eq!((e.line, e.column), (1, 11), "{e}");
    write(dir.path(), "loop1", "extends = \"loop2\"\n");
    write(dir.path(), "loop2", "extends = \"loop1\"\n");
    assert!(load(dir.path(), "loop1")
        .unwrap_err()
        .message
        .contains("cycle"));
    write(dir.path(), "nosource", "[instance]\ntype = \"t3.micro\"\n");
    assert!(load(dir.path(), "nosource")
        .unwrap_err()
        .message
        .contains("[source] is missing"));
    assert!(load(dir.path(), "missing")
        .unwrap_err()
        .message
        .contains("no image definition"));
}

#[test]
fn image_names_fill_placeholders() {
    let d = load(&repo_images(), "bare").unwrap();
    assert_eq!(
        d.image_name("b-1", "20261126050000"),
        "stackless-bare-20261126050000"
    );
}

#[test]
fn values_that_reach_shell_or_supervisord_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "v",
        "[source]\nami = \"ami-1\"\n[provision]\nsalt_version = \"3008.4; rm -rf /\"\n",
    );
    assert!(load(dir.path(), "v")
        .unwrap_err()
        .message
        .contains("not a version"));
    write(dir.path(), "p", "[source]\nami = \"ami-1\"\n[programs.web]\ncommand = \"web\"\nenvironment = { A = \"x\\\"y\" }\n");
    assert!(load(dir.path(), "p")
        .unwrap_err()
        .message
        .contains("may not hold"));
    write(
        dir.path(),
        "n",
        "[source]\nami = \"ami-1\"\n[programs.web]\ncommand = \"web\\n[program:evil]\"\n",
    );
    assert!(load(dir.path(), "n")
        .unwrap_err()
        .message
        .contains("one line"));
}

#[test]
fn the_ssm_agent_settings_default_to_aws_and_removal() {
    let bare = load(&repo_images(), "bare").unwrap();
    assert_eq!(bare.ssm_agent_url, SSM_AGENT_URL);
    assert!(!bare.keep_ssm_agent);
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a",
        "[source]\nami = \"ami-1\"\n[instance]\nssm_agent_url = \"http://127.0.0.1:8000/ssm/\"\n[provision]\nkeep_ssm_agent = true\n",
    );
    let a = load(dir.path(), "a").unwrap();
    assert_eq!(
        a.ssm_agent_url, "http://127.0.0.1:8000/ssm",
        "no trailing slash"
    );
    assert!(a.keep_ssm_agent);
    write(dir.path(), "b", "extends = \"a\"\n");
    let b = load(dir.path(), "b").unwrap();
    assert_eq!(
        (b.ssm_agent_url.as_str(), b.keep_ssm_agent),
        (a.ssm_agent_url.as_str(), true)
    );
    for bad in [
        "ftp://x/y",
        "https://x/'y'",
        "https://x/$(reboot)",
        "https://x y/z",
    ] {
        write(
            dir.path(),
            "c",
            &format!("[source]\nami = \"ami-1\"\n[instance]\nssm_agent_url = {bad:?}\n"),
        );
        let e = load(dir.path(), "c").unwrap_err();
        assert_eq!(e.line, 4, "{bad}: {e}");
        assert!(e.message.contains("ssm_agent_url"), "{e}");
    }
}

#[test]
fn seeds_are_checked_with_positions_and_never_hold_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[source]\nami = \"ami-1\"\n[provision]\npackages = [\"git\"]\n";
    write(
        dir.path(),
        "ok",
        &format!("{base}[provision.seed.config]\nrepo = \"https://git.example.com/config.git\"\nref = \"prod\"\n[provision.seed.salt]\nrepo = \"git://git.example.com/salt.git\"\n"),
    );
    let d = load(dir.path(), "ok").unwrap();
    assert_eq!(
        d.seeds,
        vec![
            Seed {
                name: "config".into(),
                repo: "https://git.example.com/config.git".into(),
                reference: "prod".into()
            },
            Seed {
                name: "salt".into(),
                repo: "git://git.example.com/salt.git".into(),
                reference: "main".into()
            }
        ]
    );
    assert!(load(&repo_images(), "bare").unwrap().seeds.is_empty());

    write(
        dir.path(),
        "secret",
        &format!("{base}[provision.seed.config]\nrepo = \"https://deploy:CANARY@git.example.com/c.git\"\n"),
    );
    let e = load(dir.path(), "secret").unwrap_err();
    assert_eq!((e.line, e.column), (6, 8), "{e}");
    assert!(
        e.message.contains("credentials") && !e.message.contains("CANARY"),
        "{e}"
    );

    write(
        dir.path(),
        "name",
        &format!("{base}[provision.seed.pillar]\nrepo = \"https://x/p.git\"\n"),
    );
    let e = load(dir.path(), "name").unwrap_err();
    assert_eq!(e.line, 6, "{e}");
    assert!(e.message.contains("`salt` and `config`"), "{e}");

    write(
        dir.path(),
        "quote",
        &format!("{base}[provision.seed.salt]\nrepo = \"https://x/s.git' ; rm -rf /\"\n"),
    );
    assert_eq!(load(dir.path(), "quote").unwrap_err().line, 6);
    write(
        dir.path(),
        "badref",
        &format!(
            "{base}[provision.seed.salt]\nrepo = \"https://x/s.git\"\nref = \"--upload-pack=x\"\n"
        ),
    );
    let e = load(dir.path(), "badref").unwrap_err();
    assert_eq!((e.line, e.column), (7, 7), "{e}");

    write(
        dir.path(),
        "nogit",
        "[source]\nami = \"ami-1\"\n[provision]\npackages = [\"curl\"]\n[provision.seed.salt]\nrepo = \"https://x/s.git\"\n",
    );
    let e = load(dir.path(), "nogit").unwrap_err();
    assert!(e.message.contains("add `git`"), "{e}");
}

/// Image definitions are written by hand: any text gets a located error, never a panic (the
/// shipped definitions are the seeds; each input is loaded as a child of a real `bare.toml`).
#[test]
fn fuzzing_image_definitions_finds_no_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let mut seeds = Vec::new();
    for e in std::fs::read_dir(repo_images()).unwrap().flatten() {
        let text = std::fs::read(e.path()).unwrap();
        std::fs::write(dir.path().join(e.file_name()), &text).unwrap();
        seeds.push(text);
    }
    let file = dir.path().join("fuzzed.toml");
    testkit::fuzz::run("image-definition", &seeds, |data| {
        std::fs::write(&file, data).unwrap();
        let _ = load(dir.path(), "fuzzed");
    });
}
