use std::collections::HashMap;
use std::time::Duration;

use zonecast::cursor::{Item, Start};
use zonecast::domain::Principal;
use zonecast::domain::{ItemPatch, StreamKey};

use crate::helpers::*;

/// A tiny deterministic generator, so a failing run can be repeated.
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_many_subscribers_see_every_seq_once_in_order() {
    const WRITERS: u64 = 8;
    const WRITES: u64 = 200;
    const SUBSCRIBERS: usize = 50;
    const ITEMS: usize = 4;
    const START_QTY: i64 = 100_000;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("Busy").await;
        let mut items = Vec::new();
        for i in 0..ITEMS {
            items.push(app.create_item(zone, &format!("I{i}"), START_QTY, 0).await);
        }
        let last = ITEMS as u64 + WRITERS * WRITES;
        let path = format!("/sse/zones/{zone}/stock");

        let mut watchers = Vec::new();
        for _ in 0..SUBSCRIBERS {
            let mut sse = app.sse(&path, Some("0")).await;
            watchers.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                while seqs.last() != Some(&last) {
                    seqs.push(sse.next().await.seq());
                }
                seqs
            }));
        }

        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let http = app.http.clone();
            let base = app.base.clone();
            let items = items.clone();
            writers.push(tokio::spawn(async move {
                let mut rng = 0x5eed + w;
                let mut applied: HashMap<i64, i64> = HashMap::new();
                for _ in 0..WRITES {
                    let item = items[(lcg(&mut rng) % items.len() as u64) as usize];
                    // Never 0: a zero delta changes nothing and appends no event.
                    let delta = match (lcg(&mut rng) % 20) as i64 - 10 {
                        0 => 10,
                        d => d,
                    };
                    let resp = http
                        .patch(format!("{base}/api/items/{item}"))
                        .json(&serde_json::json!({ "delta": delta }))
                        .send()
                        .await
                        .expect("send");
                    assert_eq!(resp.status().as_u16(), 200);
                    *applied.entry(item).or_default() += delta;
                }
                applied
            }));
        }
        let mut expected: HashMap<i64, i64> = items.iter().map(|i| (*i, START_QTY)).collect();
        for w in writers {
            for (item, d) in within_for(LOAD_WAIT, "writers", w).await.expect("writer") {
                *expected.get_mut(&item).expect("known item") += d;
            }
        }
        for w in watchers {
            let seqs = within_for(LOAD_WAIT, "subscribers", w)
                .await
                .expect("subscriber");
            let want: Vec<u64> = (1..=last).collect();
            assert_eq!(seqs, want, "a subscriber saw a gap or a duplicate");
        }
        let snap = app.snapshot(zone).await;
        assert_eq!(snap["last_event_id"], last);
        for it in snap["items"].as_array().expect("items") {
            let id = it["id"].as_i64().expect("id");
            assert_eq!(it["quantity"].as_i64(), Some(expected[&id]), "item {id}");
        }
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_every_event_and_does_not_hold_back_others() {
    const CHANGES: u64 = 600;
    for db in test_dbs().await {
        // A bus of 2 events and a cache of 16: the slow reader must be filled from the
        // cache and the change log.
        let app = spawn_app(&db, &["--bus-capacity", "2", "--cache-events", "16"]).await;
        let zone = app.create_zone("A").await;
        let item = app.create_item(zone, "S", 0, 0).await;
        let path = format!("/sse/zones/{zone}/stock");
        let mut slow = app.sse(&path, None).await;
        let mut fast = app.sse(&path, None).await;
        let reason = "r".repeat(400);
        let writer = {
            let admin = Principal::system("test");
            let service = app.service.clone();
            tokio::spawn(async move {
                for _ in 0..CHANGES {
                    let patch = ItemPatch::parse(None, Some(1), None, None, None, Some(&reason))
                        .expect("valid patch");
                    service
                        .update_item(item as i32, patch, None, &admin)
                        .await
                        .expect("change applies");
                }
            })
        };
        // The fast reader gets everything while the slow one has read nothing.
        let frames = fast.take(CHANGES as usize).await;
        assert_consecutive(&frames, 2, &format!("zone:{zone}"));
        within_for(LOAD_WAIT, "writer", writer)
            .await
            .expect("writer");
        let frames = slow.take(CHANGES as usize).await;
        assert_consecutive(&frames, 2, &format!("zone:{zone}"));
        assert_eq!(
            frames.last().map(|f| f.data["data"]["quantity"].clone()),
            Some(600.into())
        );
        app.stop().await;
    }
}

