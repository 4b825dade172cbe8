//! The command line: `stackless-init [OPTIONS] <COMMAND> [ARGS]`.
//!
//! One table ([`COMMANDS`]) says what each command takes; [`parse`] walks the arguments with
//! lexopt against it, and each command's help is written out by hand beside its entry. clap
//! did the same with derives, but its builder was 116 KiB of the static agent (issue 18: under
//! 2 MiB). Behaviour kept from it: global options anywhere, `--opt=value`, `-vv`, `help
//! [COMMAND]`, defaults from the environment (`STACKLESS_ROOT`, `STACKLESS_IMDS_DEADLINE`), and
//! exit status 2 with the command's usage for bad arguments.

use lexopt::prelude::*;
use std::ffi::OsString;
use std::path::PathBuf;

/// The parsed command line.
#[derive(Debug, PartialEq)]
pub struct Cli {
    /// Every path the agent owns is under this (for tests and chroots).
    pub root: PathBuf,
    /// `-v` count: 1 debug, 2 and more trace.
    pub verbose: u8,
    /// Only errors.
    pub quiet: bool,
    pub command: Command,
}

#[derive(Debug, PartialEq)]
pub enum Command {
    Boot {
        once: bool,
        imds_deadline: u64,
        /// Units to wait for after the warm-up starts (`--wait-for`): started, then waited for.
        wait_for: Vec<String>,
    },
    Check {
        user_data: PathBuf,
        defaults: Option<PathBuf>,
        json: bool,
    },
    Status {
        json: bool,
    },
    Sync {
        lock_wait: u64,
    },
    Releases {
        pin: Option<(String, String)>,
        unpin: Option<String>,
        lock_wait: u64,
    },
    Seed {
        repo: String,
        url: String,
        reference: String,
        timeout: u64,
    },
    Askpass {
        prompt: String,
    },
    CheckParameter {
        name: String,
        endpoint: Option<String>,
        deadline: u64,
    },
    Wait {
        timeout: Option<u64>,
    },
}

/// What the caller does with the command line.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Cli),
    /// Print this on stdout and exit 0 (`--help`, `help`, `--version`).
    Print(String),
}

/// A command line that cannot run: print it on stderr and exit 2.
#[derive(Debug, PartialEq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One command: its name, what it takes, and its help.
struct Spec {
    name: &'static str,
    /// One line for the command list; empty: not listed (askpass is for git, not people).
    about: &'static str,
    /// Options without a value.
    flags: &'static [&'static str],
    /// Options with a value, and how many values each takes.
    options: &'static [(&'static str, usize)],
    /// Positional arguments, all required.
    positionals: &'static [&'static str],
    usage: &'static str,
    help: &'static str,
}

const GLOBAL_HELP: &str =
    "      --root <DIR>  Put every path the agent owns under DIR (for tests and chroots)
                    [env: STACKLESS_ROOT] [default: /]
  -v, --verbose     More log output (repeat for more)
  -q, --quiet       Only errors
  -h, --help        Print help
";

