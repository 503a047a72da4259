//! The MCP server: the `run_python_job_tool` tool over stdio, and `runner_status` for
//! operators.

mod reply;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ProgressToken,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{Peer, RequestContext};
use rmcp::{tool, tool_handler, tool_router, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use reply::{JobReply, RequestFacts};

use crate::config::JobLimits;
use crate::jobs::{JobError, JobProgress, JobRequest, JobRunner};

/// Name under which clients call the job tool.
pub const RUN_TOOL_NAME: &str = "run_python_job_tool";
/// Name of the status tool.
pub const STATUS_TOOL_NAME: &str = "runner_status";
/// Interval of progress notifications to a client that sent a progress token.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Arguments of `run_python_job_tool`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct RunPythonJobParams {
    /// Python 3 source code to run as a script. Print what you want returned. Stdin is empty.
    #[serde(deserialize_with = "source_text")]
    #[schemars(with = "String")]
    pub code: String,
    /// Seconds the code may run before it is killed: 10 to 600 unless the server sets other
    /// limits. Default 120.
    #[serde(default, deserialize_with = "whole_seconds")]
    #[schemars(with = "Option<i64>")]
    pub timeout_seconds: Option<i64>,
}

/// Reads `code`, naming the field and the expected type when the value is not a string.
fn source_text<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(code) => Ok(code),
        other => Err(serde::de::Error::custom(format!(
            "code must be a string of Python source, got {}",
            describe_json(&other)
        ))),
    }
}

/// Reads `timeout_seconds`, naming the field and the expected type when the value is not a
/// whole number. The range is checked later, against the configured limits.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Null => Ok(None),
        Value::Number(number) if number.as_i64().is_some() => Ok(number.as_i64()),
        other => Err(serde::de::Error::custom(format!(
            "timeout_seconds must be a whole number of seconds, got {}",
            describe_json(&other)
        ))),
    }
}

/// Describes a JSON value for an error message, cutting long ones short.
fn describe_json(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 {
        format!("{}...", text.chars().take(40).collect::<String>())
    } else {
        text
    }
}

/// The MCP server handler. Cheap to clone: every clone shares one [`JobRunner`].
#[derive(Clone)]
pub struct JobServer {
    runner: Arc<JobRunner>,
    /// Job tool calls still running, so shutdown can wait for their results.
    in_flight: Arc<AtomicUsize>,
    tool_router: ToolRouter<Self>,
}

/// Counts one tool call as in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tool_router]
impl JobServer {
    pub fn new(runner: Arc<JobRunner>) -> Self {
        let mut tool_router = Self::tool_router();
        if let Some(route) = tool_router.map.get_mut(RUN_TOOL_NAME) {
            describe_limits(&mut route.attr, &runner.config().limits);
        }
        Self { runner, in_flight: Arc::new(AtomicUsize::new(0)), tool_router }
    }

    /// Waits until no job tool call is running, for at most `limit`.
    pub async fn wait_until_idle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs Python code as a Prefect flow run and returns what it printed.
    #[tool(
        name = "run_python_job_tool",
        description = "Run Python 3 code as a job and return its stdout, stderr and exit code. \
                       The server replaces this text with one that names its limits."
    )]
    async fn run_python_job_tool(
        &self,
        Parameters(params): Parameters<RunPythonJobParams>,
        context: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let _in_flight = InFlight::enter(&self.in_flight);
        let progress = JobProgress::default();
        let job = run_job(&self.runner, params, &context.ct, &progress);
        let reply = match context.meta.get_progress_token() {
            Some(token) => report_progress(job, token, &context.peer, &self.runner, &progress).await,
            None => job.await,
        };
        to_call_tool_result(reply)
    }

    /// Reports the wait mode, the events subscription, waiting jobs and the service's counters.
    #[tool(
        name = "runner_status",
        description = "Report the service's link to Prefect: the wait mode (events or poll), \
                       the events websocket's mode (subscribed, backing_off, polling...), \
                       connections made, events received, REST polls, REST requests sent, \
                       how many jobs are waiting, and the service's peak memory in KiB."
    )]
    async fn runner_status(&self) -> CallToolResult {
        let status = self.runner.status();
        match serde_json::to_value(&status) {
            Ok(value) => CallToolResult::structured(value),
            Err(error) => {
                CallToolResult::error(vec![ContentBlock::text(format!("status unavailable: {error}"))])
            }
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for JobServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Use run_python_job_tool to run Python code and read its output. Results carry \
                 structured content {results: {stdout, stderr, exit_code, success, error, \
                 flow_run_id, state, truncated, status}, meta_data: {...}}.",
            )
    }
}

