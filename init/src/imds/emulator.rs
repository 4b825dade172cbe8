//! A faithful IMDSv2 emulator on a local address, for tests and local boots.
//!
//! It behaves like EC2 with `HttpTokens=required`: `PUT /latest/api/token` with a TTL header of
//! 1..=21600 seconds gives a session token (400 without a valid TTL, 403 when the request carries
//! `X-Forwarded-For`), tokens expire after their TTL, and every GET without a valid token answers
//! 401. It serves user-data, the instance identity document, the common meta-data keys and, when
//! given a role, the role's credentials under `meta-data/iam/` (404 there without one, as on an
//! instance without an instance profile). Like EC2, a leaf answers with or without a trailing
//! slash (botocore's region fetcher asks for `placement/availability-zone/`). Every path is
//! served under EC2's dated API versions as well as `latest` (`GET /` lists them; cloud-init asks
//! for `/2021-03-23/meta-data/...`), and the primary network interface under
//! `meta-data/network/interfaces/macs/MAC/`. Unknown paths (and versions) answer 404 and other
//! methods 405. Tests can also disable the endpoint (403), inject
//! failures, expire tokens and read back what was asked.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::Identity;

const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const MAX_TTL_SECS: u64 = 21600;

/// The API versions EC2 lists at `GET /`, oldest first (`latest` follows them). Each serves the
/// same documents here: clients pick the newest they know and read only what it has.
const API_VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "2021-07-15",
    "2022-09-24",
    "2024-04-11",
];

/// The primary interface's MAC address when none is given: what qemu gives its first NIC, so
/// a local boot's guest sees the interface its metadata describes.
pub const DEFAULT_MAC: &str = "52:54:00:12:34:56";

/// What the emulated instance serves.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub user_data: Option<Vec<u8>>,
    pub identity: Identity,
    /// The instance profile's role and the credentials IMDS hands out for it.
    pub role: Option<RoleConfig>,
    /// The primary network interface's MAC address (`meta-data/mac`).
    pub mac: String,
}

/// An instance profile's role as IMDS serves it under `meta-data/iam/`.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleConfig {
    pub name: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    /// RFC 3339, such as `2026-12-02T18:00:00Z`.
    pub expiration: String,
}

impl std::fmt::Debug for RoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleConfig")
            .field("name", &self.name)
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl EmulatorConfig {
    /// An instance with this identity and no user-data.
    pub fn new(identity: Identity) -> Self {
        EmulatorConfig {
            user_data: None,
            identity,
            role: None,
            mac: DEFAULT_MAC.to_string(),
        }
    }

    pub fn with_role(self, role: RoleConfig) -> Self {
        EmulatorConfig {
            role: Some(role),
            ..self
        }
    }

    pub fn with_mac(self, mac: impl Into<String>) -> Self {
        EmulatorConfig {
            mac: mac.into(),
            ..self
        }
    }

    pub fn with_user_data(self, data: impl Into<Vec<u8>>) -> Self {
        EmulatorConfig {
            user_data: Some(data.into()),
            ..self
        }
    }
}

/// One request the emulator answered.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Whether the request carried an `X-aws-ec2-metadata-token` header (valid or not).
    pub had_token: bool,
}

struct TokenState {
    expires: Instant,
    uses: usize,
}

struct State {
    user_data: Option<Vec<u8>>,
    identity: Identity,
    role: Option<RoleConfig>,
    mac: String,
    pending_time: String,
    disabled: bool,
    fail_next: usize,
    fail_status: u16,
    /// Every answer waits this long first (a slow IMDS).
    delay: std::time::Duration,
    /// The next answers that stop halfway through their body, the connection closed.
    cut_next: usize,
    token_max_uses: Option<usize>,
    tokens: HashMap<String, TokenState>,
    requests: Vec<RequestRecord>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
    counter: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking handler thread must not take the emulator down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An IMDSv2 emulator serving in a background thread; dropping it stops the server.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Serve on a free loopback port (127.0.0.1:0).
    pub fn start(cfg: EmulatorConfig) -> std::io::Result<Emulator> {
        Self::start_on("127.0.0.1:0", cfg)
    }

