//! Runs one job through Prefect and waits for it on the shared events subscription.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};
use uuid::Uuid;

use super::status::{peak_memory_kib, RunnerStatus};
use super::{JobError, JobOutcome, JobProgress, JobRequest, JobStatus, LearnedEnd};
use crate::backoff::Backoff;
use crate::config::{Config, WaitMode};
use crate::events::{Mode, Subscription, SubscriptionHandle};
use crate::prefect::{
    FlowRun, NewFlowRun, PrefectClient, PrefectError, RetryPolicy, RunOutput, State, StateType,
};
use crate::waiters::{CompletionSource, Waiter, WaiterRegistry};

/// Reads of a run's state after its terminal event, until REST shows the terminal state.
/// Prefect publishes the event inside the transaction that sets the state, so a read right
/// after the event can still return the previous state.
const CONFIRM_ATTEMPTS: u32 = 12;
/// Reads of the result artifact of a completed run before reporting it missing.
const ARTIFACT_ATTEMPTS: u32 = 5;
/// Time a started run has beyond its timeout before the service cancels it. The flow kills
/// the code at the timeout itself, then needs a kill grace period and a few REST calls to
/// store the result.
const RUN_GRACE: Duration = Duration::from_secs(30);
/// Maximum wait at shutdown for active jobs and for the cancellations of dropped jobs' runs.
const ORPHAN_CANCEL_WAIT: Duration = Duration::from_secs(10);
/// Delay before the next deadline check when the run could not be read.
const DEADLINE_RECHECK: Duration = Duration::from_secs(10);

/// The service's job machinery: REST client, waiter registry and the one subscription task.
pub struct JobRunner {
    config: Config,
    client: Arc<PrefectClient>,
    registry: Arc<WaiterRegistry>,
    /// The events subscription; `None` in `poll` mode, where each job polls its own run.
    subscription: Option<SubscriptionHandle>,
    /// Cancellations of runs whose job future was dropped, awaited at shutdown.
    orphan_cancels: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Jobs between submission and their ending, so shutdown can wait for their cancellations.
    active_jobs: AtomicUsize,
}

/// Counts a job as active until dropped.
struct ActiveJob<'a>(&'a AtomicUsize);

impl<'a> ActiveJob<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for ActiveJob<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Cancels its flow run if the job future is dropped before the job reached an ending, as
/// when the MCP transport closes and the server drops in-flight calls.
struct OrphanGuard<'a> {
    runner: &'a JobRunner,
    flow_run_id: Uuid,
    armed: bool,
}

impl OrphanGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for OrphanGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let client = Arc::clone(&self.runner.client);
        let flow_run_id = self.flow_run_id;
        warn!(%flow_run_id, "job dropped while waiting; cancelling its flow run");
        let task = runtime.spawn(async move {
            if let Err(error) = client.cancel_flow_run(flow_run_id, "the MCP caller went away").await {
                warn!(%flow_run_id, %error, "cancelling the flow run of a dropped job failed");
            }
        });
        self.runner.orphan_cancels.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(task);
    }
}

/// Ending of a wait for a terminal state.
enum WaitEnd {
    Finished {
        state: State,
        source: CompletionSource,
    },
    /// The run did not start in time, or ran past its timeout; the reason says which.
    DeadlinePassed {
        reason: String,
    },
    CallerCancelled,
    RegistryClosed,
}

/// Result of checking a run whose deadline came.
enum DeadlineCheck {
    Finished(State),
    Extended(Instant),
    Expired(String),
}

