//! The local target end to end on a real debootstrapped root lives in tests/e2e-local.sh (it
//! takes minutes); these cover the pieces around it.

use super::*;

#[tokio::test]
async fn an_existing_image_is_found_only_for_the_same_inputs_and_a_disk_that_exists() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out/img");
    std::fs::create_dir_all(out.join("b-1")).unwrap();
    let disk = out.join("b-1/disk.qcow2");
    let manifest = out.join("manifest-local.json");
    let mut t = LocalTarget::new(LocalOptions::new(out.clone(), manifest.clone()));
    let def = crate::definition::load(&testkit::repo_root().join("images"), "bare").unwrap();
    assert!(
        t.find_existing(&def, "h1").await.unwrap().is_none(),
        "no manifest yet"
    );
    std::fs::write(
        &manifest,
        serde_json::json!({"input_hash": "h1", "artifact": disk, "details": {"disk": "b-1/disk.qcow2"}}).to_string(),
    )
    .unwrap();
    assert!(
        t.find_existing(&def, "h1").await.unwrap().is_none(),
        "the disk is gone"
    );
    std::fs::write(&disk, "qcow2").unwrap();
    let found = t.find_existing(&def, "h1").await.unwrap().unwrap();
    assert_eq!(found.details["disk"], "b-1/disk.qcow2");
    assert!(
        t.find_existing(&def, "h2").await.unwrap().is_none(),
        "other inputs"
    );
}

#[test]
fn only_the_newest_builds_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_path_buf();
    for b in [
        "b-20260101000000-aaaaaa",
        "b-20260102000000-bbbbbb",
        "b-20260103000000-cccccc",
    ] {
        std::fs::create_dir_all(out.join(b)).unwrap();
        std::fs::write(out.join(b).join("disk.qcow2"), "x").unwrap();
    }
    std::fs::create_dir_all(out.join(".build-b-x/root")).unwrap();
    let t = LocalTarget::new(LocalOptions::new(out.clone(), out.join("m.json")));
    t.prune_builds("b-20260103000000-cccccc");
    assert!(out.join("b-20260103000000-cccccc").exists());
    assert!(
        out.join("b-20260102000000-bbbbbb").exists(),
        "the previous build stays"
    );
    assert!(!out.join("b-20260101000000-aaaaaa").exists());
    assert!(
        out.join(".build-b-x").exists(),
        "a build in progress is not touched"
    );
}

#[test]
fn the_generalising_script_removes_the_ca_and_the_pip_cache_this_target_stages() {
    let def = crate::definition::load(&testkit::repo_root().join("images"), "bare").unwrap();
    let r = crate::render::render(
        &def,
        &crate::render::RenderInputs {
            templates: None,
            init_binary: b"x",
            bootstrap: None,
            build_id: "b-test",
            build_ca: true,
        },
    )
    .unwrap();
    assert!(
        r.generalize.contains(&format!("rm -f /{BUILD_CA_IN_ROOT}")),
        "generalize.sh and chroot::BUILD_CA_IN_ROOT disagree"
    );
    assert!(
        r.generalize
            .contains(&format!("rm -rf /{} ", caches::PIP_IN_ROOT)),
        "generalize.sh and caches::PIP_IN_ROOT disagree"
    );
}

#[tokio::test]
async fn an_arm64_definition_is_refused_plainly_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out/img");
    let mut t = LocalTarget::new(LocalOptions::new(
        out.clone(),
        out.join("manifest-local.json"),
    ));
    let images = testkit::repo_root().join("images");
    for name in ["bare-arm64", "preseeded-arm64"] {
        let def = crate::definition::load(&images, name).unwrap();
        let e = format!("{:#}", t.resolve_source(&def).await.unwrap_err());
        assert!(
            e.contains(&format!("`{name}` is an arm64 image"))
                && e.contains("the local target bakes x86_64 only")
                && e.contains("qemu-system-aarch64")
                && e.contains("--target aws"),
            "{e}"
        );
    }
    assert!(!out.exists(), "nothing made");
    let bare = crate::definition::load(&images, "bare").unwrap();
    let r = t.resolve_source(&bare).await.unwrap();
    assert_eq!(r.arch, Arch::X86_64);
}
