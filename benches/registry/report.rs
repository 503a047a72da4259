//! The bench's output: a table on stdout and a JSON record of the machine, settings and
//! measurements.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::service::{RepeatMeasurement, SAFETY_POLL_INTERVAL};
use crate::Settings;

/// Event rate the project aims for on one core. Printed beside the measurement, never
/// asserted: the figure depends on the machine.
pub const TARGET_EVENTS_PER_SECOND: f64 = 200_000.0;
/// Heap the project allows per waiting run.
pub const TARGET_BYTES_PER_WAITING_RUN: f64 = 1024.0;

/// Everything one invocation measured, as written to the JSON file.
#[derive(Debug, Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    pub mode: &'static str,
    /// `release` under `cargo bench`, `debug` under `cargo test`.
    pub build: &'static str,
    pub recorded_at: String,
    pub machine: Machine,
    pub settings: SettingsRecord,
    pub targets: Targets,
    pub summary: Summary,
    pub repeats: Vec<RepeatRecord>,
    /// Failed correctness checks over all repeats; empty when every repeat is valid.
    pub failures: Vec<String>,
    pub total_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu_model: Option<String>,
    pub logical_cpus: usize,
    pub os: &'static str,
}

#[derive(Debug, Serialize)]
pub struct SettingsRecord {
    pub runs: usize,
    pub events_per_run: usize,
    pub repeats: usize,
    pub events_per_repeat: usize,
    pub mean_frame_bytes: f64,
    pub safety_poll_interval_seconds: u64,
    pub service_runtime: &'static str,
    pub events_server: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Targets {
    pub min_events_per_second: f64,
    pub max_bytes_per_waiting_run: f64,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub events_per_second: MedianAndBest,
    /// Events per second of service-thread CPU time, where `/proc` reports it.
    pub events_per_cpu_second: Option<MedianAndBest>,
    pub bytes_per_waiting_run: MedianAndBest,
    pub task_bytes_per_waiting_run: MedianAndBest,
    /// Resident-set growth per run in the first repeat. Later repeats reuse pages freed by
    /// earlier ones, so their growth understates the cost.
    pub first_repeat_rss_growth_bytes_per_run: Option<f64>,
    pub allocations_per_event: MedianAndBest,
}

/// Median over repeats and the best repeat: the highest rate, or the lowest cost.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MedianAndBest {
    pub median: f64,
    pub best: f64,
}

#[derive(Debug, Serialize)]
pub struct RepeatRecord {
    pub events_per_second: f64,
    pub events_per_cpu_second: Option<f64>,
    /// Service-thread CPU time over elapsed time; below 1 when the thread waited for
    /// frames or for the CPU.
    pub service_thread_busy: Option<f64>,
    pub elapsed_seconds: f64,
    pub server_send_seconds: f64,
    pub bytes_per_waiting_run: f64,
    pub task_bytes_per_waiting_run: f64,
    pub rss_growth_bytes: Option<i64>,
    pub allocations_per_event: f64,
    pub reader_calls: u64,
    pub events_received: u64,
    pub duplicate_events: u64,
    pub completions_from_events: u64,
    pub completions_from_polls: u64,
    pub polls: u64,
    pub waiters_resolved_by_event: usize,
}

impl RepeatRecord {
    pub fn new(measurement: &RepeatMeasurement) -> Self {
        let send = &measurement.send;
        let status = &measurement.status;
        Self {
            events_per_second: measurement.events_per_second(),
            events_per_cpu_second: measurement.events_per_cpu_second(),
            service_thread_busy: measurement
                .service_cpu
                .map(|cpu| cpu.as_secs_f64() / measurement.elapsed.as_secs_f64()),
            elapsed_seconds: measurement.elapsed.as_secs_f64(),
            server_send_seconds: send.last_frame_at.duration_since(send.first_frame_at).as_secs_f64(),
            bytes_per_waiting_run: measurement.waiter_bytes_per_run,
            task_bytes_per_waiting_run: measurement.task_bytes_per_run,
            rss_growth_bytes: measurement.rss_growth_bytes,
            allocations_per_event: measurement.allocations_per_event,
            reader_calls: measurement.reader_calls,
            events_received: status.events_received,
            duplicate_events: status.duplicate_events,
            completions_from_events: status.completions_from_events,
            completions_from_polls: status.completions_from_polls,
            polls: status.polls,
            waiters_resolved_by_event: measurement.resolved_by_event,
        }
    }
}

