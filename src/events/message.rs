//! Messages of Prefect's `/api/events/out` websocket protocol: what we send, and parsing of
//! what the server sends. Pure functions, no I/O.

use chrono::{DateTime, Duration as ChronoDuration, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::prefect::{State, StateType};

const FLOW_RUN_RESOURCE_PREFIX: &str = "prefect.flow-run.";

/// First message after the upgrade. Prefect requires it whenever the `prefect` subprotocol is
/// used, with a `null` token when the server has no auth string.
pub fn auth_message(token: Option<&str>) -> String {
    json!({"type": "auth", "token": token}).to_string()
}

/// Second message: which events to stream. Selects state changes of flow runs carrying `tag`.
///
/// Prefect's `occurred.until` defaults to the moment the server parses the filter, which would
/// exclude every live event, so `until` is set a year ahead. The server clamps `since` to at
/// most 15 minutes back. Tags are matched with `any_resource` because Prefect applies
/// `related` filters only to backfill, not to the live stream.
pub fn filter_message(tag: &str, since: DateTime<Utc>, now: DateTime<Utc>, backfill: bool) -> String {
    let until = now + ChronoDuration::days(365);
    json!({
        "type": "filter",
        "filter": {
            "occurred": {
                "since": since.to_rfc3339_opts(SecondsFormat::Micros, true),
                "until": until.to_rfc3339_opts(SecondsFormat::Micros, true),
            },
            "event": {
                "prefix": ["prefect.flow-run."],
                "exclude_name": ["prefect.flow-run.heartbeat"],
            },
            "any_resource": {"id": [format!("prefect.tag.{tag}")]},
        },
        "backfill": backfill,
    })
    .to_string()
}

/// A message from the events server.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// Reply to our auth message.
    AuthSuccess,
    /// An event, already reduced to a flow-run state change, or `None` for any other event.
    Event { id: Option<Uuid>, state_change: Option<FlowRunStateEvent> },
    /// A message type this service does not use.
    Other(String),
}

/// Error for a frame that is not a valid server message.
#[derive(Debug, thiserror::Error)]
#[error("invalid events message: {0}")]
pub struct InvalidMessage(#[from] serde_json::Error);

/// A flow run's state change, read from a `prefect.flow-run.*` event.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRunStateEvent {
    /// The event id, which is the new state's id; repeated deliveries share it.
    pub event_id: Uuid,
    pub flow_run_id: Uuid,
    pub state: State,
    pub occurred: DateTime<Utc>,
}

/// Parses one text frame.
///
/// # Errors
/// Returns [`InvalidMessage`] when the frame is not JSON or an event lacks its envelope.
pub fn parse_server_message(text: &str) -> Result<ServerMessage, InvalidMessage> {
    let envelope: Envelope<'_> = serde_json::from_str(text)?;
    let message = match envelope.message_type.as_str() {
        "auth_success" => ServerMessage::AuthSuccess,
        "event" => {
            let event: RawEvent = serde_json::from_str(envelope.event.map_or("null", RawValue::get))?;
            ServerMessage::Event { id: event.id, state_change: flow_run_state_event(&event) }
        }
        other => ServerMessage::Other(other.to_owned()),
    };
    Ok(message)
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    message_type: String,
    /// The event's text, parsed only for `event` messages and then straight into
    /// [`RawEvent`], which skips the related resources and payload without building values.
    #[serde(default, borrow)]
    event: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(default)]
    id: Option<Uuid>,
    event: String,
    occurred: DateTime<Utc>,
    resource: Map<String, Value>,
}

