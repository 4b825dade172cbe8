//! Masterless `state.highstate` and its result.
//!
//! Salt writes its JSON result to `Layout::highstate_out()` and its log lines (stdout and
//! stderr) next to it, as `highstate.log`; the result is judged from the JSON, which says what
//! failed and why, with the exit code as a second opinion.
//!
//! The report keeps what can travel (the console, the ready marker, the journal, `status`,
//! `state.json`): state ids, their functions and SLS, counts, and reasons in our own words.
//! Never salt's comments, names or render-error context: a `cmd.run` comment quotes its command,
//! a YAML error quotes the rendered lines, and both can hold pillar values. Those stay in the
//! root-only result and log.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::warm::WarmSaltCall;
use crate::paths::Layout;
use crate::process::{self, describe, Deadline};
use crate::userdata::Timeouts;

/// A state whose result was `false`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FailedState {
    pub id: String,
    /// The state function: `cmd.run`, `file.managed`.
    #[serde(default)]
    pub function: String,
    /// The SLS it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sls: Option<String>,
    /// Why, when salt's comment is one of the few known to quote nothing (a failed requisite,
    /// no top file match); otherwise the reason is in the root-only log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl FailedState {
    pub fn describe(&self) -> String {
        let mut s = self.function.clone();
        if let Some(sls) = &self.sls {
            s = format!("{s} in {sls}").trim_start().to_string();
        }
        if let Some(r) = &self.reason {
            s = if s.is_empty() {
                r.clone()
            } else {
                format!("{s}, {r}")
            };
        }
        s
    }
}

/// What a highstate did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HighstateReport {
    /// Every state succeeded (and salt-call exited 0, when it ran).
    pub ok: bool,
    /// States in the result.
    pub total: usize,
    /// Successful states that changed something.
    pub changed: usize,
    /// Failed states, in the order salt ran them.
    pub failed: Vec<FailedState>,
    /// Errors that stopped salt before any state ran (Jinja/YAML render errors, pillar errors),
    /// each as where and what kind ([`render_error_head`]), never the text salt quoted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub render_errors: Vec<String>,
    /// salt-call's exit code (`--retcode-passthrough`); `None` when parsed alone or killed.
    pub retcode: Option<i32>,
    /// How long salt-call ran.
    pub ms: u64,
}

const NO_TOP: &str = "No Top file or master_tops data matches found";

impl HighstateReport {
    /// One line: `12 states, 3 changed, 0 failed`, `render error: ...` or
    /// `2 of 5 failed: id (comment); ...`.
    pub fn summary(&self) -> String {
        if !self.render_errors.is_empty() {
            return format!(
                "render error: {}",
                shorten(&self.render_errors.join("; "), 300)
            );
        }
        if !self.failed.is_empty() {
            const SHOWN: usize = 3;
            let mut parts: Vec<String> = self
                .failed
                .iter()
                .take(SHOWN)
                .map(|f| format!("{} ({})", f.id, f.describe()))
                .collect();
            if self.failed.len() > SHOWN {
                parts.push(format!("and {} more", self.failed.len() - SHOWN));
            }
            return format!(
                "{} of {} failed: {}",
                self.failed.len(),
                self.total,
                parts.join("; ")
            );
        }
        let line = format!("{} states, {} changed, 0 failed", self.total, self.changed);
        match self.retcode {
            Some(rc) if rc != 0 => format!("{line}, but salt-call exited {rc}"),
            None if !self.ok => format!("{line}, but salt-call did not succeed"),
            _ => line,
        }
    }
}

