//! One task per account: wait for events and budget, take a batch, hand it to `upstream`, act on the
//! outcome as `policy::decide` says.
//!
//! Invariants: at most one request per account is in flight; a batch never holds more than `max_batch`
//! conversions and is sent only once the account's budget allows it (`limiter`); an event leaves the spool
//! only when X accepted it or it was dead-lettered (refused alone, or too old); a batch that was not
//! accepted is resent with the same conversions and `conversion_id`s, signed afresh; a refused batch is
//! split in halves until the refused conversions are alone, so one bad event never blocks the others.
//! Shutdown lets the request in flight finish, then stops; what is not sent stays in the spool.

pub mod policy;

use crate::conversion::Conversion;
use crate::limiter::Limiter;
use crate::metrics::Metrics;

use crate::spool::{Entry, Spool};
use crate::upstream::{Client, Outcome, Target};
use policy::Action;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub max_batch: usize,
    pub linger: Duration,
    pub max_event_age: Duration,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub pause_cap: Duration,
}

/// What an operator wants to know about an account's delivery (the admin API shows it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AccountStatus {
    pub paused: Option<String>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    pub last_debug_id: Option<String>,
    /// Epoch seconds before which nothing is sent (X's rate limit).
    pub hold_until: Option<u64>,
    pub delivered: u64,
    pub dead_lettered: u64,
}

pub struct Dispatcher {
    pub target: Target,
    /// The budget this account draws on: its ad account id (shared by accounts of one ad account).
    pub budget_key: String,
    pub spool: Arc<dyn Spool>,
    pub client: Arc<Client>,
    pub limiter: Arc<dyn Limiter>,
    pub settings: DispatchSettings,
    pub status: Arc<Mutex<AccountStatus>>,
    pub metrics: Arc<Metrics>,
}

fn epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Sleeps until `deadline` or until shutdown; `true` when shutdown came first.
async fn sleep_or_stop(deadline: tokio::time::Instant, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(deadline) => *stop.borrow(),
        r = stop.changed() => r.is_err() || *stop.borrow(),
    }
}

/// Sleeps for `d` (or until shutdown); `true` when shutdown came first.
async fn pause_for(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    sleep_or_stop(tokio::time::Instant::now() + d, stop).await
}

