//! Requests rejected before anything reaches Prefect, and a Prefect that cannot serve them.

mod common;

use std::collections::HashMap;

use common::{PrefectProbe, Server};
use rmcp::model::CallToolRequestParams;
use serde_json::{json, Value};

#[tokio::test]
async fn code_over_limit_is_rejected_unsubmitted() {
    let server = Server::start().await;
    let code = format!("#{}", "x".repeat(50_000));
    let reply = server.run(&code, None).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "invalid_request");
    assert!(reply.error().contains("50001 characters"), "{}", reply.error());
    assert!(reply.error().contains("limit of 50000 characters"), "{}", reply.error());
    assert_eq!(reply.results()["flow_run_id"], serde_json::Value::Null);
    assert_eq!(reply.value["meta_data"]["code_length"], 50_001);
    assert_eq!(PrefectProbe::new().count_runs_with_tag(&server.tag).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn empty_and_blank_code_are_rejected() {
    let server = Server::start().await;
    for code in ["", "   \n\t"] {
        let reply = server.run(code, None).await;
        assert!(reply.is_error, "code {code:?}");
        assert_eq!(reply.status(), "invalid_request", "code {code:?}");
        assert!(reply.error().contains("empty"), "{}", reply.error());
    }
    assert_eq!(PrefectProbe::new().count_runs_with_tag(&server.tag).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn arguments_of_wrong_type_name_the_field() {
    let server = Server::start().await;
    let cases = [
        (json!({"code": "print(1)", "timeout_seconds": "abc"}), "timeout_seconds must be a whole number"),
        (json!({"code": 5}), "code must be a string of Python source"),
    ];
    for (arguments, expected) in cases {
        let Value::Object(arguments) = arguments else { unreachable!() };
        let params = CallToolRequestParams::new("run_python_job_tool").with_arguments(arguments);
        let result = server.client.call_tool(params).await.expect("the call returns a result");
        assert_eq!(result.is_error, Some(true), "{result:?}");
        let text = result.content.iter().filter_map(|block| block.as_text()).map(|text| text.text.clone());
        let text = text.collect::<Vec<_>>().join("\n");
        assert!(text.contains(expected), "{text}");
    }
    assert_eq!(PrefectProbe::new().count_runs_with_tag(&server.tag).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn timeouts_outside_range_are_rejected() {
    let server = Server::start().await;
    for timeout_seconds in [9, 601] {
        let reply = server.run("print(1)", Some(timeout_seconds)).await;
        assert!(reply.is_error, "timeout {timeout_seconds}");
        assert_eq!(reply.status(), "invalid_request");
        assert!(reply.error().contains("10-600"), "{}", reply.error());
        assert!(reply.error().contains(&timeout_seconds.to_string()), "{}", reply.error());
    }
    assert_eq!(PrefectProbe::new().count_runs_with_tag(&server.tag).await, 0);
    server.stop().await;
}

#[tokio::test]
async fn timeout_bounds_are_accepted() {
    let server = Server::start().await;
    for timeout_seconds in [10, 600] {
        let reply = server.run("print('bound')", Some(timeout_seconds)).await;
        assert!(!reply.is_error, "timeout {timeout_seconds}: {}", reply.text);
        assert_eq!(reply.stdout(), "bound\n");
        assert_eq!(reply.value["meta_data"]["timeout_seconds"], timeout_seconds);
    }
    assert_eq!(PrefectProbe::new().count_runs_with_tag(&server.tag).await, 2);
    server.stop().await;
}

#[tokio::test]
async fn missing_deployment_says_how_to_fix() {
    let overrides =
        HashMap::from([("K3S_JOB_RUNNER_DEPLOYMENT", "python-runner/no-such-deployment".to_owned())]);
    let server = Server::start_with(overrides).await;
    let reply = server.run("print(1)", None).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "deployment_not_found");
    assert!(reply.error().contains("no-such-deployment"), "{}", reply.error());
    assert!(reply.error().contains("K3S_JOB_RUNNER_DEPLOYMENT"), "{}", reply.error());
    server.stop().await;
}

#[tokio::test]
async fn wrong_api_path_is_not_a_missing_deployment() {
    // The stack's server, under a path where no Prefect route lives.
    let wrong_url = common::api_url().replace("/api", "/no-such-path/api");
    let server = Server::start_with(HashMap::from([("PREFECT_API_URL", wrong_url.clone())])).await;
    let reply = server.run("print(1)", None).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "prefect_unreachable");
    assert!(reply.error().contains("does not lead to a Prefect API"), "{}", reply.error());
    assert!(reply.error().contains(&wrong_url), "{}", reply.error());
    server.stop().await;
}

#[tokio::test]
async fn unreachable_prefect_is_reported() {
    // Port 9 (discard) on loopback has no listener, so every connection is refused.
    let overrides = HashMap::from([("PREFECT_API_URL", "http://127.0.0.1:9/api".to_owned())]);
    let server = Server::start_with(overrides).await;
    let reply = server.run("print(1)", None).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "prefect_unreachable");
    assert!(reply.error().contains("127.0.0.1:9"), "{}", reply.error());
    assert!(reply.error().contains("PREFECT_API_URL"), "{}", reply.error());
    server.stop().await;
}
