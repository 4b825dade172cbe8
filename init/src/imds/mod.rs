//! IMDSv2 client: the session token, user-data and the instance identity document.
//!
//! Right after boot the metadata service can be slow or briefly absent, so every call retries
//! connection errors, timeouts, 5xx and 429 with a capped exponential backoff, all inside ONE total
//! deadline that starts when the client is created. Each request has short timeouts of its own
//! (connect 1 s, whole request 3 s) and never outlives the remaining deadline.
//!
//! The endpoint is `http://169.254.169.254` unless `AWS_EC2_METADATA_SERVICE_ENDPOINT` (the
//! variable the AWS SDKs use) names another one, such as the `emulator` on loopback.

#[cfg(any(test, feature = "emulator"))]
pub mod emulator;
pub mod role;

use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

/// The instance identity, from /latest/dynamic/instance-identity/document (EC2's JSON field names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub private_ip: String,
    #[serde(default)]
    pub account_id: String,
    #[serde(default)]
    pub image_id: String,
}

impl Identity {
    /// A plausible identity for tests, examples and local boots.
    pub fn example() -> Identity {
        Identity {
            instance_id: "i-0123456789abcdef0".to_string(),
            region: "eu-west-1".to_string(),
            availability_zone: "eu-west-1a".to_string(),
            instance_type: "t3.micro".to_string(),
            private_ip: "10.0.0.12".to_string(),
            account_id: "123456789012".to_string(),
            image_id: "ami-0123456789abcdef0".to_string(),
        }
    }
}

pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254";
pub const ENDPOINT_ENV: &str = "AWS_EC2_METADATA_SERVICE_ENDPOINT";

const TOKEN_PATH: &str = "/latest/api/token";
const USER_DATA_PATH: &str = "/latest/user-data";
const IDENTITY_PATH: &str = "/latest/dynamic/instance-identity/document";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The longest token life IMDS grants (6 hours).
const TOKEN_TTL_SECS: u64 = 21600;
/// Refresh the token this long before IMDS would expire it (at most half its life).
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// How many times a GET answered 401 gets a fresh token before we give up.
const MAX_UNAUTHORIZED: u32 = 3;
/// EC2 caps user-data at 16 KiB; anything far beyond that is not IMDS talking.
const MAX_BODY: u64 = 1 << 20;

const ENABLE_HINT: &str =
    "aws ec2 modify-instance-metadata-options --instance-id ID --http-endpoint enabled";
const HOP_LIMIT_HINT: &str = "the token request (PUT) got no answer: in a container or behind a \
     proxy the PUT response is dropped by the instance's hop limit; raise it with `aws ec2 \
     modify-instance-metadata-options --instance-id ID --http-put-response-hop-limit 2`";

/// Why IMDS could not give us what we asked for. Display is one line: what failed, what to do.
#[derive(Debug)]
pub enum ImdsError {
    /// The token request was refused with 403: the metadata endpoint is disabled for this instance.
    Disabled,
    /// The total deadline passed while the service was unreachable, slow or failing.
    Deadline {
        what: String,
        last_error: String,
        hint: Option<String>,
    },
    /// IMDS answered with a status that retrying cannot fix.
    Http { what: String, status: u16 },
    /// IMDS answered, but not with something we can use.
    Invalid { what: String, detail: String },
    /// No instance profile: `meta-data/iam/security-credentials/` answered 404 or named no role.
    NoRole,
}

