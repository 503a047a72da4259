//! The service side of one repeat: the waiter registry, the waiting jobs and the events
//! subscription, all on the calling thread's current-thread runtime.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use futures::future::BoxFuture;
use k3s_job_runner::config::Config;
use k3s_job_runner::events::{FlowRunReader, Subscription, SubscriptionHandle, SubscriptionStatus};
use k3s_job_runner::prefect::{FlowRun, PrefectError, State, StateType};
use k3s_job_runner::waiters::{Completion, CompletionSource, RegistryClosed, Waiter, WaiterRegistry};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use uuid::Uuid;

use crate::frames::EventPlan;
use crate::memory::thread_heap_counts;
use crate::procfs::{resident_set_bytes, thread_cpu_time};
use crate::server::{EventsServer, SendReport};

/// Interval of the subscription's safety poll. An hour is far longer than any repeat, so
/// the only bulk read is the one every connection makes, before the clock starts.
pub const SAFETY_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// Time allowed for the subscription to connect and for its first bulk read.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failure messages kept per repeat; the rest are only counted.
const MAX_FAILURE_MESSAGES: usize = 10;

/// Figures and checks of one repeat.
#[derive(Debug, Clone)]
pub struct RepeatMeasurement {
    /// From the server's first frame to the last waiter resolved.
    pub elapsed: Duration,
    pub send: SendReport,
    /// Heap bytes added by registering the waiters, per run: registry entry and `Waiter`.
    pub waiter_bytes_per_run: f64,
    /// Heap bytes added by spawning one task per waiter, per run.
    pub task_bytes_per_run: f64,
    /// Growth of the resident set while the waiters were registered.
    pub rss_growth_bytes: Option<i64>,
    /// Allocation calls on the service thread while events were handled, per event.
    pub allocations_per_event: f64,
    /// CPU time of the service thread while events were handled.
    pub service_cpu: Option<Duration>,
    pub reader_calls: u64,
    pub status: SubscriptionStatus,
    pub resolved_by_event: usize,
    /// Correctness checks that failed; empty when the repeat is valid.
    pub failures: Vec<String>,
}

impl RepeatMeasurement {
    pub fn events_per_second(&self) -> f64 {
        self.status.events_received as f64 / self.elapsed.as_secs_f64()
    }

    /// Events per second of service-thread CPU time: the rate on a core of its own, which
    /// other processes on a shared machine lower less than the wall-clock rate.
    pub fn events_per_cpu_second(&self) -> Option<f64> {
        let cpu = self.service_cpu?.as_secs_f64();
        (cpu > 0.0).then(|| self.status.events_received as f64 / cpu)
    }
}

/// Runs one repeat on the current runtime, which must be a current-thread runtime.
///
/// # Errors
/// Fails when the subscription does not connect, or the waiters are not all resolved in
/// time; checks that merely disagree are returned in [`RepeatMeasurement::failures`].
pub async fn measure_repeat(
    plan: &EventPlan,
    server: &mut EventsServer,
) -> anyhow::Result<RepeatMeasurement> {
    let registry = WaiterRegistry::new();
    let reader = Arc::new(RunningReader::default());

    let before_register = thread_heap_counts();
    let rss_before = resident_set_bytes();
    let waiters = register_waiters(&registry, &plan.run_ids);
    let after_register = thread_heap_counts();
    let rss_after = resident_set_bytes();

    let tally = Arc::new(Tally::new(plan.run_ids.len()));
    let jobs = spawn_jobs(waiters, plan, &tally);
    let after_spawn = thread_heap_counts();

    let config =
        Config { api_url: server.api_url(), safety_poll_interval: SAFETY_POLL_INTERVAL, ..Config::default() };
    let handle =
        Subscription::spawn(&config, Arc::clone(&reader) as Arc<dyn FlowRunReader>, Arc::clone(&registry));
    let outcome = stream_events(&handle, &reader, &tally, server, plan).await;
    handle.shutdown().await;
    let streamed = outcome?;
    for job in jobs {
        job.await.context("a waiting job panicked")?;
    }

    let runs = plan.run_ids.len() as f64;
    let mut measurement = RepeatMeasurement {
        elapsed: streamed.elapsed,
        send: streamed.send,
        waiter_bytes_per_run: after_register.live_bytes_since(&before_register) as f64 / runs,
        task_bytes_per_run: after_spawn.live_bytes_since(&after_register) as f64 / runs,
        rss_growth_bytes: rss_before.zip(rss_after).map(|(before, after)| after as i64 - before as i64),
        allocations_per_event: streamed.allocations as f64 / plan.total_events() as f64,
        service_cpu: streamed.service_cpu,
        reader_calls: reader.calls.load(Ordering::SeqCst),
        status: handle.status(),
        resolved_by_event: tally.resolved_by_event.load(Ordering::SeqCst),
        failures: tally.failure_messages(),
    };
    measurement.failures.extend(check_counters(&measurement, plan, &registry));
    Ok(measurement)
}

