//! End-to-end jobs through the MCP server against the real local Prefect stack.

mod common;

use common::{assert_no_job_processes_left, PrefectProbe, Server};

#[tokio::test]
async fn sum_of_range_returns_45() {
    let server = Server::start().await;
    let reply = server.run("print(sum(range(10)))", None).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "45\n");
    assert_eq!(reply.value["meta_data"]["timeout_seconds"], 120);
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn hello_completes_with_exit_zero() {
    let server = Server::start().await;
    let reply = server.run("print('hi')", Some(30)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.status(), "completed");
    assert_eq!(reply.stdout(), "hi\n");
    assert_eq!(reply.stderr(), "");
    assert_eq!(reply.exit_code(), Some(0));
    assert_eq!(reply.results()["success"], true);
    assert_eq!(reply.results()["state"], "Completed");
    assert_eq!(reply.results()["truncated"], false);
    assert_eq!(reply.value["meta_data"]["is_error"], false);
    assert_eq!(reply.value["meta_data"]["code_length"], 11);
    assert_eq!(reply.value["meta_data"]["flow_run_id"], reply.results()["flow_run_id"]);
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn input_gets_eof_instead_of_hanging() {
    let server = Server::start().await;
    let reply = server.run("print(\"hi\", input(\"name? \"))", Some(60)).await;

    // An inherited, open stdin would block input() until the timeout.
    assert_eq!(reply.status(), "error", "{}", reply.text);
    assert!(reply.is_error);
    assert_eq!(reply.exit_code(), Some(1));
    assert!(reply.stderr().contains("EOFError"), "stderr: {}", reply.stderr());
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn exit_code_three_runs_once() {
    let server = Server::start().await;
    let code = "import os; print(\"side-effect\", flush=True); os._exit(3)";
    let reply = server.run(code, Some(30)).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "error");
    assert_eq!(reply.exit_code(), Some(3));
    assert_eq!(reply.stdout(), "side-effect\n");
    assert!(reply.error().contains("exited with code 3"), "{}", reply.error());
    // Failing user code is a result, not a failed run, so Prefect never retries it.
    let flow_run = PrefectProbe::new().flow_run(reply.flow_run_id().expect("a flow run was created")).await;
    assert_eq!(flow_run["state"]["type"], "COMPLETED");
    assert_eq!(flow_run["run_count"], 1);
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn both_streams_and_exit_one_return() {
    let server = Server::start().await;
    let code = "import sys; print(\"out\"); print(\"err\", file=sys.stderr); raise SystemExit(1)";
    let reply = server.run(code, Some(30)).await;

    assert!(reply.is_error);
    assert_eq!(reply.stdout(), "out\n");
    assert_eq!(reply.stderr(), "err\n");
    assert_eq!(reply.exit_code(), Some(1));
    assert_eq!(reply.results()["success"], false);
    assert!(reply.text.contains("--- stdout ---\nout\n"), "{}", reply.text);
    assert_no_job_processes_left().await;
    server.stop().await;
}
