//! The salt minion configuration: `/etc/salt/minion_id` and `/etc/salt/minion.d/stackless.conf`.
//!
//! The configuration is YAML, written without a YAML library: every scalar is emitted in a
//! form PyYAML reads back exactly (double-quoted strings with escapes, plain numbers and
//! booleans), and lists and nested tables in flow or block style.
//!
//! Under a root other than `/` the file also sets `root_dir`, which salt prepends to every
//! path it writes (`cachedir`, `pki_dir`, `sock_dir`, `extension_modules`, `pidfile`,
//! `log_file`, `key_logfile`), so a highstate in a test or a local boot never touches the
//! host's `/var/cache/salt`, `/etc/salt/pki` or `/var/log/salt`.

use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::fsutil::write_if_changed;
use crate::paths::Layout;

/// What goes into the minion configuration.
#[derive(Debug, Clone)]
pub struct MinionConfig<'a> {
    pub minion_id: &'a str,
    pub grains: &'a toml::Table,
    /// The `base` file root: the published salt states (`top.sls` there).
    pub file_root: PathBuf,
    /// The `base` pillar root.
    pub pillar_root: PathBuf,
}

const HEADER: &str = "# Written by stackless-init at boot; edits here are overwritten.\n";

/// Content of `etc/salt/minion` when it does not exist. Salt reads the `grains:` of
/// `minion.d/*.conf` only when the main file exists (its grains loader re-reads the
/// configuration from `conf_file`, which is set only for an existing file), so a pip-installed
/// salt, which ships no `/etc/salt/minion`, would silently drop the grains without it.
const MAIN_CONFIG: &str =
    "# Salt minion configuration. stackless-init keeps its settings in minion.d/stackless.conf;\n\
# this file exists so that salt reads the grains set there.\n";

/// Writes `Layout::minion_id_file()` (the id and a newline) and `Layout::minion_conf_file()`,
/// and creates the main `etc/salt/minion` if it is missing (never changing an existing one).
/// Files are written atomically, mode 0644, only when their content changed; returns whether
/// anything changed.
pub fn write_minion_config(layout: &Layout, cfg: &MinionConfig) -> Result<bool> {
    let conf = render(layout, cfg)?;
    let mut changed = write_if_changed(
        &layout.minion_id_file(),
        format!("{}\n", cfg.minion_id).as_bytes(),
        0o644,
    )
    .with_context(|| {
        format!(
            "writing the minion id to {}",
            layout.minion_id_file().display()
        )
    })?;
    changed |= write_if_changed(&layout.minion_conf_file(), conf.as_bytes(), 0o644).with_context(
        || {
            format!(
                "writing the minion configuration {}",
                layout.minion_conf_file().display()
            )
        },
    )?;
    let main = layout.salt_config_dir().join("minion");
    if !main.exists() {
        write_if_changed(&main, MAIN_CONFIG.as_bytes(), 0o644)
            .with_context(|| format!("creating {}", main.display()))?;
        changed = true;
    }
    Ok(changed)
}

/// The text of `minion.d/stackless.conf`.
pub fn render(layout: &Layout, cfg: &MinionConfig) -> Result<String> {
    let mut out = String::from(HEADER);
    let _ = writeln!(out, "id: {}", quote(cfg.minion_id));
    out.push_str("file_client: \"local\"\n");
    let _ = writeln!(
        out,
        "file_roots:\n  base:\n    - {}",
        quote(path_str(&cfg.file_root)?)
    );
    let _ = writeln!(
        out,
        "pillar_roots:\n  base:\n    - {}",
        quote(path_str(&cfg.pillar_root)?)
    );
    if !layout.is_system_root() {
        let root = std::path::absolute(layout.root())
            .with_context(|| format!("making {} absolute", layout.root().display()))?;
        out.push_str("# Not the system root: salt keeps its cache, keys, sockets and logs under this root.\n");
        let _ = writeln!(out, "root_dir: {}", quote(path_str(&root)?));
    }
    if !cfg.grains.is_empty() {
        out.push_str("grains:\n");
        block_table(&mut out, cfg.grains, 1);
    }
    Ok(out)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| {
        format!(
            "path {} is not UTF-8; salt's configuration needs UTF-8",
            p.display()
        )
    })
}

/// A YAML double-quoted scalar that PyYAML reads back as exactly `s`: quotes and backslashes
/// escaped, and every character YAML would not accept raw, or would fold as a line break
/// (NEL, LS, PS), written as an escape.
pub(crate) fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            ' '..='~' => q.push(c),
            '\u{85}' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(q, "\\u{:04x}", c as u32);
            }
            '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'.. => q.push(c),
            _ => {
                let _ = write!(q, "\\u{:04x}", c as u32);
            }
        }
    }
    q.push('"');
    q
}

fn float(f: f64) -> String {
    if f.is_nan() {
        ".nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { ".inf" } else { "-.inf" }.into()
    } else {
        // Display never uses an exponent; PyYAML wants a dot to see a float.
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    }
}

/// A value in flow style (`[...]`, `{...}`, scalars).
fn flow(out: &mut String, v: &toml::Value) {
    match v {
        toml::Value::String(s) => out.push_str(&quote(s)),
        toml::Value::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        toml::Value::Float(f) => out.push_str(&float(*f)),
        toml::Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        toml::Value::Datetime(d) => out.push_str(&quote(&d.to_string())),
        toml::Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                flow(out, item);
            }
            out.push(']');
        }
        toml::Value::Table(t) => {
            out.push('{');
            for (i, (k, item)) in t.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&quote(k));
                out.push_str(": ");
                flow(out, item);
            }
            out.push('}');
        }
    }
}

