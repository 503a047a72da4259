//! Load harness: N concurrent jobs through the real service on the local stack, in `events`
//! and `poll` wait mode, alternating, with latency, REST and memory figures for each mode.
//!
//! `cargo bench --bench load -- --jobs 200` runs it against a stack started with
//! `deploy/local/stack.sh up` (see benches/README.md). Under `cargo test` the binary gets no
//! `--bench` flag and runs a small load instead, as a check that the harness works.

mod machine;
mod plot;
mod report;
mod service;
mod stats;
mod timeline;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

pub use k3s_job_runner::config::WaitMode;
use machine::Machine;
use report::{
    check_targets, render_steps, render_table, render_targets, Batch, ModeReport, Ratios, StepStats,
};
use service::{JobSample, Service, ServiceSettings};
use timeline::{breakdown, slot_free_times, PrefectReader, Timeline};

/// Drives concurrent jobs through k3s-job-runner in both wait modes and compares them.
#[derive(Debug, Clone, Parser)]
#[command(name = "load")]
struct Options {
    /// Jobs submitted at once in each batch.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=5000))]
    jobs: u64,
    /// Python code every job runs.
    #[arg(long, default_value = "print('hi')")]
    code: String,
    /// Rounds; each runs one batch per mode, and the order of the modes alternates.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=20))]
    rounds: u64,
    /// Wait modes to compare: events, poll, or both separated by a comma.
    #[arg(long, value_delimiter = ',', default_values = ["events", "poll"])]
    modes: Vec<WaitMode>,
    /// Interval at which each waiting job reads its run in poll mode, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    poll_interval_ms: u64,
    /// `timeout_seconds` of every job.
    #[arg(long, default_value_t = 60)]
    timeout_seconds: u64,
    /// Jobs run one at a time in events mode before the load, for the unloaded breakdown.
    #[arg(long, default_value_t = 10)]
    single_jobs: u64,
    /// Prefect REST API of the stack the service uses.
    #[arg(long, env = "PREFECT_API_URL", default_value = "http://127.0.0.1:4200/api")]
    api_url: String,
    /// Deployment the service submits to, as flow/deployment.
    #[arg(long, default_value = "python-runner/python-runner")]
    deployment: String,
    /// Folder for the JSON report, the PNG plot and the service logs.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-results"))]
    out: PathBuf,
    /// The k3s-job-runner binary; by default the one Cargo built for this bench.
    #[arg(long, default_value = env!("CARGO_BIN_EXE_k3s-job-runner"))]
    service: PathBuf,
    /// Extra environment of the services, as NAME=VALUE; repeat for several, for example
    /// --service-env K3S_JOB_RUNNER_MAX_CONCURRENT_WRITES=1.
    #[arg(long, value_parser = parse_env_pair)]
    service_env: Vec<(String, String)>,
    /// TrueType font for the plot's text; by default DejaVu Sans from the system.
    #[arg(long)]
    font: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Options {
    /// Builds the options of the small load run under `cargo test`, against the stack that
    /// `deploy/local/test.sh` starts.
    fn check_run() -> Result<Self> {
        let api_url = std::env::var("K3S_JOB_RUNNER_TEST_API_URL")
            .or_else(|_| std::env::var("PREFECT_API_URL"))
            .context(
                "under cargo test the load harness runs a small load against the stack that \
                 deploy/local/test.sh starts; K3S_JOB_RUNNER_TEST_API_URL is not set",
            )?;
        let mut options = Self::parse_from(["load"]);
        options.api_url = api_url;
        options.jobs = 3;
        options.rounds = 1;
        options.single_jobs = 1;
        options.out = options.out.join("check");
        Ok(options)
    }
}

fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {text:?}")),
    }
}

/// Counts shown on stderr while a batch runs.
#[derive(Default)]
struct Progress {
    submitted: AtomicUsize,
    finished: AtomicUsize,
    failed: AtomicUsize,
}

/// Everything a run produced, as written to the JSON report.
#[derive(Serialize)]
struct Report<'a> {
    machine: &'a Machine,
    settings: serde_json::Value,
    modes: &'a [ModeReport],
    ratios: Option<&'a Ratios>,
    targets: &'a [report::TargetCheck],
    single_job_steps_ms: &'a StepStats,
    batches: &'a [Batch],
    samples: serde_json::Value,
}

