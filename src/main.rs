//! `conversion-gateway`: wires configuration, spool, dispatchers, the X client and the HTTP listeners.
#![forbid(unsafe_code)]

use axum::serve::{Listener, ListenerExt};
use clap::{Parser, Subcommand};
use conversion_gateway::api::{self, AccountView, AdminState, ApiKeys, AppState};
use conversion_gateway::config::{self, Settings};
use conversion_gateway::dispatch::{AccountStatus, DispatchSettings, Dispatcher};
use conversion_gateway::limiter::{EmbeddedLimiter, Gcra, Limiter};
use conversion_gateway::metrics::Metrics;
use conversion_gateway::spool::{DiskSpool, DiskSpoolOptions, Spool};
use conversion_gateway::upstream::{Client, Target};
use conversion_gateway::{healthcheck, preview, telemetry};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// redb's page cache: bounded so that memory stays small whatever the backlog.
const SPOOL_CACHE_BYTES: usize = 8 << 20;

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
    /// Read events from stdin (one object, an array, {"events": [...]}, or JSON Lines) and print, for each,
    /// the X conversion it becomes (hashes only) or the errors it gets. Nothing is stored or sent.
    /// Exit 0 when no event is rejected, 1 when some are, 2 when the input or configuration is unusable.
    Preview,
    /// Exit 0 when the running gateway (at server.admin_listen) is ready to take events, 1 otherwise:
    /// for container health checks (the image has no curl).
    Healthcheck {
        /// Ask whether the process is alive (/livez) instead of ready (/readyz).
        #[arg(long)]
        live: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    let settings = match config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("conversion-gateway: invalid configuration: {e}");
            return ExitCode::from(if matches!(command, Command::Preview) {
                2
            } else {
                1
            });
        }
    };
    match command {
        Command::CheckConfig => {
            print!("{}", settings.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Preview => preview(&settings),
        Command::Healthcheck { live, timeout } => {
            let addr = healthcheck::local_address(settings.server.admin_listen);
            let path = if live { "/livez" } else { "/readyz" };
            match healthcheck::check(addr, path, Duration::from_secs(timeout.max(1))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("conversion-gateway: not healthy: {e}");
                    ExitCode::from(1)
                }
            }
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

fn preview(settings: &Settings) -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("conversion-gateway: cannot read stdin: {e}");
        return ExitCode::from(2);
    }
    match preview::preview(&input, &settings.mapping_rules(), chrono::Utc::now()) {
        Ok(report) => {
            match serde_json::to_string_pretty(&report) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("conversion-gateway: {e}");
                    return ExitCode::from(2);
                }
            }
            if report.rejected > 0 {
                eprintln!(
                    "conversion-gateway: {} of {} events would be rejected",
                    report.rejected,
                    report.events.len()
                );
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("conversion-gateway: {e}");
            ExitCode::from(2)
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

    let disk = DiskSpool::open(DiskSpoolOptions {
        dir: settings.spool.dir.clone(),
        max_bytes: settings.spool.max_bytes,
        max_dead_letters: settings.spool.max_dead_letters,
        dedup_window: settings.delivery.dedup_window,
        cache_bytes: SPOOL_CACHE_BYTES,
        min_free_bytes: settings.spool.min_free_bytes,
    })
    .map_err(|e| {
        format!(
            "cannot open the spool in spool.dir {}: {e}",
            settings.spool.dir.display()
        )
    })?;
    let spool: Arc<dyn Spool> = disk.clone();
    let waiting: usize = settings.accounts.keys().map(|a| spool.backlog(a)).sum();
    tracing::info!(dir = %settings.spool.dir.display(), waiting, bytes = spool.bytes(), "spool open");
    let budgets = settings
        .accounts
        .values()
        .map(|a| {
            (
                a.ad_account_id.clone(),
                Gcra::new(
                    a.rate_limit.events,
                    a.rate_limit.window,
                    settings.delivery.max_batch as u64,
                ),
            )
        })
        .collect();
    let limiter: Arc<dyn Limiter> = Arc::new(EmbeddedLimiter::new(budgets, disk.clone()));
    let client = Arc::new(
        Client::new(settings.upstream.clone())
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
    );
    let metrics = Arc::new(Metrics::new(settings.accounts.keys().map(String::as_str)));
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
        metrics: metrics.clone(),
    });

    let bind = |key: &'static str, addr: std::net::SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {key} {addr}: {e}"))
    };
    // Answers are small and go out whole: no Nagle delay on them.
    let ingest = bind("server.listen", settings.server.listen)
        .await?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    let admin = bind("server.admin_listen", settings.server.admin_listen).await?;
    tracing::info!(
        ingest = %ingest.local_addr().map_err(|e| e.to_string())?,
        admin = %admin.local_addr().map_err(|e| e.to_string())?,
        "listening"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let dispatch_settings = DispatchSettings {
        max_batch: settings.delivery.max_batch,
        linger: settings.delivery.linger,
        max_event_age: settings.delivery.max_event_age,
        retry_base: settings.delivery.retry_base,
        retry_cap: settings.delivery.retry_cap,
        pause_cap: settings.delivery.pause_cap,
    };
    let mut dispatchers = tokio::task::JoinSet::new();
    let mut views = Vec::new();
    for (name, account) in &settings.accounts {
        let status: Arc<Mutex<AccountStatus>> = Default::default();
        views.push(AccountView {
            name: name.clone(),
            ad_account_id: account.ad_account_id.clone(),
            pixel_id: account.pixel_id.clone(),
            rate_limit_events: account.rate_limit.events,
            rate_limit_window: account.rate_limit.window,
            status: status.clone(),
        });
        let dispatcher = Dispatcher {
            target: Target {
                account: name.clone(),
                pixel_id: account.pixel_id.clone(),
                auth: account.auth.clone(),
            },
            budget_key: account.ad_account_id.clone(),
            spool: spool.clone(),
            client: client.clone(),
            limiter: limiter.clone(),
            settings: dispatch_settings.clone(),
            status,
            metrics: metrics.clone(),
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
    let admin_state = Arc::new(AdminState {
        app: state.clone(),
        keys: ApiKeys::new(&settings.server.admin_api_keys, false),
        accounts: views,
        limiter: limiter.clone(),
    });
    let admin_server =
        axum::serve(admin, api::admin_app(admin_state)).with_graceful_shutdown(wait(&http_stop_tx));
    let ingest_task = tokio::spawn(async move { ingest_server.await });
    let admin_task = tokio::spawn(async move { admin_server.await });

    shutdown_signal().await;
    tracing::info!("shutdown requested: no new events accepted, in-flight requests finishing");
    state.shutting_down.store(true, Ordering::Relaxed);
    let _ = http_stop_tx.send(());
    let _ = stop_tx.send(true);

    let drained = tokio::time::timeout(settings.server.shutdown_timeout, async {
        let _ = ingest_task.await;
        let _ = admin_task.await;
        while dispatchers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "shutdown_timeout reached; stopping with work unfinished (it stays in the spool)"
        );
    }
    let left: usize = settings.accounts.keys().map(|a| spool.backlog(a)).sum();
    if let Err(e) = disk.close().await {
        tracing::error!(error = %e, "closing the spool");
    }
    tracing::info!(
        events_waiting = left,
        "stopped; waiting events go out after the next start"
    );
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
