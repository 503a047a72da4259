//! HTTP client for the parts of the Prefect REST API this service uses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use dashmap::DashMap;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::debug;
use uuid::Uuid;

use super::error::PrefectError;
use super::types::{Deployment, FlowRun, RunOutput, RESULT_ARTIFACT_KEY};
use crate::backoff::Backoff;
use crate::config::{Config, PrefectAuth};

/// Maximum `limit` that `POST /flow_runs/filter` accepts.
const FILTER_PAGE_SIZE: usize = 200;

/// Retry policy for transient failures: no response at all, or an overloaded server
/// (429, 502, 503, 504).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included, while connections to the API are refused.
    pub max_attempts: u32,
    /// Time spent retrying while the API is overloaded: it resets connections, times out or
    /// responds 429, 502, 503 or 504. With SQLite, Prefect
    /// returns 503 ("database is locked") for concurrent writes for as long as a burst lasts.
    pub overload_budget: Duration,
    /// First delay; delays double, with jitter, up to `max_delay`.
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Eight attempts over about four to seven seconds when the API is unreachable, so that is
    /// reported within seconds, and up to a minute while a live server sheds load.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            overload_budget: Duration::from_secs(60),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// A refused connection means no server listens, so it gets `max_attempts` and is
    /// reported within seconds. A live server that resets connections, times out or answers
    /// "overloaded" is usually shedding load, so it gets the whole overload budget.
    fn allows_retry(&self, error: &PrefectError, attempt: u32, elapsed: Duration) -> bool {
        if error.is_refused() {
            attempt < self.max_attempts
        } else {
            error.is_transient() && elapsed < self.overload_budget
        }
    }
}

/// A flow run to create from a deployment.
#[derive(Debug, Clone)]
pub struct NewFlowRun {
    pub parameters: Value,
    pub tags: Vec<String>,
    /// Prefect returns the existing run instead of creating a second one when a key is reused,
    /// which makes retrying a creation safe.
    pub idempotency_key: String,
}

/// Prefect REST client with retries and a cache of deployment ids.
#[derive(Debug)]
pub struct PrefectClient {
    http: reqwest::Client,
    api_url: String,
    request_timeout: Duration,
    retry: RetryPolicy,
    deployment_ids: DashMap<String, Uuid>,
    /// Held while a deployment is looked up, so concurrent jobs wait for one lookup.
    lookup_lock: tokio::sync::Mutex<()>,
    /// Bounds the writes in flight, because SQLite serializes writers and a burst of
    /// concurrent creations mostly earns 503s.
    write_permits: Semaphore,
    /// HTTP requests sent since start-up, retries included.
    requests_sent: AtomicU64,
    /// Of those, the retries of a failed request.
    retries_sent: AtomicU64,
}

impl PrefectClient {
    /// Builds a client for `config.api_url` with the configured credentials.
    ///
    /// # Errors
    /// Returns [`PrefectError::InvalidSettings`] when the credentials cannot form a header.
    pub fn new(config: &Config, retry: RetryPolicy) -> Result<Self, PrefectError> {
        let mut headers = HeaderMap::new();
        if let Some(auth) = &config.auth {
            headers.insert(AUTHORIZATION, authorization_header(auth)?);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|error| PrefectError::InvalidSettings(error.to_string()))?;
        Ok(Self {
            http,
            api_url: config.api_url.clone(),
            request_timeout: config.request_timeout,
            retry,
            deployment_ids: DashMap::new(),
            lookup_lock: tokio::sync::Mutex::new(()),
            write_permits: Semaphore::new(config.max_concurrent_writes),
            requests_sent: AtomicU64::new(0),
            retries_sent: AtomicU64::new(0),
        })
    }

    /// Number of HTTP requests sent since start-up, each retry counted, failed ones included.
    pub fn requests_sent(&self) -> u64 {
        self.requests_sent.load(Ordering::Relaxed)
    }

    /// Number of those requests that retried a failed one.
    pub fn retries_sent(&self) -> u64 {
        self.retries_sent.load(Ordering::Relaxed)
    }

