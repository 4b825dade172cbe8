//! The client against the real supervisord, and against small fake servers for the HTTP cases
//! supervisord does not produce on demand (chunked answers, 401, silence, garbage).

use super::client::faults;
use super::test_support::{program_conf, Supervisord};
use super::xmlrpc::{self, Value};
use super::{ProcessState, Supervisor, SupervisorError, UpdateReport};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Wait until `pid` runs `want`: supervisord reports the pid (RUNNING with startsecs=0) as soon
/// as it forked, before the child has exec'd its command.
fn assert_runs(pid: u32, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cmdline(pid).contains(want) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} runs {:?}, not {want:?}",
            cmdline(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; supervisord reaps its children promptly.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A shell program that writes `ready` once its HUP trap is set and appends to `marker` on
/// every HUP.
fn hup_script(ready: &Path, marker: &Path) -> String {
    format!(
        "sh -c 'trap \"echo hup >> {m}\" HUP; echo ok > {r}; while :; do sleep 1 & wait $!; done'",
        m = marker.display(),
        r = ready.display()
    )
}

#[test]
fn restart_gives_a_new_pid_and_running_state() {
    let tmp = tempfile::tempdir().unwrap();
    let idle = program_conf(tmp.path(), "idle", "sleep 1000", "autostart=false");
    let sleeper = program_conf(tmp.path(), "sleeper", "sleep 1000", "");
    let sv = Supervisord::start_with_confs(tmp.path(), &[("idle", &idle), ("sleeper", &sleeper)]);
    let client = sv.client();
    let before = sv.wait_state("sleeper", &[ProcessState::Running]);
    assert!(before.pid > 0);

    let after = client.restart("sleeper").unwrap();
    assert_eq!(after.len(), 1, "{after:?}");
    let after = &after[0];
    assert_eq!(after.state, ProcessState::Running);
    assert_eq!(after.full_name(), "sleeper");
    assert_ne!(after.pid, before.pid);
    assert_runs(after.pid, "sleep 1000");
    assert!(
        !alive(before.pid),
        "the old sleeper {} still runs",
        before.pid
    );
    assert!(after.description.starts_with(&format!("pid {}", after.pid)));
    assert!(sv.dir().join("sleeper.err.log").exists());

    // A stopped program is simply started (the NOT_RUNNING fault of the stop is fine).
    assert_eq!(
        client.process_info("idle").unwrap().state,
        ProcessState::Stopped
    );
    let idle = client.restart("idle").unwrap();
    assert_eq!(idle[0].state, ProcessState::Running);
    assert!(idle[0].pid > 0);

    let all = client.all_process_info().unwrap();
    let names: Vec<String> = all.iter().map(|p| p.full_name()).collect();
    assert_eq!(names, ["idle", "sleeper"]);
    assert!(all.iter().all(|p| p.state == ProcessState::Running));
}

#[test]
fn restart_of_a_group_restarts_every_member() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let conf = format!(
        "{}{}[group:grp]\nprograms=a,b\n",
        program_conf(d, "a", "sleep 1000", ""),
        program_conf(d, "b", "sleep 1001", "")
    );
    let sv = Supervisord::start_with_confs(d, &[("grp", &conf)]);
    let client = sv.client();
    let a0 = sv.wait_state("grp:a", &[ProcessState::Running]);
    let b0 = sv.wait_state("grp:b", &[ProcessState::Running]);

    let members = client.restart("grp:*").unwrap();
    let names: Vec<String> = members.iter().map(|p| p.full_name()).collect();
    assert_eq!(names, ["grp:a", "grp:b"]);
    assert!(members.iter().all(|p| p.state == ProcessState::Running));
    assert_ne!(members[0].pid, a0.pid);
    assert_ne!(members[1].pid, b0.pid);
    assert_runs(members[1].pid, "sleep 1001");

    // One member alone: the other keeps its pid.
    let a1 = client.restart("grp:a").unwrap();
    assert_eq!(a1[0].full_name(), "grp:a");
    assert_ne!(a1[0].pid, members[0].pid);
    assert_eq!(client.process_info("grp:b").unwrap().pid, members[1].pid);

    let e = client.restart("nogroup:*").unwrap_err();
    assert_eq!(e.fault_code(), Some(faults::BAD_NAME), "{e}");
    assert!(e.to_string().contains("nogroup"), "{e}");
}

