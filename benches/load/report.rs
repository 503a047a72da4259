//! Summaries per wait mode, the ratios between modes, and their rendering as a table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::service::JobSample;
use crate::stats::{summarize, Summary};
use crate::timeline::{Breakdown, Timeline};
use crate::WaitMode;

/// One batch: N concurrent jobs through one service process in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    pub mode: WaitMode,
    pub round: usize,
    pub wall_seconds: f64,
    /// REST requests the service sent during the batch, from its `runner_status`.
    pub rest_requests: u64,
    /// Of those, retries of failed requests, mostly HTTP 503 from a busy SQLite.
    pub rest_retries: u64,
    /// Websocket connections the service made since it started.
    pub websocket_connections: u64,
    pub peak_memory_kib: Option<u64>,
    #[serde(skip)]
    pub samples: Vec<JobSample>,
    #[serde(skip)]
    pub timelines: Vec<Option<Timeline>>,
    #[serde(skip)]
    pub breakdowns: Vec<Breakdown>,
}

/// Median and 95th percentile of each step of the jobs' time, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepStats {
    pub p50: BTreeMap<&'static str, f64>,
    pub p95: BTreeMap<&'static str, f64>,
}

impl StepStats {
    pub fn from(breakdowns: &[Breakdown]) -> Self {
        let mut stats = Self::default();
        for (name, step) in STEPS {
            let samples: Vec<f64> = breakdowns.iter().filter_map(step).collect();
            if let Some(summary) = summarize(&samples) {
                stats.p50.insert(name, summary.p50);
                stats.p95.insert(name, summary.p95);
            }
        }
        stats
    }
}

type Step = fn(&Breakdown) -> Option<f64>;

/// Steps of a job in the order they happen.
pub const STEPS: [(&str, Step); 8] = [
    ("submit", |b| b.submit),
    ("queueing", |b| b.queueing),
    ("pickup", |b| b.pickup),
    ("process_start", |b| b.process_start),
    ("code", |b| b.code),
    ("flow_overhead", |b| b.flow_overhead),
    ("notice", |b| b.notice),
    ("result", |b| b.result),
];

/// Everything measured for one wait mode, over all its batches.
#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: WaitMode,
    pub jobs: usize,
    /// Jobs whose code did not run to an ending (any status but `completed` and `error`).
    pub failures: usize,
    pub statuses: BTreeMap<String, usize>,
    /// Number of runs whose end the service learned by `event` and by `poll`.
    pub completed_via: BTreeMap<String, usize>,
    pub end_to_end_ms: Option<Summary>,
    /// Terminal state's timestamp in Prefect to the tool result's arrival.
    pub completion_ms: Option<Summary>,
    /// REST requests per job, retries included.
    pub rest_requests_per_job: f64,
    pub rest_retries_per_job: f64,
    pub websocket_connections_per_job: f64,
    pub max_websocket_connections_per_service: u64,
    pub peak_memory_kib: Option<u64>,
    pub jobs_per_second: f64,
    pub steps_ms: StepStats,
    #[serde(skip)]
    pub end_to_end_samples: Vec<f64>,
    #[serde(skip)]
    pub completion_samples: Vec<f64>,
}

