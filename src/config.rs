//! Service settings, read from the environment in one place.

use std::time::Duration;

/// Error raised when a setting in the environment cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {name}={value:?}: {reason}")]
    Invalid { name: &'static str, value: String, reason: String },
}

/// Credentials sent to the Prefect API, on REST calls and in the websocket's auth message.
#[derive(Clone, PartialEq, Eq)]
pub enum PrefectAuth {
    /// `PREFECT_API_AUTH_STRING` of a self-hosted server, `user:password`, sent as HTTP Basic.
    Basic(String),
    /// `PREFECT_API_KEY` of Prefect Cloud, sent as a bearer token.
    ApiKey(String),
}

impl PrefectAuth {
    /// Token for the events websocket's `auth` message.
    pub fn websocket_token(&self) -> &str {
        match self {
            Self::Basic(value) | Self::ApiKey(value) => value,
        }
    }
}

impl std::fmt::Debug for PrefectAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Basic(_) => f.write_str("Basic(<redacted>)"),
            Self::ApiKey(_) => f.write_str("ApiKey(<redacted>)"),
        }
    }
}

/// Limits a job request must respect before anything is submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLimits {
    /// Maximum code length in characters (Unicode scalar values).
    pub max_code_chars: usize,
    /// Smallest accepted `timeout_seconds`.
    pub min_timeout_seconds: u64,
    /// Largest accepted `timeout_seconds`.
    pub max_timeout_seconds: u64,
    /// `timeout_seconds` used when a request has none.
    pub default_timeout_seconds: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_code_chars: 50_000,
            min_timeout_seconds: 10,
            max_timeout_seconds: 600,
            default_timeout_seconds: 120,
        }
    }
}

/// Source of the service's knowledge that a flow run finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitMode {
    /// One events websocket for the whole service, with bulk REST polling while it is down.
    Events,
    /// No websocket: every waiting job reads its own flow run over REST at a fixed interval,
    /// as a polling runner does.
    Poll,
}

impl WaitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Poll => "poll",
        }
    }
}

impl std::str::FromStr for WaitMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_lowercase().as_str() {
            "events" => Ok(Self::Events),
            "poll" => Ok(Self::Poll),
            _ => Err("expected events or poll".to_owned()),
        }
    }
}

/// Every setting of the service.
#[derive(Debug, Clone)]
pub struct Config {
    /// Prefect REST base URL, ending in `/api` (`PREFECT_API_URL`).
    pub api_url: String,
    /// Optional credentials (`PREFECT_API_AUTH_STRING`, else `PREFECT_API_KEY`).
    pub auth: Option<PrefectAuth>,
    /// Deployment that runs the code, as `flow-name/deployment-name`
    /// (`K3S_JOB_RUNNER_DEPLOYMENT`, default `python-runner/python-runner`).
    pub deployment: String,
    /// Tag put on every flow run this service creates; the events filter selects on it
    /// (`K3S_JOB_RUNNER_TAG`, default `k3s-job-runner`).
    pub tag: String,
    /// Request limits (`K3S_JOB_RUNNER_MAX_CODE_CHARS`, `K3S_JOB_RUNNER_MIN_TIMEOUT_SECONDS`,
    /// `K3S_JOB_RUNNER_MAX_TIMEOUT_SECONDS`, `K3S_JOB_RUNNER_DEFAULT_TIMEOUT_SECONDS`).
    pub limits: JobLimits,
    /// Time a flow run may take to start before the service cancels it. It covers waiting
    /// behind other runs in a pool with a concurrency limit, worker pick-up and process start
    /// (about 3 s on an idle local stack), and pod scheduling and image pull on Kubernetes
    /// (`K3S_JOB_RUNNER_STARTUP_ALLOWANCE_SECONDS`, default 300).
    pub startup_allowance: Duration,
    /// Timeout of one REST request (`K3S_JOB_RUNNER_REQUEST_TIMEOUT_SECONDS`, default 30).
    pub request_timeout: Duration,
    /// Wait mode that decides how completions are learned (`K3S_JOB_RUNNER_WAIT_MODE`, `events`
    /// or `poll`, default `events`).
    pub wait_mode: WaitMode,
    /// Interval at which each waiting job reads its flow run in `poll` mode
    /// (`K3S_JOB_RUNNER_POLL_INTERVAL_MS`, default 2000). Unused in `events` mode.
    pub poll_interval: Duration,
    /// Interval of the bulk REST poll of waiting runs while the websocket is down
    /// (`K3S_JOB_RUNNER_FALLBACK_POLL_MS`, default 1000).
    pub fallback_poll_interval: Duration,
    /// Interval of the bulk REST poll while the websocket is up, so a socket that stays open
    /// but delivers nothing cannot strand a job (`K3S_JOB_RUNNER_SAFETY_POLL_SECONDS`, default 30).
    pub safety_poll_interval: Duration,
    /// First websocket reconnect delay; delays double up to `reconnect_max`
    /// (`K3S_JOB_RUNNER_RECONNECT_INITIAL_MS`, default 250).
    pub reconnect_initial: Duration,
    /// Maximum websocket reconnect delay (`K3S_JOB_RUNNER_RECONNECT_MAX_SECONDS`, default 30).
    pub reconnect_max: Duration,
    /// How long a job waits for the first subscription before it submits anyway and relies on
    /// polling (`K3S_JOB_RUNNER_SUBSCRIBE_WAIT_SECONDS`, default 5).
    pub subscribe_wait: Duration,
    /// Flow-run creations and cancellations sent at once
    /// (`K3S_JOB_RUNNER_MAX_CONCURRENT_WRITES`, default 4). SQLite serializes writers, so more
    /// concurrent writes only earn more 503 responses; a Postgres-backed server can take more.
    pub max_concurrent_writes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_url: "http://127.0.0.1:4200/api".to_owned(),
            auth: None,
            deployment: "python-runner/python-runner".to_owned(),
            tag: "k3s-job-runner".to_owned(),
            limits: JobLimits::default(),
            startup_allowance: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            wait_mode: WaitMode::Events,
            poll_interval: Duration::from_millis(2000),
            fallback_poll_interval: Duration::from_millis(1000),
            safety_poll_interval: Duration::from_secs(30),
            reconnect_initial: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            subscribe_wait: Duration::from_secs(5),
            max_concurrent_writes: 4,
        }
    }
}

