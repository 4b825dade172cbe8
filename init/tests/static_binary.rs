//! The shipped binary is fully static: it runs in an empty chroot that holds nothing but itself
//! (and the user-data file it is asked to check), and boots there against IMDS on loopback.
//! Needs root for chroot(2); CI runs as root.

mod common;

use stackless_init::imds::emulator::{Emulator, EmulatorConfig};
use stackless_init::imds::Identity;
use std::path::PathBuf;
use std::process::Command;

/// The static binary: `STACKLESS_INIT_STATIC` (scripts/test.sh builds it first), else built now.
fn static_binary() -> PathBuf {
    if let Ok(p) = std::env::var("STACKLESS_INIT_STATIC") {
        return PathBuf::from(p);
    }
    let o = Command::new(common::repo_root().join("scripts/build-init.sh"))
        .output()
        .expect("running build-init.sh");
    assert!(
        o.status.success(),
        "build-init.sh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .expect("a path")
            .trim(),
    )
}

#[test]
fn runs_and_boots_in_an_empty_chroot() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root for chroot (CI runs as root)"
    );
    let bin = static_binary();
    let jail = tempfile::tempdir().unwrap();
    std::fs::copy(&bin, jail.path().join("stackless-init")).unwrap();
    std::fs::write(
        jail.path().join("user-data.toml"),
        "minion_id = \"jail-{instance_id}\"\n",
    )
    .unwrap();
    let run = |args: &[&str], endpoint: &str| {
        Command::new("chroot")
            .arg(jail.path())
            .arg("/stackless-init")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
            .output()
            .expect("running chroot")
    };

    let o = run(&["--version"], "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("stackless-init "));

    let o = run(&["check", "--user-data", "/user-data.toml"], "");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(b"web-7".to_vec()))
            .unwrap();
    let o = run(&["boot", "--once"], &imds.endpoint());
    assert!(
        o.status.success(),
        "boot in the chroot failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(jail.path().join("etc/salt/minion_id")).unwrap(),
        "web-7\n"
    );
    assert!(jail.path().join("var/lib/stackless/state.json").exists());
}
