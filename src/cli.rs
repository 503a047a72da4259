//! The command line: `serve` (MCP over stdio), `run` (one job in this process) and `call`
//! (one job through a child `serve` process and a real MCP client).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use rmcp::model::CallToolRequestParams;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::ServiceExt;
use serde_json::{Map, Value};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::jobs::{JobProgress, JobRunner};
use crate::mcp::{run_job, JobServer, RunPythonJobParams, RUN_TOOL_NAME};

/// Exit code when the job ran out of time, as `timeout(1)` uses.
const EXIT_TIMEOUT: u8 = 124;
/// Maximum wait for in-flight tool calls to send their results at shutdown.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);
/// Exit code when the request was invalid and nothing ran.
const EXIT_INVALID_REQUEST: u8 = 2;

#[derive(Debug, Parser)]
#[command(version, about = "Run Python code as Prefect flow runs, as an MCP server or from the shell")]
pub struct Cli {
    #[command(subcommand)]
    command: CliCommand,
}

#[derive(Debug, Subcommand)]
enum CliCommand {
    /// Serve MCP over stdio (stdout carries the protocol; logs go to stderr).
    Serve,
    /// Run one job in this process and print its output; the exit code follows the job's.
    Run(JobArgs),
    /// Run one job through a child `serve` process, calling the tool as an MCP client would.
    Call(JobArgs),
}

#[derive(Debug, Args)]
struct JobArgs {
    /// Python code to run.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    code: Option<String>,
    /// File holding the Python code to run.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Seconds the code may run (10-600 by default; the server's limits apply).
    #[arg(long, allow_negative_numbers = true)]
    timeout_seconds: Option<i64>,
    /// Print the whole structured result as JSON on stdout instead of the job's output.
    #[arg(long)]
    json: bool,
}

impl JobArgs {
    fn params(&self) -> anyhow::Result<RunPythonJobParams> {
        let code = match (&self.code, &self.file) {
            (Some(code), _) => code.clone(),
            (None, Some(path)) => {
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
            }
            (None, None) => bail!("give the code with --code or --file"),
        };
        Ok(RunPythonJobParams { code, timeout_seconds: self.timeout_seconds })
    }
}

impl Cli {
    /// Log filter used when `RUST_LOG` is unset: `serve` logs its life at info, while the
    /// one-shot commands print only warnings so the job's output stays readable.
    pub fn default_log_filter(&self) -> &'static str {
        match self.command {
            CliCommand::Serve => "info",
            CliCommand::Run(_) | CliCommand::Call(_) => "warn",
        }
    }

    /// Runs the chosen subcommand.
    ///
    /// # Errors
    /// Returns an error when the settings are invalid or the service cannot start.
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        match self.command {
            CliCommand::Serve => serve().await.map(|()| ExitCode::SUCCESS),
            CliCommand::Run(args) => run_here(&args).await,
            CliCommand::Call(args) => call_through_server(&args).await,
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    info!(api_url = %config.api_url, deployment = %config.deployment, "starting MCP server on stdio");
    let runner = Arc::new(JobRunner::start(config)?);
    tokio::spawn(report_startup_health(Arc::clone(&runner)));
    let server = JobServer::new(Arc::clone(&runner));
    let service =
        server.clone().serve(rmcp::transport::stdio()).await.context("MCP initialization failed")?;
    let cancel = service.cancellation_token();
    let mut waiting = tokio::spawn(service.waiting());

    let stopped_by_client = tokio::select! {
        quit = &mut waiting => {
            info!(reason = ?quit, "MCP client closed the session");
            true
        }
        signal = shutdown_signal() => {
            info!(signal, "stopping on signal");
            false
        }
    };
    // Ending the waits first lets each in-flight call cancel its flow run and send its
    // result before the transport closes.
    runner.shutdown().await;
    if !stopped_by_client {
        server.wait_until_idle(SHUTDOWN_DRAIN).await;
        cancel.cancel();
        if tokio::time::timeout(SHUTDOWN_DRAIN, waiting).await.is_err() {
            warn!("the MCP service did not stop in time");
        }
    }
    info!("MCP server stopped");
    Ok(())
}

/// Logs a warning when Prefect cannot be reached at start-up. The service keeps running:
/// the subscription retries, and jobs get a clear error until Prefect is back.
async fn report_startup_health(runner: Arc<JobRunner>) {
    if let Err(error) = runner.check_health().await {
        warn!(%error, "the Prefect API is unreachable at start-up; jobs fail until it responds");
    }
}

