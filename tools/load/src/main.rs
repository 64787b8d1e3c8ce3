//! `zonecast-load`: drives zonecast (or another SSE/WebSocket server) over real
//! connections and reports what clients see: deliveries/s, publish→receive latency,
//! missing / duplicated / out-of-order events per subscriber, write rates, and the
//! server's CPU and RSS from `/proc` (`--server-pid`).
//!
//! Every loop is bounded in count and time, and only loopback addresses are accepted:
//! this is a benchmark tool, not a way to load someone else's server.

mod fanout;
mod floor;
mod idle;
mod report;
mod server;
mod sse;
mod stamp;
mod storm;
mod subscribe;
mod writes;
mod wsread;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "zonecast-load", version, about = "Load generator for zonecast")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// N subscribers on one zone, changes published at a rate or back to back.
    Fanout(fanout::Args),
    /// Concurrent writers, each changing its own item: changes/s and latency.
    Writes(writes::Args),
    /// N idle connections held: the server's RSS per connection.
    Idle(idle::Args),
    /// N SSE clients, each some events behind, reconnect at once: time to catch up,
    /// and the log reads it cost.
    Storm(storm::Args),
    /// A minimal server for `fanout --server nchan`: one write per delivery and
    /// nothing else, so its CPU per delivery is the floor any server pays here.
    Floor(floor::Args),
}

/// A duration flag: `20s`, `500ms`, `2m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number and ms, s or m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: use ms, s or m")),
    }
}

/// Refuses anything but a loopback address.
pub fn loopback(raw: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(raw).map_err(|e| format!("{raw:?}: {e}"))?;
    let ok = match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    if ok {
        Ok(u)
    } else {
        Err(format!(
            "{raw}: only loopback addresses (127.0.0.0/8, ::1, localhost)"
        ))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.mode {
        Mode::Fanout(a) => a.threads,
        Mode::Writes(a) => a.threads,
        Mode::Idle(a) => a.threads,
        Mode::Storm(a) => a.threads,
        // Threads of its own, no runtime: nothing between a publish and its writes.
        Mode::Floor(_) => 0,
    };
    if let Mode::Floor(a) = cli.mode {
        return floor::run(a);
    }
    // One thread: everything on the thread that runs `main`. A one-worker
    // multi-threaded runtime adds a second thread (the one blocked in `block_on`) and
    // its work-stealing queues, and the tool's core is what a fan-out run must spare.
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async {
        match cli.mode {
            Mode::Fanout(a) => fanout::run(a).await,
            Mode::Writes(a) => writes::run(a).await,
            Mode::Idle(a) => idle::run(a).await,
            Mode::Storm(a) => storm::run(a).await,
            Mode::Floor(_) => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.0.0.2/",
            "http://localhost:1",
            "http://[::1]:8080",
        ] {
            assert!(loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1",
            "http://example.com",
            "http://0.0.0.0:80",
            "not a url",
        ] {
            assert!(loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("2h").is_err() && duration("s").is_err());
    }
}
