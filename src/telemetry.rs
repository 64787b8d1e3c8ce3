//! Logging setup. Called by `main` only, so embedded servers (tests, benchmarks) stay
//! quiet unless they install a subscriber themselves. Logs go to stderr.

use tracing_subscriber::EnvFilter;

/// `text` (human-readable) or `json` (one object per line, with the fields of the
/// enclosing spans such as `request_id` and `connection`). `RUST_LOG` overrides the
/// default filter (`info`, SQL statements only from `warn`).
pub fn init(format: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init();
    } else {
        builder.init();
    }
}