/// A cursor whose receiver lagged catches up from the cache when the cache still holds
/// what it missed, and from the log when it does not; either way every seq once.
#[tokio::test]
async fn a_lagged_cursor_is_filled_from_the_cache_and_the_log() {
    for db in test_dbs().await {
        for (cache, from_log) in [("64", false), ("8", true)] {
            let app = spawn_app(&db, &["--bus-capacity", "2", "--cache-events", cache]).await;
            let zone = app.create_zone("A").await;
            let item = app.create_item(zone, "S", 0, 0).await as i32;
            let s = &app.service;
            let stream = format!("zone:{zone}");
            let mut cursor = s.cursor(&StreamKey::parse(&stream).expect("stream"));
            cursor.seek(Start::Live).await.expect("seek");
            let before = s.broker().replays();
            // 40 events published while the cursor is not read: its receiver lags.
            for _ in 0..40 {
                let p = ItemPatch::parse(None, Some(1), None, None, None, None).expect("patch");
                s.update_item(item, p, None, &Principal::system("test"))
                    .await
                    .expect("applies");
            }
            let mut seqs = Vec::new();
            while seqs.len() < 40 {
                match within("cursor", cursor.next()).await.expect("cursor") {
                    Item::Event(ev) => seqs.push(ev.seq),
                    Item::Reset(r) => panic!("unexpected reset {r:?}"),
                }
            }
            assert_eq!(seqs, (2..=41).collect::<Vec<u64>>());
            assert!(
                cursor.try_next().is_none(),
                "nothing beyond the last change"
            );
            let after = s.broker().replays();
            let (cached, logged) = (
                after.from_cache - before.from_cache,
                after.from_log - before.from_log,
            );
            if from_log {
                assert!(
                    logged > 0,
                    "cache {cache}: the log filled the lag ({after:?})"
                );
            } else {
                assert!(
                    cached >= 38,
                    "cache {cache}: the cache filled the lag ({after:?})"
                );
                assert_eq!(logged, 0, "cache {cache}: no event read from the log");
            }
            app.stop().await;
        }
    }
}

/// Changes beyond the first in each committed group, so far (SQLite group commit).
async fn grouped_changes(app: &TestApp) -> f64 {
    let m = crate::operations::parse_prometheus(&app.get("/metrics").await.text);
    m.get("zonecast_write_group_size_sum")
        .copied()
        .unwrap_or(0.0)
        - m.get("zonecast_write_group_size_count")
            .copied()
            .unwrap_or(0.0)
}

/// Concurrent changes to one zone, half of them refused: on SQLite they share
/// transactions (group commit), yet each refusal rolls back only itself, every applied
/// change is in the log once, and the seqs stay gapless. Run twice: with the odd ones
/// refused, then the even ones, so that the first change of a group (which takes no
/// savepoint: its refusal rolls back the whole transaction, and the next member begins
/// it again) is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_are_applied_or_refused_each_on_its_own() {
    const N: usize = 64;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        for refused in [1, 0] {
            let zone = app.create_zone(&format!("Group {refused}")).await as i32;
            let up = app.create_item(zone as i64, "UP", 0, 0).await as i32;
            let empty = app.create_item(zone as i64, "EMPTY", 0, 0).await as i32;
            let admin = Principal::system("test");
            let start = app.service.snapshot(&admin, zone).await.expect("snapshot");
            let grouped_before = grouped_changes(&app).await;
            let tasks: Vec<_> = (0..N)
                .map(|i| {
                    let (service, admin) = (app.service.clone(), admin.clone());
                    tokio::spawn(async move {
                        // The refused ones would take EMPTY below zero.
                        let (item, delta) = if i % 2 == refused {
                            (empty, -1)
                        } else {
                            (up, 1)
                        };
                        let p = ItemPatch::parse(None, Some(delta), None, None, None, None)
                            .expect("patch");
                        (i, service.update_item(item, p, None, &admin).await)
                    })
                })
                .collect();
            for t in tasks {
                let (i, r) = within_for(LOAD_WAIT, "a change", t).await.expect("task");
                match (i % 2 == refused, r) {
                    (false, Ok(c)) => assert!(c.changed, "change {i}"),
                    (true, Err(zonecast::service::ServiceError::Domain(_))) => {}
                    (_, other) => panic!("change {i}: {other:?}"),
                }
            }
            let end = app.service.snapshot(&admin, zone).await.expect("snapshot");
            let qty = |s: &zonecast::domain::Snapshot, id| {
                s.items.iter().find(|it| it.id == id).map(|it| it.quantity)
            };
            assert_eq!(qty(&end, up), Some(N as i64 / 2));
            assert_eq!(qty(&end, empty), Some(0));
            assert_eq!(end.last_event_id, start.last_event_id + N as u64 / 2);
            let events = app
                .service
                .events(&admin, zone, start.last_event_id, 1000)
                .await
                .expect("log");
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            let want: Vec<u64> = (start.last_event_id + 1..=end.last_event_id).collect();
            assert_eq!(seqs, want, "gapless, once each");
            for (n, e) in events.iter().enumerate() {
                let data: serde_json::Value = serde_json::from_str(&e.data).expect("json");
                assert_eq!(data["item_id"], up);
                assert_eq!(data["quantity"], n as i64 + 1, "event {}", e.seq);
            }
            if db.postgres_admin().is_none() {
                assert!(
                    grouped_changes(&app).await > grouped_before,
                    "on SQLite concurrent changes share a transaction"
                );
            }
        }
        app.stop().await;
    }
}

