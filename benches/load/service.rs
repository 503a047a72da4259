//! One `k3s-job-runner serve` process driven through rmcp's MCP client, as a chat client
//! drives it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio::process::Command;
use uuid::Uuid;

use crate::WaitMode;

/// Settings of the services the harness starts.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub binary: PathBuf,
    pub api_url: String,
    /// Tag put on every flow run of this harness run, so the events filter selects only them.
    pub tag: String,
    pub poll_interval_ms: u64,
    /// Start-up allowance, long enough for the last of many queued jobs to start.
    pub startup_allowance_seconds: u64,
    /// Further environment variables for the service, applied last.
    pub extra_env: Vec<(String, String)>,
}

/// A job as the harness saw it.
#[derive(Debug, Clone, Serialize)]
pub struct JobSample {
    pub index: usize,
    pub sent_at: DateTime<Utc>,
    pub returned_at: DateTime<Utc>,
    /// The tool's `status`, or `call_failed` when the MCP call itself failed.
    pub status: String,
    pub flow_run_id: Option<Uuid>,
    /// Run time of the sandboxed process, as the flow timed it.
    pub code_ms: Option<u64>,
    /// When the service learned of the run's end, from the reply's `meta_data`.
    pub end_seen_at: Option<DateTime<Utc>>,
    /// `event` or `poll`: how the service learned of the end.
    pub completed_via: Option<String>,
    pub error: Option<String>,
}

impl JobSample {
    pub fn end_to_end_ms(&self) -> f64 {
        milliseconds_between(self.sent_at, self.returned_at)
    }

    /// Returns true when the job ran its code to an ending: the code exited, with code 0 or not.
    pub fn ran(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "error")
    }
}

pub fn milliseconds_between(start: DateTime<Utc>, end: DateTime<Utc>) -> f64 {
    (end - start).num_microseconds().map_or(f64::NAN, |micros| micros as f64 / 1000.0)
}

pub struct Service {
    client: RunningService<RoleClient, ()>,
}

impl Service {
    /// Starts a service in `mode`, its logs going to `log_path`.
    pub async fn start(settings: &ServiceSettings, mode: WaitMode, log_path: &Path) -> Result<Self> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("cannot create the service log {}", log_path.display()))?;
        let command = Command::new(&settings.binary).configure(|command| {
            command
                .arg("serve")
                .env_remove("PREFECT_API_KEY")
                .env_remove("PREFECT_API_AUTH_STRING")
                .env("PREFECT_API_URL", &settings.api_url)
                .env("K3S_JOB_RUNNER_TAG", &settings.tag)
                .env("K3S_JOB_RUNNER_WAIT_MODE", mode.as_str())
                .env("K3S_JOB_RUNNER_POLL_INTERVAL_MS", settings.poll_interval_ms.to_string())
                .env(
                    "K3S_JOB_RUNNER_STARTUP_ALLOWANCE_SECONDS",
                    settings.startup_allowance_seconds.to_string(),
                )
                .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()))
                .envs(settings.extra_env.iter().map(|(name, value)| (name, value)));
        });
        let (transport, _) = TokioChildProcess::builder(command)
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start the service {}", settings.binary.display()))?;
        let client = match ().serve(transport).await {
            Ok(client) => client,
            Err(error) => {
                // A service that rejects a setting logs why on stderr and exits before replying.
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                let last_line = log.lines().last().unwrap_or("(empty)");
                bail!(
                    "MCP initialization with the service failed: {error}. Last line of {}: {last_line}",
                    log_path.display()
                );
            }
        };
        Ok(Self { client })
    }

    /// Returns the structured content of `runner_status`.
    pub async fn status(&self) -> Result<Value> {
        let result = self
            .client
            .call_tool(CallToolRequestParams::new("runner_status"))
            .await
            .context("runner_status call failed")?;
        result.structured_content.context("runner_status returned no structured content")
    }

    /// Waits until the service is ready for load: in `events` mode, until its websocket is
    /// subscribed, so the first jobs do not pay for the connection.
    pub async fn wait_until_ready(&self, mode: WaitMode) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status().await?;
            let ready = match mode {
                WaitMode::Events => status["subscription"]["mode"] == "subscribed",
                WaitMode::Poll => true,
            };
            if ready {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the service's websocket did not subscribe within 30 s: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs one job and records when it was sent and when its result came back.
    pub async fn run_job(&self, index: usize, code: &str, timeout_seconds: u64) -> JobSample {
        let mut arguments = Map::new();
        arguments.insert("code".to_owned(), Value::String(code.to_owned()));
        arguments.insert("timeout_seconds".to_owned(), json!(timeout_seconds));
        let params = CallToolRequestParams::new("run_python_job_tool").with_arguments(arguments);

        let sent_at = Utc::now();
        let result = self.client.call_tool(params).await;
        let returned_at = Utc::now();

        let mut sample = JobSample {
            index,
            sent_at,
            returned_at,
            status: "call_failed".to_owned(),
            flow_run_id: None,
            code_ms: None,
            end_seen_at: None,
            completed_via: None,
            error: None,
        };
        match result {
            Ok(result) => {
                let mut content = result.structured_content.unwrap_or_default();
                let meta_data = content["meta_data"].take();
                sample.end_seen_at = meta_data["end_seen_at"].as_str().and_then(|at| at.parse().ok());
                sample.completed_via = meta_data["completed_via"].as_str().map(str::to_owned);
                let results = content["results"].take();
                sample.status = results["status"].as_str().unwrap_or("no_status").to_owned();
                sample.flow_run_id = results["flow_run_id"].as_str().and_then(|id| id.parse().ok());
                sample.code_ms = results["duration_ms"].as_u64();
                sample.error = results["error"].as_str().map(str::to_owned);
            }
            Err(error) => sample.error = Some(error.to_string()),
        }
        sample
    }

    /// Closes the MCP session, which stops the service.
    pub async fn stop(self) {
        if let Err(error) = self.client.cancel().await {
            eprintln!("closing the service's MCP session failed: {error}");
        }
    }
}
