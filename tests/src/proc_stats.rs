//! A process's memory and CPU as Linux reports them in `/proc`, for the benchmarks' figures.

/// A `kB` field (`VmRSS:`, `VmHWM:`, …) of `/proc/<pid>/status` (`None` for `pid`: this process).
pub fn status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// This process's resident memory now.
pub fn rss_kib() -> Option<u64> {
    status_kib(None, "VmRSS:")
}

/// This process's peak resident memory (since start or the last [`reset_peak_rss`]).
pub fn peak_rss_kib() -> Option<u64> {
    status_kib(None, "VmHWM:")
}

/// Resets this process's peak to its current resident memory (`clear_refs` 5); `false` where
/// the kernel does not allow it (the peak then counts from the start).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU seconds this process has used (user + system; `/proc/self/stat`, 100 ticks a second).
pub fn cpu_seconds() -> Option<f64> {
    stat_cpu_seconds("self")
}

/// CPU seconds (user + system) process `pid` has used; `None` if it is gone or not on this
/// machine.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&pid.to_string())
}

fn stat_cpu_seconds(process: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat")).ok()?;
    // After the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
