//! Prefect 3 REST API: the types this service reads and a client with retries.
//! Nothing here waits for a flow run to finish; that is the job of [`crate::events`].

mod client;
mod error;
mod types;

pub use client::{NewFlowRun, PrefectClient, RetryPolicy};
pub use error::PrefectError;
pub use types::{Deployment, FlowRun, RunOutput, State, StateType, RESULT_ARTIFACT_KEY};