/// The timed part of a repeat.
struct Streamed {
    /// From the server's first frame to the last waiter resolved.
    elapsed: Duration,
    send: SendReport,
    /// Allocation calls on the service thread.
    allocations: u64,
    service_cpu: Option<Duration>,
}

/// Connects the subscription, lets the server send, and waits for every waiter.
async fn stream_events(
    handle: &SubscriptionHandle,
    reader: &RunningReader,
    tally: &Tally,
    server: &mut EventsServer,
    plan: &EventPlan,
) -> anyhow::Result<Streamed> {
    ensure!(
        handle.wait_until_subscribed(SUBSCRIBE_TIMEOUT).await,
        "the subscription did not connect within {SUBSCRIBE_TIMEOUT:?}; last error: {}",
        handle.status().last_error.unwrap_or_else(|| "none".to_owned())
    );
    // Every connection starts with a bulk read of the waiting runs; let it finish first so
    // that it is not timed.
    timeout(SUBSCRIBE_TIMEOUT, reader.called.notified())
        .await
        .context("the subscription did not read the waiting runs after connecting")?;

    let cpu_before = thread_cpu_time();
    let before_events = thread_heap_counts();
    server.go();
    let limit = resolve_timeout(plan);
    timeout(limit, tally.all_finished.notified()).await.with_context(|| {
        let finished = tally.finished.load(Ordering::SeqCst);
        format!("{finished} of {} waiters finished within {limit:?}", plan.run_ids.len())
    })?;
    let allocations = thread_heap_counts().allocations_since(&before_events);
    let service_cpu = thread_cpu_time().zip(cpu_before).map(|(after, before)| after.saturating_sub(before));

    let send = server.sent().await?;
    let finished_at = tally.finished_at().context("the last waiter recorded no time")?;
    let elapsed = finished_at.duration_since(send.first_frame_at);
    Ok(Streamed { elapsed, send, allocations, service_cpu })
}

/// Generous enough for an unoptimised build, so only a stuck waiter reaches it.
fn resolve_timeout(plan: &EventPlan) -> Duration {
    Duration::from_secs(30) + Duration::from_micros(100 * plan.total_events() as u64)
}

fn register_waiters(registry: &Arc<WaiterRegistry>, run_ids: &[Uuid]) -> Vec<Waiter> {
    let mut waiters = Vec::with_capacity(run_ids.len());
    waiters.extend(run_ids.iter().map(|&flow_run_id| registry.register(flow_run_id)));
    waiters
}

/// Spawns one task per waiter, as each tool call awaits its own run.
fn spawn_jobs(waiters: Vec<Waiter>, plan: &EventPlan, tally: &Arc<Tally>) -> Vec<JoinHandle<()>> {
    let mut jobs = Vec::with_capacity(waiters.len());
    for (index, mut waiter) in waiters.into_iter().enumerate() {
        let expected_timestamp = plan.terminal_timestamp(index);
        let tally = Arc::clone(tally);
        jobs.push(tokio::spawn(async move {
            let completion = waiter.completion().await;
            tally.record(check_completion(waiter.flow_run_id(), completion, expected_timestamp));
        }));
    }
    jobs
}

