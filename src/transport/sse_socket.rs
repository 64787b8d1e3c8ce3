//! One SSE connection outside hyper, on a task of its own: from the moment the server
//! hands its socket over until it has caught up with its stream, when it joins the
//! stream's fan-out (`fanout`); and again whenever the fan-out hands it back (its
//! socket could not take a whole batch, or it was too far behind to be brought level
//! from the cache).
//!
//! It writes what its cursor yields, in batches, with heartbeats, and ends on shutdown,
//! on revoked or expired credentials, on a storage failure, or when its peer leaves:
//! what `sse::respond`'s body does for a connection that hyper serves.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use super::batch::{MAX_CHUNK, collect, join};
use super::fanout::{Conn, Fanout, Follower, Joiner, peer_gone};
use super::send::{Sent, try_send};
use super::{Delivery, render, stopping};
use crate::cursor::{Cursor, Start};
use crate::domain::Principal;
use crate::observe::Transport;
use crate::server::RawConnection;
use crate::state::AppState;

/// The fan-out of a server, handing connections back to this module.
pub fn fanout(state: AppState) -> Fanout {
    Fanout::new(state, resume)
}

/// Takes over a connection whose response head is in `raw`: it writes the head and
/// `first`, then follows `cursor`.
pub(super) fn start(
    fanout: Fanout,
    raw: RawConnection,
    principal: Arc<Principal>,
    cursor: Cursor,
    first: Bytes,
) {
    let stats = fanout.state().service.connections().clone();
    let registration = stats.connect(Transport::Sse, principal.user.as_deref());
    registration.add_stream(cursor.stream());
    tracing::info!(principal = %principal.name, streams = ?[cursor.stream()], "SSE stream opened");
    let mut pending = BytesMut::with_capacity(raw.head.len() + first.len());
    pending.extend_from_slice(&raw.head);
    pending.extend_from_slice(&first);
    let f = Follower {
        conn: Arc::new(Conn::new(raw.tcp, raw.slot)),
        principal,
        registration,
        stream: cursor.stream().clone(),
    };
    tokio::spawn(follow(fanout, f, cursor, pending.freeze()));
}

/// Takes a connection back from the fan-out: it has written its stream up to `after`,
/// and `pending` must be written before anything else.
fn resume(fanout: Fanout, f: Follower, after: u64, pending: Bytes) {
    tokio::spawn(async move {
        let mut cursor = fanout.state().service.cursor(&f.stream);
        match cursor.seek(Start::After(after)).await {
            Ok(()) => follow(fanout, f, cursor, pending).await,
            Err(e) => tracing::warn!(stream = %f.stream, error = %e, "ending SSE stream"),
        }
    });
}

/// Writes all of `buf`, waiting for the socket as it must.
async fn write_all(tcp: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    loop {
        match try_send(tcp, buf) {
            Sent::All => return Ok(()),
            Sent::Part(n) => {
                buf = &buf[n..];
                tcp.writable().await?;
            }
            Sent::Gone => return Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }
}

async fn follow(fanout: Fanout, f: Follower, mut cursor: Cursor, mut pending: Bytes) {
    let state = fanout.state().clone();
    let heartbeat = state.config.heartbeat;
    let mut delivery = Delivery::new(state.service.connections().clone());
    let (auth, principal) = (state.auth.clone(), f.principal.clone());
    let ended = async move { auth.ended(&principal).await };
    tokio::pin!(ended);
    let stop = stopping(state.shutdown.clone());
    tokio::pin!(stop);
    let mut beat = interval_at(Instant::now() + heartbeat, heartbeat);
    beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pieces: Vec<Bytes> = Vec::new();
    let name = &f.principal.name;
    loop {
        if pending.is_empty() {
            // Whatever is ready now goes out in the next write.
            let mut size = 0;
            while size < MAX_CHUNK {
                let Some(item) = cursor.try_next() else { break };
                delivery.delivered(&item);
                let frame = render::sse(&item);
                size += frame.len();
                pieces.push(frame);
            }
            if !pieces.is_empty() {
                delivery.stats.sent(Transport::Sse, pieces.len() as u64);
                pending = join(&mut pieces);
            } else if cursor.caught_up() {
                let stream = f.stream.clone();
                fanout.join(&stream, cursor.position(), Joiner::Sse(f));
                return;
            }
        }
        let idle = pending.is_empty();
        tokio::select! {
            biased;
            _ = &mut stop => return,
            why = &mut ended => {
                tracing::info!(principal = %name, reason = why.reason(), "ending SSE stream");
                return;
            }
            written = write_all(&f.conn.tcp, &pending), if !idle => {
                if written.is_err() {
                    delivery.stats.send_error();
                    return;
                }
                delivery.written();
                pending = Bytes::new();
            }
            _ = peer_gone(&f.conn.tcp), if idle => return,
            taken = collect(&mut cursor, MAX_CHUNK, |_, item| {
                delivery.delivered(item);
                let frame = render::sse(item);
                let n = frame.len();
                pieces.push(frame);
                n
            }), if idle => match taken {
                Ok(n) => {
                    delivery.stats.sent(Transport::Sse, n as u64);
                    pending = join(&mut pieces);
                }
                Err(e) => {
                    tracing::warn!(stream = %f.stream, error = %e, "ending SSE stream");
                    return;
                }
            },
            _ = beat.tick(), if idle => pending = render::heartbeat(),
        }
    }
}