    /// Serve on `addr` (`HOST:PORT`).
    pub fn start_on(addr: &str, cfg: EmulatorConfig) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let addr = listener.local_addr()?;
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| std::io::Error::other(format!("cannot serve on {addr}: {e}")))?;
        let server = Arc::new(server);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                user_data: cfg.user_data,
                identity: cfg.identity,
                role: cfg.role,
                mac: cfg.mac,
                pending_time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                disabled: false,
                fail_next: 0,
                fail_status: 500,
                delay: std::time::Duration::ZERO,
                cut_next: 0,
                token_max_uses: None,
                tokens: HashMap::new(),
                requests: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            counter: AtomicU64::new(0),
        });
        let thread = {
            let server = Arc::clone(&server);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("imds-emulator".to_string())
                .spawn(move || serve(&server, &shared))?
        };
        Ok(Emulator {
            addr,
            shared,
            server,
            thread: Some(thread),
        })
    }

    /// The endpoint to give a client, as `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_user_data(&self, data: Option<Vec<u8>>) {
        self.shared.lock().user_data = data;
    }

    /// Attach, replace (rotated credentials) or detach the instance profile's role.
    pub fn set_role(&self, role: Option<RoleConfig>) {
        self.shared.lock().role = role;
    }

    /// While disabled, every request answers 403 (the IMDS endpoint is disabled).
    pub fn set_disabled(&self, disabled: bool) {
        self.shared.lock().disabled = disabled;
    }

    /// The next `n` requests of any kind answer `status` (with an empty body).
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut state = self.shared.lock();
        state.fail_next = n;
        state.fail_status = status;
    }

    /// Every answer waits `delay` before it is sent: a slow (or overloaded) IMDS.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.shared.lock().delay = delay;
    }

    /// The next `n` answers send half their body (announcing all of it) and close the
    /// connection: an IMDS that goes away mid-answer.
    pub fn cut_next(&self, n: usize) {
        self.shared.lock().cut_next = n;
    }

    /// Every token issued so far becomes invalid (GETs with it answer 401).
    pub fn expire_tokens(&self) {
        self.shared.lock().tokens.clear();
    }

    /// A token goes invalid after this many GETs (None: no limit).
    pub fn set_token_max_uses(&self, uses: Option<usize>) {
        self.shared.lock().token_max_uses = uses;
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(server: &tiny_http::Server, shared: &Arc<Shared>) {
    loop {
        let request = server.recv();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match request {
            Ok(request) => {
                let for_thread = Arc::clone(shared);
                // One thread per request, so a slow client never holds up the others; the
                // request comes back through the channel if the thread cannot be started.
                let (tx, rx) = std::sync::mpsc::channel::<tiny_http::Request>();
                let spawned = std::thread::Builder::new()
                    .name("imds-emulator-request".to_string())
                    .spawn(move || {
                        if let Ok(request) = rx.recv() {
                            handle(&for_thread, request);
                        }
                    });
                match spawned {
                    Ok(_) => {
                        if let Err(e) = tx.send(request) {
                            handle(shared, e.0);
                        }
                    }
                    Err(_) => handle(shared, request),
                }
            }
            // An accept error (such as too many open files): let it pass, do not spin.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn header_value<'a>(request: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

struct Answer {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn status(status: u16) -> Answer {
        let reason = match status {
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "",
        };
        Answer {
            status,
            body: reason.as_bytes().to_vec(),
            headers: Vec::new(),
        }
    }

    fn ok(body: impl Into<Vec<u8>>) -> Answer {
        Answer {
            status: 200,
            body: body.into(),
            headers: Vec::new(),
        }
    }
}

fn handle(shared: &Shared, request: tiny_http::Request) {
    let method = request.method().as_str().to_string();
    let url = request.url();
    let path = url.split(['?', '#']).next().unwrap_or(url).to_string();
    let had_token = header_value(&request, TOKEN_HEADER).is_some();
    let answer = answer(shared, &request, &method, &path);

    shared.lock().requests.push(RequestRecord {
        method,
        path,
        status: answer.status,
        had_token,
    });

    let (delay, cut) = {
        let mut state = shared.lock();
        let cut = state.cut_next > 0;
        state.cut_next = state.cut_next.saturating_sub(1);
        (state.delay, cut)
    };
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let mut headers = vec![
        ("Content-Type", "text/plain".to_string()),
        ("Server", "EC2ws".to_string()),
    ];
    headers.extend(answer.headers);
    let headers: Vec<tiny_http::Header> = headers
        .into_iter()
        .filter_map(|(name, value)| {
            tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
        })
        .collect();
    // The client may have gone away; nothing to do about it.
    if cut {
        // Content-Length says the whole body; the reader fails halfway, so the server drops
        // the connection there.
        let len = answer.body.len().max(2);
        let half = answer.body[..answer.body.len() / 2].to_vec();
        let reader = std::io::Cursor::new(half).chain(BrokenPipe);
        let response = tiny_http::Response::new(
            tiny_http::StatusCode(answer.status),
            headers,
            reader,
            Some(len),
            None,
        );
        let _ = request.respond(response);
    } else {
        let mut response =
            tiny_http::Response::from_data(answer.body).with_status_code(answer.status);
        for h in headers {
            response.add_header(h);
        }
        let _ = request.respond(response);
    }
}

/// A reader that fails: the rest of a cut answer.
struct BrokenPipe;

impl std::io::Read for BrokenPipe {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "IMDS emulator: answer cut",
        ))
    }
}

fn answer(shared: &Shared, request: &tiny_http::Request, method: &str, path: &str) -> Answer {
    let mut state = shared.lock();
    if state.fail_next > 0 {
        state.fail_next -= 1;
        return Answer {
            status: state.fail_status,
            body: Vec::new(),
            headers: Vec::new(),
        };
    }
    if state.disabled {
        return Answer::status(403);
    }
    match (method, path) {
        ("PUT", "/latest/api/token") => issue_token(shared, &mut state, request),
        (_, "/latest/api/token") => Answer::status(405),
        ("GET", _) => {
            let token_ok = header_value(request, TOKEN_HEADER)
                .is_some_and(|token| use_token(&mut state, token));
            if !token_ok {
                return Answer::status(401);
            }
            let Some(path) = unversioned(path) else {
                return Answer::status(404);
            };
            let path = path.as_str();
            // EC2 answers a leaf with a trailing slash too.
            let found = document(&state, path).or_else(|| {
                path.strip_suffix('/')
                    .filter(|p| !p.is_empty())
                    .and_then(|p| document(&state, p))
            });
            match found {
                Some(body) => Answer::ok(body),
                None => Answer::status(404),
            }
        }
        _ => Answer::status(405),
    }
}

fn issue_token(shared: &Shared, state: &mut State, request: &tiny_http::Request) -> Answer {
    // EC2 refuses token requests that went through a proxy.
    if header_value(request, "X-Forwarded-For").is_some() {
        return Answer::status(403);
    }
    let ttl = header_value(request, TOKEN_TTL_HEADER)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ttl| (1..=MAX_TTL_SECS).contains(ttl));
    let Some(ttl) = ttl else {
        return Answer::status(400);
    };
    let token = new_token(shared);
    let now = Instant::now();
    state.tokens.retain(|_, t| t.expires > now);
    state.tokens.insert(
        token.clone(),
        TokenState {
            expires: now + Duration::from_secs(ttl),
            uses: 0,
        },
    );
    Answer {
        status: 200,
        body: token.into_bytes(),
        headers: vec![(TOKEN_TTL_HEADER, ttl.to_string())],
    }
}