impl ModeReport {
    pub fn from_batches(mode: WaitMode, batches: &[&Batch]) -> Self {
        let samples: Vec<&JobSample> = batches.iter().flat_map(|batch| &batch.samples).collect();
        let breakdowns: Vec<Breakdown> =
            batches.iter().flat_map(|batch| batch.breakdowns.iter().copied()).collect();

        let mut statuses = BTreeMap::new();
        let mut completed_via = BTreeMap::new();
        for sample in &samples {
            *statuses.entry(sample.status.clone()).or_insert(0) += 1;
            let via = sample.completed_via.clone().unwrap_or_else(|| "unknown".to_owned());
            *completed_via.entry(via).or_insert(0) += 1;
        }

        // Latencies of jobs that ran only, because a rejected or failed job shows nothing about
        // waiting.
        let end_to_end_samples: Vec<f64> =
            samples.iter().filter(|sample| sample.ran()).map(|sample| sample.end_to_end_ms()).collect();
        let completion_samples: Vec<f64> = breakdowns.iter().filter_map(|step| step.completion).collect();

        let jobs = samples.len();
        let per_job = |total: u64| if jobs == 0 { 0.0 } else { total as f64 / jobs as f64 };
        let wall: f64 = batches.iter().map(|batch| batch.wall_seconds).sum();

        Self {
            mode,
            jobs,
            failures: samples.iter().filter(|sample| !sample.ran()).count(),
            statuses,
            completed_via,
            end_to_end_ms: summarize(&end_to_end_samples),
            completion_ms: summarize(&completion_samples),
            rest_requests_per_job: per_job(batches.iter().map(|batch| batch.rest_requests).sum()),
            rest_retries_per_job: per_job(batches.iter().map(|batch| batch.rest_retries).sum()),
            websocket_connections_per_job: per_job(
                batches.iter().map(|batch| batch.websocket_connections).sum(),
            ),
            max_websocket_connections_per_service: batches
                .iter()
                .map(|batch| batch.websocket_connections)
                .max()
                .unwrap_or(0),
            peak_memory_kib: batches.iter().filter_map(|batch| batch.peak_memory_kib).max(),
            jobs_per_second: if wall > 0.0 { jobs as f64 / wall } else { 0.0 },
            steps_ms: StepStats::from(&breakdowns),
            end_to_end_samples,
            completion_samples,
        }
    }
}

/// Poll mode's figures divided by events mode's: how many times better events are.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub completion_p50: Option<f64>,
    pub completion_p95: Option<f64>,
    pub completion_p99: Option<f64>,
    pub end_to_end_p50: Option<f64>,
    pub end_to_end_p99: Option<f64>,
    pub rest_requests_per_job: Option<f64>,
}

impl Ratios {
    pub fn between(events: &ModeReport, poll: &ModeReport) -> Self {
        let ratio = |poll: Option<f64>, events: Option<f64>| match (poll, events) {
            (Some(poll), Some(events)) if events > 0.0 => Some(poll / events),
            _ => None,
        };
        let completion =
            |report: &ModeReport, pick: fn(&Summary) -> f64| report.completion_ms.as_ref().map(pick);
        let end_to_end =
            |report: &ModeReport, pick: fn(&Summary) -> f64| report.end_to_end_ms.as_ref().map(pick);
        Self {
            completion_p50: ratio(completion(poll, |s| s.p50), completion(events, |s| s.p50)),
            completion_p95: ratio(completion(poll, |s| s.p95), completion(events, |s| s.p95)),
            completion_p99: ratio(completion(poll, |s| s.p99), completion(events, |s| s.p99)),
            end_to_end_p50: ratio(end_to_end(poll, |s| s.p50), end_to_end(events, |s| s.p50)),
            end_to_end_p99: ratio(end_to_end(poll, |s| s.p99), end_to_end(events, |s| s.p99)),
            rest_requests_per_job: ratio(
                Some(poll.rest_requests_per_job),
                Some(events.rest_requests_per_job),
            ),
        }
    }
}

/// A project target next to the measured value. Targets are reported, never enforced.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: &'static str,
    pub measured: Option<f64>,
    pub met: Option<bool>,
}

pub fn check_targets(events: Option<&ModeReport>, ratios: Option<&Ratios>) -> Vec<TargetCheck> {
    let completion =
        |pick: fn(&Summary) -> f64| events.and_then(|report| report.completion_ms.as_ref().map(pick));
    let check = |target, measured: Option<f64>, met: fn(f64) -> bool| TargetCheck {
        target,
        measured,
        met: measured.map(met),
    };
    vec![
        check("events completion p50 <= 20 ms", completion(|s| s.p50), |value| value <= 20.0),
        check("events completion p99 <= 100 ms", completion(|s| s.p99), |value| value <= 100.0),
        check(
            "completion p50, poll / events >= 50",
            ratios.and_then(|ratios| ratios.completion_p50),
            |value| value >= 50.0,
        ),
        check(
            "events REST requests per job <= 3",
            events.map(|report| report.rest_requests_per_job),
            |value| value <= 3.0,
        ),
        check(
            "events websocket connections per service == 1",
            events.map(|report| report.max_websocket_connections_per_service as f64),
            |value| value == 1.0,
        ),
    ]
}

type SummaryOf = fn(&ModeReport) -> Option<&Summary>;
type Pick = fn(&Summary) -> f64;
type ValueOf = fn(&ModeReport) -> Option<f64>;

