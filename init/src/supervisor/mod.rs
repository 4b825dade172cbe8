//! supervisord, driven through its XML-RPC interface on its unix socket: no `supervisorctl`
//! process per restart.
//!
//! [`xmlrpc`] is a minimal XML-RPC encoder and decoder (no XML crate); [`client`] speaks
//! HTTP/1.1 over a fresh `UnixStream` per call with a deadline per call, and builds
//! `supervisorctl`'s verbs on top: restart (one program or `group:*`), signal, and update
//! (re-read the configuration; stop, remove and re-add what changed).

pub mod client;
pub mod xmlrpc;

pub use client::{ProcessInfo, ProcessState, Supervisor, SupervisorError, UpdateReport};

#[cfg(test)]
mod tests;

/// A real supervisord for tests: `STACKLESS_SUPERVISORD`, else `supervisord` on `PATH`, else
/// the repository's `.venv/bin/supervisord`. Tests fail, never skip, without it.
#[cfg(test)]
pub(crate) mod test_support {
    use super::{ProcessInfo, ProcessState, Supervisor};
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub fn supervisord_bin() -> PathBuf {
        if let Some(p) = std::env::var_os("STACKLESS_SUPERVISORD") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "STACKLESS_SUPERVISORD={} does not exist",
                p.display()
            );
            return p;
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let c = dir.join("supervisord");
                if c.is_file() {
                    return c;
                }
            }
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/supervisord");
        if venv.is_file() {
            return venv;
        }
        panic!(
            "these tests need the real supervisord (PyPI `supervisor`): set STACKLESS_SUPERVISORD, \
             put supervisord on PATH, or install it into {} (scripts/test.sh does)",
            venv.display()
        );
    }

    /// A `[program:NAME]` section: `startsecs=0`, `autorestart=false`, logs in `dir`, quick and
    /// whole-process-group stops; `extra` lines (`key=value`, one a line) come last and win.
    pub fn program_conf(dir: &Path, name: &str, command: &str, extra: &str) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "[program:{name}]\ncommand={command}\nstartsecs=0\nautorestart=false\n\
             stopwaitsecs=5\nstopasgroup=true\nkillasgroup=true\n\
             stdout_logfile={dir}/{name}.out.log\nstderr_logfile={dir}/{name}.err.log\n",
            dir = dir.display()
        );
        for line in extra.lines().map(str::trim).filter(|l| !l.is_empty()) {
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    /// A supervisord child process with its own configuration, socket and logs under `dir`;
    /// killed (TERM, then KILL) on drop.
    pub struct Supervisord {
        child: Child,
        dir: PathBuf,
    }

    impl Supervisord {
        /// One `conf.d/NAME.conf` per `(name, command)` program, from [`program_conf`].
        pub fn start(dir: &Path, programs: &[(&str, &str)]) -> Supervisord {
            let confs: Vec<(String, String)> = programs
                .iter()
                .map(|(n, c)| (n.to_string(), program_conf(dir, n, c, "")))
                .collect();
            let refs: Vec<(&str, &str)> = confs
                .iter()
                .map(|(n, c)| (n.as_str(), c.as_str()))
                .collect();
            Supervisord::start_with_confs(dir, &refs)
        }

        /// One `conf.d/STEM.conf` per `(stem, text)`: for groups and special settings.
        pub fn start_with_confs(dir: &Path, confs: &[(&str, &str)]) -> Supervisord {
            let dir = dir.to_path_buf();
            let socket = dir.join("supervisor.sock");
            assert!(
                socket.as_os_str().len() < 100,
                "{} is too long for a unix socket; use a shorter TMPDIR",
                socket.display()
            );
            let conf_dir = dir.join("conf.d");
            std::fs::create_dir_all(&conf_dir).expect("creating conf.d");
            for (stem, text) in confs {
                std::fs::write(conf_dir.join(format!("{stem}.conf")), text)
                    .expect("writing a program configuration");
            }
            let main = format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\nchmod=0700\n\n\
                 [rpcinterface:supervisor]\n\
                 supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisord]\nnodaemon=true\nuser=root\nlogfile={d}/supervisord.log\n\
                 pidfile={d}/supervisord.pid\nchildlogdir={d}\nloglevel=debug\n\n\
                 [supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
                 [include]\nfiles = {d}/conf.d/*.conf\n",
                d = dir.display()
            );
            // `user=root` only silences a warning when running as root; elsewhere drop it.
            let main = if nix::unistd::geteuid().is_root() {
                main
            } else {
                main.replace("user=root\n", "")
            };
            let conf = dir.join("supervisord.conf");
            std::fs::write(&conf, main).expect("writing supervisord.conf");
            let console = std::fs::File::create(dir.join("supervisord.console.log"))
                .expect("creating the console log");
            let child = Command::new(supervisord_bin())
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(console.try_clone().expect("console log"))
                .stderr(console)
                .spawn()
                .expect("starting supervisord");
            let mut sv = Supervisord { child, dir };
            sv.wait_ready();
            sv
        }

        fn wait_ready(&mut self) {
            let client = Supervisor::new(self.socket(), Duration::from_secs(2));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!(
                        "supervisord exited ({status}) before answering:\n{}",
                        self.logs()
                    );
                }
                if let Ok(v) = client.call("supervisor.getState", &[]) {
                    if v.get("statename").and_then(|s| s.as_str()) == Some("RUNNING") {
                        return;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "supervisord did not answer on {} within 30s:\n{}",
                    self.socket().display(),
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        pub fn dir(&self) -> &Path {
            &self.dir
        }

        pub fn socket(&self) -> PathBuf {
            self.dir.join("supervisor.sock")
        }

        pub fn conf_dir(&self) -> PathBuf {
            self.dir.join("conf.d")
        }

        /// A client with a generous per-call timeout.
        pub fn client(&self) -> Supervisor {
            Supervisor::new(self.socket(), Duration::from_secs(30))
        }

        /// Write (or replace) `conf.d/STEM.conf`.
        pub fn write_conf(&self, stem: &str, text: &str) {
            std::fs::write(self.conf_dir().join(format!("{stem}.conf")), text)
                .expect("writing a program configuration");
        }

        pub fn remove_conf(&self, stem: &str) {
            std::fs::remove_file(self.conf_dir().join(format!("{stem}.conf")))
                .expect("removing a program configuration");
        }

        /// supervisord's console and log, for assertion messages.
        pub fn logs(&self) -> String {
            let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            format!(
                "--- console\n{}--- supervisord.log\n{}",
                read("supervisord.console.log"),
                read("supervisord.log")
            )
        }

        /// Poll `name` until its state is one of `states` (30 s at most).
        pub fn wait_state(&self, name: &str, states: &[ProcessState]) -> ProcessInfo {
            let client = self.client();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let info = client.process_info(name);
                if let Ok(info) = &info {
                    if states.contains(&info.state) {
                        return info.clone();
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} did not reach {states:?} within 30s (last: {info:?})\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Supervisord {
        fn drop(&mut self) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            // TERM lets supervisord stop its programs first; KILL if it hangs.
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