/// Checks that a waiter received its own run's terminal event.
fn check_completion(
    flow_run_id: Uuid,
    completion: Result<Completion, RegistryClosed>,
    expected_timestamp: chrono::DateTime<chrono::Utc>,
) -> Result<(), String> {
    let completion = completion.map_err(|error| format!("flow run {flow_run_id}: {error}"))?;
    if completion.source != CompletionSource::Event {
        return Err(format!("flow run {flow_run_id}: resolved by {:?}, not by its event", completion.source));
    }
    if completion.state.state_type != StateType::Completed {
        return Err(format!("flow run {flow_run_id}: state {:?}, expected Completed", completion.state));
    }
    if completion.state.timestamp != Some(expected_timestamp) {
        return Err(format!(
            "flow run {flow_run_id}: state timestamp {:?}, expected {expected_timestamp} from its own event",
            completion.state.timestamp
        ));
    }
    Ok(())
}

/// Compares the subscription's counters with what the server sent and the waiters received.
fn check_counters(
    measurement: &RepeatMeasurement,
    plan: &EventPlan,
    registry: &WaiterRegistry,
) -> Vec<String> {
    let runs = plan.run_ids.len() as u64;
    let events = plan.total_events() as u64;
    let status = &measurement.status;
    let checks = [
        ("frames sent by the server", measurement.send.frames as u64, events),
        ("waiters resolved by their event", measurement.resolved_by_event as u64, runs),
        ("events_received", status.events_received, events),
        ("duplicate_events", status.duplicate_events, 0),
        ("completions_from_events", status.completions_from_events, runs),
        ("completions_from_polls", status.completions_from_polls, 0),
        ("polls", status.polls, measurement.reader_calls),
        ("bulk reads (only the one after connecting)", measurement.reader_calls, 1),
        ("waiters left in the registry", registry.len() as u64, 0),
    ];
    checks
        .into_iter()
        .filter(|(_, actual, expected)| actual != expected)
        .map(|(name, actual, expected)| format!("{name}: {actual}, expected {expected}"))
        .collect()
}

/// Bulk reader that returns every run as Running, so that nothing resolves by polling, and
/// counts its calls.
#[derive(Default)]
struct RunningReader {
    calls: AtomicU64,
    called: Notify,
}

impl FlowRunReader for RunningReader {
    fn read_flow_runs<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, Result<Vec<FlowRun>, PrefectError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.called.notify_one();
        let runs = ids.iter().map(|&id| running_flow_run(id)).collect();
        Box::pin(futures::future::ready(Ok(runs)))
    }
}

fn running_flow_run(id: Uuid) -> FlowRun {
    let state =
        State { state_type: StateType::Running, name: "Running".to_owned(), message: None, timestamp: None };
    FlowRun { id, name: "bench-run".to_owned(), state: Some(state), start_time: None }
}

/// Outcomes of the waiting jobs, and the time the last of them finished.
struct Tally {
    expected: usize,
    finished: AtomicUsize,
    resolved_by_event: AtomicUsize,
    failures: Mutex<Vec<String>>,
    finished_at: Mutex<Option<Instant>>,
    all_finished: Notify,
}

impl Tally {
    fn new(expected: usize) -> Self {
        Self {
            expected,
            finished: AtomicUsize::new(0),
            resolved_by_event: AtomicUsize::new(0),
            failures: Mutex::new(Vec::new()),
            finished_at: Mutex::new(None),
            all_finished: Notify::new(),
        }
    }

    fn record(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.resolved_by_event.fetch_add(1, Ordering::SeqCst);
            }
            Err(message) => self.failures.lock().expect("no job panics while holding the lock").push(message),
        }
        if self.finished.fetch_add(1, Ordering::SeqCst) + 1 == self.expected {
            *self.finished_at.lock().expect("no job panics while holding the lock") = Some(Instant::now());
            self.all_finished.notify_one();
        }
    }

    fn finished_at(&self) -> Option<Instant> {
        *self.finished_at.lock().expect("no job panics while holding the lock")
    }

    fn failure_messages(&self) -> Vec<String> {
        let failures = self.failures.lock().expect("no job panics while holding the lock");
        let mut messages: Vec<String> = failures.iter().take(MAX_FAILURE_MESSAGES).cloned().collect();
        if failures.len() > MAX_FAILURE_MESSAGES {
            messages.push(format!("and {} more failed waiters", failures.len() - MAX_FAILURE_MESSAGES));
        }
        messages
    }
}
