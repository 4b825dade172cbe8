//! What every signed call of the agent shares (SSM's `GetParameter`, EC2's `CreateTags`): the
//! endpoint (the SDKs' environment variables, the user-data setting, the region's), the
//! instance's identity and role credentials ([`InstanceRole`], fetched again once when AWS
//! refuses them), one POST signed with SigV4, retried with backoff on throttling, 5xx and
//! transport errors inside one deadline, and the error code and message of the answer (JSON or
//! XML). TLS trusts what the system trusts when the caller made its configuration
//! ([`super::tls::client_config`]).
//!
//! Bodies are never quoted in logs or errors by this module: an answer may hold a secret.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sigv4::{self, Credentials};
use crate::imds::role::{unix_now, CredentialCache, RoleCredentials};
use crate::imds::{ImdsClient, ImdsError};

pub const GLOBAL_ENDPOINT_ENV: &str = "AWS_ENDPOINT_URL";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(3);
const MAX_BODY: u64 = 256 * 1024;

/// The endpoint of `service` (`ssm`, `ec2`): `service_env` (`AWS_ENDPOINT_URL_SSM`, ...), then
/// `AWS_ENDPOINT_URL`, then the user-data setting, else the region's.
pub fn endpoint(service: &str, service_env: &str, region: &str, setting: Option<&str>) -> String {
    endpoint_from(
        std::env::var(service_env).ok().as_deref(),
        std::env::var(GLOBAL_ENDPOINT_ENV).ok().as_deref(),
        setting,
        service,
        region,
    )
}

pub fn endpoint_from(
    service_env: Option<&str>,
    global_env: Option<&str>,
    setting: Option<&str>,
    service: &str,
    region: &str,
) -> String {
    let chosen = [service_env, global_env, setting]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|v| !v.is_empty());
    match chosen {
        Some(endpoint) => endpoint.trim_end_matches('/').to_string(),
        None if region.starts_with("cn-") => format!("https://{service}.{region}.amazonaws.com.cn"),
        None => format!("https://{service}.{region}.amazonaws.com"),
    }
}

/// The partition of `region`, as ARNs name it.
pub fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// An ARN of `service` in `region` (the partition's), as IAM policies name it; `ACCOUNT` stands
/// for an account the identity document did not give.
pub fn arn(service: &str, region: &str, account: &str, resource: &str) -> String {
    let account = if account.is_empty() {
        "ACCOUNT"
    } else {
        account
    };
    format!(
        "arn:{}:{service}:{region}:{account}:{resource}",
        partition(region)
    )
}

/// Signed calls as this instance: its id, region and account from the identity document (read
/// once), the service's endpoint, and the role's credentials from IMDS (cached, refreshed before
/// they expire).
pub struct InstanceRole {
    pub instance_id: String,
    pub region: String,
    pub account: String,
    pub endpoint: String,
    /// The signing name (`ssm`, `ec2`).
    service: &'static str,
    imds: ImdsClient,
    cache: CredentialCache,
    deadline: Duration,
}

impl InstanceRole {
    /// `imds` must be able to answer for the whole of `deadline`, the time each [`Self::call`]
    /// has with its retries. The endpoint: see [`endpoint`].
    pub fn new(
        mut imds: ImdsClient,
        service: &'static str,
        service_env: &str,
        endpoint_setting: Option<&str>,
        deadline: Duration,
    ) -> Result<Self, ImdsError> {
        let identity = imds.identity()?;
        Ok(InstanceRole {
            endpoint: endpoint(service, service_env, &identity.region, endpoint_setting),
            instance_id: identity.instance_id,
            region: identity.region,
            account: identity.account_id,
            service,
            imds,
            cache: CredentialCache::new(),
            deadline,
        })
    }

    /// The role's credentials, from the cache or from IMDS (within this role's deadline from
    /// now, however long ago the role was made).
    pub fn credentials(&mut self) -> Result<RoleCredentials, ImdsError> {
        self.imds.renew_deadline(self.deadline);
        self.cache.get(&mut self.imds, unix_now()).cloned()
    }

