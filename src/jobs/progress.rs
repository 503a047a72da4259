//! The flow run a job submitted, shared with the code that reports the job's progress.

use std::sync::Mutex;

use uuid::Uuid;

/// Flow run of a job, set by the runner once the run exists and read by progress reports.
#[derive(Debug, Default)]
pub struct JobProgress {
    submitted: Mutex<Option<(Uuid, String)>>,
}

impl JobProgress {
    pub(crate) fn set_submitted(&self, flow_run_id: Uuid, flow_run_name: &str) {
        *self.lock() = Some((flow_run_id, flow_run_name.to_owned()));
    }

    /// Returns the flow run's id and name, once it was created.
    pub fn submitted(&self) -> Option<(Uuid, String)> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Uuid, String)>> {
        // Only whole values are stored, so a poisoned lock still holds a consistent one.
        self.submitted.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
