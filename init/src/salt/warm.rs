//! A salt-call started ahead of its highstate.
//!
//! Much of a salt-call's start is Python importing salt. Measured in the local preseeded image
//! under qemu's emulation, a salt-call started 12 s before it is needed runs `test.ping` in
//! 6.3 s instead of 10 to 16 s, and a 5-state `state.sls` in 8 s instead of 11.3 to 12.4 s; on
//! this host's real cores, `test.ping` in 0.5 s instead of 1.0 to 1.2 s. At boot the agent knows
//! salt-call's path as soon as it has read the image's defaults, long before the highstate:
//! the network (the unit starts before it, [`crate::wait_for`]), IMDS and the repositories come
//! first. So it starts salt-call's own interpreter on `warm.py` then, which imports salt and
//! waits for its arguments. The highstate hands them over with its log ([`WarmSaltCall::go`]),
//! and the child is supervised like any other from then on ([`crate::process::wait_started`]).
//!
//! Only a pip console script is warmed (`#!PYTHON` and `from salt.scripts import salt_call`, as
//! in the images' salt venv): what the script would run is then known exactly. Anything else
//! (salt's onedir wrapper, a test's stand-in) runs cold, as does every highstate after the
//! first. A warm salt-call not used (user-data chose another salt-call, or no highstate) is
//! killed with its process group when dropped; if the agent dies first, its stdin closes and
//! it exits.

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Instant;

/// What the interpreter runs, as `PYTHON -c SHIM SCRIPT` (kept terse: it is in the agent's
/// 2 MiB). It puts the script's own folder first on `sys.path`, as running the script would,
/// and imports what salt-call imports; an import that fails is only a lost head start (it fails
/// again after the hand-over, into the log). The modules listed are what salt-call's highstate
/// imports (salt 3008, `python -X importtime`); a version without one loses only that module's
/// head start. Then it reads stdin to its end: the log's path and the arguments, each
/// NUL-terminated. It points stdout and stderr at the log and stdin at `/dev/null`, and runs
/// `salt_call()` with those arguments as the console script would, its exit code passed
/// through. Nothing at all on stdin (the agent let it go, or died): it exits.
const SHIM: &str = include_str!("warm.py");

/// The line pip (and setuptools) write into a salt-call console script.
const ENTRY_POINT: &str = "from salt.scripts import salt_call";

/// A salt-call's interpreter, started and importing salt, waiting for its arguments.
pub struct WarmSaltCall {
    salt_call: PathBuf,
    program: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    started: Instant,
}

impl WarmSaltCall {
    /// Starts `salt_call`'s interpreter on the shim, in a process group of its own. `None`, with
    /// the reason at debug level, when `salt_call` is not a pip console script or its
    /// interpreter cannot start: the highstate then runs it cold.
    pub fn start(salt_call: &Path) -> Option<Self> {
        match Self::spawn(salt_call) {
            Ok(warm) => Some(warm),
            Err(e) => {
                tracing::debug!(salt_call = %salt_call.display(), "not warming salt-call: {e:#}");
                None
            }
        }
    }

    fn spawn(salt_call: &Path) -> Result<Self> {
        let interpreter = interpreter(salt_call)?.context("not a pip console script")?;
        let program = interpreter[0].to_string_lossy().into_owned();
        let mut child = Command::new(&interpreter[0])
            .args(&interpreter[1..])
            .arg("-c")
            .arg(SHIM)
            .arg(salt_call)
            .stdin(Stdio::piped())
            // Nothing is written before `go` points both at the highstate's log.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        tracing::debug!(salt_call = %salt_call.display(), pid = child.id(), "warming salt-call: its interpreter imports salt");
        Ok(Self {
            salt_call: salt_call.to_path_buf(),
            program,
            stdin: child.stdin.take(),
            child: Some(child),
            started: Instant::now(),
        })
    }

    /// Whether this is the salt-call the highstate runs.
    pub fn serves(&self, salt_call: &Path) -> bool {
        self.salt_call == salt_call
    }

