use super::*;
use std::os::unix::fs::PermissionsExt;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn token_file_is_private_and_removed_on_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run/stackless");
    let secret = Secret::new("ghp_CANARY".to_string());
    let auth = GitAuth::https_token(&run, "x-access-token", &secret, Path::new("/agent")).unwrap();
    let dir = auth.dir().to_path_buf();
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("askpass")), 0o600);
    let mut cmd = Command::new("git");
    auth.apply(&mut cmd);
    let args: Vec<_> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(args, ["-c", "credential.helper="]);
    let env: Vec<String> = cmd
        .get_envs()
        .map(|(k, v)| {
            format!(
                "{}={}",
                k.to_string_lossy(),
                v.unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    assert!(env.contains(&"GIT_ASKPASS=/agent".to_string()), "{env:?}");
    assert!(
        !format!("{args:?}{env:?}").contains("CANARY"),
        "the secret is in no argv or env"
    );
    drop(auth);
    assert!(!dir.exists());
}

#[test]
fn ssh_key_files_and_command() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Secret::new(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----".to_string(),
    );
    let auth = GitAuth::ssh_key(tmp.path(), &key, "h ssh-ed25519 AAAA").unwrap();
    let dir = auth.dir().to_path_buf();
    assert_eq!(mode(&dir.join("key")), 0o600);
    assert!(fs::read_to_string(dir.join("key"))
        .unwrap()
        .ends_with("-----\n"));
    let mut cmd = Command::new("git");
    auth.apply(&mut cmd);
    let ssh = cmd
        .get_envs()
        .find(|(k, _)| *k == "GIT_SSH_COMMAND")
        .and_then(|(_, v)| v)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    for want in [
        "-o IdentitiesOnly=yes",
        "-o StrictHostKeyChecking=yes",
        "-o UserKnownHostsFile=",
        "-F /dev/null",
    ] {
        assert!(ssh.contains(want), "{ssh}");
    }
    drop(auth);
    assert!(!dir.exists());
    let not_a_key = Secret::new("hunter2".into());
    let e = GitAuth::ssh_key(tmp.path(), &not_a_key, "h ssh-ed25519 AAAA").unwrap_err();
    assert!(!format!("{e:#}").contains("hunter2"));
}

#[test]
fn askpass_answers_only_git_prompts() {
    let file = "x-access-token\nghp_tok\n";
    assert_eq!(
        askpass_answer("Username for 'https://h': ", file).unwrap(),
        "x-access-token"
    );
    assert_eq!(
        askpass_answer("Password for 'https://x-access-token@h': ", file).unwrap(),
        "ghp_tok"
    );
    assert!(askpass_answer("Are you sure (yes/no)?", file).is_err());
    let multi = Secret::new("a\nb".into());
    assert!(GitAuth::https_token(Path::new("/nonexistent"), "u", &multi, Path::new("/a")).is_err());
}

#[test]
fn a_dead_agents_secret_folder_is_removed_and_a_live_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run/stackless");
    // No process has pid 4,000,000 (above pid_max's ceiling of 4,194,304 it would be invalid).
    let dead = run.join("git-auth-4000000-0");
    let live = run.join(format!("git-auth-{}-999", std::process::id()));
    for d in [&dead, &live] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("askpass"), "ghp_OLD").unwrap();
    }
    let secret = Secret::new("ghp_NEW".to_string());
    let auth = GitAuth::https_token(&run, "x-access-token", &secret, Path::new("/agent")).unwrap();
    assert!(!dead.exists(), "a dead agent's secret outlived it");
    assert!(live.exists(), "a live agent's folder was removed");
    drop(auth);
}
