//! Figures: percentiles, and a process's CPU and RSS read from `/proc`.

use std::time::{Duration, Instant};

/// `p` (0..=1) of sorted durations; zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `p50 … max` of `samples` (sorted in place).
pub fn latency_line(samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n = {})",
        ms(percentile(samples, 0.50)),
        ms(percentile(samples, 0.90)),
        ms(percentile(samples, 0.99)),
        ms(percentile(samples, 0.999)),
        ms(samples.last().copied().unwrap_or_default()),
        samples.len()
    )
}

/// CPU seconds (user + system) used by `pid` so far (`self` for this process).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU use of a set of processes over a window.
pub struct CpuWindow {
    pids: Vec<String>,
    start: Instant,
    before: Vec<f64>,
}

impl CpuWindow {
    pub fn start(pids: &[u32]) -> CpuWindow {
        let mut pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        pids.push("self".into());
        let before = pids.iter().map(|p| cpu_seconds(p).unwrap_or(0.0)).collect();
        CpuWindow {
            pids,
            start: Instant::now(),
            before,
        }
    }

    /// Cores used by each process since `start` (the last one is this process).
    pub fn cores(&self) -> Vec<(String, f64)> {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        self.pids
            .iter()
            .zip(&self.before)
            .map(|(p, b)| (p.clone(), (cpu_seconds(p).unwrap_or(*b) - b) / secs))
            .collect()
    }
}

/// Prints the CPU lines, and says when the load generator itself was the bottleneck.
pub fn print_cpu(window: &CpuWindow, threads: usize, deliveries: u64) {
    for (pid, cores) in window.cores() {
        if pid == "self" {
            println!("load generator CPU: {:.2} cores", cores);
            if cores > 0.9 * threads as f64 {
                println!(
                    "WARNING: the load generator was saturated ({cores:.2} of {threads} threads): \
                     these figures may be its limit, not the server's"
                );
            }
        } else {
            let rss = rss_kib(&pid).map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
            let per = if deliveries > 0 {
                format!(
                    ", {:.2} µs CPU per delivery",
                    cores * window.start.elapsed().as_secs_f64() * 1e6 / deliveries as f64
                )
            } else {
                String::new()
            };
            println!("server {pid}: {cores:.2} cores, RSS {rss}{per}");
        }
    }
}
