//! `conversion-gateway`: wires configuration, spool, dispatchers, the X client and the HTTP listeners.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use conversion_gateway::api::{self, ApiKeys, AppState};
use conversion_gateway::config::{self, Settings};
use conversion_gateway::dispatch::{DispatchSettings, Dispatcher};
use conversion_gateway::spool::{MemorySpool, Spool};
use conversion_gateway::telemetry;
use conversion_gateway::upstream::{Client, Target};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Waiting events the in-memory spool holds before ingest answers 503.
const MEMORY_SPOOL_CAPACITY: usize = 1_000_000;

#[derive(Parser)]
#[command(
    name = "conversion-gateway",
    version,
    about = "Relays conversion events to the X Ads Conversions API"
)]
struct Cli {
    /// Configuration file (TOML). Compiled-in defaults apply without one; GATEWAY_* variables override both.
    #[arg(long, global = true, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Print the effective configuration, secrets shown as [REDACTED]; exit 1 naming the bad key if invalid.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("conversion-gateway: invalid configuration: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", settings.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Run => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("conversion-gateway: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "gateway stopped");
                    eprintln!("conversion-gateway: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn run(settings: Settings) -> Result<(), String> {
    telemetry::init(&settings.log);
    tracing::info!(config = ?settings, "starting");
    if settings.upstream.sandbox {
        tracing::warn!(
            "sandbox mode: batches are built, validated and recorded, nothing is sent to X"
        );
    }

    let spool: Arc<dyn Spool> = Arc::new(MemorySpool::new(
        settings.delivery.dedup_window,
        MEMORY_SPOOL_CAPACITY,
    ));
    let client = Arc::new(
        Client::new(settings.upstream.clone())
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
    );
    let state = Arc::new(AppState {
        rules: settings.mapping_rules(),
        spool: spool.clone(),
        keys: ApiKeys::new(
            &settings.server.api_keys,
            settings.server.allow_unauthenticated,
        ),
        max_body_bytes: settings.server.max_body_bytes,
        max_events_per_request: settings.server.max_events_per_request,
        shutting_down: Default::default(),
        now: chrono::Utc::now,
    });

    let ingest = tokio::net::TcpListener::bind(settings.server.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on server.listen {}: {e}",
                settings.server.listen
            )
        })?;
    let admin = tokio::net::TcpListener::bind(settings.server.admin_listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on server.admin_listen {}: {e}",
                settings.server.admin_listen
            )
        })?;
    tracing::info!(
        ingest = %ingest.local_addr().map_err(|e| e.to_string())?,
        admin = %admin.local_addr().map_err(|e| e.to_string())?,
        "listening"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let dispatch_settings = DispatchSettings {
        max_batch: settings.delivery.max_batch,
        linger: settings.delivery.linger,
        backoff_base: Duration::from_secs(1),
        backoff_cap: Duration::from_secs(60),
    };
    let mut dispatchers = tokio::task::JoinSet::new();
    for (name, account) in &settings.accounts {
        let dispatcher = Dispatcher {
            target: Target {
                account: name.clone(),
                pixel_id: account.pixel_id.clone(),
                auth: account.auth.clone(),
            },
            spool: spool.clone(),
            client: client.clone(),
            settings: dispatch_settings.clone(),
        };
        dispatchers.spawn(dispatcher.run(stop_rx.clone()));
    }

    let (http_stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let wait = |tx: &tokio::sync::broadcast::Sender<()>| {
        let mut rx = tx.subscribe();
        async move {
            let _ = rx.recv().await;
        }
    };
    let ingest_server =
        axum::serve(ingest, api::app(state.clone())).with_graceful_shutdown(wait(&http_stop_tx));
    let admin_server = axum::serve(admin, api::admin_app(state.clone()))
        .with_graceful_shutdown(wait(&http_stop_tx));
    let ingest_task = tokio::spawn(async move { ingest_server.await });
    let admin_task = tokio::spawn(async move { admin_server.await });

    shutdown_signal().await;
    tracing::info!("shutdown requested: no new events accepted, in-flight work finishing");
    state.shutting_down.store(true, Ordering::Relaxed);
    let _ = http_stop_tx.send(());
    let _ = stop_tx.send(true);

    let timeout = settings.server.shutdown_timeout;
    let drained = tokio::time::timeout(timeout, async {
        let _ = ingest_task.await;
        let _ = admin_task.await;
        while dispatchers.join_next().await.is_some() {}
    })
    .await;
    let left: usize = settings.accounts.keys().map(|a| spool.backlog(a)).sum();
    match drained {
        Ok(()) => tracing::info!(events_not_sent = left, "stopped"),
        Err(_) => tracing::warn!(
            events_not_sent = left,
            "shutdown_timeout reached; stopping with work unfinished"
        ),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
