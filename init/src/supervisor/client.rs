//! The supervisord client: XML-RPC over HTTP over its unix socket, one connection per call.

use super::xmlrpc::{self, Response, Value};
use serde::Serialize;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// supervisord's fault codes (`supervisor.xmlrpc.Faults`).
pub mod faults {
    pub const UNKNOWN_METHOD: i64 = 1;
    pub const INCORRECT_PARAMETERS: i64 = 2;
    pub const BAD_ARGUMENTS: i64 = 3;
    pub const SIGNATURE_UNSUPPORTED: i64 = 4;
    pub const SHUTDOWN_STATE: i64 = 6;
    pub const BAD_NAME: i64 = 10;
    pub const BAD_SIGNAL: i64 = 11;
    pub const NO_FILE: i64 = 20;
    pub const NOT_EXECUTABLE: i64 = 21;
    pub const FAILED: i64 = 30;
    pub const ABNORMAL_TERMINATION: i64 = 40;
    pub const SPAWN_ERROR: i64 = 50;
    pub const ALREADY_STARTED: i64 = 60;
    pub const NOT_RUNNING: i64 = 70;
    pub const SUCCESS: i64 = 80;
    pub const ALREADY_ADDED: i64 = 90;
    pub const STILL_RUNNING: i64 = 91;
    pub const CANT_REREAD: i64 = 92;
}

/// The name supervisord gives a fault code, `UNKNOWN` for codes it does not define.
pub fn fault_name(code: i64) -> &'static str {
    use faults::*;
    match code {
        UNKNOWN_METHOD => "UNKNOWN_METHOD",
        INCORRECT_PARAMETERS => "INCORRECT_PARAMETERS",
        BAD_ARGUMENTS => "BAD_ARGUMENTS",
        SIGNATURE_UNSUPPORTED => "SIGNATURE_UNSUPPORTED",
        SHUTDOWN_STATE => "SHUTDOWN_STATE",
        BAD_NAME => "BAD_NAME",
        BAD_SIGNAL => "BAD_SIGNAL",
        NO_FILE => "NO_FILE",
        NOT_EXECUTABLE => "NOT_EXECUTABLE",
        FAILED => "FAILED",
        ABNORMAL_TERMINATION => "ABNORMAL_TERMINATION",
        SPAWN_ERROR => "SPAWN_ERROR",
        ALREADY_STARTED => "ALREADY_STARTED",
        NOT_RUNNING => "NOT_RUNNING",
        SUCCESS => "SUCCESS",
        ALREADY_ADDED => "ALREADY_ADDED",
        STILL_RUNNING => "STILL_RUNNING",
        CANT_REREAD => "CANT_REREAD",
        _ => "UNKNOWN",
    }
}

/// A program's state, from supervisord's `statename`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProcessState {
    Stopped,
    Starting,
    Running,
    Backoff,
    Stopping,
    Exited,
    Fatal,
    Unknown,
}

