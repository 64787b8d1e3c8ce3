//! Builds the server from its configuration (store, broker, service, routes), binds the
//! listener (port 0 works, for tests), and runs it until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use poem::endpoint::make_sync;
use poem::{EndpointExt, Route, get};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::broker::{Broker, Local};
use crate::broker_memory::MemoryBroker;
use crate::broker_postgres::{BusOptions, PostgresBroker};
use crate::config::{BrokerKind, ServeArgs};
use crate::credentials::Authenticator;
use crate::domain::{Principal, Role, Zone, ZoneScope};
use crate::limits::{Limits, Rate, Rates};
use crate::observe::Stats;
use crate::server::{self, NetLimits};
use crate::service::{Service, ServiceError};
use crate::state::AppState;
use crate::store::{Store, StoreError};
use crate::{api, http, ops, pages, transport};

/// Why the server did not start. Each message carries its cause's text once (no
/// `source()` chain to print again below it), and says what to do where it can.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the database {url}: {error}")]
    Store { url: String, error: StoreError },
    #[error("cannot prepare the demo data or the first admin key: {0}")]
    Setup(ServiceError),
    #[error(
        "cannot listen on {addr}: {error} (is another server using it? --bind picks another address)"
    )]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(
        "--max-connections {requested} cannot be honoured: the open-file limit leaves room \
         for {available} connections (raise it with `ulimit -n`, or lower --max-connections)"
    )]
    Capacity { requested: usize, available: u64 },
    #[error("--max-connections-per-ip {per_ip} is above --max-connections {total}")]
    PerIp { per_ip: usize, total: usize },
    #[error("--tls-cert/--tls-key: {0}")]
    Tls(String),
    #[error("{0}")]
    Broker(String),
}

impl From<ServiceError> for StartError {
    fn from(e: ServiceError) -> Self {
        StartError::Setup(e)
    }
}

/// A database URL fit for a message: without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Connections allowed when `--max-connections` is not given, if the open-file limit
/// leaves room for them.
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The connection caps of `config`, checked against the process's open-file limit.
fn net_limits(config: &ServeArgs) -> Result<NetLimits, StartError> {
    let available = server::connection_capacity();
    let fits = |n: usize| u64::try_from(n).is_ok_and(|n| n <= available);
    let max_connections = match config.max_connections {
        Some(n) if fits(n) => n,
        Some(requested) => {
            return Err(StartError::Capacity {
                requested,
                available,
            });
        }
        None => usize::try_from(available)
            .unwrap_or(usize::MAX)
            .clamp(1, DEFAULT_MAX_CONNECTIONS),
    };
    if config.max_connections_per_ip > max_connections {
        return Err(StartError::PerIp {
            per_ip: config.max_connections_per_ip,
            total: max_connections,
        });
    }
    Ok(NetLimits {
        max_connections,
        max_per_ip: config.max_connections_per_ip,
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
    })
}

pub struct Application {
    listener: TcpListener,
    net: NetLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
    state: AppState,
    stop: watch::Sender<bool>,
    demo: Option<Zone>,
    first_admin_key: Option<String>,
}

/// Connections the kernel may hold for `accept`. A reconnect storm (every client of a
/// node that went away, at once) comes faster than any accept loop drains it; with
/// tokio's default of 1,024, the handshakes past it waited for the clients' SYN
/// retries (1 s, 3 s, 7 s…): 10,000 SSE clients took 25 s to catch up instead of 2.
/// The kernel caps it at `net.core.somaxconn` (4,096 by default on current kernels).
const LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `addr` with `LISTEN_BACKLOG`, address reuse as tokio's `bind` has it.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

