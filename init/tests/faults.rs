//! Fault injection in numbers (issue 19): each test throws one fault at the real agent many times
//! at random points (`STACKLESS_FAULTS_ROUNDS`, a few by default) and counts what was lost.
//! `scripts/faults.sh` runs them with more rounds and renders `docs/reliability.md`.
//!
//! Real parts: the built agent, real git, real salt-call, real supervisord, the IMDS emulator.

mod common;

use common::sync::*;
use common::*;
use stackless_init::imds::emulator::{Emulator, EmulatorConfig};
use stackless_init::imds::Identity;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::faults::{rounds, Rng, Tally};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Every process below `root` (children, grandchildren...), read from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The command name is in parentheses and may hold spaces: fields after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// SIGKILL of the agent and everything it started, as a service manager stopping the unit (or
/// the kernel's OOM killer taking the cgroup) would: stopped first, so nothing forks meanwhile.
fn kill_whole(agent: &mut Agent) {
    let pid = agent.child.id() as i32;
    let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
    let mut all = Vec::new();
    loop {
        let found: Vec<i32> = descendants(pid)
            .into_iter()
            .filter(|p| !all.contains(p))
            .collect();
        if found.is_empty() {
            break;
        }
        for p in &found {
            let _ = kill(Pid::from_raw(*p), Signal::SIGSTOP);
        }
        all.extend(found);
    }
    for p in std::iter::once(pid).chain(all) {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let _ = agent.child.wait();
}

fn alive(pid: i32) -> bool {
    // A zombie has been killed; only a process still running counts.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// `state.json` parses (or does not exist yet); what is wrong otherwise.
fn state_record(root: &Path) -> Result<serde_json::Value, String> {
    let path = root.join("var/lib/stackless/state.json");
    let text = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Releases still being made (`.NAME` folders) that nothing will finish.
fn half_made(current: &Path) -> Vec<String> {
    fs::read_dir(current.parent().unwrap().join("releases"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

fn published(current: &Path, sha: &str) -> bool {
    fs::read_link(current).is_ok_and(|t| t.ends_with(sha))
}

/// Pseudo-random letters, so a fetch moves real bytes and takes a moment.
fn blob(rng: &mut Rng, len: usize) -> String {
    (0..len)
        .map(|_| (b'a' + (rng.next_u64() % 26) as u8) as char)
        .collect()
}

/// A folder of wrappers around the real `git` and `salt-call` that touch `MARK.start` and
/// `MARK.done` around each fetch and each highstate; the PATH that puts them first.
fn marking_wrappers(bin: &Path, marks: &Path) -> String {
    fs::create_dir_all(bin).unwrap();
    let real_git = real_git();
    let wrap = |name: &str, real: &str, when: &str, mark: &str| {
        let m = marks.join(mark);
        fs::write(
            bin.join(name),
            format!(
                "#!/bin/sh\ncase \" $* \" in *\"{when}\"*) touch {m}.start; {real} \"$@\"; rc=$?; touch {m}.done; exit $rc;; esac\nexec {real} \"$@\"\n",
                m = m.display()
            ),
        )
        .unwrap();
        fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    };
    wrap("git", &real_git, " fetch ", "fetch");
    let salt = salt_bin_dir().join("salt-call");
    wrap("salt-call", salt.to_str().unwrap(), "", "highstate");
    format!("{}:{}", bin.display(), test_path())
}

/// SIGKILL of the resident agent, with git and salt-call under it, at random moments of each
/// phase of a sync: in a fetch, just after it (making and publishing the release), in the
/// highstate, and just after it (the state write). Then a fresh start. Counted: `current` not a
/// whole release, `state.json` not parsing, half-made releases left, and a next start that does
/// not converge.
#[test]
fn sigkill_at_random_moments_of_a_sync() {
    let n = rounds(4);
    let mut rng = Rng::new("sigkill mid-sync");
    let mut t = Tally::new(
        "agent killed (SIGKILL) mid-sync, then started again",
        &["releases", "records", "convergence", "leftovers"],
    );
    let s = Setup::new(&[]);
    let salt = GitRepo::new(&s.path("git"), "salt");
    let config = GitRepo::new(&s.path("git"), "config");
    let marker = s.path("out/marker");
    commit_files(&salt, &salt_state(&marker, "0"), "0");
    config.commit(&[("app/a.conf", "a=0\n")], "0");
    let ud = repo_user_data(&s, Some(&salt), Some(&config), "");
    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(ud.into_bytes()))
            .unwrap();
    let marks = s.path("marks");
    fs::create_dir_all(&marks).unwrap();
    let path = marking_wrappers(&s.path("bin"), &marks);
    let salt_current = s.root().join("var/lib/stackless/repos/salt/current");
    let config_current = s.root().join("var/lib/stackless/repos/config/current");
    let mut agent = Agent::spawn_with_path(&s.root(), &imds.endpoint(), &path);
    assert_eq!(agent.wait_ready(120), 0, "{}", agent.log());
    // (phase, the mark that starts it, how far into it the kill may land)
    let phases: [(&str, &str, u64); 4] = [
        ("in a fetch", "fetch.start", 80),
        ("making and publishing a release", "fetch.done", 40),
        ("in the highstate", "highstate.start", 1500),
        ("writing the state", "highstate.done", 30),
    ];

    for round in 1..=n {
        for e in fs::read_dir(&marks).unwrap().flatten() {
            let _ = fs::remove_file(e.path());
        }
        let (phase, mark, spread) = *rng.pick(&phases);
        let value = round.to_string();
        let big = blob(&mut rng, 400_000);
        let salt_sha = commit_files(&salt, &salt_state(&marker, &value), &value);
        let config_sha = config.commit(
            &[
                ("app/a.conf", &format!("a={round}\n")),
                (&format!("big/{round}.bin"), &big),
            ],
            &value,
        );
        wait_for_agent(&agent, &format!("the sync to reach {mark}"), 60, || {
            marks.join(mark).exists()
        });
        std::thread::sleep(Duration::from_millis(rng.range(0, spread)));
        kill_whole(&mut agent);

        let record = state_record(&s.root());
        let mut losses = Vec::new();
        for (current, repo) in [(&salt_current, &salt), (&config_current, &config)] {
            if let Err(e) = whole_release(current, repo) {
                losses.push(("releases", 1, e));
            }
        }
        if let Err(e) = &record {
            losses.push(("records", 1, e.clone()));
        }

        agent = Agent::spawn_with_path(&s.root(), &imds.endpoint(), &path);
        let ready = agent.wait_ready(120);
        let converged = ready == 0 && {
            within(60, || {
                published(&salt_current, &salt_sha)
                    && published(&config_current, &config_sha)
                    && state_record(&s.root())
                        .is_ok_and(|r| r["highstate"]["commit"] == salt_sha.as_str())
                    && fs::read_to_string(&marker).is_ok_and(|m| m.trim() == value)
            })
        };
        if !converged {
            losses.push((
                "convergence",
                1,
                format!("wait said {ready}; agent log:\n{}", agent.log()),
            ));
        }
        let left = [&salt_current, &config_current]
            .iter()
            .flat_map(|c| half_made(c))
            .collect::<Vec<_>>();
        if !left.is_empty() {
            losses.push(("leftovers", left.len() as u64, format!("{left:?}")));
        }
        t.round(phase, &losses);
    }
    t.finish();
}

/// A `salt-call` that hangs on some runs (a wrapper in PATH before the real one): the agent kills
/// it whole at `[salt] timeout`, records the failure, and carries on to converge on a later
/// highstate. Counted: hung processes left alive past the deadline, and an agent that stopped.
#[test]
fn a_hanging_salt_call_is_killed_at_its_deadline_and_the_agent_carries_on() {
    let n = rounds(3);
    let mut rng = Rng::new("hanging salt-call");
    let mut t = Tally::new(
        "`salt-call` hangs",
        &["processes", "convergence", "records"],
    );
    let s = Setup::new(&[]);
    let salt = GitRepo::new(&s.path("git"), "salt");
    let marker = s.path("out/marker");
    commit_files(&salt, &salt_state(&marker, "0"), "0");
    let bin = s.path("bin");
    fs::create_dir_all(&bin).unwrap();
    let hang = s.path("hang");
    let hung_pid = s.path("hung-pid");
    // While the `hang` file exists, salt-call (and a grandchild, as salt's own would be) sleeps.
    fs::write(
        bin.join("salt-call"),
        format!(
            "#!/bin/sh\nif [ -e {hang} ]; then sleep 1000 & echo $! > {pid}; wait; fi\nexec {real}/salt-call \"$@\"\n",
            hang = hang.display(),
            pid = hung_pid.display(),
            real = salt_bin_dir().display()
        ),
    )
    .unwrap();
    fs::set_permissions(bin.join("salt-call"), fs::Permissions::from_mode(0o755)).unwrap();
    let ud = format!(
        "{}\n[salt]\nrepo = \"{}\"\ntimeout = \"2s\"\n",
        repo_user_data(&s, None, None, ""),
        salt.url()
    );
    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(ud.into_bytes()))
            .unwrap();
    let path = format!("{}:{}", bin.display(), test_path());
    let agent = Agent::spawn_with_path(&s.root(), &imds.endpoint(), &path);
    assert_eq!(agent.wait_ready(120), 0, "{}", agent.log());

    for round in 1..=n {
        let value = round.to_string();
        // Hang now, or only once the run has begun (both a hang at start and one mid-run).
        let _ = fs::remove_file(&hung_pid);
        fs::write(&hang, "").unwrap();
        let sha = commit_files(&salt, &salt_state(&marker, &value), &value);
        wait_for("the hanging salt-call", 30, || hung_pid.exists());
        let pid: i32 = fs::read_to_string(&hung_pid)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let hung_at = Instant::now();
        // Lift the hang at a random moment: before or after the deadline.
        std::thread::sleep(Duration::from_millis(rng.range(0, 3000)));
        let _ = fs::remove_file(&hang);
        let mut losses = Vec::new();
        // The deadline is 2 s; the kill takes at most the agent's grace on top.
        let limit = Duration::from_secs(10);
        while alive(pid) && hung_at.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            losses.push((
                "processes",
                1,
                format!("pid {pid} alive {limit:?} after it hung"),
            ));
        }
        let converged = within(60, || {
            state_record(&s.root()).is_ok_and(|r| {
                r["highstate"]["commit"] == sha.as_str() && r["highstate"]["ok"] == true
            }) && fs::read_to_string(&marker).is_ok_and(|m| m.trim() == value)
        });
        if !converged {
            losses.push(("convergence", 1, agent.log()));
        }
        let log = agent.log();
        if !log.contains("timeout") && !log.contains("deadline") {
            losses.push((
                "records",
                1,
                "the log never says a highstate timed out".into(),
            ));
        }
        t.round("highstate", &losses);
    }
    t.finish();
}

/// IMDS misbehaving during boot, one way per round: flapping between 500 (or 503) and 200,
/// tokens that expire after a use or two, answers slowed down, or answers cut off mid-body with
/// the connection closed. `boot --once` finishes inside its deadline, or fails naming IMDS.
/// Counted: boots that took longer than their deadline, or failed without saying why.
#[test]
fn a_misbehaving_imds_during_boot() {
    let n = rounds(6);
    let mut rng = Rng::new("misbehaving IMDS");
    let mut t = Tally::new(
        "IMDS flaps 500/200, expires tokens early, answers slowly or cuts answers",
        &["boots"],
    );
    let s = Setup::new(&[]);
    let ud = s.user_data("");
    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(ud.into_bytes()))
            .unwrap();
    for _ in 1..=n {
        let fault = *rng.pick(&["flaps", "expires tokens", "slow", "cuts answers"]);
        match fault {
            "flaps" => imds.fail_next(rng.range(1, 12) as usize, *rng.pick(&[500u16, 503])),
            "expires tokens" => imds.set_token_max_uses(Some(rng.range(1, 3) as usize)),
            "slow" => imds.set_delay(Duration::from_millis(rng.range(100, 1500))),
            _ => imds.cut_next(rng.range(1, 6) as usize),
        }
        let _ = fs::remove_dir_all(s.root().join("run"));
        let began = Instant::now();
        let o = init(&s.root(), &imds.endpoint(), &["boot", "--once"]);
        let took = began.elapsed();
        imds.fail_next(0, 500);
        imds.set_token_max_uses(None);
        imds.set_delay(Duration::ZERO);
        imds.cut_next(0);
        let err = stderr(&o);
        let mut losses = Vec::new();
        if took > Duration::from_secs(120) {
            losses.push(("boots", 1, format!("took {took:?}")));
        } else if !o.status.success() && !err.to_lowercase().contains("imds") {
            losses.push(("boots", 1, format!("failed without naming IMDS: {err}")));
        }
        let landed = format!(
            "{fault}, {}",
            if o.status.success() {
                "booted"
            } else {
                "failed naming IMDS"
            }
        );
        t.round(&landed, &losses);
    }
    t.finish();
}

/// A child in a process group of its own, killed whole (group and all) when dropped.
struct WholeGroup(std::process::Child);

impl Drop for WholeGroup {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(-(self.0.id() as i32)), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// What the proxy in front of the git server does to the next connections.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Wire {
    Pass,
    /// The server dies mid-answer: the connection is cut after this many bytes of it.
    CutAfter(usize),
    /// The server answers garbage.
    Garbage,
}

/// A TCP proxy in front of `git daemon`, which breaks connections as told; counts connections.
struct FaultyGitServer {
    port: u16,
    wire: std::sync::Arc<std::sync::Mutex<Wire>>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _daemon: WholeGroup,
}

impl FaultyGitServer {
    fn start(base: &Path) -> FaultyGitServer {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let daemon_port = servers::free_port();
        let mut child = std::process::Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
                &format!("--port={daemon_port}"),
                &format!("--base-path={}", base.display()),
            ])
            .arg(base)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // `git daemon` runs `git-daemon` as a child: the group ends both.
            .process_group(0)
            .spawn()
            .expect("git daemon");
        servers::wait_listening(daemon_port, &mut child, "git daemon");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let wire = std::sync::Arc::new(std::sync::Mutex::new(Wire::Pass));
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (w, c) = (wire.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let mode = *w.lock().unwrap();
                std::thread::spawn(move || {
                    let mut client = client;
                    if mode == Wire::Garbage {
                        let mut req = [0u8; 512];
                        let _ = client.read(&mut req);
                        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
                        let _ = client.write_all(&junk);
                        return;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", daemon_port)) else {
                        return;
                    };
                    let (mut s_read, mut c_write) =
                        (server.try_clone().unwrap(), client.try_clone().unwrap());
                    let (mut c_read, mut s_write) = (client, server);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c_read, &mut s_write);
                        let _ = s_write.shutdown(std::net::Shutdown::Write);
                    });
                    let limit = match mode {
                        Wire::CutAfter(n) => n,
                        _ => usize::MAX,
                    };
                    let mut sent = 0;
                    let mut buf = [0u8; 8192];
                    while sent < limit {
                        let Ok(k) = s_read.read(&mut buf) else { break };
                        if k == 0 {
                            break;
                        }
                        let k = k.min(limit - sent);
                        if c_write.write_all(&buf[..k]).is_err() {
                            break;
                        }
                        sent += k;
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                    let _ = s_read.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        FaultyGitServer {
            port,
            wire,
            connections,
            _daemon: WholeGroup(child),
        }
    }

    fn url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.port)
    }

    fn set(&self, wire: Wire) {
        *self.wire.lock().unwrap() = wire;
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A git server that dies mid-fetch, answers garbage, or has its branch force-pushed backwards,
/// under the resident agent's scheduled syncs. The last good release stays published through the
/// fault; once the server is sound again the agent converges on its tip, and a force-push is
/// published as the new tip and said so in the log.
#[test]
fn a_faulty_git_server_under_scheduled_syncs() {
    let n = rounds(4);
    let mut rng = Rng::new("faulty git server");
    let mut t = Tally::new(
        "git server dies mid-fetch, answers garbage, or is force-pushed back",
        &["releases", "convergence", "records"],
    );
    let s = Setup::new(&[]);
    let config = GitRepo::new(&s.path("git"), "config");
    let mut previous = config.commit(&[("app/a.conf", "a=0\n")], "0");
    let server = FaultyGitServer::start(&s.path("git"));
    let ud = format!(
        "{}\n[config]\nrepo = \"{}\"\n",
        repo_user_data(&s, None, None, ""),
        server.url("config.git")
    );
    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(ud.into_bytes()))
            .unwrap();
    let current = s.root().join("var/lib/stackless/repos/config/current");
    let agent = Agent::spawn(&s.root(), &imds.endpoint());
    assert_eq!(agent.wait_ready(120), 0, "{}", agent.log());

    for round in 1..=n {
        let mut losses = Vec::new();
        let before = fs::read_link(&current).unwrap();
        let fault = *rng.pick(&["dies mid-fetch", "answers garbage", "force-pushed back"]);
        let tip = if fault == "force-pushed back" {
            // A commit first, then the branch moved back to the one before it.
            let ahead = config.commit(&[("app/a.conf", &format!("a={round}\n"))], "ahead");
            wait_for("the commit published", 30, || published(&current, &ahead));
            let log_len = agent.log().len();
            config.force_back(&previous);
            wait_for_tip(&current, &previous, &agent, &mut losses);
            if !agent.log()[log_len..].contains("went back to a commit published before") {
                losses.push((
                    "records",
                    1,
                    "the force-push was not said in the log".into(),
                ));
            }
            previous.clone()
        } else {
            let big = blob(&mut rng, 200_000);
            let tip = config.commit(
                &[("app/a.conf", &format!("a={round}\n")), ("big.bin", &big)],
                &round.to_string(),
            );
            server.set(if fault == "dies mid-fetch" {
                Wire::CutAfter(rng.range(1, 120_000) as usize)
            } else {
                Wire::Garbage
            });
            // Three syncs' worth of connections under the fault.
            let seen = server.connections();
            wait_for("syncs against the faulty server", 30, || {
                server.connections() >= seen + 3
            });
            match whole_release(&current, &config) {
                Err(e) => losses.push(("releases", 1, e)),
                Ok(sha) if !before.ends_with(&sha) && sha != tip => losses.push((
                    "releases",
                    1,
                    format!("{sha} published, neither the last good nor the tip"),
                )),
                Ok(_) => {}
            }
            server.set(Wire::Pass);
            wait_for_tip(&current, &tip, &agent, &mut losses);
            tip
        };
        if let Err(e) = whole_release(&current, &config) {
            losses.push(("releases", 1, e));
        }
        previous = tip;
        t.round(fault, &losses);
    }
    t.finish();
}