    /// Forgets the cached credentials, as their expiry would.
    #[cfg(test)]
    pub fn forget_credentials(&mut self) {
        self.cache.invalidate();
    }

    /// Runs `attempt` (given this instance, the call to make and the role's credentials) until
    /// the deadline.
    /// When AWS refuses the credentials themselves (`refused` says so of an error), they were
    /// rotated or revoked under us: they are fetched again, once. IMDS failing is `no_role`.
    pub fn call<T, E>(
        &mut self,
        tls: &Arc<rustls::ClientConfig>,
        no_role: impl Fn(ImdsError) -> E,
        refused: impl Fn(&E) -> bool,
        mut attempt: impl FnMut(&Self, Call<'_>, &RoleCredentials) -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = Instant::now() + self.deadline;
        let mut refreshed = false;
        loop {
            let creds = self.credentials().map_err(&no_role)?;
            let call = Call {
                endpoint: &self.endpoint,
                region: &self.region,
                service: self.service,
                deadline,
                tls: tls.clone(),
            };
            match attempt(self, call, &creds) {
                Err(e) if !refreshed && refused(&e) => {
                    tracing::info!(
                        service = self.service,
                        "AWS refused the cached role credentials; fetching new ones"
                    );
                    self.cache.invalidate();
                    refreshed = true;
                }
                result => return result,
            }
        }
    }
}

/// One signed POST to one endpoint, until `deadline`.
pub struct Call<'a> {
    pub endpoint: &'a str,
    pub region: &'a str,
    /// The signing name (`ssm`, `ec2`).
    pub service: &'a str,
    pub deadline: Instant,
    pub tls: Arc<rustls::ClientConfig>,
}

/// How a call ended.
#[derive(Debug)]
pub enum Answer {
    /// HTTP 200 and its body.
    Ok(Vec<u8>),
    /// An error AWS gave that retrying does not cure.
    Error {
        status: u16,
        code: String,
        message: String,
    },
    /// Retrying (throttling, 5xx, network) did not succeed before the deadline.
    GaveUp { last_error: String },
}

enum Attempt {
    Done(Answer),
    Retry(String),
}

/// Error codes AWS uses for throttling, in JSON and Query APIs.
const THROTTLING: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
];

impl Call<'_> {
    /// POSTs `body` with `headers` (Host is added), signed with `credentials`, retrying what
    /// can be retried.
    pub fn post(&self, headers: &[(&str, &str)], body: &[u8], credentials: &Credentials) -> Answer {
        let mut delay = BACKOFF_START;
        let mut last_error: Option<String> = None;
        loop {
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match self.once(headers, body, credentials, remaining) {
                Attempt::Done(answer) => return answer,
                Attempt::Retry(error) => {
                    tracing::debug!(service = self.service, "{error}; retrying");
                    // An attempt our own deadline cut short (its timeout is what was left)
                    // says less than the answer before it (an HTTP 500, a throttling code).
                    if last_error.is_none() || Instant::now() < self.deadline {
                        last_error = Some(error);
                    }
                }
            }
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            if delay >= remaining {
                break;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(BACKOFF_CAP);
        }
        Answer::GaveUp {
            last_error: last_error
                .unwrap_or_else(|| "no request could be made before the deadline".into()),
        }
    }

    fn once(
        &self,
        extra: &[(&str, &str)],
        body: &[u8],
        credentials: &Credentials,
        remaining: Duration,
    ) -> Attempt {
        let mut headers = vec![("Host".to_string(), host_of(self.endpoint).to_string())];
        headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        let amz_date = sigv4::amz_date(unix_now());
        let signed = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                path: "/",
                query: "",
                headers: headers.clone(),
                body,
            },
            &sigv4::Scope {
                region: self.region,
                service: self.service,
                amz_date: &amz_date,
                content_sha256_header: false,
            },
            credentials,
        );
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT.min(remaining))
            .timeout(REQUEST_TIMEOUT.min(remaining))
            .redirects(0)
            .user_agent(concat!("stackless-init/", env!("CARGO_PKG_VERSION")))
            .tls_connector(Arc::new(super::tls::Connector(self.tls.clone())))
            .build();
        let mut request = agent.post(&format!("{}/", self.endpoint));
        for (n, v) in &headers {
            request = request.set(n, v);
        }
        for (n, v) in &signed.headers {
            request = request.set(n, v);
        }
        let (status, response) = match request.send_bytes(body) {
            Ok(response) => (response.status(), response),
            Err(ureq::Error::Status(status, response)) => (status, response),
            Err(ureq::Error::Transport(t)) => return Attempt::Retry(format!("{t}")),
        };
        let mut text = Vec::new();
        if let Err(e) = response.into_reader().take(MAX_BODY).read_to_end(&mut text) {
            return Attempt::Retry(format!("reading the answer failed: {e}"));
        }
        if status == 200 {
            return Attempt::Done(Answer::Ok(text));
        }
        let (code, message) = error_code(&text);
        if THROTTLING.contains(&code.as_str()) || status == 429 || status >= 500 {
            return Attempt::Retry(format!("HTTP {status} {code}"));
        }
        Attempt::Done(Answer::Error {
            status,
            code,
            message: message.chars().take(300).collect(),
        })
    }
}