/// Reduces an event to a state change. Heartbeats carry the same resource id but no state
/// labels, so they give `None`. The decision keys on the `prefect.state-type` label, never on
/// the event name, because names such as `TimedOut` hide their type.
fn flow_run_state_event(event: &RawEvent) -> Option<FlowRunStateEvent> {
    if !event.event.starts_with(FLOW_RUN_RESOURCE_PREFIX) {
        return None;
    }
    let label = |name: &str| event.resource.get(name).and_then(Value::as_str);
    let flow_run_id = label("prefect.resource.id")?.strip_prefix(FLOW_RUN_RESOURCE_PREFIX)?.parse().ok()?;
    let state_type = StateType::from_label(label("prefect.state-type")?);
    let state = State {
        state_type,
        name: label("prefect.state-name").unwrap_or_default().to_owned(),
        message: label("prefect.state-message").filter(|message| !message.is_empty()).map(str::to_owned),
        timestamp: label("prefect.state-timestamp")
            .and_then(|text| text.parse().ok())
            .or(Some(event.occurred)),
    };
    Some(FlowRunStateEvent { event_id: event.id?, flow_run_id, state, occurred: event.occurred })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN_ID: &str = "0c7b2f52-5a52-4b7a-9a27-3d1b52b5e0a1";
    const EVENT_ID: &str = "9f2d0c4e-8f3a-4a51-b1c2-6f0e2a3b4c5d";

    fn event_frame(name: &str, resource: Value) -> String {
        json!({
            "type": "event",
            "event": {
                "id": EVENT_ID,
                "occurred": "2026-12-04T15:00:00.123456Z",
                "event": name,
                "resource": resource,
                "related": [],
                "payload": {},
            }
        })
        .to_string()
    }

    fn state_resource(state_type: &str, state_name: &str) -> Value {
        json!({
            "prefect.resource.id": format!("prefect.flow-run.{RUN_ID}"),
            "prefect.resource.name": "clever-fox",
            "prefect.state-type": state_type,
            "prefect.state-name": state_name,
            "prefect.state-message": "",
            "prefect.state-timestamp": "2026-12-04T15:00:00.120000+00:00",
            "prefect.run-count": "1",
        })
    }

    fn state_change(frame: &str) -> FlowRunStateEvent {
        match parse_server_message(frame).expect("valid frame") {
            ServerMessage::Event { state_change: Some(change), .. } => change,
            other => panic!("expected a state change, got {other:?}"),
        }
    }

    #[test]
    fn completed_event_parses_to_terminal_state() {
        let change = state_change(&event_frame(
            "prefect.flow-run.Completed",
            state_resource("COMPLETED", "Completed"),
        ));
        assert_eq!(change.flow_run_id.to_string(), RUN_ID);
        assert_eq!(change.event_id.to_string(), EVENT_ID);
        assert_eq!(change.state.state_type, StateType::Completed);
        assert_eq!(change.state.name, "Completed");
        assert_eq!(change.state.message, None);
        assert!(change.state.is_terminal());
    }

    #[test]
    fn timed_out_event_keys_on_state_type() {
        let change =
            state_change(&event_frame("prefect.flow-run.TimedOut", state_resource("FAILED", "TimedOut")));
        assert_eq!(change.state.state_type, StateType::Failed);
        assert_eq!(change.state.name, "TimedOut");
        assert!(change.state.is_terminal());
    }

    #[test]
    fn cancelling_event_is_not_terminal() {
        let change = state_change(&event_frame(
            "prefect.flow-run.Cancelling",
            state_resource("CANCELLING", "Cancelling"),
        ));
        assert!(!change.state.is_terminal());
    }

    #[test]
    fn heartbeat_event_has_no_state_change() {
        let resource = json!({"prefect.resource.id": format!("prefect.flow-run.{RUN_ID}")});
        let message = parse_server_message(&event_frame("prefect.flow-run.heartbeat", resource)).unwrap();
        assert!(matches!(message, ServerMessage::Event { state_change: None, .. }), "{message:?}");
    }

    #[test]
    fn event_for_other_resource_has_no_state_change() {
        let resource =
            json!({"prefect.resource.id": "prefect.deployment.abc", "prefect.state-type": "COMPLETED"});
        let message = parse_server_message(&event_frame("prefect.deployment.updated", resource)).unwrap();
        assert!(matches!(message, ServerMessage::Event { state_change: None, .. }), "{message:?}");
    }

    #[test]
    fn event_with_bad_run_id_has_no_state_change() {
        let mut resource = state_resource("COMPLETED", "Completed");
        resource["prefect.resource.id"] = json!("prefect.flow-run.not-a-uuid");
        let message = parse_server_message(&event_frame("prefect.flow-run.Completed", resource)).unwrap();
        assert!(matches!(message, ServerMessage::Event { state_change: None, .. }), "{message:?}");
    }

    #[test]
    fn state_message_is_kept() {
        let mut resource = state_resource("CRASHED", "Crashed");
        resource["prefect.state-message"] =
            json!("Flow run infrastructure exited with non-zero status code 1.");
        let change = state_change(&event_frame("prefect.flow-run.Crashed", resource));
        assert_eq!(
            change.state.message.as_deref(),
            Some("Flow run infrastructure exited with non-zero status code 1.")
        );
    }

    #[test]
    fn auth_success_parses() {
        assert_eq!(parse_server_message(r#"{"type":"auth_success"}"#).unwrap(), ServerMessage::AuthSuccess);
    }

    #[test]
    fn unknown_message_type_is_other() {
        assert_eq!(
            parse_server_message(r#"{"type":"pong"}"#).unwrap(),
            ServerMessage::Other("pong".to_owned())
        );
    }

    #[test]
    fn malformed_frame_is_an_error() {
        assert!(parse_server_message("not json").is_err());
        assert!(parse_server_message(r#"{"type":"event","event":{"id":1}}"#).is_err());
    }

    #[test]
    fn event_message_without_event_is_an_error() {
        assert!(parse_server_message(r#"{"type":"event"}"#).is_err());
        assert!(parse_server_message(r#"{"type":"event","event":null}"#).is_err());
    }

    #[test]
    fn event_field_of_other_message_is_not_parsed() {
        assert_eq!(
            parse_server_message(r#"{"type":"pong","event":5}"#).unwrap(),
            ServerMessage::Other("pong".to_owned())
        );
    }

    #[test]
    fn escaped_state_message_is_unescaped() {
        let mut resource = state_resource("FAILED", "Failed");
        resource["prefect.state-message"] = json!("Flow run failed: \"boom\"\nsee logs");
        let change = state_change(&event_frame("prefect.flow-run.Failed", resource));
        assert_eq!(change.state.message.as_deref(), Some("Flow run failed: \"boom\"\nsee logs"));
    }

    #[test]
    fn auth_message_sends_null_without_token() {
        let message: Value = serde_json::from_str(&auth_message(None)).unwrap();
        assert_eq!(message, json!({"type": "auth", "token": null}));
        let message: Value = serde_json::from_str(&auth_message(Some("admin:pw"))).unwrap();
        assert_eq!(message["token"], "admin:pw");
    }

    #[test]
    fn filter_sets_until_far_ahead() {
        let now: DateTime<Utc> = "2026-12-04T15:00:00Z".parse().unwrap();
        let since = now - ChronoDuration::seconds(30);
        let message: Value =
            serde_json::from_str(&filter_message("k3s-job-runner", since, now, true)).unwrap();

        let until: DateTime<Utc> = message["filter"]["occurred"]["until"].as_str().unwrap().parse().unwrap();
        assert!(until - now >= ChronoDuration::days(364), "until {until} is not far ahead of {now}");
        let sent_since: DateTime<Utc> =
            message["filter"]["occurred"]["since"].as_str().unwrap().parse().unwrap();
        assert_eq!(sent_since, since);
    }

    #[test]
    fn filter_selects_flow_run_events_by_tag() {
        let now = Utc::now();
        let message: Value =
            serde_json::from_str(&filter_message("k3s-job-runner", now, now, false)).unwrap();
        assert_eq!(message["type"], "filter");
        assert_eq!(message["backfill"], false);
        assert_eq!(message["filter"]["event"]["prefix"], json!(["prefect.flow-run."]));
        assert_eq!(message["filter"]["event"]["exclude_name"], json!(["prefect.flow-run.heartbeat"]));
        assert_eq!(message["filter"]["any_resource"]["id"], json!(["prefect.tag.k3s-job-runner"]));
        assert!(
            message["filter"].get("related").is_none(),
            "related is ignored live and must not be relied on"
        );
    }

    #[test]
    fn filter_has_no_null_fields() {
        let now = Utc::now();
        let text = filter_message("t", now, now, true);
        assert!(!text.contains("null"), "Prefect rejects unknown or null filter keys: {text}");
    }
}