fn main() -> ExitCode {
    let bench_mode = std::env::args().any(|argument| argument == "--bench");
    let options = if bench_mode { Ok(Options::parse()) } else { Options::check_run() };
    let runtime = tokio::runtime::Runtime::new().expect("the Tokio runtime starts");
    let result = options.and_then(|options| runtime.block_on(run(options, !bench_mode)));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("load: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the whole comparison. Returns false when a job failed, or, in a check run, when the
/// report lacks what the harness must produce.
async fn run(options: Options, check_run: bool) -> Result<bool> {
    if options.modes.is_empty() {
        bail!("--modes needs at least one of events, poll");
    }
    if !options.service.exists() {
        bail!(
            "the service binary {} does not exist; build it with cargo build --release",
            options.service.display()
        );
    }
    let logs = options.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let machine = Machine::read();
    let reader = PrefectReader::new(&options.api_url)?;
    reader.check_health().await?;
    let pool_limit = reader.pool_concurrency_limit(&options.deployment).await?;
    let settings = ServiceSettings {
        binary: options.service.clone(),
        api_url: options.api_url.clone(),
        tag: format!("k3s-job-runner-bench-{}", &Uuid::new_v4().simple().to_string()[..8]),
        poll_interval_ms: options.poll_interval_ms,
        startup_allowance_seconds: 3600,
        extra_env: options.service_env.clone(),
    };
    eprintln!(
        "load: {}, modes {:?}, code {:?}, pool concurrency limit {}, tag {}",
        describe_load(&options),
        options.modes.iter().map(|mode| mode.as_str()).collect::<Vec<_>>(),
        options.code,
        pool_limit.map_or_else(|| "none".to_owned(), |limit| limit.to_string()),
        settings.tag,
    );

    let single = run_single_jobs(&options, &settings, &reader, pool_limit, &logs).await?;
    let mut batches = Vec::new();
    for round in 0..options.rounds as usize {
        let mut order = options.modes.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            let label = format!("{} round {}/{}", mode.as_str(), round + 1, options.rounds);
            let log = logs.join(format!("service-{}-round{}.log", mode.as_str(), round + 1));
            let mut batch = run_batch(&options, &settings, mode, round, &label, &log).await?;
            attach_timelines(&reader, &mut batch, pool_limit).await;
            batches.push(batch);
        }
    }

    let mut modes: Vec<ModeReport> = [WaitMode::Events, WaitMode::Poll]
        .into_iter()
        .filter(|mode| options.modes.contains(mode))
        .map(|mode| {
            let own: Vec<&Batch> = batches.iter().filter(|batch| batch.mode == mode).collect();
            ModeReport::from_batches(mode, &own)
        })
        .collect();
    let events = modes.iter().find(|report| report.mode == WaitMode::Events);
    let poll = modes.iter().find(|report| report.mode == WaitMode::Poll);
    let ratios = events.zip(poll).map(|(events, poll)| Ratios::between(events, poll));
    let targets = check_targets(events, ratios.as_ref());
    let single_steps = StepStats::from(&single.breakdowns);

    println!("\nk3s-job-runner load: {}, code {:?}", describe_load(&options), options.code);
    println!(
        "machine: {} ({} cores, {} MiB), load average at start {}\n",
        machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        machine.cores,
        machine.memory_mib.unwrap_or(0),
        machine.load_average_at_start.map_or_else(|| "n/a".to_owned(), |load| format!("{load:.2}")),
    );
    println!("{}", render_table(&modes, ratios.as_ref()));
    let mut columns: Vec<(&str, &StepStats)> = vec![("single", &single_steps)];
    columns.extend(modes.iter().map(|report| (report.mode.as_str(), &report.steps_ms)));
    println!("{}", render_steps(&columns));
    println!("{}", render_targets(&targets));

    let samples = json!(modes
        .iter()
        .map(|report| (
            report.mode.as_str().to_owned(),
            json!({
                "end_to_end_ms": report.end_to_end_samples,
                "completion_ms": report.completion_samples,
            })
        ))
        .collect::<serde_json::Map<_, _>>());
    let report = Report {
        machine: &machine,
        settings: json!({
            "jobs": options.jobs,
            "rounds": options.rounds,
            "code": options.code,
            "poll_interval_ms": options.poll_interval_ms,
            "timeout_seconds": options.timeout_seconds,
            "single_jobs": options.single_jobs,
            "api_url": options.api_url,
            "deployment": options.deployment,
            "pool_concurrency_limit": pool_limit,
            "service": options.service,
            "startup_allowance_seconds": settings.startup_allowance_seconds,
            "service_env": options.service_env,
        }),
        modes: &modes,
        ratios: ratios.as_ref(),
        targets: &targets,
        single_job_steps_ms: &single_steps,
        batches: &batches,
        samples,
    };
    let failures: usize = modes.iter().map(|report| report.failures).sum::<usize>()
        + single.samples.iter().filter(|sample| !sample.ran()).count();
    let all_samples = || single.samples.iter().chain(batches.iter().flat_map(|batch| &batch.samples));
    if let Some(failed) = all_samples().find(|sample| !sample.ran()) {
        eprintln!(
            "load: {failures} jobs failed; the first ended {}: {}",
            failed.status,
            failed.error.as_deref().unwrap_or("no error text")
        );
    }
    if all_samples().all(|sample| !sample.ran()) {
        bail!("every job failed, so no report was written; the service logs are in {}", logs.display());
    }

    let json_path = options.out.join("load.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("report: {}", json_path.display());

    let png_path = options.out.join("load.png");
    // Without a font there is no plot, which a check run tolerates; a drawing error it does not.
    let plotted = match plot::register_font(options.font.as_deref()) {
        Ok(_) => Some(draw_plot(&options, &mut modes, &png_path)),
        Err(error) => {
            eprintln!("load: no plot: {error:#}");
            None
        }
    };
    match &plotted {
        Some(Ok(())) => println!("plot: {}", png_path.display()),
        Some(Err(error)) => eprintln!("load: no plot: {error:#}"),
        None => {}
    }

    if failures > 0 {
        eprintln!("load: {failures} jobs failed; the service logs are in {}", logs.display());
        return Ok(false);
    }
    if check_run {
        return Ok(check_report(&modes, &json_path, !matches!(plotted, Some(Err(_)))));
    }
    Ok(true)
}

/// Checks what a `cargo test` run must show: every job measured, the one websocket, a report.
fn check_report(modes: &[ModeReport], json_path: &Path, plot_ok: bool) -> bool {
    let mut ok = json_path.exists() && plot_ok;
    for report in modes {
        let measured = report.completion_samples.len() == report.jobs;
        if !measured {
            eprintln!(
                "load check: {} mode measured {} of {} jobs",
                report.mode.as_str(),
                report.completion_samples.len(),
                report.jobs
            );
        }
        ok &= measured;
    }
    if let Some(events) = modes.iter().find(|report| report.mode == WaitMode::Events) {
        if events.max_websocket_connections_per_service != 1 {
            eprintln!(
                "load check: events mode made {} websocket connections",
                events.max_websocket_connections_per_service
            );
            ok = false;
        }
    }
    ok
}

fn draw_plot(options: &Options, modes: &mut [ModeReport], path: &Path) -> Result<()> {
    let series = |pick: fn(&ModeReport) -> &Vec<f64>| -> Vec<plot::Series<'_>> {
        modes
            .iter()
            .map(|report| plot::Series {
                label: report.mode.as_str(),
                color: if report.mode == WaitMode::Events { plot::EVENTS_COLOR } else { plot::POLL_COLOR },
                samples: pick(report).clone(),
            })
            .collect()
    };
    let title = format!("k3s-job-runner: {}, {:?}", describe_load(options), options.code);
    plot::draw(
        path,
        &title,
        &series(|report| &report.end_to_end_samples),
        &series(|report| &report.completion_samples),
    )
}

/// Describes the load, as "200 concurrent jobs x 2 rounds".
fn describe_load(options: &Options) -> String {
    let plural =
        |count: u64, word: &str| if count == 1 { format!("1 {word}") } else { format!("{count} {word}s") };
    format!("{} x {}", plural(options.jobs, "concurrent job"), plural(options.rounds, "round"))
}

/// Runs `single_jobs` jobs one after another in events mode, so the breakdown of one job on
/// an idle stack shows which step is slowest.
async fn run_single_jobs(
    options: &Options,
    settings: &ServiceSettings,
    reader: &PrefectReader,
    pool_limit: Option<u64>,
    logs: &Path,
) -> Result<Batch> {
    let service = Service::start(settings, WaitMode::Events, &logs.join("service-single.log")).await?;
    service.wait_until_ready(WaitMode::Events).await?;
    let mut samples = Vec::new();
    for index in 0..options.single_jobs as usize {
        let sample = service.run_job(index, &options.code, options.timeout_seconds).await;
        eprintln!(
            "single job {}/{}: {} in {:.0} ms",
            index + 1,
            options.single_jobs,
            sample.status,
            sample.end_to_end_ms()
        );
        samples.push(sample);
    }
    service.stop().await;
    let mut batch = Batch {
        mode: WaitMode::Events,
        round: 0,
        wall_seconds: 0.0,
        rest_requests: 0,
        rest_retries: 0,
        websocket_connections: 0,
        peak_memory_kib: None,
        samples,
        timelines: Vec::new(),
        breakdowns: Vec::new(),
    };
    attach_timelines(reader, &mut batch, pool_limit).await;
    Ok(batch)
}

/// Runs one batch of concurrent jobs through a fresh service process.
async fn run_batch(
    options: &Options,
    settings: &ServiceSettings,
    mode: WaitMode,
    round: usize,
    label: &str,
    log: &Path,
) -> Result<Batch> {
    let service = Service::start(settings, mode, log).await?;
    let before = service.wait_until_ready(mode).await?;
    let progress = Arc::new(Progress::default());
    let started = Instant::now();
    let ticker =
        tokio::spawn(report_progress(Arc::clone(&progress), label.to_owned(), options.jobs as usize));

    let jobs = (0..options.jobs as usize).map(|index| {
        let service = &service;
        let progress = &progress;
        async move {
            progress.submitted.fetch_add(1, Ordering::Relaxed);
            let sample = service.run_job(index, &options.code, options.timeout_seconds).await;
            let counter = if sample.ran() { &progress.finished } else { &progress.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            sample
        }
    });
    let samples: Vec<JobSample> = futures::future::join_all(jobs).await;
    let wall_seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    eprintln!(
        "{label}: {} jobs in {wall_seconds:.1} s, {} failed",
        samples.len(),
        progress.failed.load(Ordering::Relaxed)
    );

    let after = service.status().await?;
    service.stop().await;
    let count = |status: &serde_json::Value, name: &str| status[name].as_u64().unwrap_or(0);
    Ok(Batch {
        mode,
        round: round + 1,
        wall_seconds,
        rest_requests: count(&after, "rest_requests").saturating_sub(count(&before, "rest_requests")),
        rest_retries: count(&after, "rest_retries").saturating_sub(count(&before, "rest_retries")),
        websocket_connections: after["subscription"]["connections"].as_u64().unwrap_or(0),
        peak_memory_kib: after["peak_memory_kib"].as_u64(),
        samples,
        timelines: Vec::new(),
        breakdowns: Vec::new(),
    })
}

async fn report_progress(progress: Arc<Progress>, label: String, total: usize) {
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        interval.tick().await;
        eprintln!(
            "{label}: submitted {}/{total}, finished {}, failed {}, {:.0} s",
            progress.submitted.load(Ordering::Relaxed),
            progress.finished.load(Ordering::Relaxed),
            progress.failed.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64(),
        );
    }
}

/// Reads every job's state history and cuts its time into steps.
async fn attach_timelines(reader: &PrefectReader, batch: &mut Batch, pool_limit: Option<u64>) {
    let reads = batch.samples.iter().map(|sample| async move {
        let flow_run_id = sample.flow_run_id?;
        match reader.timeline(flow_run_id).await {
            Ok(timeline) => Some(timeline),
            Err(error) => {
                eprintln!("load: reading the states of flow run {flow_run_id} failed: {error:#}");
                None
            }
        }
    });
    let timelines: Vec<Option<Timeline>> = stream::iter(reads).buffered(8).collect().await;
    let slots = slot_free_times(&timelines, pool_limit);
    batch.breakdowns = batch
        .samples
        .iter()
        .zip(&timelines)
        .zip(slots)
        .map(|((sample, timeline), slot)| breakdown(sample, timeline.as_ref(), slot))
        .collect();
    batch.timelines = timelines;
}
