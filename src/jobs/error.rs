//! Errors that end a job before it has a result.

use uuid::Uuid;

use crate::prefect::PrefectError;

/// A job that could not be submitted or whose result could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// Prefect gave no response, even after retries.
    #[error(
        "the Prefect API is unreachable: {source}. Start it (deploy/local/stack.sh up) or point \
         PREFECT_API_URL at a running server"
    )]
    PrefectUnreachable {
        #[source]
        source: PrefectError,
    },
    /// Prefect kept responding that it is overloaded (429, 502, 503, 504) for the whole retry
    /// budget.
    #[error("the Prefect API stayed overloaded for a minute of retries: {source}. Try again later")]
    PrefectOverloaded {
        #[source]
        source: PrefectError,
    },
    /// The configured deployment does not exist. Nothing was submitted.
    #[error(
        "deployment {name:?} not found on the Prefect API at {api_url}, so the job was not \
         submitted. Register it with flows/deploy.py (deploy/local/stack.sh up does this) or set \
         K3S_JOB_RUNNER_DEPLOYMENT to an existing flow-name/deployment-name"
    )]
    DeploymentNotFound { name: String, api_url: String },
    /// `PREFECT_API_URL` returns HTTP 404 for a Prefect route, so it does not lead to a
    /// Prefect API. Nothing was submitted.
    #[error(
        "PREFECT_API_URL={api_url} does not lead to a Prefect API: {source}. Set it to the \
         server's API base, ending in /api, for example http://127.0.0.1:4200/api"
    )]
    NotPrefectApi {
        api_url: String,
        #[source]
        source: PrefectError,
    },
    /// Creating the flow run failed for a reason other than availability.
    #[error("submitting the flow run failed: {source}")]
    SubmitFailed {
        #[source]
        source: PrefectError,
    },
    /// The run reached a terminal state but its state or result could not be read.
    #[error("flow run {flow_run_id} finished but its result could not be read: {source}")]
    ResultUnreadable {
        flow_run_id: Uuid,
        #[source]
        source: PrefectError,
    },
    /// The caller withdrew the request. The flow run was asked to cancel.
    #[error("the request was cancelled by the caller; flow run {flow_run_id} was asked to cancel")]
    Cancelled { flow_run_id: Uuid },
    /// The service is stopping, so it stopped waiting and asked the run to cancel.
    #[error("the service is shutting down; flow run {flow_run_id} was asked to cancel. Send the job again")]
    ShuttingDown { flow_run_id: Uuid },
}

impl JobError {
    /// Returns the flow run the error is about, when one was created.
    pub fn flow_run_id(&self) -> Option<Uuid> {
        match self {
            Self::ResultUnreadable { flow_run_id, .. }
            | Self::Cancelled { flow_run_id }
            | Self::ShuttingDown { flow_run_id } => Some(*flow_run_id),
            _ => None,
        }
    }

    pub(crate) fn from_lookup(error: PrefectError, api_url: &str) -> Self {
        match error {
            PrefectError::DeploymentNotFound { name, api_url } => Self::DeploymentNotFound { name, api_url },
            error @ PrefectError::Status { status: 404, .. } => {
                Self::NotPrefectApi { api_url: api_url.to_owned(), source: error }
            }
            error => Self::from_submit(error),
        }
    }

    pub(crate) fn from_submit(error: PrefectError) -> Self {
        if error.is_unreachable() {
            Self::PrefectUnreachable { source: error }
        } else if error.is_transient() {
            Self::PrefectOverloaded { source: error }
        } else {
            Self::SubmitFailed { source: error }
        }
    }
}
