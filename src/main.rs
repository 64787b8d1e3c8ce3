//! The `zonecast` binary: parses flags, then serves or migrates. All the work is in the
//! library (`zonecast::app`).

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use zonecast::app::Application;
use zonecast::broker_memory::MemoryBroker;
use zonecast::config::{Cli, Command, KeysAction};
use zonecast::domain::Principal;
use zonecast::domain::format_time;
use zonecast::service::Service;
use zonecast::store::Store;

/// mimalloc instead of glibc's malloc: under fan-out and group commit, allocation was
/// a quarter of the server's CPU (arena locks, `malloc_consolidate`), and idle
/// connections keep less resident memory.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    no_huge_pages();
    // Before any thread exists: the config file fills in environment variables.
    zonecast::config::apply_config_file(std::env::args_os()).map_err(anyhow::Error::msg)?;
    let mut cli = Cli::parse();
    let serve = match &mut cli.command {
        Some(Command::Serve(a)) => Some(a.as_mut()),
        None => Some(&mut cli.serve),
        _ => None,
    };
    let (format, node) = match serve {
        Some(a) => {
            // One id for the logs and the server.
            let node = a
                .node_id
                .get_or_insert_with(zonecast::config::default_node_id)
                .clone();
            // Several nodes' logs are merged: each line says whose it is.
            let several = a.broker_kind() == zonecast::config::BrokerKind::Postgres;
            (a.log_format.clone(), several.then_some(node))
        }
        None => ("text".to_owned(), None),
    };
    zonecast::telemetry::init(&format, node.as_deref());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Migrate { database_url }) => {
            let n = Store::migrate(&database_url)
                .await
                .context("migration failed")?;
            println!("applied {n} migration(s)");
            Ok(())
        }
        Some(Command::Keys {
            database_url,
            action,
        }) => keys(&database_url, action).await,
        Some(Command::Serve(args)) => serve(*args).await,
        None => serve(cli.serve).await,
    }
}

async fn serve(args: zonecast::config::ServeArgs) -> anyhow::Result<()> {
    let stopped = shutdown_signal();
    let key_path = args.admin_key_path();
    let db_flag = if args.database_url == zonecast::config::DEFAULT_DATABASE_URL {
        String::new()
    } else {
        format!(
            " --database-url '{}'",
            zonecast::app::redact(&args.database_url)
        )
    };
    let app = Application::build(args).await?;
    let base = app.base_url();
    if let Some(z) = app.demo_zone() {
        println!("created demo zone {} ({:?})", z.id, z.name);
    }
    println!("zonecast is serving on {base}");
    if let Some(key) = app.first_admin_key() {
        // Always to a file only its owner can read; on a terminal also shown, once.
        // Anywhere else stdout may be a log that keeps it: the key stays off it.
        write_secret(&key_path, key)
            .with_context(|| format!("cannot write the admin key to {}", key_path.display()))?;
        println!(
            "  first admin key written to {} (mode 0600; delete it once the key is kept elsewhere)",
            key_path.display()
        );
        if std::io::stdout().is_terminal() {
            println!("  first admin key (shown once): {key}");
            println!("  dashboard with it: {base}/?access_token={key}");
        }
    } else {
        // Keys exist; whoever starts it may not hold one.
        println!(
            "  this database has API keys already; to make an admin key:\n    zonecast keys create --name NAME --role admin{db_flag}"
        );
    }
    println!("  dashboard: {base}/");
    // The last line of the start-up banner (tests wait for it).
    println!("  API docs:  {base}/docs");
    app.run_until_stopped(stopped).await?;
    Ok(())
}

/// `zonecast keys …`: runs against the database directly (migrating it first), so it
/// works on a fresh database and while servers run; they pick up revocations within
/// `--revocation-check`.
async fn keys(database_url: &str, action: KeysAction) -> anyhow::Result<()> {
    let store = Store::open(database_url)
        .await
        .context("cannot open the database")?;
    // The CLI publishes nothing anyone listens to: a broker with no bus and no cache.
    let broker = std::sync::Arc::new(MemoryBroker::new(zonecast::broker::Local::new(1, 0, 0)));
    let service = Service::new(store, broker, std::sync::Arc::default());
    let cli = Principal::system("cli");
    match action {
        KeysAction::Create {
            name,
            role,
            zones,
            user,
        } => {
            let (key, secret) = service
                .create_key(&cli, &name, role, zones, user.as_deref())
                .await?;
            println!(
                "created key {} (role {}, zones {}{})",
                key.name,
                key.role,
                key.zones,
                key.user_id
                    .map(|u| format!(", user {u}"))
                    .unwrap_or_default()
            );
            println!("{secret}");
        }
        KeysAction::List => {
            println!(
                "{:<24} {:<7} {:<16} {:<16} {:<25} REVOKED",
                "NAME", "ROLE", "ZONES", "USER", "CREATED"
            );
            for k in service.keys(&cli).await? {
                println!(
                    "{:<24} {:<7} {:<16} {:<16} {:<25} {}",
                    k.name,
                    k.role.to_string(),
                    k.zones.to_string(),
                    k.user_id.unwrap_or_else(|| "-".into()),
                    format_time(&k.created_at),
                    k.revoked_at
                        .map(|t| format_time(&t))
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
        KeysAction::Revoke { name } => {
            let k = service.revoke_key(&cli, &name).await?;
            println!("revoked key {}", k.name);
        }
    }
    Ok(())
}

/// Turns transparent huge pages off for this process, unless the operator chose with
/// `MIMALLOC_ALLOW_THP`. mimalloc asks for huge pages (`MADV_HUGEPAGE`) and returns
/// freed memory to the kernel after 10 ms; every touch after that faults in and zeroes
/// a whole 2 MiB page. Under a reconnect storm that zeroing was a third of the server's
/// CPU, and huge pages held by a few live connections made idle connections look
/// 40 % larger in RSS.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes a flag of
        // this process; it reads and writes no memory of ours.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            // Not fatal: the server only runs slower under memory churn.
            eprintln!(
                "zonecast: cannot turn transparent huge pages off: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Writes `secret` to a file only its owner can read.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    // `mode` applies to a new file only; an existing one is narrowed here.
    #[cfg(unix)]
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    writeln!(f, "{secret}")
}

/// Completes on SIGTERM or SIGINT. The handlers are registered when this is called,
/// not when the future is first polled: a signal that arrives right after the banner
/// (an orchestrator stopping a fresh start) must still shut down gracefully.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                (term, int) => {
                    let e = term.err().or(int.err());
                    tracing::error!(error = ?e, "cannot listen for SIGTERM/SIGINT");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}
