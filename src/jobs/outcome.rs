//! Outcome of a finished job, derived from the flow run's terminal state and its result.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::prefect::{RunOutput, State, StateType};
use crate::waiters::CompletionSource;

/// Ending of a job, as a caller should read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// The code ran and exited with code 0.
    Completed,
    /// The code ran and exited with a non-zero code or was killed by a signal.
    Error,
    /// The code exceeded its memory limit and was stopped.
    MemoryLimit,
    /// The code ran past its timeout and was killed, or the run did not finish within the
    /// timeout plus the start-up allowance and was cancelled.
    Timeout,
    /// The flow run was cancelled from outside the service.
    Cancelled,
    /// The runner or its infrastructure broke: the flow run ended FAILED or CRASHED, or it
    /// left no result.
    Failed,
}

impl JobStatus {
    /// Label used in tool results and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Error => "error",
            Self::MemoryLimit => "memory_limit",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }
}

/// A job's result: the flow run, how it ended and what the code printed.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub flow_run_id: Uuid,
    pub flow_run_name: String,
    pub status: JobStatus,
    /// The flow run's last state read from Prefect.
    pub state: Option<State>,
    /// The runner's result artifact, absent when the runner never wrote one.
    pub output: Option<RunOutput>,
    /// Why the job did not complete, for every status but [`JobStatus::Completed`].
    pub message: Option<String>,
    /// Time from the request to the result.
    pub elapsed: Duration,
    pub timeout_seconds: u64,
    /// Source and time of the service's knowledge that the run ended; `None` when it gave up
    /// waiting.
    pub learned: Option<LearnedEnd>,
}

/// Source and time of the service's knowledge of a run's terminal state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnedEnd {
    pub source: CompletionSource,
    pub at: DateTime<Utc>,
}

impl JobOutcome {
    /// Builds the outcome of a run that reached `state`, a terminal state.
    pub(crate) fn finished(
        flow_run_id: Uuid,
        flow_run_name: String,
        state: State,
        output: Option<RunOutput>,
        timeout_seconds: u64,
    ) -> Self {
        let (status, message) = classify(&state, output.as_ref(), timeout_seconds);
        Self {
            flow_run_id,
            flow_run_name,
            status,
            state: Some(state),
            output,
            message,
            elapsed: Duration::ZERO,
            timeout_seconds,
            learned: None,
        }
    }

    /// True only when the code ran and exited with code 0.
    pub fn success(&self) -> bool {
        self.status == JobStatus::Completed
    }

    /// Returns the code's exit code, which is negative when a signal killed it (-9 for SIGKILL).
    pub fn exit_code(&self) -> Option<i64> {
        self.output.as_ref().map(|output| output.exit_code)
    }

    pub fn stdout(&self) -> &str {
        self.output.as_ref().map_or("", |output| output.stdout.as_str())
    }

    pub fn stderr(&self) -> &str {
        self.output.as_ref().map_or("", |output| output.stderr.as_str())
    }

    /// True when either stream was cut at the output limit.
    pub fn truncated(&self) -> bool {
        self.output.as_ref().is_some_and(RunOutput::truncated)
    }

    /// Name of the flow run's last state, such as `Completed` or `Cancelled`.
    pub fn state_name(&self) -> Option<&str> {
        self.state.as_ref().map(|state| state.name.as_str())
    }
}

fn classify(state: &State, output: Option<&RunOutput>, timeout_seconds: u64) -> (JobStatus, Option<String>) {
    match (state.state_type, output) {
        (StateType::Completed, Some(output)) => classify_exit(output, timeout_seconds),
        (StateType::Completed, None) => {
            (JobStatus::Failed, Some("the flow run completed but left no result artifact".to_owned()))
        }
        (StateType::Cancelled, _) => (JobStatus::Cancelled, Some(describe_state("was cancelled", state))),
        _ => (JobStatus::Failed, Some(describe_state("ended", state))),
    }
}

