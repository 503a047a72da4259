//! Prefect API objects, reduced to the fields this service reads.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Key of the artifact in which the `python-runner` flow stores a run's output.
pub const RESULT_ARTIFACT_KEY: &str = "python-runner-result";

/// Prefect's state type, the field to decide on: state names vary (`TimedOut` is a `FAILED`
/// state) but the type set is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StateType {
    Scheduled,
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Crashed,
    Paused,
    Cancelling,
    /// A type this version of the service does not know; never treated as terminal.
    #[serde(other)]
    Unknown,
}

impl StateType {
    /// Returns true for the types after which a flow run never changes state again.
    /// `CANCELLING` and `PAUSED` are not terminal.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled | Self::Crashed)
    }

    /// Parses the `prefect.state-type` event label, for example `COMPLETED`.
    pub fn from_label(label: &str) -> Self {
        serde_json::from_value(serde_json::Value::String(label.to_owned())).unwrap_or(Self::Unknown)
    }
}

/// A flow run's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(rename = "type")]
    pub state_type: StateType,
    pub name: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub timestamp: Option<DateTime<Utc>>,
}

impl State {
    /// Returns true when the run will not change state again.
    pub fn is_terminal(&self) -> bool {
        self.state_type.is_terminal()
    }
}

/// A flow run as returned by `GET /flow_runs/{id}` and `POST /flow_runs/filter`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlowRun {
    pub id: Uuid,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub state: Option<State>,
    /// When the run entered RUNNING; absent while it waits to start.
    #[serde(default)]
    pub start_time: Option<DateTime<Utc>>,
}

impl FlowRun {
    /// Returns the run's state when it is terminal.
    pub fn terminal_state(&self) -> Option<&State> {
        self.state.as_ref().filter(|state| state.is_terminal())
    }
}

/// A deployment as returned by `GET /deployments/name/{flow}/{deployment}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Deployment {
    pub id: Uuid,
    pub name: String,
}

/// Result that the `python-runner` flow stores in its artifact (format version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOutput {
    pub version: u32,
    /// The child's exit code; a negative value `-N` means it was killed by signal `N`.
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub duration_ms: u64,
    pub timed_out: bool,
    /// True when the code hit its memory limit, whether the kernel killed it or Python raised
    /// `MemoryError`. Absent from results of flows that enforce no memory limit.
    #[serde(default)]
    pub memory_limit_exceeded: bool,
    /// Sandbox the code ran in: `bubblewrap`, or `none` when the sandbox was turned off.
    /// Absent from results of flows without a sandbox.
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Limits applied to the code, as the flow reports them (for example `memory_mib`).
    #[serde(default)]
    pub limits: Option<serde_json::Value>,
}

impl RunOutput {
    /// Returns true when either stream was cut at the output limit.
    pub fn truncated(&self) -> bool {
        self.stdout_truncated || self.stderr_truncated
    }

    /// Returns the memory limit the flow applied, in MiB, when it reported one.
    pub fn memory_limit_mib(&self) -> Option<u64> {
        self.limits.as_ref()?.get("memory_mib")?.as_u64()
    }

    /// Returns true when the flow reports that the code ran without a sandbox.
    pub fn ran_unsandboxed(&self) -> bool {
        self.sandbox.as_deref() == Some("none")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_types_are_the_four_final_ones() {
        let terminal: Vec<_> = [
            StateType::Scheduled,
            StateType::Pending,
            StateType::Running,
            StateType::Completed,
            StateType::Failed,
            StateType::Cancelled,
            StateType::Crashed,
            StateType::Paused,
            StateType::Cancelling,
            StateType::Unknown,
        ]
        .into_iter()
        .filter(|state_type| state_type.is_terminal())
        .collect();
        assert_eq!(
            terminal,
            [StateType::Completed, StateType::Failed, StateType::Cancelled, StateType::Crashed]
        );
    }

    #[test]
    fn state_type_label_parses() {
        assert_eq!(StateType::from_label("COMPLETED"), StateType::Completed);
        assert_eq!(StateType::from_label("CANCELLING"), StateType::Cancelling);
        assert_eq!(StateType::from_label("SOMETHING_NEW"), StateType::Unknown);
    }

    #[test]
    fn flow_run_without_state_parses() {
        let run: FlowRun =
            serde_json::from_str(r#"{"id":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","state":null}"#)
                .expect("a run without state is valid");
        assert_eq!(run.terminal_state(), None);
    }
}
