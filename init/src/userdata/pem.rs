//! PEM certificates as `ca_certificates` takes them: checked (with the offset of a problem, so
//! user-data errors carry a line and column) and normalised. `trust` installs what this returns.

pub const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
pub const END: &str = "-----END CERTIFICATE-----";

/// A problem in a PEM value, at byte `offset` of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemError {
    pub offset: usize,
    pub message: String,
}

fn pem_error(offset: usize, message: impl Into<String>) -> PemError {
    PemError {
        offset,
        message: message.into(),
    }
}

/// Splits PEM text into its certificates, each normalised to its marker lines and base64 lines.
/// Text outside the blocks (a comment, `openssl x509 -text` output) is ignored; a block without
/// its END (or an END without its BEGIN), a private key, or a body that is not base64 is an error.
pub fn split_certificates(text: &str) -> Result<Vec<String>, PemError> {
    let mut certs = Vec::new();
    // (offset of the BEGIN line, base64 lines so far)
    let mut open: Option<(usize, Vec<&str>)> = None;
    let mut offset = 0;
    for raw in text.split_inclusive('\n') {
        let at = offset;
        offset += raw.len();
        let line = raw.trim();
        let col = at + (raw.len() - raw.trim_start().len());
        if line.starts_with("-----BEGIN ") {
            if line != BEGIN {
                return Err(pem_error(
                    col,
                    format!("`{line}` is not a certificate: ca_certificates takes only `{BEGIN}` blocks (never a private key)"),
                ));
            }
            if open.is_some() {
                return Err(pem_error(
                    col,
                    format!("`{BEGIN}` before the `{END}` of the certificate above it; each certificate needs both markers"),
                ));
            }
            open = Some((col, Vec::new()));
        } else if line.starts_with("-----END ") {
            let Some((_, body)) = open.take() else {
                return Err(pem_error(
                    col,
                    format!("`{line}` without a `{BEGIN}` before it"),
                ));
            };
            if line != END {
                return Err(pem_error(
                    col,
                    format!("`{line}` closes a certificate; expected `{END}`"),
                ));
            }
            let len: usize = body.iter().map(|l| l.len()).sum();
            if len == 0 || !len.is_multiple_of(4) {
                return Err(pem_error(
                    col,
                    "the certificate ending here is empty or truncated (its base64 is not a whole number of 4-character groups); paste it again in full",
                ));
            }
            let mut cert = String::with_capacity(len + 64);
            cert.push_str(BEGIN);
            cert.push('\n');
            for l in body {
                cert.push_str(l);
                cert.push('\n');
            }
            cert.push_str(END);
            cert.push('\n');
            certs.push(cert);
        } else if let Some((_, body)) = open.as_mut() {
            if line.is_empty() {
                continue;
            }
            if let Some(bad) = line
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
            {
                return Err(pem_error(
                    col + bad,
                    format!(
                        "a certificate's body is base64 (A-Z a-z 0-9 + / =); found `{}`",
                        &line[bad..].chars().next().unwrap_or(' ')
                    ),
                ));
            }
            body.push(line);
        }
    }
    if let Some((begin, _)) = open {
        return Err(pem_error(begin, format!("this certificate has no `{END}`")));
    }
    if certs.is_empty() {
        return Err(pem_error(
            0,
            format!("no certificate found: ca_certificates holds one or more PEM certificates, each from `{BEGIN}` to `{END}`"),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B64: &str = "MIIBszCCAVmgAwIBAgIUQ2Vy";

    fn cert(body: &str) -> String {
        format!("{BEGIN}\n{body}\n{END}\n")
    }

    #[test]
    fn splits_and_normalises_certificates() {
        let text = format!(
            "# our proxy\n  {BEGIN}\r\n  {B64}\r\n\n{END}\nsubject=CN x\n{}",
            cert("QUJD")
        );
        let certs = split_certificates(&text).unwrap();
        assert_eq!(certs, vec![cert(B64), cert("QUJD")]);
    }

    #[test]
    fn pem_problems_are_located() {
        let e = split_certificates("hello\n").unwrap_err();
        assert!(e.message.contains("no certificate found"), "{e:?}");
        let text = format!("{BEGIN}\n{B64}\n");
        let e = split_certificates(&text).unwrap_err();
        assert_eq!(e.offset, 0);
        assert!(e.message.contains("has no `-----END"), "{e:?}");
        let text = format!("x\n{END}\n");
        assert_eq!(split_certificates(&text).unwrap_err().offset, 2);
        let text = format!("{BEGIN}\n{B64}\n{BEGIN}\n");
        let e = split_certificates(&text).unwrap_err();
        assert_eq!(e.offset, BEGIN.len() + B64.len() + 2);
        let text = format!("{BEGIN}\nAB*D\n{END}\n");
        let e = split_certificates(&text).unwrap_err();
        assert_eq!(e.offset, BEGIN.len() + 1 + 2, "{e:?}");
        let e = split_certificates("-----BEGIN PRIVATE KEY-----\nQUJD\n").unwrap_err();
        assert!(e.message.contains("never a private key"), "{e:?}");
        let e = split_certificates(&format!("{BEGIN}\nQUJ\n{END}\n")).unwrap_err();
        assert!(e.message.contains("truncated"), "{e:?}");
    }
}
