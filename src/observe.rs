//! What an operator watches: Prometheus metrics (`/metrics`), the live connection
//! registry and totals behind `/api/stats`.
//!
//! The metrics recorder is process-global (the `metrics` facade), installed once, before
//! any handle is taken (a handle taken earlier would record nowhere); several servers in
//! one process (tests) share it. The registry is per server. Recording is cheap and
//! never blocks: atomics, and a std `Mutex` held only for map updates on connect and
//! disconnect. Series recorded per delivered or replayed event use handles taken once
//! (`Stats`, `Replays`, `transport::Delivery`); series recorded once per connection,
//! write or refusal look their handle up where they record (a registry read, small
//! next to a transaction or a TCP accept).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::domain::{ResetReason, StreamKey};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder on first use; `None` if another recorder was set.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&buckets)
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
                .inspect(|_| register_known())
        })
        .as_ref()
}

/// Every series zonecast records, as `(name, labels)`: registered at zero at start so
/// that a dashboard or an alert on `rate()` sees them before their first event (the
/// Prometheus instrumentation guide's advice).
pub const COUNTERS: &[(&str, &[(&str, &str)])] = &[
    ("zonecast_connections_opened_total", &[("transport", "sse")]),
    ("zonecast_connections_opened_total", &[("transport", "ws")]),
    ("zonecast_deliveries_total", &[("transport", "sse")]),
    ("zonecast_deliveries_total", &[("transport", "ws")]),
    ("zonecast_send_errors_total", &[]),
    ("zonecast_replayed_events_total", &[("source", "cache")]),
    ("zonecast_replayed_events_total", &[("source", "log")]),
    ("zonecast_log_reads_total", &[]),
    ("zonecast_resets_total", &[("reason", "history_expired")]),
    ("zonecast_resets_total", &[("reason", "unknown_position")]),
    ("zonecast_rate_limited_total", &[("limit", "writes")]),
    ("zonecast_rate_limited_total", &[("limit", "connects")]),
    ("zonecast_rate_limited_total", &[("limit", "ws_messages")]),
    ("zonecast_rate_limited_total", &[("limit", "auth_failures")]),
    (
        "zonecast_connections_refused_total",
        &[("reason", "max_connections")],
    ),
    (
        "zonecast_connections_refused_total",
        &[("reason", "max_connections_per_ip")],
    ),
    (
        "zonecast_connections_timed_out_total",
        &[("phase", "header")],
    ),
    ("zonecast_connections_timed_out_total", &[("phase", "idle")]),
    ("zonecast_accept_errors_total", &[("kind", "resources")]),
    ("zonecast_accept_errors_total", &[("kind", "connection")]),
    ("zonecast_bus_reconnects_total", &[]),
    ("zonecast_bus_payloads_total", &[("direction", "sent")]),
    ("zonecast_bus_payloads_total", &[("direction", "received")]),
    (
        "zonecast_bus_events_received_total",
        &[("via", "notification")],
    ),
    (
        "zonecast_bus_events_received_total",
        &[("via", "reference")],
    ),
    ("zonecast_bus_events_received_total", &[("via", "sweep")]),
    ("zonecast_bus_dropped_total", &[("reason", "outbox_full")]),
    ("zonecast_bus_dropped_total", &[("reason", "notify_failed")]),
    ("zonecast_bus_dropped_total", &[("reason", "malformed")]),
    ("zonecast_sweeps_total", &[]),
    ("zonecast_fanout_wait_timeouts_total", &[]),
];

/// The event types of each stream kind, for `zonecast_events_appended_total`.
pub const EVENT_TYPES: &[(&str, &[&str])] = &[
    (
        "zone",
        &[
            "item_created",
            "stock_updated",
            "item_updated",
            "item_deleted",
        ],
    ),
    ("alerts", &["low_stock_alert", "announcement"]),
    (
        "user",
        &["notification", "notification_read", "unread_count"],
    ),
];

fn register_known() {
    for (name, labels) in COUNTERS {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        metrics::counter!(*name, labels).increment(0);
    }
    for (kind, types) in EVENT_TYPES {
        for t in *types {
            metrics::counter!("zonecast_events_appended_total", "stream_kind" => *kind, "type" => *t)
                .increment(0);
        }
    }
    for t in ["sse", "ws"] {
        metrics::gauge!("zonecast_connections", "transport" => t).increment(0.0);
    }
    metrics::gauge!("zonecast_tcp_connections").increment(0.0);
    metrics::gauge!("zonecast_bus_listening").increment(0.0);
    let _ = metrics::histogram!("zonecast_write_duration_seconds");
    let _ = metrics::histogram!("zonecast_write_group_size");
    let _ = metrics::histogram!("zonecast_delivery_lag_seconds");
}

/// The transport of a connection, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse = 0,
    Ws = 1,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

struct ConnInfo {
    transport: Transport,
    user: Option<String>,
    streams: Vec<StreamKey>,
}