/// Whether `token` is valid now; counts one use when it is.
fn use_token(state: &mut State, token: &str) -> bool {
    let max_uses = state.token_max_uses;
    match state.tokens.get_mut(token) {
        Some(t)
            if t.expires > Instant::now() && !matches!(max_uses, Some(max) if t.uses >= max) =>
        {
            t.uses += 1;
            true
        }
        _ => false,
    }
}

/// An unguessable token that looks like EC2's (base64 text of 56 characters).
fn new_token(shared: &Shared) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let mut token = String::from("AQAEA");
    let mut round = 0u64;
    while token.len() < 56 {
        // RandomState is seeded from the OS's randomness for every new instance.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(n);
        hasher.write_u64(round);
        let mut bits = hasher.finish();
        for _ in 0..10 {
            if token.len() >= 56 {
                break;
            }
            token.push(ALPHABET[(bits & 63) as usize] as char);
            bits >>= 6;
        }
        round += 1;
    }
    token
}

/// `path` under `latest`: a dated version's paths are the same documents. None for a version
/// EC2 does not have (404, as there). `/` and the token path are left as they are.
fn unversioned(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/').unwrap_or(path);
    let (version, tail) = match rest.split_once('/') {
        Some((v, t)) => (v, Some(t)),
        None => (rest, None),
    };
    if version.is_empty() || version == "latest" {
        return Some(path.to_string());
    }
    if !API_VERSIONS.contains(&version) {
        return None;
    }
    Some(match tail {
        Some(t) => format!("/latest/{t}"),
        None => "/latest".to_string(),
    })
}

