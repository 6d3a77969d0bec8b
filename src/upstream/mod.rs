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
    pub auth: Credentials,
}

/// An account's credentials, replaced in place when the configuration is reloaded (`SIGHUP`): the next
/// request is signed with the new ones, and a dispatcher paused for refused credentials retries at once.
#[derive(Clone)]
pub struct Credentials(Arc<tokio::sync::watch::Sender<(u64, Option<Auth>)>>);

impl Credentials {
    pub fn new(auth: Option<Auth>) -> Self {
        Credentials(Arc::new(tokio::sync::watch::Sender::new((0, auth))))
    }

    /// The credentials to sign with now.
    pub fn get(&self) -> Option<Auth> {
        self.0.borrow().1.clone()
    }

    /// How many times they were replaced.
    pub fn generation(&self) -> u64 {
        self.0.borrow().0
    }

    /// Replaces them; `false` (and nothing done) when they are the same.
    pub fn replace(&self, auth: Option<Auth>) -> bool {
        self.0.send_if_modified(|(generation, current)| {
            if *current == auth {
                return false;
            }
            *generation += 1;
            *current = auth;
            true
        })
    }

    /// Resolves once they were replaced after `generation`.
    pub async fn changed_since(&self, generation: u64) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: `changed` only fails after it is gone.
        while rx.borrow_and_update().0 == generation {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Auth`'s own Debug shows its secrets as [REDACTED].
        f.debug_tuple("Credentials").field(&self.get()).finish()
    }
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

#[cfg(test)]
mod credentials_tests {
    use super::*;
    use crate::config::Secret;

    fn token(t: &str) -> Option<Auth> {
        Some(Auth::PixelToken {
            token: Secret::new(t),
        })
    }

    #[tokio::test]
    async fn a_replacement_is_seen_at_once_and_wakes_who_waits_for_it() {
        let c = Credentials::new(token("a"));
        assert_eq!(c.generation(), 0);
        assert!(
            !c.replace(token("a")),
            "the same credentials change nothing"
        );
        let seen = c.generation();
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.changed_since(seen).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(c.replace(token("CANARY-b")));
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(c.get(), token("CANARY-b"));
        // A replacement made before the wait began still ends it.
        tokio::time::timeout(std::time::Duration::from_secs(1), c.changed_since(seen))
            .await
            .expect("already replaced");
        assert!(!format!("{c:?}").contains("CANARY"), "{c:?}");
    }
}
