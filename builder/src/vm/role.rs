//! The instance role a local boot's metadata service serves: credentials as `aws sts
//! assume-role` prints them (`{"Credentials": {...}, "AssumedRoleUser": {...}}`, or the
//! `Credentials` object alone), so a local guest reads SSM parameters (or writes its tags) with
//! a real role, as on EC2. The file holds a secret: it is read, never copied or printed.

use anyhow::{bail, Context, Result};
use stackless_init::imds::emulator::RoleConfig;
use std::path::Path;

/// The role name when the file does not say (no `AssumedRoleUser`).
pub const DEFAULT_ROLE_NAME: &str = "stackless-local";

/// Reads `--role-credentials FILE`.
pub fn load(file: &Path) -> Result<RoleConfig> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the role credentials {}", file.display()))?;
    parse(&file.display().to_string(), &text)
}

/// Parses the credentials; errors name `origin`, the line and the column, never a value.
pub fn parse(origin: &str, text: &str) -> Result<RoleConfig> {
    let doc: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{origin}:{}:{}: not JSON ({}); give the output of `aws sts assume-role`",
            e.line(),
            e.column(),
            classify(&e)
        )
    })?;
    let creds = doc.get("Credentials").unwrap_or(&doc);
    let field = |name: &str| -> Result<String> {
        match creds.get(name) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(_) => bail!("{origin}: Credentials.{name} is not a non-empty string"),
            None => bail!(
                "{origin}: no Credentials.{name}; give the output of `aws sts assume-role` \
                 (AccessKeyId, SecretAccessKey, SessionToken, Expiration)"
            ),
        }
    };
    // The CLI prints `+00:00`, the SDKs and IMDS `Z`: served as IMDS does.
    let raw = field("Expiration")?;
    let utc = raw
        .strip_suffix("+00:00")
        .map(|t| format!("{t}Z"))
        .unwrap_or_else(|| raw.clone());
    let Ok(at) = humantime::parse_rfc3339_weak(&utc) else {
        bail!("{origin}: Credentials.Expiration {raw:?} is not an RFC 3339 time in UTC");
    };
    let expiration = humantime::format_rfc3339_seconds(at).to_string();
    // arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION
    let name = doc
        .pointer("/AssumedRoleUser/Arn")
        .and_then(|a| a.as_str())
        .and_then(|arn| arn.split_once(":assumed-role/"))
        .and_then(|(_, rest)| rest.split('/').next())
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_ROLE_NAME)
        .to_string();
    Ok(RoleConfig {
        name,
        access_key_id: field("AccessKeyId")?,
        secret_access_key: field("SecretAccessKey")?,
        token: field("SessionToken")?,
        expiration,
    })
}

/// serde_json's category, without its message (which can quote the text).
fn classify(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "a syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Eof => "it ends too soon",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASSUMED: &str = r#"{
    "Credentials": {
        "AccessKeyId": "ASIAEXAMPLE000000001",
        "SecretAccessKey": "secretCANARYkey",
        "SessionToken": "tokenCANARY",
        "Expiration": "2026-12-03T01:00:00+00:00"
    },
    "AssumedRoleUser": {
        "AssumedRoleId": "AROAEXAMPLE:local",
        "Arn": "arn:aws:sts::123456789012:assumed-role/web-instance/local"
    }
}"#;

    #[test]
    fn reads_what_assume_role_prints() {
        let r = parse("creds.json", ASSUMED).unwrap();
        assert_eq!(r.name, "web-instance");
        assert_eq!(r.expiration, "2026-12-03T01:00:00Z");
        assert_eq!(r.access_key_id, "ASIAEXAMPLE000000001");
        assert_eq!(r.token, "tokenCANARY");
        let v: serde_json::Value = serde_json::from_str(ASSUMED).unwrap();
        let inner = parse("creds.json", &v["Credentials"].to_string()).unwrap();
        assert_eq!(inner.name, DEFAULT_ROLE_NAME);
        assert_eq!(inner.secret_access_key, "secretCANARYkey");
    }

    #[test]
    fn bad_files_say_where_and_never_quote_a_value() {
        let e = format!(
            "{:#}",
            parse("creds.json", "{\n  \"AccessKeyId\": \"secretCANARY\",,\n}").unwrap_err()
        );
        assert!(
            e.starts_with("creds.json:2:") && !e.contains("CANARY"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse(
                "creds.json",
                &ASSUMED.replace("\"SessionToken\"", "\"Token\"")
            )
            .unwrap_err()
        );
        assert!(
            e.contains("Credentials.SessionToken") && !e.contains("CANARY"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse(
                "creds.json",
                &ASSUMED.replace("2026-12-03T01:00:00+00:00", "soon")
            )
            .unwrap_err()
        );
        assert!(e.contains("Expiration"), "{e}");
    }
}
