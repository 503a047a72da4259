//! Errors of the Prefect REST client.

use std::time::Duration;

/// A failed Prefect API call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrefectError {
    /// No HTTP response arrived: connection refused, DNS failure, reset or request timeout.
    #[error("cannot reach the Prefect API at {url}: {reason}")]
    Unreachable {
        url: String,
        reason: String,
        /// True when the connection was refused, so nothing listens at the address.
        refused: bool,
        #[source]
        source: reqwest::Error,
    },
    /// The API returned a status other than 2xx.
    #[error("Prefect API returned HTTP {status} for {method} {path}: {body}")]
    Status { method: String, path: String, status: u16, body: String },
    /// `GET /deployments/name/{flow}/{deployment}` returned 404.
    #[error("deployment {name:?} not found on the Prefect API at {api_url}")]
    DeploymentNotFound { name: String, api_url: String },
    /// A 2xx response whose body is not what the API documents.
    #[error("invalid response to {method} {path}: {source}")]
    InvalidResponse {
        method: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// The HTTP client could not be built from the settings.
    #[error("invalid Prefect client settings: {0}")]
    InvalidSettings(String),
}

impl PrefectError {
    /// Returns true for failures worth retrying: no response at all, or a status that
    /// Prefect uses for overload. With SQLite, Prefect answers concurrent writes with 503
    /// ("database is locked").
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// Returns true when the API could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }

    /// Returns true when the connection was refused: no server listens at the address.
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Unreachable { refused: true, .. })
    }

    pub(crate) fn unreachable(url: &str, source: reqwest::Error, timeout: Duration) -> Self {
        let reason = if source.is_timeout() {
            format!("no response within {} s", timeout.as_secs())
        } else {
            innermost_message(&source)
        };
        let refused = is_connection_refused(&source);
        Self::Unreachable { url: url.to_owned(), reason, refused, source }
    }
}

fn is_connection_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io_error) = error.downcast_ref::<std::io::Error>() {
            if io_error.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        current = error.source();
    }
    false
}

/// The deepest cause's message, which for a refused connection is the useful one
/// ("Connection refused (os error 111)") rather than reqwest's generic summary.
fn innermost_message(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}