impl ProcessState {
    pub fn from_name(name: &str) -> ProcessState {
        match name {
            "STOPPED" => ProcessState::Stopped,
            "STARTING" => ProcessState::Starting,
            "RUNNING" => ProcessState::Running,
            "BACKOFF" => ProcessState::Backoff,
            "STOPPING" => ProcessState::Stopping,
            "EXITED" => ProcessState::Exited,
            "FATAL" => ProcessState::Fatal,
            _ => ProcessState::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Stopped => "STOPPED",
            ProcessState::Starting => "STARTING",
            ProcessState::Running => "RUNNING",
            ProcessState::Backoff => "BACKOFF",
            ProcessState::Stopping => "STOPPING",
            ProcessState::Exited => "EXITED",
            ProcessState::Fatal => "FATAL",
            ProcessState::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for ProcessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One program as supervisord sees it (`supervisor.getProcessInfo`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessInfo {
    pub name: String,
    pub group: String,
    pub state: ProcessState,
    /// 0 when not running.
    pub pid: u32,
    /// Why the last start failed (`can't find command ...`, `Exited too quickly ...`), or empty.
    pub spawnerr: String,
    pub exitstatus: i64,
    /// supervisorctl's status text: `pid 123, uptime 0:01:02`, the spawn error, ...
    pub description: String,
}

impl ProcessInfo {
    /// `group:name`, or `name` when the program is its own group.
    pub fn full_name(&self) -> String {
        if self.group == self.name {
            self.name.clone()
        } else {
            format!("{}:{}", self.group, self.name)
        }
    }

    fn from_value(v: &Value) -> Result<ProcessInfo, String> {
        let s = |k: &str| -> Result<String, String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| format!("process info without a string {k:?}"))
        };
        let i = |k: &str| -> Result<i64, String> {
            v.get(k)
                .and_then(Value::as_int)
                .ok_or_else(|| format!("process info without an int {k:?}"))
        };
        if v.as_struct().is_none() {
            return Err(format!("process info is a {}, not a struct", v.type_name()));
        }
        let pid = i("pid")?;
        Ok(ProcessInfo {
            name: s("name")?,
            group: s("group")?,
            state: ProcessState::from_name(&s("statename")?),
            pid: u32::try_from(pid).map_err(|_| format!("process info with pid {pid}"))?,
            spawnerr: s("spawnerr")?,
            exitstatus: i("exitstatus")?,
            description: s("description").unwrap_or_default(),
        })
    }
}

/// What [`Supervisor::update`] did, by process group name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UpdateReport {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl UpdateReport {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// A failed conversation with supervisord; `Display` is one line that says what was being
/// done, to which program, and what to do about it.
#[derive(Debug)]
pub enum SupervisorError {
    /// The socket could not be reached at all.
    Connect { socket: PathBuf, detail: String },
    /// supervisord answered with an XML-RPC fault (or a per-process failure in a group call).
    Fault {
        method: String,
        code: i64,
        name: &'static str,
        message: String,
    },
    /// The program was started (or signalled) but is not RUNNING afterwards.
    NotRunning {
        name: String,
        state: ProcessState,
        spawnerr: String,
    },
    /// supervisord took the request but gave no whole answer in time, or dropped the
    /// connection: hung (stopped), restarting or overloaded. Worth retrying, unlike `Protocol`.
    Unanswered(String),
    /// Anything else: HTTP errors, malformed answers.
    Protocol(String),
}

impl SupervisorError {
    /// The fault code, for faults.
    pub fn fault_code(&self) -> Option<i64> {
        match self {
            SupervisorError::Fault { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether supervisord itself was out of reach (stopped, restarting, hung, shutting down),
    /// rather than refusing the action: the action is worth trying again once it is back.
    pub fn is_unreachable(&self) -> bool {
        match self {
            SupervisorError::Connect { .. } | SupervisorError::Unanswered(_) => true,
            SupervisorError::Fault { code, .. } => *code == faults::SHUTDOWN_STATE,
            _ => false,
        }
    }
}

fn fault_hint(code: i64) -> &'static str {
    use faults::*;
    match code {
        BAD_NAME => "; supervisord has no such program or group loaded: check the name and its file under conf.d/, then update",
        NO_FILE => "; the program's command= names a file that does not exist: fix command= in its conf.d file",
        NOT_EXECUTABLE => "; the program's command= is not executable: fix its permissions or command=",
        SPAWN_ERROR | ABNORMAL_TERMINATION => "; the program exited while starting: read its stderr log",
        BAD_SIGNAL => "; use a signal name such as HUP or a number",
        SHUTDOWN_STATE => "; supervisord is shutting down: retry once it is back",
        CANT_REREAD => "; supervisord cannot read its configuration: fix the file it names",
        STILL_RUNNING => "; stop the group before removing it",
        FAILED => "; see supervisord's log",
        UNKNOWN_METHOD => "; is [rpcinterface:supervisor] configured in supervisord.conf?",
        _ => "",
    }
}

impl fmt::Display for SupervisorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SupervisorError::Connect { socket, detail } => write!(
                f,
                "cannot reach supervisord at {}: {detail}; is supervisord running and is [unix_http_server] file= this path?",
                socket.display()
            ),
            SupervisorError::Fault {
                method,
                code,
                name,
                message,
            } => {
                // supervisord's faultString starts with the fault name already.
                let text = message
                    .strip_prefix(name)
                    .and_then(|m| m.strip_prefix(": "))
                    .unwrap_or(message);
                write!(
                    f,
                    "{method} failed with {name} ({code}): {text}{}",
                    fault_hint(*code)
                )
            }
            SupervisorError::NotRunning {
                name,
                state,
                spawnerr,
            } => {
                let why = if spawnerr.is_empty() {
                    "no spawn error recorded"
                } else {
                    spawnerr.as_str()
                };
                write!(
                    f,
                    "{name} is {state}, not RUNNING: {why}; read its log (supervisorctl tail {name} stderr) and check command= in its conf.d file"
                )
            }
            SupervisorError::Protocol(message) | SupervisorError::Unanswered(message) => {
                f.write_str(message)
            }
        }
    }
}

impl std::error::Error for SupervisorError {}

/// The largest answer accepted from supervisord.
const MAX_RESPONSE: usize = 64 << 20;

/// A supervisord reached through its unix socket.
#[derive(Debug, Clone)]
pub struct Supervisor {
    socket: PathBuf,
    timeout: Duration,
}

/// `group:*` names a whole group; `group:name` and `name` one process.
fn whole_group(name: &str) -> Option<&str> {
    name.strip_suffix(":*")
}

impl Supervisor {
    /// `timeout` bounds each call, from connecting to the last byte of the answer; calls that
    /// wait (stop, start) need room for the program's `stopwaitsecs` and `startsecs`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Supervisor {
            socket: socket.into(),
            timeout: timeout.max(Duration::from_millis(1)),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `supervisor.getProcessInfo`: `name` is `group:proc` or `proc`.
    pub fn process_info(&self, name: &str) -> Result<ProcessInfo, SupervisorError> {
        let v = self.call_named("supervisor.getProcessInfo", name, &[name.into()])?;
        ProcessInfo::from_value(&v).map_err(|e| self.malformed("supervisor.getProcessInfo", &e))
    }

