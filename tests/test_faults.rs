//! Waiting that survives faults between the service and Prefect, injected by a TCP proxy in
//! front of the real local stack.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::proxy::FaultProxy;
use common::{api_url, PrefectProbe, Server};
use futures::future::join_all;
use serde_json::Value;
use uuid::Uuid;

/// Starts a proxy in front of the test stack and a server that talks to Prefect through it.
async fn server_behind_proxy(extra: &[(&'static str, &str)]) -> (FaultProxy, Server) {
    let proxy = FaultProxy::start(&api_url()).await;
    let mut overrides = HashMap::from([("PREFECT_API_URL", proxy.api_url())]);
    for (name, value) in extra {
        overrides.insert(*name, (*value).to_owned());
    }
    let server = Server::start_with(overrides).await;
    (proxy, server)
}

fn is_subscribed(status: &Value) -> bool {
    status["subscription"]["mode"] == "subscribed"
}

/// Checks that Prefect contains exactly `expected` runs with the server's tag, each completed
/// after a single attempt.
async fn assert_each_run_once(server: &Server, expected: usize) {
    let probe = PrefectProbe::new();
    let runs = probe.run_ids_with_tag(&server.tag).await;
    assert_eq!(runs.len(), expected, "flow runs created");
    for flow_run_id in runs {
        let run = probe.flow_run(flow_run_id).await;
        assert_eq!(run["state"]["type"], "COMPLETED", "run {flow_run_id}");
        assert_eq!(run["run_count"], 1, "run {flow_run_id}");
    }
}

#[tokio::test]
async fn websocket_cut_mid_job_returns_once() {
    let (proxy, server) = server_behind_proxy(&[]).await;
    assert!(is_subscribed(&server.wait_for_status(Duration::from_secs(10), is_subscribed).await));

    let job = server.run("import time; time.sleep(30); print(\"done\")", Some(60));
    let cut = async {
        server.wait_for_status(Duration::from_secs(30), |status| status["waiting_runs"] == 1).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        proxy.cut_websockets();
    };
    let (reply, ()) = tokio::join!(job, cut);

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "done\n");
    let status = server.wait_for_status(Duration::from_secs(10), is_subscribed).await;
    assert_eq!(status["subscription"]["connections"], 2, "{status:#}");
    assert_eq!(status["waiting_runs"], 0);
    assert_eq!(proxy.websocket_upgrades(), 2);
    assert_each_run_once(&server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn silent_socket_completes_by_safety_poll() {
    let (proxy, server) = server_behind_proxy(&[("K3S_JOB_RUNNER_SAFETY_POLL_SECONDS", "5")]).await;
    assert!(is_subscribed(&server.wait_for_status(Duration::from_secs(10), is_subscribed).await));
    proxy.stall_websockets(true);

    let reply = server.run("print('quiet')", Some(30)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "quiet\n");
    let status = server.status().await;
    assert_eq!(status["subscription"]["completions_from_events"], 0, "{status:#}");
    assert_eq!(status["subscription"]["completions_from_polls"], 1, "{status:#}");
    assert_eq!(status["waiting_runs"], 0, "{status:#}");
    // Without the safety poll the job would wait for the 60 s idle timeout and a reconnect.
    let elapsed_ms = reply.value["meta_data"]["elapsed_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(elapsed_ms < 45_000, "elapsed {elapsed_ms} ms");
    server.stop().await;
}

#[tokio::test]
async fn refused_upgrade_falls_back_to_polling() {
    let proxy = FaultProxy::start(&api_url()).await;
    proxy.refuse_upgrades(Some(403));
    let server = Server::start_with(HashMap::from([("PREFECT_API_URL", proxy.api_url())])).await;

    let reply = server.run("print('polled')", Some(30)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "polled\n");
    let status = server.status().await;
    assert_eq!(status["subscription"]["mode"], "polling", "{status:#}");
    assert_eq!(status["subscription"]["connections"], 0, "{status:#}");
    assert_eq!(status["waiting_runs"], 0, "{status:#}");
    assert!(proxy.refused_upgrades() >= 1);
    // The socket is retried slowly, not in a tight loop.
    assert!(proxy.refused_upgrades() <= 3, "{} upgrade attempts", proxy.refused_upgrades());
    server.stop().await;
}

#[tokio::test]
async fn rest_503_burst_is_ridden_out() {
    let (proxy, server) = server_behind_proxy(&[]).await;
    assert!(is_subscribed(&server.wait_for_status(Duration::from_secs(10), is_subscribed).await));
    proxy.answer_rest_with_503(true);

    let job = server.run("print('after 503')", Some(30));
    let heal = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        proxy.answer_rest_with_503(false);
    };
    let (reply, ()) = tokio::join!(job, heal);

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "after 503\n");
    assert!(proxy.rest_unavailable_answers() >= 2, "{} injected 503s", proxy.rest_unavailable_answers());
    assert_eq!(server.status().await["waiting_runs"], 0);
    assert_each_run_once(&server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn service_recovers_when_prefect_comes_up() {
    let proxy = FaultProxy::start(&api_url()).await;
    proxy.refuse_connections(true).await;
    let server = Server::start_with(HashMap::from([("PREFECT_API_URL", proxy.api_url())])).await;

    let reply = server.run("print('too early')", Some(30)).await;
    assert!(reply.is_error);
    assert_eq!(reply.status(), "prefect_unreachable", "{}", reply.text);
    assert_eq!(PrefectProbe::new().count_runs_with_tag(&server.tag).await, 0);

    proxy.refuse_connections(false).await;
    let reply = server.run("print('on time')", Some(30)).await;
    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "on time\n");
    let status = server.wait_for_status(Duration::from_secs(40), is_subscribed).await;
    assert!(is_subscribed(&status), "{status:#}");
    server.stop().await;
}

#[tokio::test]
async fn sigterm_ends_waiting_job_and_cancels_run() {
    let server = Server::start().await;
    let job = server.run("import time; time.sleep(60)", Some(120));
    let stop = async {
        // Stop once the code runs, so the cancellation has a process to kill.
        wait_until_running(&server).await;
        let killed = std::process::Command::new("kill").args(["-TERM", &server.pid.to_string()]).status();
        assert!(killed.expect("kill runs").success());
    };
    let (reply, ()) = tokio::join!(job, stop);

    assert!(reply.is_error);
    assert_eq!(reply.status(), "shutting_down", "{}", reply.text);
    let flow_run_id: Uuid = reply.flow_run_id().expect("the result names the run");
    let run = PrefectProbe::new().wait_for_terminal(flow_run_id, Duration::from_secs(60)).await;
    assert_eq!(run["state"]["type"], "CANCELLED", "{run:#}");
}

#[tokio::test]
async fn prefect_restart_mid_job_returns_once() {
    let (_proxy, server) = server_behind_proxy(&[]).await;
    assert!(is_subscribed(&server.wait_for_status(Duration::from_secs(10), is_subscribed).await));

    let job = server.run("import time; time.sleep(30); print(\"survived\")", Some(120));
    let restart = async {
        // Restart once the code runs: a run that Prefect's worker is still starting while the
        // server is down crashes inside Prefect, which is not the fault under test here.
        wait_until_running(&server).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        restart_prefect_server().await;
    };
    let (reply, ()) = tokio::join!(job, restart);

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "survived\n");
    let status = server.wait_for_status(Duration::from_secs(60), is_subscribed).await;
    assert!(status["subscription"]["connections"].as_u64().unwrap_or(0) >= 2, "{status:#}");
    assert_eq!(status["waiting_runs"], 0);
    assert_each_run_once(&server, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn hundred_jobs_with_socket_cut_every_5s() {
    const JOBS: usize = 100;
    // The local pool runs four flows at once, so the last runs wait minutes to start; the
    // fault under test is the socket, not the queue.
    let (proxy, server) = server_behind_proxy(&[("K3S_JOB_RUNNER_STARTUP_ALLOWANCE_SECONDS", "1200")]).await;
    assert!(is_subscribed(&server.wait_for_status(Duration::from_secs(10), is_subscribed).await));

    let jobs = join_all((0..JOBS).map(|index| {
        let server = &server;
        async move { (index, server.run(&format!("print({index})"), Some(600)).await) }
    }));
    let cutter = async {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            proxy.cut_websockets();
        }
    };
    let replies = tokio::select! {
        replies = jobs => replies,
        () = cutter => unreachable!("the cutter never ends"),
    };

    for (index, reply) in &replies {
        assert!(!reply.is_error, "job {index}: {}", reply.text);
        assert_eq!(reply.stdout(), format!("{index}\n"), "job {index}");
    }
    let status = server.status().await;
    assert_eq!(status["waiting_runs"], 0, "{status:#}");
    assert!(proxy.websocket_upgrades() >= 2, "the socket was cut and reopened");
    assert_each_run_once(&server, JOBS).await;
    server.stop().await;
}

/// Waits until the server's one flow run is in state RUNNING.
async fn wait_until_running(server: &Server) {
    let probe = PrefectProbe::new();
    for _ in 0..120 {
        if let Some(flow_run_id) = probe.run_ids_with_tag(&server.tag).await.first() {
            if probe.flow_run(*flow_run_id).await["state"]["type"] == "RUNNING" {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the flow run did not start within 60 s");
}

/// Restarts only the test stack's Prefect server, with the settings `deploy/local/test.sh`
/// exported.
async fn restart_prefect_server() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/stack.sh");
    let status = tokio::process::Command::new(script)
        .arg("restart-server")
        .status()
        .await
        .expect("stack.sh restart-server runs");
    assert!(status.success(), "stack.sh restart-server failed");
}

#[tokio::test]
async fn closed_stdin_cancels_waiting_run() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    // A hand-driven session, so closing stdin is the only signal the server gets: rmcp's
    // client would also send notifications/cancelled for the pending call.
    let tag = format!("k3s-job-runner-test-{}", Uuid::new_v4());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_k3s-job-runner"))
        .arg("serve")
        .env("PREFECT_API_URL", api_url())
        .env("K3S_JOB_RUNNER_TAG", &tag)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the server starts");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let messages = [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"fault-test","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"run_python_job_tool","arguments":{"code":"import time; time.sleep(60)","timeout_seconds":120}}}"#,
    ];
    stdin.write_all(messages[0].as_bytes()).await.unwrap();
    stdin.write_all(b"\n").await.unwrap();
    let initialized = stdout.next_line().await.expect("read stdout").expect("an initialize result");
    assert!(initialized.contains("\"id\":1"), "{initialized}");
    for message in &messages[1..] {
        stdin.write_all(message.as_bytes()).await.unwrap();
        stdin.write_all(b"\n").await.unwrap();
    }

    let probe = PrefectProbe::new();
    let mut runs = Vec::new();
    for _ in 0..60 {
        runs = probe.run_ids_with_tag(&tag).await;
        if !runs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(runs.len(), 1, "the job created one run");
    drop(stdin);

    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    assert!(exit.is_ok(), "the server exits after stdin closes");
    let run = probe.wait_for_terminal(runs[0], Duration::from_secs(60)).await;
    assert_eq!(run["state"]["type"], "CANCELLED", "{run:#}");
}