    /// Returns the REST base URL, ending in `/api`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// Checks `GET /health`.
    ///
    /// # Errors
    /// Returns the last failure once the retry policy is spent.
    pub async fn health(&self) -> Result<(), PrefectError> {
        let _: Value = self.request(Method::GET, "/health", None).await?;
        Ok(())
    }

    /// Looks up a deployment by `flow/deployment` name, caching the id for later calls.
    ///
    /// # Errors
    /// Returns [`PrefectError::DeploymentNotFound`] on 404, otherwise the request's failure.
    pub async fn deployment_id(&self, name: &str) -> Result<Uuid, PrefectError> {
        if let Some(id) = self.deployment_ids.get(name) {
            return Ok(*id);
        }
        // One lookup at a time, so a burst of first jobs sends one request, not one each.
        let _lookup = self.lookup_lock.lock().await;
        if let Some(id) = self.deployment_ids.get(name) {
            return Ok(*id);
        }
        let path = format!("/deployments/name/{name}");
        let deployment: Deployment = match self.request(Method::GET, &path, None).await {
            // Prefect names the missing deployment. Any other 404 means the URL's path does
            // not lead to a Prefect API, and that error is passed on as it is.
            Err(PrefectError::Status { status: 404, ref body, .. })
                if body.to_ascii_lowercase().contains("deployment not found") =>
            {
                return Err(PrefectError::DeploymentNotFound {
                    name: name.to_owned(),
                    api_url: self.api_url.clone(),
                })
            }
            other => other?,
        };
        self.deployment_ids.insert(name.to_owned(), deployment.id);
        Ok(deployment.id)
    }

    /// Forgets a cached deployment id, after the deployment was deleted and registered again.
    pub fn forget_deployment(&self, name: &str) {
        self.deployment_ids.remove(name);
    }

    /// Creates a flow run of a deployment. A retried call reuses the idempotency key, so it
    /// returns the run the first attempt created instead of starting a second one.
    ///
    /// # Errors
    /// Returns the last failure once the retry policy is spent.
    pub async fn create_flow_run(
        &self,
        deployment_id: Uuid,
        run: &NewFlowRun,
    ) -> Result<FlowRun, PrefectError> {
        let body = json!({
            "parameters": run.parameters,
            "tags": run.tags,
            "idempotency_key": run.idempotency_key,
        });
        let path = format!("/deployments/{deployment_id}/create_flow_run");
        let _permit = self.write_permits.acquire().await.expect("the write semaphore is never closed");
        self.request(Method::POST, &path, Some(&body)).await
    }

    /// Reads one flow run.
    ///
    /// # Errors
    /// Returns the last failure once the retry policy is spent.
    pub async fn read_flow_run(&self, flow_run_id: Uuid) -> Result<FlowRun, PrefectError> {
        self.request(Method::GET, &format!("/flow_runs/{flow_run_id}"), None).await
    }

    /// Reads many flow runs with one `POST /flow_runs/filter` per 200 ids.
    ///
    /// # Errors
    /// Returns the first page's failure once the retry policy is spent.
    pub async fn read_flow_runs(&self, flow_run_ids: &[Uuid]) -> Result<Vec<FlowRun>, PrefectError> {
        let mut runs = Vec::with_capacity(flow_run_ids.len());
        for page in flow_run_ids.chunks(FILTER_PAGE_SIZE) {
            let body = json!({"flow_runs": {"id": {"any_": page}}, "limit": FILTER_PAGE_SIZE});
            let mut found: Vec<FlowRun> =
                self.request(Method::POST, "/flow_runs/filter", Some(&body)).await?;
            runs.append(&mut found);
        }
        Ok(runs)
    }

