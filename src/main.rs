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
    /// Check the setup of every account against X (credentials and their permission, each event's Single
    /// Event Tag, the pixel where X shows it) and of this machine (clock, spool directory, Redis), line by
    /// line with what to fix. Sends no conversion. Exit 0 when nothing failed, 1 otherwise.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// A SET id callers send as event_id, checked on every account too (repeatable).
        #[arg(long = "event-id", value_name = "SET_ID")]
        event_ids: Vec<String>,
    },
    /// List or create an account's Single Event Tags (the SET ids of accounts.NAME.events) through the Ads API.
    Events {
        #[command(subcommand)]
        action: EventsAction,
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

#[derive(Subcommand)]
enum EventsAction {
    /// Create a Single Event Tag and print its id and the configuration line that maps --name to it.
    /// Exit 0 when created, 1 when X refused, 2 when the flags or the configuration cannot be used.
    Create {
        /// The configured account (a name under [accounts]).
        #[arg(long)]
        account: String,
        /// The tag's name, also the event name of the printed configuration line (e.g. purchase).
        #[arg(long)]
        name: String,
        /// One of X's types: PURCHASE, SIGN_UP, ADD_TO_CART, CHECKOUT_INITIATED, ADDED_PAYMENT_INFO,
        /// ADD_TO_WISHLIST, CONTENT_VIEW, CUSTOM, DOWNLOAD, PRODUCT_CUSTOMIZATION, SEARCH, SITE_VISIT,
        /// START_TRIAL, SUBSCRIBE.
        #[arg(long = "type", value_name = "TYPE")]
        kind: String,
        /// Days after a click a conversion is attributed: 1, 7, 14 or 30 [default: 30].
        #[arg(long, value_name = "DAYS")]
        click_window: Option<String>,
        /// Days after a view: 0, 1, 7, 14 or 30, at most --click-window [default: 1].
        #[arg(long, value_name = "DAYS")]
        view_through_window: Option<String>,
        /// Print X's tag as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// List the account's tags: id, name, type, status, last tracked, and the configured event name.
    List {
        #[arg(long)]
        account: String,
        /// Print the tags as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    let settings = match config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            if let Command::Doctor { json, .. } = command {
                return doctor_report(
                    &conversion_gateway::setup::doctor::invalid_configuration(&e),
                    json,
                );
            }
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
        Command::Doctor { json, event_ids } => doctor(&settings, json, event_ids),
        Command::Events { action } => events(&settings, action),
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

/// Runs `f` on a runtime of one thread (the setup commands make a few calls, one at a time).
fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T, ExitCode> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Ok(rt.block_on(f)),
        Err(e) => {
            eprintln!("conversion-gateway: cannot start the runtime: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<(), ExitCode> {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            Ok(())
        }
        Err(e) => {
            eprintln!("conversion-gateway: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn doctor(settings: &Settings, json: bool, event_ids: Vec<String>) -> ExitCode {
    use conversion_gateway::setup::doctor;
    let options = doctor::Options {
        event_ids,
        page_size: None,
    };
    let report = match block_on(doctor::run(settings, &options)) {
        Ok(r) => r,
        Err(code) => return code,
    };
    doctor_report(&report, json)
}

fn doctor_report(report: &conversion_gateway::setup::doctor::Report, json: bool) -> ExitCode {
    if json {
        if let Err(code) = print_json(report) {
            return code;
        }
    } else {
        print!("{}", report.text());
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn events(settings: &Settings, action: EventsAction) -> ExitCode {
    use conversion_gateway::setup::events::{self, EventsError};
    use conversion_gateway::setup::tag_spec::TagSpec;
    let failed = |e: EventsError| {
        eprintln!("conversion-gateway: {e}");
        ExitCode::from(match e {
            EventsError::Unusable(_) => 2,
            EventsError::X(_) => 1,
        })
    };
    match action {
        EventsAction::Create {
            account,
            name,
            kind,
            click_window,
            view_through_window,
            json,
        } => {
            let spec = match TagSpec::new(
                Some(&name),
                Some(&kind),
                click_window.as_deref(),
                view_through_window.as_deref(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "conversion-gateway: --{}: {}",
                        e.parameter.replace('_', "-"),
                        e.message
                    );
                    return ExitCode::from(2);
                }
            };
            let tag = match block_on(events::create(settings, &account, &spec)) {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return failed(e),
                Err(code) => return code,
            };
            if json {
                if let Err(code) = print_json(&tag) {
                    return code;
                }
            } else {
                print!("{}", events::created_text(settings, &account, &spec, &tag));
            }
            ExitCode::SUCCESS
        }
        EventsAction::List { account, json } => {
            let tags = match block_on(events::list(settings, &account)) {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return failed(e),
                Err(code) => return code,
            };
            if json {
                if let Err(code) = print_json(&tags) {
                    return code;
                }
            } else if let Some(a) = settings.accounts.get(&account) {
                print!("{}", events::list_text(&account, a, &tags));
            }
            ExitCode::SUCCESS
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