impl Summary {
    pub fn new(repeats: &[RepeatRecord], runs: usize) -> Self {
        let column = |value: fn(&RepeatRecord) -> f64| repeats.iter().map(value).collect::<Vec<_>>();
        Self {
            events_per_second: highest_best(column(|repeat| repeat.events_per_second)),
            events_per_cpu_second: repeats
                .iter()
                .map(|repeat| repeat.events_per_cpu_second)
                .collect::<Option<Vec<_>>>()
                .map(highest_best),
            bytes_per_waiting_run: lowest_best(column(|repeat| repeat.bytes_per_waiting_run)),
            task_bytes_per_waiting_run: lowest_best(column(|repeat| repeat.task_bytes_per_waiting_run)),
            first_repeat_rss_growth_bytes_per_run: repeats
                .first()
                .and_then(|repeat| repeat.rss_growth_bytes)
                .map(|bytes| bytes as f64 / runs as f64),
            allocations_per_event: lowest_best(column(|repeat| repeat.allocations_per_event)),
        }
    }
}

fn highest_best(values: Vec<f64>) -> MedianAndBest {
    let best = values.iter().copied().fold(f64::MIN, f64::max);
    MedianAndBest { median: median(values), best }
}

fn lowest_best(values: Vec<f64>) -> MedianAndBest {
    let best = values.iter().copied().fold(f64::MAX, f64::min);
    MedianAndBest { median: median(values), best }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 0 {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

impl Machine {
    /// Reads the CPU model from `/proc/cpuinfo`, where available.
    pub fn current() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|cpuinfo| {
            cpuinfo
                .lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        });
        let logical_cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Self { cpu_model, logical_cpus, os: std::env::consts::OS }
    }
}

impl SettingsRecord {
    pub fn new(settings: &Settings, mean_frame_bytes: f64) -> Self {
        Self {
            runs: settings.runs,
            events_per_run: settings.events_per_run,
            repeats: settings.repeats,
            events_per_repeat: settings.runs * settings.events_per_run,
            mean_frame_bytes,
            safety_poll_interval_seconds: SAFETY_POLL_INTERVAL.as_secs(),
            service_runtime: "Tokio current-thread runtime on the main thread (one core)",
            events_server: "tokio-tungstenite on 127.0.0.1, own OS thread and runtime",
        }
    }
}

/// Prints the settings and the column headings of the per-repeat table.
pub fn print_header(settings: &SettingsRecord, machine: &Machine, mode: &str, build: &str) {
    println!("waiter registry and events subscription, {mode}, {build} build");
    println!(
        "{} waiting runs x {} events = {} events per repeat; repeats: {}",
        settings.runs, settings.events_per_run, settings.events_per_repeat, settings.repeats
    );
    println!("service: {}", settings.service_runtime);
    println!("events server: {}", settings.events_server);
    println!(
        "safety poll every {} s, so the only bulk read is the untimed one after connecting",
        settings.safety_poll_interval_seconds
    );
    println!(
        "frames: {:.0} bytes on average, shaped like Prefect 3 flow-run state events",
        settings.mean_frame_bytes
    );
    let cpu_model = machine.cpu_model.as_deref().unwrap_or("unknown CPU");
    println!("machine: {cpu_model}, {} logical CPUs, {}", machine.logical_cpus, machine.os);
    println!();
    println!(
        "{:>6} {:>9} {:>8} {:>9} {:>5} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}",
        "repeat",
        "events/s",
        "ns/event",
        "cpu ev/s",
        "busy",
        "elapsed",
        "send",
        "allocs",
        "waiter",
        "task",
        "RSS"
    );
    println!(
        "{:>6} {:>9} {:>8} {:>9} {:>5} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}",
        "", "", "", "", "%", "ms", "ms", "/event", "B/run", "B/run", "B/run"
    );
}