const COMMANDS: &[Spec] = &[
    Spec {
        name: "boot",
        about: "Run the boot sequence: IMDS, user-data, salt, repositories, highstate",
        flags: &["once"],
        options: &[("imds-deadline", 1), ("wait-for", 1)],
        positionals: &[],
        usage: "stackless-init boot [OPTIONS]",
        help: "      --once                 Exit after the boot sequence instead of staying resident
      --imds-deadline <SEC>  Seconds IMDS may take to answer, retries included
                             [env: STACKLESS_IMDS_DEADLINE] [default: 120]
      --wait-for <UNITS>     Start these systemd units (comma-separated) and wait for them
                             once salt-call is warming up (the unit starts early)
",
    },
    Spec {
        name: "check",
        about: "Validate user-data (and image defaults) without applying anything",
        flags: &["json"],
        options: &[("user-data", 1), ("defaults", 1)],
        positionals: &[],
        usage: "stackless-init check --user-data <FILE> [OPTIONS]",
        help: "      --user-data <FILE>  The user-data to check (TOML, or a `#!` script)
      --defaults <FILE>   Image defaults to merge under it (default: none)
      --json              Print the resolved settings as JSON
",
    },
    Spec {
        name: "status",
        about: "Show the boot timeline, repositories, last highstate, watchers and schedule",
        flags: &["json"],
        options: &[],
        positionals: &[],
        usage: "stackless-init status [OPTIONS]",
        help: "      --json  The state record as JSON
",
    },
    Spec {
        name: "sync",
        about: "Sync both repositories now (highstate on a new salt commit)",
        flags: &[],
        options: &[("lock-wait", 1)],
        positionals: &[],
        usage: "stackless-init sync [OPTIONS]",
        help: "      --lock-wait <SEC>  Longest wait for a running sync to finish, in seconds [default: 1800]
",
    },
    Spec {
        name: "releases",
        about: "List each repository's releases and verdicts; pin one by hand, or unpin",
        flags: &[],
        options: &[("pin", 2), ("unpin", 1), ("lock-wait", 1)],
        positionals: &[],
        usage: "stackless-init releases [--pin <REPO> <COMMIT> | --unpin <REPO>] [OPTIONS]",
        help: "      --pin <REPO> <COMMIT>  Publish a release the repository still has (a unique prefix of its
                             commit) and stay on it: syncs do not follow the ref until --unpin.
                             It counts as good
      --unpin <REPO>         Follow the ref again from the next sync
      --lock-wait <SEC>      Longest wait for a running sync to finish, in seconds [default: 1800]
",
    },
    Spec {
        name: "seed",
        about: "Fill a repository's object store ahead of its first sync (at bake time)",
        flags: &[],
        options: &[("ref", 1), ("timeout", 1)],
        positionals: &["REPO", "URL"],
        usage: "stackless-init seed [OPTIONS] <REPO> <URL>",
        help: "\
Fills a repository's object store ahead of its first sync (at bake time: the image's
`[provision.seed]`), so the first boot fetches only what is newer than the image. Public
repositories only: credentials come from SSM at boot, not at bake time.

Arguments:
  <REPO>  `salt` or `config`
  <URL>   The repository's URL (no credentials in it)

Options:
      --ref <REF>      The branch, tag or commit whose objects to keep [default: main]
      --timeout <SEC>  Seconds git may take [default: 600]
",
    },
    Spec {
        name: "askpass",
        about: "",
        flags: &[],
        options: &[],
        positionals: &["PROMPT"],
        usage: "stackless-init askpass <PROMPT>",
        help: "\
git's askpass helper for private HTTPS repositories: answers git's prompt from the file the agent
names in STACKLESS_ASKPASS_FILE (the agent runs it; not for people).
",
    },
    Spec {
        name: "check-parameter",
        about: "Read an SSM parameter as the agent would; says if it worked, never the value",
        flags: &[],
        options: &[("endpoint", 1), ("deadline", 1)],
        positionals: &["NAME"],
        usage: "stackless-init check-parameter [OPTIONS] <NAME>",
        help: "\
Arguments:
  <NAME>  The parameter's name

Options:
      --endpoint <URL>  The SSM endpoint (default: AWS_ENDPOINT_URL_SSM, AWS_ENDPOINT_URL, else
                        the region's)
      --deadline <SEC>  Seconds IMDS and SSM may take, retries included [default: 30]
",
    },
    Spec {
        name: "wait",
        about: "Wait for the boot to finish: exit 0 ready, 1 failed, 2 degraded, 3 timed out",
        flags: &[],
        options: &[("timeout", 1)],
        positionals: &[],
        usage: "stackless-init wait [OPTIONS]",
        help: "      --timeout <SEC>  Give up after this many seconds (default: wait forever)
",
    },
];

const ABOUT: &str = "Configures this instance from its user-data, masterless";

