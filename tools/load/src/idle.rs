//! `idle`: N connections held open with nothing to deliver; the server's RSS growth per
//! connection (`/proc/PID/status`, after a warm-up), for zonecast or Nchan.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::watch;

use crate::report::rss_kib;
use crate::server::{Kind, Server, Transport};
use crate::subscribe::{Arrivals, Opening, Sub, Table, source};

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
    let mut opening = Opening::new(256, stop);
    // Nothing in particular is expected: what arrives is only counted.
    let table = Table::new(topic.start, u64::MAX, 1);
    let base = a.url.as_str().trim_end_matches('/').to_owned();
    let open = |opening: &mut Opening, range: std::ops::Range<usize>| {
        for i in range {
            let sub = Sub {
                transport: a.transport,
                base: base.clone(),
                from: source(i, a.source_addresses),
            };
            opening.spawn(&topic, sub, Arrivals::new(&table, 0), u64::MAX);
        }
    };
    open(&mut opening, 0..WARM_UP);
    opening.wait(WARM_UP, deadline).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(&pid).unwrap_or(0);
    open(&mut opening, WARM_UP..WARM_UP + a.connections);
    opening.wait(WARM_UP + a.connections, deadline).await?;
    tokio::time::sleep(a.hold).await;
    let after = rss_kib(&pid).unwrap_or(0);
    let held = opening.tasks;
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
