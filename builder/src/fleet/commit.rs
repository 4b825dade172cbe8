//! The commit `--config`/`--salt` names: a short or full sha as given, or a ref (`HEAD`, a
//! branch, a tag) resolved with `git ls-remote` on the repository, under a deadline after which
//! git and its helpers (ssh, credential helpers) are killed as a group.

use crate::platform::local::process::KillGroupOnDrop;
use anyhow::{anyhow, bail, Context, Result};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// What the user asked for, and the commit (or sha prefix) it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub reference: String,
    /// Lowercase; a prefix of 7 to 40 hex digits.
    pub commit: String,
}

impl Wanted {
    /// Whether a reported commit is this one.
    pub fn matches(&self, reported: &str) -> bool {
        reported.to_ascii_lowercase().starts_with(&self.commit)
    }

    pub fn short(&self) -> &str {
        &self.commit[..self.commit.len().min(12)]
    }
}

/// A sha prefix: 7 to 40 hex digits.
pub fn is_sha(text: &str) -> bool {
    (7..=40).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves `reference`: a sha as it is, anything else through `git ls-remote repo`.
pub async fn resolve(reference: &str, repo: Option<&str>, timeout: Duration) -> Result<Wanted> {
    if is_sha(reference) {
        return Ok(Wanted {
            reference: reference.to_string(),
            commit: reference.to_ascii_lowercase(),
        });
    }
    let Some(repo) = repo else {
        bail!(
            "`{reference}` is not a commit sha; give the repository to resolve it in with --repo \
             URL (as `git ls-remote` takes it)"
        );
    };
    if stackless_init::userdata::credentials::credentials_in_url(repo).is_some() {
        // It would be in git's argv (ps, /proc) and in our errors.
        bail!(
            "--repo has credentials in its URL; use a URL without them (git's credential helper \
             or an SSH key gives them)"
        );
    }
    let out = ls_remote(repo, reference, timeout).await?;
    pick(&out, reference)
        .map(|commit| Wanted {
            reference: reference.to_string(),
            commit,
        })
        .ok_or_else(|| {
            anyhow!("`{reference}` is not a ref of {repo} (git ls-remote found no match)")
        })
}

async fn ls_remote(repo: &str, reference: &str, timeout: Duration) -> Result<String> {
    let what = format!("resolving `{reference}` with git ls-remote {repo}");
    let mut cmd = Command::new("git");
    // An annotated tag's commit is its peeled entry, listed only when asked for by name.
    let peeled = format!("{reference}^{{}}");
    cmd.args(["ls-remote", "--", repo, reference, &peeled])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("{what}: starting git"))?;
    let _group = KillGroupOnDrop(child.id().map(|p| p as i32));
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => out.with_context(|| format!("{what}: waiting for git"))?,
        Err(_) => bail!(
            "{what}: git did not finish within {}; killed it and its processes",
            humantime::format_duration(timeout)
        ),
    };
    if !out.status.success() {
        bail!(
            "{what}: git failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The commit for `reference` in `git ls-remote` output: an exact name first, then a branch,
/// then a tag (peeled to its commit).
fn pick(out: &str, reference: &str) -> Option<String> {
    let lines: Vec<(&str, &str)> = out
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(sha, _)| sha.len() == 40 && is_sha(sha))
        .collect();
    let find = |name: &str| {
        lines
            .iter()
            .find(|(_, r)| *r == name)
            .map(|(s, _)| s.to_string())
    };
    find(reference)
        .or_else(|| find(&format!("refs/heads/{reference}")))
        .or_else(|| find(&format!("refs/tags/{reference}^{{}}")))
        .or_else(|| find(&format!("refs/tags/{reference}")))
        .or_else(|| lines.first().map(|(s, _)| s.to_string()))
        .map(|s| s.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    use testkit::git;

    #[tokio::test]
    async fn refs_resolve_through_ls_remote_and_shas_stay_as_given() {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q", "-b", "main"]);
        std::fs::write(dir.path().join("f"), "1").unwrap();
        git(dir.path(), &["add", "f"]);
        git(dir.path(), &["commit", "-q", "-m", "one"]);
        git(dir.path(), &["tag", "-a", "v1", "-m", "v1"]);
        std::fs::write(dir.path().join("f"), "2").unwrap();
        git(dir.path(), &["commit", "-q", "-am", "two"]);
        let head = git(dir.path(), &["rev-parse", "HEAD"]);
        let first = git(dir.path(), &["rev-parse", "HEAD~1"]);
        let url = format!("file://{}", dir.path().display());
        let t = Duration::from_secs(30);

        assert_eq!(resolve("HEAD", Some(&url), t).await.unwrap().commit, head);
        assert_eq!(resolve("main", Some(&url), t).await.unwrap().commit, head);
        assert_eq!(resolve("v1", Some(&url), t).await.unwrap().commit, first);
        let short = resolve(&head[..7].to_uppercase(), None, t).await.unwrap();
        assert!(short.matches(&head) && !short.matches(&first));

        let e = resolve("nope", Some(&url), t)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a ref"), "{e}");
        let e = resolve("HEAD", None, t).await.unwrap_err().to_string();
        assert!(e.contains("--repo"), "{e}");
        let e = resolve("HEAD", Some("https://x:tok@git.example/r.git"), t)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials") && !e.contains("tok@"), "{e}");
    }

    #[tokio::test]
    async fn a_git_past_its_deadline_is_killed() {
        // A listening socket that never answers: git hangs in the handshake.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("git://{}/r.git", listener.local_addr().unwrap());
        let e = resolve("HEAD", Some(&url), Duration::from_millis(500))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("did not finish within") && e.contains("killed"),
            "{e}"
        );
    }
}
