//! The AWS communicator: commands over SSM Run Command (`AWS-RunShellScript`). No SSH, no open
//! port: the agent on the instance calls out to SSM, picks the command up and reports back.
//!
//! Two things about the transport shape this module. The agent runs the document's `commands`
//! with `sh -c` (dash on Debian, which has no `pipefail`), so every command is handed to bash
//! explicitly. And GetCommandInvocation returns at most 24,000 characters of stdout and 8,000 of
//! stderr, so output that reaches those sizes is flagged as cut.

use crate::aws::aws_error;
use crate::aws::waiter::{Check, Wait};
use crate::communicator::last_lines as tail;
use crate::communicator::{CommandOutput, Communicator};
use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use aws_sdk_ssm::error::ProvideErrorMetadata;
use aws_sdk_ssm::operation::get_command_invocation::GetCommandInvocationOutput;
use aws_sdk_ssm::types::{CommandInvocationStatus, InstanceInformationStringFilter, PingStatus};
use std::time::Duration;

/// The most stdout GetCommandInvocation returns.
pub const STDOUT_LIMIT: usize = 24_000;
/// The most stderr GetCommandInvocation returns.
pub const STDERR_LIMIT: usize = 8_000;
/// SendCommand's document (the commands with the rest of the request) must stay under 64 KB.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// How long SSM may take to deliver a command before it gives up (SendCommand `TimeoutSeconds`).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(600);
/// `executionTimeout` of AWS-RunShellScript: 1 second to 48 hours.
const MAX_EXECUTION_SECS: u64 = 172_800;
/// The document that runs shell commands on Linux.
pub const DOCUMENT: &str = "AWS-RunShellScript";

/// Runs commands on one instance over SSM.
#[derive(Clone)]
pub struct SsmCommunicator {
    ssm: aws_sdk_ssm::Client,
    instance_id: String,
    poll: Duration,
    progress: bool,
}

/// The command as the agent receives it: handed to bash (the agent itself uses `sh -c`), quoted
/// so nothing in it is touched by that outer shell.
pub fn wrap(command: &str) -> String {
    format!("exec bash -c '{}'", command.replace('\'', r"'\''"))
}

/// SSM cuts output at a fixed size (and may end it with its own marker): output that reaches the
/// size is taken as cut.
fn at_limit(s: &str, limit: usize) -> bool {
    let t = s.trim_end();
    s.chars().count() + 64 >= limit
        || t.ends_with("---Output truncated---")
        || t.ends_with("---Error truncated----")
}

