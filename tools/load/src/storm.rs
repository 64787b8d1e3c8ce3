//! `storm`: N SSE clients, each the same number of events behind, reconnect at once
//! (`Last-Event-ID`); the time until every one has caught up, and how many times the
//! server read its log meanwhile (`zonecast_log_reads_total`). zonecast only: Nchan's
//! resume ids are its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::watch;

use crate::report::{CpuWindow, latency_line, print_cpu};
use crate::server::{Kind, Server, Transport};
use crate::subscribe::{Arrivals, Sub, Table, source, subscribe, within_bounds};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_parser = crate::loopback)]
    url: url::Url,
    #[arg(long, env = "ZONECAST_KEY", hide_env_values = true)]
    key: String,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Events each client is behind.
    #[arg(long, default_value_t = 100)]
    behind: usize,
    #[arg(long, default_value_t = 1)]
    source_addresses: usize,
    #[arg(long)]
    server_pid: Vec<u32>,
    #[arg(long, default_value = "2m", value_parser = crate::duration)]
    timeout: Duration,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    within_bounds(
        a.timeout,
        a.clients.saturating_mul(a.behind),
        "--clients × --behind",
    )?;
    let server = Server::new(Kind::Zonecast, &a.url, &a.key)?;
    let topic = server.topic("zonecast-load storm").await?;
    for n in 0..a.behind {
        server.publish(&topic, n as u64).await?;
    }
    let last = topic.start + a.behind as u64;
    let topic = Arc::new(topic);
    let reads_before = server.metric("zonecast_log_reads_total", "").await?;
    let (_stop_tx, stop) = watch::channel(false);
    let base = a.url.as_str().trim_end_matches('/').to_owned();
    println!(
        "storm: {} SSE clients, each {} events behind, reconnect at once",
        a.clients, a.behind
    );
    let table = Table::new(topic.start, last, a.clients);
    let cpu = CpuWindow::start(&a.server_pid);
    let began = Instant::now();
    let clients: Vec<_> = (0..a.clients)
        .map(|i| {
            let sub = Sub {
                transport: Transport::Sse,
                base: base.clone(),
                from: source(i, a.source_addresses),
            };
            let out = Arrivals::new(&table, i);
            tokio::spawn(subscribe(
                topic.clone(),
                sub,
                out,
                last,
                || {},
                stop.clone(),
            ))
        })
        .collect();
    let mut caught_up = Vec::with_capacity(clients.len());
    let (mut missing, mut dup, mut disorder, mut failed) = (0, 0, 0, 0);
    for c in clients {
        let left = (began + a.timeout).saturating_duration_since(Instant::now());
        let Ok(r) = tokio::time::timeout(left, c).await else {
            bail!("clients had not caught up after --timeout");
        };
        match r? {
            Some(arrivals) => {
                let (m, d, o) = arrivals.check();
                (missing, dup, disorder) = (missing + m, dup + d, disorder + o);
                if let Some(read) = arrivals.last_read() {
                    caught_up.push(read.duration_since(began));
                }
            }
            None => failed += 1,
        }
    }
    let cpu = cpu.end();
    let all = caught_up.iter().max().copied().unwrap_or_default();
    let reads = server.metric("zonecast_log_reads_total", "").await? - reads_before;
    println!(
        "all {} caught up after {:.2} s; failed to connect {failed}; missing {missing}, duplicated {dup}, out of order {disorder}",
        caught_up.len(),
        all.as_secs_f64()
    );
    println!("caught up: {}", latency_line(&mut caught_up));
    println!("log reads during the storm: {reads}");
    print_cpu(&cpu, a.threads, (a.clients * a.behind) as u64);
    if missing + dup + disorder + failed > 0 {
        bail!("clients saw a wrong sequence");
    }
    Ok(())
}