/// Live connections and totals of one server.
pub struct Stats {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, ConnInfo>>,
    messages_sent: AtomicU64,
    broadcasts: AtomicU64,
    send_errors: AtomicU64,
    /// Milliseconds since the epoch of the last publish; 0 for never.
    last_broadcast_ms: AtomicU64,
    /// Metric handles, taken once (a registry lookup per delivery costs more than the
    /// delivery's bookkeeping): `[sse, ws]`.
    deliveries: [metrics::Counter; 2],
    send_error_total: metrics::Counter,
    fanout: FanoutCounts,
}

/// The SSE fan-out (`transport::fanout`): its groups (one per stream with members),
/// the connections in them, and how often one was handed back to follow on its own
/// (a socket that could not take a whole batch, or a join too far behind).
struct FanoutCounts {
    groups: AtomicU64,
    members: AtomicU64,
    handed_back: AtomicU64,
    groups_gauge: metrics::Gauge,
    members_gauge: metrics::Gauge,
    handed_back_total: metrics::Counter,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            next_id: AtomicU64::new(0),
            conns: Mutex::default(),
            messages_sent: AtomicU64::new(0),
            broadcasts: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            last_broadcast_ms: AtomicU64::new(0),
            deliveries: [Transport::Sse, Transport::Ws]
                .map(|t| metrics::counter!("zonecast_deliveries_total", "transport" => t.label())),
            send_error_total: metrics::counter!("zonecast_send_errors_total"),
            fanout: FanoutCounts {
                groups: AtomicU64::new(0),
                members: AtomicU64::new(0),
                handed_back: AtomicU64::new(0),
                groups_gauge: metrics::gauge!("zonecast_sse_fanout_groups"),
                members_gauge: metrics::gauge!("zonecast_sse_fanout_members"),
                handed_back_total: metrics::counter!("zonecast_sse_handed_back_total"),
            },
        }
    }
}

/// Events served to cursors from memory and from the change log, on one node, and the
/// resets they yielded.
pub struct Replays {
    from_cache: AtomicU64,
    from_log: AtomicU64,
    /// Queries for events or bounds (a fill or a resume the cache could not answer).
    log_queries: AtomicU64,
    /// Metric handles, taken once: `[cache, log]` and `[history_expired, unknown_position]`.
    replayed: [metrics::Counter; 2],
    resets: [metrics::Counter; 2],
    log_reads: metrics::Counter,
}

impl Default for Replays {
    fn default() -> Self {
        Replays {
            from_cache: AtomicU64::new(0),
            from_log: AtomicU64::new(0),
            log_queries: AtomicU64::new(0),
            replayed: ["cache", "log"]
                .map(|s| metrics::counter!("zonecast_replayed_events_total", "source" => s)),
            resets: [ResetReason::HistoryExpired, ResetReason::UnknownPosition]
                .map(|r| metrics::counter!("zonecast_resets_total", "reason" => r.as_str())),
            log_reads: metrics::counter!("zonecast_log_reads_total"),
        }
    }
}

/// `Replays` read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayCounts {
    pub from_cache: u64,
    pub from_log: u64,
    pub log_queries: u64,
}

impl Replays {
    pub fn counts(&self) -> ReplayCounts {
        ReplayCounts {
            from_cache: self.from_cache.load(Ordering::Relaxed),
            from_log: self.from_log.load(Ordering::Relaxed),
            log_queries: self.log_queries.load(Ordering::Relaxed),
        }
    }

    pub fn served_from_cache(&self, n: u64) {
        self.from_cache.fetch_add(n, Ordering::Relaxed);
        self.replayed[0].increment(n);
    }

    pub fn served_from_log(&self, n: u64) {
        self.from_log.fetch_add(n, Ordering::Relaxed);
        self.replayed[1].increment(n);
    }

    pub fn queried_log(&self) {
        self.log_queries.fetch_add(1, Ordering::Relaxed);
        self.log_reads.increment(1);
    }

    pub fn reset(&self, reason: ResetReason) {
        self.resets[match reason {
            ResetReason::HistoryExpired => 0,
            ResetReason::UnknownPosition => 1,
        }]
        .increment(1);
    }
}

/// Registration of one connection; dropping it unregisters.
pub struct ConnGuard {
    stats: Arc<Stats>,
    id: u64,
    transport: Transport,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.stats.conns().remove(&self.id);
        metrics::gauge!("zonecast_connections", "transport" => self.transport.label())
            .decrement(1.0);
    }
}

impl ConnGuard {
    pub fn add_stream(&self, stream: &StreamKey) {
        if let Some(c) = self.stats.conns().get_mut(&self.id) {
            c.streams.push(stream.clone());
        }
    }

    pub fn remove_stream(&self, stream: &StreamKey) {
        if let Some(c) = self.stats.conns().get_mut(&self.id) {
            c.streams.retain(|s| s != stream);
        }
    }
}

