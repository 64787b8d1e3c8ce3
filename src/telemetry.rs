//! Logging setup. Called by `main` only, so embedded servers (tests, benchmarks) stay
//! quiet unless they install a subscriber themselves.

use tracing_subscriber::EnvFilter;

/// Human-readable logs on stderr; `RUST_LOG` overrides the default (`info`, SQL
/// statements only from `warn`).
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
