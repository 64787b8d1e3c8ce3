//! Command line and environment. Every flag can also be set by an environment variable
//! named `ZONECAST_…`; invalid values fail at start with clap's message.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub const DEFAULT_DATABASE_URL: &str = "sqlite://zonecast.db?mode=rwc";

#[derive(Debug, Parser)]
#[command(
    name = "zonecast",
    version,
    about = "Real-time stock notification server",
    after_help = "The first start on a database without API keys creates an admin key, writes \
it to a file (--admin-key-file, mode 0600) whose path it prints, and on a terminal also \
prints the key itself. To make another admin key at any time:\n  zonecast keys create --name NAME --role admin \
[--database-url URL]"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP, SSE and WebSocket (the default).
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit.
    Migrate {
        #[arg(long, env = "ZONECAST_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
    /// Manage API keys (applies pending migrations first).
    Keys {
        #[arg(long, env = "ZONECAST_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, global = true)]
        database_url: String,
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create a key and print it (alone, on the last line of stdout); it is shown once.
    Create {
        #[arg(long)]
        name: String,
        /// reader, writer or admin.
        #[arg(long)]
        role: crate::domain::Role,
        /// Zone ids the key may use (`1,2`), or `*` for all.
        #[arg(long, default_value = "*")]
        zones: crate::domain::ZoneScope,
        /// The user id the key acts for (its notifications).
        #[arg(long)]
        user: Option<String>,
    },
    /// List keys (never their secrets).
    List,
    /// Revoke a key by name; servers refuse it at once and close its connections.
    Revoke { name: String },
}

/// Parses a size: `65536`, `64KiB`, `64k`, `1MiB`, `1M`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: usize = n
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 65536, 64KiB, 1MiB)"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("{s:?}: unknown unit (B, KiB, MiB)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// How a node learns of events committed by other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    /// One node: every event is one this node committed (SQLite, or PostgreSQL alone).
    Memory,
    /// Several nodes on one PostgreSQL database: LISTEN/NOTIFY plus a sweep.
    Postgres,
}

impl BrokerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Memory => "memory",
            BrokerKind::Postgres => "postgres",
        }
    }
}

/// When a node announces its commits to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NotifyMode {
    /// `pg_notify` right after commit, from a background task: commits do not queue on
    /// PostgreSQL's notification lock; an announcement lost in a crash between commit
    /// and notify is covered by the sweep.
    AfterCommit,
    /// `pg_notify` inside the writing transaction: never lost with its commit, but every
    /// notifying commit in the database takes one global lock at commit.
    InTransaction,
}

/// A node id: what this node's log lines, stats and announcements carry.
fn node_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: 1 to 64 of A-Z a-z 0-9 - _ . :"))
    }
}