/// The body EC2 serves at `path` (a GET with a valid token), if any.
fn document(state: &State, path: &str) -> Option<Vec<u8>> {
    let id = &state.identity;
    let text = |s: &str| Some(s.as_bytes().to_vec());
    match path {
        "/" => {
            let mut all = API_VERSIONS.join("\n");
            all.push_str("\nlatest");
            text(&all)
        }
        "/latest" | "/latest/" => {
            if state.user_data.is_some() {
                text("dynamic\nmeta-data\nuser-data")
            } else {
                text("dynamic\nmeta-data")
            }
        }
        "/latest/user-data" => state.user_data.clone(),
        "/latest/dynamic" | "/latest/dynamic/" => text("instance-identity/"),
        "/latest/dynamic/instance-identity" | "/latest/dynamic/instance-identity/" => {
            text("document")
        }
        "/latest/dynamic/instance-identity/document" => {
            text(&identity_document(id, &state.pending_time))
        }
        "/latest/meta-data" | "/latest/meta-data/" => {
            let iam = if state.role.is_some() { "iam/\n" } else { "" };
            text(&format!(
                "ami-id\nhostname\n{iam}instance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nmac\nnetwork/\nplacement/"
            ))
        }
        "/latest/meta-data/iam" | "/latest/meta-data/iam/" => state
            .role
            .as_ref()
            .and_then(|_| text("info\nsecurity-credentials/")),
        "/latest/meta-data/iam/info" => state
            .role
            .as_ref()
            .and_then(|role| text(&role_info(id, role, &state.pending_time))),
        "/latest/meta-data/iam/security-credentials"
        | "/latest/meta-data/iam/security-credentials/" => {
            state.role.as_ref().and_then(|role| text(&role.name))
        }
        "/latest/meta-data/ami-id" => text(&id.image_id),
        "/latest/meta-data/hostname" | "/latest/meta-data/local-hostname" => {
            text(&private_dns_name(id))
        }
        "/latest/meta-data/instance-id" => text(&id.instance_id),
        "/latest/meta-data/instance-type" => text(&id.instance_type),
        "/latest/meta-data/local-ipv4" => text(&id.private_ip),
        "/latest/meta-data/mac" => text(&state.mac),
        "/latest/meta-data/network" | "/latest/meta-data/network/" => text("interfaces/"),
        "/latest/meta-data/network/interfaces" | "/latest/meta-data/network/interfaces/" => {
            text("macs/")
        }
        "/latest/meta-data/network/interfaces/macs"
        | "/latest/meta-data/network/interfaces/macs/" => text(&format!("{}/", state.mac)),
        "/latest/meta-data/placement" | "/latest/meta-data/placement/" => {
            text("availability-zone\nregion")
        }
        "/latest/meta-data/placement/availability-zone" => text(&id.availability_zone),
        "/latest/meta-data/placement/region" => text(&id.region),
        _ if path.starts_with("/latest/meta-data/network/interfaces/macs/") => {
            interface_document(state, path)
        }
        _ => {
            let role = state.role.as_ref()?;
            let name = path.strip_prefix("/latest/meta-data/iam/security-credentials/")?;
            (name == role.name).then(|| role_credentials(role, &state.pending_time).into_bytes())
        }
    }
}

