//! `fanout`: subscribers on one stream (SSE or WebSocket, spread over one or more nodes
//! and source addresses), changes published at a rate or back to back, over REST or
//! WebSocket. Latency is from the publish leaving the tool to a subscriber holding the
//! bytes of the event ("receive": when the tool read them), and to the bytes reaching
//! the subscriber's socket ("socket": the kernel's receive stamp, which the tool's own
//! backlog does not delay).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Mutex, watch};

use crate::report::{CpuWindow, latency_line, print_cpu};
use crate::server::{Kind, Publishers, Server, Transport, WsPublisher};
use crate::subscribe::{Arrivals, Opening, Sub, Table, source, within_bounds};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_enum, default_value = "zonecast")]
    server: Kind,
    /// Where changes are made.
    #[arg(long, value_parser = crate::loopback)]
    publish: url::Url,
    /// Where subscribers connect, round-robin (comma-separated). Default: --publish.
    #[arg(long, value_parser = crate::loopback, value_delimiter = ',')]
    subscribe: Vec<url::Url>,
    /// zonecast: an admin key (it creates a zone and changes its item).
    #[arg(long, env = "ZONECAST_KEY", hide_env_values = true, default_value = "")]
    key: String,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, value_enum, default_value = "sse")]
    transport: Transport,
    /// Changes to publish.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Changes per second; 0 = back to back (`--in-flight` at a time).
    #[arg(long, default_value_t = 80)]
    rate: u32,
    /// Changes in flight at once when back to back.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// `rest` or `ws` (zonecast `update_quantity`, Nchan `/pubsub`).
    #[arg(long, default_value = "rest", value_parser = ["rest", "ws"])]
    publish_via: String,
    /// Subscribers connect from this many addresses, 127.0.0.1 upwards (per-address
    /// connection caps).
    #[arg(long, default_value_t = 1)]
    source_addresses: usize,
    /// Subscribers connecting at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// The whole run, connecting included, must end within this.
    #[arg(long, default_value = "5m", value_parser = crate::duration)]
    timeout: Duration,
    /// Server processes whose CPU and RSS to report (repeatable).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Nchan: pad each message to this many bytes. The default is about the size of
    /// the event zonecast sends for each change here (its `stock_updated` JSON), so
    /// that both servers deliver as many bytes; 0 sends a bare `{"seq":N}`.
    #[arg(long, default_value_t = 260)]
    nchan_message_bytes: usize,
    /// How subscribers acknowledge what they read: `prompt` (a Linux client's way,
    /// about an ACK per delivery) or `delayed` (Windows' and macOS's way). Delayed ACKs
    /// halve the tool's own work per read, and show what a server that waits for ACKs
    /// before it sends more (Nagle's algorithm) costs its subscribers.
    #[arg(long, value_enum, default_value = "prompt")]
    acks: crate::stamp::Acks,
    /// Worker threads of the tool itself.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    within_bounds(
        a.timeout,
        a.subscribers.saturating_mul(a.changes),
        "--subscribers × --changes",
    )?;
    let deadline = Instant::now() + a.timeout;
    crate::stamp::set_acks(a.acks);
    if a.server == Kind::Zonecast && a.key.is_empty() {
        bail!("--key (or ZONECAST_KEY): an admin key of the zonecast server");
    }
    let mut publisher = Server::new(a.server, &a.publish, &a.key)?;
    publisher.message_bytes = a.nchan_message_bytes;
    let subscribe_at = if a.subscribe.is_empty() {
        vec![a.publish.clone()]
    } else {
        a.subscribe.clone()
    };
    let topic = Arc::new(publisher.topic("zonecast-load fanout").await?);
    let (start, last) = (topic.start, topic.start + a.changes as u64);
    println!(
        "fanout: {:?} — {} {:?} subscribers via {} node(s) from {} address(es), {} changes at {} over {}, {} ACKs",
        a.server,
        a.subscribers,
        a.transport,
        subscribe_at.len(),
        a.source_addresses,
        a.changes,
        if a.rate == 0 {
            format!("full speed ({} in flight)", a.in_flight)
        } else {
            format!("{}/s", a.rate)
        },
        a.publish_via,
        // The flag's own spelling.
        clap::ValueEnum::to_possible_value(&a.acks)
            .map_or_else(String::new, |v| v.get_name().to_owned())
    );
    if a.server == Kind::Nchan && (a.rate > 0 || a.in_flight > 1) {
        println!(
            "note: Nchan messages carry the tool's numbering; publishes that overlap (at a rate when \
             the server is slower than the rate, or several in flight) may reach it, and so be \
             counted, out of order"
        );
    }

    // Subscribers, positioned after `start`; ready once their stream is open.
    let (stop_tx, stop) = watch::channel(false);
    // At most `--connect-concurrency` connecting at once.
    let mut opening = Opening::new(a.connect_concurrency, stop);
    let table = Table::new(start, last, a.subscribers);
    for i in 0..a.subscribers {
        let sub = Sub {
            transport: a.transport,
            base: subscribe_at[i % subscribe_at.len()]
                .as_str()
                .trim_end_matches('/')
                .to_owned(),
            from: source(i, a.source_addresses),
        };
        opening.spawn(&topic, sub, Arrivals::new(&table, i), last);
    }
    opening.wait(a.subscribers, deadline).await?;
    let subs = opening.tasks;
    println!("{} subscribers connected", a.subscribers);

    // Publish.
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let cpu = CpuWindow::start(&a.server_pid);
    let began = Instant::now();
    let numbered = Arc::new(AtomicU64::new(0));
    let publishers = if a.rate > 0 { 1 } else { a.in_flight.max(1) };
    let publishing = {
        let (sent, publisher, topic) = (sent.clone(), publisher.clone(), topic.clone());
        async move {
            let mut tasks = Vec::new();
            let tick = (a.rate > 0).then(|| Duration::from_secs_f64(1.0 / a.rate as f64));
            let per = a.changes.div_ceil(publishers);
            let pool = Arc::new(Publishers::new(publisher.clone(), topic.clone()));
            for p in 0..publishers {
                let count = per.min(a.changes.saturating_sub(p * per));
                let (server, topic, sent, numbered, pool) = (
                    publisher.clone(),
                    topic.clone(),
                    sent.clone(),
                    numbered.clone(),
                    pool.clone(),
                );
                let via_ws = a.publish_via == "ws";
                tasks.push(tokio::spawn(async move {
                    let mut ws = if via_ws {
                        Some(WsPublisher::connect(&server, &topic).await?)
                    } else {
                        None
                    };
                    let mut interval = tick.map(|t| {
                        let mut i = tokio::time::interval(t);
                        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                        i
                    });
                    let mut pending = Vec::new();
                    for _ in 0..count {
                        if let Some(i) = &mut interval {
                            i.tick().await;
                        }
                        let n = numbered.fetch_add(1, Ordering::Relaxed) + 1;
                        let at = Instant::now();
                        match &mut ws {
                            Some(ws) => {
                                let seq = ws.publish(n).await?;
                                sent.lock().await.insert(seq, at);
                            }
                            // At a rate, each change is its own request so a slow answer does
                            // not delay the next change.
                            None if interval.is_some() => {
                                let (pool, sent) = (pool.clone(), sent.clone());
                                pending.push(tokio::spawn(async move {
                                    let (seq, written) = pool.publish(n).await?;
                                    sent.lock().await.insert(seq, written);
                                    anyhow::Ok(())
                                }));
                            }
                            // Back to back over REST: written in this task's own turn, on
                            // a connection of the pool it alone uses while it waits.
                            None => {
                                let (seq, written) = pool.publish(n).await?;
                                sent.lock().await.insert(seq, written);
                            }
                        }
                    }
                    for p in pending {
                        p.await??;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        }
    };
    on_a_thread_of_its_own("publish", publishing)?.await?;
    let published = began.elapsed();

    // Collect.
    // Past the deadline, subscribers are told to stop and hand in what they have, so
    // what never arrived is counted as missing rather than hidden behind a timeout.
    let mut all: Vec<Arrivals> = Vec::with_capacity(subs.len());
    let mut timed_out = false;
    for (i, mut s) in subs.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = match tokio::time::timeout(left, &mut s).await {
            Ok(r) => r,
            Err(_) => {
                timed_out = true;
                let _ = stop_tx.send(true);
                tokio::time::timeout(Duration::from_secs(5), s)
                    .await
                    .context("a subscriber did not stop")?
            }
        };
        all.push(
            r.context("subscriber task")?
                .unwrap_or_else(|| Arrivals::new(&table, i)),
        );
    }
    // The measured phase is over: what follows is the tool's own bookkeeping.
    let cpu = cpu.end();
    if timed_out {
        println!("--timeout reached: subscribers stopped; what had not arrived counts as missing");
    }
    let received = all
        .iter()
        .filter_map(Arrivals::last_read)
        .max()
        .unwrap_or(began);
    let elapsed = received.duration_since(began);

    let sent = sent.lock().await;
    let (mut missing, mut dup, mut disorder) = (0u64, 0u64, 0u64);
    let mut lat = Vec::with_capacity(all.len() * a.changes);
    let mut lat_kernel = Vec::with_capacity(all.len() * a.changes);
    // Each change's first and last delivery (socket time), by seq: how long one
    // change took to reach every subscriber.
    let mut spread = vec![(Duration::MAX, Duration::ZERO); a.changes];
    for arrivals in &all {
        let (m, d, o) = arrivals.check();
        (missing, dup, disorder) = (missing + m, dup + d, disorder + o);
        for (seq, read, kernel) in arrivals.each() {
            if let Some(s) = sent.get(&seq) {
                let k = kernel.saturating_duration_since(*s);
                lat.push(read.saturating_duration_since(*s));
                lat_kernel.push(k);
                let slot = seq
                    .checked_sub(start + 1)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| spread.get_mut(i));
                if let Some((first, last)) = slot {
                    (*first, *last) = ((*first).min(k), (*last).max(k));
                }
            }
        }
    }
    let (mut first, mut last): (Vec<Duration>, Vec<Duration>) = spread
        .into_iter()
        .filter(|(first, _)| *first != Duration::MAX)
        .unzip();
    let deliveries = lat.len() as u64;
    println!(
        "published {} changes in {:.2} s ({:.0}/s); last delivery after {:.2} s",
        a.changes,
        published.as_secs_f64(),
        a.changes as f64 / published.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "deliveries: {deliveries} ({:.0}/s); missing {missing}, duplicated {dup}, out of order {disorder}",
        deliveries as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    println!("publish → receive: {}", latency_line(&mut lat));
    // The same deliveries, timed by when they reached the subscriber's socket: the
    // server's part, without the tool's own queue (see `stamp`).
    println!("publish → socket:  {}", latency_line(&mut lat_kernel));
    // Nchan answers a publish once it has written it to every subscriber; zonecast
    // answers first and fans out after. Per change, the two ends of that fan-out.
    println!("per change, its first socket: {}", latency_line(&mut first));
    println!("per change, its last socket:  {}", latency_line(&mut last));
    let (reads, unstamped) = crate::stamp::reads();
    if unstamped > 0 {
        println!(
            "  {unstamped} of {reads} reads came without the kernel's stamp: counted at their read time"
        );
    }
    if print_cpu(&cpu, a.threads, deliveries) && reads > unstamped {
        println!(
            "  the tool's own queue is in \"publish → receive\"; \"publish → socket\" is stamped \
             by the kernel as the bytes reach the subscriber's socket, and is the server's figure"
        );
    }
    if missing + dup + disorder > 0 {
        bail!("subscribers saw a wrong sequence");
    }
    Ok(())
}

/// Runs `work` on a new thread with a runtime of its own, started now; what it
/// returned, once it has. The publishers run so: on the subscribers' thread a publish
/// waited its turn behind thousands of reads, and a busy tool published back to back
/// more slowly than the server answered (10,000 subscribers: 29–30 changes/s where
/// the server took 43–44).
fn on_a_thread_of_its_own(
    name: &str,
    work: impl Future<Output = anyhow::Result<()>> + Send + 'static,
) -> anyhow::Result<impl Future<Output = anyhow::Result<()>>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let done = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(work));
            let _ = done_tx.send(done);
        })?;
    let name = name.to_owned();
    Ok(async move {
        done_rx
            .await
            .with_context(|| format!("the {name} thread ended without an answer"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The work runs while the thread that started it is busy and never yields.
    #[test]
    fn work_on_its_own_thread_runs_while_the_starting_thread_is_busy() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (ran_tx, ran_rx) = std::sync::mpsc::channel();
            let done = on_a_thread_of_its_own("test", async move {
                tokio::task::yield_now().await;
                ran_tx.send(()).expect("send");
                anyhow::Ok(())
            })
            .expect("thread");
            // Busy: this thread does not go back to its runtime until the work has run.
            ran_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("the work ran on another thread");
            tokio::time::timeout(Duration::from_secs(5), done)
                .await
                .expect("in time")
                .expect("done");
            let failed =
                on_a_thread_of_its_own("test", async { anyhow::bail!("refused") }).expect("thread");
            let err = tokio::time::timeout(Duration::from_secs(5), failed)
                .await
                .expect("in time");
            assert!(err.is_err_and(|e| e.to_string() == "refused"));
        });
    }
}