impl JobRunner {
    /// Builds the REST client and starts the events subscription. Must run inside a Tokio
    /// runtime.
    ///
    /// # Errors
    /// Returns [`PrefectError::InvalidSettings`] when the HTTP client cannot be built.
    pub fn start(config: Config) -> Result<Self, PrefectError> {
        let client = Arc::new(PrefectClient::new(&config, RetryPolicy::default())?);
        let registry = WaiterRegistry::new();
        let subscription = match config.wait_mode {
            WaitMode::Events => {
                Some(Subscription::spawn(&config, Arc::clone(&client) as _, Arc::clone(&registry)))
            }
            WaitMode::Poll => {
                info!(interval = ?config.poll_interval, "wait mode poll: each job polls its own flow run");
                None
            }
        };
        Ok(Self {
            config,
            client,
            registry,
            subscription,
            orphan_cancels: Arc::default(),
            active_jobs: AtomicUsize::new(0),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Checks that the Prefect API responds.
    ///
    /// # Errors
    /// Returns the failure of `GET /health` once retries are spent.
    pub async fn check_health(&self) -> Result<(), PrefectError> {
        self.client.health().await
    }

    /// Describes a job's progress: submitting, or its flow run and that run's latest state
    /// (Scheduled until a later one is seen).
    pub fn describe_progress(&self, progress: &JobProgress) -> String {
        match progress.submitted() {
            None => "submitting the flow run to Prefect".to_owned(),
            Some((flow_run_id, name)) => {
                let state = self.registry.latest_state(flow_run_id).unwrap_or_else(|| "Scheduled".to_owned());
                format!("flow run {name} ({flow_run_id}) is {state}")
            }
        }
    }

    /// Returns a snapshot of the subscription, the waiting jobs and the service's counters.
    pub fn status(&self) -> RunnerStatus {
        RunnerStatus {
            api_url: self.config.api_url.clone(),
            deployment: self.config.deployment.clone(),
            wait_mode: self.config.wait_mode,
            subscription: self.subscription.as_ref().map(SubscriptionHandle::status),
            waiting_runs: self.registry.len(),
            rest_requests: self.client.requests_sent(),
            rest_retries: self.client.retries_sent(),
            peak_memory_kib: peak_memory_kib(),
        }
    }

    /// Submits `request` as a flow run and waits for its result.
    ///
    /// The run is cancelled when its time is up (its timeout plus the start-up allowance) and
    /// when `cancel` fires.
    ///
    /// # Errors
    /// Returns [`JobError`] when the run cannot be created, when the caller cancels, when the
    /// service shuts down, or when a finished run's state or result cannot be read.
    pub async fn run(
        &self,
        request: &JobRequest,
        cancel: &CancellationToken,
        progress: &JobProgress,
    ) -> Result<JobOutcome, JobError> {
        let started = Instant::now();
        let span = info_span!(
            "job",
            code_length = request.code_length(),
            timeout_seconds = request.timeout_seconds(),
            flow_run_id = tracing::field::Empty,
        );
        let _active = ActiveJob::enter(&self.active_jobs);
        let mut outcome = self.run_in_span(request, cancel, progress, &span).instrument(span.clone()).await?;
        outcome.elapsed = started.elapsed();
        span.in_scope(|| {
            info!(
                status = outcome.status.as_str(),
                elapsed_ms = outcome.elapsed.as_millis() as u64,
                "job finished"
            )
        });
        Ok(outcome)
    }

    /// Stops the subscription. Jobs still waiting cancel their flow runs and end with
    /// [`JobError::ShuttingDown`], and later jobs end the same way once submitted.
    pub async fn shutdown(&self) {
        match &self.subscription {
            Some(subscription) => subscription.shutdown().await,
            None => self.registry.close_all(),
        }
        // Closing the registry ends every wait, and each job then cancels its own run. The
        // process may exit right after this returns, so wait for those jobs to finish.
        let deadline = Instant::now() + ORPHAN_CANCEL_WAIT;
        while self.active_jobs.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            sleep(Duration::from_millis(20)).await;
        }
        let tasks =
            std::mem::take(&mut *self.orphan_cancels.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let all_done = futures::future::join_all(tasks);
        if tokio::time::timeout(ORPHAN_CANCEL_WAIT, all_done).await.is_err() {
            warn!("cancelling the flow runs of dropped jobs did not finish in time");
        }
    }

    async fn run_in_span(
        &self,
        request: &JobRequest,
        cancel: &CancellationToken,
        progress: &JobProgress,
        span: &tracing::Span,
    ) -> Result<JobOutcome, JobError> {
        let deployment_id = self.look_up_deployment().await?;
        let connection_before = self.subscribed_connection().await;
        let flow_run = self.submit(deployment_id, request).await?;
        span.record("flow_run_id", tracing::field::display(flow_run.id));
        info!(flow_run_name = %flow_run.name, "flow run created");
        progress.set_submitted(flow_run.id, &flow_run.name);

        let mut waiter = self.registry.register(flow_run.id);
        // An event that arrives between the creation and the registration is kept by the
        // registry for the waiter, but only if the socket was subscribed all along.
        let events_cover_gap =
            connection_before.is_some() && self.subscription_connection() == connection_before;
        let guard = OrphanGuard { runner: self, flow_run_id: flow_run.id, armed: true };
        let end = self.wait_for_terminal(&mut waiter, request, cancel, events_cover_gap).await;
        guard.disarm();
        match end {
            WaitEnd::Finished { state, source } => {
                let learned = LearnedEnd { source, at: chrono::Utc::now() };
                let mut outcome = self.finish(flow_run, state, source, request).await?;
                outcome.learned = Some(learned);
                Ok(outcome)
            }
            WaitEnd::DeadlinePassed { reason } => Ok(self.give_up(flow_run, request, &reason).await),
            WaitEnd::CallerCancelled => Err(self.cancel_for_caller(flow_run.id).await),
            WaitEnd::RegistryClosed => Err(self.cancel_for_shutdown(flow_run.id).await),
        }
    }

    /// Looks up the deployment's id, cached after the first call. It runs before anything
    /// else, so an unreachable Prefect or a missing deployment is reported without waiting
    /// for a socket that cannot connect.
    async fn look_up_deployment(&self) -> Result<Uuid, JobError> {
        let lookup = self.client.deployment_id(&self.config.deployment).await;
        lookup.map_err(|error| JobError::from_lookup(error, &self.config.api_url))
    }

    /// Waits for the events socket (in `events` mode) and returns the number of the
    /// connection that is subscribed, or `None` when no connection is.
    ///
    /// Subscribing before the first submission means the run's terminal event cannot slip
    /// past. If the socket is slow to come up, the fallback poll covers the gap.
    async fn subscribed_connection(&self) -> Option<u64> {
        let subscription = self.subscription.as_ref()?;
        if !subscription.wait_until_subscribed(self.config.subscribe_wait).await {
            debug!("events socket not subscribed yet; relying on polling for this job");
        }
        self.subscription_connection()
    }

    /// Returns the number of the connection that is subscribed now, if any.
    fn subscription_connection(&self) -> Option<u64> {
        let status = self.subscription.as_ref()?.status();
        (status.mode == Mode::Subscribed).then_some(status.connections)
    }

    async fn submit(&self, deployment_id: Uuid, request: &JobRequest) -> Result<FlowRun, JobError> {
        let new_run = NewFlowRun {
            parameters: json!({ "code": request.code(), "timeout_seconds": request.timeout_seconds() }),
            tags: vec![self.config.tag.clone()],
            idempotency_key: Uuid::new_v4().to_string(),
        };
        match self.client.create_flow_run(deployment_id, &new_run).await {
            Ok(flow_run) => Ok(flow_run),
            Err(PrefectError::Status { status: 404, .. }) => {
                // The deployment was deleted after its id was cached; look it up again next time.
                self.client.forget_deployment(&self.config.deployment);
                Err(JobError::DeploymentNotFound {
                    name: self.config.deployment.clone(),
                    api_url: self.config.api_url.clone(),
                })
            }
            Err(error) => Err(JobError::from_submit(error)),
        }
    }

    /// Waits for the run's terminal state. The deadline has two phases: the run must start
    /// within the start-up allowance, then end within its timeout plus [`RUN_GRACE`] from its
    /// start, so time spent queued behind other runs does not eat into the code's own time.
    ///
    /// In `events` mode the waiter is resolved by the subscription. In `poll` mode the job
    /// reads its own run every poll interval, and the waiter only ends at shutdown.
    async fn wait_for_terminal(
        &self,
        waiter: &mut Waiter,
        request: &JobRequest,
        cancel: &CancellationToken,
        events_cover_gap: bool,
    ) -> WaitEnd {
        // A run can finish between its creation and the waiter's registration while the
        // socket is down, and its event is then lost: one read after registering catches
        // that case. In `poll` mode this read is the first poll.
        if !events_cover_gap {
            if let Some(state) = self.read_terminal_state(waiter.flow_run_id()).await {
                return WaitEnd::Finished { state, source: CompletionSource::Poll };
            }
        }
        let poll_interval = match self.config.wait_mode {
            WaitMode::Events => None,
            WaitMode::Poll => Some(self.config.poll_interval),
        };
        let mut next_poll = poll_interval.map(|interval| Instant::now() + interval);
        let mut deadline = Instant::now() + self.config.startup_allowance;
        loop {
            tokio::select! {
                completion = waiter.completion() => return match completion {
                    Ok(completion) => WaitEnd::Finished { state: completion.state, source: completion.source },
                    Err(_) => WaitEnd::RegistryClosed,
                },
                () = sleep_until_if_set(next_poll) => {
                    if let Some(state) = self.read_terminal_state(waiter.flow_run_id()).await {
                        return WaitEnd::Finished { state, source: CompletionSource::Poll };
                    }
                    next_poll = poll_interval.map(|interval| Instant::now() + interval);
                    continue;
                }
                () = sleep_until(deadline) => {}
                () = cancel.cancelled() => return WaitEnd::CallerCancelled,
            }
            match self.check_deadline(waiter.flow_run_id(), request).await {
                DeadlineCheck::Finished(state) => {
                    return WaitEnd::Finished { state, source: CompletionSource::Poll }
                }
                DeadlineCheck::Extended(next) => deadline = next,
                DeadlineCheck::Expired(reason) => return WaitEnd::DeadlinePassed { reason },
            }
        }
    }

    async fn check_deadline(&self, flow_run_id: Uuid, request: &JobRequest) -> DeadlineCheck {
        let flow_run = match self.client.read_flow_run(flow_run_id).await {
            Ok(flow_run) => flow_run,
            Err(error) => {
                warn!(%error, "reading the flow run at its deadline failed; checking again later");
                return DeadlineCheck::Extended(Instant::now() + DEADLINE_RECHECK);
            }
        };
        if let Some(state) = flow_run.terminal_state() {
            return DeadlineCheck::Finished(state.clone());
        }
        self.note_progress(&flow_run);
        let Some(start_time) = flow_run.start_time else {
            let allowance = self.config.startup_allowance.as_secs();
            return DeadlineCheck::Expired(format!(
                "did not start within the start-up allowance of {allowance} s"
            ));
        };
        let run_limit = Duration::from_secs(request.timeout_seconds()) + RUN_GRACE;
        let ran_for = (chrono::Utc::now() - start_time).to_std().unwrap_or_default();
        match run_limit.checked_sub(ran_for) {
            Some(left) if !left.is_zero() => DeadlineCheck::Extended(Instant::now() + left),
            _ => DeadlineCheck::Expired(format!(
                "ran longer than its timeout of {} s plus {} s for the runner to stop it",
                request.timeout_seconds(),
                RUN_GRACE.as_secs()
            )),
        }
    }

    /// Records a non-terminal state read over REST, for progress reports.
    fn note_progress(&self, flow_run: &FlowRun) {
        if let Some(state) = flow_run.state.as_ref().filter(|state| !state.is_terminal()) {
            self.registry.note_state(flow_run.id, &state.name);
        }
    }

    async fn read_terminal_state(&self, flow_run_id: Uuid) -> Option<State> {
        match self.client.read_flow_run(flow_run_id).await {
            Ok(flow_run) => {
                self.note_progress(&flow_run);
                flow_run.terminal_state().cloned()
            }
            Err(error) => {
                debug!(%error, "reading the flow run failed; waiting for its next check");
                None
            }
        }
    }

    async fn finish(
        &self,
        flow_run: FlowRun,
        state: State,
        source: CompletionSource,
        request: &JobRequest,
    ) -> Result<JobOutcome, JobError> {
        debug!(state = %state.name, ?source, "flow run reached a terminal state");
        let (state, output) = match source {
            // The flow stores its result artifact before it proposes Completed, so the
            // artifact is readable while the state's commit may still be in flight: both
            // reads go out at once.
            CompletionSource::Event if state.state_type == StateType::Completed => {
                let (state, output) =
                    tokio::join!(self.confirm_terminal(flow_run.id, state), self.read_output(flow_run.id));
                (state?, output?)
            }
            CompletionSource::Event => {
                let state = self.confirm_terminal(flow_run.id, state).await?;
                let output = self.read_output_for(&state, flow_run.id).await?;
                (state, output)
            }
            CompletionSource::Poll => {
                let output = self.read_output_for(&state, flow_run.id).await?;
                (state, output)
            }
        };
        Ok(JobOutcome::finished(flow_run.id, flow_run.name, state, output, request.timeout_seconds()))
    }

    /// Reads the run until REST shows a terminal state, because the terminal event is sent
    /// before Prefect commits it. Falls back to the event's state if REST never catches up.
    async fn confirm_terminal(&self, flow_run_id: Uuid, event_state: State) -> Result<State, JobError> {
        let mut backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(500));
        for _ in 0..CONFIRM_ATTEMPTS {
            let flow_run = self
                .client
                .read_flow_run(flow_run_id)
                .await
                .map_err(|source| JobError::ResultUnreadable { flow_run_id, source })?;
            if let Some(state) = flow_run.terminal_state() {
                return Ok(state.clone());
            }
            sleep(backoff.next_delay()).await;
        }
        warn!(state = %event_state.name, "REST never showed the terminal state of the event; using the event's");
        Ok(event_state)
    }

    /// Reads the result artifact: with retries for a completed run, once for any other.
    async fn read_output_for(&self, state: &State, flow_run_id: Uuid) -> Result<Option<RunOutput>, JobError> {
        match state.state_type {
            StateType::Completed => self.read_output(flow_run_id).await,
            _ => Ok(self.read_output_once(flow_run_id).await),
        }
    }

    /// Reads the result artifact of a completed run, retrying briefly when it is not visible
    /// yet.
    async fn read_output(&self, flow_run_id: Uuid) -> Result<Option<RunOutput>, JobError> {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        for _ in 0..ARTIFACT_ATTEMPTS {
            let output = self
                .client
                .read_run_output(flow_run_id)
                .await
                .map_err(|source| JobError::ResultUnreadable { flow_run_id, source })?;
            if output.is_some() {
                return Ok(output);
            }
            sleep(backoff.next_delay()).await;
        }
        warn!("completed flow run has no result artifact");
        Ok(None)
    }

    /// Reads the artifact of a run that did not complete: a runner that broke late may still
    /// have written one, and its output helps the caller.
    async fn read_output_once(&self, flow_run_id: Uuid) -> Option<RunOutput> {
        match self.client.read_run_output(flow_run_id).await {
            Ok(output) => output,
            Err(error) => {
                debug!(%error, "reading the result of an unsuccessful flow run failed");
                None
            }
        }
    }

    /// Cancels a run that did not start in time or ran past its timeout.
    async fn give_up(&self, flow_run: FlowRun, request: &JobRequest, reason: &str) -> JobOutcome {
        let message =
            format!("the flow run {reason}; flow run {} ({}) was cancelled", flow_run.name, flow_run.id);
        warn!(reason = %message, "job timed out");
        if let Err(error) = self.client.cancel_flow_run(flow_run.id, "timed out waiting for a result").await {
            warn!(%error, "cancelling the timed-out flow run failed");
        }
        JobOutcome {
            flow_run_id: flow_run.id,
            flow_run_name: flow_run.name,
            status: JobStatus::Timeout,
            state: flow_run.state,
            output: None,
            message: Some(message),
            elapsed: Duration::ZERO,
            timeout_seconds: request.timeout_seconds(),
            learned: None,
        }
    }

    async fn cancel_for_shutdown(&self, flow_run_id: Uuid) -> JobError {
        info!("service shutting down; cancelling the flow run");
        if let Err(error) =
            self.client.cancel_flow_run(flow_run_id, "the k3s-job-runner service stopped").await
        {
            warn!(%error, "cancelling the flow run at shutdown failed");
        }
        JobError::ShuttingDown { flow_run_id }
    }

    async fn cancel_for_caller(&self, flow_run_id: Uuid) -> JobError {
        info!("caller cancelled the request; cancelling the flow run");
        if let Err(error) = self.client.cancel_flow_run(flow_run_id, "cancelled by the MCP client").await {
            warn!(%error, "cancelling the flow run failed");
        }
        JobError::Cancelled { flow_run_id }
    }
}

/// Sleeps until `at`, or forever when it is `None`.
async fn sleep_until_if_set(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