/// `stackless-init --version`: the name and the crate's version, as scripts read it.
pub fn version() -> String {
    format!("stackless-init {}\n", env!("CARGO_PKG_VERSION"))
}

/// The top-level help: the commands, then the global options.
pub fn help() -> String {
    let mut s = format!("{ABOUT}\n\nUsage: stackless-init [OPTIONS] <COMMAND>\n\nCommands:\n");
    let width = COMMANDS.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in COMMANDS.iter().filter(|c| !c.about.is_empty()) {
        s.push_str(&format!("  {:<width$}  {}\n", c.name, c.about));
    }
    s.push_str(&format!(
        "  {:<width$}  Print this message or the help of the given command\n",
        "help"
    ));
    s.push_str("\nOptions:\n");
    s.push_str(GLOBAL_HELP);
    s.push_str("  -V, --version     Print version\n");
    s
}

fn command_help(spec: &Spec) -> String {
    // A help that opens with an option gets the heading; prose or `Arguments:` bring their own.
    let opens_with_option = spec.help.starts_with("  ");
    let body = if opens_with_option {
        format!("Options:\n{}", spec.help)
    } else {
        spec.help.to_string()
    };
    let about = if !spec.about.is_empty() && (opens_with_option || body.starts_with("Arguments:")) {
        format!("{}\n\n", spec.about)
    } else {
        String::new()
    };
    format!(
        "{about}Usage: {}\n\n{body}\nGlobal options:\n{GLOBAL_HELP}",
        spec.usage
    )
}

fn usage_error(spec: Option<&Spec>, message: String) -> UsageError {
    let (usage, more) = match spec {
        Some(s) => (s.usage, format!("stackless-init {} --help", s.name)),
        None => (
            "stackless-init [OPTIONS] <COMMAND>",
            "stackless-init --help".into(),
        ),
    };
    UsageError(format!(
        "error: {message}\n\nUsage: {usage}\n\nFor more information, try '{more}'."
    ))
}