async fn shutdown_signal() -> &'static str {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

async fn run_here(args: &JobArgs) -> anyhow::Result<ExitCode> {
    let params = args.params()?;
    let runner = JobRunner::start(Config::from_env()?)?;
    let reply = run_job(&runner, params, &CancellationToken::new(), &JobProgress::default()).await;
    runner.shutdown().await;
    Ok(print_result(&reply.value, args.json))
}

async fn call_through_server(args: &JobArgs) -> anyhow::Result<ExitCode> {
    let params = args.params()?;
    let program = std::env::current_exe().context("cannot find this program's path")?;
    let transport = TokioChildProcess::new(Command::new(program).configure(|command| {
        command.arg("serve");
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
    }))
    .context("cannot start the MCP server")?;
    let client = ().serve(transport).await.context("MCP initialization with the server failed")?;

    let mut arguments = Map::new();
    arguments.insert("code".to_owned(), Value::String(params.code));
    if let Some(timeout_seconds) = params.timeout_seconds {
        arguments.insert("timeout_seconds".to_owned(), Value::from(timeout_seconds));
    }
    let result = client
        .call_tool(CallToolRequestParams::new(RUN_TOOL_NAME).with_arguments(arguments))
        .await
        .context("the tool call failed")?;
    client.cancel().await.context("closing the MCP session failed")?;
    let Some(value) = result.structured_content else {
        bail!("the tool result has no structured content");
    };
    Ok(print_result(&value, args.json))
}

/// Prints a job's result and picks the process's exit code: the job's own exit code, 124 for
/// a timeout, 128+N when signal N killed the code, 2 for an invalid request, 1 otherwise.
fn print_result(value: &Value, json: bool) -> ExitCode {
    let results = &value["results"];
    if json {
        println!("{value:#}");
    } else {
        print!("{}", results["stdout"].as_str().unwrap_or_default());
        eprint!("{}", results["stderr"].as_str().unwrap_or_default());
        eprintln!("{}", summary_line(value));
    }
    ExitCode::from(exit_code(results))
}

fn summary_line(value: &Value) -> String {
    let results = &value["results"];
    let mut line = format!("k3s-job-runner: {}", results["status"].as_str().unwrap_or("unknown"));
    if let Some(code) = results["exit_code"].as_i64() {
        line.push_str(&format!(", exit code {code}"));
    }
    if let Some(name) = results["flow_run_name"].as_str() {
        line.push_str(&format!(
            ", flow run {name} ({})",
            results["flow_run_id"].as_str().unwrap_or_default()
        ));
    }
    if results["truncated"].as_bool() == Some(true) {
        line.push_str(", output truncated");
    }
    if let Some(elapsed) = value["meta_data"]["elapsed_ms"].as_u64() {
        line.push_str(&format!(", {elapsed} ms"));
    }
    if let Some(error) = results["error"].as_str() {
        line.push_str(&format!("\nk3s-job-runner: {error}"));
    }
    line
}

fn exit_code(results: &Value) -> u8 {
    if results["success"].as_bool() == Some(true) {
        return 0;
    }
    match (results["status"].as_str(), results["exit_code"].as_i64()) {
        (Some("timeout"), _) => EXIT_TIMEOUT,
        (Some("invalid_request"), _) => EXIT_INVALID_REQUEST,
        (_, Some(code)) if code < 0 => 128u8.saturating_add(u8::try_from(-code).unwrap_or(127)),
        (_, Some(code)) if code > 0 => u8::try_from(code).unwrap_or(1),
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn exit_code_follows_job() {
        let cases = [
            (json!({"success": true, "status": "completed", "exit_code": 0}), 0),
            (json!({"success": false, "status": "error", "exit_code": 3}), 3),
            (json!({"success": false, "status": "error", "exit_code": -9}), 137),
            (json!({"success": false, "status": "timeout", "exit_code": -15}), 124),
            (json!({"success": false, "status": "invalid_request", "exit_code": null}), 2),
            (json!({"success": false, "status": "prefect_unreachable", "exit_code": null}), 1),
            (json!({"success": false, "status": "error", "exit_code": 300}), 1),
        ];
        for (results, expected) in cases {
            assert_eq!(exit_code(&results), expected, "{results}");
        }
    }
}