/// Renders the comparison table printed at the end of a run.
pub fn render_table(reports: &[ModeReport], ratios: Option<&Ratios>) -> String {
    let mut out = String::new();
    let header: Vec<String> = reports.iter().map(|report| report.mode.as_str().to_owned()).collect();
    let with_ratio = ratios.is_some();
    push_row(&mut out, "", &header, with_ratio.then_some("poll/events"));
    let summary_rows: [(&str, SummaryOf, Pick); 8] = [
        ("end-to-end p50 (ms)", |r| r.end_to_end_ms.as_ref(), |s| s.p50),
        ("end-to-end p95 (ms)", |r| r.end_to_end_ms.as_ref(), |s| s.p95),
        ("end-to-end p99 (ms)", |r| r.end_to_end_ms.as_ref(), |s| s.p99),
        ("end-to-end max (ms)", |r| r.end_to_end_ms.as_ref(), |s| s.max),
        ("completion p50 (ms)", |r| r.completion_ms.as_ref(), |s| s.p50),
        ("completion p95 (ms)", |r| r.completion_ms.as_ref(), |s| s.p95),
        ("completion p99 (ms)", |r| r.completion_ms.as_ref(), |s| s.p99),
        ("completion max (ms)", |r| r.completion_ms.as_ref(), |s| s.max),
    ];
    for (label, summary, pick) in summary_rows {
        let values: Vec<Option<f64>> = reports.iter().map(|report| summary(report).map(pick)).collect();
        push_values(&mut out, label, &values, with_ratio);
    }
    let plain_rows: [(&str, ValueOf); 7] = [
        ("REST requests per job", |r| Some(r.rest_requests_per_job)),
        ("  of which retries", |r| Some(r.rest_retries_per_job)),
        ("websocket connections per job", |r| Some(r.websocket_connections_per_job)),
        ("websocket connections per service", |r| Some(r.max_websocket_connections_per_service as f64)),
        ("service peak memory (MiB)", |r| r.peak_memory_kib.map(|kib| kib as f64 / 1024.0)),
        ("jobs per second", |r| Some(r.jobs_per_second)),
        ("failures", |r| Some(r.failures as f64)),
    ];
    for (label, value) in plain_rows {
        let values: Vec<Option<f64>> = reports.iter().map(value).collect();
        push_values(&mut out, label, &values, with_ratio && label == "REST requests per job");
    }
    out
}

/// Renders the median of each step, one column per mode and one for the single-job runs.
pub fn render_steps(columns: &[(&str, &StepStats)]) -> String {
    let mut out = String::new();
    let header: Vec<String> = columns.iter().map(|(name, _)| format!("{name} p50")).collect();
    push_row(&mut out, "step (ms)", &header, None);
    for (name, _) in STEPS {
        let values: Vec<Option<f64>> =
            columns.iter().map(|(_, stats)| stats.p50.get(name).copied()).collect();
        push_values(&mut out, name, &values, false);
    }
    out
}

pub fn render_targets(targets: &[TargetCheck]) -> String {
    let mut out = String::new();
    for target in targets {
        let measured = target.measured.map_or_else(|| "n/a".to_owned(), format_number);
        let verdict = match target.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        out.push_str(&format!("{:<48} {:>12}  {verdict}\n", target.target, measured));
    }
    out
}

fn push_values(out: &mut String, label: &str, values: &[Option<f64>], with_ratio: bool) {
    let cells: Vec<String> =
        values.iter().map(|value| value.map_or_else(|| "n/a".to_owned(), format_number)).collect();
    let ratio = with_ratio.then(|| match values {
        [Some(events), Some(poll)] if *events > 0.0 => format!("{:.1}x", poll / events),
        _ => "n/a".to_owned(),
    });
    push_row(out, label, &cells, ratio.as_deref());
}

fn push_row(out: &mut String, label: &str, cells: &[String], ratio: Option<&str>) {
    out.push_str(&format!("{label:<36}"));
    for cell in cells {
        out.push_str(&format!("{cell:>14}"));
    }
    if let Some(ratio) = ratio {
        out.push_str(&format!("{ratio:>14}"));
    }
    out.push('\n');
}

fn format_number(value: f64) -> String {
    if value.fract() == 0.0 || value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}
