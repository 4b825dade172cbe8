//! A stand-in for SSM Run Command in front of moto. Moto's Run Command is fake (no
//! DescribeInstanceInformation online list, empty output), so this small server on loopback
//! speaks the SSM JSON protocol (`POST /`, `X-Amz-Target: AmazonSSM.<Op>`, awsJson1.1) for:
//!
//! - DescribeInstanceInformation: an instance is Online once moto says it is running and
//!   `online_after` has passed since the shim first saw it so (never, with `online_after: None`);
//! - SendCommand (AWS-RunShellScript): REALLY runs the commands, as the agent does, with `sh -c`
//!   (dash here, like Debian), in a scratch folder per instance with `STACKLESS_STAGE` pointing at
//!   a scratch stage, honouring `executionTimeout`; it records exactly what was sent and refuses
//!   documents over 64 KB;
//! - GetCommandInvocation: `InvocationDoesNotExist` on the first call (SSM's own lag), then
//!   `InProgress` for `in_progress_for` and until the command ends, then Success / Failed /
//!   TimedOut / Cancelled with real stdout and stderr cut at 24,000 and 8,000 characters like SSM,
//!   and the exit code as ResponseCode;
//! - CancelCommand;
//!
//! and forwards every other SSM operation (GetParameter, PutParameter, ...) to moto unchanged.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const STDOUT_LIMIT: usize = 24_000;
pub const STDERR_LIMIT: usize = 8_000;
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ShimOptions {
    /// How long after moto shows an instance running it turns Online; `None`: never.
    pub online_after: Option<Duration>,
    /// The least time an invocation stays InProgress.
    pub in_progress_for: Duration,
    /// Answer the first GetCommandInvocation of each command with InvocationDoesNotExist.
    pub invocation_lag: bool,
}

impl Default for ShimOptions {
    fn default() -> Self {
        ShimOptions {
            online_after: Some(Duration::ZERO),
            in_progress_for: Duration::from_millis(100),
            invocation_lag: true,
        }
    }
}

/// One SendCommand as received.
#[derive(Debug, Clone)]
pub struct Sent {
    pub command_id: String,
    pub instance_id: String,
    pub document: String,
    pub commands: Vec<String>,
    pub execution_timeout: Option<String>,
    pub comment: String,
}

#[derive(Debug, Clone)]
struct Outcome {
    status: &'static str,
    code: i32,
    stdout: String,
    stderr: String,
}

struct Invocation {
    started: Instant,
    asked: bool,
    cancel: Arc<AtomicBool>,
    done: Arc<Mutex<Option<Outcome>>>,
}

struct State {
    moto: String,
    opts: ShimOptions,
    scratch: tempfile::TempDir,
    running_since: HashMap<String, Instant>,
    invocations: HashMap<(String, String), Invocation>,
    sent: Vec<Sent>,
    ops: Vec<String>,
}

/// The running shim; stopped on drop.
pub struct SsmShim {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SsmShim {
    pub fn start(moto_endpoint: &str, opts: ShimOptions) -> SsmShim {
        let server =
            Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("binding the SSM shim"));
        let port = server.server_addr().to_ip().expect("an IP address").port();
        let state = Arc::new(Mutex::new(State {
            moto: moto_endpoint.to_string(),
            opts,
            scratch: tempfile::tempdir().expect("a scratch folder"),
            running_since: HashMap::new(),
            invocations: HashMap::new(),
            sent: Vec::new(),
            ops: Vec::new(),
        }));
        let (s, st) = (server.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                handle(&st, req);
            }
        });
        SsmShim {
            endpoint: format!("http://127.0.0.1:{port}"),
            state,
            server,
            thread: Some(thread),
        }
    }

    /// An SSM client for this shim, everything else as `config`.
    pub fn client(&self, config: &aws_config::SdkConfig) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::config::Builder::from(config)
                .endpoint_url(&self.endpoint)
                .build(),
        )
    }

    /// Where the commands sent to `instance` stage their files (`STACKLESS_STAGE`).
    pub fn stage(&self, instance: &str) -> PathBuf {
        self.state
            .lock()
            .unwrap()
            .scratch
            .path()
            .join(instance)
            .join("stage")
    }

    /// Every SendCommand so far, in order.
    pub fn sent(&self) -> Vec<Sent> {
        self.state.lock().unwrap().sent.clone()
    }

    /// Every operation the shim answered or forwarded, in order.
    pub fn ops(&self) -> Vec<String> {
        self.state.lock().unwrap().ops.clone()
    }

    pub fn set_in_progress_for(&self, d: Duration) {
        self.state.lock().unwrap().opts.in_progress_for = d;
    }
}

