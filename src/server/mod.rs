//! The HTTP server loop: accepts TCP connections, admits or sheds them, and serves the
//! admitted ones with hyper, calling the poem endpoint for each request.
//!
//! It exists because what an internet-facing push server needs at the socket level is
//! missing from poem 3.1's `Server`: a cap on connections (in total and per client
//! address), a deadline for the request head, an idle deadline for keep-alive
//! connections, and back-off on accept errors (poem retries them at once and spins at
//! the open-file limit). The rules, all enforced here:
//!
//! - A connection holds a *slot* (global and per address) for as long as its socket
//!   lives, also after a WebSocket upgrade, so SSE and WS count against the caps.
//! - Past a cap, the connection is answered at once with `503` problem+json and
//!   `Retry-After`, by a bounded number of shedding tasks; beyond those it is closed.
//! - A new connection must deliver a complete request head within `header_timeout`;
//!   a keep-alive connection with no request in flight is closed after `idle_timeout`
//!   (and, once its next head starts, must complete it within `header_timeout`). A
//!   connection with a response in flight (an SSE stream) or upgraded (WS) has no such
//!   deadline: heartbeats and pings keep it alive, and the transports end it.
//! - Accept errors are counted, logged at most once per interval, and backed off.
//!
//! With `tls`, each admitted connection first completes a TLS handshake (within the
//! header deadline), then speaks HTTP/2 or HTTP/1.1 as ALPN chose.
//!
//! With `takeover`, the first request of a plain connection that the rule picks is
//! answered here rather than by hyper, and its response may take the socket over
//! (`takeover`): the SSE fan-out writes such streams itself.
//!
//! It must not know about routes, credentials or streams: it sees bytes, addresses and
//! one endpoint.

mod accept;
mod conn;
pub mod takeover;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use poem::Endpoint;
use poem::endpoint::{DynEndpoint, ToDynEndpoint};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use accept::{Slot, Slots};
pub use takeover::{Answered, Eligible, RawConnection, Takeover};

/// What one server allows its clients.
#[derive(Debug, Clone)]
pub struct NetLimits {
    /// Open connections in total.
    pub max_connections: usize,
    /// Open connections from one client address; 0 = no per-address cap.
    pub max_per_ip: usize,
    /// A connection's request head (or a request body, see `api::limits`) must arrive
    /// within this.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    pub idle_timeout: Duration,
}

/// File descriptors kept free for everything that is not a client connection: the
/// database pool and its files, the listener, logs, connections being shed.
pub const FD_RESERVE: u64 = 512;

/// Raises the soft open-file limit to the hard one and says how many client
/// connections it leaves room for.
pub fn connection_capacity() -> u64 {
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
        .unwrap_or(1024);
    limit.saturating_sub(FD_RESERVE)
}

/// Serves `endpoint` on `listener` until `shutdown` turns true; then stops accepting,
/// asks every connection to finish, and waits up to `grace` for their sockets to
/// close before dropping the rest.
#[allow(clippy::too_many_arguments)]
pub async fn serve<E>(
    listener: TcpListener,
    endpoint: E,
    slots: Slots,
    limits: NetLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    takeover: Option<Eligible>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<()>
where
    E: Endpoint + 'static,
{
    let local = listener.local_addr()?;
    let endpoint: Arc<dyn DynEndpoint<Output = poem::Response>> =
        Arc::new(ToDynEndpoint(poem::EndpointExt::map_to_response(endpoint)));
    let (hard_stop, hard_stopped) = watch::channel(false);
    let server = conn::Serving {
        endpoint,
        local,
        tls,
        takeover,
        limits: limits.clone(),
        shutdown: shutdown.clone(),
        hard_stop: hard_stopped,
    };
    accept::accept_until(&listener, &slots, &mut shutdown, |socket, peer, slot| {
        server.spawn(socket, peer, slot)
    })
    .await;
    drop(listener);
    if tokio::time::timeout(grace, slots.all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open = slots.open(),
            "connections still open after the shutdown grace; dropping them"
        );
        let _ = hard_stop.send(true);
    }
    Ok(())
}

/// The address a connection's requests see as `remote_addr`.
pub(crate) fn remote(peer: SocketAddr) -> poem::web::RemoteAddr {
    poem::web::RemoteAddr(poem::Addr::SocketAddr(peer))
}
