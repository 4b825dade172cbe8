//! Absolute path globs: `*`, `?`, `[abc]`, `[!a-z]` inside one component, `**` as a whole
//! component for any depth (zero or more folders), `\x` for a literal `x`.
//!
//! Like the shell, a wildcard never matches a leading `.` (write `.*` for hidden names), and
//! `**` does not enter hidden folders.

use anyhow::{bail, Result};
use std::ffi::OsStr;
use std::path::{Component, Path};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Char(char),
    /// `?`
    One,
    /// `*`
    Any,
    /// `[...]`: (negated, inclusive ranges)
    Class(bool, Vec<(char, char)>),
}

/// One component of a pattern.
#[derive(Debug, Clone, PartialEq)]
pub enum Comp {
    /// No wildcard: matched byte for byte.
    Literal(String),
    /// A wildcard component.
    Glob(Glob),
    /// `**`: any number of folders.
    AnyDepth,
}

/// A compiled single-component glob.
#[derive(Debug, Clone, PartialEq)]
pub struct Glob {
    toks: Vec<Tok>,
}

/// A compiled absolute pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    text: String,
    comps: Vec<Comp>,
}

impl Pattern {
    /// Compiles `text`, which must be absolute and end with a file-name component.
    pub fn parse(text: &str) -> Result<Pattern> {
        if !text.starts_with('/') {
            bail!("watch pattern {text:?} is not absolute; write it from `/`");
        }
        if text.ends_with('/') {
            bail!("watch pattern {text:?} ends with `/`; it must name files (e.g. `{text}*`)");
        }
        let mut comps = Vec::new();
        for part in text.split('/') {
            match part {
                "" | "." => continue,
                ".." => bail!("watch pattern {text:?} contains `..`; write the path without it"),
                "**" => {
                    // `**/**` is the same as `**`.
                    if comps.last() != Some(&Comp::AnyDepth) {
                        comps.push(Comp::AnyDepth);
                    }
                }
                _ => comps.push(parse_comp(part).map_err(|e| {
                    anyhow::anyhow!("watch pattern {text:?}, component {part:?}: {e}")
                })?),
            }
        }
        match comps.last() {
            None => bail!("watch pattern {text:?} names no file"),
            Some(Comp::AnyDepth) => {
                bail!("watch pattern {text:?} ends with `**`; add a file name pattern (`**/*`)")
            }
            Some(_) => {}
        }
        Ok(Pattern {
            text: text.to_owned(),
            comps,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The components (at least one; the last one is never `**`).
    pub fn comps(&self) -> &[Comp] {
        &self.comps
    }

    /// Whether the absolute, lexical `path` matches (no file-system access; symlinks are not
    /// resolved, `..` is not interpreted).
    pub fn matches(&self, path: &Path) -> bool {
        let mut names: Vec<&OsStr> = Vec::with_capacity(self.comps.len() + 4);
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => names.push(n),
                Component::Prefix(_) | Component::ParentDir => return false,
            }
        }
        if !path.is_absolute() {
            return false;
        }
        match_comps(&self.comps, &names)
    }
}

fn match_comps(comps: &[Comp], names: &[&OsStr]) -> bool {
    match comps.split_first() {
        None => names.is_empty(),
        Some((Comp::AnyDepth, rest)) => {
            // Zero or more folders, none of them hidden.
            for skip in 0..=names.len() {
                if match_comps(rest, &names[skip..]) {
                    return true;
                }
                if skip < names.len() && is_hidden(names[skip]) {
                    return false;
                }
            }
            false
        }
        Some((c, rest)) => match names.split_first() {
            Some((n, more)) => c.matches(n) && match_comps(rest, more),
            None => false,
        },
    }
}

fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

impl Comp {
    /// Whether one file name matches this component (`**` matches any non-hidden name).
    pub fn matches(&self, name: &OsStr) -> bool {
        match self {
            Comp::Literal(s) => name.as_encoded_bytes() == s.as_bytes(),
            Comp::Glob(g) => g.matches(name),
            Comp::AnyDepth => !is_hidden(name),
        }
    }
}

fn parse_comp(part: &str) -> Result<Comp> {
    let mut toks = Vec::new();
    let mut wild = false;
    let mut chars = part.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) => toks.push(Tok::Char(e)),
                None => bail!("a trailing `\\` escapes nothing"),
            },
            '*' => {
                wild = true;
                if toks.last() != Some(&Tok::Any) {
                    toks.push(Tok::Any);
                }
            }
            '?' => {
                wild = true;
                toks.push(Tok::One);
            }
            '[' => {
                wild = true;
                let negated = matches!(chars.peek(), Some('!') | Some('^'));
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let Some(mut lo) = chars.next() else {
                        bail!("`[` is not closed by `]`");
                    };
                    if lo == ']' && !first {
                        break;
                    }
                    first = false;
                    if lo == '\\' {
                        lo = chars
                            .next()
                            .ok_or_else(|| anyhow::anyhow!("`[` is not closed"))?;
                    }
                    let mut hi = lo;
                    if chars.peek() == Some(&'-') {
                        let mut ahead = chars.clone();
                        ahead.next();
                        match ahead.peek() {
                            Some(']') | None => {}
                            Some(_) => {
                                chars.next();
                                hi = chars.next().unwrap_or(lo);
                                if hi == '\\' {
                                    hi = chars.next().unwrap_or(lo);
                                }
                                if hi < lo {
                                    bail!("the range {lo}-{hi} is reversed");
                                }
                            }
                        }
                    }
                    ranges.push((lo, hi));
                }
                toks.push(Tok::Class(negated, ranges));
            }
            c => toks.push(Tok::Char(c)),
        }
    }
    if wild {
        Ok(Comp::Glob(Glob { toks }))
    } else {
        Ok(Comp::Literal(
            toks.into_iter()
                .map(|t| match t {
                    Tok::Char(c) => c,
                    _ => unreachable!("a component without wildcards holds only characters"),
                })
                .collect(),
        ))
    }
}

