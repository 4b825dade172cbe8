//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, never in the shipped agent):
//! every parser that reads input from outside the agent, each taking raw bytes. A parser may
//! refuse its input; it must never panic, hang or allocate without bound.

use std::time::Duration;

/// User-data as IMDS serves it (gzip included), through the whole reading: decode, TOML, checks.
pub fn user_data(data: &[u8]) {
    let _ = crate::userdata::load("user-data", data);
}

/// A `watch.d` rule file.
pub fn watch_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::userdata::parse_watch_file("/etc/stackless/watch.d/x.toml", text);
    }
}

/// supervisord's answer on its socket: the HTTP response, then the XML-RPC body in it.
pub fn supervisord_answer(data: &[u8]) {
    let client = crate::supervisor::client::Supervisor::new(
        "/run/fuzz-supervisor.sock",
        Duration::from_secs(1),
    );
    for eof in [false, true] {
        if let Ok(Some(body)) = client.parse_http("supervisor.getProcessInfo", data, eof) {
            let _ = crate::supervisor::xmlrpc::decode_response(&String::from_utf8_lossy(&body));
        }
    }
    let _ = crate::supervisor::xmlrpc::decode_response(&String::from_utf8_lossy(data));
}

/// IMDS documents: the identity document and the role credentials document.
pub fn imds_documents(data: &[u8]) {
    let _ = serde_json::from_slice::<crate::imds::Identity>(data);
    let _ = crate::imds::role::credentials_from("role".into(), "fuzz".into(), data);
}

/// An AWS error answer (JSON or XML), as SSM and EC2 return them.
pub fn aws_error(data: &[u8]) {
    let _ = crate::aws::request::error_code(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::aws::sigv4::parse_utc(text);
    }
}

/// What the agent reads from git: `ls-remote` output and `diff-tree -r -z` output.
pub fn git_output(data: &[u8]) {
    let _ = crate::repos::store::parse_diff(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::repos::pick_ref(text, "main");
    }
}

#[cfg(test)]
mod tests {
    /// The committed corpora (`fuzz/corpus/TARGET/`), replayed through every entry point on each
    /// `cargo test` (and on the aarch64 stage): what a fuzzing run once found stays fixed.
    #[test]
    fn the_corpora_replay_without_a_panic() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 6] = [
            ("user_data", super::user_data),
            ("watch_file", super::watch_file),
            ("supervisord_answer", super::supervisord_answer),
            ("imds_documents", super::imds_documents),
            ("aws_error", super::aws_error),
            ("git_output", super::git_output),
        ];
        for (name, run) in targets {
            let dir = corpus.join(name);
            let mut n = 0;
            for entry in
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            {
                let path = entry.unwrap().path();
                run(&std::fs::read(&path).unwrap());
                n += 1;
            }
            assert!(n > 0, "{} has no seed", dir.display());
        }
    }
}
