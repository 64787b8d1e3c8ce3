//! The group's rules, driven by hand: who joins level, ahead or behind, what each
//! socket receives, and who is handed back with what. Real loopback sockets, a real
//! SQLite store (the group's state needs one), events put in the node's cache by hand.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use chrono::DateTime;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket};

use super::group::{Frame, Group, YIELD_EVERY};
use super::*;
use crate::broker_memory::MemoryBroker;
use crate::config::ServeArgs;
use crate::credentials::Authenticator;
use crate::cursor::Item;
use crate::domain::{Event, EventKind, Reset, ResetReason};
use crate::limits::{Limits, Rate, Rates};
use crate::observe::Transport;
use crate::server::Slots;
use crate::service::Service;
use crate::store::Store;
use crate::transport::Delivery;
use crate::transport::send::{Sent, try_send};

/// What the group handed back, per test (each test names its stream's zone).
static HANDED_BACK: StdMutex<Vec<(StreamKey, u64, Bytes)>> = StdMutex::new(Vec::new());

fn record(_: Fanout, f: Follower, after: u64, pending: Bytes) {
    lock(&HANDED_BACK).push((f.stream.clone(), after, pending));
}

fn handed_back(stream: &StreamKey) -> Vec<(u64, Bytes)> {
    lock(&HANDED_BACK)
        .iter()
        .filter(|(s, _, _)| s == stream)
        .map(|(_, a, p)| (*a, p.clone()))
        .collect()
}

struct Rig {
    fanout: Fanout,
    listener: TcpListener,
    slots: Slots,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("z.db").display());
    let config =
        ServeArgs::from_flags(["--database-url", url.as_str(), "--no-demo"]).expect("flags");
    let store = Store::open(&url).await.expect("store");
    let broker = Arc::new(MemoryBroker::new(crate::broker::Local::new(
        64, 1000, 100_000,
    )));
    let service = Service::new(store.clone(), broker, Arc::default());
    let no = Rate {
        per_second: 0,
        burst: 0,
    };
    let slots = Slots::new(1000, 0);
    let state = AppState {
        node: "test".into(),
        service,
        config: Arc::new(config),
        auth: Authenticator::new(store, None, false),
        limits: Arc::new(Limits::new(Rates {
            writes: no,
            connects: no,
            auth_failures: no,
            ws_messages: no,
        })),
        shutdown: tokio::sync::watch::channel(false).1,
        slots: slots.clone(),
    };
    Rig {
        fanout: Fanout::new(state, record),
        listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        slots,
        _dir: dir,
    }
}

impl Rig {
    /// A group of `stream` at `pos`, not running (the test drives it).
    fn group(&self, stream: &StreamKey, pos: u64) -> Group {
        Group {
            fanout: self.fanout.clone(),
            shared: Arc::new(Shared {
                inbox: Mutex::default(),
                joined: Notify::new(),
                gone: Notify::new(),
            }),
            stream: stream.clone(),
            members: Vec::new(),
            early: Vec::new(),
            pos,
            frames: Vec::new(),
            low: pos,
            reset_seen: false,
            look_every: YIELD_EVERY,
            delivery: Delivery::new(self.fanout.state().service.connections().clone()),
            expiry: None,
        }
    }

    /// A group at `pos` with `n` members level with it, which looks at its cursor
    /// after every socket; and the members' client ends.
    async fn looking_group(
        &self,
        stream: &StreamKey,
        pos: u64,
        n: usize,
    ) -> (Group, Vec<TcpStream>) {
        let mut g = self.group(stream, pos);
        g.look_every = 1;
        let mut clients = Vec::new();
        for _ in 0..n {
            let (f, client) = self.follower(stream, None).await;
            g.admit(pos, Joiner::Sse(f));
            clients.push(client);
        }
        (g, clients)
    }