impl fmt::Display for ImdsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImdsError::Disabled => write!(
                f,
                "the instance metadata service refused the request with 403 Forbidden: IMDS is \
                 disabled for this instance; enable it with `{ENABLE_HINT}`"
            ),
            ImdsError::Deadline {
                what,
                last_error,
                hint,
            } => {
                write!(
                    f,
                    "{what}: gave up when the deadline passed (last error: {last_error}); "
                )?;
                match hint {
                    Some(hint) => write!(f, "{hint}"),
                    None => write!(
                        f,
                        "check that the instance metadata service is reachable, or point \
                         {ENDPOINT_ENV} at one"
                    ),
                }
            }
            ImdsError::Http { what, status } => {
                write!(f, "{what}: IMDS answered HTTP {status}; ")?;
                match status {
                    401 => write!(
                        f,
                        "the session token was refused even after fetching fresh ones; check \
                         that nothing between us and IMDS rewrites the {TOKEN_HEADER} header"
                    ),
                    404 => write!(
                        f,
                        "the document does not exist there; check that {ENDPOINT_ENV} points at \
                         an EC2 instance metadata service"
                    ),
                    400 | 405 => write!(
                        f,
                        "the endpoint does not speak IMDSv2; check that {ENDPOINT_ENV} points at \
                         an EC2 instance metadata service"
                    ),
                    _ => write!(
                        f,
                        "check the instance metadata options with `aws ec2 \
                         describe-instances --instance-ids ID --query \
                         'Reservations[].Instances[].MetadataOptions'`"
                    ),
                }
            }
            ImdsError::NoRole => write!(
                f,
                "the instance has no IAM role: IMDS serves no credentials under \
                 /latest/meta-data/iam/security-credentials/; attach an instance profile whose \
                 role may read the parameter (`aws ec2 associate-iam-instance-profile \
                 --instance-id ID --iam-instance-profile Name=PROFILE`; the README shows the policy)"
            ),
            ImdsError::Invalid { what, detail } => write!(
                f,
                "{what}: IMDS answered with something unusable: {detail}; check that \
                 {ENDPOINT_ENV} points at an EC2 instance metadata service"
            ),
        }
    }
}

impl std::error::Error for ImdsError {}

struct Token {
    value: String,
    /// When to fetch a new one (a little before IMDS expires it).
    refresh_at: Instant,
}

/// A blocking IMDSv2 client with one total deadline.
pub struct ImdsClient {
    endpoint: String,
    agent: ureq::Agent,
    deadline: Instant,
    token: Option<Token>,
}

/// What one HTTP exchange came to.
enum Step {
    /// 200 with its body.
    Body(Vec<u8>),
    /// 404 on a GET.
    NotFound,
    /// 401 on a GET: the token is no good any more.
    Unauthorized,
    /// Worth trying again after a pause; the text says what went wrong.
    Retry(String),
    /// The token PUT timed out: retry, and mention the hop limit if we give up.
    PutTimedOut(String),
    Fatal(ImdsError),
}

impl ImdsClient {
    /// Gives the client a new deadline, `from_now`. A client kept for the agent's life (the role
    /// credentials of the SSM reader and the EC2 reporter) is renewed before each use: its first
    /// deadline is long past when the credentials need fetching again, hours later.
    pub fn renew_deadline(&mut self, from_now: Duration) {
        let now = Instant::now();
        self.deadline = now
            .checked_add(from_now)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
    }

    /// Endpoint from AWS_EC2_METADATA_SERVICE_ENDPOINT (trailing slash tolerated), else DEFAULT_ENDPOINT.
    pub fn from_env(deadline: Duration) -> Self {
        let value = std::env::var(ENDPOINT_ENV).ok();
        Self::new(endpoint_or_default(value.as_deref()), deadline)
    }