impl SsmCommunicator {
    /// `poll` is the first pause between GetCommandInvocation calls; it grows from there.
    pub fn new(
        ssm: aws_sdk_ssm::Client,
        instance_id: impl Into<String>,
        poll: Duration,
        progress: bool,
    ) -> Self {
        SsmCommunicator {
            ssm,
            instance_id: instance_id.into(),
            poll,
            progress,
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn max_poll(&self) -> Duration {
        (self.poll * 8).min(Duration::from_secs(10)).max(self.poll)
    }

    /// Waits until the instance's SSM agent has registered and pings Online.
    pub async fn wait_online(&self, timeout: Duration) -> Result<()> {
        self.wait_online_watching(timeout, || async { None }).await
    }

    /// `wait_online`, failing at once when `fail_early` (asked before each look) returns a reason:
    /// the seed's own failure line on its console, say.
    pub async fn wait_online_watching<F, Fut>(&self, timeout: Duration, fail_early: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<String>>,
    {
        let id = self.instance_id.as_str();
        Wait::new(format!("{id} to come online in SSM"), timeout)
            .interval(self.poll, self.max_poll())
            .progress(self.progress)
            .hint(format!(
                "the SSM agent on {id} never reported in. Check that the instance profile ([instance] instance_profile) \
                 has the AmazonSSMManagedInstanceCore policy, that the subnet reaches the SSM endpoints (a public IP or a \
                 NAT gateway, or VPC endpoints for ssm, ssmmessages and ec2messages), and that the SSM agent runs (the \
                 seed's user-data installs it where the source image has none, from S3: that needs a route out or an S3 \
                 gateway endpoint); the instance's console output (`aws ec2 get-console-output --instance-id {id}`) shows its boot"
            ))
            .until(|| async {
                if let Some(why) = fail_early().await {
                    return Ok(Check::Failed(why));
                }
                let out = self
                    .ssm
                    .describe_instance_information()
                    .filters(InstanceInformationStringFilter::builder().key("InstanceIds").values(id).build().context("filter")?)
                    .send()
                    .await;
                match out {
                    Ok(out) => {
                        let info = out.instance_information_list().iter().find(|i| i.instance_id() == Some(id));
                        Ok(match info.and_then(|i| i.ping_status()) {
                            Some(PingStatus::Online) => Check::Ready(()),
                            Some(other) => Check::Waiting(other.as_str().to_string()),
                            None => Check::Waiting("not registered yet".into()),
                        })
                    }
                    Err(e) if matches!(e.code(), Some("InvalidInstanceId" | "InvalidInstanceInformationFilterValue")) => {
                        Ok(Check::Waiting("not registered yet".into()))
                    }
                    Err(e) => Err(aws_error(e)).context("asking SSM whether the instance is online (ssm:DescribeInstanceInformation)"),
                }
            })
            .await?;
        tracing::info!("{id} is online in SSM");
        Ok(())
    }

    async fn send(&self, what: &str, command: &str, timeout: Duration) -> Result<String> {
        let id = &self.instance_id;
        let wrapped = wrap(command);
        if wrapped.len() > MAX_DOCUMENT_BYTES - 1024 {
            bail!(
                "{what}: the command is {} bytes, too big for one SSM SendCommand (the document limit is 64 KB); send files with the transfer stream",
                wrapped.len()
            );
        }
        let exec_secs = timeout.as_secs().clamp(1, MAX_EXECUTION_SECS);
        let comment: String = format!("stackless: {what}").chars().take(100).collect();
        let out = self
            .ssm
            .send_command()
            .instance_ids(id)
            .document_name(DOCUMENT)
            .comment(comment)
            .timeout_seconds(DELIVERY_TIMEOUT.as_secs() as i32)
            .parameters("commands", vec![wrapped])
            .parameters("executionTimeout", vec![exec_secs.to_string()])
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let hint = if e.code() == Some("InvalidInstanceId") {
                    ": SSM does not reach the instance any more (its agent stopped, the instance stopped, or it lost its instance profile)"
                } else {
                    ""
                };
                return Err(aws_error(e)).with_context(|| {
                    format!("sending {what} to {id} over SSM (ssm:SendCommand){hint}")
                });
            }
        };
        out.command()
            .and_then(|c| c.command_id())
            .map(str::to_string)
            .with_context(|| format!("SendCommand for {what} returned no command id"))
    }

    async fn poll(
        &self,
        what: &str,
        command_id: &str,
        timeout: Duration,
    ) -> Result<GetCommandInvocationOutput> {
        let id = &self.instance_id;
        Wait::new(
            format!("{what} on {id}"),
            timeout + DELIVERY_TIMEOUT + Duration::from_secs(60),
        )
        .interval(self.poll, self.max_poll())
        .progress(self.progress)
        .hint(format!(
            "SSM never reported an end for command {command_id}"
        ))
        .until(|| async {
            match self
                .ssm
                .get_command_invocation()
                .command_id(command_id)
                .instance_id(id)
                .send()
                .await
            {
                Ok(out) => Ok(match out.status() {
                    None
                    | Some(
                        CommandInvocationStatus::Pending
                        | CommandInvocationStatus::InProgress
                        | CommandInvocationStatus::Delayed
                        | CommandInvocationStatus::Cancelling,
                    ) => Check::Waiting(
                        out.status()
                            .map(|s| s.as_str())
                            .unwrap_or("Pending")
                            .to_string(),
                    ),
                    Some(_) => Check::Ready(out),
                }),
                // Right after SendCommand the invocation may not exist yet.
                Err(e) if e.code() == Some("InvocationDoesNotExist") => {
                    Ok(Check::Waiting("Pending".into()))
                }
                Err(e) => Err(aws_error(e)).with_context(|| {
                    format!("polling command {command_id} (ssm:GetCommandInvocation)")
                }),
            }
        })
        .await
    }
}

/// Turns the final invocation into the command's output, or an error when it did not run to an
/// exit of its own (timed out, cancelled, undeliverable).
fn interpret(
    what: &str,
    instance: &str,
    timeout: Duration,
    out: &GetCommandInvocationOutput,
) -> Result<CommandOutput> {
    let stdout = out
        .standard_output_content()
        .unwrap_or_default()
        .to_string();
    let stderr = out.standard_error_content().unwrap_or_default().to_string();
    let truncated = at_limit(&stdout, STDOUT_LIMIT) || at_limit(&stderr, STDERR_LIMIT);
    let details = out.status_details().unwrap_or_default();
    let code = out.response_code();
    let last = || {
        format!(
            "\n--- stdout (last lines) ---\n{}\n--- stderr (last lines) ---\n{}",
            tail(&stdout, 20),
            tail(&stderr, 20)
        )
    };
    let status = out
        .status()
        .cloned()
        .unwrap_or(CommandInvocationStatus::Failed);
    match status {
        CommandInvocationStatus::Success => {}
        CommandInvocationStatus::Failed if code >= 0 && !matches!(details, "Undeliverable" | "Terminated" | "DeliveryTimedOut" | "InvalidPlatform" | "AccessDenied") => {}
        CommandInvocationStatus::TimedOut => bail!(
            "{what} timed out on {instance}: SSM stopped it after {} ({details}); raise the time limit ([provision] timeout) or make the step faster{}",
            humantime::format_duration(timeout),
            last()
        ),
        CommandInvocationStatus::Cancelled => {
            bail!("{what} was cancelled on {instance} ({details}): the command was cancelled in SSM, or the instance stopped{}", last())
        }
        other => bail!(
            "{what} did not run on {instance}: SSM reports {} ({details}, response code {code}); check that the instance is running and online in SSM{}",
            other.as_str(),
            last()
        ),
    }
    if truncated {
        tracing::warn!(
            "{what}: the output was cut by SSM, which returns at most {STDOUT_LIMIT} characters of stdout and {STDERR_LIMIT} of stderr"
        );
    }
    Ok(CommandOutput {
        exit_code: code,
        stdout,
        stderr,
        truncated,
    })
}

#[async_trait]
impl Communicator for SsmCommunicator {
    async fn run(&self, what: &str, command: &str, timeout: Duration) -> Result<CommandOutput> {
        let command_id = self.send(what, command, timeout).await?;
        tracing::debug!("{what}: SSM command {command_id} on {}", self.instance_id);
        let out = match self.poll(what, &command_id, timeout).await {
            Ok(out) => out,
            Err(e) => {
                // Our own deadline passed (or polling failed): do not leave it running.
                let _ = self
                    .ssm
                    .cancel_command()
                    .command_id(&command_id)
                    .instance_ids(&self.instance_id)
                    .send()
                    .await;
                return Err(e);
            }
        };
        let result = interpret(what, &self.instance_id, timeout, &out)?;
        tracing::debug!(
            "{what}: exit {}\n{}{}",
            result.exit_code,
            result.stdout,
            result.stderr
        );
        Ok(result)
    }