    /// A follower of `stream` on a fresh loopback connection, and the client's end
    /// (with a small receive buffer if `rcvbuf`).
    async fn follower(&self, stream: &StreamKey, rcvbuf: Option<u32>) -> (Follower, TcpStream) {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(n) = rcvbuf {
            socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let addr = self.listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(socket.connect(addr), self.listener.accept());
        let (server, _) = accepted.expect("accept");
        let slot = self
            .slots
            .try_admit(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .expect("slot");
        let stats = self.fanout.state().service.connections().clone();
        let f = Follower {
            conn: Arc::new(Conn::new(server, slot)),
            principal: Arc::new(Principal::system("test")),
            registration: stats.connect(Transport::Sse, None),
            stream: stream.clone(),
        };
        // A fresh socket's write readiness arrives with the driver's first event.
        f.conn.tcp.writable().await.expect("writable");
        (f, client.expect("connect"))
    }

    /// Events `seqs` of `stream`, put in the node's cache (as a commit would).
    fn cached(&self, stream: &StreamKey, seqs: impl Iterator<Item = u64>) -> Vec<Arc<Event>> {
        let events: Vec<Arc<Event>> = seqs.map(|s| Arc::new(event(stream, s))).collect();
        self.fanout
            .state()
            .service
            .broker()
            .local()
            .deliver(&events);
        events
    }
}

fn event(stream: &StreamKey, seq: u64) -> Event {
    Event::render(
        stream,
        seq,
        EventKind::StockUpdated,
        DateTime::UNIX_EPOCH,
        format!("{{\"n\":{seq}}}"),
    )
}

fn items(stream: &StreamKey, seqs: impl Iterator<Item = u64>) -> Vec<Item> {
    seqs.map(|s| Item::Event(Arc::new(event(stream, s))))
        .collect()
}

fn frames(stream: &StreamKey, seqs: impl Iterator<Item = u64>) -> Vec<Frame> {
    items(stream, seqs)
        .iter()
        .map(|i| Frame::of(stream, i))
        .collect()
}

/// The group takes `items` from its cursor and makes one pass, with nothing more
/// arriving during it.
async fn pass(g: &mut Group, items: Vec<Item>) {
    for i in &items {
        g.take(i);
    }
    g.fan_out(|| None).await;
}

fn concat<'a>(parts: impl Iterator<Item = &'a Bytes>) -> Vec<u8> {
    parts.flat_map(|b| b.iter().copied()).collect()
}

/// The ids of the SSE frames in `bytes`.
fn ids(bytes: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .collect()
}

/// Reads what the client has been sent until it holds `n` ids (bounded).
async fn read_ids(client: &mut TcpStream, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while ids(&got).len() < n {
            let mut buf = [0u8; 8192];
            let k = client.read(&mut buf).await.expect("read");
            assert!(k > 0, "closed");
            got.extend_from_slice(&buf[..k]);
        }
    })
    .await
    .expect("the frames within 10 s");
    ids(&got)
}

#[tokio::test]
async fn a_connection_level_with_the_group_becomes_a_member_and_gets_each_batch() {
    let rig = rig().await;
    let stream = StreamKey::Zone(1);
    let mut g = rig.group(&stream, 10);
    let (f, mut client) = rig.follower(&stream, None).await;
    g.admit(10, Joiner::Sse(f));
    assert_eq!((g.members.len(), g.early.len()), (1, 0));
    pass(&mut g, items(&stream, 11..=13)).await;
    assert_eq!(read_ids(&mut client, 3).await, vec![11, 12, 13]);
    assert_eq!(g.pos, 13);
}

#[tokio::test]
async fn a_connection_ahead_of_the_group_waits_and_gets_only_what_follows_its_seq() {
    let rig = rig().await;
    let stream = StreamKey::Zone(2);
    let mut g = rig.group(&stream, 10);
    let (f, mut client) = rig.follower(&stream, None).await;
    g.admit(12, Joiner::Sse(f));
    assert_eq!((g.members.len(), g.early.len()), (0, 1));
    // Not passed yet: it stays ahead and is written nothing.
    pass(&mut g, items(&stream, 11..=12)).await;
    assert_eq!((g.members.len(), g.early.len()), (0, 1));
    pass(&mut g, items(&stream, 13..=14)).await;
    assert_eq!((g.members.len(), g.early.len()), (1, 0));
    assert_eq!(read_ids(&mut client, 2).await, vec![13, 14]);
    // Passed within a batch: only the part after its seq.
    let (f, mut client) = rig.follower(&stream, None).await;
    g.admit(15, Joiner::Sse(f));
    pass(&mut g, items(&stream, 15..=17)).await;
    assert_eq!(read_ids(&mut client, 2).await, vec![16, 17]);
    assert!(handed_back(&stream).is_empty());
}

#[tokio::test]
async fn a_connection_behind_the_group_is_brought_level_from_the_cache() {
    let rig = rig().await;
    let stream = StreamKey::Zone(3);
    rig.cached(&stream, 1..=20);
    let mut g = rig.group(&stream, 20);
    let (f, mut client) = rig.follower(&stream, None).await;
    g.admit(17, Joiner::Sse(f));
    assert_eq!(g.members.len(), 1);
    pass(&mut g, items(&stream, 21..=21)).await;
    assert_eq!(read_ids(&mut client, 4).await, vec![18, 19, 20, 21]);
    assert!(handed_back(&stream).is_empty());
}