    /// `supervisor.getAllProcessInfo`, sorted by group then name.
    pub fn all_process_info(&self) -> Result<Vec<ProcessInfo>, SupervisorError> {
        let method = "supervisor.getAllProcessInfo";
        let v = self.call(method, &[])?;
        let items = v
            .as_array()
            .ok_or_else(|| self.malformed(method, &format!("a {}, not an array", v.type_name())))?;
        items
            .iter()
            .map(|i| ProcessInfo::from_value(i).map_err(|e| self.malformed(method, &e)))
            .collect()
    }

    /// The members of one process group.
    fn group_info(&self, group: &str) -> Result<Vec<ProcessInfo>, SupervisorError> {
        Ok(self
            .all_process_info()?
            .into_iter()
            .filter(|p| p.group == group)
            .collect())
    }

    /// Restart like `supervisorctl restart NAME`: stop (waiting; not running is fine), start
    /// (waiting until RUNNING, i.e. up for `startsecs`), then confirm with
    /// `getProcessInfo`. `group:*` restarts every member of the group. Returns the fresh
    /// info (new pids).
    pub fn restart(&self, name: &str) -> Result<Vec<ProcessInfo>, SupervisorError> {
        if let Some(group) = whole_group(name) {
            return self.restart_group(group);
        }
        tracing::debug!(program = name, "restarting through supervisord");
        match self.call_named("supervisor.stopProcess", name, &[name.into(), true.into()]) {
            Ok(_) => {}
            Err(e) if e.fault_code() == Some(faults::NOT_RUNNING) => {}
            Err(e) => return Err(e),
        }
        if let Err(e) =
            self.call_named("supervisor.startProcess", name, &[name.into(), true.into()])
        {
            return Err(self.explain_start_failure(name, e));
        }
        let info = self.process_info(name)?;
        confirm_running(&info)?;
        tracing::info!(program = %info.full_name(), pid = info.pid, "restarted");
        Ok(vec![info])
    }

    fn restart_group(&self, group: &str) -> Result<Vec<ProcessInfo>, SupervisorError> {
        tracing::debug!(group, "restarting a process group through supervisord");
        let method = "supervisor.stopProcessGroup";
        let results = self.call_named(method, group, &[group.into(), true.into()])?;
        for r in self.group_results(method, &results)? {
            if r.status != faults::SUCCESS && r.status != faults::NOT_RUNNING {
                return Err(r.into_fault(method));
            }
        }
        let method = "supervisor.startProcessGroup";
        let results = self.call_named(method, group, &[group.into(), true.into()])?;
        for r in self.group_results(method, &results)? {
            if r.status != faults::SUCCESS && r.status != faults::ALREADY_STARTED {
                let full = r.full_name();
                return Err(self.explain_start_failure(&full, r.into_fault(method)));
            }
        }
        let members = self.group_info(group)?;
        for info in &members {
            confirm_running(info)?;
        }
        tracing::info!(group, members = members.len(), "restarted");
        Ok(members)
    }

