//! `conversion-gateway`: parses the command line and runs what it asks for; the gateway itself is
//! assembled in `conversion_gateway::app`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use conversion_gateway::config::{self, Settings};
use conversion_gateway::{app, healthcheck, preview, telemetry};
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Inspect or repair the disk spool under spool.dir (the gateway refuses to start on a damaged one).
    Spool {
        #[command(subcommand)]
        action: SpoolAction,
    },
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

#[derive(Subcommand)]
enum SpoolAction {
    /// Report what the spool's files hold (events per account, dead letters, dedup entries) and what is
    /// damaged, writing nothing. Exit 0 when everything reads, 1 when something is damaged, 2 when the
    /// spool cannot be examined.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move the spool's files aside into spool.dir/damaged-<time>/ (never deleting them) and rebuild the
    /// spool from every readable record. Stop the gateway first. Exit 0 when rebuilt, 2 when not.
    Salvage,
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
        Command::Spool { action } => spool(&settings, action),
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
            match runtime.block_on(run(settings, cli.config)) {
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

fn spool(settings: &Settings, action: SpoolAction) -> ExitCode {
    use conversion_gateway::spool::disk::salvage;
    if settings.spool.backend != config::SpoolBackend::Disk {
        eprintln!("conversion-gateway: spool.backend is not \"disk\": the events wait in Redis, which keeps its own files (see redis-check-aof)");
        return ExitCode::from(2);
    }
    let dir = &settings.spool.dir;
    match action {
        SpoolAction::Check { json } => match salvage::check(dir) {
            Ok(report) => {
                if json {
                    match serde_json::to_string_pretty(&report) {
                        Ok(text) => println!("{text}"),
                        Err(e) => {
                            eprintln!("conversion-gateway: {e}");
                            return ExitCode::from(2);
                        }
                    }
                } else {
                    print!("{}", report.text());
                }
                if report.damaged() {
                    eprintln!("conversion-gateway: the spool is damaged; `conversion-gateway spool salvage` (the gateway stopped) moves its files aside and rebuilds it from what is readable");
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("conversion-gateway: cannot check the spool: {e}");
                ExitCode::from(2)
            }
        },
        SpoolAction::Salvage => match salvage::salvage(dir) {
            Ok(done) => {
                print!("{}", done.before.text());
                println!(
                    "rebuilt the spool with {} events, {} dead letters and {} dedup entries; the old files are in {}",
                    done.events,
                    done.dead_letters,
                    done.dedup_entries,
                    done.moved_to.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("conversion-gateway: cannot salvage the spool: {e}");
                ExitCode::from(2)
            }
        },
    }
}

async fn run(settings: Settings, config_file: Option<PathBuf>) -> Result<(), String> {
    telemetry::init(&settings.log);
    tracing::info!(config = ?settings, "starting");
    let running = app::start(settings).await?;
    #[cfg(unix)]
    running.reload_on_sighup(move || config::load(config_file.as_deref(), std::env::vars()));
    running.serve_until(shutdown_signal()).await
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
