//! Facts about the machine a run was measured on, for the report.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: Option<String>,
    pub cores: usize,
    pub memory_mib: Option<u64>,
    pub kernel: Option<String>,
    /// One-minute load average when the run started; a busy machine slows every step.
    pub load_average_at_start: Option<f64>,
    /// Commit of the checkout the service was built from.
    pub commit: Option<String>,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu_model: cpuinfo
                .lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned()),
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_mib: meminfo
                .lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kib| kib.trim().parse::<u64>().ok())
                .map(|kib| kib / 1024),
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            load_average_at_start: read_trimmed("/proc/loadavg")
                .and_then(|text| text.split_whitespace().next().and_then(|value| value.parse().ok())),
            commit: git_commit(),
        }
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|text| text.trim().to_owned())
}

fn git_commit() -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