    /// A client for `endpoint` (such as `http://169.254.169.254`) whose calls all end within
    /// `deadline` from now.
    pub fn new(endpoint: &str, deadline: Duration) -> Self {
        let start = Instant::now();
        let deadline = start.checked_add(deadline).unwrap_or(
            // An absurd deadline: a century is as good as forever.
            start + Duration::from_secs(100 * 365 * 24 * 3600),
        );
        ImdsClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            agent: Self::agent(CONNECT_TIMEOUT),
            deadline,
            token: None,
        }
    }

    fn agent(connect_timeout: Duration) -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout_connect(connect_timeout)
            .timeout(REQUEST_TIMEOUT)
            .redirects(0)
            .user_agent(concat!("stackless-init/", env!("CARGO_PKG_VERSION")))
            .build()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Raw user-data bytes; Ok(None) when IMDS answers 404 (no user-data is not an error).
    pub fn user_data(&mut self) -> Result<Option<Vec<u8>>, ImdsError> {
        self.get(USER_DATA_PATH)
    }

    /// The instance identity document.
    pub fn identity(&mut self) -> Result<Identity, ImdsError> {
        let what = self.what(IDENTITY_PATH);
        let body = self.get(IDENTITY_PATH)?.ok_or_else(|| ImdsError::Http {
            what: what.clone(),
            status: 404,
        })?;
        serde_json::from_slice(&body).map_err(|e| ImdsError::Invalid {
            what,
            detail: format!("the identity document is not the JSON EC2 serves: {e}"),
        })
    }

    fn what(&self, path: &str) -> String {
        format!("reading {}{}", self.endpoint, path)
    }

    /// GET `path` with a valid token, retrying within the deadline. Ok(None) on 404.
    fn get(&mut self, path: &str) -> Result<Option<Vec<u8>>, ImdsError> {
        let what = self.what(path);
        let mut attempt: u32 = 0;
        let mut unauthorized: u32 = 0;
        let mut last_error = String::from("no request could be made before the deadline");
        let mut put_timed_out = false;
        loop {
            let Some(remaining) = self.remaining() else {
                return Err(self.deadline_error(what, last_error, put_timed_out));
            };
            let token = match &self.token {
                Some(token) if Instant::now() < token.refresh_at => Some(token.value.clone()),
                _ => None,
            };
            let step = match &token {
                None => match self.fetch_token(remaining) {
                    Ok(token) => {
                        put_timed_out = false;
                        self.token = Some(token);
                        continue;
                    }
                    Err(step) => step,
                },
                Some(token) => self.get_once(path, token, remaining),
            };
            let timed_out_put = matches!(step, Step::PutTimedOut(_));
            match step {
                Step::Body(body) => return Ok(Some(body)),
                Step::NotFound => return Ok(None),
                Step::Fatal(e) => return Err(e),
                Step::Unauthorized => {
                    self.token = None;
                    unauthorized += 1;
                    if unauthorized > MAX_UNAUTHORIZED {
                        return Err(ImdsError::Http { what, status: 401 });
                    }
                    tracing::debug!(
                        endpoint = %self.endpoint,
                        path,
                        "IMDS refused the session token (401); fetching a new one"
                    );
                }
                Step::Retry(error) | Step::PutTimedOut(error) => {
                    put_timed_out |= timed_out_put;
                    last_error = error;
                    if !self.back_off(&what, &mut attempt, &last_error) {
                        return Err(self.deadline_error(what, last_error, put_timed_out));
                    }
                }
            }
        }
    }

    /// Sleep before the next attempt; false when that attempt could not start before the deadline.
    fn back_off(&self, what: &str, attempt: &mut u32, last_error: &str) -> bool {
        let delay = BACKOFF_START
            .saturating_mul(1u32 << (*attempt).min(16))
            .min(BACKOFF_CAP);
        *attempt += 1;
        match self.remaining() {
            Some(remaining) if delay < remaining => {
                // Quiet for the usual hiccups of early boot, loud (but not every second) after.
                if *attempt % 10 == 5 {
                    tracing::warn!("{what}: {last_error}; still retrying (attempt {attempt})");
                } else {
                    tracing::debug!("{what}: {last_error}; retrying in {delay:?}");
                }
                std::thread::sleep(delay);
                true
            }
            _ => false,
        }
    }

    fn remaining(&self) -> Option<Duration> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        (!remaining.is_zero()).then_some(remaining)
    }

    fn deadline_error(&self, what: String, last_error: String, put_timed_out: bool) -> ImdsError {
        tracing::warn!(endpoint = %self.endpoint, "{what}: deadline passed; last error: {last_error}");
        ImdsError::Deadline {
            what,
            last_error,
            hint: put_timed_out.then(|| HOP_LIMIT_HINT.to_string()),
        }
    }

    /// The agent for a request that has `remaining` left: the connect timeout must not outlive it.
    fn agent_for(&self, remaining: Duration) -> ureq::Agent {
        if remaining < CONNECT_TIMEOUT {
            Self::agent(remaining)
        } else {
            self.agent.clone()
        }
    }

    fn fetch_token(&self, remaining: Duration) -> Result<Token, Step> {
        let url = format!("{}{}", self.endpoint, TOKEN_PATH);
        let what = format!("requesting an IMDSv2 session token from {url}");
        let requested = Instant::now();
        let result = self
            .agent_for(remaining)
            .put(&url)
            .timeout(REQUEST_TIMEOUT.min(remaining))
            .set(TOKEN_TTL_HEADER, &TOKEN_TTL_SECS.to_string())
            .call();
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(403, _)) => return Err(Step::Fatal(ImdsError::Disabled)),
            Err(ureq::Error::Status(status, _)) if retryable_status(status) => {
                return Err(Step::Retry(format!("token request answered HTTP {status}")));
            }
            Err(ureq::Error::Status(status, _)) => {
                return Err(Step::Fatal(ImdsError::Http { what, status }));
            }
            Err(ureq::Error::Transport(t)) => {
                let error = format!("token request failed: {t}");
                return Err(if is_timeout(&t) {
                    Step::PutTimedOut(error)
                } else {
                    Step::Retry(error)
                });
            }
        };
        if response.status() != 200 {
            return Err(Step::Fatal(ImdsError::Http {
                what,
                status: response.status(),
            }));
        }
        let ttl = response
            .header(TOKEN_TTL_HEADER)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|ttl| *ttl > 0)
            // Never trust a TTL longer than the one asked for.
            .map(|ttl| ttl.min(TOKEN_TTL_SECS))
            .unwrap_or(TOKEN_TTL_SECS);
        let body = read_body(response).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                Step::PutTimedOut(format!("reading the token timed out: {e}"))
            } else {
                Step::Retry(format!("reading the token failed: {e}"))
            }
        })?;
        let value = String::from_utf8(body)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Step::Fatal(ImdsError::Invalid {
                what,
                detail: "the session token is empty or not printable ASCII".to_string(),
            }));
        }
        let ttl = Duration::from_secs(ttl);
        let margin = TOKEN_REFRESH_MARGIN.min(ttl / 2);
        tracing::debug!(endpoint = %self.endpoint, ?ttl, "got an IMDSv2 session token");
        Ok(Token {
            value,
            refresh_at: requested + (ttl - margin),
        })
    }

    fn get_once(&self, path: &str, token: &str, remaining: Duration) -> Step {
        let url = format!("{}{}", self.endpoint, path);
        let result = self
            .agent_for(remaining)
            .get(&url)
            .timeout(REQUEST_TIMEOUT.min(remaining))
            .set(TOKEN_HEADER, token)
            .call();
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(401, _)) => return Step::Unauthorized,
            Err(ureq::Error::Status(404, _)) => return Step::NotFound,
            Err(ureq::Error::Status(403, _)) => return Step::Fatal(ImdsError::Disabled),
            Err(ureq::Error::Status(status, _)) if retryable_status(status) => {
                return Step::Retry(format!("GET {path} answered HTTP {status}"));
            }
            Err(ureq::Error::Status(status, _)) => {
                return Step::Fatal(ImdsError::Http {
                    what: self.what(path),
                    status,
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Step::Retry(format!("GET {path} failed: {t}"))
            }
        };
        if response.status() != 200 {
            return Step::Fatal(ImdsError::Http {
                what: self.what(path),
                status: response.status(),
            });
        }
        match read_body(response) {
            Ok(body) => Step::Body(body),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                Step::Fatal(ImdsError::Invalid {
                    what: self.what(path),
                    detail: e.to_string(),
                })
            }
            Err(e) => Step::Retry(format!("reading the answer to GET {path} failed: {e}")),
        }
    }
}

