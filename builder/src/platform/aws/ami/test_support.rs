//! Test support for the image modules: a small EC2/SSM shim on loopback in front of a real moto,
//! for what moto cannot show (an image that fails or never finishes, EnableImageDeprecation,
//! a duplicate image name, an SSM permission error). Every request is recorded and, unless a
//! test's answer takes it, forwarded to moto unchanged; a rewrite may then edit moto's answer.
#![allow(dead_code)]

use crate::definition::{self, ImageDef};
use crate::platform::aws::ami::ImageWaits;
use crate::platform::Build;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use testkit::Moto;

/// One request as the shim saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `DescribeImages`, or for JSON services the operation of `X-Amz-Target`.
    pub action: String,
    /// The region the request was signed for.
    pub region: String,
    /// The form parameters (query protocol), in order.
    pub params: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Status, content type, body.
pub type Reply = (u16, String, String);
type Answer = Box<dyn Fn(&Seen) -> Option<Reply> + Send + Sync>;
type Rewrite = Box<dyn Fn(&Seen, String) -> String + Send + Sync>;

#[derive(Default)]
struct Rules {
    answers: Vec<Answer>,
    rewrites: Vec<Rewrite>,
    seen: Vec<Seen>,
}

pub struct Shim {
    pub endpoint: String,
    rules: Arc<Mutex<Rules>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

impl Shim {
    pub fn start(moto: &Moto) -> Shim {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("binding the shim"));
        let port = server.server_addr().to_ip().expect("an IP address").port();
        let rules = Arc::new(Mutex::new(Rules::default()));
        let (srv, r, upstream) = (server.clone(), rules.clone(), moto.endpoint.clone());
        let thread = std::thread::spawn(move || {
            for request in srv.incoming_requests() {
                serve(request, &r, &upstream);
            }
        });
        Shim {
            endpoint: format!("http://127.0.0.1:{port}"),
            rules,
            server,
            thread: Some(thread),
        }
    }

    /// An SDK configuration like moto's, pointed at the shim.
    pub async fn sdk_config(&self, moto: &Moto) -> aws_config::SdkConfig {
        moto.sdk_config()
            .await
            .to_builder()
            .endpoint_url(&self.endpoint)
            .build()
    }

    /// Answers the requests `f` takes instead of moto.
    pub fn answer(&self, f: impl Fn(&Seen) -> Option<Reply> + Send + Sync + 'static) {
        self.rules.lock().unwrap().answers.push(Box::new(f));
    }

    /// Edits moto's answers.
    pub fn rewrite(&self, f: impl Fn(&Seen, String) -> String + Send + Sync + 'static) {
        self.rules.lock().unwrap().rewrites.push(Box::new(f));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.rules.lock().unwrap().seen.clone()
    }

    pub fn seen_action(&self, action: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.action == action)
            .collect()
    }

    /// Makes DescribeImages show `image_id` (in `region`) in `state`, with a state reason.
    pub fn image_state(&self, region: &str, image_id: &str, state: &str, reason: Option<&str>) {
        let (region, id, state) = (region.to_string(), image_id.to_string(), state.to_string());
        let reason = reason.map(|r| format!("<stateReason><code>Client.InternalError</code><message>{r}</message></stateReason>"));
        self.rewrite(move |seen, body| {
            if seen.action != "DescribeImages" || seen.region != region {
                return body;
            }
            set_image_state(&body, &id, &state, reason.as_deref().unwrap_or(""))
        });
    }
}

/// In a DescribeImages answer: the state of one image (the `imageState` that follows its id).
pub fn set_image_state(xml: &str, image_id: &str, state: &str, extra: &str) -> String {
    let marker = format!("<imageId>{image_id}</imageId>");
    let Some(at) = xml.find(&marker) else {
        return xml.to_string();
    };
    let rest = &xml[at..];
    let (Some(s), Some(e)) = (rest.find("<imageState>"), rest.find("</imageState>")) else {
        return xml.to_string();
    };
    let end = e + "</imageState>".len();
    format!(
        "{}{}<imageState>{state}</imageState>{extra}{}",
        &xml[..at],
        &rest[..s],
        &rest[end..]
    )
}

/// An EC2 error answer.
pub fn ec2_error(status: u16, code: &str, message: &str) -> Reply {
    (
        status,
        "text/xml".into(),
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>shim</RequestID></Response>"
        ),
    )
}

/// An EC2 answer with `return` true.
pub fn ec2_ok(action: &str) -> Reply {
    (
        200,
        "text/xml".into(),
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{action}Response xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>shim</requestId><return>true</return></{action}Response>"
        ),
    )
}

/// An SSM (awsJson1.1) error answer.
pub fn json_error(status: u16, kind: &str, message: &str) -> Reply {
    (
        status,
        "application/x-amz-json-1.1".into(),
        serde_json::json!({"__type": kind, "message": message}).to_string(),
    )
}