/// Changes whose requests are dropped at any point (a client gone mid-request) neither
/// stall the changes they share a transaction with nor leave half of themselves
/// behind: whatever is in the log is whole, and the others all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_dropped_midway_neither_stall_nor_half_apply() {
    const N: u64 = 64;
    // Rounds: a drop lands where it does by chance (a cut after 0-3 ms), and some
    // places are narrow (a member dropped while its savepoint statements ran).
    const ROUNDS: u64 = 40;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let mut rng = 0xd0d0;
        for round in 0..ROUNDS {
            let zone = app.create_zone(&format!("Dropped {round}")).await as i32;
            let item = app.create_item(zone as i64, "D", 0, 0).await as i32;
            let admin = Principal::system("test");
            let start = app.service.snapshot(&admin, zone).await.expect("snapshot");
            let tasks: Vec<_> = (0..N)
                .map(|i| {
                    let (service, admin) = (app.service.clone(), admin.clone());
                    // Every other request is dropped after 0–3 ms, wherever it then is.
                    let cut = (i % 2 == 1).then(|| Duration::from_micros(lcg(&mut rng) % 3000));
                    tokio::spawn(async move {
                        let p =
                            ItemPatch::parse(None, Some(1), None, None, None, None).expect("patch");
                        let change = service.update_item(item, p, None, &admin);
                        match cut {
                            Some(after) => tokio::time::timeout(after, change).await.ok(),
                            None => Some(change.await),
                        }
                    })
                })
                .collect();
            for (i, t) in tasks.into_iter().enumerate() {
                let r = within_for(LOAD_WAIT, "a change", t).await.expect("task");
                if i % 2 == 0 {
                    assert!(matches!(r, Some(Ok(_))), "round {round}, change {i}: {r:?}");
                }
            }
            // A dropped change may still commit with its group. One more change settles
            // them: groups take the database in turn (and on PostgreSQL the stream's row
            // lock orders transactions), so once it is answered every earlier one is done.
            let p = ItemPatch::parse(None, Some(1), None, None, None, None).expect("patch");
            within(
                "the last change",
                app.service.update_item(item, p, None, &admin),
            )
            .await
            .expect("applies");
            let end = app.service.snapshot(&admin, zone).await.expect("snapshot");
            let applied = end.last_event_id - start.last_event_id;
            assert!((N / 2 + 1..=N + 1).contains(&applied), "{applied} applied");
            let qty = end
                .items
                .iter()
                .find(|it| it.id == item)
                .map(|it| it.quantity);
            assert_eq!(qty, Some(applied as i64), "one step per logged event");
            let events = app
                .service
                .events(&admin, zone, start.last_event_id, 1000)
                .await
                .expect("log");
            for (n, e) in events.iter().enumerate() {
                assert_eq!(e.seq, start.last_event_id + 1 + n as u64);
                let data: serde_json::Value = serde_json::from_str(&e.data).expect("json");
                assert_eq!(data["quantity"], n as i64 + 1, "event {}", e.seq);
            }
        }
        app.stop().await;
    }
}

