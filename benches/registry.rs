//! Micro-benchmark of the waiter registry and the events subscription alone.
//!
//! A websocket server written for the bench, in its own thread, sends flow-run state events
//! for N waiting runs. The service side (subscription task, registry and one task per
//! waiter) runs on a current-thread runtime, so the rate is events per second on one core.
//! Heap per waiting run comes from a counting global allocator.
//!
//! `cargo bench --bench registry -- [OPTIONS]` runs the full benchmark and writes JSON.
//! Without `--bench`, as under `cargo test`, it runs a short correctness pass instead,
//! ignores its arguments, and exits non-zero when a check fails. Speed is never asserted.

#[path = "registry/frames.rs"]
mod frames;
#[path = "registry/memory.rs"]
mod memory;
#[path = "registry/procfs.rs"]
mod procfs;
#[path = "registry/report.rs"]
mod report;
#[path = "registry/server.rs"]
mod server;
#[path = "registry/service.rs"]
mod service;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use crate::frames::EventPlan;
use crate::memory::CountingAllocator;
use crate::report::{Machine, RepeatRecord, Report, SettingsRecord, Summary, Targets};
use crate::server::EventsServer;
use crate::service::{measure_repeat, RepeatMeasurement};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs and events of the correctness pass that `cargo test` runs.
const QUICK_RUNS: usize = 1_000;
const QUICK_EVENTS_PER_RUN: usize = 3;

/// Options of the full benchmark.
#[derive(Debug, Parser)]
#[command(about = "Measures the waiter registry and the events subscription on one core")]
struct Options {
    /// Waiting flow runs, each with its own registered waiter.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// State events per run; the last one is terminal (Completed), the ones before it
    /// alternate Pending and Running.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    events_per_run: u32,
    /// Number of measurements, each with fresh runs, registry and connection.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repeats: u32,
    /// Directory for registry.json, relative to the package root under cargo.
    #[arg(long, default_value = "target/bench-results")]
    out: PathBuf,
    /// Passed by `cargo bench`; selects the full benchmark and is otherwise ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Sizes and output of this invocation.
#[derive(Debug)]
pub struct Settings {
    pub runs: usize,
    pub events_per_run: usize,
    pub repeats: usize,
    /// Directory for the JSON record; `None` in the correctness pass, so that a test run
    /// never overwrites a benchmark's results.
    pub out: Option<PathBuf>,
}

impl Settings {
    /// Reads the options under `cargo bench`; anything else, such as libtest's
    /// `--test-threads 1` under `cargo test`, selects the correctness pass.
    fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        if !args.iter().any(|arg| arg == "--bench") {
            return Self { runs: QUICK_RUNS, events_per_run: QUICK_EVENTS_PER_RUN, repeats: 1, out: None };
        }
        let options = Options::parse_from(args);
        Self {
            runs: options.runs as usize,
            events_per_run: options.events_per_run as usize,
            repeats: options.repeats as usize,
            out: Some(options.out),
        }
    }

    fn mode(&self) -> &'static str {
        if self.out.is_some() {
            "full"
        } else {
            "quick correctness pass"
        }
    }
}

fn main() -> ExitCode {
    let settings = Settings::from_args();
    match run(&settings) {
        Ok(report) if report.failures.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("registry bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: &Settings) -> anyhow::Result<Report> {
    let started = Instant::now();
    let machine = Machine::current();
    let build = if cfg!(debug_assertions) { "debug" } else { "release" };
    let mut records = Vec::with_capacity(settings.repeats);
    let mut failures = Vec::new();
    let mut mean_frame_bytes = 0.0;
    for number in 1..=settings.repeats {
        let measurement = run_repeat(settings).with_context(|| format!("repeat {number}"))?;
        if number == 1 {
            mean_frame_bytes = measurement.send.bytes as f64 / measurement.send.frames as f64;
            let record = SettingsRecord::new(settings, mean_frame_bytes);
            report::print_header(&record, &machine, settings.mode(), build);
        }
        let record = RepeatRecord::new(&measurement);
        report::print_repeat(number, &record, settings.runs);
        failures.extend(measurement.failures.iter().map(|failure| format!("repeat {number}: {failure}")));
        records.push(record);
    }

    let report = Report {
        benchmark: "registry",
        mode: settings.mode(),
        build,
        recorded_at: chrono::Utc::now().to_rfc3339(),
        machine,
        settings: SettingsRecord::new(settings, mean_frame_bytes),
        targets: Targets {
            min_events_per_second: report::TARGET_EVENTS_PER_SECOND,
            max_bytes_per_waiting_run: report::TARGET_BYTES_PER_WAITING_RUN,
        },
        summary: Summary::new(&records, settings.runs),
        repeats: records,
        failures,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    report::print_summary(&report);
    if let Some(directory) = &settings.out {
        report::write_json(&report, directory)?;
    }
    Ok(report)
}

/// Runs one repeat on a fresh current-thread runtime against a fresh server.
fn run_repeat(settings: &Settings) -> anyhow::Result<RepeatMeasurement> {
    let plan = EventPlan::new(settings.runs, settings.events_per_run);
    let mut server = EventsServer::start(&plan)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let measured = runtime.block_on(measure_repeat(&plan, &mut server));
    drop(runtime);
    let served = server.finish();
    match (measured, served) {
        (Ok(measurement), Ok(())) => Ok(measurement),
        (Ok(_), Err(server_error)) => Err(server_error.context("the events server failed")),
        (Err(error), Ok(())) => Err(error),
        (Err(error), Err(server_error)) => {
            Err(anyhow::anyhow!("{error:#}; the events server failed too: {server_error:#}"))
        }
    }
}