fn serve(mut request: tiny_http::Request, rules: &Mutex<Rules>, upstream: &str) {
    let mut body = Vec::new();
    let _ = request.as_reader().read_to_end(&mut body);
    let text = String::from_utf8_lossy(&body).into_owned();
    let header = |name: &'static str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().to_string())
            .unwrap_or_default()
    };
    let auth = header("Authorization");
    let region = auth
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').nth(2))
        .unwrap_or_default()
        .to_string();
    let target = header("X-Amz-Target");
    let params = if target.is_empty() {
        form(&text)
    } else {
        Vec::new()
    };
    let action = match target.rsplit_once('.') {
        Some((_, op)) => op.to_string(),
        None => params
            .iter()
            .find(|(k, _)| k == "Action")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
    };
    let seen = Seen {
        action,
        region,
        params,
        body: text,
    };
    let answered = {
        let mut r = rules.lock().unwrap();
        r.seen.push(seen.clone());
        r.answers.iter().find_map(|a| a(&seen))
    };
    let forwarded = answered.is_none();
    let (status, content_type, mut reply) = match answered {
        Some(reply) => reply,
        None => forward(&request, &body, upstream),
    };
    if forwarded && status < 300 {
        let r = rules.lock().unwrap();
        for rewrite in &r.rewrites {
            reply = rewrite(&seen, reply);
        }
    }
    let response = tiny_http::Response::from_string(reply)
        .with_status_code(status)
        .with_header(
            tiny_http::Header::from_bytes("Content-Type", content_type.as_bytes())
                .expect("a header"),
        );
    let _ = request.respond(response);
}

fn forward(request: &tiny_http::Request, body: &[u8], upstream: &str) -> Reply {
    let mut out = ureq::request(
        request.method().as_str(),
        &format!("{upstream}{}", request.url()),
    );
    for h in request.headers() {
        let name = h.field.as_str().as_str();
        if [
            "host",
            "content-length",
            "connection",
            "transfer-encoding",
            "expect",
        ]
        .contains(&name.to_ascii_lowercase().as_str())
        {
            continue;
        }
        out = out.set(name, h.value.as_str());
    }
    let response = match out.send_bytes(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => {
            return (
                502,
                "text/plain".into(),
                format!("shim: moto unreachable: {e}"),
            )
        }
    };
    let status = response.status();
    let content_type = response
        .header("Content-Type")
        .unwrap_or("text/xml")
        .to_string();
    (
        status,
        content_type,
        response.into_string().unwrap_or_default(),
    )
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A small definition named `image`, with nothing to publish, as a base for tests (made here,
/// so the tests do not depend on the shipped definitions).
pub fn def(image: &str) -> ImageDef {
    let dir = tempfile::tempdir().expect("a scratch folder");
    let text = format!(
        "name = \"stackless-{{image}}-{{build_id}}\"\n\
         description = \"stackless {image} test image\"\n\
         [source]\nami = \"ami-12345678\"\n\
         [instance]\nvolume_type = \"gp3\"\n\
         [tags]\nteam = \"platform\"\n\"{}\" = \"wrong\"\n",
        super::tags::IMAGE
    );
    std::fs::write(dir.path().join(format!("{image}.toml")), text).expect("writing the definition");
    let def = definition::load(dir.path(), image).expect("the test definition loads");
    assert!(
        def.regions.is_empty()
            && def.accounts.is_empty()
            && !def.encrypted
            && def.ssm_parameter.is_none()
    );
    def
}

/// A build whose id carries the given time (`YYYYMMDDhhmmss`).
pub fn build_at(n: u32, timestamp: &str, input_hash: &str) -> Build {
    Build {
        id: format!("b-{timestamp}-{n:06}"),
        timestamp: timestamp.to_string(),
        image_name: "unused".into(),
        input_hash: input_hash.to_string(),
        source: "ami-source".into(),
        arch: crate::arch::Arch::X86_64,
        seed_user_data: String::new(),
    }
}

/// A build of now.
pub fn build(n: u32, input_hash: &str) -> Build {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let ts: String = now
        .chars()
        .filter(|c| c.is_ascii_digit())
        .take(14)
        .collect();
    build_at(n, &ts, input_hash)
}

/// Quick waits for tests.
pub fn quick(timeout: Duration) -> ImageWaits {
    ImageWaits {
        timeout,
        interval: Duration::from_millis(20),
        max_interval: Duration::from_millis(100),
        progress: false,
    }
}

/// A seed instance in moto, stopped, from the first of moto's Amazon images.
pub async fn stopped_instance(ec2: &aws_sdk_ec2::Client) -> String {
    let id = running_instance(ec2).await;
    ec2.stop_instances()
        .instance_ids(&id)
        .send()
        .await
        .expect("stopping the seed");
    id
}

pub async fn running_instance(ec2: &aws_sdk_ec2::Client) -> String {
    let images = ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("moto's images");
    let ami = images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .expect("moto has images")
        .to_string();
    let out = ec2
        .run_instances()
        .image_id(ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Small)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("running a seed");
    out.instances()[0].instance_id().unwrap().to_string()
}

/// Tags of a resource, from moto.
pub async fn tags_of(ec2: &aws_sdk_ec2::Client, id: &str) -> BTreeMap<String, String> {
    let out = ec2
        .describe_tags()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("resource-id")
                .values(id)
                .build(),
        )
        .send()
        .await
        .expect("describing tags");
    out.tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// This account's images in the client's region.
pub async fn own_images(ec2: &aws_sdk_ec2::Client) -> Vec<aws_sdk_ec2::types::Image> {
    ec2.describe_images()
        .owners("self")
        .send()
        .await
        .expect("describing images")
        .images()
        .to_vec()
}