/// A change whose request is dropped while it waits for the database (another
/// connection holds the lock it needs) leaves nothing behind that the change after it
/// waits for. On SQLite that change shares its group (group commit): the group's turn
/// on the database must be given back. On PostgreSQL the dropped change's connection
/// must not be left in the middle of a query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_dropped_while_it_waits_for_the_database_does_not_stall_the_next() {
    use futures_util::FutureExt;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("Blocked").await as i32;
        let item = app.create_item(zone as i64, "B", 0, 0).await as i32;
        let admin = Principal::system("test");
        let patch = || ItemPatch::parse(None, Some(1), None, None, None, None).expect("patch");
        // Settles the item's zone in memory, so that the first poll of a change below
        // goes straight into its write.
        within(
            "a first change",
            app.service.update_item(item, patch(), None, &admin),
        )
        .await
        .expect("applies");
        let holder = hold_writes(&db, zone).await;
        // One poll takes the first change as far as it goes without the database: on
        // SQLite it opens a group and takes the group's turn, then waits for BEGIN.
        let mut first = Box::pin(app.service.update_item(item, patch(), None, &admin));
        assert!((&mut first).now_or_never().is_none(), "waits for the lock");
        // The second joins that group (on SQLite) and waits behind the first.
        let (service, by) = (app.service.clone(), admin.clone());
        let mut second =
            Box::pin(async move { service.update_item(item, patch(), None, &by).await });
        assert!(
            (&mut second).now_or_never().is_none(),
            "waits behind the first"
        );
        drop(first);
        let second = tokio::spawn(second);
        holder.rollback().await.expect("release the lock");
        within("the change after the dropped one", second)
            .await
            .expect("task")
            .expect("applies");
        let end = app.service.snapshot(&admin, zone).await.expect("snapshot");
        let qty = end
            .items
            .iter()
            .find(|it| it.id == item)
            .map(|it| it.quantity);
        assert_eq!(qty, Some(2), "the dropped change applied nothing");
        app.stop().await;
    }
}

/// The first change of a group takes no savepoint; when it is refused, the whole
/// transaction is rolled back and the change behind it, in the same group, begins a
/// new one: nothing of the refused change (not even the seq it took) is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_change_of_a_group_leaves_nothing_behind_for_the_next() {
    use futures_util::FutureExt;
    for db in test_dbs().await {
        let app = spawn_app(&db, &[]).await;
        let zone = app.create_zone("Refused first").await as i32;
        let item = app.create_item(zone as i64, "R", 0, 0).await as i32;
        let admin = Principal::system("test");
        let patch = |delta| ItemPatch::parse(None, Some(delta), None, None, None, None);
        // Settles the item's zone in memory, so that the first poll of a change below
        // goes straight into its write.
        within(
            "a first change",
            app.service
                .update_item(item, patch(1).expect("patch"), None, &admin),
        )
        .await
        .expect("applies");
        let start = app.service.snapshot(&admin, zone).await.expect("snapshot");
        let holder = hold_writes(&db, zone).await;
        // The first opens a group (on SQLite) and waits for BEGIN; it would take the
        // quantity below zero, so it is refused once it runs.
        let (service, by) = (app.service.clone(), admin.clone());
        let mut first = Box::pin(async move {
            let p = patch(-5).expect("patch");
            service.update_item(item, p, None, &by).await
        });
        assert!((&mut first).now_or_never().is_none(), "waits for the lock");
        // The second joins that group and waits behind the first.
        let (service, by) = (app.service.clone(), admin.clone());
        let mut second = Box::pin(async move {
            let p = patch(1).expect("patch");
            service.update_item(item, p, None, &by).await
        });
        assert!(
            (&mut second).now_or_never().is_none(),
            "waits behind the first"
        );
        let (first, second) = (tokio::spawn(first), tokio::spawn(second));
        holder.rollback().await.expect("release the lock");
        let refused = within("the refused change", first).await.expect("task");
        assert!(
            matches!(refused, Err(zonecast::service::ServiceError::Domain(_))),
            "{refused:?}"
        );
        let applied = within("the change behind it", second)
            .await
            .expect("task")
            .expect("applies");
        assert_eq!(applied.event_id, start.last_event_id + 1, "no seq skipped");
        let end = app.service.snapshot(&admin, zone).await.expect("snapshot");
        assert_eq!(end.last_event_id, start.last_event_id + 1);
        let qty = end
            .items
            .iter()
            .find(|it| it.id == item)
            .map(|it| it.quantity);
        assert_eq!(qty, Some(2), "the refused change applied nothing");
        app.stop().await;
    }
}

/// A transaction on a connection of its own that every change to `zone` waits for
/// until it ends: on PostgreSQL it holds the zone's stream row, which every change
/// locks first; on SQLite the write lock, which BEGIN IMMEDIATE waits for.
async fn hold_writes(db: &TestDb, zone: i32) -> sea_orm::DatabaseTransaction {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let outside = sea_orm::Database::connect(db.url.as_str())
        .await
        .expect("a connection of its own");
    match db.postgres_admin() {
        Some(_) => {
            let txn = outside.begin().await.expect("begin");
            let sql = format!("SELECT last_seq FROM streams WHERE key = 'zone:{zone}' FOR UPDATE");
            txn.execute_unprepared(&sql).await.expect("row lock");
            txn
        }
        None => outside
            .begin_with_options(sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await
            .expect("write lock"),
    }
}
