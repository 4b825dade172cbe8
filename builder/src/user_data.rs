//! User-data as instances receive it: validated with the agent's own types (merged over an image's
//! defaults and rendered on a sample identity, so a bad placeholder fails here, not at boot),
//! gzipped when that makes it smaller, refused over EC2's 16 KB.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use stackless_init::userdata::{self, Document};
use std::io::Write;
use std::path::Path;

/// User-data ready to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Payload {
    pub file: String,
    /// What goes to EC2 (gzipped when smaller).
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// The size of the text.
    pub text_bytes: usize,
    pub gzipped: bool,
    /// The minion id a sample instance would get.
    pub minion_id: String,
}

/// Reads, validates and packs a user-data file, checked over `defaults` (an image's `[defaults]`).
pub fn prepare(file: &Path, defaults: &Document) -> Result<Payload> {
    let raw =
        std::fs::read(file).with_context(|| format!("reading the user-data {}", file.display()))?;
    let name = file.display().to_string();
    let doc = userdata::load(&name, &raw)?;
    let settings = userdata::resolve(defaults, &doc, &stackless_init::imds::Identity::example())?;
    let text = doc.text.as_bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(text)?;
    let gz = gz.finish()?;
    let (bytes, gzipped) = if gz.len() < text.len() {
        (gz, true)
    } else {
        (text.to_vec(), false)
    };
    if bytes.len() > userdata::EC2_USER_DATA_LIMIT {
        bail!(
            "{name}: {} bytes {}; EC2 takes at most {} bytes of user-data. Move data into the config repository.",
            bytes.len(),
            if gzipped { "gzipped" } else { "plain" },
            userdata::EC2_USER_DATA_LIMIT
        );
    }
    Ok(Payload {
        file: name,
        bytes,
        text_bytes: text.len(),
        gzipped,
        minion_id: settings.minion_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `builder user-data` and `builder deploy` both go through `prepare`, hence through the
    /// agent's own parser: a URL with a token in it is refused, pointing to the option to use,
    /// and the error never repeats the token.
    #[test]
    fn urls_with_credentials_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.toml");
        std::fs::write(
            &file,
            "[salt]\nrepo = \"https://x-access-token:ghp_CANARY42@github.com/acme/s.git\"\n",
        )
        .unwrap();
        let e = prepare(&file, &Document::default()).unwrap_err();
        let text = format!("{e:#}");
        assert!(
            text.contains("web.toml:2:17") && text.contains("[salt.credentials] token_parameter"),
            "{text}"
        );
        assert!(!text.contains("CANARY"), "{text}");

        std::fs::write(
            &file,
            "[salt]\nrepo = \"https://github.com/acme/s.git\"\n\
             [salt.credentials]\ntoken_parameter = \"/stackless/token\"\n",
        )
        .unwrap();
        prepare(&file, &Document::default()).expect("parameter names are fine");
    }
}
