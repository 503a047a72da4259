use std::process::ExitCode;

use clap::Parser;
use k3s_job_runner::cli::Cli;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr: in `serve` mode stdout carries the MCP protocol.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(cli.default_log_filter())),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match cli.execute().await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("k3s-job-runner: {error:#}");
            ExitCode::FAILURE
        }
    }
}
