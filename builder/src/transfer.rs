//! Files as a stream of shell commands: gzip, base64, cut into chunks that keep every command
//! well under SSM's 64 KB document limit, reassembled and sha256-checked on the machine. No
//! bucket, no SSH: the same stream runs over SSM Run Command or in a local chroot.

use crate::render::{StagedFile, STAGE};
use base64::Engine;
use std::io::Write;

/// The most a command may carry. SendCommand's whole document (JSON, the command list and its
/// parameters) must stay under 64 KB; this leaves room for the rest.
pub const MAX_COMMAND_BYTES: usize = 48 * 1024;

/// Every command starts here: strict shell, in the staging folder (`STACKLESS_STAGE` moves it,
/// which is how the tests replay the stream in a scratch folder).
fn prologue() -> String {
    format!("set -euo pipefail\nstage=\"${{STACKLESS_STAGE:-{STAGE}}}\"\nmkdir -p \"$stage/.parts\"\ncd \"$stage\"\n")
}

fn check_name(name: &str) {
    // Names are ours (render.rs), never user input; keep the shell quoting trivially safe.
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "staged file name {name:?}"
    );
}

/// The commands that put `files` into the staging folder, in order.
pub fn upload_commands(files: &[StagedFile]) -> Vec<String> {
    let mut segments: Vec<String> = Vec::new();
    for f in files {
        check_name(&f.name);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&f.content).expect("writing to memory");
        let b64 =
            base64::engine::general_purpose::STANDARD.encode(gz.finish().expect("gzip to memory"));
        let part = format!(".parts/{}.gz.b64", f.name);
        let chunk = MAX_COMMAND_BYTES - 512;
        let mut first = true;
        for piece in b64.as_bytes().chunks(chunk) {
            let redirect = if first { ">" } else { ">>" };
            first = false;
            // base64 has no quote characters, so single quotes are safe.
            segments.push(format!(
                "printf '%s' '{}' {redirect} {part}\n",
                String::from_utf8_lossy(piece)
            ));
        }
        if b64.is_empty() {
            segments.push(format!(": > {part}\n"));
        }
        segments.push(format!(
            "base64 -d {part} | gzip -dc > {n}.tmp\necho '{sum}  {n}.tmp' | sha256sum -c --quiet\nchmod {mode:o} {n}.tmp\nmv -f {n}.tmp {n}\nrm -f {part}\n",
            n = f.name,
            sum = f.sha256(),
            mode = f.mode
        ));
    }
    // Pack segments into as few commands as fit.
    let mut commands = Vec::new();
    let mut current = prologue();
    let base = current.len();
    for s in segments {
        if current.len() + s.len() > MAX_COMMAND_BYTES && current.len() > base {
            commands.push(std::mem::replace(&mut current, prologue()));
        }
        current.push_str(&s);
    }
    if current.len() > base {
        commands.push(current);
    }
    commands
}

/// A script as one command: written to the staging folder and run from there with bash, so its
/// own `set -e` and line numbers hold.
pub fn script_command(name: &str, script: &str) -> String {
    check_name(name);
    let b64 = base64::engine::general_purpose::STANDARD.encode(script.as_bytes());
    format!(
        "{}printf '%s' '{b64}' | base64 -d > {name}\nexec bash \"$stage/{name}\"\n",
        prologue()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Replays the command stream with bash in a scratch folder, as the machine would.
    fn replay(commands: &[String], stage: &std::path::Path) {
        for c in commands {
            let o = Command::new("bash")
                .arg("-c")
                .arg(c)
                .env("STACKLESS_STAGE", stage)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "command failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn the_stream_reassembles_files_byte_for_byte() {
        let files = vec![
            // Incompressible, so it spans many commands.
            StagedFile {
                name: "stackless-init".into(),
                mode: 0o755,
                content: pseudo_random(300_000, 7),
            },
            StagedFile {
                name: "init.toml".into(),
                mode: 0o644,
                content: b"[sync]\nschedule = \"@hourly\"\n".to_vec(),
            },
            StagedFile {
                name: "empty".into(),
                mode: 0o600,
                content: Vec::new(),
            },
        ];
        let commands = upload_commands(&files);
        assert!(
            commands.len() >= 8,
            "300 KB of noise needs several commands: {}",
            commands.len()
        );
        for c in &commands {
            assert!(c.len() <= MAX_COMMAND_BYTES, "{} bytes", c.len());
        }
        let dir = tempfile::tempdir().unwrap();
        replay(&commands, dir.path());
        use std::os::unix::fs::PermissionsExt;
        for f in &files {
            let p = dir.path().join(&f.name);
            assert_eq!(std::fs::read(&p).unwrap(), f.content, "{}", f.name);
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                f.mode
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join(".parts"))
                .unwrap()
                .count(),
            0,
            "parts cleaned up"
        );
        // Replaying again (a retried upload) gives the same result.
        replay(&commands, dir.path());
        assert_eq!(
            std::fs::read(dir.path().join("stackless-init")).unwrap(),
            files[0].content
        );
    }

    #[test]
    fn a_corrupted_chunk_fails_the_checksum() {
        let files = vec![StagedFile {
            name: "f".into(),
            mode: 0o644,
            content: pseudo_random(1000, 3),
        }];
        let mut commands = upload_commands(&files);
        // Flip one base64 character of the payload.
        let c = &mut commands[0];
        // In the middle of the compressed payload (the gzip header has fields that do not matter).
        let start = c.find("printf '%s' '").unwrap() + "printf '%s' '".len();
        let end = start + c[start..].find('\'').unwrap();
        let at = (start + end) / 2;
        let flipped = if &c[at..at + 1] == "A" { "B" } else { "A" };
        c.replace_range(at..at + 1, flipped);
        let dir = tempfile::tempdir().unwrap();
        let o = Command::new("bash")
            .arg("-c")
            .arg(&commands[0])
            .env("STACKLESS_STAGE", dir.path())
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(
            !dir.path().join("f").exists(),
            "nothing published on a bad checksum"
        );
    }

    #[test]
    fn scripts_run_from_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = script_command(
            "provision.sh",
            "set -e\necho \"it's $(basename \"$0\")\" > out\n",
        );
        let o = Command::new("bash")
            .arg("-c")
            .arg(&cmd)
            .current_dir(dir.path())
            .env("STACKLESS_STAGE", dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "it's provision.sh\n"
        );
    }
}
