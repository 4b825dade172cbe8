//! Reading the guest's serial console: `stackless-init boot` ends its console report with one
//! machine-readable line, `stackless-init-result: {json}`, which tells how the boot ended.

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
    fn colours_and_carriage_returns_are_removed() {
        assert_eq!(
            clean("\u{1b}[0;32m  OK  \u{1b}[0m] Started x\r"),
            "  OK  ] Started x"
        );
    }
}