#[test]
fn signal_hup_reaches_the_program_and_keeps_its_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let hup = program_conf(
        d,
        "hup",
        &hup_script(&d.join("hup.ready"), &d.join("hup.marker")),
        "",
    );
    let group = format!(
        "{}{}[group:traps]\nprograms=t1,t2\n",
        program_conf(
            d,
            "t1",
            &hup_script(&d.join("t1.ready"), &d.join("t1.marker")),
            ""
        ),
        program_conf(
            d,
            "t2",
            &hup_script(&d.join("t2.ready"), &d.join("t2.marker")),
            ""
        )
    );
    let sv = Supervisord::start_with_confs(d, &[("hup", &hup), ("traps", &group)]);
    let client = sv.client();
    let before = sv.wait_state("hup", &[ProcessState::Running]);
    for f in ["hup.ready", "t1.ready", "t2.ready"] {
        wait_until(f, || d.join(f).exists());
    }

    let after = client.signal("hup", "HUP").unwrap();
    assert_eq!(after[0].pid, before.pid);
    assert_eq!(after[0].state, ProcessState::Running);
    wait_until("the HUP marker", || d.join("hup.marker").exists());
    assert!(alive(before.pid));

    let t1 = client.process_info("traps:t1").unwrap();
    let members = client.signal("traps:*", "HUP").unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(members[0].pid, t1.pid);
    wait_until("both group markers", || {
        d.join("t1.marker").exists() && d.join("t2.marker").exists()
    });

    let e = client.signal("hup", "NOSUCHSIG").unwrap_err();
    assert_eq!(e.fault_code(), Some(faults::BAD_SIGNAL), "{e}");
    let e = client.signal("ghost", "HUP").unwrap_err();
    assert_eq!(e.fault_code(), Some(faults::BAD_NAME), "{e}");
}

#[test]
fn update_applies_changed_added_and_removed_programs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let sv = Supervisord::start(
        d,
        &[
            ("keep", "sleep 1000"),
            ("change", "sleep 1000"),
            ("gone", "sleep 1000"),
        ],
    );
    let client = sv.client();
    let keep = sv.wait_state("keep", &[ProcessState::Running]);
    let change = sv.wait_state("change", &[ProcessState::Running]);
    let gone = sv.wait_state("gone", &[ProcessState::Running]);

    assert_eq!(client.update(None).unwrap(), UpdateReport::default());

    sv.write_conf("change", &program_conf(d, "change", "sleep 1001", ""));
    sv.remove_conf("gone");
    sv.write_conf("fresh", &program_conf(d, "fresh", "sleep 1002", ""));
    let report = client.update(None).unwrap();
    assert_eq!(
        report,
        UpdateReport {
            added: vec!["fresh".into()],
            changed: vec!["change".into()],
            removed: vec!["gone".into()],
        }
    );

    let e = client.process_info("gone").unwrap_err();
    assert_eq!(e.fault_code(), Some(faults::BAD_NAME), "{e}");
    assert!(!alive(gone.pid), "the removed program still runs");
    assert!(
        !alive(change.pid),
        "the changed program's old process still runs"
    );
    let changed = sv.wait_state("change", &[ProcessState::Running]);
    assert_ne!(changed.pid, change.pid);
    assert_runs(changed.pid, "sleep 1001");
    let fresh = sv.wait_state("fresh", &[ProcessState::Running]);
    assert_runs(fresh.pid, "sleep 1002");
    assert_eq!(client.process_info("keep").unwrap().pid, keep.pid);

    assert!(client.update(None).unwrap().is_empty());
}

