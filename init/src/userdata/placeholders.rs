//! `{instance_id}`-style placeholders in the minion id and grain values.

use crate::imds::Identity;

/// The placeholders user-data may use, in the order the docs list them.
pub const NAMES: [&str; 5] = ["instance_id", "region", "az", "local_ipv4", "instance_type"];

/// A placeholder problem: what is wrong and at which byte of the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceholderError {
    pub offset: usize,
    pub message: String,
}

/// Checks a template without rendering it: every `{name}` is known, braces balance (`{{` and
/// `}}` stand for literal braces).
pub fn check(template: &str) -> Result<(), PlaceholderError> {
    render_with(template, |_| Some(String::new())).map(|_| ())
}

/// Renders a template with an instance's identity.
pub fn render(template: &str, id: &Identity) -> Result<String, PlaceholderError> {
    render_with(template, |name| {
        Some(match name {
            "instance_id" => id.instance_id.clone(),
            "region" => id.region.clone(),
            "az" => id.availability_zone.clone(),
            "local_ipv4" => id.private_ip.clone(),
            "instance_type" => id.instance_type.clone(),
            _ => return None,
        })
    })
}

fn render_with(
    template: &str,
    value: impl Fn(&str) -> Option<String>,
) -> Result<String, PlaceholderError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template.char_indices().peekable();
    while let Some((i, c)) = rest.next() {
        match c {
            '{' if matches!(rest.peek(), Some((_, '{'))) => {
                rest.next();
                out.push('{');
            }
            '}' if matches!(rest.peek(), Some((_, '}'))) => {
                rest.next();
                out.push('}');
            }
            '{' => {
                let close = template[i..].find('}').map(|j| i + j);
                let Some(close) = close else {
                    return Err(PlaceholderError {
                        offset: i,
                        message: "unclosed `{` (write `{{` for a literal brace)".into(),
                    });
                };
                let name = &template[i + 1..close];
                match NAMES.contains(&name).then(|| value(name)).flatten() {
                    Some(v) => out.push_str(&v),
                    None => {
                        return Err(PlaceholderError {
                            offset: i,
                            message: format!(
                                "unknown placeholder `{{{name}}}`; known: {}",
                                NAMES.map(|n| format!("{{{n}}}")).join(" ")
                            ),
                        })
                    }
                }
                while rest.peek().is_some_and(|(j, _)| *j <= close) {
                    rest.next();
                }
            }
            '}' => {
                return Err(PlaceholderError {
                    offset: i,
                    message: "unmatched `}` (write `}}` for a literal brace)".into(),
                })
            }
            _ => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            instance_id: "i-0abc".into(),
            region: "eu-west-1".into(),
            availability_zone: "eu-west-1b".into(),
            instance_type: "t3.micro".into(),
            private_ip: "10.0.0.7".into(),
            account_id: String::new(),
            image_id: String::new(),
        }
    }

    #[test]
    fn renders_every_placeholder() {
        let t = "{instance_id}.{region}.{az}.{local_ipv4}.{instance_type}";
        assert_eq!(
            render(t, &id()).unwrap(),
            "i-0abc.eu-west-1.eu-west-1b.10.0.0.7.t3.micro"
        );
        assert_eq!(render("web-{{x}}", &id()).unwrap(), "web-{x}");
        assert_eq!(render("plain", &id()).unwrap(), "plain");
    }

    #[test]
    fn unknown_and_unbalanced_are_located() {
        let e = check("web-{instance}").unwrap_err();
        assert_eq!(e.offset, 4);
        assert!(
            e.message.contains("unknown placeholder `{instance}`"),
            "{}",
            e.message
        );
        assert_eq!(check("a{region").unwrap_err().offset, 1);
        assert_eq!(check("ab}").unwrap_err().offset, 2);
        assert!(check("{az}-{{ok}}").is_ok());
    }
}
