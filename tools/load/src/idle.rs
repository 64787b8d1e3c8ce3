//! `idle`: N connections held open with nothing to deliver; the server's RSS growth per
//! connection (`/proc/PID/status`, after a warm-up), for zonecast or Nchan.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::{Semaphore, watch};

use crate::report::rss_kib;
use crate::server::{Kind, Server, Transport};
use crate::subscribe::{Sub, source, subscribe};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "zonecast")]
    server: Kind,
    #[arg(long, value_parser = crate::loopback)]
    url: url::Url,
    #[arg(long, env = "ZONECAST_KEY", hide_env_values = true, default_value = "")]
    key: String,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    #[arg(long, value_enum, default_value = "sse")]
    transport: Transport,
    #[arg(long, default_value_t = 1)]
    source_addresses: usize,
    /// The server process to measure.
    #[arg(long)]
    server_pid: u32,
    /// How long the connections are held before the RSS is read.
    #[arg(long, default_value = "3s", value_parser = crate::duration)]
    hold: Duration,
    #[arg(long, default_value = "5m", value_parser = crate::duration)]
    timeout: Duration,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

const WARM_UP: usize = 50;

pub async fn run(a: Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + a.timeout;
    let server = Server::new(a.server, &a.url, &a.key)?;
    let topic = Arc::new(server.topic("zonecast-load idle").await?);
    let pid = a.server_pid.to_string();
    let (stop_tx, stop) = watch::channel(false);
    let ready = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(256));
    let base = a.url.as_str().trim_end_matches('/').to_owned();
    let open = |range: std::ops::Range<usize>| {
        range
            .map(|i| {
                let sub = Sub {
                    transport: a.transport,
                    base: base.clone(),
                    from: source(i, a.source_addresses),
                };
                let (topic, ready, stop, gate) =
                    (topic.clone(), ready.clone(), stop.clone(), gate.clone());
                tokio::spawn(async move {
                    let permit = gate.acquire_owned().await;
                    let opened = move || {
                        drop(permit);
                        ready.fetch_add(1, Ordering::Relaxed);
                    };
                    subscribe(topic, sub, u64::MAX, opened, stop).await
                })
            })
            .collect::<Vec<_>>()
    };
    let mut held = open(0..WARM_UP);
    wait_ready(&ready, WARM_UP, &held, deadline).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(&pid).unwrap_or(0);
    held.extend(open(WARM_UP..WARM_UP + a.connections));
    wait_ready(&ready, WARM_UP + a.connections, &held, deadline).await?;
    tokio::time::sleep(a.hold).await;
    let after = rss_kib(&pid).unwrap_or(0);
    if held.iter().any(|h| h.is_finished()) {
        bail!("connections ended while held");
    }
    let per = after.saturating_sub(before) as f64 / a.connections as f64;
    println!(
        "idle: {:?} {:?} — {} connections held: server RSS {:.1} → {:.1} MiB, {per:.1} KiB per connection",
        a.server,
        a.transport,
        a.connections,
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    let _ = stop_tx.send(true);
    for h in held {
        let _ = h.await;
    }
    Ok(())
}

/// Until `n` connections are open; fails at once when one could not open, and at the
/// deadline.
async fn wait_ready<T>(
    ready: &AtomicUsize,
    n: usize,
    held: &[tokio::task::JoinHandle<T>],
    deadline: Instant,
) -> anyhow::Result<()> {
    while ready.load(Ordering::Relaxed) < n {
        if held.iter().any(|h| h.is_finished()) {
            bail!("a connection could not be opened (the server's limits, the open-file limit)");
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} connections opened in time",
                ready.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