/// The endpoint the environment variable names, or the default when it is unset or blank.
fn endpoint_or_default(value: Option<&str>) -> &str {
    match value.map(str::trim) {
        Some(endpoint) if !endpoint.is_empty() => endpoint,
        _ => DEFAULT_ENDPOINT,
    }
}

fn retryable_status(status: u16) -> bool {
    status == 429 || (500..=599).contains(&status)
}

/// Whether a transport error is a timeout (as opposed to, say, a refused connection).
fn is_timeout(t: &ureq::Transport) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

fn read_body(response: ureq::Response) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)?;
    if body.len() as u64 > MAX_BODY {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the answer is larger than {MAX_BODY} bytes"),
        ));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::emulator::{Emulator, EmulatorConfig, RequestRecord};
    use super::*;
    use std::net::TcpListener;

    const LONG: Duration = Duration::from_secs(30);

    fn emulator(cfg: EmulatorConfig) -> Emulator {
        Emulator::start(cfg).expect("start the emulator")
    }

    fn summary(records: &[RequestRecord]) -> Vec<(String, String, u16)> {
        records
            .iter()
            .map(|r| (r.method.clone(), r.path.clone(), r.status))
            .collect()
    }

    fn rec(method: &str, path: &str, status: u16) -> (String, String, u16) {
        (method.to_string(), path.to_string(), status)
    }

    #[test]
    fn endpoint_from_env_value() {
        assert_eq!(endpoint_or_default(None), DEFAULT_ENDPOINT);
        assert_eq!(endpoint_or_default(Some("  ")), DEFAULT_ENDPOINT);
        assert_eq!(
            endpoint_or_default(Some("http://127.0.0.1:1338/")),
            "http://127.0.0.1:1338/"
        );
        let client = ImdsClient::new("http://127.0.0.1:1338/", LONG);
        assert_eq!(client.endpoint(), "http://127.0.0.1:1338");
    }

    #[test]
    fn reads_user_data_with_a_token() {
        let emu = emulator(
            EmulatorConfig::new(Identity::example())
                .with_user_data(b"minion_id = \"web\"\n".to_vec()),
        );
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        let data = client.user_data().expect("user-data");
        assert_eq!(data.as_deref(), Some(&b"minion_id = \"web\"\n"[..]));
        let records = emu.requests();
        assert_eq!(
            summary(&records),
            vec![
                rec("PUT", "/latest/api/token", 200),
                rec("GET", "/latest/user-data", 200)
            ]
        );
        assert!(records[1].had_token);
    }

    #[test]
    fn missing_user_data_is_none() {
        let emu = emulator(EmulatorConfig::new(Identity::example()));
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        assert_eq!(client.user_data().expect("no error"), None);
    }

    #[test]
    fn identity_is_parsed_and_the_token_reused() {
        let mut id = Identity::example();
        id.instance_id = "i-0fedcba9876543210".to_string();
        id.region = "us-east-1".to_string();
        id.availability_zone = "us-east-1c".to_string();
        let emu = emulator(EmulatorConfig::new(id.clone()).with_user_data("x"));
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        assert_eq!(client.identity().expect("identity"), id);
        assert!(client.user_data().expect("user-data").is_some());
        let puts = emu.requests().iter().filter(|r| r.method == "PUT").count();
        assert_eq!(puts, 1, "one token serves both calls");
    }

    #[test]
    fn missing_identity_document_is_an_error() {
        // A server that speaks IMDSv2 tokens but has no identity document: our emulator with the
        // document path answering 404 is not possible, so use a tiny server of our own.
        let server = tiny_http::Server::http("127.0.0.1:0").expect("server");
        let addr = server.server_addr().to_ip().expect("ip");
        let thread = std::thread::spawn(move || {
            for _ in 0..2 {
                let Ok(request) = server.recv() else { return };
                let response = if request.url() == TOKEN_PATH {
                    tiny_http::Response::from_string("token")
                } else {
                    tiny_http::Response::from_string("").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        });
        let mut client = ImdsClient::new(&format!("http://{addr}"), LONG);
        let err = client.identity().expect_err("404 on the identity document");
        assert!(
            matches!(err, ImdsError::Http { status: 404, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(IDENTITY_PATH), "{err}");
        thread.join().expect("server thread");
    }

    #[test]
    fn disabled_fails_fast() {
        let emu = emulator(EmulatorConfig::new(Identity::example()));
        emu.set_disabled(true);
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        let start = Instant::now();
        let err = client.user_data().expect_err("disabled");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, ImdsError::Disabled), "{err:?}");
        assert!(err.to_string().contains("--http-endpoint enabled"), "{err}");
        assert_eq!(emu.requests().len(), 1, "no retries");
    }

    #[test]
    fn expired_token_is_refreshed() {
        let emu = emulator(EmulatorConfig::new(Identity::example()).with_user_data("x"));
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        client.user_data().expect("first read");
        emu.expire_tokens();
        assert_eq!(
            client.identity().expect("after expiry"),
            Identity::example()
        );
        assert_eq!(
            summary(&emu.requests()),
            vec![
                rec("PUT", TOKEN_PATH, 200),
                rec("GET", USER_DATA_PATH, 200),
                rec("GET", IDENTITY_PATH, 401),
                rec("PUT", TOKEN_PATH, 200),
                rec("GET", IDENTITY_PATH, 200),
            ]
        );
    }

    #[test]
    fn token_is_renewed_before_its_ttl_ends() {
        let emu = emulator(EmulatorConfig::new(Identity::example()).with_user_data("x"));
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        client.user_data().expect("first read");
        let token = client.token.as_mut().expect("a cached token");
        assert!(token.refresh_at > Instant::now() + Duration::from_secs(21000));
        token.refresh_at = Instant::now();
        client.user_data().expect("second read");
        let statuses: Vec<_> = emu.requests().iter().map(|r| r.method.clone()).collect();
        assert_eq!(
            statuses,
            ["PUT", "GET", "PUT", "GET"],
            "renewed without a 401"
        );
    }

    #[test]
    fn endless_401_is_bounded() {
        let emu = emulator(EmulatorConfig::new(Identity::example()));
        emu.set_token_max_uses(Some(0));
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        let err = client.user_data().expect_err("401 forever");
        assert!(
            matches!(err, ImdsError::Http { status: 401, .. }),
            "{err:?}"
        );
        let unauthorized = emu.requests().iter().filter(|r| r.status == 401).count();
        assert_eq!(unauthorized as u32, MAX_UNAUTHORIZED + 1);
    }

    #[test]
    fn retries_5xx_and_429_then_succeeds() {
        let emu = emulator(EmulatorConfig::new(Identity::example()).with_user_data("x"));
        emu.fail_next(3, 503);
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        assert!(client.user_data().expect("after 503s").is_some());
        emu.fail_next(2, 429);
        assert!(client.user_data().expect("after 429s").is_some());
        let statuses: Vec<u16> = emu.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 503, 503, 200, 200, 429, 429, 200]);
    }

    #[test]
    fn other_4xx_is_not_retried() {
        let emu = emulator(EmulatorConfig::new(Identity::example()));
        emu.fail_next(1, 400);
        let mut client = ImdsClient::new(&emu.endpoint(), LONG);
        let err = client.user_data().expect_err("400 on the token");
        assert!(
            matches!(err, ImdsError::Http { status: 400, .. }),
            "{err:?}"
        );
        assert_eq!(emu.requests().len(), 1);
    }

    #[test]
    fn nothing_listening_ends_at_the_deadline() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let deadline = Duration::from_millis(1200);
        let created = Instant::now();
        let mut client = ImdsClient::new(&format!("http://{addr}"), deadline);
        let start = Instant::now();
        let err = client.user_data().expect_err("nothing listens");
        let elapsed = start.elapsed();
        assert!(elapsed >= deadline / 2, "gave up too early: {elapsed:?}");
        assert!(
            elapsed <= deadline + Duration::from_millis(500),
            "{elapsed:?}"
        );
        match &err {
            ImdsError::Deadline {
                last_error, hint, ..
            } => {
                assert!(last_error.contains("token request failed"), "{last_error}");
                assert!(hint.is_none(), "a refused connection is not a hop limit");
            }
            other => panic!("expected Deadline, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            !text.contains('\n') && text.contains(&addr.to_string()),
            "{text}"
        );
        // The deadline is for the client's whole life, not per call.
        assert!(matches!(client.identity(), Err(ImdsError::Deadline { .. })));
        assert!(created.elapsed() <= deadline + Duration::from_millis(500));
    }

    #[test]
    fn unanswered_token_request_hints_at_the_hop_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accept and hold every connection without ever answering.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                held.push(stream);
            }
        });
        let deadline = Duration::from_millis(1500);
        let mut client = ImdsClient::new(&format!("http://{addr}"), deadline);
        let start = Instant::now();
        let err = client.user_data().expect_err("no answer");
        assert!(start.elapsed() <= deadline + Duration::from_millis(500));
        match &err {
            ImdsError::Deadline {
                hint: Some(hint), ..
            } => {
                assert!(hint.contains("--http-put-response-hop-limit 2"), "{hint}")
            }
            other => panic!("expected Deadline with a hint, got {other:?}"),
        }
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn errors_display_on_one_line() {
        let errors = [
            ImdsError::Disabled,
            ImdsError::Deadline {
                what: "reading x".into(),
                last_error: "refused".into(),
                hint: None,
            },
            ImdsError::Http {
                what: "reading x".into(),
                status: 500,
            },
            ImdsError::Invalid {
                what: "reading x".into(),
                detail: "bad".into(),
            },
            ImdsError::NoRole,
        ];
        for err in errors {
            let text = err.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.len() > 40, "{text}");
        }
    }
}