impl Config {
    /// Reads every setting from the process environment.
    ///
    /// # Errors
    /// Returns [`ConfigError::Invalid`] naming the variable when a value cannot be parsed or
    /// breaks a rule (for example a minimum timeout above the maximum).
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads every setting through `lookup`, so tests need not touch the process environment.
    ///
    /// # Errors
    /// As [`Config::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let env = Env { lookup: &lookup };
        let limits = JobLimits {
            max_code_chars: env.number("K3S_JOB_RUNNER_MAX_CODE_CHARS", defaults.limits.max_code_chars)?,
            min_timeout_seconds: env
                .number("K3S_JOB_RUNNER_MIN_TIMEOUT_SECONDS", defaults.limits.min_timeout_seconds)?,
            max_timeout_seconds: env
                .number("K3S_JOB_RUNNER_MAX_TIMEOUT_SECONDS", defaults.limits.max_timeout_seconds)?,
            default_timeout_seconds: env
                .number("K3S_JOB_RUNNER_DEFAULT_TIMEOUT_SECONDS", defaults.limits.default_timeout_seconds)?,
        };
        check_limits(&limits)?;
        let deployment = env.text("K3S_JOB_RUNNER_DEPLOYMENT").unwrap_or(defaults.deployment);
        check_deployment_name(&deployment)?;

