//! Breakdown of a job's time into steps, from the flow run's state history in Prefect.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::service::{milliseconds_between, JobSample};

/// Reads the Prefect REST API for the harness. Its requests are not counted by the service.
pub struct PrefectReader {
    http: reqwest::Client,
    api_url: String,
}

#[derive(Debug, Deserialize)]
struct StateRecord {
    #[serde(rename = "type")]
    state_type: String,
    timestamp: DateTime<Utc>,
}

/// State timestamps of one flow run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timeline {
    pub scheduled_at: DateTime<Utc>,
    pub pending_at: Option<DateTime<Utc>>,
    pub running_at: Option<DateTime<Utc>>,
    /// The terminal state's timestamp: when Prefect recorded the run's end.
    pub terminal_at: Option<DateTime<Utc>>,
}

/// A job's end-to-end time cut into steps, in milliseconds. Steps that could not be
/// measured are `None`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Breakdown {
    /// Tool call sent to flow run created (MCP, validation, REST creation).
    pub submit: Option<f64>,
    /// Created, waiting for a free slot in the work pool's concurrency limit.
    pub queueing: Option<f64>,
    /// Slot free to Pending: the worker's next poll of the pool.
    pub pickup: Option<f64>,
    /// Pending to Running: engine process start, `import prefect`, loading the flow.
    pub process_start: Option<f64>,
    /// The sandboxed process, as the flow timed it: bubblewrap, interpreter and the code.
    pub code: Option<f64>,
    /// Running to the terminal state, minus the code: sandbox set-up, storing the artifact,
    /// proposing the state.
    pub flow_overhead: Option<f64>,
    /// Terminal state recorded to the service learning of it: Prefect's commit and event
    /// delivery in `events` mode, the wait for the next read in `poll` mode.
    pub notice: Option<f64>,
    /// The service learning of the end to the tool result arriving: reading the result
    /// artifact and replying over MCP.
    pub result: Option<f64>,
    /// Terminal state recorded to tool result returned: the completion latency, the sum of
    /// `notice` and `result`.
    pub completion: Option<f64>,
}

impl PrefectReader {
    pub fn new(api_url: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { http, api_url: api_url.trim_end_matches('/').to_owned() })
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.api_url);
        let response = self.http.get(&url).send().await.with_context(|| format!("GET {url} failed"))?;
        let status = response.status();
        let body = response.text().await.with_context(|| format!("GET {url}: reading the body failed"))?;
        if !status.is_success() {
            anyhow::bail!("GET {url} returned HTTP {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {url} returned invalid JSON"))
    }

    /// Checks that Prefect responds. The error names the command that starts the local stack.
    pub async fn check_health(&self) -> Result<()> {
        self.get("/health").await.with_context(|| {
            format!(
                "Prefect is not reachable at {}. Start the local stack with deploy/local/stack.sh up, \
                 or pass --api-url",
                self.api_url
            )
        })?;
        Ok(())
    }

    /// Returns the concurrency limit of the deployment's work pool, `None` when unlimited.
    pub async fn pool_concurrency_limit(&self, deployment: &str) -> Result<Option<u64>> {
        let deployment = self.get(&format!("/deployments/name/{deployment}")).await?;
        let pool = deployment["work_pool_name"].as_str().context("the deployment has no work pool")?;
        let pool = self.get(&format!("/work_pools/{pool}")).await?;
        Ok(pool["concurrency_limit"].as_u64())
    }

    /// Reads the run's state history.
    pub async fn timeline(&self, flow_run_id: Uuid) -> Result<Timeline> {
        let history = self.get(&format!("/flow_run_states/?flow_run_id={flow_run_id}")).await?;
        let mut states: Vec<StateRecord> =
            serde_json::from_value(history).context("the state history has an unexpected shape")?;
        states.sort_by_key(|state| state.timestamp);
        let first = |state_type: &str| {
            states.iter().find(|state| state.state_type == state_type).map(|state| state.timestamp)
        };
        let terminal = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"];
        Ok(Timeline {
            scheduled_at: first("SCHEDULED")
                .or_else(|| states.first().map(|state| state.timestamp))
                .context("the flow run has no states")?,
            pending_at: first("PENDING"),
            running_at: first("RUNNING"),
            terminal_at: states
                .iter()
                .rev()
                .find(|state| terminal.contains(&state.state_type.as_str()))
                .map(|state| state.timestamp),
        })
    }
}

/// Returns, for each job of one batch, when the work pool first had a free slot for it.
///
/// Prefect counts a run against the pool's concurrency limit from Pending until its terminal
/// state. With `limit` slots, the i-th run to go Pending can do so only once i - limit runs
/// have ended, whichever slots they held. Its slot was thus free at the later of its creation
/// and the (i - limit)-th end. Time before that is queueing, and time after it is pick-up.
///
/// NOTE: only the batch's own runs are counted, so runs from other clients on the same pool
/// show up as pick-up time instead of queueing.
pub fn slot_free_times(timelines: &[Option<Timeline>], limit: Option<u64>) -> Vec<Option<DateTime<Utc>>> {
    let mut free_at: Vec<Option<DateTime<Utc>>> =
        timelines.iter().map(|timeline| timeline.as_ref().map(|timeline| timeline.scheduled_at)).collect();
    let Some(limit) = limit.map(|limit| limit as usize) else { return free_at };
    let mut ends: Vec<DateTime<Utc>> = timelines
        .iter()
        .flatten()
        .filter(|timeline| timeline.pending_at.is_some())
        .filter_map(|timeline| timeline.terminal_at)
        .collect();
    ends.sort();
    let mut starts: Vec<(usize, DateTime<Utc>)> = timelines
        .iter()
        .enumerate()
        .filter_map(|(index, timeline)| Some((index, timeline.as_ref()?.pending_at?)))
        .collect();
    starts.sort_by_key(|(_, pending_at)| *pending_at);
    for (rank, (index, pending_at)) in starts.into_iter().enumerate() {
        let Some(scheduled_at) = free_at[index] else { continue };
        let slot = match rank.checked_sub(limit) {
            Some(end_rank) => ends.get(end_rank).map_or(scheduled_at, |end| scheduled_at.max(*end)),
            None => scheduled_at,
        };
        // Timestamps come from different processes, so clamp to the run's own pick-up.
        free_at[index] = Some(slot.min(pending_at));
    }
    free_at
}

/// Cuts a job's time into steps.
pub fn breakdown(
    sample: &JobSample,
    timeline: Option<&Timeline>,
    slot_free_at: Option<DateTime<Utc>>,
) -> Breakdown {
    let Some(timeline) = timeline else { return Breakdown::default() };
    let between =
        |start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>| Some(milliseconds_between(start?, end?));
    let code = sample.code_ms.map(|ms| ms as f64);
    let running_to_end = between(timeline.running_at, timeline.terminal_at);
    Breakdown {
        submit: between(Some(sample.sent_at), Some(timeline.scheduled_at)),
        queueing: between(Some(timeline.scheduled_at), slot_free_at),
        pickup: between(slot_free_at, timeline.pending_at),
        process_start: between(timeline.pending_at, timeline.running_at),
        code,
        flow_overhead: running_to_end.zip(code).map(|(total, code)| total - code),
        notice: between(timeline.terminal_at, sample.end_seen_at),
        result: between(sample.end_seen_at, Some(sample.returned_at)),
        completion: between(timeline.terminal_at, Some(sample.returned_at)),
    }
}