/// The primary interface's keys under `meta-data/network/interfaces/macs/MAC/` (device 0, the
/// instance's private address; ids derived from the instance id, stable across restarts).
fn interface_document(state: &State, path: &str) -> Option<Vec<u8>> {
    let rest = path.strip_prefix("/latest/meta-data/network/interfaces/macs/")?;
    let (mac, key) = rest.split_once('/').unwrap_or((rest, ""));
    if mac != state.mac {
        return None;
    }
    let id = &state.identity;
    let suffix = id.instance_id.trim_start_matches("i-");
    let body = match key {
        "" => "device-number\ninterface-id\nlocal-hostname\nlocal-ipv4s\nmac\nowner-id".to_string(),
        "device-number" => "0".to_string(),
        "interface-id" => format!("eni-{suffix}"),
        "local-hostname" => private_dns_name(id),
        "local-ipv4s" => id.private_ip.clone(),
        "mac" => state.mac.clone(),
        "owner-id" => id.account_id.clone(),
        _ => return None,
    };
    Some(body.into_bytes())
}

/// The credentials document, laid out the way EC2 lays it out.
fn role_credentials(role: &RoleConfig, last_updated: &str) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string();
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : {},\n  \"Type\" : \"AWS-HMAC\",\n  \
         \"AccessKeyId\" : {},\n  \"SecretAccessKey\" : {},\n  \"Token\" : {},\n  \
         \"Expiration\" : {}\n}}",
        s(last_updated),
        s(&role.access_key_id),
        s(&role.secret_access_key),
        s(&role.token),
        s(&role.expiration)
    )
}

fn role_info(id: &Identity, role: &RoleConfig, last_updated: &str) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string();
    format!(
        "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : {},\n  \
         \"InstanceProfileArn\" : {},\n  \"InstanceProfileId\" : \"AIPAEXAMPLEPROFILEID0\"\n}}",
        s(last_updated),
        s(&format!(
            "arn:aws:iam::{}:instance-profile/{}",
            id.account_id, role.name
        ))
    )
}

/// EC2's private DNS name: `ip-10-0-0-12.eu-west-1.compute.internal` (`ec2.internal` in us-east-1).
fn private_dns_name(id: &Identity) -> String {
    let host = format!("ip-{}", id.private_ip.replace('.', "-"));
    if id.region == "us-east-1" {
        format!("{host}.ec2.internal")
    } else {
        format!("{host}.{}.compute.internal", id.region)
    }
}

/// `arm64` for Graviton instance types (a1, and families with a `g` after the generation, such as
/// t4g, m7gd, c6gn), else `x86_64`.
fn architecture(instance_type: &str) -> &'static str {
    let family = instance_type.split('.').next().unwrap_or("");
    let suffix = family
        .find(|c: char| c.is_ascii_digit())
        .map(|i| family[i..].trim_start_matches(|c: char| c.is_ascii_digit()))
        .unwrap_or("");
    if family == "a1" || suffix.contains('g') {
        "arm64"
    } else {
        "x86_64"
    }
}