    /// Send `signal` (`HUP`, `USR1`, or a number) like `supervisorctl signal`, then confirm the
    /// program is still RUNNING. `group:*` signals every running member of the group.
    pub fn signal(&self, name: &str, signal: &str) -> Result<Vec<ProcessInfo>, SupervisorError> {
        if let Some(group) = whole_group(name) {
            let method = "supervisor.signalProcessGroup";
            let results = self.call_named(method, group, &[group.into(), signal.into()])?;
            let results = self.group_results(method, &results)?;
            for r in &results {
                if r.status != faults::SUCCESS {
                    return Err(r.clone().into_fault(method));
                }
            }
            let members = self.group_info(group)?;
            for info in &members {
                if results.iter().any(|r| r.name == info.name) {
                    confirm_running(info)?;
                }
            }
            tracing::info!(group, signal, signalled = results.len(), "signalled");
            return Ok(members);
        }
        self.call_named(
            "supervisor.signalProcess",
            name,
            &[name.into(), signal.into()],
        )?;
        let info = self.process_info(name)?;
        confirm_running(&info)?;
        tracing::info!(program = %info.full_name(), signal, "signalled");
        Ok(vec![info])
    }

    /// The processes `name` stands for: a group's members for `group:*`, else the one process.
    pub fn members(&self, name: &str) -> Result<Vec<ProcessInfo>, SupervisorError> {
        match whole_group(name) {
            Some(group) => self.group_info(group),
            None => Ok(vec![self.process_info(name)?]),
        }
    }

    /// The last `bytes` bytes of a process's stderr (or stdout) log, like `supervisorctl tail`.
    /// Empty when the program logs nowhere supervisord can read.
    pub fn tail_log(
        &self,
        name: &str,
        stderr: bool,
        bytes: usize,
    ) -> Result<String, SupervisorError> {
        let method = if stderr {
            "supervisor.tailProcessStderrLog"
        } else {
            "supervisor.tailProcessStdoutLog"
        };
        let params = [name.into(), Value::Int(0), Value::Int(bytes as i64)];
        let v = match self.call_named(method, name, &params) {
            Ok(v) => v,
            Err(e) if e.fault_code() == Some(faults::NO_FILE) => return Ok(String::new()),
            Err(e) => return Err(e),
        };
        let text = v
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| self.malformed(method, "not [string, offset, overflow]"))?;
        Ok(text.to_string())
    }