impl Drop for SsmShim {
    fn drop(&mut self) {
        for inv in self.state.lock().unwrap().invocations.values() {
            inv.cancel.store(true, Ordering::SeqCst);
        }
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn respond(req: tiny_http::Request, status: u16, body: Value) {
    let resp = tiny_http::Response::from_data(body.to_string().into_bytes())
        .with_status_code(status)
        .with_header(
            tiny_http::Header::from_bytes("Content-Type", "application/x-amz-json-1.1").unwrap(),
        )
        .with_header(
            tiny_http::Header::from_bytes(
                "x-amzn-RequestId",
                "00000000-0000-0000-0000-000000000000",
            )
            .unwrap(),
        );
    let _ = req.respond(resp);
}

fn error(req: tiny_http::Request, code: &str, message: &str) {
    respond(req, 400, json!({ "__type": code, "message": message }));
}

fn handle(state: &Arc<Mutex<State>>, mut req: tiny_http::Request) {
    let target = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("X-Amz-Target"))
        .map(|h| h.value.as_str().to_string())
        .unwrap_or_default();
    let mut body = Vec::new();
    let _ = req.as_reader().read_to_end(&mut body);
    let op = target
        .strip_prefix("AmazonSSM.")
        .unwrap_or(&target)
        .to_string();
    state.lock().unwrap().ops.push(op.clone());
    let input: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match op.as_str() {
        "DescribeInstanceInformation" => describe_instance_information(state, req, &input),
        "SendCommand" => send_command(state, req, &input),
        "GetCommandInvocation" => get_command_invocation(state, req, &input),
        "CancelCommand" => cancel_command(state, req, &input),
        _ => forward(state, req, body),
    }
}

/// Sends a query-protocol request (EC2, IAM) straight to moto and returns the XML.
pub fn moto_query(moto: &str, service: &str, params: &[(&str, &str)]) -> Result<String, String> {
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential=testing/20240101/{}/{service}/aws4_request, SignedHeaders=host, Signature=0",
        if service == "iam" { "us-east-1" } else { "eu-west-1" }
    );
    match ureq::post(&format!("{moto}/"))
        .set("Authorization", &auth)
        .send_form(params)
    {
        Ok(r) => r.into_string().map_err(|e| e.to_string()),
        Err(ureq::Error::Status(code, r)) => {
            Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Creates an IAM instance profile in moto (RunInstances checks that it exists).
pub fn create_instance_profile(moto: &str, name: &str) {
    moto_query(
        moto,
        "iam",
        &[
            ("Action", "CreateInstanceProfile"),
            ("Version", "2010-05-08"),
            ("InstanceProfileName", name),
        ],
    )
    .expect("creating an instance profile in moto");
}

/// Whether moto shows the instance running.
fn running_in_moto(moto: &str, instance: &str) -> bool {
    let Ok(xml) = moto_query(
        moto,
        "ec2",
        &[
            ("Action", "DescribeInstances"),
            ("Version", "2016-11-15"),
            ("InstanceId.1", instance),
        ],
    ) else {
        return false;
    };
    xml.find("<instanceState>")
        .map(|at| {
            xml[at..]
                .split("</instanceState>")
                .next()
                .unwrap_or("")
                .contains("<name>running</name>")
        })
        .unwrap_or(false)
}

/// Whether the shim has the instance online now.
fn online(state: &Arc<Mutex<State>>, instance: &str) -> bool {
    let (moto, after) = {
        let s = state.lock().unwrap();
        (s.moto.clone(), s.opts.online_after)
    };
    let Some(after) = after else { return false };
    if !running_in_moto(&moto, instance) {
        return false;
    }
    let mut s = state.lock().unwrap();
    let since = *s
        .running_since
        .entry(instance.to_string())
        .or_insert_with(Instant::now);
    since.elapsed() >= after
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn describe_instance_information(
    state: &Arc<Mutex<State>>,
    req: tiny_http::Request,
    input: &Value,
) {
    let mut wanted: Vec<String> = Vec::new();
    for f in input["Filters"].as_array().into_iter().flatten() {
        if f["Key"] == "InstanceIds" {
            wanted.extend(strings(&f["Values"]));
        }
    }
    for f in input["InstanceInformationFilterList"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if f["key"] == "InstanceIds" {
            wanted.extend(strings(&f["valueSet"]));
        }
    }
    let list: Vec<Value> = wanted
        .iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .filter(|id| online(state, id))
        .map(|id| {
            json!({
                "InstanceId": id,
                "PingStatus": "Online",
                "LastPingDateTime": now_secs(),
                "AgentVersion": "3.3.0.0",
                "IsLatestVersion": true,
                "PlatformType": "Linux",
                "PlatformName": "Debian GNU/Linux",
                "PlatformVersion": "12",
                "ResourceType": "EC2Instance",
            })
        })
        .collect();
    respond(req, 200, json!({ "InstanceInformationList": list }));
}

fn send_command(state: &Arc<Mutex<State>>, req: tiny_http::Request, input: &Value) {
    let document = input["DocumentName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if document != "AWS-RunShellScript" {
        return error(
            req,
            "InvalidDocument",
            &format!("the shim only runs AWS-RunShellScript, not {document}"),
        );
    }
    let instances = strings(&input["InstanceIds"]);
    let commands = strings(&input["Parameters"]["commands"]);
    let size: usize = commands.iter().map(|c| c.len()).sum();
    if size > MAX_DOCUMENT_BYTES {
        return error(
            req,
            "ValidationException",
            &format!("the document's parameters are {size} bytes; the limit is 64 KB"),
        );
    }
    for i in &instances {
        if !online(state, i) {
            return error(
                req,
                "InvalidInstanceId",
                "Instances not in a valid state for account",
            );
        }
    }
    let execution_timeout = strings(&input["Parameters"]["executionTimeout"])
        .into_iter()
        .next();
    let limit = Duration::from_secs(
        execution_timeout
            .as_deref()
            .and_then(|t| t.parse().ok())
            .unwrap_or(3600),
    );
    let command_id = format!("{:08x}-0000-4000-8000-{:012x}", rand_u32(), rand_u32());
    let script = commands.join("\n");
    let mut s = state.lock().unwrap();
    for i in &instances {
        let root = s.scratch.path().join(i);
        let (stage, cwd) = (root.join("stage"), root.join("cwd"));
        std::fs::create_dir_all(&stage).unwrap();
        std::fs::create_dir_all(&cwd).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(None));
        run(
            script.clone(),
            cwd,
            stage,
            limit,
            cancel.clone(),
            done.clone(),
        );
        s.invocations.insert(
            (command_id.clone(), i.clone()),
            Invocation {
                started: Instant::now(),
                asked: false,
                cancel,
                done,
            },
        );
        s.sent.push(Sent {
            command_id: command_id.clone(),
            instance_id: i.clone(),
            document: document.clone(),
            commands: commands.clone(),
            execution_timeout: execution_timeout.clone(),
            comment: input["Comment"].as_str().unwrap_or_default().to_string(),
        });
    }
    drop(s);
    respond(
        req,
        200,
        json!({ "Command": {
            "CommandId": command_id,
            "DocumentName": document,
            "InstanceIds": instances,
            "Parameters": input["Parameters"],
            "Status": "Pending",
            "RequestedDateTime": now_secs(),
            "TimeoutSeconds": input["TimeoutSeconds"],
        }}),
    );
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

/// Runs the script like the agent: `sh -c`, in its own process group so a timeout or a cancel
/// kills everything it started.
fn run(
    script: String,
    cwd: PathBuf,
    stage: PathBuf,
    limit: Duration,
    cancel: Arc<AtomicBool>,
    done: Arc<Mutex<Option<Outcome>>>,
) {
    use std::os::unix::process::CommandExt;
    std::thread::spawn(move || {
        let child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(&cwd)
            .env("STACKLESS_STAGE", &stage)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                *done.lock().unwrap() = Some(Outcome {
                    status: "Failed",
                    code: -1,
                    stdout: String::new(),
                    stderr: e.to_string(),
                });
                return;
            }
        };
        let pid = child.id();
        let mut out_pipe = child.stdout.take().unwrap();
        let mut err_pipe = child.stderr.take().unwrap();
        let out_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = out_pipe.read_to_end(&mut b);
            b
        });
        let err_t = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err_pipe.read_to_end(&mut b);
            b
        });
        let start = Instant::now();
        let (status, code) = loop {
            if let Ok(Some(st)) = child.try_wait() {
                let code = st.code().unwrap_or(-1);
                break (if code == 0 { "Success" } else { "Failed" }, code);
            }
            let why = if cancel.load(Ordering::SeqCst) {
                Some("Cancelled")
            } else if start.elapsed() >= limit {
                Some("TimedOut")
            } else {
                None
            };
            if let Some(why) = why {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
                let _ = child.wait();
                break (why, -1);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let cap = |b: Vec<u8>, n: usize| {
            String::from_utf8_lossy(&b)
                .chars()
                .take(n)
                .collect::<String>()
        };
        let stdout = cap(out_t.join().unwrap_or_default(), STDOUT_LIMIT);
        let stderr = cap(err_t.join().unwrap_or_default(), STDERR_LIMIT);
        *done.lock().unwrap() = Some(Outcome {
            status,
            code,
            stdout,
            stderr,
        });
    });
}

