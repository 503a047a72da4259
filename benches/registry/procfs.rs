//! Readings from Linux's `/proc`: resident set size and thread CPU time. Each returns `None`
//! where the file or field is missing, so the bench still runs elsewhere.

use std::time::Duration;

/// Reads the process's resident set size (`VmRSS` in `/proc/self/status`) in bytes, or
/// `None` where that file does not exist or has no such line.
pub fn resident_set_bytes() -> Option<u64> {
    k3s_job_runner::jobs::resident_memory_kib().map(|kib| kib * 1024)
}

/// Reads the CPU time the calling thread has run for, from the first field of
/// `/proc/thread-self/schedstat` (nanoseconds on the CPU).
pub fn thread_cpu_time() -> Option<Duration> {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = schedstat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}