    fn describe(&self) -> String {
        format!("{} over SSM", self.instance_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn the_wrapper_runs_the_command_in_bash_under_sh() {
        // The agent's `sh -c` is dash on Debian: no pipefail, so the wrapper must reach bash.
        let cmd = "set -euo pipefail\necho \"it's ${BASH_VERSION:+bash}\"\nprintf '%s\\n' 'a b' \"c'd\"\nexit 3\n";
        let o = Command::new("sh")
            .arg("-c")
            .arg(wrap(cmd))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout), "it's bash\na b\nc'd\n");
        assert_eq!(o.status.code(), Some(3));
    }

    fn invocation(
        status: CommandInvocationStatus,
        code: i32,
        details: &str,
        stdout: &str,
    ) -> GetCommandInvocationOutput {
        GetCommandInvocationOutput::builder()
            .status(status)
            .response_code(code)
            .status_details(details)
            .standard_output_content(stdout)
            .standard_error_content("oops\n")
            .build()
    }

    #[test]
    fn statuses_map_to_exit_codes_or_errors() {
        let t = Duration::from_secs(60);
        let ok = interpret(
            "x",
            "i-1",
            t,
            &invocation(CommandInvocationStatus::Success, 0, "Success", "hi\n"),
        )
        .unwrap();
        assert_eq!(
            (ok.exit_code, ok.stdout.as_str(), ok.truncated),
            (0, "hi\n", false)
        );
        let failed = interpret(
            "x",
            "i-1",
            t,
            &invocation(CommandInvocationStatus::Failed, 2, "Failed", ""),
        )
        .unwrap();
        assert_eq!((failed.exit_code, failed.stderr.as_str()), (2, "oops\n"));
        let e = interpret(
            "provisioning",
            "i-1",
            t,
            &invocation(
                CommandInvocationStatus::TimedOut,
                -1,
                "ExecutionTimedOut",
                "step 3\n",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("provisioning timed out on i-1") && e.contains("1m") && e.contains("step 3"),
            "{e}"
        );
        let e = interpret(
            "x",
            "i-1",
            t,
            &invocation(CommandInvocationStatus::Cancelled, -1, "Cancelled", ""),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cancelled"), "{e}");
        let e = interpret(
            "x",
            "i-1",
            t,
            &invocation(CommandInvocationStatus::Failed, -1, "Undeliverable", ""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("did not run on i-1") && e.contains("Undeliverable"),
            "{e}"
        );
    }

    #[test]
    fn output_at_the_ssm_limit_is_flagged() {
        let t = Duration::from_secs(60);
        let full = "x".repeat(STDOUT_LIMIT);
        assert!(
            interpret(
                "x",
                "i-1",
                t,
                &invocation(CommandInvocationStatus::Success, 0, "", &full)
            )
            .unwrap()
            .truncated
        );
        let short = "x".repeat(20_000);
        assert!(
            !interpret(
                "x",
                "i-1",
                t,
                &invocation(CommandInvocationStatus::Success, 0, "", &short)
            )
            .unwrap()
            .truncated
        );
        let marked = "some output\n---Output truncated---";
        assert!(
            interpret(
                "x",
                "i-1",
                t,
                &invocation(CommandInvocationStatus::Success, 0, "", marked)
            )
            .unwrap()
            .truncated
        );
    }
}
