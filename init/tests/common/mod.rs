//! Helpers shared by the end-to-end tests: the built agent, real git repositories, real salt.
#![allow(dead_code)]

pub mod servers;
pub mod sync;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The folder holding the real `salt-call`; a missing salt fails the test, it never skips it.
pub fn salt_bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("STACKLESS_SALT_CALL") {
        return Path::new(&p).parent().unwrap().to_path_buf();
    }
    let venv = repo_root().join(".venv/bin");
    if venv.join("salt-call").exists() {
        return venv;
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("salt-call").exists() {
                return dir;
            }
        }
    }
    panic!("salt-call not found: run scripts/install-test-deps.sh (or scripts/test.sh), or set STACKLESS_SALT_CALL");
}

/// PATH with the real salt first.
pub fn test_path() -> String {
    format!(
        "{}:{}",
        salt_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs the built `stackless-init` with `--root root` against an IMDS endpoint.
pub fn init(root: &Path, endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stackless-init"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
        .env("PATH", test_path())
        .env_remove("STACKLESS_ROOT")
        .env_remove("RUST_LOG")
        .output()
        .expect("running stackless-init")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `status --json` of a root.
pub fn status(root: &Path) -> serde_json::Value {
    let o = init(root, "http://127.0.0.1:9", &["status", "--json"]);
    assert!(o.status.success(), "status failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("status --json is JSON")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .expect("running git");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A real bare repository with a work clone to commit from.
pub struct GitRepo {
    pub bare: PathBuf,
    work: PathBuf,
}

impl GitRepo {
    pub fn new(parent: &Path, name: &str) -> GitRepo {
        let bare = parent.join(format!("{name}.git"));
        let work = parent.join(format!("{name}-work"));
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        GitRepo { bare, work }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Writes files (path, content), commits, pushes; returns the commit sha.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (path, content) in files {
            let p = self.work.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", message]);
        git(&self.work, &["push", "-q", "origin", "main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    /// Moves `main` back to `sha` and force-pushes it, as someone undoing commits would.
    pub fn force_back(&self, sha: &str) {
        git(&self.work, &["reset", "-q", "--hard", sha]);
        git(&self.work, &["push", "-q", "--force", "origin", "main"]);
    }
}

/// Polls `cond` every 50 ms until it holds or `secs` pass; panics with `what` on timeout.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(secs) {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("timed out after {secs} s waiting for {what}");
}

/// [`wait_for`], with the agent's log in the panic message.
pub fn wait_for_agent(agent: &Agent, what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(secs) {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!(
        "timed out after {secs} s waiting for {what}; the agent's log:\n{}",
        agent.log()
    );
}

/// The real supervisord, with programs of our own, on a unix socket in a temporary folder.
pub struct Supervisord {
    child: std::process::Child,
    pub dir: PathBuf,
    programs: Vec<String>,
}

impl Supervisord {
    /// `programs`: (name, command). Each gets `conf.d/NAME.conf` with startsecs=0.
    pub fn start(dir: &Path, programs: &[(&str, &str)]) -> Supervisord {
        let conf_d = dir.join("conf.d");
        std::fs::create_dir_all(&conf_d).unwrap();
        for (name, command) in programs {
            std::fs::write(
                conf_d.join(format!("{name}.conf")),
                program_conf(name, command),
            )
            .unwrap();
        }
        let conf = dir.join("supervisord.conf");
        std::fs::write(
            &conf,
            format!(
                "[unix_http_server]\nfile={d}/supervisor.sock\n\n[rpcinterface:supervisor]\n\
                 supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
                 [supervisord]\nnodaemon=true\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\n\
                 childlogdir={d}\n\n[supervisorctl]\nserverurl=unix://{d}/supervisor.sock\n\n\
                 [include]\nfiles = {d}/conf.d/*.conf\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut s = Supervisord {
            child: Supervisord::spawn_daemon(dir),
            dir: dir.to_path_buf(),
            programs: programs.iter().map(|(n, _)| n.to_string()).collect(),
        };
        s.wait_up();
        s
    }

    fn spawn_daemon(dir: &Path) -> std::process::Child {
        Command::new(salt_bin_dir().join("supervisord"))
            .arg("-c")
            .arg(dir.join("supervisord.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting supervisord (scripts/install-test-deps.sh installs it)")
    }

    /// Waits until supervisord answers and every program runs.
    fn wait_up(&mut self) {
        let client = self.client();
        let n = self.programs.len();
        wait_for("supervisord to answer", 20, || {
            client
                .all_process_info()
                .map(|v| v.len() == n)
                .unwrap_or(false)
        });
        for name in &self.programs {
            wait_for(&format!("{name} to run"), 20, || {
                client
                    .process_info(name)
                    .map(|i| i.pid != 0)
                    .unwrap_or(false)
            });
        }
    }

    /// The daemon's own pid (to stop it with SIGSTOP, as a hang).
    pub fn daemon_pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Stops supervisord (SIGTERM, as `systemctl stop` would) and waits for it to be gone.
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    /// Starts supervisord again after `stop`, and waits until its programs run.
    pub fn start_again(&mut self) {
        self.child = Supervisord::spawn_daemon(&self.dir);
        self.wait_up();
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("supervisor.sock")
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("conf.d")
    }

    pub fn client(&self) -> stackless_init::supervisor::Supervisor {
        stackless_init::supervisor::Supervisor::new(
            self.socket(),
            std::time::Duration::from_secs(30),
        )
    }

    pub fn pid(&self, name: &str) -> u32 {
        let info = self.client().process_info(name).expect("process info");
        assert_eq!(
            info.state,
            stackless_init::supervisor::ProcessState::Running,
            "{info:?}"
        );
        info.pid
    }
}

pub fn program_conf(name: &str, command: &str) -> String {
    format!(
        "[program:{name}]\ncommand={command}\nstartsecs=0\nautorestart=false\nstopwaitsecs=5\nstopasgroup=true\nkillasgroup=true\n"
    )
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// `stackless-init boot` left resident; stopped with SIGTERM when dropped.
pub struct Agent {
    pub child: std::process::Child,
    pub root: PathBuf,
}

impl Agent {
    pub fn spawn(root: &Path, endpoint: &str) -> Agent {
        Agent::spawn_with_path(root, endpoint, &test_path())
    }

    /// With its own PATH (tests put wrappers of git or salt-call first).
    pub fn spawn_with_path(root: &Path, endpoint: &str, path: &str) -> Agent {
        std::fs::create_dir_all(root).unwrap();
        // As a reboot empties /run: a ready marker left by an agent the test killed would let
        // `wait` answer for the new one before it has even blocked its signals.
        let _ = std::fs::remove_file(root.join("run/stackless/ready"));
        let log = std::fs::File::create(root.with_extension("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stackless-init"))
            .arg("--root")
            .arg(root)
            .arg("-v")
            .arg("boot")
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)
            .env("PATH", path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting stackless-init");
        Agent {
            child,
            root: root.to_path_buf(),
        }
    }

    /// `stackless-init wait`: the exit code.
    pub fn wait_ready(&self, secs: u64) -> i32 {
        let o = Command::new(env!("CARGO_BIN_EXE_stackless-init"))
            .arg("--root")
            .arg(&self.root)
            .args(["wait", "--timeout", &secs.to_string()])
            .output()
            .unwrap();
        o.status.code().unwrap_or(-1)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.with_extension("agent.log")).unwrap_or_default()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// A counter from `status --json`: watch.programs.NAME.FIELD (0 when absent).
pub fn program_count(root: &Path, name: &str, field: &str) -> u64 {
    status(root)["watch"]["programs"][name][field]
        .as_u64()
        .unwrap_or(0)
}

/// Replaces a file the way salt, editors and git do: a temporary file, then rename over.
pub fn write_by_rename(path: &Path, content: &str) {
    let tmp = path
        .parent()
        .unwrap()
        .join(format!("__salt.tmp.{}", std::process::id()));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
