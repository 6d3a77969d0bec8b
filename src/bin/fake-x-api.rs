//! `fake-x-api`: a faithful stand-in for the X Conversions endpoint. See `conversion_gateway::fake_x`.
#![forbid(unsafe_code)]

use clap::Parser;
use conversion_gateway::fake_x::{app, FakeConfig, FakeX};
use std::path::PathBuf;

// Same allocator as the gateway: the fake parses whole batches into JSON values, and glibc malloc was a
// third of its CPU, taken from the gateway it shares the machine with in the benchmark.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "fake-x-api",
    version,
    about = "A fake of the X Ads Conversions API for tests and local runs"
)]
struct Args {
    /// TOML file with `listen`, `versions` and `[[accounts]]`; without it, one demo account is served.
    #[arg(long, env = "FAKE_X_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the file); port 0 picks a free port.
    #[arg(long)]
    listen: Option<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut config = match &args.config {
        None => FakeConfig::demo(),
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<FakeConfig>(&t).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("fake-x-api: {}: {e}", path.display());
                return std::process::ExitCode::from(1);
            }
        },
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-x-api: cannot listen on {}: {e}", config.listen);
            return std::process::ExitCode::from(1);
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("fake-x-api listening on {addr}"),
        Err(e) => eprintln!("fake-x-api: {e}"),
    }
    let server = axum::serve(listener, app(FakeX::new(config)));
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match server.with_graceful_shutdown(shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-x-api: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
