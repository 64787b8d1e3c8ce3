//! Logging setup. Called by `main` only, so embedded servers (tests, benchmarks) stay
//! quiet unless they install a subscriber themselves. Logs go to stderr.

use tracing_subscriber::EnvFilter;

/// `text` (human-readable; coloured only on a terminal) or `json` (one object per line,
/// with the fields of the enclosing spans such as `request_id` and `connection`).
/// `RUST_LOG` overrides the default filter (`info`; SQL statements and migration steps
/// only from `warn`).
pub fn init(format: &str) {
    use std::io::IsTerminal;
    // sea-orm's migrator logs every step at INFO; `Store::open` says what it applied.
    let quiet = ["sqlx=warn", "sea_orm_migration=warn"];
    let filter = match std::env::var("RUST_LOG") {
        // A `RUST_LOG` that does not name them keeps them quiet too.
        Ok(spec) if !spec.trim().is_empty() => {
            let mut f = EnvFilter::new(&spec);
            for d in quiet {
                let target = d.split('=').next().unwrap_or(d);
                if !spec.contains(target)
                    && let Ok(d) = d.parse()
                {
                    f = f.add_directive(d);
                }
            }
            f
        }
        _ => EnvFilter::new(format!("info,{}", quiet.join(","))),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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
