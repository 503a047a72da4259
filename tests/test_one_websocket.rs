//! Many waiting jobs share the service's one events websocket, and a burst of submissions
//! that SQLite partly rejects with 503 still gives every job its own result.

mod common;

use std::time::Duration;

use common::{PrefectProbe, Server};
use futures::future::join_all;

const JOBS: usize = 50;

#[tokio::test]
async fn fifty_jobs_share_one_websocket() {
    let server = Server::start().await;
    let jobs = (0..JOBS).map(|index| {
        let code = format!("print({index})");
        let server = &server;
        async move { (index, server.run(&code, Some(60)).await) }
    });
    let watcher = async {
        // Sample the status while the jobs wait, and keep the largest number seen waiting.
        let mut most_waiting = 0;
        for _ in 0..40 {
            let status = server.status().await;
            most_waiting = most_waiting.max(status["waiting_runs"].as_u64().unwrap_or(0));
            if most_waiting == JOBS as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        most_waiting
    };
    let (replies, most_waiting) = tokio::join!(join_all(jobs), watcher);

    for (index, reply) in &replies {
        assert!(!reply.is_error, "job {index}: {}", reply.text);
        assert_eq!(reply.stdout(), format!("{index}\n"), "job {index}");
    }
    assert!(most_waiting >= 2, "jobs should overlap while waiting, saw {most_waiting} at once");
    let status = server.status().await;
    assert_eq!(status["subscription"]["connections"], 1, "{status:#}");
    assert_eq!(status["subscription"]["mode"], "subscribed", "{status:#}");
    assert_eq!(status["waiting_runs"], 0, "{status:#}");
    // Each job registers its waiter seconds before its run can end, so its terminal event,
    // not a REST poll, completes it.
    assert_eq!(status["subscription"]["completions_from_events"], JOBS, "{status:#}");
    // One run per job, each completed on its first attempt: no job ran twice.
    let probe = PrefectProbe::new();
    let runs = probe.run_ids_with_tag(&server.tag).await;
    assert_eq!(runs.len(), JOBS);
    for flow_run_id in runs {
        let run = probe.flow_run(flow_run_id).await;
        assert_eq!(run["state"]["type"], "COMPLETED", "run {flow_run_id}");
        assert_eq!(run["run_count"], 1, "run {flow_run_id}");
    }
    server.stop().await;
}