/// `HOST-PID`: unique among the nodes of one host, and across hosts with their own
/// names.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(48)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "zonecast".into());
    format!("{host}-{}", std::process::id())
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 15s, 500ms, 7d)"))
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "ZONECAST_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// SQLite (`sqlite://FILE?mode=rwc`) or PostgreSQL (`postgres://…`) URL.
    #[arg(long, env = "ZONECAST_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// Where the first start writes the admin key it creates (mode 0600). Default:
    /// `zonecast-admin-key` beside the SQLite file, else in the working directory.
    #[arg(long, env = "ZONECAST_ADMIN_KEY_FILE")]
    pub admin_key_file: Option<std::path::PathBuf>,

    /// A PEM certificate chain: serve HTTPS (HTTP/2 and HTTP/1.1) instead of HTTP.
    #[arg(long, env = "ZONECAST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The PEM private key of `--tls-cert`.
    #[arg(
        long,
        env = "ZONECAST_TLS_KEY",
        requires = "tls_cert",
        hide_env_values = true
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// Interval of SSE `heartbeat` events.
    #[arg(long, env = "ZONECAST_HEARTBEAT", default_value = "15s", value_parser = duration)]
    pub heartbeat: Duration,

    /// Reconnect delay suggested to SSE clients (`retry:`).
    #[arg(long, env = "ZONECAST_SSE_RETRY", default_value = "2s", value_parser = duration)]
    pub sse_retry: Duration,

    /// Keep change-log events at least this long; older ones are pruned.
    #[arg(long, env = "ZONECAST_RETENTION", default_value = "7d", value_parser = duration)]
    pub retention: Duration,

    /// Keep at most this many events per stream.
    #[arg(long, env = "ZONECAST_RETENTION_EVENTS", default_value_t = 100_000)]
    pub retention_events: u64,

    /// How often retention pruning runs.
    #[arg(long, env = "ZONECAST_PRUNE_INTERVAL", default_value = "5m", value_parser = duration)]
    pub prune_interval: Duration,

    /// Do not create the demo zone on an empty database.
    #[arg(long, env = "ZONECAST_NO_DEMO")]
    pub no_demo: bool,

    /// Events per stream a subscriber may fall behind on the in-process bus before it
    /// is caught up from the cache or the log.
    #[arg(long, env = "ZONECAST_BUS_CAPACITY", default_value_t = 1024)]
    pub bus_capacity: usize,

    /// Recent events per stream kept in memory for replays.
    #[arg(long, env = "ZONECAST_CACHE_EVENTS", default_value_t = 2048)]
    pub cache_events: usize,

    /// Recent events kept in memory over all streams; past it the stream used least
    /// recently is forgotten (its replays read the log).
    #[arg(long, env = "ZONECAST_CACHE_TOTAL_EVENTS", default_value_t = 200_000)]
    pub cache_total_events: usize,

    /// Interval of WebSocket protocol pings; a client silent for two intervals is
    /// closed (1001).
    #[arg(long, env = "ZONECAST_WS_PING", default_value = "30s", value_parser = duration)]
    pub ws_ping: Duration,

    /// A WebSocket connection's outgoing queue, while its socket is not being read:
    /// this many × 256 bytes (replies, pings and events). Once it is full, the
    /// connection's subscriptions stop pulling (they catch up later from the cache or
    /// the log), and a queue that stays full for two ping intervals closes it.
    #[arg(long, env = "ZONECAST_WS_QUEUE", default_value_t = 256)]
    pub ws_queue: usize,

    /// Deliveries (events still to write × watchers) a stream's fan-out on this node
    /// may be behind a change before the change's answer waits for it (at most
    /// --fanout-wait; one event behind never waits); 0 = never wait.
    #[arg(long, env = "ZONECAST_FANOUT_BACKLOG", default_value_t = crate::pace::DEFAULT_BACKLOG)]
    pub fanout_backlog: u64,

    /// Longest a change's answer waits for the fan-out (see --fanout-backlog).
    #[arg(long, env = "ZONECAST_FANOUT_WAIT", default_value = "200ms", value_parser = duration)]
    pub fanout_wait: Duration,

    /// HS256 secret for JWTs (`sub`, `role`, `zones`, `exp`); without it only API keys
    /// are accepted.
    #[arg(long, env = "ZONECAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Let callers without credentials read zone and alert streams and REST reads.
    #[arg(long, env = "ZONECAST_PUBLIC_READ")]
    pub public_read: bool,

    /// Origins allowed by CORS (comma-separated); none means same-origin only.
    #[arg(long, env = "ZONECAST_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,

    /// Writes (REST mutations, WS update_quantity) per second per principal; 0 = off.
    #[arg(long, env = "ZONECAST_WRITE_RATE", default_value_t = 20)]
    pub write_rate: u32,

    /// Writes a principal may make at once before the rate applies.
    #[arg(long, env = "ZONECAST_WRITE_BURST", default_value_t = 40)]
    pub write_burst: u32,

    /// SSE/WS connection opens per second per principal; 0 = off.
    #[arg(long, env = "ZONECAST_CONNECT_RATE", default_value_t = 10)]
    pub connect_rate: u32,

    #[arg(long, env = "ZONECAST_CONNECT_BURST", default_value_t = 50)]
    pub connect_burst: u32,

    /// Failed authentications per second per client address; past it the address
    /// gets 429 instead of 401; 0 = off.
    #[arg(long, env = "ZONECAST_AUTH_FAILURE_RATE", default_value_t = 5)]
    pub auth_failure_rate: u32,

    #[arg(long, env = "ZONECAST_AUTH_FAILURE_BURST", default_value_t = 20)]
    pub auth_failure_burst: u32,

    /// Messages per second per WebSocket connection; 0 = off.
    #[arg(long, env = "ZONECAST_WS_MESSAGE_RATE", default_value_t = 50)]
    pub ws_message_rate: u32,

    #[arg(long, env = "ZONECAST_WS_MESSAGE_BURST", default_value_t = 100)]
    pub ws_message_burst: u32,

    /// How often revocations made elsewhere (the CLI, another node) are picked up.
    #[arg(long, env = "ZONECAST_REVOCATION_CHECK", default_value = "2s", value_parser = duration)]
    pub revocation_check: Duration,

    /// Log format: `text` (human-readable) or `json` (one object per line).
    #[arg(long, env = "ZONECAST_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// A TOML file of settings (`heartbeat = "15s"`, `write-rate = 50`, …), read at
    /// start. Flags and environment variables take precedence over it.
    #[arg(long, env = "ZONECAST_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Test only: answer 503 on every `/sse/…` route, to exercise clients' WebSocket
    /// fallback.
    #[arg(long, hide = true)]
    pub refuse_sse: bool,

    /// Open connections in total (SSE and WebSocket included). Default: 10,000, or
    /// what the open-file limit leaves room for if that is less; a value the limit
    /// cannot honour stops the start. Past it a connection is answered 503 at once.
    #[arg(long, env = "ZONECAST_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Open connections from one client address; 0 = no per-address cap. Behind a
    /// reverse proxy every connection comes from the proxy: raise it or set 0 there.
    #[arg(long, env = "ZONECAST_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: usize,

    /// A new connection must send a complete request head within this (a keep-alive
    /// connection: from the first byte of its next request); a request body must
    /// arrive within it too.
    #[arg(long, env = "ZONECAST_HEADER_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_timeout: Duration,

    /// Largest request body (`65536`, `64KiB`, `1MiB`); larger ones get 413.
    #[arg(long, env = "ZONECAST_MAX_BODY", default_value = "64KiB", value_parser = parse_size)]
    pub max_body: usize,

    /// A keep-alive connection with no request in flight is closed after this.
    #[arg(long, env = "ZONECAST_IDLE_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// `memory` (one node) or `postgres` (several nodes on one PostgreSQL database).
    /// Default: `postgres` with a PostgreSQL URL, else `memory`.
    #[arg(long, env = "ZONECAST_BROKER", value_enum)]
    pub broker: Option<BrokerKind>,

    /// This node's id, in its log lines, `/api/stats`, `/metrics` and the WebSocket
    /// `welcome`; unique per node. Default: HOST-PID.
    #[arg(long, env = "ZONECAST_NODE_ID", value_parser = node_id)]
    pub node_id: Option<String>,

    /// How often a node of several compares its live streams with the log and reads
    /// what it missed (a lost notification costs at most this much latency).
    #[arg(long, env = "ZONECAST_SWEEP_INTERVAL", default_value = "1s", value_parser = duration)]
    pub sweep_interval: Duration,

    /// When a node of several announces its commits: right after commit (default;
    /// see docs/design.md for the measurement) or inside the writing transaction.
    #[arg(
        long,
        env = "ZONECAST_NOTIFY",
        value_enum,
        default_value = "after-commit"
    )]
    pub notify: NotifyMode,

    /// How long shutdown waits for connections to finish.
    #[arg(long, env = "ZONECAST_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,
}