#[tokio::test]
async fn a_connection_behind_what_the_cache_holds_is_handed_back_where_it_stands() {
    let rig = rig().await;
    let stream = StreamKey::Zone(4);
    rig.cached(&stream, 15..=20);
    let mut g = rig.group(&stream, 20);
    let (f, _client) = rig.follower(&stream, None).await;
    g.admit(12, Joiner::Sse(f));
    assert!(g.is_empty());
    let back = handed_back(&stream);
    assert_eq!(back.len(), 1);
    assert_eq!(
        (back[0].0, back[0].1.len()),
        (12, 0),
        "after 12, nothing pending"
    );
}

#[tokio::test]
async fn a_socket_that_cannot_take_a_batch_is_handed_back_with_the_rest_of_it() {
    let rig = rig().await;
    let stream = StreamKey::Zone(5);
    let mut g = rig.group(&stream, 0);
    let (f, slow) = rig.follower(&stream, Some(4096)).await;
    let (f2, mut fast) = rig.follower(&stream, None).await;
    // Fill the slow socket's buffers first.
    let junk = vec![b':'; 1 << 20];
    let mut filled = 0;
    while let Sent::All = try_send(&f.conn.tcp, &junk[..4096]) {
        filled += 1;
        assert!(filled < 4096, "the socket never filled");
    }
    g.admit(0, Joiner::Sse(f));
    g.admit(0, Joiner::Sse(f2));
    let batch = frames(&stream, 1..=3);
    pass(&mut g, items(&stream, 1..=3)).await;
    assert_eq!(g.members.len(), 1, "the fast one stays");
    assert_eq!(read_ids(&mut fast, 3).await, vec![1, 2, 3]);
    let back = handed_back(&stream);
    assert_eq!(back.len(), 1);
    let (after, pending) = &back[0];
    assert_eq!(*after, 3);
    // Its socket was full: none of the batch went out, all of it is pending.
    let whole = concat(batch.iter().map(|f| &f.sse));
    assert_eq!(&pending[..], &whole[..]);
    drop(slow);
}

#[tokio::test]
async fn a_reset_sends_those_ahead_back_to_catch_up_on_their_own() {
    let rig = rig().await;
    let stream = StreamKey::Zone(6);
    let mut g = rig.group(&stream, 10);
    let (f, _client) = rig.follower(&stream, None).await;
    g.admit(11, Joiner::Sse(f));
    let reset = Item::Reset(Reset {
        reason: ResetReason::HistoryExpired,
        earliest_id: 40,
        last_event_id: 50,
    });
    pass(&mut g, vec![reset]).await;
    assert!(g.is_empty());
    assert_eq!(g.pos, 50);
    let back = handed_back(&stream);
    assert_eq!(
        (back.len(), back[0].0),
        (1, 11),
        "it goes on from its own seq"
    );
}

#[tokio::test]
async fn an_event_taken_mid_pass_reaches_the_rest_of_that_pass_and_the_others_in_the_next() {
    let rig = rig().await;
    let stream = StreamKey::Zone(7);
    let (mut g, mut clients) = rig.looking_group(&stream, 10, 3).await;
    // Ahead of the group: its own cursor wrote up to 11.
    let (f, mut ahead) = rig.follower(&stream, None).await;
    g.admit(11, Joiner::Sse(f));
    // 11 is taken before the pass, 12 after the first socket was written.
    g.take(&items(&stream, 11..=11)[0]);
    let mut later = items(&stream, 12..=12);
    g.fan_out(|| later.pop()).await;
    assert_eq!(g.pos, 12);
    assert!(g.lagging(), "the first member has only 11");
    assert_eq!(g.low, 11);
    let pace = rig.fanout.state().service.pace();
    assert_eq!(
        pace.written_up_to(&stream),
        Some(11),
        "writers see where all are"
    );
    assert_eq!(read_ids(&mut clients[1], 2).await, vec![11, 12]);
    assert_eq!(read_ids(&mut clients[2], 2).await, vec![11, 12]);
    assert_eq!(read_ids(&mut ahead, 1).await, vec![12]);
    // The next pass brings the first level, and nobody else is written 12 again.
    g.fan_out(|| None).await;
    assert!(!g.lagging());
    assert_eq!(pace.written_up_to(&stream), Some(12));
    assert!(g.frames.is_empty(), "nothing kept that every member has");
    pass(&mut g, items(&stream, 13..=13)).await;
    assert_eq!(read_ids(&mut clients[0], 3).await, vec![11, 12, 13]);
    // (What was read before is not read again: a second 12 would come first.)
    assert_eq!(read_ids(&mut clients[1], 1).await, vec![13]);
    assert_eq!(read_ids(&mut ahead, 1).await, vec![13]);
    assert_eq!(g.members.len(), 4);
    assert!(handed_back(&stream).is_empty());
}

