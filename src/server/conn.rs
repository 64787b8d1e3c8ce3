//! One admitted connection: its socket with the header and idle deadlines, and hyper
//! serving it with the poem endpoint.
//!
//! The deadlines live in the socket wrapper's `poll_read`, so they cost no task or
//! timer wheel entry beyond one `Sleep` per connection, and they keep applying to the
//! bytes hyper reads, whatever HTTP version it speaks.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use poem::endpoint::DynEndpoint;
use poem::http::uri::Scheme;
use poem::web::LocalAddr;
use poem::{Addr, Endpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::NetLimits;
use super::accept::Slot;
use super::takeover::{self, Eligible, Head, Prefixed, RawConnection};

/// Largest request head (and pipelined bytes) hyper buffers for one connection.
const MAX_HEAD: usize = 64 * 1024;

/// A peer that acknowledges nothing of what is sent to it for this long is gone (its
/// network went away without a FIN or RST). Without it, the kernel retries for about
/// 15 minutes, and a vanished SSE client stays registered that long; with it, the
/// next heartbeat after this long ends the connection.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Socket options for a client connection; failures only lose the optimisation.
fn tune(tcp: &TcpStream) {
    // Frames are coalesced before they are written; Nagle would only delay them.
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&keepalive);
    #[cfg(target_os = "linux")]
    let _ = sock.set_tcp_user_timeout(Some(PEER_TIMEOUT));
}

pub(super) struct Serving {
    pub endpoint: Arc<dyn DynEndpoint<Output = poem::Response>>,
    pub local: SocketAddr,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// First requests of plain connections answered outside hyper (`takeover`).
    pub takeover: Option<Eligible>,
    pub limits: NetLimits,
    pub shutdown: watch::Receiver<bool>,
    pub hard_stop: watch::Receiver<bool>,
}

/// What the deadlines depend on, shared by the socket and the requests on it.
struct Activity {
    state: Mutex<ActivityState>,
    /// The task reading the socket, woken when the last request in flight ends so
    /// that the idle deadline is armed.
    reader: AtomicWaker,
}

struct ActivityState {
    accepted: Instant,
    /// Requests whose head has been read and whose response has not been sent.
    in_flight: usize,
    /// At least one request head arrived.
    served: bool,
    /// Switched protocols (WebSocket): the transport keeps its own deadlines.
    upgraded: bool,
    /// When the connection last had nothing in flight.
    idle_since: Instant,
    /// The first byte of the next request head, while nothing is in flight.
    head_started: Option<Instant>,
}

/// Which deadline expired, as a metric label.
fn phase(s: &ActivityState) -> &'static str {
    if !s.served || s.head_started.is_some() {
        "header"
    } else {
        "idle"
    }
}

impl Activity {
    fn new() -> Self {
        let now = Instant::now();
        Activity {
            state: Mutex::new(ActivityState {
                accepted: now,
                in_flight: 0,
                served: false,
                upgraded: false,
                idle_since: now,
                head_started: None,
            }),
            reader: AtomicWaker::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deadline(&self, limits: &NetLimits) -> Option<Instant> {
        let s = self.state();
        if s.upgraded || s.in_flight > 0 {
            return None;
        }
        Some(if !s.served {
            s.accepted + limits.header_timeout
        } else if let Some(t) = s.head_started {
            t + limits.header_timeout
        } else {
            s.idle_since + limits.idle_timeout
        })
    }

    fn bytes_read(&self) {
        let mut s = self.state();
        if s.in_flight == 0 && s.head_started.is_none() {
            s.head_started = Some(Instant::now());
        }
    }
}

/// Counts one request in flight from its head to the end of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> Self {
        let mut s = activity.state();
        s.in_flight += 1;
        s.served = true;
        s.head_started = None;
        drop(s);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            drop(s);
            self.0.reader.wake();
        }
    }
}

/// The client socket with its deadlines and its slot.
struct Socket {
    io: TcpStream,
    activity: Arc<Activity>,
    limits: NetLimits,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    slot: Slot,
}

