//! The way to X: one batch out, one `Outcome` back.
//!
//! # The seam
//! `Transport` is what the dispatcher talks to. Contract every implementation keeps:
//! - `send` sends one batch of at most 500 conversions of one account (`Target`) and answers what came of
//!   it as an `Outcome`; it never fails otherwise (an encoding or connection problem is an `Outcome` too);
//! - it never retries by itself and keeps no state between calls that changes what a call means: deciding
//!   what to do is the caller's job (`dispatch::policy`);
//! - it is safe to call concurrently for different accounts; every attempt is signed afresh.
//!
//! # Implementations
//! - `HttpTransport` (`http`): the real X client — endpoint URL, OAuth 1.0a or pixel token (`auth`),
//!   response classification (`outcome`).
//! - `SandboxTransport` (`sandbox`): nothing leaves the process; each batch is checked against X's
//!   contract (`crate::x_contract`) and answered as X would, and the last batches are kept for inspection.
//!
//! Tests use scripted transports of their own (see the dispatcher's unit tests).

pub mod auth;
pub mod http;
pub mod outcome;
pub mod sandbox;

pub use http::HttpTransport;
pub use outcome::{classify, Outcome, RateLimitInfo, XError};
pub use sandbox::{SandboxBatch, SandboxTransport};

use crate::config::{Auth, Upstream};
use crate::conversion::{Batch, Conversion};
use futures_util::future::BoxFuture;
use std::sync::Arc;

/// Where and as whom an account's batches go.
#[derive(Debug, Clone)]
pub struct Target {
    pub account: String,
    pub pixel_id: String,
    pub auth: Option<Auth>,
}

/// Sends one batch to X (or what stands in for it) and says what came of it.
pub trait Transport: Send + Sync + 'static {
    fn send<'a>(
        &'a self,
        target: &'a Target,
        conversions: &'a [Conversion],
    ) -> BoxFuture<'a, Outcome>;
}

/// `{base_url}/{api_version}/measurement/conversions/{pixel_id}`
pub fn endpoint(settings: &Upstream, pixel_id: &str) -> String {
    format!(
        "{}/{}/measurement/conversions/{}",
        settings.base_url, settings.api_version, pixel_id
    )
}

/// The request body X takes: `{"conversions": [...]}`; an encoding failure is the attempt's outcome.
fn encode(conversions: &[Conversion]) -> Result<Vec<u8>, Box<Outcome>> {
    serde_json::to_vec(&Batch { conversions }).map_err(|e| {
        Box::new(Outcome::Transport {
            message: format!("could not encode the batch: {e}"),
        })
    })
}

/// The transport `settings` ask for: the sandbox when `upstream.sandbox` is set, else HTTP to X.
pub fn from_settings(settings: &Upstream) -> Result<Arc<dyn Transport>, String> {
    if settings.sandbox {
        return Ok(Arc::new(SandboxTransport::new(settings.clone())));
    }
    HttpTransport::new(settings.clone())
        .map(|t| Arc::new(t) as Arc<dyn Transport>)
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}
