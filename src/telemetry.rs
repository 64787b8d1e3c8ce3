//! Logging setup. Called by `main` only, so embedded servers (tests, benchmarks) stay
//! quiet unless they install a subscriber themselves. Logs go to stderr.

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format as line_format};
use tracing_subscriber::registry::LookupSpan;

/// Puts the node id on every line: first in a text line, as the first member
/// (`"node"`) of a JSON one, so the logs of several nodes can be told apart merged.
struct WithNode<E> {
    node: String,
    json: bool,
    inner: E,
}

impl<S, N, E> FormatEvent<S, N> for WithNode<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        if !self.json {
            write!(writer, "{} ", self.node)?;
            return self.inner.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let node = serde_json::Value::String(self.node.clone());
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"node\":{node},{rest}"),
            None => writer.write_str(&line),
        }
    }
}

/// `text` (human-readable; coloured only on a terminal) or `json` (one object per line,
/// with the fields of the enclosing spans such as `request_id` and `connection`).
/// `RUST_LOG` overrides the default filter (`info`; SQL statements and migration steps
/// only from `warn`). With `node`, every line carries it.
pub fn init(format: &str, node: Option<&str>) {
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
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let json = format == "json";
    match (json, node) {
        (true, None) => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
        (true, Some(node)) => builder
            .json()
            .event_format(WithNode {
                node: node.to_owned(),
                json,
                inner: line_format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true),
            })
            .init(),
        (false, None) => builder.init(),
        (false, Some(node)) => builder
            .event_format(WithNode {
                node: node.to_owned(),
                json,
                inner: line_format().with_ansi(ansi),
            })
            .init(),
    }
}
