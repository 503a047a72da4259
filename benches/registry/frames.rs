//! The flow-run state events that the bench's server sends, serialised before timing starts.
//!
//! Each frame has the shape of a Prefect 3 flow-run state-change event as the events
//! websocket delivers it: the labels the service reads, plus the related resources and state
//! payload it does not read but still has to parse past.

use std::sync::Arc;

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, SubsecRound, Utc};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

/// `(prefect.state-type, prefect.state-name)` of the events before each run's terminal one,
/// taken in turn.
const NON_TERMINAL_STATES: [(&str, &str); 2] = [("PENDING", "Pending"), ("RUNNING", "Running")];
const TERMINAL_STATE: (&str, &str) = ("COMPLETED", "Completed");
/// State a run is in before its first event.
const INITIAL_STATE: (&str, &str) = ("SCHEDULED", "Scheduled");
/// Tag that the service's events filter selects on by default.
const TAG: &str = "k3s-job-runner";

/// The runs of one repeat and the events sent for each of them.
#[derive(Debug, Clone)]
pub struct EventPlan {
    pub run_ids: Arc<[Uuid]>,
    /// Events per run, the last of them terminal.
    pub events_per_run: usize,
    /// Time of the first event, whole microseconds so that it survives a text round trip.
    base: DateTime<Utc>,
}

impl EventPlan {
    /// Plans `runs` fresh flow runs with `events_per_run` state events each.
    pub fn new(runs: usize, events_per_run: usize) -> Self {
        let run_ids: Arc<[Uuid]> = (0..runs).map(|_| Uuid::new_v4()).collect();
        Self { run_ids, events_per_run, base: Utc::now().trunc_subsecs(6) }
    }

    pub fn total_events(&self) -> usize {
        self.run_ids.len() * self.events_per_run
    }

    /// `prefect.state-timestamp` of the terminal event of the run at `index`. Unique per run,
    /// so a waiter can tell that it received its own run's event.
    pub fn terminal_timestamp(&self, index: usize) -> DateTime<Utc> {
        self.state_timestamp(self.events_per_run - 1, index)
    }

    /// Serialises every event. Frames go out step by step: the first event of every run,
    /// then the second of every run, and so on, so all runs keep waiting until the last step.
    pub fn frames(&self) -> Vec<Message> {
        let related = related_resources();
        let mut previous_ids: Vec<Option<Uuid>> = vec![None; self.run_ids.len()];
        let mut frames = Vec::with_capacity(self.total_events());
        for step in 0..self.events_per_run {
            for (index, &flow_run_id) in self.run_ids.iter().enumerate() {
                let event_id = Uuid::new_v4();
                let event = StateEvent {
                    event_id,
                    follows: previous_ids[index],
                    flow_run_id,
                    index,
                    from: self.state_before(step),
                    to: self.state_at(step),
                    timestamp: self.state_timestamp(step, index),
                };
                frames.push(Message::text(event.to_frame(&related)));
                previous_ids[index] = Some(event_id);
            }
        }
        frames
    }

    fn state_at(&self, step: usize) -> (&'static str, &'static str) {
        if step + 1 == self.events_per_run {
            TERMINAL_STATE
        } else {
            NON_TERMINAL_STATES[step % NON_TERMINAL_STATES.len()]
        }
    }

    fn state_before(&self, step: usize) -> (&'static str, &'static str) {
        match step {
            0 => INITIAL_STATE,
            _ => self.state_at(step - 1),
        }
    }

    /// Returns the base time plus one second per step and one microsecond per run.
    fn state_timestamp(&self, step: usize, index: usize) -> DateTime<Utc> {
        self.base + ChronoDuration::seconds(step as i64) + ChronoDuration::microseconds(index as i64)
    }
}

/// One state change of one run.
struct StateEvent {
    event_id: Uuid,
    follows: Option<Uuid>,
    flow_run_id: Uuid,
    index: usize,
    from: (&'static str, &'static str),
    to: (&'static str, &'static str),
    timestamp: DateTime<Utc>,
}

impl StateEvent {
    fn to_frame(&self, related: &Value) -> String {
        let (to_type, to_name) = self.to;
        let (from_type, from_name) = self.from;
        let occurred = self.timestamp.to_rfc3339_opts(SecondsFormat::Micros, true);
        let received =
            (self.timestamp + ChronoDuration::milliseconds(3)).to_rfc3339_opts(SecondsFormat::Micros, true);
        json!({
            "type": "event",
            "event": {
                "occurred": occurred,
                "event": format!("prefect.flow-run.{to_name}"),
                "resource": {
                    "prefect.resource.id": format!("prefect.flow-run.{}", self.flow_run_id),
                    "prefect.resource.name": format!("bench-run-{}", self.index),
                    "prefect.run-count": if to_type == "PENDING" { "0" } else { "1" },
                    "prefect.state-message": "",
                    "prefect.state-name": to_name,
                    "prefect.state-timestamp": self.timestamp.to_rfc3339_opts(SecondsFormat::Micros, false),
                    "prefect.state-type": to_type,
                },
                "related": related,
                "payload": {
                    "intended": {"from": from_type, "to": to_type},
                    "initial_state": {"type": from_type, "name": from_name},
                    "validated_state": {"type": to_type, "name": to_name},
                },
                "id": self.event_id,
                "follows": self.follows,
                "received": received,
            }
        })
        .to_string()
    }
}

/// Related resources of a run of this service's deployment: flow, deployment, work queue,
/// work pool, the service's tag and the deployment as creator.
fn related_resources() -> Value {
    let flow = Uuid::new_v4();
    let deployment = Uuid::new_v4();
    let work_queue = Uuid::new_v4();
    let work_pool = Uuid::new_v4();
    json!([
        {
            "prefect.resource.id": format!("prefect.flow.{flow}"),
            "prefect.resource.role": "flow",
            "prefect.resource.name": "python-runner",
        },
        {
            "prefect.resource.id": format!("prefect.deployment.{deployment}"),
            "prefect.resource.role": "deployment",
            "prefect.resource.name": "python-runner",
        },
        {
            "prefect.resource.id": format!("prefect.work-queue.{work_queue}"),
            "prefect.resource.role": "work-queue",
            "prefect.resource.name": "default",
        },
        {
            "prefect.resource.id": format!("prefect.work-pool.{work_pool}"),
            "prefect.resource.role": "work-pool",
            "prefect.resource.name": "local",
            "prefect.work-pool.type": "process",
        },
        {"prefect.resource.id": format!("prefect.tag.{TAG}"), "prefect.resource.role": "tag"},
        {
            "prefect.resource.id": format!("prefect.deployment.{deployment}"),
            "prefect.resource.role": "creator",
            "prefect.resource.name": "python-runner",
        },
    ])
}