#[test]
fn update_only_touches_the_named_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let sv = Supervisord::start(d, &[("one", "sleep 1000"), ("two", "sleep 1000")]);
    let client = sv.client();
    sv.wait_state("one", &[ProcessState::Running]);
    let two = sv.wait_state("two", &[ProcessState::Running]);

    sv.write_conf("one", &program_conf(d, "one", "sleep 1001", ""));
    sv.write_conf("two", &program_conf(d, "two", "sleep 1001", ""));
    sv.write_conf("three", &program_conf(d, "three", "sleep 1003", ""));
    let report = client.update(Some(&["one:*".to_string()])).unwrap();
    assert_eq!(report.changed, ["one"]);
    assert!(
        report.added.is_empty() && report.removed.is_empty(),
        "{report:?}"
    );
    assert_eq!(client.process_info("two").unwrap().pid, two.pid);
    assert_eq!(
        client.process_info("three").unwrap_err().fault_code(),
        Some(faults::BAD_NAME)
    );

    // What was left alone is still pending.
    let report = client.update(None).unwrap();
    assert_eq!(report.changed, ["two"]);
    assert_eq!(report.added, ["three"]);
    let two = sv.wait_state("two", &[ProcessState::Running]);
    assert_runs(two.pid, "sleep 1001");
}

#[test]
fn unknown_program_is_a_bad_name_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let sv = Supervisord::start(tmp.path(), &[("web", "sleep 1000")]);
    let client = sv.client();
    for e in [
        client.process_info("nosuch").unwrap_err(),
        client.restart("nosuch").unwrap_err(),
        client.restart("web:nosuch").unwrap_err(),
    ] {
        match &e {
            SupervisorError::Fault {
                method,
                code,
                name,
                message,
            } => {
                assert_eq!(*code, faults::BAD_NAME);
                assert_eq!(*name, "BAD_NAME");
                assert!(method.starts_with("supervisor."), "{method}");
                assert!(message.contains("nosuch"), "{message}");
            }
            other => panic!("not a fault: {other:?}"),
        }
        let text = e.to_string();
        assert!(
            text.contains("BAD_NAME") && text.contains("nosuch"),
            "{text}"
        );
        assert!(text.contains("conf.d"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
}

#[test]
fn a_program_that_cannot_start_reports_why() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ghost = program_conf(
        d,
        "ghost",
        "/nonexistent/ghost-cmd --flag",
        "startretries=0",
    );
    // startsecs well above how long `sh -c 'exit 3'` can take on a loaded machine: at 1s it
    // sometimes counted as started, and ended EXITED instead of failing to start.
    let flaky = program_conf(d, "flaky", "sh -c 'exit 3'", "startsecs=10\nstartretries=0");
    let sv = Supervisord::start_with_confs(d, &[("ghost", &ghost), ("flaky", &flaky)]);
    let client = sv.client();

    // At boot supervisord tried and gave up: FATAL with the spawn error.
    let info = sv.wait_state("ghost", &[ProcessState::Fatal]);
    assert!(info.spawnerr.contains("can't find command"), "{info:?}");

    // startProcess refuses before spawning.
    let e = client.restart("ghost").unwrap_err();
    assert_eq!(e.fault_code(), Some(faults::NO_FILE), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("/nonexistent/ghost-cmd") && text.contains("ghost"),
        "{text}"
    );
    assert!(text.contains("command="), "{text}");

    // Dies within startsecs: SPAWN_ERROR, reported as the state and spawn error.
    sv.wait_state("flaky", &[ProcessState::Fatal]);
    match client.restart("flaky").unwrap_err() {
        SupervisorError::NotRunning {
            name,
            state,
            spawnerr,
        } => {
            assert_eq!(name, "flaky");
            assert!(
                matches!(state, ProcessState::Backoff | ProcessState::Fatal),
                "{state}"
            );
            assert!(spawnerr.contains("Exited too quickly"), "{spawnerr}");
            let e = SupervisorError::NotRunning {
                name,
                state,
                spawnerr,
            };
            assert!(e.to_string().starts_with("flaky is "), "{e}");
        }
        other => panic!("expected NotRunning, got {other:?}: {other}"),
    }
}

#[test]
fn missing_or_dead_socket_is_a_connect_error() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("supervisor.sock");
    let client = Supervisor::new(&socket, Duration::from_secs(2));
    assert_eq!(client.socket(), socket);
    let e = client.restart("web").unwrap_err();
    match &e {
        SupervisorError::Connect { socket: s, detail } => {
            assert_eq!(s, &socket);
            assert_eq!(detail, "no such socket");
        }
        other => panic!("not a connect error: {other:?}"),
    }
    let text = e.to_string();
    assert!(text.contains(&socket.display().to_string()), "{text}");
    assert!(text.contains("is supervisord running"), "{text}");

    // A socket file nobody listens on any more.
    drop(UnixListener::bind(&socket).unwrap());
    let e = client.all_process_info().unwrap_err();
    assert!(
        matches!(&e, SupervisorError::Connect { detail, .. } if detail == "connection refused"),
        "{e:?}"
    );
}

