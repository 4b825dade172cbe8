use super::*;
use crate::definition;

fn def(name: &str) -> ImageDef {
    definition::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images"),
        name,
    )
    .unwrap()
}

fn inputs(bin: &[u8]) -> RenderInputs<'_> {
    RenderInputs {
        templates: None,
        init_binary: bin,
        bootstrap: None,
        build_id: "b-test",
        build_ca: false,
    }
}

#[test]
fn both_images_render_and_pass_bash_n() {
    for name in ["bare", "preseeded", "bare-arm64", "preseeded-arm64"] {
        let d = def(name);
        let r = render(&d, &inputs(b"\x7fELF fake")).unwrap();
        check_shell("provision.sh", &r.provision).unwrap();
        check_shell("generalize.sh", &r.generalize).unwrap();
        assert_eq!(r.files[0].name, "stackless-init");
        assert!(r.provision.contains("/usr/local/sbin/stackless-init"));
        let unit = r
            .files
            .iter()
            .find(|f| f.name == "stackless-init.service")
            .unwrap();
        assert!(String::from_utf8_lossy(&unit.content).contains("Type=notify"));
        let sha = hex::encode(sha2::Sha256::digest(b"\x7fELF fake"));
        assert!(
            r.provision.contains(&sha),
            "the script checks the binary it installs"
        );
    }
    let pre = render(&def("preseeded"), &inputs(b"x")).unwrap();
    assert!(
        pre.provision.contains("salt==3008.4"),
        "preseeded installs salt"
    );
    let bare = render(&def("bare"), &inputs(b"x")).unwrap();
    assert!(
        !bare.provision.contains("pip install -q \"salt=="),
        "bare leaves salt to the first boot"
    );
}

#[test]
fn user_templates_override_and_errors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("minion.tera"),
        "# mine for {{ image.image }}\nfile_client: local\n",
    )
    .unwrap();
    let mut i = inputs(b"x");
    i.templates = Some(dir.path());
    let r = render(&def("bare"), &i).unwrap();
    let minion = r.files.iter().find(|f| f.name == "minion").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&minion.content),
        "# mine for bare\nfile_client: local\n"
    );
    std::fs::write(dir.path().join("minion.tera"), "{{ image.nope }}").unwrap();
    let e = render(&def("bare"), &i).unwrap_err().to_string();
    assert!(e.contains("minion.tera") && e.contains("nope"), "{e}");
    std::fs::write(dir.path().join("provision.sh.tera"), "if then fi\n").unwrap();
    std::fs::write(dir.path().join("minion.tera"), "ok").unwrap();
    let r = render(&def("bare"), &i).unwrap();
    assert!(check_shell("provision.sh", &r.provision)
        .unwrap_err()
        .to_string()
        .contains("bash -n"));
}

#[test]
fn programs_become_supervisord_configs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.toml"),
        "[source]\nami = \"ami-1\"\n[programs.web]\ncommand = \"/usr/bin/web --port 80 --fill 100%\"\nuser = \"www-data\"\nenvironment = { MODE = \"prod\" }\n",
    )
    .unwrap();
    let d = definition::load(dir.path(), "web").unwrap();
    let r = render(&d, &inputs(b"x")).unwrap();
    let conf = r
        .files
        .iter()
        .find(|f| f.name == "program-web.conf")
        .unwrap();
    let text = String::from_utf8_lossy(&conf.content);
    assert!(
        text.contains(
            "[program:web]\ncommand=/usr/bin/web --port 80 --fill 100%%\nuser=www-data\n"
        ),
        "{text}"
    );
    assert!(text.contains("environment=MODE=\"prod\""), "{text}");
    assert!(r.provision.contains("/etc/supervisor/conf.d/web.conf"));
}