/// Acks delivered batches in the background, one at a time, while the next batch goes out.
/// If an ack fails, the batch stays in the spool and is taken again (X's deduplication removes the repeat).
#[derive(Default)]
struct Acker {
    pending: Option<(tokio::task::JoinHandle<()>, usize)>,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Acker {
    /// Events whose ack is committing.
    fn in_flight(&self) -> usize {
        self.pending.as_ref().map_or(0, |(_, n)| *n)
    }

    /// Whether an ack failed since the last call.
    fn take_failed(&self) -> bool {
        self.failed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    async fn finish(&mut self) {
        if let Some((task, _)) = self.pending.take() {
            let _ = task.await;
        }
    }

    async fn submit(
        &mut self,
        spool: Arc<dyn Spool>,
        account: String,
        ids: Vec<u64>,
        status: Arc<Mutex<AccountStatus>>,
        metrics: Arc<Metrics>,
    ) {
        self.finish().await;
        let failed = self.failed.clone();
        let n = ids.len();
        let task = tokio::spawn(async move {
            match spool.ack(&account, &ids).await {
                Ok(()) => {
                    status.lock().unwrap_or_else(|p| p.into_inner()).delivered += ids.len() as u64;
                    metrics.delivered(&account, ids.len() as u64);
                }
                Err(e) => {
                    tracing::error!(account = %account, error = %e, "cannot ack a delivered batch; it will be resent");
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        self.pending = Some((task, n));
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base · 2^(attempt-1))].
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(24))
        .min(cap);
    ceiling.mul_f64(rand::random::<f64>())
}

impl Dispatcher {
    fn status(&self) -> std::sync::MutexGuard<'_, AccountStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut acker = Acker::default();
        self.run_until_stopped(&mut stop, &mut acker).await;
        // What X accepted is acked before the task ends, so a restart does not resend it.
        acker.finish().await;
    }

    async fn run_until_stopped(&self, stop: &mut watch::Receiver<bool>, acker: &mut Acker) {
        let account = self.target.account.clone();
        let changed = self.spool.changed(&account);
        // The highest id handed to `deliver`: the next batch is taken after it, so the ack of the previous
        // batch can commit while the next one is on its way to X.
        let mut cursor = 0u64;
        let waiting = |acker: &Acker| {
            self.spool
                .backlog(&account)
                .saturating_sub(acker.in_flight())
        };
        loop {
            if *stop.borrow() {
                return;
            }
            if acker.take_failed() {
                cursor = 0;
            }
            if waiting(acker) == 0 {
                if acker.in_flight() > 0 {
                    acker.finish().await;
                    continue;
                }
                tokio::select! {
                    _ = changed.notified() => {}
                    r = stop.changed() => if r.is_err() { return },
                }
                continue;
            }
            if waiting(acker) < self.settings.max_batch {
                // Linger for a fuller batch, but no longer than `linger`.
                let deadline = tokio::time::Instant::now() + self.settings.linger;
                while waiting(acker) < self.settings.max_batch {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = changed.notified() => {}
                        r = stop.changed() => if r.is_err() || *stop.borrow() { return },
                    }
                }
            }
            let entries = match self
                .spool
                .peek_after(&account, cursor, self.settings.max_batch)
                .await
            {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(account = %account, error = %e, "cannot read the spool");
                    if pause_for(self.settings.retry_base, stop).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(last) = entries.last().map(|e| e.id) else {
                // Everything waiting is in hand already (its ack is committing), or an ack failed.
                if acker.in_flight() > 0 {
                    acker.finish().await;
                } else if cursor > 0 {
                    cursor = 0;
                } else if pause_for(self.settings.retry_base, stop).await {
                    return;
                }
                continue;
            };
            cursor = last;
            if !self.deliver(entries, stop, acker).await {
                return;
            }
        }
    }

    /// Delivers one batch to the end: every entry is acked or dead-lettered, unless shutdown comes first
    /// (`false`), in which case what is left stays in the spool.
    async fn deliver(
        &self,
        batch: Vec<Entry>,
        stop: &mut watch::Receiver<bool>,
        acker: &mut Acker,
    ) -> bool {
        let mut work = vec![batch];
        let mut failures = 0u32;
        let mut pauses = 0u32;
        while let Some(batch) = work.pop() {
            let mut batch = self.drop_expired(batch).await;
            if batch.is_empty() {
                continue;
            }
            // When the budget allows fewer events than the batch holds, send those now rather than hold the
            // whole batch back (but not in slivers: at least a quarter of a full batch).
            let available = self
                .limiter
                .available(&self.budget_key, epoch().as_nanos() as u64);
            let floor = (self.settings.max_batch as u64 / 4).max(1);
            if available < batch.len() as u64 && available >= floor {
                let rest = batch.split_off(available as usize);
                work.push(rest);
            }
            if !self.wait_for_budget(batch.len(), stop).await {
                return false;
            }
            let conversions: Vec<Conversion> =
                batch.iter().map(|e| e.record.conversion.clone()).collect();
            let started = Instant::now();
            let outcome = self.client.send(&self.target, &conversions).await;
            let latency = started.elapsed();
            let latency_ms = latency.as_millis() as u64;
            self.metrics.upstream_request(
                &self.target.account,
                &outcome.status_label(),
                latency.as_secs_f64(),
                batch.len(),
            );
            let action = policy::decide(&outcome, batch.len(), epoch().as_secs());
            if matches!(
                outcome,
                Outcome::Refused {
                    status: 400..=499,
                    ..
                }
            ) {
                // X refused the request whole and took none of it: its events do not count.
                if let Err(e) = self
                    .limiter
                    .refund(&self.budget_key, batch.len() as u64)
                    .await
                {
                    tracing::warn!(account = %self.target.account, error = %e, "cannot give back unused budget");
                }
            }
            self.log_attempt(
                batch.len(),
                &outcome,
                &action,
                latency_ms,
                failures + pauses + 1,
            );
            self.status().last_status = Some(outcome.status_label());
            match action {
                Action::Ack {
                    debug_id,
                    hold_until,
                } => {
                    failures = 0;
                    pauses = 0;
                    {
                        let mut s = self.status();
                        s.last_debug_id = debug_id;
                        s.hold_until = hold_until;
                        if let Some(reason) = s.paused.take() {
                            tracing::info!(account = %self.target.account, reason, "account resumed");
                            self.metrics.paused(&self.target.account, None);
                        }
                    }
                    let ids: Vec<u64> = batch.iter().map(|e| e.id).collect();
                    acker
                        .submit(
                            self.spool.clone(),
                            self.target.account.clone(),
                            ids,
                            self.status.clone(),
                            self.metrics.clone(),
                        )
                        .await;
                }
                Action::Split => {
                    let right = batch[batch.len() / 2..].to_vec();
                    let left = batch[..batch.len() / 2].to_vec();
                    work.push(right);
                    work.push(left);
                }
                Action::DeadLetter { reason, message } => {
                    self.dead_letter(&batch, reason, &message).await;
                }
                Action::Pause { reason, message } => {
                    pauses += 1;
                    {
                        let mut s = self.status();
                        if s.paused.as_deref() != Some(reason) {
                            tracing::warn!(account = %self.target.account, reason, x_message = %message, "account paused; events are kept");
                            self.metrics.paused(&self.target.account, Some(reason));
                        }
                        s.paused = Some(reason.to_owned());
                        s.last_error = Some(message);
                    }
                    work.push(batch);
                    let wait = backoff(self.settings.retry_base, self.settings.pause_cap, pauses)
                        .max(self.settings.retry_base);
                    if pause_for(wait, stop).await {
                        return false;
                    }
                }
                Action::WaitUntil { until, message } => {
                    self.status().hold_until = Some(until);
                    self.status().last_error = Some(message);
                    work.push(batch);
                }
                Action::Backoff { message } => {
                    failures += 1;
                    self.status().last_error = Some(message);
                    work.push(batch);
                    if pause_for(
                        backoff(self.settings.retry_base, self.settings.retry_cap, failures),
                        stop,
                    )
                    .await
                    {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Waits for X's rate-limit hold and for the account's budget; `false` on shutdown.
    async fn wait_for_budget(&self, n: usize, stop: &mut watch::Receiver<bool>) -> bool {
        let hold = self.status().hold_until;
        if let Some(until) = hold {
            let now = epoch();
            let until = Duration::from_secs(until);
            if until > now && !self.delay_for_rate_limit(until - now, stop).await {
                return false;
            }
        }
        let now = epoch().as_nanos() as u64;
        match self.limiter.reserve(&self.budget_key, n as u64, now).await {
            Ok(at) if at > now => {
                let wait = Duration::from_nanos(at - now);
                tracing::debug!(account = %self.target.account, wait_ms = wait.as_millis() as u64, "waiting for budget");
                self.delay_for_rate_limit(wait, stop).await
            }
            Ok(_) => !*stop.borrow(),
            Err(e) => {
                // Without a persisted reservation nothing is sent: a restart must not exceed the budget.
                tracing::error!(account = %self.target.account, error = %e, "cannot persist the rate budget");
                !pause_for(self.settings.retry_base, stop).await
                    && Box::pin(self.wait_for_budget(n, stop)).await
            }
        }
    }

    /// Waits `d` for budget or X's reset, counting the time actually waited; `false` on shutdown.
    async fn delay_for_rate_limit(&self, d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        let started = Instant::now();
        let stopped = pause_for(d, stop).await;
        self.metrics
            .rate_limit_delay(&self.target.account, started.elapsed().as_secs_f64());
        !stopped
    }

    /// Moves events older than `max_event_age` to the dead letters and returns the rest.
    async fn drop_expired(&self, batch: Vec<Entry>) -> Vec<Entry> {
        let now = chrono::Utc::now();
        let max_age = chrono::Duration::from_std(self.settings.max_event_age)
            .unwrap_or(chrono::Duration::MAX);
        let (expired, fresh): (Vec<Entry>, Vec<Entry>) = batch.into_iter().partition(|e| {
            chrono::DateTime::parse_from_rfc3339(&e.record.conversion.conversion_time)
                .map(|t| now.signed_duration_since(t) > max_age)
                .unwrap_or(false)
        });
        if !expired.is_empty() {
            let message = format!(
                "not delivered within delivery.max_event_age ({})",
                humantime::format_duration(self.settings.max_event_age)
            );
            self.dead_letter(&expired, "expired", &message).await;
        }
        fresh
    }

    async fn dead_letter(&self, entries: &[Entry], reason: &str, message: &str) {
        let ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
        match self
            .spool
            .dead_letter(&self.target.account, &ids, reason, message)
            .await
        {
            Ok(()) => {
                self.status().dead_lettered += ids.len() as u64;
                self.metrics
                    .dead_lettered(&self.target.account, reason, ids.len() as u64);
                let conversion_ids: Vec<&str> = entries
                    .iter()
                    .map(|e| e.record.conversion.conversion_id.as_str())
                    .collect();
                tracing::warn!(account = %self.target.account, reason, count = ids.len(), ?conversion_ids, x_message = %message, "dead-lettered");
            }
            Err(e) => {
                tracing::error!(account = %self.target.account, error = %e, "cannot dead-letter; the events stay in the spool")
            }
        }
    }

    fn log_attempt(
        &self,
        size: usize,
        outcome: &Outcome,
        action: &Action,
        latency_ms: u64,
        attempt: u32,
    ) {
        let account = self.target.account.as_str();
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
                    "upstream request"
                )
            }
            _ => tracing::warn!(
                account,
                batch_size = size,
                status,
                latency_ms,
                attempt,
                action = action.label(),
                x_message = %outcome.message(),
                "upstream request"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_cap_and_grows() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(300));
        for attempt in 1..60 {
            let d = backoff(base, cap, attempt);
            let ceiling = Duration::from_secs(1u64 << (attempt - 1).min(24)).min(cap);
            assert!(d <= ceiling, "{attempt}: {d:?}");
        }
    }
}