/// The identity document, laid out the way EC2 lays it out.
fn identity_document(id: &Identity, pending_time: &str) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string();
    let fields = [
        ("accountId", s(&id.account_id)),
        ("architecture", s(architecture(&id.instance_type))),
        ("availabilityZone", s(&id.availability_zone)),
        ("billingProducts", "null".to_string()),
        ("devpayProductCodes", "null".to_string()),
        ("marketplaceProductCodes", "null".to_string()),
        ("imageId", s(&id.image_id)),
        ("instanceId", s(&id.instance_id)),
        ("instanceType", s(&id.instance_type)),
        ("kernelId", "null".to_string()),
        ("pendingTime", s(pending_time)),
        ("privateIp", s(&id.private_ip)),
        ("ramdiskId", "null".to_string()),
        ("region", s(&id.region)),
        ("version", s("2017-09-30")),
    ];
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("  \"{k}\" : {v}"))
        .collect();
    format!("{{\n{}\n}}", body.join(",\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build()
    }

    fn status(r: Result<ureq::Response, ureq::Error>) -> u16 {
        match r {
            Ok(resp) => resp.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("transport error: {e}"),
        }
    }

    fn token(agent: &ureq::Agent, emu: &Emulator, ttl: &str) -> String {
        agent
            .put(&format!("{}/latest/api/token", emu.endpoint()))
            .set(TOKEN_TTL_HEADER, ttl)
            .call()
            .expect("token")
            .into_string()
            .expect("token body")
    }

    #[test]
    fn token_rules_follow_ec2() {
        let emu = Emulator::start(EmulatorConfig::new(Identity::example())).expect("start");
        let agent = agent();
        let url = format!("{}/latest/api/token", emu.endpoint());
        assert_eq!(status(agent.put(&url).call()), 400, "missing TTL");
        for bad in ["0", "21601", "abc", "-5"] {
            assert_eq!(
                status(agent.put(&url).set(TOKEN_TTL_HEADER, bad).call()),
                400,
                "TTL {bad}"
            );
        }
        let forwarded = agent
            .put(&url)
            .set(TOKEN_TTL_HEADER, "60")
            .set("X-Forwarded-For", "10.0.0.1")
            .call();
        assert_eq!(status(forwarded), 403);
        assert_eq!(status(agent.get(&url).call()), 405);

        let resp = agent
            .put(&url)
            .set(TOKEN_TTL_HEADER, "21600")
            .call()
            .expect("token");
        assert_eq!(resp.header(TOKEN_TTL_HEADER), Some("21600"));
        let tok = resp.into_string().expect("body");
        assert_eq!(tok.len(), 56);
        assert_ne!(tok, token(&agent, &emu, "60"), "tokens are unique");

        let id_url = format!("{}/latest/meta-data/instance-id", emu.endpoint());
        assert_eq!(status(agent.get(&id_url).call()), 401, "IMDSv2 required");
        assert_eq!(
            status(agent.get(&id_url).set(TOKEN_HEADER, "bogus").call()),
            401
        );
        assert_eq!(
            status(agent.delete(&id_url).set(TOKEN_HEADER, &tok).call()),
            405
        );
        let id = agent
            .get(&id_url)
            .set(TOKEN_HEADER, &tok)
            .call()
            .expect("get")
            .into_string()
            .expect("body");
        assert_eq!(id, "i-0123456789abcdef0");

        emu.expire_tokens();
        assert_eq!(
            status(agent.get(&id_url).set(TOKEN_HEADER, &tok).call()),
            401
        );

        let records = emu.requests();
        assert_eq!(records.len(), 14);
        assert_eq!(records[0].method, "PUT");
        assert_eq!(records[0].status, 400);
        assert!(records
            .last()
            .is_some_and(|r| r.had_token && r.status == 401));
    }

    #[test]
    fn tokens_expire_after_ttl_and_max_uses() {
        let emu = Emulator::start(EmulatorConfig::new(Identity::example())).expect("start");
        let agent = agent();
        let url = format!("{}/latest/meta-data/instance-type", emu.endpoint());
        let short = token(&agent, &emu, "1");
        assert_eq!(
            status(agent.get(&url).set(TOKEN_HEADER, &short).call()),
            200
        );
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            status(agent.get(&url).set(TOKEN_HEADER, &short).call()),
            401
        );

        emu.set_token_max_uses(Some(2));
        let tok = token(&agent, &emu, "60");
        for expected in [200, 200, 401] {
            assert_eq!(
                status(agent.get(&url).set(TOKEN_HEADER, &tok).call()),
                expected
            );
        }
    }

    #[test]
    fn a_cut_answer_ends_short_and_a_slow_one_waits() {
        let emu = Emulator::start(
            EmulatorConfig::new(Identity::example()).with_user_data("0123456789abcdef"),
        )
        .expect("start");
        let agent = agent();
        let tok = token(&agent, &emu, "60");
        let get = || {
            agent
                .get(&format!("{}/latest/user-data", emu.endpoint()))
                .set(TOKEN_HEADER, &tok)
                .call()
                .map_err(|e| e.to_string())
                .and_then(|r| r.into_string().map_err(|e| e.to_string()))
        };
        emu.cut_next(1);
        let cut = get();
        assert!(cut.is_err(), "half an answer reads as an error: {cut:?}");
        assert_eq!(
            get().unwrap(),
            "0123456789abcdef",
            "only the next answer is cut"
        );
        emu.set_delay(Duration::from_millis(300));
        let t = Instant::now();
        assert_eq!(get().unwrap(), "0123456789abcdef");
        assert!(t.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn serves_documents_and_failures() {
        let emu = Emulator::start(EmulatorConfig::new(Identity::example()).with_user_data("hello"))
            .expect("start");
        let agent = agent();
        let tok = token(&agent, &emu, "60");
        let get = |path: &str| -> (u16, String) {
            match agent
                .get(&format!("{}{path}", emu.endpoint()))
                .set(TOKEN_HEADER, &tok)
                .call()
            {
                Ok(r) => (r.status(), r.into_string().expect("body")),
                Err(ureq::Error::Status(code, _)) => (code, String::new()),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(get("/latest/user-data"), (200, "hello".to_string()));
        assert!(get("/latest/meta-data/").1.contains("placement/"));
        assert_eq!(get("/latest/meta-data/placement/region").1, "eu-west-1");
        assert_eq!(
            get("/latest/meta-data/placement/availability-zone").1,
            "eu-west-1a"
        );
        assert_eq!(get("/latest/meta-data/local-ipv4").1, "10.0.0.12");
        assert_eq!(get("/latest/meta-data/ami-id").1, "ami-0123456789abcdef0");
        assert_eq!(
            get("/latest/meta-data/local-hostname").1,
            "ip-10-0-0-12.eu-west-1.compute.internal"
        );
        assert_eq!(get("/latest/meta-data/nope").0, 404);

        // Dated versions serve the same documents; unknown ones are 404, as on EC2.
        let versions = get("/").1;
        assert!(versions.contains("\n2021-03-23\n"), "{versions}");
        assert!(versions.starts_with("1.0\n") && versions.ends_with("\nlatest"));
        assert_eq!(
            get("/2021-03-23/meta-data/instance-id"),
            (200, "i-0123456789abcdef0".to_string())
        );
        assert_eq!(get("/2009-04-04/user-data"), (200, "hello".to_string()));
        assert_eq!(get("/2021-03-23/meta-data/"), get("/latest/meta-data/"));
        assert_eq!(get("/2021-03-23").1, get("/latest").1);
        assert_eq!(get("/2099-01-01/meta-data/instance-id").0, 404);
        assert_eq!(get("/nope").0, 404);
        // The primary interface, as cloud-init's crawl reads it.
        assert_eq!(get("/latest/meta-data/mac").1, DEFAULT_MAC);
        assert_eq!(
            get("/latest/meta-data/network/interfaces/macs/").1,
            format!("{DEFAULT_MAC}/")
        );
        let nic = format!("/latest/meta-data/network/interfaces/macs/{DEFAULT_MAC}");
        for key in get(&format!("{nic}/")).1.lines() {
            assert_eq!(get(&format!("{nic}/{key}")).0, 200, "{key}");
        }
        assert_eq!(get(&format!("{nic}/local-ipv4s")).1, "10.0.0.12");
        assert_eq!(get(&format!("{nic}/device-number")).1, "0");
        assert_eq!(
            get(&format!("{nic}/interface-id")).1,
            "eni-0123456789abcdef0"
        );
        assert_eq!(get(&format!("{nic}/nope")).0, 404);
        assert_eq!(
            get("/latest/meta-data/network/interfaces/macs/02:00:00:00:00:01/mac").0,
            404
        );

        let (code, doc) = get("/latest/dynamic/instance-identity/document");
        assert_eq!(code, 200);
        assert!(doc.starts_with("{\n  \"accountId\" : \"123456789012\",\n"));
        let value: serde_json::Value = serde_json::from_str(&doc).expect("json");
        assert_eq!(value["architecture"], "x86_64");
        assert_eq!(value["version"], "2017-09-30");
        assert!(value["pendingTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        let parsed: Identity = serde_json::from_str(&doc).expect("identity");
        assert_eq!(parsed, Identity::example());

        emu.set_user_data(None);
        assert_eq!(get("/latest/user-data").0, 404);

        emu.fail_next(2, 503);
        assert_eq!(get("/latest/meta-data/instance-id").0, 503);
        assert_eq!(get("/latest/meta-data/instance-id").0, 503);
        assert_eq!(get("/latest/meta-data/instance-id").0, 200);

        emu.set_disabled(true);
        let put = agent
            .put(&format!("{}/latest/api/token", emu.endpoint()))
            .set(TOKEN_TTL_HEADER, "60")
            .call();
        assert_eq!(status(put), 403);
    }

    #[test]
    fn concurrent_requests() {
        let emu = Emulator::start(EmulatorConfig::new(Identity::example())).expect("start");
        let agent = agent();
        let tok = token(&agent, &emu, "60");
        let url = format!("{}/latest/meta-data/instance-id", emu.endpoint());
        // A client that connects and never sends anything must not hold up the others.
        let _idle = std::net::TcpStream::connect(emu.addr()).expect("connect");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (agent, url, tok) = (agent.clone(), url.clone(), tok.clone());
                std::thread::spawn(move || {
                    (0..5).all(|_| status(agent.get(&url).set(TOKEN_HEADER, &tok).call()) == 200)
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().expect("thread"));
        }
        assert_eq!(emu.requests().len(), 41);
    }

    #[test]
    fn architecture_from_instance_type() {
        for (t, arch) in [
            ("t3.micro", "x86_64"),
            ("t4g.nano", "arm64"),
            ("c7gn.large", "arm64"),
            ("m6gd.xlarge", "arm64"),
            ("a1.medium", "arm64"),
            ("g5.xlarge", "x86_64"),
            ("g5g.xlarge", "arm64"),
            ("m7i-flex.large", "x86_64"),
        ] {
            assert_eq!(architecture(t), arch, "{t}");
        }
    }

    #[test]
    fn drop_stops_serving() {
        let emu = Emulator::start(EmulatorConfig::new(Identity::example())).expect("start");
        let addr = emu.addr();
        drop(emu);
        // tiny_http closes its listener from its own accept thread, a moment after the drop.
        let closed = (0..100).any(|_| {
            let refused =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err();
            if !refused {
                std::thread::sleep(Duration::from_millis(20));
            }
            refused
        });
        assert!(closed, "still accepting on {addr}");
    }

    #[test]
    fn address_in_use_is_an_error() {
        let emu = Emulator::start(EmulatorConfig::new(Identity::example())).expect("start");
        let err = Emulator::start_on(
            &emu.addr().to_string(),
            EmulatorConfig::new(Identity::example()),
        )
        .err()
        .expect("second bind fails");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains(&emu.addr().to_string()));
    }
}
