//! The server killed with SIGKILL in the middle of writes, three times, and restarted
//! on the same database: no acknowledged change is lost, a change retried with its
//! idempotency key after the crash is applied once, every stream's seqs are gapless
//! and unique, and every crossing into low stock has its alert and its notification.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Mutex;
use zonecast::domain::StreamKey;
use zonecast::store::Store;

use crate::helpers::*;

const WRITERS: usize = 4;
const ITEMS: usize = 3;
const THRESHOLD: i64 = 50;

/// A change a writer sent: its idempotency key, target and quantity.
#[derive(Debug, Clone)]
struct Change {
    key: String,
    item: i64,
    quantity: i64,
}

/// What the writers know: acknowledged changes (with their event ids), and changes
/// sent whose answer was lost in a crash.
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, (u64, Change)>,
    unanswered: Vec<Change>,
}

/// Sends a change; `Ok(Some(event))` when it changed the item, `Ok(None)` when the
/// item already had that quantity (nothing appended).
async fn send(http: &reqwest::Client, base: &str, c: &Change) -> Result<Option<u64>, ()> {
    let r = http
        .patch(format!("{base}/api/items/{}", c.item))
        .header("Idempotency-Key", &c.key)
        .json(&json!({"quantity": c.quantity, "reason": "crash test"}))
        .send()
        .await
        .map_err(|_| ())?;
    if r.status().as_u16() != 200 {
        return Err(());
    }
    let v: Value = r.json().await.map_err(|_| ())?;
    let id = v["event_id"].as_u64().ok_or(())?;
    assert_eq!(v["item"]["quantity"], c.quantity, "{v}");
    Ok((v["changed"] == true).then_some(id))
}