    /// The interpreter's path, for messages.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Hands over the arguments and the log (the shim appends to it; it must exist) and returns
    /// the child, now running `salt-call ARGS`. Errs when the interpreter is gone (it then ran
    /// nothing), so the caller can run salt-call cold.
    pub fn go(mut self, args: &[OsString], log: &Path) -> Result<Child> {
        // Each NUL-terminated (no argument or path can hold a NUL), then end of file.
        let mut message = Vec::new();
        for part in std::iter::once(log.as_os_str()).chain(args.iter().map(OsString::as_os_str)) {
            message.extend_from_slice(part.as_bytes());
            message.push(0);
        }
        let mut stdin = self.stdin.take().context("already handed over")?;
        let child = self.child.as_mut().context("already handed over")?;
        if let Ok(Some(status)) = child.try_wait() {
            // Reaped: Drop must not signal a pid that may be reused.
            self.child = None;
            anyhow::bail!(
                "the warm salt-call's interpreter {} {}",
                self.program,
                crate::process::describe(status)
            );
        }
        stdin
            .write_all(&message)
            .with_context(|| format!("handing the arguments to {}", self.program))?;
        // Closing it ends the message; the shim then points stdin at /dev/null.
        drop(stdin);
        tracing::debug!(
            warmed_ms = self.started.elapsed().as_millis() as u64,
            "salt-call runs in the interpreter warmed since the boot began"
        );
        Ok(self.child.take().expect("checked above"))
    }
}

impl Drop for WarmSaltCall {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(self.stdin.take());
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            tracing::debug!(salt_call = %self.salt_call.display(), "warm salt-call not used; stopped");
        }
    }
}

