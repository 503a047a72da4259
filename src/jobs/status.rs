//! Snapshot of the service that the `runner_status` tool returns.

use serde::Serialize;

use crate::config::WaitMode;
use crate::events::SubscriptionStatus;

/// Runner state that an operator needs to see.
#[derive(Debug, Clone, Serialize)]
pub struct RunnerStatus {
    pub api_url: String,
    pub deployment: String,
    pub wait_mode: WaitMode,
    /// The events websocket's state; `None` in `poll` mode, which opens no websocket.
    pub subscription: Option<SubscriptionStatus>,
    /// Jobs currently waiting for their flow run to finish.
    pub waiting_runs: usize,
    /// REST requests sent to Prefect since start-up, retries included.
    pub rest_requests: u64,
    /// Of those, retries of failed requests (mostly HTTP 503 while SQLite is busy).
    pub rest_retries: u64,
    /// Peak resident memory of the service process (`VmHWM`), in KiB; `None` without `/proc`.
    pub peak_memory_kib: Option<u64>,
}

/// Reads the process's peak resident set size (`VmHWM`) from `/proc/self/status`.
pub fn peak_memory_kib() -> Option<u64> {
    read_own_status_kib("VmHWM")
}

/// Reads the process's current resident set size (`VmRSS`) from `/proc/self/status`.
pub fn resident_memory_kib() -> Option<u64> {
    read_own_status_kib("VmRSS")
}

fn read_own_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&status, field)
}

/// Parses a `NAME:   1234 kB` line of a `/proc/<pid>/status` file.
fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?;
    value.trim().strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\tk3s-job-runner\nVmPeak:\t  123456 kB\nVmHWM:\t    8412 kB\nVmRSS:\t 8000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(8412));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(8000));
    }

    #[test]
    fn missing_vm_hwm_gives_none() {
        assert_eq!(parse_status_kib("Name:\tx\nVmRSS:\t 8000 kB\n", "VmHWM"), None);
    }

    #[test]
    fn own_peak_memory_is_positive() {
        assert!(peak_memory_kib().is_some_and(|kib| kib > 0));
    }

    #[test]
    fn own_resident_memory_is_positive() {
        assert!(resident_memory_kib().is_some_and(|kib| kib > 0));
    }
}
