//! Real AWS client code for tests: a Python with botocore (and moto). `STACKLESS_PYTHON`, else
//! the `python` next to `moto_server` on PATH, else the repository's `.venv/bin/python`
//! (scripts/install-test-deps.sh installs moto, which brings botocore). Tests fail, never skip,
//! without it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn python_with_botocore() -> PathBuf {
    if let Some(p) = std::env::var_os("STACKLESS_PYTHON") {
        return PathBuf::from(p);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("moto_server").is_file() && dir.join("python").is_file() {
                return dir.join("python");
            }
        }
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.is_file(),
        "these tests need a Python with botocore and moto: set STACKLESS_PYTHON, put the venv's \
         bin (with moto_server) on PATH, or run scripts/install-test-deps.sh ({} is missing)",
        venv.display()
    );
    venv
}

/// `python -c SCRIPT` with `input` on stdin; its stdout. Panics with stderr when it fails.
pub fn run_python(python: &Path, script: &str, input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