impl ServeArgs {
    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres:") || self.database_url.starts_with("postgresql:")
    }

    /// `--broker`, or what the database URL implies.
    pub fn broker_kind(&self) -> BrokerKind {
        self.broker.unwrap_or(if self.is_postgres() {
            BrokerKind::Postgres
        } else {
            BrokerKind::Memory
        })
    }

    /// `--node-id`, or `HOST-PID`.
    pub fn node(&self) -> String {
        self.node_id.clone().unwrap_or_else(default_node_id)
    }

    /// The file the first admin key goes to when it cannot be shown on a terminal.
    pub fn admin_key_path(&self) -> std::path::PathBuf {
        if let Some(p) = &self.admin_key_file {
            return p.clone();
        }
        let name = "zonecast-admin-key";
        let file = self
            .database_url
            .strip_prefix("sqlite:")
            .map(|rest| rest.trim_start_matches("//"))
            .map(|rest| rest.split('?').next().unwrap_or(rest))
            .filter(|f| !f.is_empty() && *f != ":memory:");
        match file.and_then(|f| std::path::Path::new(f).parent()) {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
            _ => std::path::PathBuf::from(name),
        }
    }

    /// Flags for an embedded server (tests, benchmarks): parsed like the command line.
    pub fn from_flags<I: IntoIterator<Item = S>, S: Into<std::ffi::OsString> + Clone>(
        flags: I,
    ) -> Result<Self, clap::Error> {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let args = std::iter::once(std::ffi::OsString::from("zonecast"))
            .chain(flags.into_iter().map(Into::into));
        Only::try_parse_from(args).map(|o| o.serve)
    }
}

/// Reads the TOML file named by `--config FILE` (or `ZONECAST_CONFIG`) and sets, for
/// each setting not already in the environment, its `ZONECAST_…` variable, so the
/// precedence is: flags, then environment, then the file, then defaults. Keys are the
/// flag names (`write-rate` or `write_rate`); an unknown key is an error.
///
/// Must run before any other thread starts (it sets environment variables).
pub fn apply_config_file<I: IntoIterator<Item = std::ffi::OsString>>(
    args: I,
) -> Result<(), String> {
    use clap::CommandFactory;
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=").map(str::to_owned).or_else(|| {
            (a == "--config")
                .then(|| args.get(i + 1).cloned())
                .flatten()
        })
    });
    let Some(path) = from_args.or_else(|| std::env::var("ZONECAST_CONFIG").ok()) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {path}: {e}"))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {path}: {e}"))?;
    let cmd = Cli::command();
    for (key, value) in table {
        let id = key.replace('-', "_");
        let env = cmd
            .get_arguments()
            .find(|a| a.get_id().as_str() == id)
            .and_then(|a| a.get_env())
            .and_then(|e| e.to_str().map(str::to_owned))
            .ok_or_else(|| format!("config file {path}: unknown setting {key:?}"))?;
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            _ => Err(format!(
                "config file {path}: {key:?} must be a string, number or boolean"
            )),
        };
        let value = match &value {
            toml::Value::Array(items) => items
                .iter()
                .map(scalar)
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            v => scalar(v)?,
        };
        if std::env::var_os(&env).is_none() {
            // SAFETY: called from `main` before the runtime or any thread starts.
            unsafe { std::env::set_var(&env, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1GiB").is_err());
    }
}