/// Where a render error is and what kind it is, without the message's text: salt's render
/// errors quote the template lines around the error (for YAML errors, the *rendered* lines,
/// pillar values included).
pub fn render_error_head(text: &str) -> String {
    if text.starts_with("Pillar failed to render") {
        return "pillar failed to render".into();
    }
    let sls = text
        .split_once("Rendering SLS '")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(sls, _)| sls);
    let Some(sls) = sls else {
        // "No matching sls found for 'x' in env 'base'" names only the tree's own files.
        let first = text.lines().next().unwrap_or("");
        if first.starts_with("No matching sls found for") || first.starts_with("Specified SLS") {
            return shorten(first, 200);
        }
        return "salt reported an error before running any state".into();
    };
    let line = text
        .split_once("; line ")
        .map(|(_, rest)| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .filter(|n| !n.is_empty());
    let first = text.lines().next().unwrap_or("");
    let kind = if first.contains("Jinja variable") {
        "undefined Jinja variable"
    } else if first.contains("Jinja syntax error") {
        "Jinja syntax error"
    } else if first.contains("Jinja error") {
        "Jinja error"
    } else if first.to_ascii_lowercase().contains("yaml")
        || first.contains("could not find expected")
        || first.contains("mapping values are not allowed")
    {
        "YAML error"
    } else {
        "render error"
    };
    match line {
        Some(n) => format!("SLS '{sls}' line {n}: {kind}"),
        None => format!("SLS '{sls}': {kind}"),
    }
}

/// A reason worth carrying, from comments known to quote nothing from the states.
fn safe_reason(comment: &str) -> Option<String> {
    if comment.starts_with("One or more requisite failed") {
        Some("a requisite failed".into())
    } else if comment.contains(NO_TOP) {
        Some("no top file entry matches this minion".into())
    } else {
        None
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// Parses salt's `--out=json` document: `{"local": {"STATE_|-ID_|-NAME_|-FUN": {...}}}`, or
/// `{"local": ["error", ...]}` when rendering or compiling failed (reported as `render_errors`).
/// Text before the document (a warning line) is skipped.
pub fn parse(json: &str) -> Result<HighstateReport> {
    let doc = find_document(json)?;
    let local = match doc.as_object() {
        Some(m) if m.contains_key("local") => &m["local"],
        Some(m) if m.len() == 1 => m.values().next().unwrap_or(&Value::Null),
        _ => bail!("salt's result is not an object keyed by `local`"),
    };
    match local {
        Value::Array(errors) => {
            let render_errors = errors
                .iter()
                .map(|e| match e {
                    Value::String(s) => render_error_head(s),
                    _ => render_error_head(""),
                })
                .collect();
            Ok(HighstateReport {
                ok: false,
                render_errors,
                ..Default::default()
            })
        }
        Value::Object(states) => {
            let mut report = HighstateReport {
                total: states.len(),
                ..Default::default()
            };
            let mut failed: Vec<(u64, FailedState)> = Vec::new();
            for (key, state) in states {
                let Some(state) = state.as_object() else {
                    bail!("salt's result has a state that is not an object");
                };
                let comment = comment_text(state.get("comment"));
                let result = state.get("result").and_then(Value::as_bool);
                let has_changes = match state.get("changes") {
                    Some(Value::Object(m)) => !m.is_empty(),
                    Some(Value::Null) | None => false,
                    Some(Value::String(s)) => !s.is_empty(),
                    Some(_) => true,
                };
                if result == Some(false) || comment.contains(NO_TOP) {
                    let id = state
                        .get("__id__")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| key.split("_|-").nth(1).unwrap_or(key).to_string());
                    let run_num = state
                        .get("__run_num__")
                        .and_then(Value::as_u64)
                        .unwrap_or(u64::MAX);
                    // The key is `MODULE_|-ID_|-NAME_|-FUNCTION`; NAME can hold anything.
                    let mut parts = key.split("_|-");
                    let module = parts.next().unwrap_or("");
                    let function = match parts.last() {
                        Some(fun) if !module.is_empty() && fun != "None" => {
                            format!("{module}.{fun}")
                        }
                        _ => String::new(),
                    };
                    let sls = state
                        .get("__sls__")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    let reason = safe_reason(&comment);
                    failed.push((
                        run_num,
                        FailedState {
                            id,
                            function,
                            sls,
                            reason,
                        },
                    ));
                } else if has_changes {
                    report.changed += 1;
                }
            }
            failed.sort_by_key(|(n, _)| *n);
            report.failed = failed.into_iter().map(|(_, f)| f).collect();
            report.ok = report.failed.is_empty();
            Ok(report)
        }
        _ => bail!("salt's result is neither states nor a list of errors"),
    }
}

/// A comment is a string, sometimes a list of strings.
fn comment_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join("; "),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// The JSON document in `text`: all of it, or the first one starting at a line that opens
/// with `{` (salt sometimes prints a warning first).
fn find_document(text: &str) -> Result<Value> {
    let first_error = match serde_json::from_str::<Value>(text.trim()) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with('{') {
            let mut stream =
                serde_json::Deserializer::from_str(&text[offset..]).into_iter::<Value>();
            if let Some(Ok(v)) = stream.next() {
                if v.is_object() {
                    return Ok(v);
                }
            }
        }
        offset += line.len();
    }
    // Never quoted: the output can hold pillar values. The caller points to the file.
    bail!(
        "salt's output ({} bytes) is not JSON: {first_error}",
        text.len()
    )
}

