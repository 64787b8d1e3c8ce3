//! `writes`: concurrent writers, each changing an item of its own zone (so that writers
//! do not queue on one stream's lock), spread over one or more nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::report::{CpuWindow, latency_line, print_cpu};
use crate::server::{Kind, Server};

#[derive(clap::Args)]
pub struct Args {
    /// Nodes to write to, round-robin (comma-separated).
    #[arg(long, value_parser = crate::loopback, value_delimiter = ',', required = true)]
    url: Vec<url::Url>,
    #[arg(long, env = "ZONECAST_KEY", hide_env_values = true)]
    key: String,
    /// Writers per node.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// How long the writers write.
    #[arg(long, default_value = "20s", value_parser = crate::duration)]
    duration: Duration,
    /// Server processes whose CPU and RSS to report (repeatable).
    #[arg(long)]
    server_pid: Vec<u32>,
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let nodes: Vec<Server> = a
        .url
        .iter()
        .map(|u| Server::new(Kind::Zonecast, u, &a.key))
        .collect::<Result<_, _>>()?;
    let total = a.writers * nodes.len();
    let mut topics = Vec::with_capacity(total);
    for w in 0..total {
        topics.push(nodes[0].topic(&format!("zonecast-load writer {w}")).await?);
    }
    println!(
        "writes: {} writers ({} per node on {} node(s)), {} s",
        total,
        a.writers,
        nodes.len(),
        a.duration.as_secs_f64()
    );
    let cpu = CpuWindow::start(&a.server_pid);
    let began = Instant::now();
    let until = began + a.duration;
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut tasks = Vec::new();
    for (w, topic) in topics.into_iter().enumerate() {
        let (node, latencies) = (nodes[w % nodes.len()].clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < until {
                let at = Instant::now();
                match node.publish(&topic, 0).await {
                    Ok(_) => mine.push(at.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            latencies.lock().await.extend(mine);
            errors
        }));
    }
    let mut errors = 0;
    for t in tasks {
        errors += t.await?;
    }
    let elapsed = began.elapsed();
    let cpu = cpu.end();
    let mut lat = std::mem::take(&mut *latencies.lock().await);
    println!(
        "changes: {} in {:.2} s = {:.0}/s; errors {errors}",
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64()
    );
    println!("latency: {}", latency_line(&mut lat));
    print_cpu(&cpu, a.threads, 0);
    Ok(())
}