impl Application {
    pub async fn build(config: ServeArgs) -> Result<Self, StartError> {
        let net = net_limits(&config)?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                Some(server::tls::acceptor(cert, key).map_err(StartError::Tls)?)
            }
            _ => None,
        };
        // Bind before anything is written: a start that cannot listen must leave the
        // database as it found it, or its first admin key would be made and lost.
        let listener = listen(config.bind).map_err(|error| StartError::Bind {
            addr: config.bind,
            error,
        })?;
        let addr = listener.local_addr().unwrap_or(config.bind);
        let db_error = |error| StartError::Store {
            url: redact(&config.database_url),
            error,
        };
        // Before any metric handle is taken: a handle taken earlier records nowhere.
        crate::observe::prometheus();
        let store = Store::open(&config.database_url).await.map_err(db_error)?;
        let node = config.node();
        let local = Local::new(
            config.bus_capacity,
            config.cache_events,
            config.cache_total_events,
        )
        .wake_from_thread()
        .map_err(|e| StartError::Broker(format!("cannot start the waker thread: {e}")))?;
        let broker: Arc<dyn Broker> = match config.broker_kind() {
            BrokerKind::Memory => Arc::new(MemoryBroker::new(local)),
            BrokerKind::Postgres if !config.is_postgres() => {
                return Err(StartError::Broker(
                    "--broker postgres needs a PostgreSQL --database-url (postgres://…); \
                     with SQLite zonecast serves one node"
                        .into(),
                ));
            }
            BrokerKind::Postgres => {
                let opts = BusOptions {
                    url: config.database_url.clone(),
                    node: node.clone(),
                    sweep_interval: config.sweep_interval,
                    notify: config.notify,
                };
                let b = PostgresBroker::new(store.clone(), local, opts)
                    .await
                    .map_err(db_error)?;
                Arc::new(b)
            }
        };
        metrics::gauge!("zonecast_node_info", "node" => node.clone(),
            "broker" => config.broker_kind().as_str())
        .set(1.0);
        let service = Service::new(store, broker, Arc::new(Stats::default())).with_pace(
            crate::pace::Pace::new(config.fanout_backlog, config.fanout_wait),
        );
        // Several nodes may start at once on a new database: one at a time seeds it and
        // makes the first admin key; the others then find both done.
        let setup = service.store.setup_lock().await.map_err(db_error)?;
        let demo = if config.no_demo {
            None
        } else {
            service.seed_demo().await?
        };
        // A first start with no keys creates an admin key, shown once.
        let first_admin_key = if service.store.api_key_count().await.map_err(db_error)? == 0 {
            let system = Principal::system("setup");
            let (_, secret) = service
                .create_key(&system, "admin", Role::Admin, ZoneScope::All, None)
                .await?;
            Some(secret)
        } else {
            None
        };
        if let Some(lock) = setup {
            lock.commit().await.map_err(|e| db_error(e.into()))?;
        }
        let auth = Authenticator::new(
            service.store.clone(),
            config.jwt_secret.as_deref(),
            config.public_read,
        );
        auth.refresh_revocations().await.map_err(db_error)?;
        let limits = Arc::new(Limits::new(Rates {
            writes: Rate {
                per_second: config.write_rate,
                burst: config.write_burst,
            },
            connects: Rate {
                per_second: config.connect_rate,
                burst: config.connect_burst,
            },
            auth_failures: Rate {
                per_second: config.auth_failure_rate,
                burst: config.auth_failure_burst,
            },
            ws_messages: Rate {
                per_second: config.ws_message_rate,
                burst: config.ws_message_burst,
            },
        }));
        let (stop, shutdown) = watch::channel(false);
        let slots = server::Slots::new(net.max_connections, net.max_per_ip);
        Ok(Application {
            listener,
            net,
            tls,
            addr,
            state: AppState {
                node: node.into(),
                service,
                config: Arc::new(config),
                auth,
                limits,
                shutdown,
                slots,
            },
            stop,
            demo,
            first_admin_key,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://ADDR` or, with TLS, `https://ADDR`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn service(&self) -> &Service {
        &self.state.service
    }

    /// The demo zone, if this start created it.
    pub fn demo_zone(&self) -> Option<&Zone> {
        self.demo.as_ref()
    }

    /// The admin key this start created (first start on a database with no keys).
    pub fn first_admin_key(&self) -> Option<&str> {
        self.first_admin_key.as_deref()
    }

    /// Serves until `signal` completes, then ends every stream and waits up to the
    /// configured grace for connections to close.
    pub async fn run_until_stopped(
        self,
        signal: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let state = self.state;
        let pruner = tokio::spawn(prune_forever(state.clone()));
        let upkeep = tokio::spawn(upkeep_forever(state.clone()));
        let bus = tokio::spawn(state.service.broker().clone().run());
        let grace = state.config.shutdown_grace;
        let stop = self.stop;
        let signal = async move {
            signal.await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
        };
        tracing::info!(addr = %self.addr, node = %state.node, broker = state.config.broker_kind().as_str(),
            max_connections = self.net.max_connections,
            max_connections_per_ip = self.net.max_per_ip, "listening");
        let serve = server::serve(
            self.listener,
            routes(state.clone()),
            state.slots.clone(),
            self.net,
            self.tls,
            Some(transport::sse::takes_over),
            state.shutdown.clone(),
            grace,
        );
        tokio::pin!(serve);
        let result = tokio::select! {
            r = &mut serve => r,
            _ = signal => serve.await,
        };
        pruner.abort();
        upkeep.abort();
        bus.abort();
        result
    }
}

