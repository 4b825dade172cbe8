//! The one way the agent runs a child process: git, `salt-call`, python/pip, curl,
//! salt-bootstrap, the trust-store tools and `systemctl` all come through [`run`] or
//! [`run_logged`]. The one exception, the warm salt-call ([`crate::salt::warm`]), is started
//! ahead in a process group of its own and handed to [`wait_started`] for its deadline.
//!
//! Every child runs with stdin closed, in a process group of its own, under a deadline. At the
//! deadline the whole group gets SIGKILL, so helpers the child started (git's ssh, the commands
//! of salt states, pip's compilers) die with it and the single-threaded resident loop never
//! blocks for good. Output is captured with a bounded tail, kept for error messages. The error
//! of a child killed at its deadline names what ran, the deadline and the setting that raises it.
//!
//! Secrets never go in argv (any local user can read `/proc/PID/cmdline`): that is the caller's
//! job, through the environment or a file.

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How much of stdout is kept: callers parse it (git rev-parse, systemctl show), it is small.
const STDOUT_KEEP: usize = 1024 * 1024;
/// How much of stderr is kept: only its tail ends up in an error message.
const STDERR_KEEP: usize = 64 * 1024;

/// How long a child may run, and the setting that says so (named in the error when it is killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub after: Duration,
    /// Where the user raises it, such as `[timeouts] git`.
    pub setting: &'static str,
}

impl Deadline {
    pub fn new(after: Duration, setting: &'static str) -> Self {
        Self { after, setting }
    }
}

/// What a child that finished in time left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    /// The last [`STDOUT_KEEP`] bytes of stdout.
    pub stdout: Vec<u8>,
    /// The last [`STDERR_KEEP`] bytes of stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    /// The last `n` non-empty lines of stderr, or of stdout when stderr is empty.
    pub fn tail(&self, n: usize) -> String {
        let err = tail_lines(&self.stderr, n);
        if err.is_empty() {
            tail_lines(&self.stdout, n)
        } else {
            err
        }
    }

    /// stdout as text, trimmed.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

