//! Mutation fuzzing on stable Rust, inside `cargo test` (issue 19): for the builder's parsers,
//! whose crate pulls in the AWS SDK and so stays out of the sanitizer build of `fuzz/` (the
//! agent's parsers are fuzzed there, coverage-guided, by `scripts/fuzz.sh`).
//!
//! Inputs are the seeds (the real files and fixtures) mutated the ways that find parser bugs:
//! bit flips, boundary bytes, the grammar's own tokens inserted, ranges cut, repeated or spliced
//! from another seed. Each target runs for `STACKLESS_FUZZ_SECS` seconds (1 by default; the
//! long run is `scripts/fuzz.sh`'s). A panic, or one input taking over a second, fails the test
//! and leaves the input in `target/fuzz-failures/` with its replay seed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::faults::Rng;

/// How long each target runs.
pub fn budget() -> Duration {
    let secs = std::env::var("STACKLESS_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64(secs)
}

/// Tokens of the formats fuzzed here (TOML, JSON, the console's result line).
const TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"{",
    b"}",
    b"=",
    b"\"",
    b"'''",
    b"\"\"\"",
    b"\\u",
    b"\\",
    b"\n",
    b"\r\n",
    b",",
    b".",
    b":",
    b"#",
    b"0x",
    b"-",
    b"+",
    b"1e999",
    b"9223372036854775808",
    b"true",
    b"nan",
    b"inf",
    b"1979-05-27T07:32:00Z",
    b"\xff",
    b"\xc3",
    b"\0",
    b" ",
    b"extends",
    b"source",
    b"[defaults]",
    b"[provision]",
    b"stackless-init-result: ",
    b"\x1b[0;32m",
];

/// One mutation of `input`, sometimes crossed with `other`.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.range(1, 5) {
        let len = v.len() as u64;
        let at = rng.range(0, len + 1) as usize;
        match rng.range(0, 8) {
            0 if !v.is_empty() => {
                let i = rng.range(0, len) as usize;
                v[i] ^= 1 << rng.range(0, 8);
            }
            1 if !v.is_empty() => {
                let i = rng.range(0, len) as usize;
                v[i] = *rng.pick(&[0u8, 0x7f, 0x80, 0xff, b'\n', b'"', b'=', b'[']);
            }
            2 => {
                let t = rng.pick(TOKENS);
                v.splice(at..at, t.iter().copied());
            }
            3 if !v.is_empty() => {
                let end = (at + rng.range(1, 64) as usize).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 if !v.is_empty() => {
                // Repeat a range: deep nesting and long lines.
                let start = rng.range(0, len) as usize;
                let end = (start + rng.range(1, 32) as usize).min(v.len());
                let piece = v[start..end].to_vec();
                for _ in 0..rng.range(1, 64) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
            5 if !other.is_empty() => {
                let start = rng.range(0, other.len() as u64) as usize;
                let end = (start + rng.range(1, 256) as usize).min(other.len());
                v.splice(at..at, other[start..end].iter().copied());
            }
            6 => {
                let b = rng.range(0, 256) as u8;
                v.insert(at, b);
            }
            _ => {
                v.truncate(at);
            }
        }
    }
    v
}

/// What a run did.
#[derive(Debug)]
pub struct Run {
    pub inputs: u64,
    pub slowest: Duration,
}

/// Fuzzes `target` with mutations of `seeds` for `budget()`; panics naming the saved input when
/// `target` panics or takes over a second on one input.
pub fn run(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) -> Run {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let mut rng = Rng::new(&format!("fuzz {name}"));
    let started = Instant::now();
    let budget = budget();
    let mut run = Run {
        inputs: 0,
        slowest: Duration::ZERO,
    };
    // The seeds themselves first: a fixture that fails is the cheapest finding.
    let mut queue: Vec<Vec<u8>> = seeds.to_vec();
    // Quiet panics while fuzzing: the failure message names the saved input instead.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    while started.elapsed() < budget || !queue.is_empty() {
        let input = queue.pop().unwrap_or_else(|| {
            let a = rng.pick(seeds);
            let b = rng.pick(seeds);
            mutate(&mut rng, a, b)
        });
        let t0 = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| target(&input)));
        let took = t0.elapsed();
        run.inputs += 1;
        run.slowest = run.slowest.max(took);
        let why = match outcome {
            Err(p) => Some(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
            Ok(()) if took > Duration::from_secs(1) => Some(format!("took {took:?} on one input")),
            Ok(()) => None,
        };
        if let Some(why) = why {
            failure = Some((why, input));
            break;
        }
    }
    std::panic::set_hook(hook);
    if let Some((why, input)) = failure {
        let dir = crate::repo_root().join("target/fuzz-failures");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}-{}", run.inputs));
        std::fs::write(&file, &input).unwrap();
        panic!(
            "fuzz {name}: {why}; input saved as {} ({} bytes: {:?})",
            file.display(),
            input.len(),
            String::from_utf8_lossy(&input[..input.len().min(300)])
        );
    }
    eprintln!(
        "fuzz {name}: {} inputs in {:?}, slowest {:?}",
        run.inputs,
        started.elapsed(),
        run.slowest
    );
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_target_is_caught_with_its_input() {
        let seeds = vec![b"a = 1\n".to_vec()];
        let r = catch_unwind(|| {
            run("panics-on-brackets", &seeds, |d| {
                assert!(!d.contains(&b'['), "a bracket");
            })
        });
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(msg.contains("panicked: a bracket"), "{msg}");
        assert!(
            msg.contains("target/fuzz-failures/panics-on-brackets-"),
            "{msg}"
        );
    }

    #[test]
    fn mutations_change_the_input_and_stay_bounded() {
        let mut rng = Rng::new("mutations");
        let seed = b"[defaults]\nx = 1\n".to_vec();
        let mut changed = 0;
        for _ in 0..2000 {
            let m = mutate(&mut rng, &seed, b"other = 'x'\n");
            assert!(m.len() < 64 * 1024, "{}", m.len());
            changed += (m != seed) as u32;
        }
        assert!(
            changed > 1800,
            "{changed} of 2000 mutations changed the input"
        );
    }
}