/// Awaits `job`, sending the client a progress notification every [`PROGRESS_INTERVAL`] that
/// names the flow run and its latest state. The progress value is the seconds elapsed.
async fn report_progress(
    job: impl std::future::Future<Output = JobReply>,
    token: ProgressToken,
    peer: &Peer<RoleServer>,
    runner: &JobRunner,
    progress: &JobProgress,
) -> JobReply {
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(started + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
    tokio::pin!(job);
    loop {
        tokio::select! {
            reply = &mut job => return reply,
            _ = ticks.tick() => {
                let elapsed = started.elapsed().as_secs();
                let message = format!("{}; {elapsed} s elapsed", runner.describe_progress(progress));
                let notification =
                    ProgressNotificationParam::new(token.clone(), elapsed as f64).with_message(message);
                if let Err(error) = peer.notify_progress(notification).await {
                    debug!(%error, "sending a progress notification failed");
                }
            }
        }
    }
}

/// Validates, runs and renders one job; shared by the MCP tool and the `run` subcommand.
pub async fn run_job(
    runner: &JobRunner,
    params: RunPythonJobParams,
    cancel: &CancellationToken,
    progress: &JobProgress,
) -> JobReply {
    let started = Instant::now();
    let code_length = params.code.chars().count();
    let facts = |timeout_seconds| RequestFacts {
        code_length,
        timeout_seconds,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    let request = match JobRequest::new(params.code, params.timeout_seconds, &runner.config().limits) {
        Ok(request) => request,
        Err(error) => {
            let timeout_seconds =
                params.timeout_seconds.or(Some(runner.config().limits.default_timeout_seconds as i64));
            return JobReply::from_invalid_request(&error, facts(timeout_seconds));
        }
    };
    let timeout_seconds = Some(request.timeout_seconds() as i64);
    match runner.run(&request, cancel, progress).await {
        Ok(outcome) => JobReply::from_outcome(&outcome, facts(timeout_seconds)),
        Err(error @ JobError::Cancelled { .. }) => JobReply::from_job_error(&error, facts(timeout_seconds)),
        Err(error) => {
            warn!(%error, "job failed");
            JobReply::from_job_error(&error, facts(timeout_seconds))
        }
    }
}

/// Writes the configured limits into the job tool's description and input schema, so clients
/// see the limits this server enforces rather than the defaults.
fn describe_limits(tool: &mut Tool, limits: &JobLimits) {
    tool.description = Some(
        format!(
            "Run Python 3 code as a job and return its stdout, stderr and exit code. The code runs \
             as a script in a fresh process with empty stdin; print what you want to see. Code may \
             be up to {} characters; timeout_seconds is {}-{} (default {}). Each stream keeps at \
             most 100,000 characters, and invalid UTF-8 becomes U+FFFD. A non-zero exit code or a \
             timeout is returned as an error result that still carries the output.",
            limits.max_code_chars,
            limits.min_timeout_seconds,
            limits.max_timeout_seconds,
            limits.default_timeout_seconds,
        )
        .into(),
    );
    let mut schema = (*tool.input_schema).clone();
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        if let Some(Value::Object(code)) = properties.get_mut("code") {
            code.insert("minLength".to_owned(), json!(1));
            code.insert("maxLength".to_owned(), json!(limits.max_code_chars));
        }
        if let Some(Value::Object(timeout)) = properties.get_mut("timeout_seconds") {
            timeout.insert("minimum".to_owned(), json!(limits.min_timeout_seconds));
            timeout.insert("maximum".to_owned(), json!(limits.max_timeout_seconds));
            timeout.insert("default".to_owned(), json!(limits.default_timeout_seconds));
        }
    }
    tool.input_schema = Arc::new(schema);
}

fn to_call_tool_result(reply: JobReply) -> CallToolResult {
    let mut result = if reply.is_error {
        CallToolResult::structured_error(reply.value)
    } else {
        CallToolResult::structured(reply.value)
    };
    result.content = vec![ContentBlock::text(reply.text)];
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_of_wrong_type_names_field() {
        let error = serde_json::from_value::<RunPythonJobParams>(
            json!({"code": "print(1)", "timeout_seconds": "abc"}),
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("timeout_seconds must be a whole number of seconds, got \"abc\""),
            "{error}"
        );
        let error =
            serde_json::from_value::<RunPythonJobParams>(json!({"code": "x", "timeout_seconds": 1.5}))
                .unwrap_err();
        assert!(error.to_string().contains("got 1.5"), "{error}");
    }

    #[test]
    fn code_of_wrong_type_names_field() {
        let error = serde_json::from_value::<RunPythonJobParams>(json!({"code": 5})).unwrap_err();
        assert!(error.to_string().contains("code must be a string of Python source, got 5"), "{error}");
    }

    #[test]
    fn valid_params_are_read() {
        let params = serde_json::from_value::<RunPythonJobParams>(json!({"code": "print(1)"})).unwrap();
        assert_eq!(params.code, "print(1)");
        assert_eq!(params.timeout_seconds, None);
        let params =
            serde_json::from_value::<RunPythonJobParams>(json!({"code": "x", "timeout_seconds": 30}))
                .unwrap();
        assert_eq!(params.timeout_seconds, Some(30));
        let params =
            serde_json::from_value::<RunPythonJobParams>(json!({"code": "x", "timeout_seconds": null}))
                .unwrap();
        assert_eq!(params.timeout_seconds, None);
    }

    #[test]
    fn tool_schema_carries_configured_limits() {
        let router = JobServer::tool_router();
        let mut tool = router.get(RUN_TOOL_NAME).expect("the job tool is registered").clone();
        let limits = JobLimits {
            max_code_chars: 100,
            min_timeout_seconds: 5,
            max_timeout_seconds: 30,
            default_timeout_seconds: 20,
        };

        describe_limits(&mut tool, &limits);

        let description = tool.description.as_deref().unwrap_or_default();
        assert!(description.contains("up to 100 characters"), "{description}");
        assert!(description.contains("5-30 (default 20)"), "{description}");
        let properties = &tool.input_schema["properties"];
        assert_eq!(properties["code"]["type"], "string");
        assert_eq!(properties["code"]["maxLength"], 100);
        assert_eq!(properties["code"]["minLength"], 1);
        assert_eq!(properties["timeout_seconds"]["minimum"], 5);
        assert_eq!(properties["timeout_seconds"]["maximum"], 30);
        assert_eq!(properties["timeout_seconds"]["default"], 20);
    }
}