/// Serve one connection on `socket` with `answer(request body)`, on a thread.
fn fake_server(
    socket: &Path,
    answer: impl FnOnce(&str) -> Vec<u8> + Send + 'static,
) -> std::thread::JoinHandle<String> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Read headers and the Content-Length body.
        loop {
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                if buf.len() >= end + 4 + len {
                    let request = text.clone();
                    let body = &text[end + 4..];
                    let out = answer(body);
                    let _ = conn.write_all(&out);
                    return request;
                }
            }
        }
    })
}

#[test]
fn chunked_answers_are_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let server = fake_server(&socket, |body| {
        let (method, params) = xmlrpc::decode_call(body).unwrap();
        assert_eq!(method, "supervisor.getProcessInfo");
        assert_eq!(params, [Value::str("web")]);
        let doc = xmlrpc::encode_response(&Value::Struct(vec![
            ("name".into(), Value::str("web")),
            ("group".into(), Value::str("site")),
            ("statename".into(), Value::str("RUNNING")),
            ("pid".into(), Value::Int(77)),
            ("spawnerr".into(), Value::str("")),
            ("exitstatus".into(), Value::Int(0)),
            ("description".into(), Value::str("pid 77, uptime 0:00:01")),
        ]));
        let mut out =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for piece in doc.as_bytes().chunks(37) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    });
    let client = Supervisor::new(&socket, Duration::from_secs(5));
    let info = client.process_info("web").unwrap();
    assert_eq!(info.full_name(), "site:web");
    assert_eq!(info.pid, 77);
    assert_eq!(info.state, ProcessState::Running);
    let request = server.join().unwrap();
    assert!(request.starts_with("POST /RPC2 HTTP/1.1\r\n"), "{request}");
}

#[test]
fn http_errors_and_garbage_are_protocol_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 5] = [
        (
            "401",
            b"HTTP/1.0 401 Unauthorized\r\nContent-Length: 0\r\n\r\n",
            "username",
        ),
        (
            "404",
            b"HTTP/1.0 404 Not Found\r\n\r\n<h1>nope</h1>",
            "HTTP 404 Not Found: <h1>nope</h1>",
        ),
        ("garbage", b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer"),
        (
            "bad xml",
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n<a></b",
            "malformed XML-RPC",
        ),
        (
            "short",
            b"HTTP/1.0 200 OK\r\nContent-Length: 500\r\n\r\n<methodResponse>",
            "closed the connection",
        ),
    ];
    for (i, (label, answer, want)) in cases.into_iter().enumerate() {
        let socket = tmp.path().join(format!("{i}.sock"));
        let answer = answer.to_vec();
        let server = fake_server(&socket, move |_| answer);
        let e = Supervisor::new(&socket, Duration::from_secs(5))
            .all_process_info()
            .unwrap_err();
        server.join().unwrap();
        // A short answer is supervisord going away mid-answer: worth a retry; the rest are not.
        if label == "short" {
            assert!(
                matches!(e, SupervisorError::Unanswered(_)),
                "{label}: {e:?}"
            );
        } else {
            assert!(matches!(e, SupervisorError::Protocol(_)), "{label}: {e:?}");
        }
        assert_eq!(e.is_unreachable(), label == "short", "{label}");
        assert!(e.to_string().contains(want), "{label}: {e}");
        assert!(
            e.to_string().contains(&socket.display().to_string()),
            "{label}: {e}"
        );
    }
}

#[test]
fn a_silent_server_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("s.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let client = Supervisor::new(&socket, Duration::from_millis(300));
    let started = Instant::now();
    let e = client.restart("web").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, SupervisorError::Unanswered(_)), "{e:?}");
    assert!(e.is_unreachable());
    assert!(
        e.to_string()
            .contains("did not answer supervisor.stopProcess"),
        "{e}"
    );
    drop(listener);
}
