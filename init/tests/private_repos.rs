//! Private repositories against real servers: git's `http-backend` behind lighttpd with TLS (a
//! test CA) and basic auth, and OpenSSH's `sshd` on loopback with `git-shell` and a deploy key.
//! Each: the fetch works, a wrong secret keeps the last release and names the parameter, an
//! unknown server (CA or host key) is refused, and the secret is in no file left behind.
//!
//! The secrets come from a [`SecretSource`] standing in for SSM (the SSM client itself is tested
//! against moto in `aws::ssm`). The agent's own binary answers git's askpass prompts.
//! Needs `lighttpd`, `lighttpd-mod-openssl`, `openssh-server`, `openssl` (scripts/install-test-deps.sh).

use stackless_init::aws::ssm::Secret;
use stackless_init::paths::Layout;
use stackless_init::private::{self, SecretSource, ASKPASS_ENV};
use stackless_init::repos::{self, SyncOutcome};
use stackless_init::userdata::{self, RepoSpec};
mod common;

use common::servers::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

struct Source(HashMap<String, String>);

impl SecretSource for Source {
    fn get(&mut self, parameter: &str) -> anyhow::Result<Secret> {
        match self.0.get(parameter) {
            Some(v) => Ok(Secret::new(v.clone())),
            None => anyhow::bail!("SSM parameter {parameter} does not exist"),
        }
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=T",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1"))
}

/// A bare repository `upstream.git` under `dir` and a work tree pushing to it.
fn upstream(dir: &Path) -> (PathBuf, PathBuf) {
    let bare = dir.join("upstream.git");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(dir, &["init", "-q", "--bare", bare.to_str().unwrap()]);
    git(&bare, &["config", "http.receivepack", "false"]);
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
    commit(&work, "one");
    (bare, work)
}

fn commit(work: &Path, content: &str) -> String {
    std::fs::write(work.join("top.sls"), content).unwrap();
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", content]);
    git(work, &["push", "-q", "origin", "HEAD:main"]);
    git(work, &["rev-parse", "HEAD"])
}

fn spec_from_user_data(text: &str, section: &str) -> (RepoSpec, userdata::Settings) {
    let doc = userdata::parse("user-data", text).unwrap_or_else(|e| panic!("{e}"));
    let settings = userdata::resolve(
        &userdata::Document::default(),
        &doc,
        &stackless_init::imds::Identity::example(),
    )
    .unwrap();
    let spec = if section == "salt" {
        settings.salt.repo.clone().unwrap()
    } else {
        settings.config.clone().unwrap()
    };
    (spec, settings)
}