/// Prints one row of the per-repeat table.
pub fn print_repeat(number: usize, repeat: &RepeatRecord, runs: usize) {
    let optional = |value: Option<f64>, scale: f64| {
        value.map_or_else(|| "n/a".to_owned(), |value| format!("{:.0}", value * scale))
    };
    println!(
        "{:>6} {:>9.0} {:>8.0} {:>9} {:>5} {:>8.1} {:>8.1} {:>7.2} {:>7.0} {:>7.0} {:>7}",
        number,
        repeat.events_per_second,
        1e9 / repeat.events_per_second,
        optional(repeat.events_per_cpu_second, 1.0),
        optional(repeat.service_thread_busy, 100.0),
        repeat.elapsed_seconds * 1e3,
        repeat.server_send_seconds * 1e3,
        repeat.allocations_per_event,
        repeat.bytes_per_waiting_run,
        repeat.task_bytes_per_waiting_run,
        optional(repeat.rss_growth_bytes.map(|bytes| bytes as f64), 1.0 / runs as f64),
    );
}

/// Prints the summary against the targets, the failed checks if any, and the total time.
pub fn print_summary(report: &Report) {
    println!();
    print_rates(report);
    print_memory(&report.summary, &report.targets);
    if report.build == "debug" {
        println!("an unoptimised build is far slower than a release build: compare only `cargo bench` figures with the targets");
    }

    println!();
    if report.failures.is_empty() {
        println!("checks passed: every waiter received its own run's terminal event, once, from the websocket; counters agree");
    } else {
        println!("CHECKS FAILED:");
        for failure in &report.failures {
            println!("  {failure}");
        }
    }
    println!("total time {:.1} s", report.total_seconds);
}

fn print_rates(report: &Report) {
    let summary = &report.summary;
    println!("{:<36} {:>10} {:>10} {:>12}", "", "median", "best", "target");
    let events = summary.events_per_second;
    let target = format!(">= {:.0}", report.targets.min_events_per_second);
    println!("{:<36} {:>10.0} {:>10.0} {:>12}", "events/s on one core", events.median, events.best, target);
    if let Some(cpu) = summary.events_per_cpu_second {
        println!("{:<36} {:>10.0} {:>10.0}", "  per second of service-thread CPU", cpu.median, cpu.best);
    }

    let allocations = summary.allocations_per_event;
    println!("{:<36} {:>10.2} {:>10.2}", "allocations per event", allocations.median, allocations.best);
}

fn print_memory(summary: &Summary, targets: &Targets) {
    let bytes = summary.bytes_per_waiting_run;
    let target = format!("<= {:.0}", targets.max_bytes_per_waiting_run);
    println!(
        "{:<36} {:>10.0} {:>10.0} {:>12}",
        "heap bytes per waiting run", bytes.median, bytes.best, target
    );
    let task = summary.task_bytes_per_waiting_run;
    println!("{:<36} {:>10.0} {:>10.0}", "  plus a task awaiting it", task.median, task.best);

    if let Some(rss) = summary.first_repeat_rss_growth_bytes_per_run {
        println!(
            "{:<36} {:>10.0}   (first repeat; later ones reuse freed pages)",
            "RSS growth bytes per waiting run", rss
        );
    }
}

/// Writes `report` as `registry.json` in `directory`, creating the directory.
///
/// # Errors
/// Fails when the directory or file cannot be written.
pub fn write_json(report: &Report, directory: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(directory).with_context(|| format!("creating {} failed", directory.display()))?;
    let path = directory.join("registry.json");
    let text = serde_json::to_string_pretty(report)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {} failed", path.display()))?;
    println!("results written to {}", path.display());
    Ok(())
}