/// Codes meaning AWS refused the credentials themselves (not the permission).
pub fn credentials_refused(code: &str) -> bool {
    matches!(
        code,
        "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "AuthFailure"
    )
}

/// The error code (without a JSON namespace prefix) and message of an AWS error answer: JSON
/// (`__type`, `message`) or XML (`<Code>`, `<Message>`: the Query APIs, and moto's
/// authentication errors).
pub fn error_code(body: &[u8]) -> (String, String) {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let code = value["__type"]
            .as_str()
            .or(value["code"].as_str())
            .unwrap_or("")
            .rsplit('#')
            .next()
            .unwrap_or("")
            .to_string();
        let message = value["message"]
            .as_str()
            .or(value["Message"].as_str())
            .unwrap_or("")
            .to_string();
        return (code, message);
    }
    let text = String::from_utf8_lossy(body);
    let between = |open: &str, close: &str| {
        text.split_once(open)
            .and_then(|(_, rest)| rest.split_once(close))
            .map(|(v, _)| v.trim().to_string())
            .unwrap_or_default()
    };
    (
        between("<Code>", "</Code>"),
        between("<Message>", "</Message>"),
    )
}

/// `host[:port]` of `scheme://host[:port]/...`.
pub fn host_of(endpoint: &str) -> &str {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_the_sdk_order() {
        assert_eq!(
            endpoint_from(None, None, None, "ec2", "eu-west-1"),
            "https://ec2.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            endpoint_from(None, None, None, "ec2", "cn-north-1"),
            "https://ec2.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            endpoint_from(
                Some("https://ec2.vpce"),
                Some("http://127.0.0.1:1"),
                Some("https://x"),
                "ec2",
                "eu-west-1"
            ),
            "https://ec2.vpce"
        );
        assert_eq!(
            endpoint_from(None, Some(" "), Some("https://x/"), "ec2", "eu-west-1"),
            "https://x"
        );
    }

    #[test]
    fn error_codes_from_json_and_xml() {
        assert_eq!(
            error_code(br#"{"__type":"com.amazon#ThrottlingException","message":"slow"}"#),
            ("ThrottlingException".into(), "slow".into())
        );
        let xml = b"<?xml version=\"1.0\"?><Response><Errors><Error><Code>UnauthorizedOperation\
            </Code><Message>You are not authorized</Message></Error></Errors></Response>";
        assert_eq!(
            error_code(xml),
            (
                "UnauthorizedOperation".into(),
                "You are not authorized".into()
            )
        );
        assert_eq!(error_code(b""), (String::new(), String::new()));
    }
}
