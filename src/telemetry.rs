//! Logging setup: JSON lines by default, a human format for local runs. `RUST_LOG`, when set, wins over
//! `log.level`. Nothing logged anywhere carries a raw email, phone number, secret or token.

use crate::config::{Log, LogFormat};
use tracing_subscriber::EnvFilter;

pub fn init(log: &Log) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&log.level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