/// A table in block style, nested tables too; everything else in flow style.
fn block_table(out: &mut String, t: &toml::Table, depth: usize) {
    for (k, v) in t {
        out.push_str(&"  ".repeat(depth));
        out.push_str(&quote(k));
        out.push(':');
        match v {
            toml::Value::Table(inner) if !inner.is_empty() => {
                out.push('\n');
                block_table(out, inner, depth + 1);
            }
            other => {
                out.push(' ');
                flow(out, other);
                out.push('\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::salt::test_support::{salt_call, salt_json};
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn grains() -> toml::Table {
        toml::from_str(
            r#"
            role = "web"
            env = "prod"
            tricky = "quote \" back \\ colon: # hash\nnewline\ttab 'single' \u0085nel \u2028ls \u0001ctl é 🚀 - [x] {y}"
            yes_string = "yes"
            empty = ""
            number = 42
            negative = -7
            float = 2.5
            whole_float = 1e3
            tiny = 1e-7
            flag = true
            when = 1979-05-27T07:32:00Z
            list = ["a", 1, false, ["nested"], { k = "v" }]
            [nested]
            a = "b"
            deeper = { c = 1, "key with: colon" = "x" }
            empty_table = {}
            "#,
        )
        .unwrap()
    }

    #[test]
    fn renders_roots_id_and_root_dir() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let g = toml::Table::new();
        let cfg = MinionConfig {
            minion_id: "web-1",
            grains: &g,
            file_root: layout.repo_current("salt"),
            pillar_root: layout.repo_current("salt").join("pillar"),
        };
        let text = render(&layout, &cfg).unwrap();
        assert!(text.contains("id: \"web-1\"\n"), "{text}");
        assert!(text.contains("file_client: \"local\"\n"));
        assert!(text.contains(&format!("root_dir: \"{}\"\n", dir.path().display())));
        assert!(!text.contains("grains:"));
        let system = render(&Layout::new("/"), &cfg).unwrap();
        assert!(!system.contains("root_dir"), "{system}");
    }

    #[test]
    fn writes_files_only_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let g = grains();
        let cfg = MinionConfig {
            minion_id: "web-1",
            grains: &g,
            file_root: dir.path().join("states"),
            pillar_root: dir.path().join("pillar"),
        };
        assert!(write_minion_config(&layout, &cfg).unwrap());
        assert_eq!(
            fs::read_to_string(layout.minion_id_file()).unwrap(),
            "web-1\n"
        );
        for f in [
            layout.minion_id_file(),
            layout.minion_conf_file(),
            layout.salt_config_dir().join("minion"),
        ] {
            assert_eq!(
                fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o644,
                "{}",
                f.display()
            );
        }
        assert!(!write_minion_config(&layout, &cfg).unwrap());
        // An existing main configuration is left alone.
        fs::write(layout.salt_config_dir().join("minion"), "log_level: info\n").unwrap();
        assert!(!write_minion_config(&layout, &cfg).unwrap());
        assert_eq!(
            fs::read_to_string(layout.salt_config_dir().join("minion")).unwrap(),
            "log_level: info\n"
        );
        let other = MinionConfig {
            minion_id: "web-2",
            ..cfg
        };
        assert!(write_minion_config(&layout, &other).unwrap());
        assert_eq!(
            fs::read_to_string(layout.minion_id_file()).unwrap(),
            "web-2\n"
        );
    }

    /// Salt itself reads back the id, the roots, every grain exactly, and keeps all its own
    /// files under the layout root.
    #[test]
    fn real_salt_reads_the_configuration_back() {
        let salt = salt_call();
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let g = grains();
        let cfg = MinionConfig {
            minion_id: "web-1",
            grains: &g,
            file_root: dir.path().join("states"),
            pillar_root: dir.path().join("pillar"),
        };
        write_minion_config(&layout, &cfg).unwrap();

        let items = salt_json(&salt, &layout, &["grains.items"]);
        let got = &items["local"];
        for (k, v) in &g {
            let want = match v {
                toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
                other => serde_json::to_value(other).unwrap(),
            };
            assert_eq!(&got[k], &want, "grain {k}");
        }
        assert_eq!(got["id"], "web-1");

        let root = dir.path().to_str().unwrap();
        for key in [
            "root_dir",
            "cachedir",
            "pki_dir",
            "sock_dir",
            "log_file",
            "extension_modules",
            "pidfile",
        ] {
            let v = salt_json(&salt, &layout, &["config.get", key]);
            let path = v["local"].as_str().unwrap_or_default();
            assert!(
                path.starts_with(root),
                "salt's {key} is {path:?}, outside {root}"
            );
        }
        let roots = salt_json(&salt, &layout, &["config.get", "file_roots"]);
        assert_eq!(
            roots["local"]["base"][0],
            dir.path().join("states").to_str().unwrap()
        );
        let roots = salt_json(&salt, &layout, &["config.get", "pillar_roots"]);
        assert_eq!(
            roots["local"]["base"][0],
            dir.path().join("pillar").to_str().unwrap()
        );
        // What salt created, it created under the root.
        assert!(dir.path().join("var/cache/salt/minion").is_dir());
        assert!(dir.path().join("etc/salt/pki/minion").is_dir());
    }

    #[test]
    fn quoting_is_plain_for_plain_text() {
        assert_eq!(quote("web-1"), "\"web-1\"");
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
        assert_eq!(quote("\u{1}\u{85}\u{fffe}"), "\"\\u0001\\u0085\\ufffe\"");
        assert_eq!(float(1000.0), "1000.0");
        assert_eq!(float(-0.5), "-0.5");
        assert_eq!(float(f64::NEG_INFINITY), "-.inf");
    }
}
