//! Figures: percentiles, and a process's CPU and RSS (and its cores', if pinned) read
//! from `/proc`.

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
///
/// Kernel work done on the process's core outside its context is not in it: softirqs
/// run by `ksoftirqd` or on an interrupt that found the core idle (on loopback, part
/// of the receiving side of what the process sent). `CoreTicks` counts that too.
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

/// A set of cores' time from `/proc/stat`, in ticks: all of it, the part they were
/// busy (anything but idle, iowait and steal), and of that, interrupts and softirqs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct CoreTicks {
    total: u64,
    busy: u64,
    irq: u64,
}

impl CoreTicks {
    /// The ticks of `cores` in `stat` (the text of `/proc/stat`); `None` if a core is
    /// missing.
    fn of(stat: &str, cores: &[usize]) -> Option<CoreTicks> {
        let mut sum = CoreTicks::default();
        for &c in cores {
            let name = format!("cpu{c}");
            let line = stat
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
            // user nice system idle iowait irq softirq steal (guest time is in user).
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(8)
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            let [user, nice, system, idle, iowait, irq, softirq, steal] = f[..] else {
                return None;
            };
            let busy = user + nice + system + irq + softirq;
            sum.busy += busy;
            sum.irq += irq + softirq;
            sum.total += busy + idle + iowait + steal;
        }
        Some(sum)
    }

    fn now(cores: &[usize]) -> Option<CoreTicks> {
        CoreTicks::of(&std::fs::read_to_string("/proc/stat").ok()?, cores)
    }
}

/// `0-2,5` → `[0, 1, 2, 5]`.
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        if b < a || b - a > 4096 {
            return None;
        }
        out.extend(a..=b);
    }
    (!out.is_empty()).then_some(out)
}

/// The cores `pid` is pinned to (`taskset`), if fewer than all of them.
fn pinned_cores(pid: &str) -> Option<Vec<usize>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .and_then(parse_cpu_list)?;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(&s))?;
    (allowed.len() < online.len()).then_some(allowed)
}

/// One process watched over a window: its CPU, and its cores' if it is pinned.
struct Watched {
    pid: String,
    cpu: f64,
    cores: Option<(Vec<usize>, CoreTicks)>,
}

/// CPU use of a set of processes over a window.
pub struct CpuWindow {
    /// The servers, then this process.
    watched: Vec<Watched>,
    start: Instant,
}

/// What one process used over a window.
struct Used {
    pid: String,
    /// Cores' worth of its own CPU time.
    cores: f64,
    /// Its resident memory at the window's end, in KiB.
    rss: Option<u64>,
    /// Its cores', if it is pinned apart from the tool.
    pinned: Option<Pinned>,
}

/// A window's figures, taken when it ended: the measured phase only, not the report
/// that follows it (sorting tens of millions of latencies takes seconds, with the
/// server idle, and would dilute its busy share).
pub struct CpuUsed {
    secs: f64,
    /// The servers, then this process.
    used: Vec<Used>,
}

/// The cores a process is pinned to, over a window: how busy they were, summed (1.0
/// = one core all the time), with everything that ran there, and of that how much was
/// interrupts and softirqs.
struct Pinned {
    cores: Vec<usize>,
    busy: f64,
    irq: f64,
}

impl CpuWindow {
    pub fn start(pids: &[u32]) -> CpuWindow {
        let mut pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        pids.push("self".into());
        let watched = pids
            .into_iter()
            .map(|pid| Watched {
                cpu: cpu_seconds(&pid).unwrap_or(0.0),
                cores: pinned_cores(&pid).and_then(|c| Some((c.clone(), CoreTicks::now(&c)?))),
                pid,
            })
            .collect();
        CpuWindow {
            watched,
            start: Instant::now(),
        }
    }

    /// Ends the window: what each process used since `start`.
    pub fn end(self) -> CpuUsed {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let own = self.watched.last().and_then(|w| w.cores.as_ref());
        let used =
            self.watched
                .iter()
                .map(|w| {
                    let shares_with_tool = w.pid != "self"
                        && own.is_some_and(|(mine, _)| {
                            w.cores
                                .as_ref()
                                .is_some_and(|(c, _)| c.iter().any(|x| mine.contains(x)))
                        });
                    let pinned = w.cores.as_ref().filter(|_| !shares_with_tool).and_then(
                        |(cores, before)| {
                            let now = CoreTicks::now(cores)?;
                            let total = now.total.checked_sub(before.total)?.max(1) as f64;
                            let n = cores.len() as f64;
                            Some(Pinned {
                                cores: cores.clone(),
                                busy: now.busy.checked_sub(before.busy)? as f64 / total * n,
                                irq: now.irq.checked_sub(before.irq)? as f64 / total * n,
                            })
                        },
                    );
                    Used {
                        cores: (cpu_seconds(&w.pid).unwrap_or(w.cpu) - w.cpu) / secs,
                        rss: rss_kib(&w.pid),
                        pid: w.pid.clone(),
                        pinned,
                    }
                })
                .collect();
        CpuUsed { secs, used }
    }
}

fn core_names(cores: &[usize]) -> String {
    let names: Vec<String> = cores.iter().map(usize::to_string).collect();
    format!(
        "{} {}",
        if cores.len() == 1 { "core" } else { "cores" },
        names.join(",")
    )
}

