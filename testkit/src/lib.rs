//! Test support shared by the builder's unit tests and its integration tests (which cannot see
//! the crate's `#[cfg(test)]` items): a real `moto_server` on a free loopback port, the SSM Run
//! Command shim in front of it, and the world a deploy runs in. Tests refuse to run against
//! anything but a local endpoint, so they can never touch a real AWS account.

pub mod faults;
pub mod fuzz;
pub mod roles;
#[cfg(feature = "sdk")]
pub mod ssm_shim;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    // testkit/ sits at the workspace root, beside builder/ and init/.
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `program` with an empty environment but PATH: a fresh HOME (so no `~/.aws`), no `AWS_*`
/// variables, no instance metadata, stdin closed. Tests add what they mean to give it.
pub fn bare_command(program: impl AsRef<std::ffi::OsStr>, home: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    c.env_clear()
        .env("HOME", home)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("no-credentials"))
        .stdin(std::process::Stdio::null());
    c
}

/// `git ARGS` in `dir` with a fixed identity and no system configuration; asserts success and
/// returns the trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .stdin(Stdio::null())
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A finished command's stdout and stderr, as text.
pub fn output_text(o: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `moto_server` from the repository's virtualenv (scripts/install-test-deps.sh), else PATH.
pub fn moto_server_bin() -> PathBuf {
    let venv = repo_root().join(".venv/bin/moto_server");
    if venv.exists() {
        return venv;
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("moto_server"))
            .find(|p| p.exists())
    }) {
        return p;
    }
    panic!("moto_server not found: run scripts/install-test-deps.sh (moto[server]==5.2.5)");
}

/// A Python with botocore and moto (the one beside `moto_server`), for real AWS client code in
/// tests: `STACKLESS_PYTHON` when set.
pub fn python_with_botocore() -> PathBuf {
    if let Some(p) = std::env::var_os("STACKLESS_PYTHON") {
        return PathBuf::from(p);
    }
    let python = moto_server_bin().with_file_name("python");
    assert!(
        python.is_file(),
        "{} is missing: set STACKLESS_PYTHON or run scripts/install-test-deps.sh",
        python.display()
    );
    python
}

/// `python -c SCRIPT` with `input` on stdin; its stdout. Panics with stderr when it fails.
pub fn run_python(python: &Path, script: &str, input: &[u8]) -> Vec<u8> {
    run_python_args(python, script, &[], input)
}

/// Like [`run_python`], with arguments after the script.
pub fn run_python_args(python: &Path, script: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", python.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input)
        .expect("write stdin");
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A running moto_server; killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(moto_server_bin())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        // Ready once it answers HTTP, not once it listens: its first request imports the
        // server's code, and under load a test's first call (one attempt) met a reset.
        loop {
            if answers_http(port) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto_server did not start on {endpoint}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, endpoint }
    }

    #[cfg(feature = "sdk")]
    /// An SDK configuration pointing every service at this moto (static test credentials,
    /// one attempt: moto answers at once or not at all).
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        assert!(
            self.endpoint.starts_with("http://127.0.0.1:"),
            "tests only run against a local moto"
        );
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
            .load()
            .await
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The region every moto test uses.
pub const REGION: &str = "eu-west-1";

#[cfg(feature = "sdk")]
/// What a deploy needs in moto: the default VPC, two of its subnets, a target group `web` on
/// port 8080, and Amazon's x86_64 images (sorted, so tests pick the same ones every run).
pub struct DeployWorld {
    pub vpc: String,
    pub subnets: Vec<String>,
    pub target_group: String,
    pub amis: Vec<String>,
}

#[cfg(feature = "sdk")]
impl DeployWorld {
    pub async fn create(config: &aws_config::SdkConfig) -> DeployWorld {
        let ec2 = aws_sdk_ec2::Client::new(config);
        let elb = aws_sdk_elasticloadbalancingv2::Client::new(config);
        let vpc = ec2
            .describe_vpcs()
            .send()
            .await
            .unwrap()
            .vpcs()
            .iter()
            .find(|v| v.is_default() == Some(true))
            .and_then(|v| v.vpc_id())
            .expect("moto's default VPC")
            .to_string();
        let mut subnets: Vec<String> = ec2
            .describe_subnets()
            .send()
            .await
            .unwrap()
            .subnets()
            .iter()
            .filter(|s| s.vpc_id() == Some(vpc.as_str()))
            .filter_map(|s| s.subnet_id())
            .map(str::to_string)
            .collect();
        subnets.sort();
        subnets.truncate(2);
        let target_group = elb
            .create_target_group()
            .name("web")
            .protocol(aws_sdk_elasticloadbalancingv2::types::ProtocolEnum::Http)
            .port(8080)
            .vpc_id(&vpc)
            .target_type(aws_sdk_elasticloadbalancingv2::types::TargetTypeEnum::Instance)
            .send()
            .await
            .unwrap()
            .target_groups()[0]
            .target_group_arn()
            .unwrap()
            .to_string();
        let mut amis: Vec<String> = ec2
            .describe_images()
            .owners("amazon")
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("architecture")
                    .values("x86_64")
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .images()
            .iter()
            .filter_map(|i| i.image_id())
            .map(str::to_string)
            .collect();
        amis.sort();
        assert!(amis.len() >= 2, "moto lists fewer than two x86_64 images");
        DeployWorld {
            vpc,
            subnets,
            target_group,
            amis,
        }
    }
}

/// Whether an HTTP server on loopback `port` answers a request with a status line.
fn answers_http(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}
