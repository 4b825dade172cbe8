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
    for name in ["bare", "preseeded"] {
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
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
}