fn classify_exit(output: &RunOutput, timeout_seconds: u64) -> (JobStatus, Option<String>) {
    if output.memory_limit_exceeded {
        let limit = output.memory_limit_mib().map_or_else(String::new, |mib| format!(" of {mib} MiB"));
        let code = output.exit_code;
        let message = format!("the code exceeded its memory limit{limit} and ended with exit code {code}");
        return (JobStatus::MemoryLimit, Some(message));
    }
    if output.timed_out {
        let message = format!("the code ran longer than its timeout of {timeout_seconds} s and was killed");
        return (JobStatus::Timeout, Some(message));
    }
    match output.exit_code {
        0 => (JobStatus::Completed, None),
        code if code < 0 => {
            let signal = -code;
            (
                JobStatus::Error,
                Some(format!("the code was killed by signal {signal} ({})", signal_name(signal))),
            )
        }
        code => (JobStatus::Error, Some(format!("the code exited with code {code}"))),
    }
}

fn describe_state(verb: &str, state: &State) -> String {
    match state.message.as_deref().filter(|message| !message.is_empty()) {
        Some(message) => format!("the flow run {verb} in state {}: {message}", state.name),
        None => format!("the flow run {verb} in state {}", state.name),
    }
}

fn signal_name(signal: i64) -> &'static str {
    match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => "other signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(state_type: StateType, name: &str, message: Option<&str>) -> State {
        State { state_type, name: name.to_owned(), message: message.map(str::to_owned), timestamp: None }
    }

    fn output(exit_code: i64, timed_out: bool) -> RunOutput {
        RunOutput {
            version: 1,
            exit_code,
            stdout: "out".to_owned(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 5,
            timed_out,
            memory_limit_exceeded: false,
            sandbox: Some("bubblewrap".to_owned()),
            limits: None,
        }
    }

    fn outcome(state: State, output: Option<RunOutput>) -> JobOutcome {
        JobOutcome::finished(Uuid::nil(), "run".to_owned(), state, output, 30)
    }

    #[test]
    fn exit_zero_is_success() {
        let outcome = outcome(state(StateType::Completed, "Completed", None), Some(output(0, false)));
        assert_eq!(outcome.status, JobStatus::Completed);
        assert!(outcome.success());
        assert_eq!(outcome.message, None);
    }

    #[test]
    fn non_zero_exit_is_error_with_code() {
        let outcome = outcome(state(StateType::Completed, "Completed", None), Some(output(3, false)));
        assert_eq!(outcome.status, JobStatus::Error);
        assert_eq!(outcome.exit_code(), Some(3));
        assert_eq!(outcome.message.as_deref(), Some("the code exited with code 3"));
    }

    #[test]
    fn signal_exit_names_signal() {
        let outcome = outcome(state(StateType::Completed, "Completed", None), Some(output(-9, false)));
        assert_eq!(outcome.status, JobStatus::Error);
        assert!(outcome.message.unwrap().contains("SIGKILL"));
    }

    #[test]
    fn runner_timeout_is_timeout() {
        let outcome = outcome(state(StateType::Completed, "Completed", None), Some(output(-15, true)));
        assert_eq!(outcome.status, JobStatus::Timeout);
        assert!(outcome.message.as_deref().unwrap_or_default().contains("timeout of 30 s"));
        assert_eq!(outcome.stdout(), "out");
    }

    #[test]
    fn memory_limit_is_its_own_status() {
        let mut run_output = output(1, false);
        run_output.memory_limit_exceeded = true;
        run_output.limits = Some(serde_json::json!({"memory_mib": 256}));
        let outcome = outcome(state(StateType::Completed, "Completed", None), Some(run_output));
        assert_eq!(outcome.status, JobStatus::MemoryLimit);
        assert_eq!(outcome.exit_code(), Some(1));
        assert_eq!(
            outcome.message.as_deref(),
            Some("the code exceeded its memory limit of 256 MiB and ended with exit code 1")
        );
    }

    #[test]
    fn completed_without_artifact_is_failure() {
        let outcome = outcome(state(StateType::Completed, "Completed", None), None);
        assert_eq!(outcome.status, JobStatus::Failed);
        assert_eq!(outcome.exit_code(), None);
    }

    #[test]
    fn crashed_run_is_failure_with_state_message() {
        let outcome = outcome(state(StateType::Crashed, "Crashed", Some("worker died")), None);
        assert_eq!(outcome.status, JobStatus::Failed);
        assert_eq!(outcome.message.as_deref(), Some("the flow run ended in state Crashed: worker died"));
    }

    #[test]
    fn cancelled_run_is_cancelled() {
        let outcome = outcome(state(StateType::Cancelled, "Cancelled", None), None);
        assert_eq!(outcome.status, JobStatus::Cancelled);
        assert_eq!(outcome.state_name(), Some("Cancelled"));
    }
}