/// What one command's arguments were, before they are typed.
#[derive(Default)]
struct Matches {
    flags: Vec<&'static str>,
    options: Vec<(&'static str, Vec<String>)>,
    positionals: Vec<String>,
}

impl Matches {
    fn flag(&self, name: &str) -> bool {
        self.flags.contains(&name)
    }
    fn values(&self, name: &str) -> Option<&[String]> {
        self.options
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
    }
    fn value(&self, name: &str) -> Option<&str> {
        self.values(name).map(|v| v[0].as_str())
    }
}

/// Reads one environment variable (a parameter so tests need not change the process's own).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<OsString>;

fn utf8(v: OsString, what: &str) -> Result<String, String> {
    v.into_string()
        .map_err(|v| format!("{what}: {} is not valid UTF-8", v.to_string_lossy()))
}

/// A number of seconds from an option, its environment variable or its default.
fn seconds(
    m: &Matches,
    name: &str,
    env_var: Option<(&str, Env)>,
    default: Option<u64>,
) -> Result<Option<u64>, String> {
    let (raw, from) = match m.value(name) {
        Some(v) => (v.to_string(), format!("--{name}")),
        None => match env_var.and_then(|(var, env)| env(var).map(|v| (var, v))) {
            Some((var, v)) => (utf8(v, var)?, format!("--{name} (from {var})")),
            None => return Ok(default),
        },
    };
    raw.trim()
        .parse::<u64>()
        .map(Some)
        .map_err(|e| format!("invalid value '{raw}' for {from}: {e} (a whole number of seconds)"))
}

/// Parses the arguments after the program's name.
pub fn parse(args: impl IntoIterator<Item = OsString>, env: Env) -> Result<Parsed, UsageError> {
    let mut p = lexopt::Parser::from_args(args);
    let mut root: Option<OsString> = None;
    let mut verbose: u8 = 0;
    let mut quiet = false;
    let mut spec: Option<&'static Spec> = None;
    let mut help_asked = false;
    let mut help_command = false; // `help [COMMAND]`
    let mut m = Matches::default();
    let err = |spec: Option<&Spec>, e: String| usage_error(spec, e);
    loop {
        let arg = match p.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => return Err(err(spec, e.to_string())),
        };
        match arg {
            Short('h') | Long("help") => help_asked = true,
            Short('V') | Long("version") if spec.is_none() => return Ok(Parsed::Print(version())),
            Short('v') | Long("verbose") => verbose = verbose.saturating_add(1),
            Short('q') | Long("quiet") => quiet = true,
            Long("root") => root = Some(p.value().map_err(|e| err(spec, e.to_string()))?),
            Long(name) if spec.is_some_and(|s| s.flags.contains(&name)) => {
                let s = spec.unwrap_or(&COMMANDS[0]);
                let name = s.flags.iter().copied().find(|f| *f == name).unwrap_or("");
                m.flags.push(name);
            }
            Long(name) if spec.is_some_and(|s| s.options.iter().any(|(o, _)| *o == name)) => {
                let s = spec.unwrap_or(&COMMANDS[0]);
                let &(name, n) = s
                    .options
                    .iter()
                    .find(|(o, _)| *o == name)
                    .unwrap_or(&("", 1));
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    let v = if i == 0 {
                        p.value()
                    } else {
                        // The later values must follow as plain arguments (`--pin REPO COMMIT`).
                        match p.next() {
                            Ok(Some(Value(v))) => Ok(v),
                            _ => return Err(err(spec, format!("--{name} takes {n} values"))),
                        }
                    };
                    let v = v.map_err(|e| err(spec, e.to_string()))?;
                    values.push(utf8(v, &format!("--{name}")).map_err(|e| err(spec, e))?);
                }
                m.options.push((name, values));
            }
            Value(v) if spec.is_none() && !help_command => {
                let name = utf8(v, "the command").map_err(|e| err(None, e))?;
                if name == "help" {
                    help_command = true;
                    continue;
                }
                spec = Some(
                    COMMANDS
                        .iter()
                        .find(|c| c.name == name)
                        .ok_or_else(|| err(None, format!("unrecognized command '{name}'")))?,
                );
            }
            Value(v) if help_command => {
                let name = utf8(v, "the command").map_err(|e| err(None, e))?;
                let s = COMMANDS
                    .iter()
                    .find(|c| c.name == name)
                    .ok_or_else(|| err(None, format!("unrecognized command '{name}'")))?;
                return Ok(Parsed::Print(command_help(s)));
            }
            Value(v) if spec.is_some_and(|s| m.positionals.len() < s.positionals.len()) => {
                let s = spec.unwrap_or(&COMMANDS[0]);
                let what = format!("<{}>", s.positionals[m.positionals.len()]);
                m.positionals
                    .push(utf8(v, &what).map_err(|e| err(spec, e))?);
            }
            other => return Err(err(spec, other.unexpected().to_string())),
        }
    }
    if help_command || (help_asked && spec.is_none()) {
        return Ok(Parsed::Print(help()));
    }
    let Some(spec) = spec else {
        return Err(err(None, "a command is required".into()));
    };
    if help_asked {
        return Ok(Parsed::Print(command_help(spec)));
    }
    if m.positionals.len() < spec.positionals.len() {
        let missing: Vec<String> = spec.positionals[m.positionals.len()..]
            .iter()
            .map(|p| format!("<{p}>"))
            .collect();
        return Err(err(
            Some(spec),
            format!(
                "the required arguments were not provided: {}",
                missing.join(" ")
            ),
        ));
    }
    let command = typed(spec, &m, env).map_err(|e| err(Some(spec), e))?;
    let root = match root.or_else(|| env("STACKLESS_ROOT").filter(|v| !v.is_empty())) {
        Some(r) => PathBuf::from(r),
        None => PathBuf::from("/"),
    };
    Ok(Parsed::Run(Cli {
        root,
        verbose,
        quiet,
        command,
    }))
}

