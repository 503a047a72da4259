//! One job from request to result: validate, submit as a flow run, wait for its terminal
//! state, read the result artifact.

mod error;
mod outcome;
mod progress;
mod request;
mod runner;
mod status;

pub use error::JobError;
pub use outcome::{JobOutcome, JobStatus, LearnedEnd};
pub use progress::JobProgress;
pub use request::{InvalidRequest, JobRequest};
pub use runner::JobRunner;
pub use status::{peak_memory_kib, resident_memory_kib, RunnerStatus};
