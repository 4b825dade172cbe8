//! Reading an instance's serial console (a local VM's, or EC2's GetConsoleOutput):
//! `stackless-init boot` ends its console report with one machine-readable line,
//! `stackless-init-result: {json}`, which tells how the boot ended.

use serde::{Deserialize, Serialize};

pub const RESULT_PREFIX: &str = "stackless-init-result: ";

/// The agent's verdict on one boot, as it printed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentResult {
    /// ready, degraded or failed.
    pub outcome: String,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub total_ms: Option<u64>,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub minion_id: Option<String>,
    #[serde(default)]
    pub first_boot: Option<bool>,
    /// `stackless-init status --json`, when the agent included it.
    #[serde(default)]
    pub status: Option<serde_json::Value>,
}

impl AgentResult {
    /// The `stackless-init wait` convention: 0 ready, 1 failed, 2 degraded.
    pub fn exit_code(&self) -> u8 {
        match self.outcome.as_str() {
            "ready" => 0,
            "degraded" => 2,
            _ => 1,
        }
    }
}

/// Removes ANSI colour sequences and carriage returns systemd and getty put on the console.
pub fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Cuts the console's byte stream into lines, and lets a line that waits for its newline (a login
/// prompt does, for good) be shown before it is complete.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: Vec<u8>,
    /// How much of `pending` was already shown.
    shown: usize,
}

/// A complete console line.
#[derive(Debug, PartialEq, Eq)]
pub struct Line {
    /// The whole line, cleaned: what is parsed and kept.
    pub text: String,
    /// The part not shown yet, cleaned: what is echoed.
    pub unshown: String,
}

impl Assembler {
    /// Adds bytes from the console; returns the lines they completed.
    pub fn push(&mut self, data: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                let text = clean(&String::from_utf8_lossy(&self.pending));
                let unshown = clean(&String::from_utf8_lossy(&self.pending[self.shown..]));
                out.push(Line { text, unshown });
                self.pending.clear();
                self.shown = 0;
            } else {
                self.pending.push(b);
            }
        }
        out
    }

    /// The part of the incomplete line not shown yet, now marked shown.
    pub fn take_partial(&mut self) -> Option<String> {
        if self.shown == self.pending.len() {
            return None;
        }
        let part = clean(&String::from_utf8_lossy(&self.pending[self.shown..]));
        self.shown = self.pending.len();
        Some(part)
    }

    pub fn has_unshown(&self) -> bool {
        self.shown < self.pending.len()
    }
}

/// The agent's result, if this console line carries it. Kernel messages can interleave with a
/// line on the serial port, so the prefix may appear anywhere in it.
pub fn parse_result(line: &str) -> Option<Result<AgentResult, String>> {
    let at = line.find(RESULT_PREFIX)?;
    let json = line[at + RESULT_PREFIX.len()..].trim();
    Some(
        serde_json::from_str(json)
            .map_err(|e| format!("the agent's result line is not valid JSON ({e}): {json}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The console is whatever the guest prints: kernel noise, escape codes, a cut-off line.
    #[test]
    fn fuzzing_the_console_reader_finds_no_panic_or_hang() {
        let seeds = vec![
            b"\x1b[0;32mstackless-init-result: {\"outcome\":\"failed\",\"error\":\"user-data:3:5: bad\",\"total_ms\":12,\"instance_id\":\"i-1\",\"minion_id\":null,\"first_boot\":true}\r\n".to_vec(),
            b"[  1.2] random: crng init done\nstackless-init-result: {\"outcome\":\"ready\",\"status\":{\"a\":[1,2]}}\n".to_vec(),
            b"login: ".to_vec(),
        ];
        testkit::fuzz::run("console", &seeds, |data| {
            let mut a = Assembler::default();
            let half = data.len() / 2;
            for part in [&data[..half], &data[half..]] {
                for line in a.push(part) {
                    let _ = parse_result(&line.text);
                }
                let _ = a.take_partial();
            }
            let _ = parse_result(&clean(&String::from_utf8_lossy(data)));
        });
    }

    #[test]
    fn the_result_line_is_found_and_read() {
        let line = "\u{1b}[0;32mstackless-init-result: {\"outcome\":\"failed\",\"error\":\"user-data:3:5: bad\",\"total_ms\":12,\"instance_id\":\"i-1\",\"minion_id\":null,\"first_boot\":true}\r";
        let r = parse_result(&clean(line)).unwrap().unwrap();
        assert_eq!(r.outcome, "failed");
        assert_eq!(r.error.as_deref(), Some("user-data:3:5: bad"));
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.minion_id, None);
        assert!(parse_result("stackless-init: boot ready in 5 ms").is_none());
        assert!(parse_result("stackless-init-result: {broken")
            .unwrap()
            .is_err());
        let ready = parse_result("[ 9.1] x stackless-init-result: {\"outcome\":\"ready\"}")
            .unwrap()
            .unwrap();
        assert_eq!(ready.exit_code(), 0);
        let degraded: AgentResult = serde_json::from_str("{\"outcome\":\"degraded\"}").unwrap();
        assert_eq!(degraded.exit_code(), 2);
    }

    #[test]
    fn lines_are_cut_and_a_prompt_can_be_shown_before_its_newline() {
        let mut a = Assembler::default();
        assert_eq!(
            a.push(b"one\r\ntw"),
            vec![Line {
                text: "one".into(),
                unshown: "one".into()
            }]
        );
        assert!(a.has_unshown());
        assert_eq!(
            a.push(b"o\ndebian login: "),
            vec![Line {
                text: "two".into(),
                unshown: "two".into()
            }]
        );
        assert_eq!(a.take_partial().as_deref(), Some("debian login: "));
        assert_eq!(a.take_partial(), None);
        assert_eq!(
            a.push(b"[ 9.1] late\n"),
            vec![Line {
                text: "debian login: [ 9.1] late".into(),
                unshown: "[ 9.1] late".into()
            }]
        );
        assert!(!a.has_unshown());
    }

    #[test]
    fn colours_and_carriage_returns_are_removed() {
        assert_eq!(
            clean("\u{1b}[0;32m  OK  \u{1b}[0m] Started x\r"),
            "  OK  ] Started x"
        );
    }
}
