//! The tool result of a job, shaped as Atlas reads it from its Python runner:
//! `{"results": {...}, "meta_data": {...}}`, plus a plain-text rendering.

use serde_json::{json, Value};

use crate::jobs::{InvalidRequest, JobError, JobOutcome};
use crate::prefect::RunOutput;
use crate::waiters::CompletionSource;

/// A tool result before it becomes an MCP `CallToolResult`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReply {
    /// The structured content.
    pub value: Value,
    /// Readable text for the content block: status line, stdout and stderr.
    pub text: String,
    /// True unless the code ran and exited with code 0.
    pub is_error: bool,
}

/// Facts about the request that every reply repeats in `meta_data`.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts {
    pub code_length: usize,
    pub timeout_seconds: Option<i64>,
    pub elapsed_ms: u64,
}

impl JobReply {
    /// Builds the reply of a job that has a flow run and an ending.
    pub fn from_outcome(outcome: &JobOutcome, facts: RequestFacts) -> Self {
        let flow_run_id = outcome.flow_run_id.to_string();
        let is_error = !outcome.success();
        let value = json!({
            "results": {
                "stdout": outcome.stdout(),
                "stderr": outcome.stderr(),
                "exit_code": outcome.exit_code(),
                "success": outcome.success(),
                "error": outcome.message,
                "flow_run_id": flow_run_id,
                "flow_run_name": outcome.flow_run_name,
                "state": outcome.state_name(),
                "truncated": outcome.truncated(),
                "status": outcome.status.as_str(),
                "sandbox": outcome.output.as_ref().and_then(|output| output.sandbox.clone()),
                "limits": outcome.output.as_ref().and_then(|output| output.limits.clone()),
                "duration_ms": outcome.output.as_ref().map(|output| output.duration_ms),
            },
            "meta_data": with_learned_end(meta_data(is_error, facts, Some(&flow_run_id)), outcome),
        });
        Self { text: outcome_text(outcome), value, is_error }
    }

    /// Builds the reply of a request rejected before submission.
    pub fn from_invalid_request(error: &InvalidRequest, facts: RequestFacts) -> Self {
        Self::failure("invalid_request", &error.to_string(), None, facts)
    }

    /// Builds the reply of a job that failed without an ending of its own.
    pub fn from_job_error(error: &JobError, facts: RequestFacts) -> Self {
        let status = match error {
            JobError::PrefectUnreachable { .. } | JobError::NotPrefectApi { .. } => "prefect_unreachable",
            JobError::PrefectOverloaded { .. } => "prefect_overloaded",
            JobError::DeploymentNotFound { .. } => "deployment_not_found",
            JobError::Cancelled { .. } => "cancelled",
            JobError::ShuttingDown { .. } => "shutting_down",
            _ => "service_error",
        };
        let flow_run_id = error.flow_run_id().map(|id| id.to_string());
        Self::failure(status, &error.to_string(), flow_run_id.as_deref(), facts)
    }

    fn failure(status: &str, message: &str, flow_run_id: Option<&str>, facts: RequestFacts) -> Self {
        let value = json!({
            "results": {
                "stdout": "",
                "stderr": "",
                "exit_code": null,
                "success": false,
                "error": message,
                "flow_run_id": flow_run_id,
                "flow_run_name": null,
                "state": null,
                "truncated": false,
                "status": status,
                "sandbox": null,
                "limits": null,
                "duration_ms": null,
            },
            "meta_data": meta_data(true, facts, flow_run_id),
        });
        Self { text: format!("error ({status}): {message}"), value, is_error: true }
    }
}

fn meta_data(is_error: bool, facts: RequestFacts, flow_run_id: Option<&str>) -> Value {
    json!({
        "is_error": is_error,
        "elapsed_ms": facts.elapsed_ms,
        "timeout_seconds": facts.timeout_seconds,
        "code_length": facts.code_length,
        "flow_run_id": flow_run_id,
    })
}

/// Adds how and when the service learned that the run ended: `completed_via` is `event` or
/// `poll`, and `end_seen_at` the moment, to compare with the terminal state's timestamp.
fn with_learned_end(mut meta_data: Value, outcome: &JobOutcome) -> Value {
    let learned = outcome.learned.as_ref();
    meta_data["completed_via"] = json!(learned.map(|learned| match learned.source {
        CompletionSource::Event => "event",
        CompletionSource::Poll => "poll",
    }));
    meta_data["end_seen_at"] =
        json!(learned.map(|learned| learned.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)));
    meta_data
}