pub fn routes(state: AppState) -> impl poem::Endpoint {
    let api = api::service(&state);
    let origins = state.config.cors_origin.clone();
    let docs = api.swagger_ui();
    let spec = api.spec_endpoint();
    Route::new()
        .nest("/api", api)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .at("/sse/zones/:zone_id/stock", get(transport::sse::zone_stock))
        .at("/sse/alerts", get(transport::sse::alerts))
        .at("/sse/notifications", get(transport::sse::notifications))
        .at("/sse/streams", get(transport::sse_multi::streams))
        .at("/ws", get(transport::ws::plain_socket))
        .at("/ws/zones/:zone_id", get(transport::ws::zone_socket))
        .at("/healthz", get(make_sync(|_| "ok")))
        .at("/readyz", get(ops::readyz))
        .at("/metrics", get(ops::metrics))
        .at("/", get(pages::index))
        .at("/index.html", get(pages::index))
        .at("/zonecast.js", get(pages::client))
        .at("/sse-client.html", get(pages::sse_client))
        .at("/ws-client.html", get(pages::ws_client))
        .around(http::body::limit_body)
        .around(http::access::limit_writes)
        .around(http::access::authenticate)
        .around(pages::refuse_sse)
        .with_if(
            !origins.is_empty(),
            poem::middleware::Cors::new()
                .allow_origins(origins)
                .allow_methods([
                    poem::http::Method::GET,
                    poem::http::Method::POST,
                    poem::http::Method::PATCH,
                    poem::http::Method::DELETE,
                    poem::http::Method::OPTIONS,
                ])
                .allow_headers([
                    "authorization",
                    "x-api-key",
                    "content-type",
                    "idempotency-key",
                    "last-event-id",
                    "x-request-id",
                ])
                .expose_headers(["retry-after", "x-request-id"]),
        )
        // Outside CORS, so that its refusals are problem+json too.
        .around(http::problem::problems)
        .around(ops::request_span)
        .data(transport::sse_socket::fanout(state.clone()))
        .data(state)
}

/// Picks up revocations made elsewhere (the CLI) and forgets idle rate-limit keys.
async fn upkeep_forever(state: AppState) {
    let mut tick = tokio::time::interval(state.config.revocation_check);
    loop {
        tick.tick().await;
        if let Err(e) = state.auth.refresh_revocations().await {
            tracing::warn!(error = %e, "cannot read revocations; will retry");
        }
        state.limits.prune();
        if let Some(p) = crate::observe::prometheus() {
            p.run_upkeep();
        }
    }
}

async fn prune_forever(state: AppState) {
    let cfg = &state.config;
    let mut tick = tokio::time::interval(cfg.prune_interval);
    loop {
        tick.tick().await;
        match state
            .service
            .prune(cfg.retention, cfg.retention_events)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "pruned the change log"),
            Err(e) => tracing::warn!(error = %e, "pruning failed; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of connections larger than tokio's default backlog (1,024) is taken in
    /// by the kernel while the server has not accepted any yet: none waits for a SYN
    /// retry (the first comes after 1 s).
    #[tokio::test]
    async fn a_connection_burst_beyond_1024_waits_for_no_retry() {
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        // Past 1,024 where the host allows it; up to the kernel's cap otherwise.
        let burst = cap.min(2000);
        let _ = rlimit::increase_nofile_limit(burst as u64 * 2 + 256);
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..burst {
            clients.spawn(tokio::time::timeout(
                std::time::Duration::from_millis(900),
                tokio::net::TcpStream::connect(addr),
            ));
        }
        let mut held = Vec::with_capacity(burst);
        let mut late = 0;
        while let Some(c) = clients.join_next().await {
            match c.expect("task") {
                Ok(Ok(tcp)) => held.push(tcp),
                Ok(Err(e)) => panic!("connect: {e}"),
                Err(_) => late += 1,
            }
        }
        assert_eq!(
            late, 0,
            "{late} of {burst} connections waited for a SYN retry"
        );
        drop(listener);
    }
}