/// Where salt-call's own output (log lines, tracebacks) of the last highstate goes.
pub fn log_file(layout: &Layout) -> PathBuf {
    layout.highstate_out().with_extension("log")
}

/// Runs `SALT_CALL --local --config-dir LAYOUT/etc/salt --id MINION state.highstate --out=json
/// --out-file LAYOUT/var/lib/stackless/highstate.json --retcode-passthrough -l error`, kills it
/// (and everything it started) when `timeout` passes, then parses the out-file. `ms` and
/// `retcode` record the run; a non-zero exit code makes `ok` false even if no state failed.
///
/// `-l error` rather than `-l quiet`: quiet hides the configuration errors that are the only
/// clue when salt writes no JSON; the log lines go to `highstate.log`, not into the result.
///
/// `file_root` is the published state tree (the minion configuration's `base` root): whether
/// it has custom modules decides whether salt syncs them first ([`super::modules`]).
pub fn run(
    layout: &Layout,
    salt_call: &Path,
    minion_id: &str,
    file_root: &Path,
    timeout: Duration,
    warm: Option<WarmSaltCall>,
) -> Result<HighstateReport> {
    let conf = layout.minion_conf_file();
    if !conf.is_file() {
        // Without it salt would fall back to the host's /etc/salt, /var/cache/salt and /srv/salt.
        bail!(
            "no salt minion configuration at {}: write it before running highstate",
            conf.display()
        );
    }
    let sync = super::modules::write_sync_setting(layout, file_root)?;
    tracing::debug!(
        sync = sync
            .as_deref()
            .unwrap_or("no: the tree has no custom modules"),
        "salt's module sync before the highstate"
    );
    let out_file = layout.highstate_out();
    let log = log_file(layout);
    if let Some(dir) = out_file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::remove_file(&out_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("removing the previous result {}", out_file.display()))
        }
    }
    // The result and the log hold change diffs, which can quote pillar secrets: owner only.
    let private = |p: &Path| {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(p)
    };
    private(&out_file).with_context(|| format!("creating {}", out_file.display()))?;
    let log_out = private(&log).with_context(|| format!("creating {}", log.display()))?;

    let args: Vec<OsString> = vec![
        "--local".into(),
        "--config-dir".into(),
        layout.salt_config_dir().into(),
        "--id".into(),
        minion_id.into(),
        "state.highstate".into(),
        "--out=json".into(),
        "--out-file".into(),
        out_file.clone().into(),
        "--retcode-passthrough".into(),
        "-l".into(),
        "error".into(),
    ];
    let what = "salt-call state.highstate";
    let deadline = Deadline::new(timeout, Timeouts::HIGHSTATE);
    let start = Instant::now();
    // The interpreter warmed since the boot began, when there is one for this salt-call.
    let warmed = warm.filter(|w| w.serves(salt_call)).and_then(|w| {
        let program = w.program().to_string();
        w.go(&args, &log)
            .map(|child| (child, program))
            .map_err(|e| tracing::warn!("the warm salt-call could not run the highstate ({e:#}); running salt-call afresh"))
            .ok()
    });
    tracing::info!(salt_call = %salt_call.display(), minion_id, warm = warmed.is_some(), "running state.highstate");
    // Its own process group, so the deadline kills what the states started too.
    let status = match warmed {
        Some((child, program)) => process::wait_started(child, &program, what, deadline),
        None => process::run_logged(Command::new(salt_call).args(&args), what, deadline, log_out),
    }
    .map_err(|e| anyhow!("{e:#}; {}", see_log(&log)))?;
    let ms = start.elapsed().as_millis() as u64;
    let retcode = status.code();

    let text = fs::read_to_string(&out_file).unwrap_or_default();
    if text.trim().is_empty() {
        bail!(
            "salt-call state.highstate {} and wrote no result to {}; {}",
            describe(status),
            out_file.display(),
            see_log(&log)
        );
    }
    let mut report = parse(&text).with_context(|| {
        format!(
            "reading the result of state.highstate ({}) from {}; {}",
            describe(status),
            out_file.display(),
            see_log(&log)
        )
    })?;
    report.retcode = retcode;
    report.ms = ms;
    report.ok = report.ok && retcode == Some(0);
    tracing::info!(ms, ok = report.ok, "highstate: {}", report.summary());
    Ok(report)
}