/// The command with its values checked and typed.
fn typed(spec: &Spec, m: &Matches, env: Env) -> Result<Command, String> {
    // Every option of seconds but `wait --timeout` has a default, so it is always a number.
    let secs =
        |name, default: u64| seconds(m, name, None, Some(default)).map(|v| v.unwrap_or(default));
    let pos = |i: usize| m.positionals[i].clone();
    Ok(match spec.name {
        "boot" => Command::Boot {
            once: m.flag("once"),
            imds_deadline: seconds(
                m,
                "imds-deadline",
                Some(("STACKLESS_IMDS_DEADLINE", env)),
                Some(120),
            )?
            .unwrap_or(120),
            wait_for: match m.value("wait-for") {
                Some(list) => crate::wait_for::parse(list)?,
                None => Vec::new(),
            },
        },
        "check" => Command::Check {
            user_data: m
                .value("user-data")
                .map(PathBuf::from)
                .ok_or("the required argument --user-data <FILE> was not provided")?,
            defaults: m.value("defaults").map(PathBuf::from),
            json: m.flag("json"),
        },
        "status" => Command::Status {
            json: m.flag("json"),
        },
        "sync" => Command::Sync {
            lock_wait: secs("lock-wait", 1800)?,
        },
        "releases" => {
            let pin = m.values("pin").map(|v| (v[0].clone(), v[1].clone()));
            let unpin = m.value("unpin").map(str::to_string);
            if pin.is_some() && unpin.is_some() {
                return Err("--unpin cannot be used with --pin".into());
            }
            Command::Releases {
                pin,
                unpin,
                lock_wait: secs("lock-wait", 1800)?,
            }
        }
        "seed" => {
            let repo = pos(0);
            if repo != "salt" && repo != "config" {
                return Err(format!(
                    "invalid value '{repo}' for <REPO>: expected salt or config"
                ));
            }
            Command::Seed {
                repo,
                url: pos(1),
                reference: m.value("ref").unwrap_or("main").to_string(),
                timeout: secs("timeout", 600)?,
            }
        }
        "askpass" => Command::Askpass { prompt: pos(0) },
        "check-parameter" => Command::CheckParameter {
            name: pos(0),
            endpoint: m.value("endpoint").map(str::to_string),
            deadline: secs("deadline", 30)?,
        },
        "wait" => Command::Wait {
            timeout: seconds(m, "timeout", None, None)?,
        },
        other => return Err(format!("no parser for the command {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn run(args: &[&str]) -> Result<Parsed, UsageError> {
        parse(args.iter().map(OsString::from), &no_env)
    }

    fn cli(args: &[&str]) -> Cli {
        match run(args) {
            Ok(Parsed::Run(c)) => c,
            other => panic!("{args:?}: expected a command, got {other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        match run(args) {
            Err(e) => e.0,
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn every_command_parses_with_its_defaults() {
        let c = cli(&["boot"]);
        assert_eq!(c.root, PathBuf::from("/"));
        assert_eq!((c.verbose, c.quiet), (0, false));
        assert_eq!(
            c.command,
            Command::Boot {
                once: false,
                imds_deadline: 120,
                wait_for: Vec::new(),
            }
        );
        assert_eq!(cli(&["sync"]).command, Command::Sync { lock_wait: 1800 });
        assert_eq!(
            cli(&["releases"]).command,
            Command::Releases {
                pin: None,
                unpin: None,
                lock_wait: 1800
            }
        );
        assert_eq!(
            cli(&["seed", "salt", "https://git.example/s.git"]).command,
            Command::Seed {
                repo: "salt".into(),
                url: "https://git.example/s.git".into(),
                reference: "main".into(),
                timeout: 600
            }
        );
        assert_eq!(
            cli(&["check-parameter", "/stackless/token"]).command,
            Command::CheckParameter {
                name: "/stackless/token".into(),
                endpoint: None,
                deadline: 30
            }
        );
        assert_eq!(cli(&["wait"]).command, Command::Wait { timeout: None });
        assert_eq!(cli(&["status"]).command, Command::Status { json: false });
        assert_eq!(
            cli(&["askpass", "Password for 'https://x': "]).command,
            Command::Askpass {
                prompt: "Password for 'https://x': ".into()
            }
        );
    }

    #[test]
    fn options_take_values_in_every_spelling_and_globals_go_anywhere() {
        let c = cli(&[
            "-vv",
            "boot",
            "--once",
            "--imds-deadline=7",
            "--root",
            "/tmp/r",
            "--wait-for",
            "network-online.target,supervisor.service",
            "-q",
        ]);
        assert_eq!(c.root, PathBuf::from("/tmp/r"));
        assert_eq!((c.verbose, c.quiet), (2, true));
        assert_eq!(
            c.command,
            Command::Boot {
                once: true,
                imds_deadline: 7,
                wait_for: vec!["network-online.target".into(), "supervisor.service".into()],
            }
        );
        assert_eq!(
            cli(&[
                "--root=/x",
                "check",
                "--user-data",
                "u.toml",
                "--defaults=d.toml",
                "--json"
            ])
            .command,
            Command::Check {
                user_data: "u.toml".into(),
                defaults: Some("d.toml".into()),
                json: true
            }
        );
        assert_eq!(
            cli(&["releases", "--pin", "config", "abc123", "--lock-wait", "5"]).command,
            Command::Releases {
                pin: Some(("config".into(), "abc123".into())),
                unpin: None,
                lock_wait: 5
            }
        );
        assert_eq!(
            cli(&[
                "seed",
                "--ref",
                "v2",
                "config",
                "file:///r",
                "--timeout",
                "9"
            ])
            .command,
            Command::Seed {
                repo: "config".into(),
                url: "file:///r".into(),
                reference: "v2".into(),
                timeout: 9
            }
        );
        assert_eq!(
            cli(&["wait", "--timeout", "3", "-v"]).command,
            Command::Wait { timeout: Some(3) }
        );
    }

    #[test]
    fn the_environment_fills_what_the_command_line_leaves_out() {
        let env = |k: &str| match k {
            "STACKLESS_ROOT" => Some(OsString::from("/srv/root")),
            "STACKLESS_IMDS_DEADLINE" => Some(OsString::from("15")),
            _ => None,
        };
        let Ok(Parsed::Run(c)) = parse(["boot"].map(OsString::from), &env) else {
            panic!("boot did not parse")
        };
        assert_eq!(c.root, PathBuf::from("/srv/root"));
        assert_eq!(
            c.command,
            Command::Boot {
                once: false,
                imds_deadline: 15,
                wait_for: Vec::new(),
            }
        );
        // The command line wins over the environment.
        let Ok(Parsed::Run(c)) = parse(
            ["--root", "/a", "boot", "--imds-deadline", "2"].map(OsString::from),
            &env,
        ) else {
            panic!("boot did not parse")
        };
        assert_eq!(c.root, PathBuf::from("/a"));
        assert_eq!(
            c.command,
            Command::Boot {
                once: false,
                imds_deadline: 2,
                wait_for: Vec::new(),
            }
        );
        let e = parse(["boot", "--wait-for", "network"].map(OsString::from), &env)
            .unwrap_err()
            .0;
        assert!(e.contains("expected unit names separated by commas"), "{e}");
        let bad = |k: &str| (k == "STACKLESS_IMDS_DEADLINE").then(|| OsString::from("soon"));
        let e = parse(["boot"].map(OsString::from), &bad).unwrap_err().0;
        assert!(
            e.contains("invalid value 'soon' for --imds-deadline (from STACKLESS_IMDS_DEADLINE)"),
            "{e}"
        );
    }

    #[test]
    fn bad_arguments_name_what_is_wrong_with_the_commands_usage() {
        let e = error(&["bogus"]);
        assert!(e.starts_with("error: unrecognized command 'bogus'"), "{e}");
        assert!(
            e.contains("Usage: stackless-init [OPTIONS] <COMMAND>"),
            "{e}"
        );
        let e = error(&[]);
        assert!(e.starts_with("error: a command is required"), "{e}");
        let e = error(&["sync", "--lock-wait", "ten"]);
        assert!(e.contains("invalid value 'ten' for --lock-wait"), "{e}");
        assert!(e.contains("Usage: stackless-init sync [OPTIONS]"), "{e}");
        assert!(e.contains("try 'stackless-init sync --help'"), "{e}");
        let e = error(&["check"]);
        assert!(e.contains("--user-data <FILE> was not provided"), "{e}");
        let e = error(&["seed", "pillar", "file:///r"]);
        assert!(e.contains("invalid value 'pillar' for <REPO>"), "{e}");
        let e = error(&["seed", "salt"]);
        assert!(e.contains("not provided: <URL>"), "{e}");
        let e = error(&["releases", "--pin", "salt"]);
        assert!(e.contains("--pin takes 2 values"), "{e}");
        let e = error(&["releases", "--pin", "salt", "abc", "--unpin", "salt"]);
        assert!(e.contains("--unpin cannot be used with --pin"), "{e}");
        let e = error(&["status", "--jsn"]);
        assert!(e.contains("--jsn"), "{e}");
        let e = error(&["wait", "extra"]);
        assert!(e.contains("extra"), "{e}");
        // An option of another command is not this one's.
        let e = error(&["status", "--once"]);
        assert!(e.contains("--once"), "{e}");
    }

    #[test]
    fn help_and_version_print_instead_of_running() {
        let Ok(Parsed::Print(v)) = run(&["--version"]) else {
            panic!("--version")
        };
        assert_eq!(v, format!("stackless-init {}\n", env!("CARGO_PKG_VERSION")));
        for args in [&["--help"][..], &["-h"], &["help"]] {
            let Ok(Parsed::Print(h)) = run(args) else {
                panic!("{args:?}")
            };
            for c in COMMANDS.iter().filter(|c| !c.about.is_empty()) {
                assert!(
                    h.contains(&format!("\n  {} ", c.name)),
                    "{args:?} lacks {}",
                    c.name
                );
            }
            assert!(!h.contains("askpass"), "the hidden command is listed: {h}");
            assert!(h.contains("[env: STACKLESS_ROOT]"));
        }
        for args in [
            &["seed", "--help"][..],
            &["help", "seed"],
            &["seed", "-h", "salt"],
        ] {
            let Ok(Parsed::Print(h)) = run(args) else {
                panic!("{args:?}")
            };
            assert!(
                h.contains("Usage: stackless-init seed [OPTIONS] <REPO> <URL>"),
                "{h}"
            );
            assert!(h.contains("--ref <REF>"), "{h}");
            assert!(h.contains("Global options:"), "{h}");
        }
        // Options line up under their heading, as in clap's help.
        assert!(help().contains("Options:\n      --root <DIR>  Put every path"));
        assert!(command_help(&COMMANDS[0]).contains("\n\nOptions:\n      --once "));
        // Every command has a help, and every option it takes is in it; no line is wider
        // than a terminal of 100 columns.
        assert!(help().lines().all(|l| l.len() <= 100), "{}", help());
        for c in COMMANDS {
            let h = command_help(c);
            assert!(h.lines().all(|l| l.len() <= 100), "{h}");
            assert!(
                h.lines()
                    .filter(|l| l.trim_start().starts_with("--"))
                    .all(|l| l.starts_with("      --")),
                "{h}"
            );
            for f in c.flags.iter().chain(c.options.iter().map(|(o, _)| o)) {
                assert!(
                    h.contains(&format!("--{f}")),
                    "{}'s help lacks --{f}",
                    c.name
                );
            }
            for p in c.positionals {
                assert!(
                    h.contains(&format!("<{p}>")),
                    "{}'s help lacks <{p}>",
                    c.name
                );
            }
        }
        let e = error(&["help", "nothing"]);
        assert!(e.contains("unrecognized command 'nothing'"), "{e}");
    }
}
