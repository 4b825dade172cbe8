//! Tests of `[salt.credentials]` / `[config.credentials]` and of URLs with credentials in them.

use super::credentials::{credentials_in_url, url_kind, UrlKind};
use super::*;

const KEY: &str =
    "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

fn parse_ok(text: &str) -> Settings {
    let d = parse("user-data", text).unwrap_or_else(|e| panic!("{e}"));
    resolve(&Document::default(), &d, &Identity::example()).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> UserDataError {
    parse("user-data", text).expect_err("should be rejected")
}

#[test]
fn https_token_with_the_default_username() {
    let s = parse_ok(
        "[salt]\nrepo = \"https://github.com/acme/states.git\"\n\
         [salt.credentials]\ntoken_parameter = \"/stackless/github-token\"\n",
    );
    assert_eq!(
        s.salt.repo.unwrap().credentials,
        Some(RepoCredentials::Token {
            parameter: "/stackless/github-token".into(),
            username: "x-access-token".into()
        })
    );
}

#[test]
fn ssh_key_with_inline_or_parameter_known_hosts() {
    let s = parse_ok(&format!(
        "[config]\nrepo = \"git@github.com:acme/config.git\"\n\
         [config.credentials]\nssh_key_parameter = \"/stackless/deploy-key\"\nknown_hosts = \"{KEY}\"\n"
    ));
    assert_eq!(
        s.config.unwrap().credentials,
        Some(RepoCredentials::SshKey {
            parameter: "/stackless/deploy-key".into(),
            known_hosts: KnownHosts::Inline(KEY.into())
        })
    );
    let s = parse_ok(
        "[config]\nrepo = \"ssh://git@git.example:2222/config.git\"\n\
         [config.credentials]\nssh_key_parameter = \"/k\"\nknown_hosts_parameter = \"/kh\"\n",
    );
    assert!(matches!(
        s.config.unwrap().credentials,
        Some(RepoCredentials::SshKey {
            known_hosts: KnownHosts::Parameter(_),
            ..
        })
    ));
}

#[test]
fn bad_combinations_are_located() {
    let cases: &[(&str, (usize, usize), &str)] = &[
        (
            "[salt]\nrepo = \"https://h/r.git\"\n[salt.credentials]\ntoken_parameter = \"/t\"\nssh_key_parameter = \"/k\"\n",
            (5, 21),
            "both token_parameter and ssh_key_parameter",
        ),
        (
            "[salt]\nrepo = \"git@h:r.git\"\n[salt.credentials]\nssh_key_parameter = \"/k\"\n",
            (4, 21),
            "never trusts a host key on first use",
        ),
        (
            "[salt]\nrepo = \"https://h/r.git\"\n[salt.credentials]\ntoken_parameter = \"/t\"\nknown_hosts = \"x\"\n",
            (5, 15),
            "known_hosts and known_hosts_parameter are for ssh_key_parameter",
        ),
        (
            "[salt]\nrepo = \"git@h:r.git\"\n[salt.credentials]\ntoken_parameter = \"/t\"\n",
            (4, 19),
            "needs an https:// repo URL",
        ),
        (
            "[salt]\nrepo = \"http://h/r.git\"\n[salt.credentials]\ntoken_parameter = \"/t\"\n",
            (4, 19),
            "in clear",
        ),
        (
            "[config]\nrepo = \"https://h/r.git\"\n[config.credentials]\nssh_key_parameter = \"/k\"\nknown_hosts_parameter = \"/kh\"\n",
            (4, 21),
            "needs an SSH repo URL",
        ),
        (
            "[config]\nrepo = \"git@h:r\"\n[config.credentials]\nssh_key_parameter = \"/k\"\nknown_hosts = \"a\"\nknown_hosts_parameter = \"/kh\"\n",
            (6, 25),
            "both known_hosts and known_hosts_parameter",
        ),
        (
            "[config]\nrepo = \"git@h:r\"\n[config.credentials]\nssh_key_parameter = \"/k\"\nknown_hosts = \"h ssh-ed25519\"\n",
            (5, 15),
            "line 1 is not `HOST KEYTYPE KEY`",
        ),
        (
            "[config]\nrepo = \"git@h:r\"\n[config.credentials]\nssh_key_parameter = \"/k\"\nusername = \"git\"\nknown_hosts_parameter = \"/kh\"\n",
            (5, 12),
            "username goes with token_parameter",
        ),
        (
            "[config.credentials]\ntoken_parameter = \"/t\"\n",
            (2, 19),
            "without a [config] repo",
        ),
        (
            "[salt]\nrepo = \"https://h/r.git\"\n[salt.credentials]\ntoken_parameter = \"my token\"\n",
            (4, 19),
            "is not an SSM parameter name",
        ),
        (
            "[salt]\nrepo = \"https://h/r.git\"\n[salt.credentials]\nusername = \"bob\"\n",
            (4, 12),
            "needs token_parameter (HTTPS) or ssh_key_parameter",
        ),
        (
            "[salt]\nrepo = \"https://h/r.git\"\n[salt.credentials]\ntoken_parameter = \"/t\"\nusername = \"a:b\"\n",
            (5, 12),
            "username must be non-empty",
        ),
        (
            "[salt]\nrepo = \"https://h/r.git\"\n[salt.credentials]\ntoken_parameter = \"/t\"\npassword = \"x\"\n",
            (5, 1),
            "unknown field `password`",
        ),
        (
            "[aws]\nssm_endpoint = \"ssm.eu-west-1.amazonaws.com\"\n",
            (2, 16),
            "[aws] ssm_endpoint must be an https://",
        ),
        (
            "[aws]\nssm_endpoint = \"http://ssm.eu-west-1.amazonaws.com\"\n",
            (2, 16),
            "http:// only on loopback",
        ),
        (
            "[aws]\nssm_endpoint = \"https://ssm.example\"\nec2_endpoint = \"http://ec2.example\"\n",
            (3, 16),
            "[aws] ec2_endpoint must be an https://",
        ),
        (
            "[report]\nenabled = \"yes\"\n",
            (2, 11),
            "invalid type",
        ),
        (
            "[report]\nenable = true\n",
            (2, 1),
            "unknown field `enable`",
        ),
    ];
    for (text, (line, column), message) in cases {
        let e = err(text);
        assert!(e.message.contains(message), "{text}\n=> {e}");
        assert_eq!((e.line, e.column), (*line, *column), "{text}\n=> {e}");
    }
}

#[test]
fn urls_with_credentials_are_refused_without_repeating_them() {
    for (url, column, option) in [
        (
            "https://bob:ghp_CANARY123@github.com/acme/states.git",
            17,
            "token_parameter",
        ),
        (
            "https://ghp_CANARY123@github.com/acme/states.git",
            17,
            "token_parameter",
        ),
        (
            "http://x-access-token:ghp_CANARY123@git.example/s.git",
            16,
            "token_parameter",
        ),
        (
            "ssh://git:ghp_CANARY123@git.example/s.git",
            15,
            "ssh_key_parameter",
        ),
    ] {
        let text = format!("[salt]\nrepo = \"{url}\"\n");
        let e = err(&text);
        assert_eq!((e.line, e.column), (2, column), "{e}");
        assert!(
            e.message.contains("credentials in its URL") && e.message.contains(option),
            "{e}"
        );
        assert!(!e.to_string().contains("CANARY"), "{e}");
        let text = format!("[config]\nrepo = \"{url}\"\n");
        assert!(err(&text).message.contains("[config.credentials]"));
    }
    // A plain SSH user is not a credential.
    for url in [
        "git@github.com:acme/s.git",
        "ssh://git@github.com/acme/s.git",
        "https://github.com/acme/s.git",
        "file:///srv/git/s.git",
    ] {
        assert_eq!(credentials_in_url(url), None, "{url}");
    }
    assert_eq!(url_kind("git@github.com:acme/s.git"), UrlKind::Ssh);
    assert_eq!(url_kind("/srv/git/s.git"), UrlKind::Other);
    assert_eq!(url_kind("./relative:colon"), UrlKind::Other);
}

#[test]
fn credentials_come_from_the_defaults_too() {
    let defaults = parse(
        "defaults",
        "[salt]\nrepo = \"https://h/s.git\"\n[salt.credentials]\ntoken_parameter = \"/image/token\"\n",
    )
    .unwrap();
    let user = parse("user-data", "[salt]\nref = \"v2\"\n").unwrap();
    let s = resolve(&defaults, &user, &Identity::example()).unwrap();
    let repo = s.salt.repo.unwrap();
    assert_eq!(repo.reference, "v2");
    assert_eq!(
        repo.credentials.as_ref().map(|c| c.parameter()),
        Some("/image/token")
    );
    // User-data moving the repository elsewhere does not take the image's secret along.
    for url in ["git@h:s.git", "https://elsewhere.example/s.git"] {
        let user = parse("user-data", &format!("[salt]\nrepo = \"{url}\"\n")).unwrap();
        let repo = resolve(&defaults, &user, &Identity::example())
            .unwrap()
            .salt
            .repo
            .unwrap();
        assert!(repo.credentials.is_none(), "{url}: {:?}", repo.credentials);
    }
}

#[test]
fn config_group_reaches_the_spec_and_salt_stays_root_only() {
    let s = parse_ok(
        "[salt]\nrepo = \"https://h/s.git\"\n[config]\nrepo = \"https://h/c.git\"\ngroup = \"app\"\n",
    );
    assert_eq!(s.config.unwrap().group.as_deref(), Some("app"));
    assert_eq!(s.salt.repo.unwrap().group, None);
    let e = err("[config]\nrepo = \"https://h/c.git\"\ngroup = \"-x y\"\n");
    assert_eq!((e.line, e.column), (3, 9), "{e}");
    assert!(e.message.contains("is not a group name"), "{e}");
}

#[test]
fn reporting_is_on_unless_switched_off() {
    let s = parse_ok("");
    assert!(s.report);
    assert_eq!(s.ec2_endpoint, None);
    let s = parse_ok("[report]\nenabled = false\n[aws]\nec2_endpoint = \"https://ec2.vpce/\"\n");
    assert!(!s.report);
    assert_eq!(s.ec2_endpoint.as_deref(), Some("https://ec2.vpce/"));
}