/// Where salt-call's output is. Never its lines: they quote changes, hence pillar values, and
/// errors travel to the console, the ready marker and the state record.
fn see_log(log: &Path) -> String {
    format!("its output is in {} (root only)", log.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::salt::config::{write_minion_config, MinionConfig};
    use crate::salt::test_support::salt_call;

    // Outputs of salt-call 3008.4 `state.highstate --out=json`, captured as they were.
    const PASSING: &str = r#"{
    "local": {
        "file_|-hello_|-/tmp/sx/r/out.txt_|-managed": {
            "changes": {
                "diff": "New file"
            },
            "comment": "File /tmp/sx/r/out.txt updated",
            "name": "/tmp/sx/r/out.txt",
            "result": true,
            "__sls__": "a",
            "__run_num__": 0,
            "start_time": "04:50:37.267547",
            "duration": 5.904,
            "__id__": "hello"
        }
    }
}"#;
    const FAILING: &str = r#"{"local": {"file_|-hello_|-/tmp/sx/r/out.txt_|-managed": {"changes": {}, "comment": "File /tmp/sx/r/out.txt is in the correct state", "name": "/tmp/sx/r/out.txt", "result": true, "__sls__": "a", "__run_num__": 0, "start_time": "04:50:41.521505", "duration": 5.47, "__id__": "hello"}, "cmd_|-fails_|-false_|-run": {"name": "false", "changes": {"pid": 5632, "retcode": 1, "stdout": "", "stderr": ""}, "result": false, "comment": "Command \"false\" run", "__sls__": "a", "__run_num__": 1, "start_time": "04:50:41.527941", "duration": 5.124, "__id__": "fails"}, "file_|-missing_|-/tmp/sx/r/out2.txt_|-managed": {"changes": {}, "comment": "Unable to manage file: Source file salt://nope.txt not found in saltenv 'base'", "name": "/tmp/sx/r/out2.txt", "result": false, "__sls__": "a", "__run_num__": 2, "start_time": "04:50:41.533334", "duration": 1.177, "__id__": "missing"}, "cmd_|-after_|-true_|-run": {"changes": {}, "result": false, "duration": 0.003, "start_time": "04:50:41.534684", "comment": "One or more requisite failed: a.fails", "__state_ran__": false, "__run_num__": 3, "__sls__": "a", "__id__": "after", "name": "true"}}}"#;
    const RENDER_ERROR: &str = r#"{"local": ["Rendering SLS 'base:a' failed: Jinja variable 'salt.utils.optsdict.DictProxy object' has no attribute 'nokey'; line 3\n\n---\nx:\n  cmd.run:\n    - name: {{ grains[\"nokey\"] }}    <======================\n---"]}"#;
    const PILLAR_ERROR: &str = r#"{"local": ["Pillar failed to render with the following messages:", "Rendering SLS 'p' failed. Please see master log for details."]}"#;
    const NO_TOP_MATCH: &str = r#"{"local": {"no_|-states_|-states_|-None": {"result": false, "comment": "No Top file or master_tops data matches found. Please see master log for details.", "name": "No States", "changes": {}, "__run_num__": 0}}}"#;

    #[test]
    fn parses_a_passing_run() {
        let r = parse(PASSING).unwrap();
        assert_eq!((r.ok, r.total, r.changed, r.failed.len()), (true, 1, 1, 0));
        assert_eq!(r.summary(), "1 states, 1 changed, 0 failed");
    }

    #[test]
    fn parses_failures_in_run_order() {
        let r = parse(FAILING).unwrap();
        assert!(!r.ok);
        assert_eq!((r.total, r.changed), (4, 0));
        let ids: Vec<&str> = r.failed.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["fails", "missing", "after"]);
        assert_eq!(
            r.failed[1],
            FailedState {
                id: "missing".into(),
                function: "file.managed".into(),
                sls: Some("a".into()),
                reason: None,
            }
        );
        // Functions and SLS, never salt's comments (a command line, a diff).
        assert_eq!(
            r.summary(),
            "3 of 4 failed: fails (cmd.run in a); missing (file.managed in a); \
             after (cmd.run in a, a requisite failed)"
        );
    }

    #[test]
    fn nothing_salt_quoted_reaches_the_report() {
        const CANARY: &str = "canary-8f3a1c";
        let failing = format!(
            r#"{{"local": {{"cmd_|-db_|-mysql -p{CANARY}_|-run": {{"name": "mysql -p{CANARY}", "changes": {{"stderr": "{CANARY}"}}, "result": false, "comment": "Command \"mysql -p{CANARY}\" run", "__sls__": "db", "__run_num__": 0, "__id__": "db"}}}}}}"#
        );
        let yaml = format!(
            r#"{{"local": ["Rendering SLS 'base:app' failed: mapping values are not allowed in this context; line 2\n\n---\napp:\n  password: {CANARY}: x    <======================\n---"]}}"#
        );
        let jinja = format!(
            r#"{{"local": ["Rendering SLS 'base:app' failed: Jinja error: Command 'curl -u {CANARY}' failed\nTraceback..."]}}"#
        );
        for doc in [failing, yaml, jinja] {
            let r = parse(&doc).unwrap();
            assert!(!r.ok);
            let everywhere = format!("{} {}", r.summary(), serde_json::to_string(&r).unwrap());
            assert!(!everywhere.contains(CANARY), "{everywhere}");
        }
        let r = parse(&format!(
            r#"{{"local": ["Rendering SLS 'base:app' failed: mapping values are not allowed here; line 2\n\n---\npw: {CANARY}\n---"]}}"#
        ))
        .unwrap();
        assert_eq!(r.render_errors, ["SLS 'base:app' line 2: YAML error"]);
        let err = format!("{:#}", parse(&format!("not json {CANARY}")).unwrap_err());
        assert!(!err.contains(CANARY), "{err}");
    }

    #[test]
    fn parses_render_and_pillar_errors() {
        let r = parse(RENDER_ERROR).unwrap();
        assert!(!r.ok && r.total == 0 && r.render_errors.len() == 1);
        assert_eq!(
            r.summary(),
            "render error: SLS 'base:a' line 3: undefined Jinja variable"
        );
        let r = parse(PILLAR_ERROR).unwrap();
        assert_eq!(r.render_errors.len(), 2);
        assert_eq!(
            r.summary(),
            "render error: pillar failed to render; SLS 'p': render error"
        );
    }

    #[test]
    fn no_top_match_is_a_failure() {
        let r = parse(NO_TOP_MATCH).unwrap();
        assert!(!r.ok);
        assert_eq!(r.failed[0].id, "states");
        assert!(
            r.summary()
                .starts_with("1 of 1 failed: states (no top file entry matches this minion)"),
            "{}",
            r.summary()
        );
        // Even if salt ever reports it without `result: false`.
        let r = parse(&NO_TOP_MATCH.replace("\"result\": false", "\"result\": null")).unwrap();
        assert!(!r.ok);
    }

    #[test]
    fn tolerates_a_leading_warning_and_rejects_other_shapes() {
        let noisy = format!("[WARNING ] Something deprecated {{ like this }}\n{PASSING}\n");
        assert_eq!(parse(&noisy).unwrap(), parse(PASSING).unwrap());
        for bad in [
            "",
            "not json at all",
            "[1, 2]",
            "{\"local\": 5}",
            "{\"a\": 1, \"b\": 2}",
            "{\"local\": {\"k\": 1}}",
        ] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(err.contains("salt"), "{bad}: {err}");
        }
        let err = format!(
            "{:#}",
            parse("Traceback (most recent call last): boom").unwrap_err()
        );
        assert!(err.contains("not JSON") && !err.contains("boom"), "{err}");
        // A comment that is a list, and test-mode `null` results, are fine.
        let r = parse(r#"{"local": {"a_|-x_|-x_|-f": {"result": null, "comment": ["one", "two"], "changes": {"k": 1}}}}"#)
            .unwrap();
        assert!(r.ok && r.changed == 1);
    }

    #[test]
    fn summary_mentions_a_bad_exit_code() {
        let r = HighstateReport {
            ok: false,
            total: 2,
            changed: 1,
            retcode: Some(2),
            ..Default::default()
        };
        assert_eq!(
            r.summary(),
            "2 states, 1 changed, 0 failed, but salt-call exited 2"
        );
        let many = HighstateReport {
            total: 9,
            failed: (0..5)
                .map(|i| FailedState {
                    id: format!("s{i}"),
                    function: "cmd.run".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            many.summary(),
            "5 of 9 failed: s0 (cmd.run); s1 (cmd.run); s2 (cmd.run); and 2 more"
        );
        let json = serde_json::to_value(&many).unwrap();
        assert!(json.get("render_errors").is_none());
    }

    /// A salt tree in a temporary root, configured by `write_minion_config`.
    struct Tree {
        dir: tempfile::TempDir,
        layout: Layout,
    }

    impl Tree {
        fn new(id: &str, grains: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let layout = Layout::new(dir.path());
            let states = layout.repo_current("salt");
            fs::create_dir_all(states.join("pillar")).unwrap();
            let g: toml::Table = toml::from_str(grains).unwrap();
            let cfg = MinionConfig {
                minion_id: id,
                grains: &g,
                file_root: states.clone(),
                pillar_root: states.join("pillar"),
            };
            assert!(write_minion_config(&layout, &cfg).unwrap());
            Tree { dir, layout }
        }
        fn file(&self, rel: &str, text: &str) {
            let p = self.layout.repo_current("salt").join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        fn top(&self, id: &str, sls: &str) {
            self.file("top.sls", &format!("base:\n  '{id}':\n    - {sls}\n"));
        }
        fn run(&self, id: &str) -> HighstateReport {
            self.run_with(id, None)
        }
        /// In a salt-call warmed beforehand (salt's own pip console script, as in the images).
        fn run_warm(&self, id: &str) -> HighstateReport {
            let warm = WarmSaltCall::start(&salt_call());
            assert!(
                warm.is_some(),
                "the test venv's salt-call is a pip console script"
            );
            self.run_with(id, warm)
        }
        fn run_with(&self, id: &str, warm: Option<WarmSaltCall>) -> HighstateReport {
            let root = self.layout.repo_current("salt");
            run(
                &self.layout,
                &salt_call(),
                id,
                &root,
                Duration::from_secs(300),
                warm,
            )
            .unwrap()
        }
    }

    #[test]
    fn end_to_end_highstate_with_grains_and_pillar() {
        let t = Tree::new("web-1", "role = \"web\"\ntier = { name = \"front\" }");
        let out = t.dir.path().join("srv/app.conf");
        t.top("web-1", "app");
        t.file("pillar/top.sls", "base:\n  '*':\n    - app\n");
        t.file("pillar/app.sls", "app:\n  port: 8080\n");
        t.file(
            "app.sls",
            &format!(
                "app-config:\n  file.managed:\n    - name: {}\n    - makedirs: True\n    - contents: \"role={{{{ grains['role'] }}}} tier={{{{ grains['tier']['name'] }}}} port={{{{ pillar['app']['port'] }}}}\"\n",
                out.display()
            ),
        );
        // The first run in a salt-call warmed beforehand, as at boot; the second afresh.
        let r = t.run_warm("web-1");
        assert!(r.ok, "{r:?}");
        assert_eq!((r.total, r.changed, r.retcode), (1, 1, Some(0)));
        assert_eq!(
            fs::read_to_string(&out).unwrap().trim_end(),
            "role=web tier=front port=8080"
        );
        assert!(t.layout.highstate_out().is_file());

        // Idempotent: nothing changes the second time.
        let r = t.run("web-1");
        assert!(r.ok && r.changed == 0, "{r:?}");

        // Everything salt wrote is under the root.
        for d in [
            "var/cache/salt/minion",
            "etc/salt/pki/minion",
            "var/log/salt",
        ] {
            assert!(t.dir.path().join(d).is_dir(), "{d} not under the root");
        }
    }

    /// With `_modules/` in the tree salt syncs it and the states can call it; with the
    /// directory gone the next highstate syncs once more, so salt deletes its stale copy; then
    /// no sync at all.
    #[test]
    fn custom_modules_are_synced_while_the_tree_has_them_and_removed_after() {
        let t = Tree::new("mod-1", "");
        let out = t.dir.path().join("srv/greeting");
        t.top("mod-1", "greet");
        t.file(
            "_modules/greeter.py",
            "def hello():\n    return 'hello from a custom module'\n",
        );
        t.file(
            "greet.sls",
            &format!(
                "greeting:\n  file.managed:\n    - name: {}\n    - makedirs: True\n    - contents: {{{{ salt['greeter.hello']() }}}}\n",
                out.display()
            ),
        );
        let r = t.run("mod-1");
        assert!(r.ok, "{r:?}");
        assert_eq!(
            fs::read_to_string(&out).unwrap().trim_end(),
            "hello from a custom module"
        );
        let conf = || fs::read_to_string(super::super::modules::conf_file(&t.layout)).unwrap();
        assert!(
            conf().contains("autoload_dynamic_modules: true"),
            "{}",
            conf()
        );
        let synced = super::super::modules::extmods_dir(&t.layout).join("modules/greeter.py");
        assert!(
            synced.is_file(),
            "salt did not sync to {}",
            synced.display()
        );

        // The module goes; the state still calls it: salt must have deleted its copy.
        fs::remove_dir_all(t.layout.repo_current("salt").join("_modules")).unwrap();
        let r = t.run("mod-1");
        assert!(!r.ok, "a removed module still answered: {r:?}");
        assert!(
            conf().contains("autoload_dynamic_modules: true"),
            "{}",
            conf()
        );
        assert!(!synced.exists(), "salt kept the stale {}", synced.display());

        // Nothing left to sync: the next highstate skips it.
        t.file("greet.sls", "greeting:\n  test.succeed_without_changes\n");
        let r = t.run("mod-1");
        assert!(r.ok, "{r:?}");
        assert!(
            conf().contains("autoload_dynamic_modules: false"),
            "{}",
            conf()
        );
    }

    #[test]
    fn end_to_end_failures_are_reported() {
        let t = Tree::new("db-1", "");
        t.top("db-1", "bad");
        t.file(
            "bad.sls",
            "fails:\n  cmd.run:\n    - name: \"false\"\nmissing:\n  file.managed:\n    - name: /nonexistent-dir-for-test/x\n    - source: salt://nope.txt\n",
        );
        // salt-call's exit code comes through a warm salt-call too.
        let r = t.run_warm("db-1");
        assert!(!r.ok);
        assert_eq!(r.retcode, Some(2));
        let ids: Vec<&str> = r.failed.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["fails", "missing"]);
        assert_eq!(r.failed[1].function, "file.managed", "{r:?}");

        // A Jinja error.
        t.file(
            "bad.sls",
            "x:\n  cmd.run:\n    - name: {{ grains['no_such_grain'] }}\n",
        );
        let r = t.run("db-1");
        assert!(!r.ok && r.total == 0);
        assert_eq!(
            r.render_errors,
            ["SLS 'base:bad' line 3: undefined Jinja variable"],
            "{r:?}"
        );
        assert!(r.summary().starts_with("render error:"));

        // A top file that does not target this minion.
        t.top("someone-else", "bad");
        let r = t.run("db-1");
        assert!(!r.ok);
        assert_eq!(
            r.failed[0].reason.as_deref(),
            Some("no top file entry matches this minion"),
            "{r:?}"
        );
    }

    #[test]
    fn timeout_kills_salt() {
        let t = Tree::new("slow-1", "");
        t.top("slow-1", "slow");
        t.file("slow.sls", "sleep:\n  cmd.run:\n    - name: sleep 60\n");
        let started = Instant::now();
        let err = format!(
            "{:#}",
            run(
                &t.layout,
                &salt_call(),
                "slow-1",
                &t.layout.repo_current("salt"),
                Duration::from_secs(3),
                // Warmed, as at boot: the deadline counts from the hand-over.
                WarmSaltCall::start(&salt_call())
            )
            .unwrap_err()
        );
        assert!(err.contains("did not finish within 3s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_hung_salt_call_is_killed_with_its_processes() {
        use crate::process::testing::{assert_dead, hang_with_grandchild, pidfile, script};
        let t = Tree::new("hung-1", "");
        let pids = pidfile(t.dir.path());
        let fake = script(
            t.dir.path(),
            "hung-salt-call",
            &format!(
                "echo 'rendering states' >&2\n{}",
                hang_with_grandchild(&pids)
            ),
        );
        let started = Instant::now();
        let err = format!(
            "{:#}",
            run(
                &t.layout,
                &fake,
                "hung-1",
                &t.layout.repo_current("salt"),
                Duration::from_millis(500),
                None
            )
            .unwrap_err()
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            err.contains("salt-call state.highstate did not finish within 500ms; killed")
                && err.contains("raise [salt] timeout")
                && err.contains("highstate.log (root only)")
                && !err.contains("rendering states"),
            "the error names the log, never quotes it: {err}"
        );
        assert_dead(&pids);
    }

    #[test]
    fn salt_that_writes_nothing_is_an_error_naming_its_log() {
        let t = Tree::new("x-1", "");
        let fake = t.dir.path().join("fake-salt-call");
        fs::write(
            &fake,
            "#!/bin/sh\necho 'Traceback: something broke' >&2\nexit 3\n",
        )
        .unwrap();
        fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let err = format!(
            "{:#}",
            run(
                &t.layout,
                &fake,
                "x-1",
                &t.layout.repo_current("salt"),
                Duration::from_secs(30),
                None
            )
            .unwrap_err()
        );
        // The output can quote pillar values (change diffs): it stays in the 0600 log.
        assert!(
            err.contains("exited 3")
                && err.contains("highstate.log (root only)")
                && !err.contains("Traceback"),
            "{err}"
        );
        let log = fs::read_to_string(t.layout.join("var/lib/stackless/highstate.log")).unwrap();
        assert!(log.contains("Traceback: something broke"), "{log}");

        let bare = Layout::new(t.dir.path().join("elsewhere"));
        let err = format!(
            "{:#}",
            run(
                &bare,
                &fake,
                "x-1",
                &bare.repo_current("salt"),
                Duration::from_secs(30),
                None
            )
            .unwrap_err()
        );
        assert!(err.contains("no salt minion configuration"), "{err}");
    }
}
