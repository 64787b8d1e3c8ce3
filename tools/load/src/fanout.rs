//! `fanout`: subscribers on one zone (SSE or WebSocket, spread over one or more nodes),
//! changes published at a rate or back to back through REST on another (or the same)
//! node. Latency is from the publish request leaving the tool to a subscriber holding
//! the bytes of the event.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use tokio::sync::Mutex;

use crate::report::{CpuWindow, latency_line, print_cpu};
use crate::target::Zonecast;

#[derive(clap::Args)]
pub struct Args {
    /// Where changes are made (REST).
    #[arg(long, value_parser = crate::loopback)]
    publish: url::Url,
    /// Where subscribers connect, round-robin (comma-separated). Default: --publish.
    #[arg(long, value_parser = crate::loopback, value_delimiter = ',')]
    subscribe: Vec<url::Url>,
    /// An API key that may create zones and change items (an admin key).
    #[arg(long, env = "ZONECAST_KEY", hide_env_values = true)]
    key: String,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// `sse` or `ws`.
    #[arg(long, default_value = "sse", value_parser = ["sse", "ws"])]
    transport: String,
    /// Changes to publish.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Changes per second; 0 = back to back (`--in-flight` at a time).
    #[arg(long, default_value_t = 80)]
    rate: u32,
    /// Changes in flight at once when back to back.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// The whole run, connecting included, must end within this.
    #[arg(long, default_value = "5m", value_parser = crate::duration)]
    timeout: Duration,
    /// Server processes whose CPU and RSS to report (repeatable).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Worker threads of the tool itself.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// When each seq arrived at one subscriber.
type Arrivals = Vec<(u64, Instant)>;

pub async fn run(a: Args) -> anyhow::Result<()> {
    let deadline = Instant::now() + a.timeout;
    let publisher = Zonecast::new(&a.publish, &a.key)?;
    let subscribe = if a.subscribe.is_empty() {
        vec![a.publish.clone()]
    } else {
        a.subscribe.clone()
    };
    let (zone, item) = publisher.zone_with_item("zonecast-load fanout").await?;
    let start = publisher.last_seq(zone).await?;
    let last = start + a.changes as u64;
    println!(
        "fanout: {} {} subscribers on zone {zone} via {} node(s), {} changes at {}",
        a.subscribers,
        a.transport,
        subscribe.len(),
        a.changes,
        if a.rate == 0 {
            format!("full speed ({} in flight)", a.in_flight)
        } else {
            format!("{}/s", a.rate)
        }
    );

    // Subscribers, each positioned after `start`; ready once their stream is open.
    let ready = Arc::new(AtomicUsize::new(0));
    let mut subs = Vec::with_capacity(a.subscribers);
    for i in 0..a.subscribers {
        let base = subscribe[i % subscribe.len()]
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        let (key, ready, ws) = (a.key.clone(), ready.clone(), a.transport == "ws");
        subs.push(tokio::spawn(async move {
            if ws {
                ws_subscriber(base, zone, key, start, last, ready).await
            } else {
                sse_subscriber(base, zone, key, start, last, ready).await
            }
        }));
    }
    while ready.load(Ordering::Relaxed) < a.subscribers {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} subscribers connected in time",
                ready.load(Ordering::Relaxed),
                a.subscribers
            );
        }
        for s in &subs {
            if s.is_finished() {
                bail!(
                    "a subscriber failed to connect (see the server's limits: --connect-rate, --max-connections-per-ip)"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{} subscribers connected", a.subscribers);

    // Publish.
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let cpu = CpuWindow::start(&a.server_pid);
    let began = Instant::now();
    // One change: its seq and when its request left.
    let publish = move |p: Zonecast, sent: Arc<Mutex<HashMap<u64, Instant>>>| async move {
        let at = Instant::now();
        let seq = p.bump(item).await?;
        sent.lock().await.insert(seq, at);
        anyhow::Ok(())
    };
    let mut tasks = Vec::new();
    if a.rate > 0 {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate as f64));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for _ in 0..a.changes {
            tick.tick().await;
            tasks.push(tokio::spawn(publish(publisher.clone(), sent.clone())));
        }
    } else {
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..a.in_flight.max(1) {
            let (p, sent, next, n) = (publisher.clone(), sent.clone(), next.clone(), a.changes);
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    publish(p.clone(), sent.clone()).await?;
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    let published = began.elapsed();

    // Collect.
    let mut all: Vec<Arrivals> = Vec::with_capacity(subs.len());
    for s in subs {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s).await {
            Ok(r) => all.push(r.context("subscriber task")?),
            Err(_) => bail!("subscribers did not receive everything before --timeout"),
        }
    }
    let received = all
        .iter()
        .flat_map(|a| a.iter().map(|(_, t)| *t))
        .max()
        .unwrap_or(began);
    let elapsed = received.duration_since(began);

    let sent = sent.lock().await;
    let (mut missing, mut dup, mut disorder) = (0u64, 0u64, 0u64);
    let mut lat = Vec::with_capacity(all.len() * a.changes);
    for arrivals in &all {
        let mut seen = std::collections::HashSet::new();
        let mut prev = start;
        for (seq, at) in arrivals {
            if !seen.insert(*seq) {
                dup += 1;
            }
            if *seq <= prev {
                disorder += 1;
            }
            prev = *seq;
            if let Some(s) = sent.get(seq) {
                lat.push(at.saturating_duration_since(*s));
            }
        }
        missing += (start + 1..=last).filter(|s| !seen.contains(s)).count() as u64;
    }
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
    print_cpu(&cpu, a.threads, deliveries);
    if missing + dup + disorder > 0 {
        bail!("subscribers saw a wrong sequence");
    }
    Ok(())
}

/// Reads `id: N` lines of an SSE body until `last` has arrived.
async fn sse_subscriber(
    base: String,
    zone: i64,
    key: String,
    start: u64,
    last: u64,
    ready: Arc<AtomicUsize>,
) -> Arrivals {
    let http = reqwest::Client::new();
    let resp = match http
        .get(format!("{base}/sse/zones/{zone}/stock"))
        .header("Authorization", format!("Bearer {key}"))
        .header("Last-Event-ID", start.to_string())
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        _ => return Vec::new(),
    };
    ready.fetch_add(1, Ordering::Relaxed);
    let mut out = Vec::with_capacity((last - start) as usize);
    let mut body = resp.bytes_stream();
    let mut line = Vec::with_capacity(64);
    while out.last().is_none_or(|(s, _)| *s < last) {
        let Some(Ok(chunk)) = body.next().await else {
            break;
        };
        let now = Instant::now();
        for &b in chunk.iter() {
            if b == b'\n' {
                if let Some(id) = line.strip_prefix(b"id: ")
                    && let Some(seq) = std::str::from_utf8(id).ok().and_then(|s| s.parse().ok())
                {
                    out.push((seq, now));
                }
                line.clear();
            } else {
                line.push(b);
            }
        }
    }
    out
}

/// Reads event messages (`"id":N`) of `/ws/zones/{zone}` until `last` has arrived.
async fn ws_subscriber(
    base: String,
    zone: i64,
    key: String,
    start: u64,
    last: u64,
    ready: Arc<AtomicUsize>,
) -> Arrivals {
    use tokio_tungstenite::tungstenite::Message;
    let url = format!(
        "{}/ws/zones/{zone}?last_event_id={start}&access_token={key}",
        base.replacen("http", "ws", 1)
    );
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
        return Vec::new();
    };
    ready.fetch_add(1, Ordering::Relaxed);
    let mut out = Vec::with_capacity((last - start) as usize);
    while out.last().is_none_or(|(s, _): &(u64, Instant)| *s < last) {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let now = Instant::now();
                // Event messages start with `{"id":N,`; replies and welcome do not.
                if let Some(rest) = t.as_str().strip_prefix("{\"id\":")
                    && let Some(n) = rest.split(',').next().and_then(|n| n.parse().ok())
                {
                    out.push((n, now));
                }
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    out
}