    /// What `supervisorctl update` does: re-read the configuration, then stop and remove the
    /// removed groups, stop, remove and re-add the changed ones, add the added ones. Added and
    /// re-added groups start on their own when `autostart` is true (supervisord's default),
    /// a moment later; this does not wait for that. With `only`, act only on those groups
    /// (`name`, `name:*` or `name:proc` all name group `name`); the others are logged and left
    /// for a later update. Returns what was done.
    pub fn update(&self, only: Option<&[String]>) -> Result<UpdateReport, SupervisorError> {
        let method = "supervisor.reloadConfig";
        let v = self.call(method, &[])?;
        let lists = v
            .as_array()
            .and_then(|outer| outer.first())
            .and_then(Value::as_array)
            .filter(|inner| inner.len() == 3)
            .ok_or_else(|| self.malformed(method, "not [[added, changed, removed]]"))?;
        let names = |v: &Value| -> Result<Vec<String>, SupervisorError> {
            v.as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|n| n.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| self.malformed(method, "group names are not strings"))
        };
        let (added, changed, removed) = (names(&lists[0])?, names(&lists[1])?, names(&lists[2])?);
        let wanted = |group: &str| match only {
            None => true,
            Some(only) => only
                .iter()
                .any(|o| o.split(':').next().unwrap_or(o) == group),
        };
        let mut report = UpdateReport::default();
        for (kind, groups) in [
            ("removed", &removed),
            ("changed", &changed),
            ("added", &added),
        ] {
            for g in groups.iter().filter(|g| !wanted(g)) {
                tracing::info!(group = %g, kind, "supervisord configuration changed; left for a later update");
            }
        }
        for g in removed.iter().filter(|g| wanted(g)) {
            self.stop_group_for_update(g)?;
            self.call_named("supervisor.removeProcessGroup", g, &[g.as_str().into()])?;
            tracing::info!(group = %g, "removed from supervisord");
            report.removed.push(g.clone());
        }
        for g in changed.iter().filter(|g| wanted(g)) {
            self.stop_group_for_update(g)?;
            self.call_named("supervisor.removeProcessGroup", g, &[g.as_str().into()])?;
            self.add_group(g)?;
            tracing::info!(group = %g, "updated in supervisord");
            report.changed.push(g.clone());
        }
        for g in added.iter().filter(|g| wanted(g)) {
            self.add_group(g)?;
            tracing::info!(group = %g, "added to supervisord");
            report.added.push(g.clone());
        }
        Ok(report)
    }

    fn stop_group_for_update(&self, group: &str) -> Result<(), SupervisorError> {
        let method = "supervisor.stopProcessGroup";
        let results = self.call_named(method, group, &[group.into(), true.into()])?;
        for r in self.group_results(method, &results)? {
            if r.status != faults::SUCCESS && r.status != faults::NOT_RUNNING {
                return Err(r.into_fault(method));
            }
        }
        Ok(())
    }

    fn add_group(&self, group: &str) -> Result<(), SupervisorError> {
        match self.call_named("supervisor.addProcessGroup", group, &[group.into()]) {
            Err(e) if e.fault_code() == Some(faults::ALREADY_ADDED) => Ok(()),
            other => other.map(drop),
        }
    }

    /// After a failed start, say why: the program's state and spawn error when it has one.
    fn explain_start_failure(&self, name: &str, e: SupervisorError) -> SupervisorError {
        let code = e.fault_code();
        if code != Some(faults::SPAWN_ERROR) && code != Some(faults::ABNORMAL_TERMINATION) {
            return e;
        }
        match self.process_info(name) {
            Ok(info) if info.state != ProcessState::Running => not_running(&info),
            _ => e,
        }
    }

    fn group_results(&self, method: &str, v: &Value) -> Result<Vec<GroupResult>, SupervisorError> {
        let items = v
            .as_array()
            .ok_or_else(|| self.malformed(method, &format!("a {}, not an array", v.type_name())))?;
        items
            .iter()
            .map(|r| {
                let s = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
                match (
                    s("name"),
                    s("group"),
                    r.get("status").and_then(Value::as_int),
                ) {
                    (Some(name), Some(group), Some(status)) => Ok(GroupResult {
                        name,
                        group,
                        status,
                        description: s("description").unwrap_or_default(),
                    }),
                    _ => Err(self.malformed(method, "a result without name, group and status")),
                }
            })
            .collect()
    }

    fn malformed(&self, method: &str, what: &str) -> SupervisorError {
        SupervisorError::Protocol(format!(
            "supervisord at {} answered {method} with something unexpected: {what}",
            self.socket.display()
        ))
    }

    /// A call about one program or group: a fault that does not name it gets the name added.
    fn call_named(
        &self,
        method: &str,
        name: &str,
        params: &[Value],
    ) -> Result<Value, SupervisorError> {
        self.call(method, params).map_err(|e| match e {
            SupervisorError::Fault {
                method,
                code,
                name: fname,
                message,
            } if !message.contains(name) => SupervisorError::Fault {
                method,
                code,
                name: fname,
                message: format!("{message} (program {name})"),
            },
            e => e,
        })
    }

    /// One XML-RPC call: its result, a `Fault`, or what went wrong on the way.
    pub fn call(&self, method: &str, params: &[Value]) -> Result<Value, SupervisorError> {
        let body = xmlrpc::encode_call(method, params);
        let answer = self.post(method, body.as_bytes())?;
        let text = String::from_utf8(answer)
            .map_err(|_| self.malformed(method, "an answer that is not UTF-8"))?;
        match xmlrpc::decode_response(&text) {
            Ok(Response::Success(v)) => Ok(v),
            Ok(Response::Fault(f)) => Err(SupervisorError::Fault {
                method: method.to_string(),
                code: f.code,
                name: fault_name(f.code),
                message: f.message,
            }),
            Err(e) => Err(self.malformed(method, &e.to_string())),
        }
    }

    /// POST /RPC2 on a fresh connection; the body of a 200 answer.
    fn post(&self, method: &str, body: &[u8]) -> Result<Vec<u8>, SupervisorError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|e| SupervisorError::Connect {
                socket: self.socket.clone(),
                detail: io_detail(&e),
            })?;
        let broken = |e: io::Error, doing: &str| -> SupervisorError {
            if is_timeout(&e) {
                self.timed_out(method)
            } else {
                SupervisorError::Unanswered(format!(
                    "supervisord at {} dropped the connection while {doing} {method}: {}",
                    self.socket.display(),
                    io_detail(&e)
                ))
            }
        };
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(|e| broken(e, "sending"))?;
        let head = format!(
            "POST /RPC2 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: stackless-init\r\n\
             Content-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream
            .write_all(&request)
            .and_then(|_| stream.flush())
            .map_err(|e| broken(e, "sending"))?;

        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 8192];
        let mut eof = false;
        loop {
            if let Some(done) = self.parse_http(method, &buf, eof)? {
                return Ok(done);
            }
            if eof {
                return Err(SupervisorError::Unanswered(format!(
                    "supervisord at {} closed the connection before answering {method} completely ({} bytes received)",
                    self.socket.display(),
                    buf.len()
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out(method));
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| broken(e, "waiting for the answer to"))?;
            match stream.read(&mut chunk) {
                Ok(0) => eof = true,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_RESPONSE {
                        return Err(self.malformed(method, "an answer larger than 64 MiB"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(broken(e, "waiting for the answer to")),
            }
        }
    }

    /// The body when `buf` holds a complete answer, `None` when more is needed.
    pub(crate) fn parse_http(
        &self,
        method: &str,
        buf: &[u8],
        eof: bool,
    ) -> Result<Option<Vec<u8>>, SupervisorError> {
        let Some(end) = find(buf, b"\r\n\r\n") else {
            if buf.len() > 64 * 1024 {
                return Err(self.malformed(method, "HTTP headers longer than 64 KiB"));
            }
            return Ok(None);
        };
        let head = std::str::from_utf8(&buf[..end])
            .map_err(|_| self.malformed(method, "HTTP headers that are not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let (version, code) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let reason = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(self.malformed(method, &format!("not an HTTP answer: {status_line:?}")));
        }
        let code: u16 = code
            .parse()
            .map_err(|_| self.malformed(method, &format!("HTTP status line {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(
                    v.parse::<usize>()
                        .map_err(|_| self.malformed(method, &format!("Content-Length {v:?}")))?,
                );
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            }
        }
        let rest = &buf[end + 4..];
        let body = if chunked {
            match dechunk(rest).map_err(|e| self.malformed(method, &e))? {
                Some(body) => body,
                None => return Ok(None),
            }
        } else if let Some(n) = length {
            if rest.len() < n {
                return Ok(None);
            }
            rest[..n].to_vec()
        } else if eof {
            rest.to_vec()
        } else {
            return Ok(None);
        };
        match code {
            200 => Ok(Some(body)),
            401 => Err(SupervisorError::Protocol(format!(
                "supervisord at {} asks for a username and password ({method}: HTTP 401); \
                 stackless-init talks to it without: remove username=/password= from [unix_http_server]",
                self.socket.display()
            ))),
            _ => {
                let text = String::from_utf8_lossy(&body);
                let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
                Err(SupervisorError::Protocol(format!(
                    "supervisord at {} answered {method} with HTTP {code} {reason}{}{}; \
                     is this socket supervisord's [unix_http_server] with [rpcinterface:supervisor]?",
                    self.socket.display(),
                    if first.is_empty() { "" } else { ": " },
                    first.chars().take(200).collect::<String>()
                )))
            }
        }
    }

    fn timed_out(&self, method: &str) -> SupervisorError {
        SupervisorError::Unanswered(format!(
            "supervisord at {} did not answer {method} within {:?}; a stop waits up to the program's stopwaitsecs and a start its startsecs, so allow more time or check supervisord's log",
            self.socket.display(),
            self.timeout
        ))
    }
}

/// One entry of a group call's answer.
#[derive(Debug, Clone)]
struct GroupResult {
    name: String,
    group: String,
    status: i64,
    description: String,
}

impl GroupResult {
    fn full_name(&self) -> String {
        if self.group == self.name {
            self.name.clone()
        } else {
            format!("{}:{}", self.group, self.name)
        }
    }

    fn into_fault(self, method: &str) -> SupervisorError {
        let full = self.full_name();
        let message = if self.description.contains(&full) || self.description.contains(&self.name) {
            self.description
        } else {
            format!("{} (program {full})", self.description)
        };
        SupervisorError::Fault {
            method: method.to_string(),
            code: self.status,
            name: fault_name(self.status),
            message,
        }
    }
}

fn confirm_running(info: &ProcessInfo) -> Result<(), SupervisorError> {
    if info.state == ProcessState::Running {
        return Ok(());
    }
    Err(not_running(info))
}

/// Why `info` is not RUNNING, in supervisord's words where it has some.
fn not_running(info: &ProcessInfo) -> SupervisorError {
    let spawnerr = if !info.spawnerr.is_empty() {
        info.spawnerr.clone()
    } else if info.state == ProcessState::Exited {
        format!("exited with status {}", info.exitstatus)
    } else {
        String::new()
    };
    SupervisorError::NotRunning {
        name: info.full_name(),
        state: info.state,
        spawnerr,
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// An I/O error in words, without the `(os error N)` suffix.
fn io_detail(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such socket".to_string(),
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        io::ErrorKind::ConnectionReset => "connection reset".to_string(),
        io::ErrorKind::BrokenPipe => "broken pipe".to_string(),
        _ => {
            let s = e.to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_lowercase(),
                None => s,
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Decode a chunked body: `Ok(None)` while incomplete.
fn dechunk(mut data: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(data, b"\r\n") else {
            if data.len() > 1024 {
                return Err("a chunk size line longer than 1 KiB".to_string());
            }
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&data[..eol]).map_err(|_| "a chunk size that is not text")?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("chunk size {size_text:?} is not hexadecimal"))?;
        data = &data[eol + 2..];
        if size == 0 {
            // Trailers end with an empty line; no trailer at all is the common case.
            if data.starts_with(b"\r\n") || find(data, b"\r\n\r\n").is_some() {
                return Ok(Some(body));
            }
            return Ok(None);
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[..size]);
        if &data[size..size + 2] != b"\r\n" {
            return Err("a chunk not followed by CRLF".to_string());
        }
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunk_handles_pieces_extensions_and_trailers() {
        assert_eq!(dechunk(b"").unwrap(), None);
        assert_eq!(dechunk(b"5\r\nhel").unwrap(), None);
        assert_eq!(dechunk(b"5\r\nhello\r\n").unwrap(), None);
        assert_eq!(
            dechunk(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n").unwrap(),
            Some(b"hello world".to_vec())
        );
        assert_eq!(dechunk(b"0\r\nX-Trailer: 1\r\n").unwrap(), None);
        assert_eq!(
            dechunk(b"A\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n").unwrap(),
            Some(b"0123456789".to_vec())
        );
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"2\r\nabcd\r\n").is_err());
    }

    #[test]
    fn process_state_names_round_trip() {
        for s in [
            ProcessState::Stopped,
            ProcessState::Starting,
            ProcessState::Running,
            ProcessState::Backoff,
            ProcessState::Stopping,
            ProcessState::Exited,
            ProcessState::Fatal,
            ProcessState::Unknown,
        ] {
            assert_eq!(ProcessState::from_name(s.as_str()), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        assert_eq!(ProcessState::from_name("bogus"), ProcessState::Unknown);
    }

    #[test]
    fn full_name_omits_a_group_named_like_the_program() {
        let mut info = ProcessInfo {
            name: "web".into(),
            group: "web".into(),
            state: ProcessState::Running,
            pid: 1,
            spawnerr: String::new(),
            exitstatus: 0,
            description: String::new(),
        };
        assert_eq!(info.full_name(), "web");
        info.group = "site".into();
        assert_eq!(info.full_name(), "site:web");
    }

    #[test]
    fn fault_display_names_code_program_and_remedy() {
        let e = SupervisorError::Fault {
            method: "supervisor.getProcessInfo".into(),
            code: faults::BAD_NAME,
            name: fault_name(faults::BAD_NAME),
            message: "BAD_NAME: nosuch".into(),
        };
        let text = e.to_string();
        assert!(
            text.starts_with("supervisor.getProcessInfo failed with BAD_NAME (10): nosuch; "),
            "{text}"
        );
        assert!(!text.contains('\n'));
        assert_eq!(fault_name(12345), "UNKNOWN");
    }
}