        Ok(Self {
            api_url: env
                .text("PREFECT_API_URL")
                .map(|url| url.trim_end_matches('/').to_owned())
                .unwrap_or(defaults.api_url),
            auth: read_auth(&env),
            deployment,
            tag: env.text("K3S_JOB_RUNNER_TAG").unwrap_or(defaults.tag),
            limits,
            startup_allowance: env
                .seconds("K3S_JOB_RUNNER_STARTUP_ALLOWANCE_SECONDS", defaults.startup_allowance)?,
            request_timeout: env
                .seconds("K3S_JOB_RUNNER_REQUEST_TIMEOUT_SECONDS", defaults.request_timeout)?,
            wait_mode: env.parsed("K3S_JOB_RUNNER_WAIT_MODE", defaults.wait_mode)?,
            poll_interval: env.millis("K3S_JOB_RUNNER_POLL_INTERVAL_MS", defaults.poll_interval)?,
            fallback_poll_interval: env
                .millis("K3S_JOB_RUNNER_FALLBACK_POLL_MS", defaults.fallback_poll_interval)?,
            safety_poll_interval: env
                .seconds("K3S_JOB_RUNNER_SAFETY_POLL_SECONDS", defaults.safety_poll_interval)?,
            reconnect_initial: env
                .millis("K3S_JOB_RUNNER_RECONNECT_INITIAL_MS", defaults.reconnect_initial)?,
            reconnect_max: env.seconds("K3S_JOB_RUNNER_RECONNECT_MAX_SECONDS", defaults.reconnect_max)?,
            subscribe_wait: env.seconds("K3S_JOB_RUNNER_SUBSCRIBE_WAIT_SECONDS", defaults.subscribe_wait)?,
            max_concurrent_writes: env
                .positive("K3S_JOB_RUNNER_MAX_CONCURRENT_WRITES", defaults.max_concurrent_writes)?,
        })
    }

    /// URL of the events websocket, derived from [`Config::api_url`].
    pub fn events_url(&self) -> String {
        let url = if let Some(rest) = self.api_url.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.api_url.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            self.api_url.clone()
        };
        format!("{url}/events/out")
    }
}

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    fn text(&self, name: &str) -> Option<String> {
        (self.lookup)(name).map(|value| value.trim().to_owned()).filter(|value| !value.is_empty())
    }

    fn number<T: std::str::FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let Some(value) = self.text(name) else {
            return Ok(default);
        };
        value.parse().map_err(|error: T::Err| ConfigError::Invalid {
            name,
            value,
            reason: format!("expected a whole number ({error})"),
        })
    }

    fn parsed<T: std::str::FromStr<Err = String>>(
        &self,
        name: &'static str,
        default: T,
    ) -> Result<T, ConfigError> {
        let Some(value) = self.text(name) else {
            return Ok(default);
        };
        value.parse().map_err(|reason| ConfigError::Invalid { name, value, reason })
    }

    fn seconds(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        let seconds = self.number(name, default.as_secs())?;
        positive(name, Duration::from_secs(seconds))
    }

    fn positive(&self, name: &'static str, default: usize) -> Result<usize, ConfigError> {
        let value = self.number(name, default)?;
        if value == 0 {
            return Err(ConfigError::Invalid {
                name,
                value: "0".to_owned(),
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(value)
    }

    fn millis(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        let millis = self.number(name, default.as_millis() as u64)?;
        positive(name, Duration::from_millis(millis))
    }
}

fn positive(name: &'static str, duration: Duration) -> Result<Duration, ConfigError> {
    if duration.is_zero() {
        return Err(ConfigError::Invalid {
            name,
            value: "0".to_owned(),
            reason: "must be greater than zero".to_owned(),
        });
    }
    Ok(duration)
}

fn read_auth(env: &Env<'_>) -> Option<PrefectAuth> {
    if let Some(auth_string) = env.text("PREFECT_API_AUTH_STRING") {
        return Some(PrefectAuth::Basic(auth_string));
    }
    env.text("PREFECT_API_KEY").map(PrefectAuth::ApiKey)
}

fn check_limits(limits: &JobLimits) -> Result<(), ConfigError> {
    let range = limits.min_timeout_seconds..=limits.max_timeout_seconds;
    if limits.min_timeout_seconds == 0 || range.is_empty() {
        return Err(ConfigError::Invalid {
            name: "K3S_JOB_RUNNER_MIN_TIMEOUT_SECONDS",
            value: limits.min_timeout_seconds.to_string(),
            reason: format!(
                "must be at least 1 and at most K3S_JOB_RUNNER_MAX_TIMEOUT_SECONDS ({})",
                limits.max_timeout_seconds
            ),
        });
    }
    if !range.contains(&limits.default_timeout_seconds) {
        return Err(ConfigError::Invalid {
            name: "K3S_JOB_RUNNER_DEFAULT_TIMEOUT_SECONDS",
            value: limits.default_timeout_seconds.to_string(),
            reason: format!(
                "must be within K3S_JOB_RUNNER_MIN_TIMEOUT_SECONDS-K3S_JOB_RUNNER_MAX_TIMEOUT_SECONDS \
                 ({}-{}); when the range is narrowed, set the default inside it too (its default is 120)",
                range.start(),
                range.end()
            ),
        });
    }
    Ok(())
}

fn check_deployment_name(deployment: &str) -> Result<(), ConfigError> {
    let valid = deployment
        .split_once('/')
        .is_some_and(|(flow, name)| !flow.is_empty() && !name.is_empty() && !name.contains('/'));
    if valid {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        name: "K3S_JOB_RUNNER_DEPLOYMENT",
        value: deployment.to_owned(),
        reason: "expected FLOW_NAME/DEPLOYMENT_NAME, for example python-runner/python-runner".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config_from(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> =
            pairs.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn empty_environment_gives_defaults() {
        let config = config_from(&[]).expect("defaults are valid");
        assert_eq!(config.api_url, "http://127.0.0.1:4200/api");
        assert_eq!(config.deployment, "python-runner/python-runner");
        assert_eq!(config.limits, JobLimits::default());
        assert_eq!(config.auth, None);
    }

    #[test]
    fn events_url_follows_api_scheme() {
        let plain = config_from(&[("PREFECT_API_URL", "http://prefect:4200/api/")]).unwrap();
        assert_eq!(plain.events_url(), "ws://prefect:4200/api/events/out");
        let tls = config_from(&[("PREFECT_API_URL", "https://example.test/api")]).unwrap();
        assert_eq!(tls.events_url(), "wss://example.test/api/events/out");
    }

    #[test]
    fn auth_string_wins_over_api_key() {
        let config =
            config_from(&[("PREFECT_API_AUTH_STRING", "admin:pw"), ("PREFECT_API_KEY", "key")]).unwrap();
        assert_eq!(config.auth, Some(PrefectAuth::Basic("admin:pw".to_owned())));
        let config = config_from(&[("PREFECT_API_KEY", "key")]).unwrap();
        assert_eq!(config.auth, Some(PrefectAuth::ApiKey("key".to_owned())));
    }

    #[test]
    fn auth_debug_output_hides_secret() {
        let printed = format!("{:?}", PrefectAuth::Basic("admin:secret".to_owned()));
        assert!(!printed.contains("secret"), "{printed}");
    }

    #[test]
    fn non_numeric_setting_is_rejected_by_name() {
        let error = config_from(&[("K3S_JOB_RUNNER_MAX_CODE_CHARS", "lots")]).unwrap_err();
        assert!(error.to_string().contains("K3S_JOB_RUNNER_MAX_CODE_CHARS"), "{error}");
    }

    #[test]
    fn default_timeout_outside_range_is_rejected() {
        let error = config_from(&[("K3S_JOB_RUNNER_DEFAULT_TIMEOUT_SECONDS", "5")]).unwrap_err();
        assert!(error.to_string().contains("10-600"), "{error}");
    }

    #[test]
    fn deployment_without_flow_name_is_rejected() {
        let error = config_from(&[("K3S_JOB_RUNNER_DEPLOYMENT", "python-runner")]).unwrap_err();
        assert!(error.to_string().contains("FLOW_NAME/DEPLOYMENT_NAME"), "{error}");
    }

    #[test]
    fn wait_mode_defaults_to_events() {
        let config = config_from(&[]).unwrap();
        assert_eq!(config.wait_mode, WaitMode::Events);
        assert_eq!(config.poll_interval, Duration::from_millis(2000));
    }

    #[test]
    fn wait_mode_poll_is_read_with_interval() {
        let config =
            config_from(&[("K3S_JOB_RUNNER_WAIT_MODE", "Poll"), ("K3S_JOB_RUNNER_POLL_INTERVAL_MS", "500")])
                .unwrap();
        assert_eq!(config.wait_mode, WaitMode::Poll);
        assert_eq!(config.poll_interval, Duration::from_millis(500));
    }

    #[test]
    fn unknown_wait_mode_is_rejected_with_choices() {
        let error = config_from(&[("K3S_JOB_RUNNER_WAIT_MODE", "websocket")]).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("K3S_JOB_RUNNER_WAIT_MODE"), "{message}");
        assert!(message.contains("\"websocket\""), "{message}");
        assert!(message.contains("expected events or poll"), "{message}");
    }

    #[test]
    fn zero_interval_is_rejected() {
        let error = config_from(&[("K3S_JOB_RUNNER_FALLBACK_POLL_MS", "0")]).unwrap_err();
        assert!(error.to_string().contains("greater than zero"), "{error}");
    }
}