/// Waits up to 30 s for `current` to hold `tip`; a convergence loss otherwise.
fn wait_for_tip(current: &Path, tip: &str, agent: &Agent, losses: &mut Vec<(&str, u64, String)>) {
    if !within(30, || published(current, tip)) {
        losses.push((
            "convergence",
            1,
            format!("{tip} not published: {}", agent.log()),
        ));
    }
}

/// Whether `cond` comes to hold within `secs` (polled every 100 ms). Unlike `wait_for`, a
/// timeout is an outcome to count, not a panic.
fn within(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// supervisord stopped, restarted, or hung (SIGSTOP) while a watched file changes and the agent
/// restarts its program: the restart is retried until supervisord is back, never lost, and made
/// once. Counted: restarts lost (the change never reached the program), and restarts made twice.
#[test]
fn supervisord_stopped_restarted_or_hung_while_the_agent_acts() {
    let n = rounds(4);
    let mut rng = Rng::new("supervisord faults");
    let mut t = Tally::new(
        "supervisord stopped, restarted or hung (SIGSTOP) while the agent acts",
        &["restarts", "extra"],
    );
    let mut s = Setup::new(&[("app", "sleep 1000")]);
    let conf = s.path("app/app.conf");
    fs::write(&conf, "v=0\n").unwrap();
    let rule = format!(
        "\n[[watch]]\npaths = [\"{}\"]\nrestart = [\"app\"]\n",
        conf.display()
    );
    let (_imds, agent) = s.boot(&s.user_data(&rule));
    let stop_the_daemon = |s: &Setup, sig| {
        let _ = kill(Pid::from_raw(s.sup.daemon_pid()), sig);
    };

    for round in 1..=n {
        let before = program_count(&s.root(), "app", "restarts");
        let fault = *rng.pick(&["stopped", "restarted", "hung"]);
        let outage = Duration::from_millis(rng.range(0, 3000));
        match fault {
            "stopped" => {
                s.sup.stop();
                fs::write(&conf, format!("v={round}\n")).unwrap();
                std::thread::sleep(outage);
                s.sup.start_again();
            }
            "restarted" => {
                fs::write(&conf, format!("v={round}\n")).unwrap();
                // Around the moment the agent calls: it acts a few milliseconds after the write.
                std::thread::sleep(Duration::from_millis(rng.range(0, 40)));
                s.sup.stop();
                s.sup.start_again();
            }
            _ => {
                stop_the_daemon(&s, Signal::SIGSTOP);
                fs::write(&conf, format!("v={round}\n")).unwrap();
                std::thread::sleep(outage);
                stop_the_daemon(&s, Signal::SIGCONT);
            }
        }
        let mut losses = Vec::new();
        within(60, || program_count(&s.root(), "app", "restarts") > before);
        settle_watcher();
        let after = program_count(&s.root(), "app", "restarts");
        let outcome = status(&s.root())["watch"]["programs"]["app"]["last_outcome"].clone();
        if after == before {
            losses.push((
                "restarts",
                1,
                format!("no restart after the outage; {outcome}: {}", agent.log()),
            ));
        } else if after > before + 1 {
            losses.push((
                "extra",
                after - before - 1,
                format!("{} restarts for one change", after - before),
            ));
        }
        if after > before && outcome != "ok" {
            losses.push(("restarts", 1, format!("the last restart ended {outcome}")));
        }
        t.round(fault, &losses);
    }
    t.finish();
}

/// Long enough for a stray second restart to have happened: several quiet windows.
fn settle_watcher() {
    std::thread::sleep(Duration::from_millis(800));
}

/// A tmpfs mounted over a folder for the test's life (root only: needs CAP_SYS_ADMIN).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &Path, bytes: u64) -> Result<SmallDisk, String> {
        fs::create_dir_all(at).unwrap();
        let o = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "stackless-faults",
            ])
            .arg(at)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(SmallDisk(at.to_path_buf()))
    }

    /// Fills the disk but for about `free` bytes, with a file `release` removes.
    fn fill_leaving(&self, free: u64) {
        let filler = self.0.join("filler");
        let _ = fs::remove_file(&filler);
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        let f = fs::File::create(&filler).unwrap();
        let _ = f.set_len(0);
        // tmpfs allocates on write, not on set_len: write the bytes.
        let mut left = avail.saturating_sub(free);
        let chunk = vec![0u8; 1 << 20];
        let mut w = std::io::BufWriter::new(f);
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            if std::io::Write::write_all(&mut w, &chunk[..k]).is_err() {
                break;
            }
            left -= k as u64;
        }
        let _ = std::io::Write::flush(&mut w);
    }

    /// Takes every byte still free at once (fallocate: no time for a writer to finish first).
    fn fill_now(&self) {
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let avail = st.blocks_available() as u64 * st.fragment_size() as u64;
        let f = fs::File::create(self.0.join("filler-now")).unwrap();
        let _ = nix::fcntl::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FallocateFlags::empty(),
            0,
            avail as i64,
        );
    }

    fn release(&self) {
        let _ = fs::remove_file(self.0.join("filler"));
        let _ = fs::remove_file(self.0.join("filler-now"));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The agent's whole root on a small disk, filled to a random few bytes short of full while a
/// new commit arrives: the fetch, the release or the state write runs out of space. The last
/// good release stays published and whole, `state.json` still parses, the error says the disk is
/// full; once space is freed the next sync converges. Counted: releases and records lost,
/// failures that do not say the disk is full, and no convergence after.
#[test]
fn a_full_disk_during_a_sync() {
    let n = rounds(4);
    let mut rng = Rng::new("full disk");
    let mut t = Tally::new(
        "a full disk during a fetch, a release or a state write",
        &["releases", "records", "convergence", "messages"],
    );
    let s = Setup::new(&[]);
    let disk = match SmallDisk::mount(&s.root(), 32 << 20) {
        Ok(d) => d,
        Err(e) => panic!(
            "mounting a 32 MiB tmpfs as the agent's root failed ({e}): this test needs root (CAP_SYS_ADMIN), as scripts/test.sh has"
        ),
    };
    let config = GitRepo::new(&s.path("git"), "config");
    config.commit(&[("app/a.conf", "a=0\n")], "0");
    let ud = repo_user_data(&s, None, Some(&config), "");
    let imds =
        Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data(ud.into_bytes()))
            .unwrap();
    let current = s.root().join("var/lib/stackless/repos/config/current");
    let agent = Agent::spawn(&s.root(), &imds.endpoint());
    assert_eq!(agent.wait_ready(120), 0, "{}", agent.log());

    for round in 1..=n {
        let good = fs::read_link(&current).unwrap();
        // Up to about twice the new commit's size: some rounds fail in the fetch, some in the
        // release (which holds the file again), some only at the state write, some not at all.
        // One round in three fills the disk the moment the new release is published, so the
        // state write after it is what runs out (its window is too narrow to hit by chance).
        let at_publish = rng.range(0, 3) == 0;
        let free = if at_publish {
            4_000_000
        } else {
            rng.range(0, 1_600_000)
        };
        disk.fill_leaving(free);
        let log_len = agent.log().len();
        let big = blob(&mut rng, 600_000);
        let tip = config.commit(
            &[
                ("app/a.conf", &format!("a={round}\n")),
                (&format!("big{round}.bin"), &big),
            ],
            &round.to_string(),
        );
        if at_publish && within(10, || published(&current, &tip)) {
            disk.fill_now();
        }
        // A few syncs against the full disk (every second).
        std::thread::sleep(Duration::from_secs(3));
        let mut losses = Vec::new();
        match whole_release(&current, &config) {
            Err(e) => losses.push(("releases", 1, e)),
            Ok(sha) if !good.ends_with(&sha) && sha != tip => losses.push((
                "releases",
                1,
                format!("{sha} is neither the last good nor the tip"),
            )),
            Ok(_) => {}
        }
        if let Err(e) = state_record(&s.root()) {
            losses.push(("records", 1, e));
        }
        let log = agent.log()[log_len..].to_string();
        // git's own "unable to write file" does not say why: the agent must.
        let full = log.contains("No space left on device");
        // Where the disk ran out, from what the agent said first.
        let first_full = log
            .lines()
            .find(|l| l.contains("No space left on device"))
            .unwrap_or("");
        let landed = if !full {
            "fitted"
        } else if first_full.contains("making release") || first_full.contains("is full") {
            "release"
        } else if first_full.contains("state") {
            "state write"
        } else {
            "fetch"
        };
        if !full && !published(&current, &tip) {
            losses.push((
                "messages",
                1,
                format!("not published and no disk-full error: {log}"),
            ));
        }
        disk.release();
        wait_for_tip(&current, &tip, &agent, &mut losses);
        if let Err(e) = state_record(&s.root()) {
            losses.push(("records", 1, e));
        }
        t.round(landed, &losses);
    }
    drop(agent);
    t.finish();
}