fn sync(
    layout: &Layout,
    name: &str,
    spec: &RepoSpec,
    secrets: &[(&str, &str)],
) -> anyhow::Result<SyncOutcome> {
    let mut source = Source(
        secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    private::sync_with_source(
        layout,
        name,
        spec,
        spec.credentials.as_ref().unwrap(),
        T,
        &mut source,
        &Default::default(),
    )
}

#[test]
fn https_token_through_askpass() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (_bare, work) = upstream(base);
    let first = git(&work, &["rev-parse", "HEAD"]);
    test_certificates(base);
    let good = "ghp_GOODtoken0123456789";
    let server = HttpsGit::start(base, "x-access-token", good);
    let port = server.port;

    // The CA comes the way users give it: user-data's ca_certificates, checked by the agent's
    // parser. (The agent installs it into the system trust store, trust.rs; a test must not
    // touch this machine's store, so git gets the parsed bundle through GIT_SSL_CAINFO.)
    let ca = std::fs::read_to_string(base.join("test-ca.pem")).unwrap();
    let user_data = format!(
        "ca_certificates = '''\n{ca}'''\n[salt]\nrepo = \"https://localhost:{port}/git/upstream.git\"\n\
         [salt.credentials]\ntoken_parameter = \"/stackless/git-token\"\n"
    );
    let (spec, settings) = spec_from_user_data(&user_data, "salt");
    std::fs::write(
        base.join("trusted.pem"),
        settings.ca_certificates.as_deref().unwrap(),
    )
    .unwrap();
    std::env::set_var("GIT_SSL_CAINFO", base.join("trusted.pem"));
    std::env::set_var(ASKPASS_ENV, env!("CARGO_BIN_EXE_stackless-init"));
    let layout = Layout::new(base.join("root"));

    // The right token: published.
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", good)]).expect("sync");
    assert_eq!(
        out,
        SyncOutcome::Updated {
            commit: first.clone(),
            previous: None
        }
    );

    // A wrong (revoked) token: the last release stays, the error names the parameter only.
    let second = commit(&work, "two");
    let wrong = "ghp_WRONGcanary999";
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", wrong)]).expect("kept");
    match &out {
        SyncOutcome::KeptLast { commit, error } => {
            assert_eq!(commit, &first);
            assert!(error.contains("/stackless/git-token"), "{error}");
            assert!(!error.contains(wrong) && !error.contains(good), "{error}");
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }
    // A missing parameter: the same, with SSM's message.
    let out = sync(&layout, "salt", &spec, &[]).expect("kept");
    assert!(
        matches!(&out, SyncOutcome::KeptLast { error, .. } if error.contains("does not exist")),
        "{out:?}"
    );

    // A server whose certificate no trusted CA signed is refused, even with the right token.
    std::env::set_var("GIT_SSL_CAINFO", base.join("other-ca.pem"));
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", good)]).expect("kept");
    match &out {
        SyncOutcome::KeptLast { error, .. } => {
            assert!(error.to_lowercase().contains("certificate"), "{error}")
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }
    std::env::set_var("GIT_SSL_CAINFO", base.join("trusted.pem"));
    let out = sync(&layout, "salt", &spec, &[("/stackless/git-token", good)]).expect("sync");
    assert_eq!(
        out,
        SyncOutcome::Updated {
            commit: second,
            previous: Some(first)
        }
    );

    // No token anywhere under the agent's root (.git/config included), nothing left in /run.
    for secret in [good, wrong] {
        let found = files_containing(layout.root(), secret);
        assert!(found.is_empty(), "{secret} in {found:?}");
    }
    let left: Vec<_> = std::fs::read_dir(layout.run_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the run folder: {left:?}");
    assert!(repos::current_commit(&layout, "salt").is_some());
}

#[test]
fn ssh_deploy_key_with_known_hosts() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    let (bare, work) = upstream(base);
    let first = git(&work, &["rev-parse", "HEAD"]);
    let keygen = |name: &str| {
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(base.join(name)));
        std::fs::read_to_string(base.join(format!("{name}.pub"))).unwrap()
    };
    let host_pub = keygen("host_key");
    let other_host_pub = keygen("other_host_key");
    let deploy_pub = keygen("deploy_key");
    keygen("wrong_key");
    std::fs::write(
        base.join("authorized_keys"),
        format!("restrict,command=\"git-shell -c \\\"$SSH_ORIGINAL_COMMAND\\\"\" {deploy_pub}"),
    )
    .unwrap();
    let port = free_port();
    let conf = base.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nAllowUsers root\n",
            d = base.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(base.join("sshd.log")).unwrap())
        .spawn()
        .expect("sshd (apt-get install openssh-server)");
    wait_listening(port, &mut child, "sshd");
    let _server = Killed(child);

    let host_line = |public: &str| {
        let mut fields = public.split_whitespace();
        format!(
            "[127.0.0.1]:{port} {} {}",
            fields.next().unwrap(),
            fields.next().unwrap()
        )
    };
    let user_data = |known_hosts: &str| {
        format!(
            "[config]\nrepo = \"ssh://root@127.0.0.1:{port}{}\"\n[config.credentials]\n\
             ssh_key_parameter = \"/stackless/deploy-key\"\nknown_hosts = \"{known_hosts}\"\n",
            bare.display()
        )
    };
    let (spec, _) = spec_from_user_data(&user_data(&host_line(&host_pub)), "config");
    let key = std::fs::read_to_string(base.join("deploy_key")).unwrap();
    let wrong_key = std::fs::read_to_string(base.join("wrong_key")).unwrap();
    let layout = Layout::new(base.join("root"));

    let out = sync(&layout, "config", &spec, &[("/stackless/deploy-key", &key)]).expect("sync");
    assert_eq!(
        out,
        SyncOutcome::Updated {
            commit: first.clone(),
            previous: None
        }
    );

    commit(&work, "two");
    let out = sync(
        &layout,
        "config",
        &spec,
        &[("/stackless/deploy-key", &wrong_key)],
    )
    .expect("kept");
    match &out {
        SyncOutcome::KeptLast { commit, error } => {
            assert_eq!(commit, &first);
            assert!(error.contains("/stackless/deploy-key"), "{error}");
            assert!(error.contains("Permission denied"), "{error}");
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }

    // A host key other than the one given: refused, never learned.
    let (spec_other, _) = spec_from_user_data(&user_data(&host_line(&other_host_pub)), "config");
    let out = sync(
        &layout,
        "config",
        &spec_other,
        &[("/stackless/deploy-key", &key)],
    )
    .expect("kept");
    match &out {
        SyncOutcome::KeptLast { error, .. } => {
            assert!(error.contains("Host key verification failed"), "{error}")
        }
        other => panic!("expected KeptLast, got {other:?}"),
    }

    let key_body: String = key.lines().nth(1).unwrap().to_string();
    let found = files_containing(layout.root(), &key_body);
    assert!(found.is_empty(), "the key is in {found:?}");
    let left: Vec<_> = std::fs::read_dir(layout.run_dir())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the run folder: {left:?}");
}

/// Boots the built agent (`boot --once`, logging at trace) and returns its output.
fn boot(root: &Path, imds: &str, moto: &str, path: &str, envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stackless-init"));
    cmd.arg("-vv")
        .arg("--root")
        .arg(root)
        .args(["boot", "--once"])
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds)
        .env("AWS_ENDPOINT_URL_SSM", moto)
        .env("AWS_ENDPOINT_URL_EC2", moto)
        .env(ASKPASS_ENV, env!("CARGO_BIN_EXE_stackless-init"))
        .env("PATH", path)
        .env_remove("STACKLESS_ROOT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("running stackless-init")
}

/// The agent's other commands on a root, their stdout and stderr together.
fn agent_says(root: &Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_stackless-init"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("STACKLESS_ROOT")
        .output()
        .expect("running stackless-init");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The canary: one secret in the SSM parameter (the git token of a private HTTPS repository),
/// one in pillar (rendered into a managed file, and into the command of a state that fails, so
/// salt quotes it in its comment), one in a URL given with credentials. A whole boot of the built
/// agent runs against moto (IAM auth on, role credentials from the IMDS emulator), lighttpd and
/// the real salt, logging at trace level; then every stream and file it wrote is searched. The
/// secrets may only be where they must be (the repository's own pillar and salt's own result,
/// log and cache), and there only readable by root.
#[test]
fn canary_secrets_appear_nowhere() {
    use stackless_init::imds::emulator::{Emulator, EmulatorConfig, RoleConfig};
    use stackless_init::imds::Identity;
    use std::os::unix::fs::PermissionsExt;
    const TOKEN: &str = "ghp_CANARYtoken7f3e9a1b0c";
    const PILLAR: &str = "pillarCANARY5d2c8e41";
    const URL_TOKEN: &str = "ghp_CANARYinURL4b6d0f99";
    const PARAM: &str = "/stackless/canary/git-token";

    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    // As on an instance, nobody may walk down to the agent's files (/var/lib is 0755).
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The private config repository, over HTTPS with basic auth.
    let (_bare, work) = upstream(base);
    let config_head = git(&work, &["rev-parse", "HEAD"]);
    test_certificates(base);
    let server = HttpsGit::start(base, "x-access-token", TOKEN);

    // The salt repository (public): the pillar secret in a file and in a failing command.
    let salt = common::GitRepo::new(&base.join("public"), "salt");
    let managed = base.join("out/app.conf");
    salt.commit(
        &[
            ("top.sls", "base:\n  '*':\n    - app\n"),
            (
                "app.sls",
                &format!(
                    "app-config:\n  file.managed:\n    - name: {}\n    - makedirs: True\n    \
                     - contents: \"password={{{{ pillar['db_password'] }}}}\"\n\
                     leaky:\n  cmd.run:\n    - name: \"test {{{{ pillar['db_password'] }}}} = no\"\n",
                    managed.display()
                ),
            ),
            ("pillar/top.sls", "base:\n  '*':\n    - db\n"),
            ("pillar/db.sls", &format!("db_password: {PILLAR}\n")),
        ],
        "states",
    );

    // SSM through moto with signatures checked; the role's credentials from the emulator.
    let aws = testkit::roles::start_with_roles(&[(PARAM, TOKEN)]);
    let role = RoleConfig {
        name: aws.reader.role.clone(),
        access_key_id: aws.reader.access_key_id.clone(),
        secret_access_key: aws.reader.secret_access_key.clone(),
        token: aws.reader.token.clone(),
        expiration: aws.reader.expiration.clone(),
    };
    let user_data = |config_url: &str| {
        format!(
            "minion_id = \"web-{{instance_id}}\"\n[salt]\nrepo = \"{}\"\n[config]\nrepo = \"{config_url}\"\n\
             [config.credentials]\ntoken_parameter = \"{PARAM}\"\n",
            salt.url()
        )
    };
    // The instance moto runs, so the agent's report lands on its tags (searched below too).
    let mut identity = Identity::example();
    identity.instance_id = aws.instance_id.clone();
    let imds = Emulator::start(
        EmulatorConfig::new(identity)
            .with_user_data(user_data(&server.url("upstream")).into_bytes())
            .with_role(role.clone()),
    )
    .expect("emulator");

    // git through a wrapper that records every argv and environment it is given.
    let bin = base.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = base.join("git-calls.log");
    let real_git = run(Command::new("sh").args(["-c", "command -v git"]));
    std::fs::write(
        bin.join("git"),
        format!(
            "#!/bin/sh\n{{ printf 'argv:'; printf ' %s' \"$@\"; echo; env; }} >> {}\nexec {real_git} \"$@\"\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), common::test_path());
    let trusted = base.join("test-ca.pem");

    let root = base.join("root");
    let o = boot(
        &root,
        &imds.endpoint(),
        &aws.moto.endpoint,
        &path,
        &[("GIT_SSL_CAINFO", &trusted)],
    );
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // The private repository was fetched with the token from SSM, and salt ran with the pillar.
    assert_eq!(
        repos::current_commit(&Layout::new(&root), "config").as_deref(),
        Some(config_head.as_str()),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&managed).unwrap().trim(),
        format!("password={PILLAR}")
    );
    assert!(
        out.contains("stackless-init: boot degraded") && out.contains("leaky (cmd.run in app"),
        "the failing state is reported by id and function: {out}"
    );
    assert!(std::fs::read_to_string(&calls).unwrap().contains("argv:"));

    // The report the boot wrote on the instance's tags, through moto with IAM auth on.
    let tags = instance_tags(&aws);
    assert!(
        tags.contains("\"stackless:outcome\": \"degraded\"")
            && tags.contains(&format!("\"stackless:config-commit\": \"{config_head}\""))
            && tags.contains("\"stackless:problems\": \"highstate\""),
        "{tags}"
    );

    // The URL attempt: refused at parse time, pointing to the option, the token never repeated.
    // (Its failed boot reports too, over the tags read above.)
    let url_root = base.join("url-root");
    let at = server
        .url("upstream")
        .replace("https://", &format!("https://x-access-token:{URL_TOKEN}@"));
    imds.set_user_data(Some(user_data(&at).into_bytes()));
    let o2 = boot(
        &url_root,
        &imds.endpoint(),
        &aws.moto.endpoint,
        &path,
        &[("GIT_SSL_CAINFO", &trusted)],
    );
    let out2 = format!(
        "{}{}",
        String::from_utf8_lossy(&o2.stdout),
        String::from_utf8_lossy(&o2.stderr)
    );
    assert!(
        out2.contains("credentials in its URL") && out2.contains("token_parameter"),
        "{out2}"
    );

    // Every stream: the boots' console and journal, `status` (human and JSON), `wait`, every
    // argv and environment git was given, and the instance's tags.
    let mut streams = vec![
        ("instance tags".to_string(), tags),
        ("boot output".to_string(), out),
        ("URL boot output".to_string(), out2),
        (
            "git argv and environment".to_string(),
            std::fs::read_to_string(&calls).unwrap(),
        ),
    ];
    for r in [&root, &url_root] {
        for args in [
            &["status"][..],
            &["status", "--json"],
            &["wait", "--timeout", "1"],
        ] {
            streams.push((format!("{args:?} on {}", r.display()), agent_says(r, args)));
        }
    }
    for secret in [TOKEN, PILLAR, URL_TOKEN] {
        for (what, text) in &streams {
            assert!(!text.contains(secret), "{secret} in the {what}:\n{text}");
        }
    }

    // Every file. Only these may hold a secret, and only root may read them: the salt
    // repository's pillar, and what salt-call writes (its result and log, which quote changes,
    // and its own minion cache).
    let layout = Layout::new(&root);
    let salt_release = std::fs::canonicalize(layout.repo_current("salt")).unwrap();
    let allowed = |p: &Path| {
        p.starts_with(salt_release.join("pillar"))
            || p.starts_with(root.join("var/cache/salt"))
            || p.starts_with(root.join("var/log/salt"))
            || p == layout.highstate_out()
            || p == stackless_init::salt::highstate::log_file(&layout)
    };
    for secret in [TOKEN, PILLAR, URL_TOKEN] {
        for dir in [&root, &url_root] {
            for file in files_containing(dir, secret) {
                assert!(allowed(&file), "{secret} is in {}", file.display());
                assert!(
                    !nobody_reads(&file),
                    "{} is readable by nobody",
                    file.display()
                );
            }
        }
    }
    assert!(
        !files_containing(&root, PILLAR).is_empty(),
        "the search finds what is there (the pillar and salt's log)"
    );
    let left: Vec<_> = std::fs::read_dir(layout.run_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "secret folders left in the run folder: {left:?}"
    );
}

/// The tags of the setup's instance in moto, as JSON (`{"key": "value"}`), asked as the reader.
fn instance_tags(aws: &testkit::roles::MotoWithRoles) -> String {
    const READ: &str = r#"
import json, sys, boto3
a = json.loads(sys.stdin.read())
ec2 = boto3.client("ec2", endpoint_url=a["endpoint"], region_name="eu-west-1",
                   aws_access_key_id=a["key"], aws_secret_access_key=a["secret"],
                   aws_session_token=a["token"])
tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [a["id"]]}])["Tags"]
json.dump({t["Key"]: t["Value"] for t in tags}, sys.stdout, sort_keys=True)
"#;
    let input = serde_json::json!({
        "endpoint": aws.moto.endpoint, "key": aws.reader.access_key_id,
        "secret": aws.reader.secret_access_key, "token": aws.reader.token,
        "id": aws.instance_id,
    });
    let out = testkit::run_python(
        &testkit::python_with_botocore(),
        READ,
        input.to_string().as_bytes(),
    );
    String::from_utf8(out).expect("tags JSON")
}