fn outcome_text(outcome: &JobOutcome) -> String {
    let exit =
        outcome.exit_code().map_or_else(|| "no exit code".to_owned(), |code| format!("exit code {code}"));
    let mut text = format!(
        "{} ({exit}), flow run {} ({})\n",
        outcome.status.as_str(),
        outcome.flow_run_name,
        outcome.flow_run_id
    );
    if let Some(message) = &outcome.message {
        text.push_str(&format!("error: {message}\n"));
    }
    if outcome.truncated() {
        text.push_str("output was truncated at the output limit\n");
    }
    if outcome.output.as_ref().is_some_and(RunOutput::ran_unsandboxed) {
        text.push_str(
            "warning: the code ran without a sandbox, because the runner's sandbox is turned off\n",
        );
    }
    text.push_str("--- stdout ---\n");
    text.push_str(outcome.stdout());
    text.push_str("\n--- stderr ---\n");
    text.push_str(outcome.stderr());
    text
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use super::*;
    use crate::config::JobLimits;
    use crate::jobs::{JobRequest, JobStatus};
    use crate::prefect::{RunOutput, State, StateType};

    fn facts() -> RequestFacts {
        RequestFacts { code_length: 21, timeout_seconds: Some(120), elapsed_ms: 1500 }
    }

    fn completed(exit_code: i64) -> JobOutcome {
        let state = State {
            state_type: StateType::Completed,
            name: "Completed".to_owned(),
            message: None,
            timestamp: None,
        };
        let output = RunOutput {
            version: 1,
            exit_code,
            stdout: "45\n".to_owned(),
            stderr: "warn\n".to_owned(),
            stdout_truncated: false,
            stderr_truncated: true,
            duration_ms: 20,
            timed_out: false,
            memory_limit_exceeded: false,
            sandbox: Some("none".to_owned()),
            limits: None,
        };
        let mut outcome =
            JobOutcome::finished(Uuid::nil(), "brave-otter".to_owned(), state, Some(output), 120);
        outcome.elapsed = Duration::from_millis(1500);
        outcome
    }

    #[test]
    fn completed_job_has_atlas_shape() {
        let reply = JobReply::from_outcome(&completed(0), facts());
        let results = &reply.value["results"];
        assert!(!reply.is_error);
        assert_eq!(results["stdout"], "45\n");
        assert_eq!(results["stderr"], "warn\n");
        assert_eq!(results["exit_code"], 0);
        assert_eq!(results["success"], true);
        assert_eq!(results["error"], Value::Null);
        assert_eq!(results["state"], "Completed");
        assert_eq!(results["truncated"], true);
        assert_eq!(results["status"], "completed");
        assert_eq!(results["sandbox"], "none");
        assert!(reply.text.contains("without a sandbox"), "{}", reply.text);
        assert_eq!(results["flow_run_id"], Uuid::nil().to_string());
        let meta = &reply.value["meta_data"];
        assert_eq!(meta["is_error"], false);
        assert_eq!(meta["elapsed_ms"], 1500);
        assert_eq!(meta["timeout_seconds"], 120);
        assert_eq!(meta["code_length"], 21);
        assert_eq!(meta["flow_run_id"], Uuid::nil().to_string());
    }

    #[test]
    fn reply_says_how_the_end_was_learned() {
        let mut outcome = completed(0);
        let at = "2026-12-04T10:00:00.123456Z".parse().unwrap();
        outcome.learned = Some(crate::jobs::LearnedEnd { source: CompletionSource::Event, at });

        let reply = JobReply::from_outcome(&outcome, facts());

        let meta = &reply.value["meta_data"];
        assert_eq!(meta["completed_via"], "event");
        assert_eq!(meta["end_seen_at"], "2026-12-04T10:00:00.123456Z");
        assert_eq!(reply.value["results"]["duration_ms"], 20);
    }

    #[test]
    fn failing_code_is_error_reply() {
        let outcome = completed(1);
        assert_eq!(outcome.status, JobStatus::Error);
        let reply = JobReply::from_outcome(&outcome, facts());
        assert!(reply.is_error);
        assert_eq!(reply.value["results"]["success"], false);
        assert_eq!(reply.value["meta_data"]["is_error"], true);
        assert!(reply.text.starts_with("error (exit code 1), flow run brave-otter"), "{}", reply.text);
    }

    #[test]
    fn invalid_request_reply_names_limit() {
        let error = JobRequest::new(String::new(), Some(5), &JobLimits::default()).unwrap_err();
        let reply = JobReply::from_invalid_request(&error, facts());
        assert!(reply.is_error);
        assert_eq!(reply.value["results"]["status"], "invalid_request");
        assert_eq!(reply.value["results"]["flow_run_id"], Value::Null);
        assert_eq!(reply.value["results"]["exit_code"], Value::Null);
        assert!(reply.text.contains("empty"), "{}", reply.text);
    }
}