fn get_command_invocation(state: &Arc<Mutex<State>>, req: tiny_http::Request, input: &Value) {
    let key = (
        input["CommandId"].as_str().unwrap_or_default().to_string(),
        input["InstanceId"].as_str().unwrap_or_default().to_string(),
    );
    let mut s = state.lock().unwrap();
    let (lag, least) = (s.opts.invocation_lag, s.opts.in_progress_for);
    let Some(inv) = s.invocations.get_mut(&key) else {
        drop(s);
        return error(req, "InvocationDoesNotExist", "");
    };
    if lag && !inv.asked {
        inv.asked = true;
        drop(s);
        return error(req, "InvocationDoesNotExist", "");
    }
    inv.asked = true;
    let outcome = inv
        .done
        .lock()
        .unwrap()
        .clone()
        .filter(|_| inv.started.elapsed() >= least);
    drop(s);
    let base = json!({
        "CommandId": key.0,
        "InstanceId": key.1,
        "DocumentName": "AWS-RunShellScript",
        "PluginName": "aws:runShellScript",
        "ExecutionStartDateTime": "2024-01-01T00:00:00.000Z",
    });
    let mut v = base;
    let o = v.as_object_mut().unwrap();
    match outcome {
        None => {
            o.insert("Status".into(), json!("InProgress"));
            o.insert("StatusDetails".into(), json!("InProgress"));
            o.insert("ResponseCode".into(), json!(-1));
            o.insert("StandardOutputContent".into(), json!(""));
            o.insert("StandardErrorContent".into(), json!(""));
        }
        Some(out) => {
            let details = if out.status == "TimedOut" {
                "ExecutionTimedOut"
            } else {
                out.status
            };
            o.insert("Status".into(), json!(out.status));
            o.insert("StatusDetails".into(), json!(details));
            o.insert("ResponseCode".into(), json!(out.code));
            o.insert("StandardOutputContent".into(), json!(out.stdout));
            o.insert("StandardErrorContent".into(), json!(out.stderr));
        }
    }
    respond(req, 200, v);
}

