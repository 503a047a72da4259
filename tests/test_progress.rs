//! A client that sends a progress token gets progress notifications while its job waits,
//! each naming the flow run's state.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, NumberOrString, ProgressNotificationParam, ProgressToken, RequestMetaObject,
};
use rmcp::service::NotificationContext;
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{json, Map, Value};

/// Maximum gap between two progress notifications, and before the first.
const MAX_GAP: Duration = Duration::from_secs(15);

/// Client that records every progress notification with its arrival time.
#[derive(Clone, Default)]
struct ProgressRecorder {
    seen: Arc<Mutex<Vec<(Instant, ProgressNotificationParam)>>>,
}

impl ClientHandler for ProgressRecorder {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.seen.lock().unwrap().push((Instant::now(), params));
    }
}

#[tokio::test]
async fn long_job_reports_progress_with_state() {
    let (command, _tag) = common::server_command(HashMap::new());
    let transport = TokioChildProcess::new(command).expect("the server binary starts");
    let recorder = ProgressRecorder::default();
    let client = recorder.clone().serve(transport).await.expect("MCP initialization succeeds");
    let mut arguments = Map::new();
    arguments
        .insert("code".to_owned(), Value::String("import time\ntime.sleep(32)\nprint('done')".to_owned()));
    arguments.insert("timeout_seconds".to_owned(), json!(60));
    let mut params = CallToolRequestParams::new("run_python_job_tool").with_arguments(arguments);
    let token = ProgressToken(NumberOrString::String("job-1".into()));
    params.meta = Some(RequestMetaObject::with_progress_token(token));

    let started = Instant::now();
    let result = client.call_tool(params).await.expect("the tool call returns a result");
    let finished = Instant::now();

    assert_ne!(result.is_error, Some(true), "{result:?}");
    let seen = recorder.seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "expected a notification every 10 s of a 35 s job, got {seen:?}");
    let mut previous = started;
    let mut previous_progress = 0.0;
    for (at, notification) in &seen {
        // rmcp's client puts its own token on each request, so only consistency is checked.
        assert_eq!(notification.progress_token, seen[0].1.progress_token);
        assert!(at.duration_since(previous) <= MAX_GAP, "gap of {:?}", at.duration_since(previous));
        assert!(notification.progress > previous_progress, "{seen:?}");
        let message = notification.message.as_deref().unwrap_or_default();
        assert!(message.contains("flow run "), "{message}");
        let names_state =
            ["Scheduled", "Pending", "Running"].iter().any(|state| message.contains(&format!(" is {state}")));
        assert!(names_state, "{message}");
        previous = *at;
        previous_progress = notification.progress;
    }
    assert!(
        finished.duration_since(previous) <= MAX_GAP,
        "no notification in the last {:?}",
        finished.duration_since(previous)
    );
    let last = seen.last().unwrap().1.message.clone().unwrap_or_default();
    assert!(last.contains(" is Running"), "the code runs for 32 s, so the run is Running by then: {last}");
    client.cancel().await.expect("the MCP session closes");
}