impl Glob {
    /// Whether `name` matches. Names that are not UTF-8 never match a wildcard component.
    pub fn matches(&self, name: &OsStr) -> bool {
        let Some(name) = name.to_str() else {
            return false;
        };
        if name.starts_with('.') && self.toks.first() != Some(&Tok::Char('.')) {
            return false;
        }
        let s: Vec<char> = name.chars().collect();
        // Classic iterative wildcard matching, backtracking to the last `*`.
        let (mut ti, mut si) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            match self.toks.get(ti) {
                Some(Tok::Any) => {
                    star = Some((ti, si));
                    ti += 1;
                    continue;
                }
                Some(t) if tok_matches(t, s[si]) => {
                    ti += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                Some((st, ss)) => {
                    ti = st + 1;
                    si = ss + 1;
                    star = Some((st, ss + 1));
                }
                None => return false,
            }
        }
        self.toks[ti..].iter().all(|t| *t == Tok::Any)
    }
}

fn tok_matches(t: &Tok, c: char) -> bool {
    match t {
        Tok::Char(x) => *x == c,
        Tok::One => true,
        Tok::Any => true,
        Tok::Class(neg, ranges) => ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *neg,
    }
}

/// Names written by editors, salt, git and atomic writers on their way to the real file; they
/// never trigger, even when a pattern matches them.
pub fn is_temp_name(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    let ends = |s: &[u8]| b.ends_with(s);
    b.starts_with(b"__salt.tmp.")
        || b.starts_with(b".#")
        || ends(b"~")
        || ends(b".swp")
        || ends(b".swx")
        || ends(b".swo")
        || ends(b".tmp")
        || ends(b".lock")
        || b == b"4913"
        || (b.starts_with(b".") && contains(b, b".tmp-"))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, path: &str) -> bool {
        Pattern::parse(p).unwrap().matches(Path::new(path))
    }

    #[test]
    fn literal_and_star() {
        assert!(m("/etc/app/app.conf", "/etc/app/app.conf"));
        assert!(!m("/etc/app/app.conf", "/etc/app/app.conf2"));
        assert!(m("/etc/app/*.conf", "/etc/app/a.conf"));
        assert!(!m("/etc/app/*.conf", "/etc/app/.conf"));
        assert!(m("/etc/app/*.conf", "/etc/app/x.y.conf"));
        assert!(!m("/etc/app/*.conf", "/etc/app/sub/a.conf"));
        assert!(!m("/etc/app/*.conf", "/etc/app/a.confx"));
        assert!(m("/etc/app/*", "/etc/app/anything"));
        assert!(m("/etc/*/x", "/etc/app/x"));
        assert!(!m("/etc/*/x", "/etc/x"));
        assert!(m("/a/*b*c", "/a/xbyc"));
        assert!(m("/a/*b*c", "/a/bc"));
        assert!(!m("/a/*b*c", "/a/bcb"));
        assert!(m("//a//b", "/a/b"));
    }

    #[test]
    fn question_and_classes() {
        assert!(m("/a/?.conf", "/a/x.conf"));
        assert!(!m("/a/?.conf", "/a/xy.conf"));
        assert!(m("/a/[abc].conf", "/a/b.conf"));
        assert!(!m("/a/[abc].conf", "/a/d.conf"));
        assert!(m("/a/[a-c]x", "/a/cx"));
        assert!(!m("/a/[!a-c]x", "/a/cx"));
        assert!(m("/a/[!a-c]x", "/a/dx"));
        assert!(m("/a/[^a-c]x", "/a/dx"));
        assert!(m("/a/[]]", "/a/]"));
        assert!(m("/a/[a-]", "/a/-"));
        assert!(m("/a/\\*", "/a/*"));
        assert!(!m("/a/\\*", "/a/x"));
        assert!(m("/a/é?", "/a/éü"));
    }

    #[test]
    fn hidden_names() {
        assert!(!m("/a/*", "/a/.hidden"));
        assert!(!m("/a/?hidden", "/a/.hidden"));
        assert!(m("/a/.*", "/a/.hidden"));
        assert!(m("/a/.hidden", "/a/.hidden"));
    }

    #[test]
    fn any_depth() {
        assert!(m("/a/**/*.conf", "/a/x.conf"));
        assert!(m("/a/**/*.conf", "/a/b/x.conf"));
        assert!(m("/a/**/*.conf", "/a/b/c/d/x.conf"));
        assert!(!m("/a/**/*.conf", "/b/x.conf"));
        assert!(!m("/a/**/*.conf", "/a/.git/x.conf"));
        assert!(m("/a/**/c/*.conf", "/a/b/c/x.conf"));
        assert!(m("/a/**/c/*.conf", "/a/c/x.conf"));
        assert!(!m("/a/**/c/*.conf", "/a/b/x.conf"));
        assert!(m("/**/x", "/x"));
        assert!(m("/a/**/**/x", "/a/b/x"));
    }

    #[test]
    fn relative_paths_never_match() {
        assert!(!m("/a/*", "a/b"));
        assert!(!m("/a/*", "/a/../a/b"));
    }

    #[test]
    fn components() {
        let p = Pattern::parse("/srv/*/app/**/x?.conf").unwrap();
        assert_eq!(p.comps().len(), 5);
        assert_eq!(p.comps()[0], Comp::Literal("srv".into()));
        assert!(matches!(p.comps()[1], Comp::Glob(_)));
        assert_eq!(p.comps()[3], Comp::AnyDepth);
        assert_eq!(p.as_str(), "/srv/*/app/**/x?.conf");
    }

    #[test]
    fn bad_patterns() {
        for p in [
            "etc/x", "/etc/", "/", "/a/**", "/a/[bc", "/a/x\\", "/a/../b", "/a/[z-a]",
        ] {
            assert!(Pattern::parse(p).is_err(), "{p} should be rejected");
        }
    }

    #[test]
    fn temp_names() {
        for n in [
            "__salt.tmp.abc123",
            ".#app.conf",
            "app.conf~",
            ".app.conf.swp",
            ".app.conf.swx",
            "app.conf.tmp",
            "4913",
            "index.lock",
            "app.conf.lock",
            ".app.conf.tmp-1234",
        ] {
            assert!(is_temp_name(OsStr::new(n)), "{n} is a temp name");
        }
        for n in ["app.conf", "4914", "tmp", "lockfile", "app.tmp.conf", "swp"] {
            assert!(!is_temp_name(OsStr::new(n)), "{n} is not a temp name");
        }
    }
}