/// `/api/stats` as numbers.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub total_connections: usize,
    pub connections_by_stream: BTreeMap<String, usize>,
    pub connections_by_transport: BTreeMap<String, usize>,
    pub unique_users: usize,
    pub total_messages_sent: u64,
    pub total_broadcasts: u64,
    pub total_send_errors: u64,
    pub last_broadcast_at: Option<DateTime<Utc>>,
    pub fanout_groups: u64,
    pub fanout_members: u64,
    pub fanout_handed_back: u64,
}

impl Stats {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnInfo>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connect(self: &Arc<Self>, transport: Transport, user: Option<&str>) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns().insert(
            id,
            ConnInfo {
                transport,
                user: user.map(str::to_owned),
                streams: Vec::new(),
            },
        );
        metrics::gauge!("zonecast_connections", "transport" => transport.label()).increment(1.0);
        metrics::counter!("zonecast_connections_opened_total", "transport" => transport.label())
            .increment(1);
        ConnGuard {
            stats: self.clone(),
            id,
            transport,
        }
    }

    /// `n` messages written to one connection.
    pub fn sent(&self, transport: Transport, n: u64) {
        self.messages_sent.fetch_add(n, Ordering::Relaxed);
        self.deliveries[transport as usize].increment(n);
    }

    /// A fan-out group started (`true`) or ended.
    pub fn fanout_group(&self, started: bool) {
        let f = &self.fanout;
        if started {
            f.groups.fetch_add(1, Ordering::Relaxed);
            f.groups_gauge.increment(1.0);
        } else {
            f.groups.fetch_sub(1, Ordering::Relaxed);
            f.groups_gauge.decrement(1.0);
        }
    }

    /// A connection joined a fan-out group (`true`) or left it.
    pub fn fanout_member(&self, joined: bool) {
        let f = &self.fanout;
        if joined {
            f.members.fetch_add(1, Ordering::Relaxed);
            f.members_gauge.increment(1.0);
        } else {
            f.members.fetch_sub(1, Ordering::Relaxed);
            f.members_gauge.decrement(1.0);
        }
    }

    /// A fan-out group handed a connection back to follow on its own.
    pub fn handed_back(&self) {
        self.fanout.handed_back.fetch_add(1, Ordering::Relaxed);
        self.fanout.handed_back_total.increment(1);
    }

    pub fn send_error(&self) {
        self.send_errors.fetch_add(1, Ordering::Relaxed);
        self.send_error_total.increment(1);
    }

    pub fn broadcast(&self, n: u64) {
        self.broadcasts.fetch_add(n, Ordering::Relaxed);
        let ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        self.last_broadcast_ms.store(ms, Ordering::Relaxed);
    }

    /// The registry, whole (`visible` is `None`), or as seen by someone who may see
    /// only the streams `visible` accepts: then a connection counts if it reads one of
    /// them, and only those streams are listed.
    pub fn snapshot(&self, visible: Option<&dyn Fn(&StreamKey) -> bool>) -> Snapshot {
        let conns = self.conns();
        let mut by_stream = BTreeMap::new();
        let mut by_transport = BTreeMap::new();
        let mut users = std::collections::HashSet::new();
        let mut total = 0;
        for c in conns.values() {
            let seen: Vec<&StreamKey> = match visible {
                None => c.streams.iter().collect(),
                Some(v) => c.streams.iter().filter(|s| v(s)).collect(),
            };
            if visible.is_some() && seen.is_empty() {
                continue;
            }
            total += 1;
            *by_transport
                .entry(c.transport.label().to_owned())
                .or_insert(0) += 1;
            for s in seen {
                *by_stream.entry(s.to_string()).or_insert(0) += 1;
            }
            if let Some(u) = &c.user {
                users.insert(u.clone());
            }
        }
        let last = self.last_broadcast_ms.load(Ordering::Relaxed);
        Snapshot {
            total_connections: total,
            connections_by_stream: by_stream,
            connections_by_transport: by_transport,
            unique_users: users.len(),
            total_messages_sent: self.messages_sent.load(Ordering::Relaxed),
            total_broadcasts: self.broadcasts.load(Ordering::Relaxed),
            total_send_errors: self.send_errors.load(Ordering::Relaxed),
            last_broadcast_at: (last > 0)
                .then(|| DateTime::from_timestamp_millis(last as i64))
                .flatten(),
            fanout_groups: self.fanout.groups.load(Ordering::Relaxed),
            fanout_members: self.fanout.members.load(Ordering::Relaxed),
            fanout_handed_back: self.fanout.handed_back.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventKind;

    #[test]
    fn the_registered_event_types_are_every_event_kind() {
        let registered: Vec<(&str, &str)> = EVENT_TYPES
            .iter()
            .flat_map(|(kind, types)| types.iter().map(move |t| (*kind, *t)))
            .collect();
        let kinds: Vec<(&str, &str)> = EventKind::ALL
            .iter()
            .map(|k| (k.stream_kind(), k.as_str()))
            .collect();
        assert_eq!(registered, kinds);
    }
}
