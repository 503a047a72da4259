//! The two wait modes against the real stack: `events` learns completions from the one
//! websocket with a fixed number of REST calls per job, `poll` reads each run on a timer.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::Server;
use futures::future::join_all;
use serde_json::Value;

/// Long enough for several polls at the interval below.
const SLEEPING_CODE: &str = "import time\ntime.sleep(3)\nprint('done')";
const POLL_INTERVAL_MS: u64 = 500;
const JOBS: u64 = 3;

fn rest_requests(status: &Value) -> u64 {
    status["rest_requests"].as_u64().expect("rest_requests is a number")
}

/// Runs `JOBS` sleeping jobs one after another and returns the REST requests they caused.
async fn run_sleeping_jobs(server: &Server) -> u64 {
    let before = rest_requests(&server.status().await);
    for index in 0..JOBS {
        let reply = server.run(SLEEPING_CODE, Some(30)).await;
        assert!(!reply.is_error, "job {index}: {}", reply.text);
        assert_eq!(reply.stdout(), "done\n", "job {index}");
    }
    rest_requests(&server.status().await) - before
}

#[tokio::test]
async fn poll_mode_reads_each_run_on_a_timer() {
    let server = Server::start_with(HashMap::from([
        ("K3S_JOB_RUNNER_WAIT_MODE", "poll".to_owned()),
        ("K3S_JOB_RUNNER_POLL_INTERVAL_MS", POLL_INTERVAL_MS.to_string()),
    ]))
    .await;

    let requests = run_sleeping_jobs(&server).await;

    let status = server.status().await;
    assert_eq!(status["wait_mode"], "poll", "{status:#}");
    assert_eq!(status["subscription"], Value::Null, "poll mode opens no websocket: {status:#}");
    assert_eq!(status["waiting_runs"], 0, "{status:#}");
    // Each job sleeps 3 s after its run starts, so a 500 ms timer reads it at least 6 times,
    // on top of the creation and the result read.
    assert!(requests >= JOBS * 8, "{requests} REST requests for {JOBS} jobs in poll mode");
    server.stop().await;
}

#[tokio::test]
async fn events_mode_needs_no_reads_while_waiting() {
    let server = Server::start().await;
    let status = server
        .wait_for_status(Duration::from_secs(30), |status| status["subscription"]["mode"] == "subscribed")
        .await;
    assert_eq!(status["wait_mode"], "events", "{status:#}");
    let before = status;

    let jobs = (0..JOBS).map(|_| server.run(SLEEPING_CODE, Some(30)));
    let replies = join_all(jobs).await;

    for (index, reply) in replies.iter().enumerate() {
        assert!(!reply.is_error, "job {index}: {}", reply.text);
        assert_eq!(reply.stdout(), "done\n", "job {index}");
    }
    let status = server.status().await;
    assert_eq!(status["subscription"]["completions_from_events"], JOBS, "{status:#}");
    // Retries of SQLite's 503 responses depend on timing, so only first attempts are counted.
    // Each job makes the creation, the result read and a state read, which repeats if the
    // commit lags the event. The deployment lookup comes once, and a safety poll may fall while
    // the jobs wait. Polling every 500 ms would take at least 8 per job.
    let retries = status["rest_retries"].as_u64().unwrap() - before["rest_retries"].as_u64().unwrap();
    let first_attempts = rest_requests(&status) - rest_requests(&before) - retries;
    assert!(first_attempts <= JOBS * 4 + 2, "{first_attempts} REST requests for {JOBS} jobs in events mode");
    assert!(status["peak_memory_kib"].as_u64().is_some_and(|kib| kib > 0), "{status:#}");
    server.stop().await;
}