/// Writers change quantities (crossing the threshold both ways) until the server dies.
async fn write_until_killed(
    child: &mut Child,
    key: &str,
    items: &[i64],
    ledger: Arc<Mutex<Ledger>>,
    round: usize,
) {
    let http = client_with(Some(key));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (http, base, ledger, acked) = (
            http.clone(),
            child.base.clone(),
            ledger.clone(),
            acked.clone(),
        );
        let items = items.to_vec();
        tasks.push(tokio::spawn(async move {
            for n in 0..100_000usize {
                let c = Change {
                    key: format!("r{round}-w{w}-n{n}"),
                    item: items[(w + n) % items.len()],
                    // Above and at-or-below the threshold in turn.
                    quantity: if (n / 2) % 2 == 0 {
                        80 + (n % 7) as i64
                    } else {
                        10 + (n % 5) as i64
                    },
                };
                match send(&http, &base, &c).await {
                    Ok(changed) => {
                        if let Some(id) = changed {
                            ledger.lock().await.acked.insert(c.key.clone(), (id, c));
                        }
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(()) => {
                        ledger.lock().await.unanswered.push(c);
                        return;
                    }
                }
            }
        }));
    }
    within_for(LOAD_WAIT, "some acknowledged writes", async {
        while acked.load(Ordering::Relaxed) < 40 * (round + 1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    child.process.start_kill().expect("SIGKILL");
    within("the killed server to exit", child.process.wait())
        .await
        .expect("exit status");
    for t in tasks {
        within("a writer to stop", t).await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_loses_no_acknowledged_change() {
    for db in test_dbs().await {
        let flags = ["--write-rate", "0", "--connect-rate", "0"];
        let mut child = spawn_binary(&db.url, &flags).await;
        let key = child.key.clone().expect("first admin key");
        let lead = {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
                .args([
                    "keys", "create", "--name", "lead", "--role", "reader", "--user", "lead",
                ])
                .args(["--database-url", &db.url])
                .output()
                .expect("keys create");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .expect("key")
                .to_owned()
        };
        let http = client_with(Some(&key));
        let zone: Value = http
            .post(format!("{}/api/zones", child.base))
            .json(&json!({"name": "Crash"}))
            .send()
            .await
            .expect("zone")
            .json()
            .await
            .expect("json");
        let zone = zone["id"].as_i64().expect("zone");
        let mut items = Vec::new();
        for i in 0..ITEMS {
            let r: Value = http
                .post(format!("{}/api/zones/{zone}/items", child.base))
                .json(&json!({"sku": format!("C{i}"), "name": format!("c{i}"), "quantity": 100, "low_stock_threshold": THRESHOLD}))
                .send()
                .await
                .expect("item")
                .json()
                .await
                .expect("json");
            items.push(r["item"]["id"].as_i64().expect("item"));
        }
        let w = client_with(Some(&lead))
            .post(format!("{}/api/zones/{zone}/watch", child.base))
            .send()
            .await
            .expect("watch");
        assert_eq!(w.status().as_u16(), 200);

        let ledger = Arc::new(Mutex::new(Ledger::default()));
        for round in 0..3 {
            write_until_killed(&mut child, &key, &items, ledger.clone(), round).await;
            child = spawn_binary(&db.url, &flags).await;
            // Changes whose answer the crash swallowed are retried with their key:
            // each is then applied exactly once, whether or not it was before.
            let pending = std::mem::take(&mut ledger.lock().await.unanswered);
            let http = client_with(Some(&key));
            for c in pending {
                let changed = within("a retry", send(&http, &child.base, &c))
                    .await
                    .expect("a retried change is answered");
                if let Some(id) = changed {
                    ledger.lock().await.acked.insert(c.key.clone(), (id, c));
                }
            }
        }
        assert!(child.terminate(Duration::from_secs(15)).await.success());

        // The database as the last server left it.
        let store = Store::open(&db.url).await.expect("open the database");
        let stream = StreamKey::Zone(zone as i32);
        let log = store.read_from(&stream, 1, 1_000_000).await.expect("log");
        let bounds = store.bounds(&stream).await.expect("bounds");
        let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=bounds.last).collect::<Vec<_>>(),
            "zone seqs gapless and unique"
        );
        let by_seq: BTreeMap<u64, Value> = log
            .iter()
            .map(|e| (e.seq, serde_json::from_slice(&e.json).expect("event json")))
            .collect();
        let ledger = ledger.lock().await;
        assert!(
            ledger.acked.len() >= 3 * 40,
            "{} acknowledged",
            ledger.acked.len()
        );
        for (key, (id, c)) in &ledger.acked {
            let ev = by_seq
                .get(id)
                .unwrap_or_else(|| panic!("acked {key} (event {id}) lost"));
            assert_eq!(ev["data"]["item_id"], c.item, "{key}: {ev}");
            assert_eq!(ev["data"]["quantity"], c.quantity, "{key}: {ev}");
        }
        // Each acknowledged key is applied once: no two events carry the same change.
        let ids: HashSet<u64> = ledger.acked.values().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), ledger.acked.len(), "two keys share one event");

        // Every crossing into low stock has its alert and the watcher's notification.
        let crossings: Vec<u64> = by_seq
            .iter()
            .filter(|(_, e)| {
                let (q, p) = (
                    e["data"]["quantity"].as_i64(),
                    e["data"]["previous_quantity"].as_i64(),
                );
                matches!((q, p), (Some(q), Some(p)) if p > THRESHOLD && q <= THRESHOLD)
            })
            .map(|(s, _)| *s)
            .collect();
        assert!(!crossings.is_empty());
        for (name, kind) in [("alerts", "low_stock_alert"), ("user:lead", "notification")] {
            let key = StreamKey::parse(name).expect("stream");
            let events = store.read_from(&key, 1, 1_000_000).await.expect("log");
            let b = store.bounds(&key).await.expect("bounds");
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            assert_eq!(
                seqs,
                (1..=b.last).collect::<Vec<_>>(),
                "{name} gapless and unique"
            );
            let mut alerted: Vec<u64> = events
                .iter()
                .filter(|e| e.kind.as_str() == kind)
                .filter_map(|e| {
                    let v: Value = serde_json::from_slice(&e.json).ok()?;
                    let d = if kind == "notification" {
                        &v["data"]["data"]
                    } else {
                        &v["data"]
                    };
                    d["zone_event_id"].as_u64()
                })
                .collect();
            alerted.sort_unstable();
            assert_eq!(alerted, crossings, "{name}: one {kind} per crossing");
        }
    }
}
