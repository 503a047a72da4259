//! A run that never starts is cancelled when its time is up, and a caller that cancels its
//! request cancels the flow run.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{PrefectProbe, Server};

#[tokio::test]
async fn unstarted_run_times_out_and_is_cancelled() {
    let probe = PrefectProbe::new();
    let deployment = probe.register_unattended_deployment().await;
    let overrides = HashMap::from([
        ("K3S_JOB_RUNNER_DEPLOYMENT", deployment),
        ("K3S_JOB_RUNNER_STARTUP_ALLOWANCE_SECONDS", "2".to_owned()),
    ]);
    let server = Server::start_with(overrides).await;
    let reply = server.run("print('never runs')", Some(10)).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "timeout", "{}", reply.text);
    let flow_run_id = reply.flow_run_id().expect("the timeout names the flow run");
    assert!(reply.error().contains(&flow_run_id.to_string()), "{}", reply.error());
    assert!(reply.error().contains("start-up allowance of 2 s"), "{}", reply.error());
    // A run that has not started goes straight from CANCELLING to CANCELLED.
    let run = probe.wait_for_terminal(flow_run_id, Duration::from_secs(30)).await;
    assert_eq!(run["state"]["type"], "CANCELLED", "{run:#}");
    assert_eq!(server.status().await["waiting_runs"], 0);
    server.stop().await;
}

#[tokio::test]
async fn client_cancellation_cancels_flow_run() {
    let probe = PrefectProbe::new();
    let server = Server::start().await;
    let code = "import time; print('started', flush=True); time.sleep(60)";

    // Dropping the call makes rmcp's client send notifications/cancelled.
    let call = tokio::time::timeout(Duration::from_secs(10), server.run(code, Some(120))).await;
    assert!(call.is_err(), "a 60 s job cannot finish within 10 s");

    let runs = probe.run_ids_with_tag(&server.tag).await;
    assert_eq!(runs.len(), 1, "exactly one run was created");
    let run = probe.wait_for_terminal(runs[0], Duration::from_secs(30)).await;
    assert_eq!(run["state"]["type"], "CANCELLED", "{run:#}");
    assert_eq!(server.status().await["waiting_runs"], 0);
    server.stop().await;
}