#[test]
fn render_out_writes_everything_for_review() {
    let r = render(&def("preseeded"), &inputs(b"bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_out(&r, dir.path()).unwrap();
    for f in [
        "provision.sh",
        "generalize.sh",
        "init.toml",
        "stackless-init",
        "supervisord.conf",
        "user-data.example.toml",
        "seed-user-data.sh",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
}

#[test]
fn the_seed_user_data_passes_sh_n_and_starts_with_the_lease() {
    for name in ["bare", "preseeded"] {
        let d = def(name);
        let r = render(&d, &inputs(b"bin")).unwrap();
        let ud = &r.seed_user_data;
        check_seed_user_data("seed-user-data.sh", ud, d.lease_minutes).unwrap();
        check_shell("seed-user-data.sh", ud).unwrap();
        // The lease is the first thing after the shebang, before anything that could fail.
        assert!(ud.starts_with("#!/bin/sh\nshutdown -h +120\n"), "{ud}");
        let lease_at = ud.find("shutdown -h +").unwrap();
        for later in ["has_agent", "fetch", "dpkg", "gpgv", "systemctl"] {
            assert!(
                ud.find(later).unwrap() > lease_at,
                "{later} before the lease"
            );
        }
        assert!(ud.contains(&format!("agent_url='{}'", definition::SSM_AGENT_URL)));
        assert!(ud.contains(SEED_FAILURE_PREFIX));
        // AWS's key, unarmored for gpgv.
        assert!(ud.contains("mQENBGTtIoIBCAD2M1aoGIE0FXynAHM/jtuvdAVVaX3Q4ZejTqrX+Jq8ElAMhxyO"));
        assert!(!ud.contains("BEGIN PGP"));
        assert!(ud.len() < USER_DATA_LIMIT);
    }
}

#[test]
fn a_seed_user_data_without_the_lease_first_is_refused() {
    let ok = "#!/bin/sh\n# comment\nshutdown -h +30\necho hi\n";
    check_seed_user_data("x", ok, 30).unwrap();
    let late = "#!/bin/sh\necho first\nshutdown -h +30\n";
    let e = check_seed_user_data("x", late, 30).unwrap_err().to_string();
    assert!(
        e.contains("must be the first command") && e.contains("echo first"),
        "{e}"
    );
    let e = check_seed_user_data("x", "#!/bin/sh\nshutdown -h +30\nif then\n", 30)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sh -n"), "{e}");
}

#[test]
fn the_generalising_script_removes_the_seeds_ssm_agent_unless_kept() {
    let mut d = def("bare");
    assert!(!d.keep_ssm_agent, "removed by default");
    let r = render(&d, &inputs(b"bin")).unwrap();
    check_shell("generalize.sh", &r.generalize).unwrap();
    assert!(r
        .generalize
        .contains("/var/lib/stackless-seed/installed-ssm-agent"));
    assert!(r.generalize.contains("dpkg --purge amazon-ssm-agent"));
    assert!(r
        .generalize
        .contains("ExecStop=/usr/local/sbin/stackless-remove-ssm-agent"));
    d.keep_ssm_agent = true;
    let r = render(&d, &inputs(b"bin")).unwrap();
    check_shell("generalize.sh", &r.generalize).unwrap();
    assert!(r.generalize.contains("keep_ssm_agent = true"));
    assert!(!r.generalize.contains("dpkg --purge amazon-ssm-agent"));
}

#[test]
fn the_agent_key_is_checked_and_can_be_replaced() {
    let aws = include_str!("../../../templates/ssm-agent-key.asc");
    let body = public_key_base64(aws).unwrap();
    assert!(
        body.starts_with("mQENBGTtIoIB") && body.ends_with("+pw="),
        "{body}"
    );
    // A damaged body fails the armor checksum.
    let damaged = aws.replace("mQENBGTtIoIB", "mQENBGTtIoIC");
    let e = public_key_base64(&damaged).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
    let e = public_key_base64("just text").unwrap_err().to_string();
    assert!(e.contains("BEGIN PGP PUBLIC KEY BLOCK"), "{e}");
    // A user's templates folder replaces the key (tests put their own there).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(SSM_AGENT_KEY), "not a key").unwrap();
    let mut i = inputs(b"bin");
    i.templates = Some(dir.path());
    let e = format!("{:#}", render(&def("bare"), &i).unwrap_err());
    assert!(e.contains(SSM_AGENT_KEY), "{e}");
}

/// With seeds, provisioning fills the stores with the agent itself, and generalising keeps the
/// seeded stores (and only those) without what a boot on the seed machine published. The
/// generalising loop is run, on a copy of the layout.
#[test]
fn seeded_object_stores_are_filled_and_survive_generalising() {
    let mut d = def("preseeded");
    d.seeds = vec![crate::definition::Seed {
        name: "config".into(),
        repo: "https://git.example.com/config.git".into(),
        reference: "prod".into(),
    }];
    let r = render(&d, &inputs(b"bin")).unwrap();
    check_shell("provision.sh", &r.provision).unwrap();
    check_shell("generalize.sh", &r.generalize).unwrap();
    assert!(
        r.provision.contains(
            "/usr/local/sbin/stackless-init seed config 'https://git.example.com/config.git' --ref 'prod'"
        ),
        "{}",
        r.provision
    );

    let tmp = tempfile::tempdir().unwrap();
    let repos = tmp.path().join("repos");
    for p in [
        "config/store.git/objects/pack",
        "config/store.git/refs/stackless/releases",
        "config/releases/abc",
        "salt/store.git/objects",
        "salt/releases/def",
    ] {
        std::fs::create_dir_all(repos.join(p)).unwrap();
    }
    std::os::unix::fs::symlink("releases/abc", repos.join("config/current")).unwrap();
    let start = r.generalize.find("for repo in").unwrap();
    let end = start + r.generalize[start..].find("\ndone").unwrap() + 5;
    let fragment =
        r.generalize[start..end].replace("/var/lib/stackless/repos", repos.to_str().unwrap());
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &fragment])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = |p: &str| repos.join(p).exists() || repos.join(p).is_symlink();
    assert!(left("config/store.git/objects/pack"));
    assert!(!left("config/store.git/refs/stackless/releases"));
    assert!(!left("config/releases") && !left("config/current"));
    assert!(!left("salt"), "an unseeded store is removed");

    // Without seeds, all of repos/ goes.
    let r = render(&def("preseeded"), &inputs(b"bin")).unwrap();
    assert!(r.generalize.contains("rm -rf /var/lib/stackless/repos"));
    assert!(!r.provision.contains("stackless-init seed"));
}

/// The agent's unit starts before the network and waits for it (and for supervisord, where the
/// image has it) itself, once salt-call is warming up.
#[test]
fn the_agent_unit_waits_for_the_network_and_supervisord_itself() {
    let unit = |d: &ImageDef| {
        let r = render(d, &inputs(b"x")).unwrap();
        let f = r
            .files
            .iter()
            .find(|f| f.name == "stackless-init.service")
            .unwrap();
        String::from_utf8(f.content.clone()).unwrap()
    };
    let with = unit(&def("preseeded"));
    assert!(
        with.contains("\nWants=network-online.target supervisor.service\n"),
        "{with}"
    );
    assert!(
        with.contains("\nExecStart=/usr/local/sbin/stackless-init boot --wait-for network-online.target,supervisor.service\n"),
        "{with}"
    );
    assert!(
        !with.lines().any(|l| l.starts_with("After=network")),
        "not ordered after the network: {with}"
    );
    let mut d = def("bare");
    d.supervisor = false;
    let without = unit(&d);
    assert!(
        without.contains("\nWants=network-online.target\n"),
        "{without}"
    );
    assert!(
        without.contains("boot --wait-for network-online.target\n")
            && !without.contains("supervisor.service"),
        "{without}"
    );
}