    /// Reads the `python-runner` result artifact of a flow run, or `None` when the run has none.
    ///
    /// # Errors
    /// Returns [`PrefectError::InvalidResponse`] when the artifact's data is not a result of
    /// format version 1, otherwise the request's failure.
    pub async fn read_run_output(&self, flow_run_id: Uuid) -> Result<Option<RunOutput>, PrefectError> {
        let body = json!({
            "artifacts": {
                "flow_run_id": {"any_": [flow_run_id]},
                "key": {"any_": [RESULT_ARTIFACT_KEY]},
            },
            "sort": "CREATED_DESC",
            "limit": 1,
        });
        let path = "/artifacts/filter";
        let artifacts: Vec<ArtifactData> = self.request(Method::POST, path, Some(&body)).await?;
        let Some(data) = artifacts.into_iter().next().and_then(|artifact| artifact.data) else {
            return Ok(None);
        };
        parse_run_output(data).map(Some).map_err(|source| PrefectError::InvalidResponse {
            method: "POST".to_owned(),
            path: path.to_owned(),
            source,
        })
    }

    /// Asks Prefect to cancel a flow run: the worker then kills its process or deletes its Job.
    /// A run that has not started goes straight to `CANCELLED`; a finished run is left alone.
    ///
    /// # Errors
    /// Returns the last failure once the retry policy is spent.
    pub async fn cancel_flow_run(&self, flow_run_id: Uuid, message: &str) -> Result<(), PrefectError> {
        let body = json!({"state": {"type": "CANCELLING", "message": message}});
        let path = format!("/flow_runs/{flow_run_id}/set_state");
        let _permit = self.write_permits.acquire().await.expect("the write semaphore is never closed");
        let _: Value = self.request(Method::POST, &path, Some(&body)).await?;
        Ok(())
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, PrefectError> {
        let mut backoff = Backoff::new(self.retry.initial_delay, self.retry.max_delay);
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match self.send_once(&method, path, body).await {
                Err(error) if self.retry.allows_retry(&error, attempt, started.elapsed()) => {
                    let delay = backoff.next_delay();
                    debug!(%method, path, attempt, ?delay, %error, "retrying Prefect API request");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                    self.retries_sent.fetch_add(1, Ordering::Relaxed);
                }
                result => return result,
            }
        }
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, PrefectError> {
        let url = format!("{}{path}", self.api_url);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |error| PrefectError::unreachable(&self.api_url, error, self.request_timeout);
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(PrefectError::Status {
                method: method.to_string(),
                path: path.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| PrefectError::InvalidResponse {
            method: method.to_string(),
            path: path.to_owned(),
            source,
        })
    }
}

#[derive(Deserialize)]
struct ArtifactData {
    #[serde(default)]
    data: Option<Value>,
}

/// Parses artifact data, which Prefect returns as the JSON string the flow stored, or as an
/// object when the flow stored one.
fn parse_run_output(data: Value) -> Result<RunOutput, serde_json::Error> {
    match data {
        Value::String(text) => serde_json::from_str(&text),
        other => serde_json::from_value(other),
    }
}

fn authorization_header(auth: &PrefectAuth) -> Result<HeaderValue, PrefectError> {
    let value = match auth {
        PrefectAuth::Basic(user_and_password) => {
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_and_password))
        }
        PrefectAuth::ApiKey(key) => format!("Bearer {key}"),
    };
    let mut header = HeaderValue::from_str(&value).map_err(|_| {
        PrefectError::InvalidSettings(
            "PREFECT_API_AUTH_STRING or PREFECT_API_KEY contains characters that are invalid in an HTTP header"
                .to_owned(),
        )
    })?;
    header.set_sensitive(true);
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_output_parses_from_json_string() {
        let data = Value::String(
            r#"{"version":1,"exit_code":0,"stdout":"45\n","stderr":"","stdout_truncated":false,
               "stderr_truncated":false,"duration_ms":31,"timed_out":false}"#
                .to_owned(),
        );
        let output = parse_run_output(data).expect("valid output");
        assert_eq!(output.stdout, "45\n");
        assert_eq!(output.exit_code, 0);
    }

    #[test]
    fn run_output_parses_from_object() {
        let data = json!({"version":1,"exit_code":3,"stdout":"","stderr":"x","stdout_truncated":false,
                          "stderr_truncated":true,"duration_ms":5,"timed_out":false});
        let output = parse_run_output(data).expect("valid output");
        assert_eq!(output.exit_code, 3);
        assert!(output.truncated());
    }

    #[test]
    fn run_output_missing_field_is_an_error() {
        assert!(parse_run_output(json!({"version": 1})).is_err());
    }

    fn status_error(status: u16) -> PrefectError {
        PrefectError::Status { method: "POST".to_owned(), path: "/x".to_owned(), status, body: String::new() }
    }

    #[test]
    fn overload_is_retried_until_budget_is_spent() {
        let policy = RetryPolicy::default();
        let busy = status_error(503);
        assert!(policy.allows_retry(&busy, 50, Duration::from_secs(59)));
        assert!(!policy.allows_retry(&busy, 2, Duration::from_secs(60)));
    }

    #[test]
    fn client_errors_are_not_retried() {
        let policy = RetryPolicy::default();
        assert!(!policy.allows_retry(&status_error(422), 1, Duration::ZERO));
        assert!(!policy.allows_retry(&status_error(404), 1, Duration::ZERO));
    }

    #[tokio::test]
    async fn refused_connection_is_retried_max_attempts() {
        let policy = RetryPolicy::default();
        let source = reqwest::Client::new().get("http://127.0.0.1:9/").send().await.unwrap_err();
        let refused = PrefectError::unreachable("http://127.0.0.1:9/api", source, Duration::from_secs(1));
        assert!(refused.is_refused());
        assert!(policy.allows_retry(&refused, 7, Duration::ZERO));
        assert!(!policy.allows_retry(&refused, 8, Duration::ZERO));
    }

    #[tokio::test]
    async fn dropped_connection_gets_overload_budget() {
        // A listener that accepts and closes at once, as an overloaded server can.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let source = reqwest::Client::new().get(format!("http://{address}/")).send().await.unwrap_err();
        let dropped =
            PrefectError::unreachable(&format!("http://{address}/api"), source, Duration::from_secs(1));
        let policy = RetryPolicy::default();
        assert!(!dropped.is_refused());
        assert!(policy.allows_retry(&dropped, 20, Duration::from_secs(59)));
        assert!(!policy.allows_retry(&dropped, 20, Duration::from_secs(60)));
    }

    #[tokio::test]
    async fn every_attempt_is_counted_as_a_request() {
        // A port that was just bound and released refuses connections.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let config = Config { api_url: format!("http://{address}/api"), ..Config::default() };
        let retry = RetryPolicy {
            max_attempts: 3,
            overload_budget: Duration::ZERO,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        };
        let client = PrefectClient::new(&config, retry).unwrap();

        assert!(client.health().await.is_err());

        assert_eq!(client.requests_sent(), 3);
        assert_eq!(client.retries_sent(), 2);
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_request() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;

        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        // A server that returns the same deployment for every request after 50 ms, so the
        // lookups overlap, and counts the requests it received.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    let _ = stream.read(&mut buffer).await;
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let body = format!(r#"{{"id":"{}","name":"python-runner"}}"#, Uuid::nil());
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        let config = Config { api_url: format!("http://{address}/api"), ..Config::default() };
        let client = PrefectClient::new(&config, RetryPolicy::default()).unwrap();

        let lookups = (0..5).map(|_| client.deployment_id("python-runner/python-runner"));
        let ids = futures::future::join_all(lookups).await;

        for id in ids {
            assert_eq!(id.unwrap(), Uuid::nil());
        }
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        assert_eq!(client.requests_sent(), 1);
    }

    #[test]
    fn basic_auth_header_is_base64_and_sensitive() {
        let header = authorization_header(&PrefectAuth::Basic("admin:pw".to_owned())).unwrap();
        assert_eq!(header.to_str().unwrap(), "Basic YWRtaW46cHc=");
        assert!(header.is_sensitive());
    }

    #[test]
    fn api_key_header_is_bearer() {
        let header = authorization_header(&PrefectAuth::ApiKey("pnu_x".to_owned())).unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer pnu_x");
    }
}