/// The last `n` non-empty lines of a process's output, for error messages.
pub fn tail_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `exited 3` or `ended by signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(c) => format!("exited {c}"),
        None => format!("ended by {status}"),
    }
}

/// Runs `cmd` to completion or its deadline, capturing stdout and stderr. `what` says what it
/// does, for errors ("git fetch of URL"). Errs when it cannot start or is killed at the
/// deadline; a non-zero exit is the caller's to judge from [`Output::status`].
pub fn run(cmd: &mut Command, what: &str, deadline: Deadline) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    supervise(cmd, what, deadline, true)
}

/// Like [`run`], with stdout and stderr both going to `log` (salt-call's output can be large and
/// is kept on disk); the caller reads the log's tail for errors.
pub fn run_logged(
    cmd: &mut Command,
    what: &str,
    deadline: Deadline,
    log: File,
) -> Result<ExitStatus> {
    let err = log.try_clone().context("duplicating the log file")?;
    cmd.stdout(log).stderr(err);
    Ok(supervise(cmd, what, deadline, false)?.status)
}

/// One output pipe being drained into a bounded buffer.
struct Stream<R> {
    pipe: Option<R>,
    buf: Vec<u8>,
    keep: usize,
}

impl<R: Read> Stream<R> {
    fn new(pipe: Option<R>, keep: usize) -> Self {
        Self {
            pipe,
            buf: Vec::new(),
            keep,
        }
    }

    /// Reads what is there (poll said so); closes on end of file or error.
    fn drain(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 8192];
        match pipe.read(&mut chunk) {
            Ok(0) | Err(_) => self.pipe = None,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                if self.buf.len() > self.keep {
                    let cut = self.buf.len() - self.keep;
                    self.buf.drain(..cut);
                }
            }
        }
    }
}

fn supervise(cmd: &mut Command, what: &str, deadline: Deadline, captured: bool) -> Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    // Its own process group, so the deadline kills what the child started too.
    let child = cmd
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {program} for {what} (is it installed?)"))?;
    watch(child, &program, what, deadline, captured)
}

/// Like [`run_logged`], for a child started earlier in a process group of its own (a salt-call
/// warmed up ahead of its highstate, [`crate::salt::warm`]), whose output already goes to its
/// log. The deadline counts from now.
pub fn wait_started(
    child: Child,
    program: &str,
    what: &str,
    deadline: Deadline,
) -> Result<ExitStatus> {
    Ok(watch(child, program, what, deadline, false)?.status)
}

/// Waits for `child`, the leader of its own process group, until `deadline`; then kills the group.
fn watch(
    mut child: Child,
    program: &str,
    what: &str,
    deadline: Deadline,
    captured: bool,
) -> Result<Output> {
    let started = Instant::now();
    let end = started + deadline.after;
    let pgid = Pid::from_raw(child.id() as i32);
    tracing::debug!(program, pid = pgid.as_raw(), what, deadline = %humantime::format_duration(deadline.after), "started");
    let mut out = Stream::new(child.stdout.take(), STDOUT_KEEP);
    let mut err = Stream::new(child.stderr.take(), STDERR_KEEP);
    let mut status = None;
    // Short pauses first: most children are done in milliseconds.
    let mut pause = Duration::from_millis(1);
    loop {
        if status.is_none() {
            status = child
                .try_wait()
                .with_context(|| format!("waiting for {program}"))?;
        }
        let open = out.pipe.is_some() || err.pipe.is_some();
        if status.is_some() && !open {
            break;
        }
        let now = Instant::now();
        if now >= end {
            let _ = killpg(pgid, Signal::SIGKILL);
            if status.is_some() {
                // The child finished; what it left behind held our pipes until the deadline.
                tracing::warn!(
                    program,
                    what,
                    "processes left by the child were killed at the deadline"
                );
                break;
            }
            let _ = child.wait();
            let said = tail_lines(&err.buf, 5);
            let said = if said.is_empty() {
                tail_lines(&out.buf, 5)
            } else {
                said
            };
            bail!(
                "{what} did not finish within {}; killed it and its processes (pid {pgid}); raise {}{}",
                humantime::format_duration(deadline.after),
                deadline.setting,
                if captured && !said.is_empty() {
                    format!("; its last output: {}", said.replace('\n', " | "))
                } else {
                    String::new()
                }
            );
        }
        // With the child gone, wait on the pipes alone (until the deadline); otherwise check
        // the child again after a pause that grows to 50 ms.
        let slice = if status.is_some() {
            end - now
        } else {
            pause.min(end - now)
        };
        if open {
            let ready = {
                let mut fds = Vec::with_capacity(2);
                if let Some(p) = &out.pipe {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                }
                if let Some(p) = &err.pipe {
                    fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
                }
                let timeout = PollTimeout::try_from(slice.max(Duration::from_millis(1)))
                    .unwrap_or(PollTimeout::MAX);
                match poll(&mut fds, timeout) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("waiting for a child's output"),
                }
                let any = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
                let is = |f: &PollFd| f.revents().is_some_and(|r| r.intersects(any));
                let mut i = fds.iter();
                let o = out.pipe.is_some() && i.next().is_some_and(is);
                let e = err.pipe.is_some() && i.next().is_some_and(is);
                (o, e)
            };
            if ready.0 {
                out.drain();
            }
            if ready.1 {
                err.drain();
            }
            if out.pipe.is_none() && err.pipe.is_none() {
                // Both pipes closed: the child has exited or is about to; reap it promptly.
                pause = Duration::from_micros(200);
                continue;
            }
        } else {
            std::thread::sleep(slice);
        }
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    let status = status.expect("the loop ends with a status");
    tracing::debug!(program, what, ms = started.elapsed().as_millis() as u64, status = %describe(status), "finished");
    Ok(Output {
        status,
        stdout: if captured { out.buf } else { Vec::new() },
        stderr: err.buf,
    })
}

/// Test helpers: stand-in programs that hang.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    /// Writes an executable shell script `dir/name` with `body` after the shebang.
    pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A body that starts a grandchild which records its pid in `pidfile` and sleeps, then
    /// sleeps itself: proves the deadline kills the whole group, not just the child.
    pub fn hang_with_grandchild(pidfile: &Path) -> String {
        format!(
            "sh -c 'echo $$ > {}; exec sleep 60' &\nsleep 60",
            pidfile.display()
        )
    }

    /// Asserts the process whose pid is in `pidfile` is gone (reaped by init, or a zombie).
    pub fn assert_dead(pidfile: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let pid: i32 = loop {
            if let Some(p) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the grandchild never wrote {}",
                pidfile.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let gone = || {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => true,
                // State after the command name: Z (zombie) or X (dead) count as gone.
                Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| {
                    matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))
                }),
            }
        };
        while !gone() {
            assert!(
                std::time::Instant::now() < deadline,
                "grandchild {pid} survived the deadline"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A TCP server on loopback that accepts one connection and never answers (a hung git
    /// or HTTP server). Returns its port and a receiver that gets `()` once the client's end
    /// closes: the client was killed, nothing of it holds the connection any more.
    pub fn silent_server() -> (u16, std::sync::mpsc::Receiver<()>) {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            while !matches!(conn.read(&mut buf), Ok(0) | Err(_)) {}
            let _ = tx.send(());
        });
        (port, rx)
    }

    /// The path of a fresh pid file in `dir`.
    pub fn pidfile(dir: &Path) -> PathBuf {
        dir.join("grandchild.pid")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const D: Deadline = Deadline {
        after: Duration::from_secs(30),
        setting: "[timeouts] test",
    };

    #[test]
    fn captures_output_and_status() {
        let out = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            "a test",
            D,
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout_text(), "out");
        assert_eq!(out.tail(5), "err");
        assert_eq!(describe(out.status), "exited 3");
    }

    #[test]
    fn output_is_bounded_to_its_tail() {
        let out = run(
            Command::new("sh").args(["-c", "yes x | head -c 3000000; echo; echo last"]),
            "a test",
            D,
        )
        .unwrap();
        assert_eq!(out.stdout.len(), STDOUT_KEEP);
        assert!(out.stdout_text().ends_with("last"));
    }

    #[test]
    fn a_missing_program_says_so() {
        let e = run(&mut Command::new("/nonexistent/tool"), "a test", D).unwrap_err();
        assert!(
            format!("{e:#}").contains("starting /nonexistent/tool for a test"),
            "{e:#}"
        );
    }

    #[test]
    fn the_deadline_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pids = pidfile(dir.path());
        let hang = script(
            dir.path(),
            "hang",
            &format!("echo starting >&2\n{}", hang_with_grandchild(&pids)),
        );
        let started = Instant::now();
        let e = run(
            &mut Command::new(&hang),
            "the hang test",
            Deadline::new(Duration::from_millis(300), "[timeouts] test"),
        )
        .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let e = format!("{e:#}");
        assert!(
            e.contains("the hang test did not finish within 300ms; killed")
                && e.contains("raise [timeouts] test")
                && e.contains("starting"),
            "{e}"
        );
        assert_dead(&pids);
    }

    #[test]
    fn a_logged_child_is_killed_too() {
        let dir = tempfile::tempdir().unwrap();
        let pids = pidfile(dir.path());
        let hang = script(dir.path(), "hang", &hang_with_grandchild(&pids));
        let log = File::create(dir.path().join("log")).unwrap();
        let e = run_logged(
            &mut Command::new(&hang),
            "the logged test",
            Deadline::new(Duration::from_millis(300), "[x] y"),
            log,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("within 300ms; killed"), "{e:#}");
        assert_dead(&pids);
    }

    #[test]
    fn leftovers_holding_the_pipes_are_killed_at_the_deadline() {
        // The child exits at once; the grandchild keeps stdout open.
        let dir = tempfile::tempdir().unwrap();
        let pids = pidfile(dir.path());
        let started = Instant::now();
        let out = run(
            Command::new("sh").args([
                "-c",
                &format!(
                    "sh -c 'echo $$ > {}; exec sleep 60' & echo done",
                    pids.display()
                ),
            ]),
            "a test",
            Deadline::new(Duration::from_millis(500), "[x] y"),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout_text(), "done");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_dead(&pids);
    }

    #[test]
    fn a_quick_child_is_noticed_quickly() {
        let started = Instant::now();
        for _ in 0..20 {
            run(&mut Command::new("true"), "a test", D).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