fn cancel_command(state: &Arc<Mutex<State>>, req: tiny_http::Request, input: &Value) {
    let id = input["CommandId"].as_str().unwrap_or_default();
    let s = state.lock().unwrap();
    for ((cid, _), inv) in &s.invocations {
        if cid == id {
            inv.cancel.store(true, Ordering::SeqCst);
        }
    }
    drop(s);
    respond(req, 200, json!({}));
}

/// Everything else goes to moto as it came.
fn forward(state: &Arc<Mutex<State>>, req: tiny_http::Request, body: Vec<u8>) {
    let moto = state.lock().unwrap().moto.clone();
    let mut r = ureq::post(&format!("{moto}{}", req.url()));
    for h in req.headers() {
        let name = h.field.as_str().as_str();
        if ["host", "content-length", "connection", "transfer-encoding"]
            .contains(&name.to_ascii_lowercase().as_str())
        {
            continue;
        }
        r = r.set(name, h.value.as_str());
    }
    let (status, ctype, data) = match r.send_bytes(&body) {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => {
            let status = resp.status();
            let ctype = resp
                .header("Content-Type")
                .unwrap_or("application/x-amz-json-1.1")
                .to_string();
            let mut data = Vec::new();
            let _ = resp.into_reader().read_to_end(&mut data);
            (status, ctype, data)
        }
        Err(e) => (502, "text/plain".to_string(), e.to_string().into_bytes()),
    };
    let resp = tiny_http::Response::from_data(data)
        .with_status_code(status)
        .with_header(tiny_http::Header::from_bytes("Content-Type", ctype.as_bytes()).unwrap());
    let _ = req.respond(resp);
}