/// Prints the CPU lines, and says when the load generator itself was the bottleneck.
///
/// A process pinned to cores of its own (as the benchmarks run it) also gets those
/// cores' busy share: everything that ran there, the kernel's work on its behalf that
/// `/proc/PID/stat` leaves out included. For the tool, that is what says whether its
/// core had anything left. Returns whether the tool was saturated.
pub fn print_cpu(window: &CpuUsed, threads: usize, deliveries: u64) -> bool {
    let mut any_saturated = false;
    let secs = window.secs;
    // ", 1.23 µs CPU per delivery", `what` being "CPU" or the cores' time.
    let per = |cores: f64, what: &str| {
        if deliveries > 0 {
            format!(
                ", {:.2} µs {what} per delivery",
                cores * secs * 1e6 / deliveries as f64
            )
        } else {
            String::new()
        }
    };
    let pinned_line = |p: &Pinned, with_per: bool| {
        format!(
            "  its {} (pinned; everything that ran there): {:.2} busy, softirq and irq {:.2}{}",
            core_names(&p.cores),
            p.busy,
            p.irq,
            if with_per {
                per(p.busy, "busy")
            } else {
                String::new()
            }
        )
    };
    for u in &window.used {
        if u.pid == "self" {
            println!("load generator CPU: {:.2} cores", u.cores);
            let mut saturated = u.cores > 0.9 * threads as f64;
            if let Some(p) = &u.pinned {
                println!("{}", pinned_line(p, false));
                saturated |= p.busy > 0.9 * p.cores.len() as f64;
            }
            any_saturated |= saturated;
            if saturated {
                println!(
                    "WARNING: the load generator was saturated ({:.2} of {threads} threads{}): \
                     these figures may be its limit, not the server's",
                    u.cores,
                    u.pinned.as_ref().map_or(String::new(), |p| format!(
                        "; its {} {:.2} busy",
                        core_names(&p.cores),
                        p.busy
                    ))
                );
            }
        } else {
            let rss = u
                .rss
                .map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
            let per_cpu = per(u.cores, "CPU");
            println!("server {}: {:.2} cores, RSS {rss}{per_cpu}", u.pid, u.cores);
            if let Some(p) = &u.pinned {
                println!("{}", pinned_line(p, true));
            }
        }
    }
    any_saturated
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_read_as_taskset_writes_them() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_cpu_list("1,3-4"), Some(vec![1, 3, 4]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn a_cores_busy_time_counts_softirqs_and_not_idle_or_steal() {
        let stat = "cpu  9 9 9 9 9 9 9 9 0 0\n\
                    cpu0 10 1 20 100 5 2 30 7 4 0\n\
                    cpu1 1 0 1 50 0 0 0 0 0 0\n\
                    intr 12345\n";
        let c0 = CoreTicks::of(stat, &[0]).expect("cpu0");
        assert_eq!(
            c0,
            CoreTicks {
                busy: 10 + 1 + 20 + 2 + 30,
                irq: 2 + 30,
                total: 10 + 1 + 20 + 100 + 5 + 2 + 30 + 7,
            }
        );
        let both = CoreTicks::of(stat, &[0, 1]).expect("both");
        assert_eq!(both.busy, c0.busy + 2);
        assert_eq!(both.total, c0.total + 52);
        // "cpu" (all cores) is not core 0, and a core that is not there is no figure.
        assert_eq!(CoreTicks::of(stat, &[2]), None);
    }

    /// A window's figures are those of its measured phase: what the process does after
    /// `end` (the report's own sorting) is not in them.
    #[test]
    fn a_window_counts_until_it_ends() {
        let window = CpuWindow::start(&[]);
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let ended = window.end();
        let after = Instant::now();
        while after.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let own = ended.used.last().expect("this process");
        assert_eq!(own.pid, "self");
        assert!(ended.secs < 0.5, "window of {:.2} s", ended.secs);
        // 10 ms ticks: a 300 ms spin reads as most of a core.
        assert!(own.cores > 0.5, "{:.2} cores while spinning", own.cores);
    }

    /// A thread spinning on this process's core shows on that core's busy share, as
    /// read from the real `/proc/stat`.
    #[test]
    fn a_busy_core_reads_as_busy() {
        let Some(core) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .and_then(parse_cpu_list)
            })
        else {
            panic!("no Cpus_allowed_list in /proc/self/status");
        };
        let before = CoreTicks::now(&core).expect("/proc/stat");
        let spin = Instant::now();
        let mut x = 0u64;
        // Every allowed core: one spinner each, for 300 ms.
        std::thread::scope(|s| {
            for _ in &core {
                s.spawn(|| {
                    let mut y = 0u64;
                    while spin.elapsed() < Duration::from_millis(300) {
                        y = std::hint::black_box(y.wrapping_add(1));
                    }
                    y
                });
            }
            while spin.elapsed() < Duration::from_millis(300) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
        let after = CoreTicks::now(&core).expect("/proc/stat");
        let share = (after.busy - before.busy) as f64 / (after.total - before.total).max(1) as f64;
        assert!(share > 0.5, "busy share {share:.2} while spinning");
    }
}