#[tokio::test]
async fn a_pass_takes_at_most_a_chunk_of_what_arrives_while_it_runs() {
    let rig = rig().await;
    let stream = StreamKey::Zone(8);
    let (mut g, mut clients) = rig.looking_group(&stream, 0, 2).await;
    g.take(&items(&stream, 1..=1)[0]);
    // An endless stream: the pass must stop taking, and end.
    let mut next = 1;
    tokio::time::timeout(
        Duration::from_secs(10),
        g.fan_out(|| {
            next += 1;
            Some(items(&stream, next..=next).remove(0))
        }),
    )
    .await
    .expect("the pass ends");
    let taken: usize = g.frames.iter().map(|f| f.sse.len()).sum();
    assert!(
        taken <= crate::transport::batch::MAX_CHUNK + 2 * g.frames[0].sse.len(),
        "{taken} bytes kept"
    );
    assert!(g.lagging());
    assert_eq!(read_ids(&mut clients[0], 1).await, vec![1]);
    // The second was written everything taken: in order, each once.
    let all: Vec<u64> = (1..=g.pos).collect();
    assert_eq!(read_ids(&mut clients[1], all.len()).await, all);
}

/// Departures in a burst are swept once at once, then at most once per
/// `SWEEP_EVERY`, however many there are.
#[test]
fn a_burst_of_departures_is_swept_at_most_once_per_interval() {
    let t0 = Instant::now();
    let mut s = Sweeper::default();
    assert!(s.gone(t0), "the first departure is swept at once");
    let mut now_sweeps = 0;
    for i in 1..1000u32 {
        now_sweeps += u32::from(s.gone(t0 + Duration::from_micros(u64::from(i) * 50)));
    }
    assert_eq!(now_sweeps, 0, "no sweep per departure within the interval");
    assert_eq!(
        s.due,
        Some(t0 + SWEEP_EVERY),
        "one put off to the interval's end"
    );
    s.swept(t0 + SWEEP_EVERY);
    assert_eq!(s.due, None);
    // Still within an interval of that sweep: put off again, not swept.
    assert!(!s.gone(t0 + SWEEP_EVERY + Duration::from_millis(10)));
    assert_eq!(s.due, Some(t0 + 2 * SWEEP_EVERY));
    s.swept(t0 + 2 * SWEEP_EVERY);
    // After a quiet spell, at once again.
    assert!(s.gone(t0 + 5 * SWEEP_EVERY));
    assert_eq!(s.due, None);
}

/// A change is answered once its stream's group is within the backlog of it: here the
/// group stands at 0 with one member and the backlog is one delivery, so the change's
/// event (seq 7, after the demo zone's six) is committed and published, and its answer
/// waits until the group has written up to 6.
#[tokio::test]
async fn a_change_is_answered_once_the_fan_out_is_within_the_backlog_of_it() {
    let rig = rig().await;
    let state = rig.fanout.state();
    let service = Service::new(
        state.service.store.clone(),
        Arc::new(MemoryBroker::new(crate::broker::Local::new(
            64, 1000, 100_000,
        ))),
        Arc::default(),
    )
    .with_pace(crate::pace::Pace::new(1, Duration::from_secs(60)));
    let bound = Duration::from_secs(10);
    let zone = tokio::time::timeout(bound, service.seed_demo())
        .await
        .expect("seeded in time")
        .expect("seed")
        .expect("a fresh store gets the demo zone");
    let stream = StreamKey::Zone(zone.id);
    let snapshot = service.store.snapshot(zone.id).await.expect("snapshot");
    let item = snapshot
        .and_then(|s| s.items.first().map(|i| i.id))
        .expect("an item");
    let mut cursor = service.cursor(&stream);
    cursor.seek(Start::After(6)).await.expect("seek");
    service.pace().written(&stream, 0, 1);
    let mut change = tokio::spawn({
        let service = service.clone();
        async move {
            let patch = crate::domain::ItemPatch::parse(None, Some(-1), None, None, None, None)
                .expect("patch");
            service
                .update_item(item, patch, None, &Principal::system("test"))
                .await
        }
    });
    let published = tokio::time::timeout(bound, cursor.next())
        .await
        .expect("published in time")
        .expect("event");
    assert!(matches!(published, Item::Event(e) if e.seq == 7));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut change)
            .await
            .is_err(),
        "answered while the fan-out was 7 events behind"
    );
    service.pace().written(&stream, 6, 1);
    let answered = tokio::time::timeout(bound, change)
        .await
        .expect("answered once the fan-out is within 1")
        .expect("task")
        .expect("the change");
    assert_eq!(answered.event_id, 7);
}