/// The interpreter (and its one argument) of `script`'s `#!` line, when `script` is a salt-call
/// console script: `Ok(None)` when it is something else.
fn interpreter(script: &Path) -> Result<Option<Vec<OsString>>> {
    let mut head = Vec::with_capacity(1024);
    std::fs::File::open(script)
        .with_context(|| format!("opening {}", script.display()))?
        .take(4096)
        .read_to_end(&mut head)
        .with_context(|| format!("reading {}", script.display()))?;
    let text = String::from_utf8_lossy(&head);
    let Some(shebang) = text.strip_prefix("#!") else {
        return Ok(None);
    };
    let first = shebang.lines().next().unwrap_or("").trim();
    if !text.lines().any(|l| l.trim() == ENTRY_POINT) {
        return Ok(None);
    }
    // Linux passes what follows the program as one argument.
    let (program, arg) = match first.split_once(char::is_whitespace) {
        Some((p, a)) => (p, Some(a.trim())),
        None => (first, None),
    };
    // A Python, directly or through env: pip writes a `#!/bin/sh` launcher (still holding the
    // entry point) when the interpreter's path is too long or has a space.
    let python = |p: &str| {
        p.rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("python"))
    };
    let through_env = program.ends_with("/env") && arg.is_some_and(python);
    if !program.starts_with('/') || !(python(program) || through_env) {
        return Ok(None);
    }
    let mut argv = vec![OsString::from(program)];
    argv.extend(arg.filter(|a| !a.is_empty()).map(OsString::from));
    Ok(Some(argv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    const PIP_SCRIPT: &str = "#!/opt/salt/bin/python3\nimport sys\nfrom salt.scripts import salt_call\nif __name__ == '__main__':\n    sys.exit(salt_call())\n";

    #[test]
    fn only_a_pip_console_script_is_warmed() {
        let dir = tempfile::tempdir().unwrap();
        let pip = script(dir.path(), "pip", PIP_SCRIPT);
        assert_eq!(
            interpreter(&pip).unwrap(),
            Some(vec![OsString::from("/opt/salt/bin/python3")])
        );
        let with_arg = script(
            dir.path(),
            "arg",
            &PIP_SCRIPT.replace("python3\n", "python3 -s\n"),
        );
        assert_eq!(
            interpreter(&with_arg).unwrap(),
            Some(vec!["/opt/salt/bin/python3".into(), "-s".into()])
        );
        let env = script(
            dir.path(),
            "env",
            &PIP_SCRIPT.replace("/opt/salt/bin/python3", "/usr/bin/env python3"),
        );
        assert_eq!(
            interpreter(&env).unwrap(),
            Some(vec!["/usr/bin/env".into(), "python3".into()])
        );
        // pip's shell launcher for a long interpreter path: the entry point is there, but the
        // program is sh. Cold, as are salt's onedir wrapper, a shell stand-in and a relative
        // interpreter.
        let launcher = script(
            dir.path(),
            "launcher",
            &PIP_SCRIPT.replace(
                "#!/opt/salt/bin/python3\n",
                "#!/bin/sh\n'''exec' \"/a long/bin/python3\" \"$0\" \"$@\"\n' '''\n",
            ),
        );
        assert_eq!(interpreter(&launcher).unwrap(), None);
        let onedir = script(
            dir.path(),
            "onedir",
            "#!/bin/sh\nexec /opt/saltstack/salt/bin/python3.10 /opt/saltstack/salt/salt-call \"$@\"\n",
        );
        assert_eq!(interpreter(&onedir).unwrap(), None);
        let relative = script(
            dir.path(),
            "rel",
            &PIP_SCRIPT.replace("/opt/salt/bin/python3", "python3"),
        );
        assert_eq!(interpreter(&relative).unwrap(), None);
        let binary = dir.path().join("elf");
        std::fs::write(&binary, b"\x7fELF\x02\x01\x01\0").unwrap();
        assert_eq!(interpreter(&binary).unwrap(), None);
        assert!(interpreter(&dir.path().join("missing")).is_err());
        assert!(WarmSaltCall::start(&onedir).is_none());
    }

    /// A stand-in "salt" package on a real python3: the shim imports it ahead, then runs its
    /// `salt_call` with the arguments handed over, output in the log, exit code passed through.
    fn fake_salt(dir: &Path) -> PathBuf {
        let pkg = dir.join("lib/salt");
        std::fs::create_dir_all(pkg.join("cli")).unwrap();
        std::fs::write(
            pkg.join("__init__.py"),
            "import os\nwith open(os.path.join(os.path.dirname(__file__), '..', '..', 'mark'), 'a') as f:\n    f.write('imported %d\\n' % os.getpid())\n",
        )
        .unwrap();
        std::fs::write(
            pkg.join("scripts.py"),
            "import sys\ndef salt_call():\n    print('salt-call', ' '.join(sys.argv[1:]))\n    print('stdin', repr(sys.stdin.read()), file=sys.stderr)\n    return int(sys.argv[-1])\n",
        )
        .unwrap();
        for m in [
            "cli/__init__",
            "cli/call",
            "cli/caller",
            "fileclient",
            "loader",
            "minion",
            "state",
        ] {
            std::fs::write(pkg.join(format!("{m}.py")), "").unwrap();
        }
        std::fs::create_dir_all(pkg.join("utils")).unwrap();
        std::fs::write(pkg.join("utils/__init__.py"), "").unwrap();
        std::fs::write(pkg.join("utils/templates.py"), "").unwrap();
        // The console script lives beside the package, as a venv's bin/ is on its own path.
        script(
            &dir.join("lib"),
            "salt-call",
            &PIP_SCRIPT.replace("/opt/salt/bin/python3", "/usr/bin/python3"),
        )
    }

    #[test]
    fn runs_salt_call_with_the_arguments_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let salt_call = fake_salt(dir.path());
        let mark = dir.path().join("mark");
        let warm = WarmSaltCall::start(&salt_call).expect("a pip console script is warmed");
        assert!(warm.serves(&salt_call));
        // Imported before the arguments exist.
        let t = Instant::now();
        let written = || std::fs::read_to_string(&mark).is_ok_and(|m| m.ends_with('\n'));
        while !written() && t.elapsed() < std::time::Duration::from_secs(20) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let imported = std::fs::read_to_string(&mark).unwrap();
        let log = dir.path().join("highstate.log");
        std::fs::write(&log, "").unwrap();
        let child = warm
            .go(
                &["--local".into(), "state.highstate".into(), "3".into()],
                &log,
            )
            .unwrap();
        let status = crate::process::wait_started(
            child,
            "python3",
            "salt-call",
            crate::process::Deadline::new(std::time::Duration::from_secs(20), "test"),
        )
        .unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "salt-call --local state.highstate 3\nstdin ''\n"
        );
        // One import, in the process that ran salt-call.
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), imported);
        assert_eq!(imported.lines().count(), 1);
    }

    #[test]
    fn an_unused_warm_salt_call_dies_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let salt_call = fake_salt(dir.path());
        let warm = WarmSaltCall::start(&salt_call).unwrap();
        let pid = warm.child.as_ref().unwrap().id() as i32;
        drop(warm);
        assert!(
            nix::sys::signal::kill(Pid::from_raw(pid), None).is_err(),
            "pid {pid} still exists"
        );
    }
}
