//! One task per account: wait for events, gather a batch (full, or after `linger`), hand it to the
//! upstream client, and act on the outcome.
//!
//! Invariants: at most one request per account is in flight; a batch never holds more than `max_batch`
//! conversions; events are acked only after X accepted them (or, for a batch X refused as invalid, after the
//! refusal was logged with X's message); a failed batch is resent with the same conversions and
//! `conversion_id`s, signed afresh.
//!
//! This is the simple forwarder of the gateway core. The delivery-guarantees work replaces the outcome
//! handling (bisection of refused batches, dead letters, pause on bad credentials, rate budget).

use crate::conversion::Conversion;
use crate::spool::Spool;
use crate::upstream::{Client, Outcome, Target};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub max_batch: usize,
    pub linger: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

pub struct Dispatcher {
    pub target: Target,
    pub spool: Arc<dyn Spool>,
    pub client: Arc<Client>,
    pub settings: DispatchSettings,
}

/// What the simple forwarder does with an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Remove the batch from the spool.
    Ack,
    /// X refused the batch as invalid; resending it unchanged cannot succeed.
    Drop,
    /// Keep the batch and try again after a backoff.
    Retry,
}

/// Pure: what an outcome means for the batch.
pub fn next_step(outcome: &Outcome) -> Next {
    match outcome {
        Outcome::Accepted { .. } => Next::Ack,
        Outcome::Refused { status: 400, .. } => Next::Drop,
        _ => Next::Retry,
    }
}

impl Dispatcher {
    /// Runs until `shutdown` turns true; then drains what is waiting while X keeps accepting, and returns.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let account = self.target.account.clone();
        let changed = self.spool.changed(&account);
        let mut failures = 0u32;
        loop {
            let stopping = *shutdown.borrow();
            if self.spool.backlog(&account) == 0 {
                if stopping {
                    return;
                }
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            if !stopping && self.spool.backlog(&account) < self.settings.max_batch {
                // Linger for a fuller batch, but no longer than `linger` and not past a shutdown.
                let deadline = tokio::time::Instant::now() + self.settings.linger;
                while self.spool.backlog(&account) < self.settings.max_batch {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = changed.notified() => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
            let entries = match self.spool.peek(&account, self.settings.max_batch).await {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!(account = %account, error = %e, "cannot read the spool");
                    tokio::time::sleep(self.settings.backoff_base).await;
                    continue;
                }
            };
            let ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
            let conversions: Vec<Conversion> =
                entries.into_iter().map(|e| e.record.conversion).collect();
            let started = Instant::now();
            let outcome = self.client.send(&self.target, &conversions).await;
            let latency_ms = started.elapsed().as_millis() as u64;
            let step = next_step(&outcome);
            log_attempt(
                &account,
                conversions.len(),
                &outcome,
                latency_ms,
                failures + 1,
            );
            match step {
                Next::Ack | Next::Drop => {
                    failures = 0;
                    if let Err(e) = self.spool.ack(&account, &ids).await {
                        tracing::error!(account = %account, error = %e, "cannot ack a delivered batch; it will be resent");
                    }
                }
                Next::Retry => {
                    failures += 1;
                    if stopping {
                        return;
                    }
                    let delay = backoff(&self.settings, failures);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempt-1))].
pub fn backoff(s: &DispatchSettings, attempt: u32) -> Duration {
    let exp = s
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let ceiling = exp.min(s.backoff_cap);
    ceiling.mul_f64(rand::random::<f64>())
}

fn log_attempt(account: &str, size: usize, outcome: &Outcome, latency_ms: u64, attempt: u32) {
    let status = outcome.status_label();
    match outcome {
        Outcome::Accepted { debug_id, .. } => {
            tracing::info!(
                account,
                batch_size = size,
                status,
                debug_id = debug_id.as_deref().unwrap_or(""),
                latency_ms,
                attempt,
                "batch delivered"
            )
        }
        Outcome::Refused { status: 400, .. } => tracing::error!(
            account,
            batch_size = size,
            status,
            latency_ms,
            attempt,
            x_message = %outcome.message(),
            "X refused the batch as invalid; it is dropped"
        ),
        _ => {
            tracing::warn!(account, batch_size = size, status, latency_ms, attempt, x_message = %outcome.message(), "batch not delivered; will retry")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::RateLimitInfo;

    #[test]
    fn outcomes_map_to_steps() {
        let refused = |status| Outcome::Refused {
            status,
            errors: vec![],
            rate_limit: RateLimitInfo::default(),
            body_excerpt: None,
        };
        assert_eq!(
            next_step(&Outcome::Accepted {
                status: 200,
                conversions_processed: Some(1),
                debug_id: None,
                rate_limit: RateLimitInfo::default()
            }),
            Next::Ack
        );
        assert_eq!(next_step(&refused(400)), Next::Drop);
        for s in [401, 403, 404, 408, 423, 429, 500, 503] {
            assert_eq!(next_step(&refused(s)), Next::Retry, "{s}");
        }
        assert_eq!(next_step(&Outcome::Timeout), Next::Retry);
    }

    #[test]
    fn backoff_is_bounded_by_cap_and_grows() {
        let s = DispatchSettings {
            max_batch: 500,
            linger: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
        };
        for attempt in 1..40 {
            let d = backoff(&s, attempt);
            let ceiling = Duration::from_secs(1u64 << (attempt - 1).min(20)).min(s.backoff_cap);
            assert!(d <= ceiling, "{attempt}: {d:?}");
        }
    }
}
