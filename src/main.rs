//! The `zonecast` binary: parses flags, then serves or migrates. All the work is in the
//! library (`zonecast::app`).

use anyhow::Context;
use clap::Parser;
use zonecast::app::Application;
use zonecast::config::{Cli, Command};
use zonecast::store::Store;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    zonecast::telemetry::init();
    match cli.command {
        Some(Command::Migrate { database_url }) => {
            let n = Store::migrate(&database_url)
                .await
                .context("migration failed")?;
            println!("applied {n} migration(s)");
            Ok(())
        }
        Some(Command::Serve(args)) => serve(args).await,
        None => serve(cli.serve).await,
    }
}

async fn serve(args: zonecast::config::ServeArgs) -> anyhow::Result<()> {
    let app = Application::build(args).await?;
    let base = format!("http://{}", app.addr());
    if let Some(z) = app.demo_zone() {
        println!("created demo zone {} ({:?})", z.id, z.name);
    }
    println!("zonecast is serving on {base}");
    println!("  dashboard: {base}/");
    println!("  API docs:  {base}/docs");
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
