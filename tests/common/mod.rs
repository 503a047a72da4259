//! Shared set-up for the integration tests: the service binary driven over stdio by rmcp's
//! client, against the real Prefect stack that `deploy/local/test.sh` starts.

#![allow(dead_code)]

pub mod proxy;

use std::collections::HashMap;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Map, Value};
use tokio::process::Command;
use uuid::Uuid;

/// Variable through which `deploy/local/test.sh` passes the test stack's API URL.
pub const API_URL_VARIABLE: &str = "K3S_JOB_RUNNER_TEST_API_URL";

/// Returns the test stack's Prefect API URL. Panics with the way to start it when it is unset, so a
/// plain `cargo test` fails loudly instead of skipping the end-to-end tests.
pub fn api_url() -> String {
    std::env::var(API_URL_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{API_URL_VARIABLE} is not set. Run the suite with deploy/local/test.sh, which starts a \
             Prefect server and worker and sets it"
        )
    })
}

/// Builds the command of a `k3s-job-runner serve` process against the test stack, with a
/// tag unique to it, and returns the command and the tag.
pub fn server_command(overrides: HashMap<&str, String>) -> (Command, String) {
    let tag = format!("k3s-job-runner-test-{}", Uuid::new_v4());
    let mut environment: HashMap<&str, String> = HashMap::from([
        ("PREFECT_API_URL", api_url()),
        ("K3S_JOB_RUNNER_TAG", tag.clone()),
        ("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned())),
    ]);
    environment.extend(overrides);
    let command = Command::new(env!("CARGO_BIN_EXE_k3s-job-runner")).configure(|command| {
        command.arg("serve");
        command.env_remove("PREFECT_API_KEY").env_remove("PREFECT_API_AUTH_STRING");
        command.envs(&environment);
    });
    (command, tag)
}

/// One `k3s-job-runner serve` process and the MCP client session talking to it.
pub struct Server {
    pub client: RunningService<RoleClient, ()>,
    /// Tag given to this server's flow runs, unique per server, so tests can count them.
    pub tag: String,
    /// Process id of the server.
    pub pid: u32,
}

impl Server {
    /// Starts a server against the test stack.
    pub async fn start() -> Self {
        Self::start_with(HashMap::new()).await
    }

    /// Starts a server with extra environment variables, which override the defaults.
    pub async fn start_with(overrides: HashMap<&str, String>) -> Self {
        let (command, tag) = server_command(overrides);
        let transport = TokioChildProcess::new(command).expect("the server binary starts");
        let pid = transport.id().expect("the server has a process id");
        let client = ().serve(transport).await.expect("MCP initialization succeeds");
        Self { client, tag, pid }
    }

    /// Calls `run_python_job_tool` with `code` and an optional timeout.
    pub async fn run(&self, code: &str, timeout_seconds: Option<i64>) -> ToolReply {
        let mut arguments = Map::new();
        arguments.insert("code".to_owned(), Value::String(code.to_owned()));
        if let Some(timeout_seconds) = timeout_seconds {
            arguments.insert("timeout_seconds".to_owned(), json!(timeout_seconds));
        }
        let params = CallToolRequestParams::new("run_python_job_tool").with_arguments(arguments);
        let result = self.client.call_tool(params).await.expect("the tool call returns a result");
        ToolReply::new(result)
    }

    /// Calls `runner_status` and returns its structured content.
    pub async fn status(&self) -> Value {
        let params = CallToolRequestParams::new("runner_status");
        let result = self.client.call_tool(params).await.expect("the status tool returns a result");
        result.structured_content.expect("the status has structured content")
    }

    /// Waits up to `limit` until the status satisfies `condition`, and returns the last status.
    pub async fn wait_for_status(&self, limit: Duration, condition: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let status = self.status().await;
            if condition(&status) || tokio::time::Instant::now() >= deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Closes the session, which ends the server process.
    pub async fn stop(self) {
        self.client.cancel().await.expect("the MCP session closes");
    }
}

/// A tool result, with accessors for the fields the tests read.
#[derive(Debug)]
pub struct ToolReply {
    pub is_error: bool,
    pub value: Value,
    pub text: String,
}

impl ToolReply {
    fn new(result: CallToolResult) -> Self {
        let text = result
            .content
            .iter()
            .filter_map(|block| block.as_text().map(|text| text.text.clone()))
            .collect::<Vec<_>>()
            .join("\n");
        let value = result.structured_content.expect("every job result has structured content");
        Self { is_error: result.is_error.unwrap_or(false), value, text }
    }

    pub fn results(&self) -> &Value {
        &self.value["results"]
    }

    pub fn stdout(&self) -> &str {
        self.results()["stdout"].as_str().expect("stdout is a string")
    }

    pub fn stderr(&self) -> &str {
        self.results()["stderr"].as_str().expect("stderr is a string")
    }

    pub fn status(&self) -> &str {
        self.results()["status"].as_str().expect("status is a string")
    }

    pub fn exit_code(&self) -> Option<i64> {
        self.results()["exit_code"].as_i64()
    }

    pub fn error(&self) -> &str {
        self.results()["error"].as_str().unwrap_or_default()
    }

    pub fn flow_run_id(&self) -> Option<Uuid> {
        self.results()["flow_run_id"].as_str().map(|id| id.parse().expect("flow_run_id is a UUID"))
    }
}

/// Minimal REST access to the test stack, for checks the service itself does not expose.
pub struct PrefectProbe {
    http: reqwest::Client,
    api_url: String,
}

impl PrefectProbe {
    pub fn new() -> Self {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("HTTP client builds");
        Self { http, api_url: api_url() }
    }

    /// Reads one flow run as JSON.
    pub async fn flow_run(&self, flow_run_id: Uuid) -> Value {
        let url = format!("{}/flow_runs/{flow_run_id}", self.api_url);
        let response = self.http.get(url).send().await.expect("GET flow run");
        assert!(response.status().is_success(), "GET flow run returned {}", response.status());
        response.json().await.expect("flow run JSON")
    }

    /// Counts the flow runs that carry `tag`.
    pub async fn count_runs_with_tag(&self, tag: &str) -> u64 {
        let body = json!({ "flow_runs": { "tags": { "all_": [tag] } } });
        let response = self.post("/flow_runs/count", &body).await;
        assert!(response.status().is_success(), "count returned {}", response.status());
        response.json().await.expect("count is a number")
    }
}

impl PrefectProbe {
    /// Reads the ids of the flow runs that carry `tag`.
    pub async fn run_ids_with_tag(&self, tag: &str) -> Vec<Uuid> {
        let body = json!({ "flow_runs": { "tags": { "all_": [tag] } }, "limit": 200 });
        let response = self.post("/flow_runs/filter", &body).await;
        assert!(response.status().is_success(), "filter returned {}", response.status());
        let runs: Vec<Value> = response.json().await.expect("flow runs JSON");
        runs.iter()
            .map(|run| run["id"].as_str().expect("run id").parse().expect("run id is a UUID"))
            .collect()
    }

    /// Waits up to `limit` for a flow run to reach a terminal state type, and returns its JSON.
    pub async fn wait_for_terminal(&self, flow_run_id: Uuid, limit: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let run = self.flow_run(flow_run_id).await;
            let state_type = run["state"]["type"].as_str().unwrap_or_default().to_owned();
            let terminal = ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"].contains(&state_type.as_str());
            if terminal || tokio::time::Instant::now() >= deadline {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Registers a deployment of the runner flow on a work pool that no worker polls, so its
    /// runs stay scheduled. Returns its `flow/deployment` name.
    pub async fn register_unattended_deployment(&self) -> String {
        let deployment = self.get("/deployments/name/python-runner/python-runner").await;
        let pool = json!({ "name": "k3s-job-runner-test-unattended", "type": "process" });
        let response = self.post("/work_pools/", &pool).await;
        assert!(
            response.status().is_success() || response.status().as_u16() == 409,
            "creating the pool returned {}",
            response.status()
        );
        let body = json!({
            "name": "unattended",
            "flow_id": deployment["flow_id"],
            "work_pool_name": "k3s-job-runner-test-unattended",
            "entrypoint": deployment["entrypoint"],
            "path": deployment["path"],
        });
        let response = self.post("/deployments/", &body).await;
        assert!(response.status().is_success(), "creating the deployment returned {}", response.status());
        "python-runner/unattended".to_owned()
    }

    /// Sends a POST, retrying while SQLite-backed Prefect returns 503 for concurrent writes.
    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        let url = format!("{}{path}", self.api_url);
        for _ in 0..60 {
            let response = self.http.post(&url).json(body).send().await.expect("POST reaches Prefect");
            if response.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("POST {path} returned 503 for 30 s");
    }

    async fn get(&self, path: &str) -> Value {
        let response = self.http.get(format!("{}{path}", self.api_url)).send().await.expect("GET");
        assert!(response.status().is_success(), "GET {path} returned {}", response.status());
        response.json().await.expect("JSON body")
    }
}

/// Uid that the sandbox runs submitted code as when the worker runs as root.
const SANDBOX_UID: &str = "65534";

/// Lists processes that belong to a job of the test stack: `bwrap` itself, anything running
/// as the sandbox's uid, and `sleep` or `sh` children. Jobs of another Prefect stack on the
/// same machine are left out (see [`started_by_other_stack`]).
pub fn job_processes() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let own_api_url = format!("PREFECT_API_URL={}", api_url());
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|name| name.chars().all(|c| c.is_ascii_digit())) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let command =
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ");
        let uid = status.lines().find_map(|line| line.strip_prefix("Uid:")).unwrap_or_default();
        let sandboxed = uid.split_whitespace().next() == Some(SANDBOX_UID);
        let child_of_case = command.starts_with("sleep 1000") || command.contains("while :; do echo t");
        let job_like = command.starts_with("bwrap") || command.starts_with("/usr/bin/bwrap");
        if (job_like || sandboxed || child_of_case) && !started_by_other_stack(pid, &own_api_url) {
            found.push(format!("{pid}: {command}"));
        }
    }
    found
}

/// Returns true when an ancestor of `pid` is a flow-run process of another Prefect stack:
/// the first ancestor whose environment sets `PREFECT_API_URL` sets a different one. A process
/// with no such ancestor, such as one that escaped to init, counts as the test stack's.
fn started_by_other_stack(pid: &str, own_api_url: &str) -> bool {
    let mut current = pid.to_owned();
    for _ in 0..64 {
        let environment = std::fs::read(format!("/proc/{current}/environ")).unwrap_or_default();
        let api_url =
            environment.split(|byte| *byte == 0).find(|variable| variable.starts_with(b"PREFECT_API_URL="));
        if let Some(api_url) = api_url {
            return api_url != own_api_url.as_bytes();
        }
        let status = std::fs::read_to_string(format!("/proc/{current}/status")).unwrap_or_default();
        let parent = status.lines().find_map(|line| line.strip_prefix("PPid:")).map(str::trim);
        match parent {
            Some(parent) if parent != "0" && parent != "1" => current = parent.to_owned(),
            _ => return false,
        }
    }
    false
}

/// Waits up to 10 s for every job process to end, then asserts none is left.
pub async fn assert_no_job_processes_left() {
    let mut left = job_processes();
    for _ in 0..50 {
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = job_processes();
    }
    panic!("job processes left after the job returned: {left:?}");
}