impl AsyncRead for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.activity.bytes_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.activity.reader.register(cx.waker());
                let Some(deadline) = this.activity.deadline(&this.limits) else {
                    return Poll::Pending;
                };
                if this.armed != Some(deadline) {
                    this.timer.as_mut().reset(deadline);
                    this.armed = Some(deadline);
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    let label = phase(&this.activity.state());
                    metrics::counter!("zonecast_connections_timed_out_total", "phase" => label)
                        .increment(1);
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{label} deadline passed"),
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

type PoemBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// What hyper serves a connection with: the poem endpoint, its responses tracked.
trait ConnService:
    hyper::service::Service<
        hyper::Request<Incoming>,
        Response = hyper::Response<Tracked<PoemBody>>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> ConnService for S where
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<Tracked<PoemBody>>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

impl Serving {
    pub fn spawn(&self, tcp: TcpStream, peer: SocketAddr, slot: Slot) {
        tune(&tcp);
        let activity = Arc::new(Activity::new());
        let socket = Socket {
            io: tcp,
            activity: activity.clone(),
            limits: self.limits.clone(),
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            armed: None,
            slot,
        };
        let endpoint = self.endpoint.clone();
        let first = self.endpoint.clone();
        let local = LocalAddr(Addr::SocketAddr(self.local));
        let remote = super::remote(peer);
        let addrs = (local.clone(), remote.clone());
        let scheme = if self.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let in_flight = InFlight::start(&activity);
            let endpoint = endpoint.clone();
            let req = poem::Request::from((req, local.clone(), remote.clone(), scheme.clone()));
            async move {
                let resp = endpoint.get_response(req).await;
                if resp.status() == poem::http::StatusCode::SWITCHING_PROTOCOLS {
                    in_flight.0.state().upgraded = true;
                }
                let resp: hyper::Response<PoemBody> = resp.into();
                Ok::<_, std::convert::Infallible>(resp.map(|inner| Tracked {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        });
        let shutdown = self.shutdown.clone();
        let hard_stop = self.hard_stop.clone();
        // One task type for each: a task is as large as its largest state, and the TLS
        // one (handshake, then hyper over the TLS stream) would make every plain
        // connection pay for it.
        match (self.tls.clone(), self.takeover) {
            (None, None) => {
                tokio::spawn(serve_io(socket, service, shutdown, hard_stop));
            }
            (None, Some(eligible)) => {
                let plain = Plain {
                    endpoint: first,
                    addrs,
                    peer,
                    eligible,
                };
                tokio::spawn(plain.serve(socket, service, shutdown, hard_stop));
            }
            // The handshake reads through the socket, under its header deadline.
            (Some(tls), _) => {
                tokio::spawn(async move {
                    match tls.accept(socket).await {
                        Ok(stream) => serve_io(stream, service, shutdown, hard_stop).await,
                        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                    }
                });
            }
        }
    }
}

/// A plain connection whose first request may be answered outside hyper
/// (`takeover`).
struct Plain {
    endpoint: Arc<dyn DynEndpoint<Output = poem::Response>>,
    addrs: (LocalAddr, poem::web::RemoteAddr),
    peer: SocketAddr,
    eligible: Eligible,
}

impl Plain {
    async fn serve<S>(
        self,
        mut socket: Socket,
        service: S,
        mut shutdown: watch::Receiver<bool>,
        mut hard_stop: watch::Receiver<bool>,
    ) where
        S: ConnService,
    {
        let mut buf = BytesMut::with_capacity(1024);
        let head = tokio::select! {
            h = takeover::read_head(&mut socket, &mut buf, self.eligible, MAX_HEAD) => h,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let parts = match head {
            Ok(Head::Eligible(parts)) => *parts,
            Ok(Head::Other) => {
                let io = Prefixed::new(buf.freeze(), socket);
                return serve_io(io, service, shutdown, hard_stop).await;
            }
            // Closed, reset, or the header deadline passed.
            Ok(Head::Closed) | Err(_) => return,
        };
        drop(service);
        let (local, remote) = self.addrs;
        let parts = poem::RequestParts::from((parts, local, remote, Scheme::HTTP));
        let mut req = poem::Request::from_parts(parts, poem::Body::empty());
        req.extensions_mut().insert(takeover::Answered);
        let resp = self.endpoint.get_response(req).await;
        if let Some((hand_over, head)) = takeover::taken(&resp) {
            drop(resp);
            let Socket { io, slot, .. } = socket;
            hand_over(RawConnection {
                tcp: io,
                peer: self.peer,
                head,
                slot,
            });
            return;
        }
        tokio::select! {
            _ = takeover::write_response(&mut socket, resp) => {}
            _ = hard_stop.wait_for(|stop| *stop) => {}
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection until it ends or the server stops.
async fn serve_io<I, S>(
    io: I,
    service: S,
    mut shutdown: watch::Receiver<bool>,
    mut hard_stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .half_close(false)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .max_concurrent_streams(200)
        .max_pending_accept_reset_streams(20)
        .max_header_list_size(16 * 1024);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = shutdown.wait_for(|stop| *stop) => conn.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        _ = conn => {}
        _ = hard_stop.wait_for(|stop| *stop) => {}
    }
}
