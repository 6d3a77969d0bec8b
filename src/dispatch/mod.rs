//! One task per account: wait for events and budget, take a batch, hand it to the `Transport`, act on
//! the outcome as `policy::decide` says.
//!
//! # Invariants
//! - At most one request per account is in flight; a batch never holds more than `max_batch`
//!   conversions and is sent only once the account's budget allows it (`limiter`).
//! - An event leaves the spool only when X accepted it or it was dead-lettered (refused alone, or too old).
//! - A batch that was not accepted is resent with the same conversions and `conversion_id`s, signed
//!   afresh; a refused batch is split in halves until the refused conversions are alone, so one bad event
//!   never blocks the others.
//! - Shutdown lets the request in flight finish and its ack commit, then stops; what is not sent stays in
//!   the spool.
//!
//! # Time
//! The wall clock (`Clock`) and the transport are injected, and every wait is a `tokio::time` sleep, so the
//! unit tests (`tests`) run linger, backoff, pauses and X's holds on tokio's paused clock.

mod acker;
pub mod policy;
#[cfg(test)]
mod tests;

use crate::clock::Clock;
use crate::conversion::{Conversion, BATCH_ENVELOPE};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::reasons::{DeadLetterReason, PauseReason};
use crate::shutdown::Shutdown;
use crate::spool::{Entry, Spool, Undecodable};
use crate::upstream::{Outcome, Target, Transport};
use acker::{AckTarget, Acker};
use policy::Action;
use serde::Serialize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct DispatchSettings {
    pub max_batch: usize,
    /// One request body at most (bytes of X's JSON); a batch is cut there whatever its count.
    pub max_batch_bytes: usize,
    pub linger: Duration,
    pub max_event_age: Duration,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub pause_cap: Duration,
}

/// What an operator wants to know about an account's delivery (the admin API shows it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AccountStatus {
    pub paused: Option<PauseReason>,
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    /// When `last_error` happened (epoch milliseconds): it stays after later successes.
    pub last_error_at: Option<u64>,
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
    pub transport: Arc<dyn Transport>,
    pub limiter: Arc<dyn Limiter>,
    pub clock: Arc<dyn Clock>,
    pub settings: DispatchSettings,
    pub status: Arc<Mutex<AccountStatus>>,
    pub metrics: Arc<Metrics>,
}

/// Sleeps for `d` or until shutdown; `true` when shutdown came first.
async fn sleep_or_stop(d: Duration, stop: &mut Shutdown) -> bool {
    if stop.is_set() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => stop.is_set(),
        _ = stop.wait_ref() => true,
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base · 2^(attempt-1))].
pub fn backoff(base: Duration, cap: Duration, attempt: u32) -> Duration {
    backoff_ceiling(base, cap, attempt).mul_f64(rand::random::<f64>())
}

/// The most `backoff` waits before `attempt`.
pub fn backoff_ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.saturating_sub(1).min(24))
        .min(cap)
}

/// Consecutive unsuccessful attempts of one batch, by kind: they set the next wait.
#[derive(Default)]
struct Attempts {
    failures: u32,
    pauses: u32,
    /// The credentials' generation the last attempt was signed with: a pause ends early once they
    /// are replaced (a reload that fixes them).
    credentials: u64,
}

impl Attempts {
    fn number(&self) -> u32 {
        self.failures + self.pauses + 1
    }
}

/// Whether the delivery goes on after a step.
enum Flow {
    Continue,
    Stopped,
}

impl Dispatcher {
    fn status(&self) -> MutexGuard<'_, AccountStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn account(&self) -> &str {
        &self.target.account
    }

    pub async fn run(self, mut stop: Shutdown) {
        let mut acker = Acker::default();
        self.run_until_stopped(&mut stop, &mut acker).await;
        // What X accepted is acked before the task ends, so a restart does not resend it.
        acker.finish().await;
    }

    /// Events waiting that are not already being acked.
    fn waiting(&self, acker: &Acker) -> usize {
        self.spool
            .backlog(self.account())
            .saturating_sub(acker.in_flight())
    }

    async fn run_until_stopped(&self, stop: &mut Shutdown, acker: &mut Acker) {
        let changed = self.spool.changed(self.account());
        // The highest id handed to `deliver`: the next batch is taken after it, so the ack of the previous
        // batch can commit while the next one is on its way to X.
        let mut cursor = 0u64;
        loop {
            if stop.is_set() {
                return;
            }
            if acker.take_failed() {
                cursor = 0;
            }
            if self.waiting(acker) == 0 {
                if acker.in_flight() > 0 {
                    acker.finish().await;
                    continue;
                }
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = stop.wait_ref() => return,
                }
                continue;
            }
            if !self.linger(acker, &changed, stop).await {
                return;
            }
            let peek = match self
                .spool
                .peek_after(self.account(), cursor, self.settings.max_batch)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(account = %self.account(), error = %e, "cannot read the spool");
                    if sleep_or_stop(self.settings.retry_base, stop).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(last) = peek.last_id() else {
                // Everything waiting is in hand already (its ack is committing), or an ack failed.
                if acker.in_flight() > 0 {
                    acker.finish().await;
                } else if cursor > 0 {
                    cursor = 0;
                } else if sleep_or_stop(self.settings.retry_base, stop).await {
                    return;
                }
                continue;
            };
            cursor = last;
            self.dead_letter_undecodable(&peek.undecodable).await;
            if peek.entries.is_empty() {
                continue;
            }
            if !self.deliver(peek.entries, stop, acker).await {
                return;
            }
        }
    }

    /// Waits for a full batch, but no longer than `linger`; `false` on shutdown.
    async fn linger(
        &self,
        acker: &Acker,
        changed: &tokio::sync::Notify,
        stop: &mut Shutdown,
    ) -> bool {
        let deadline = Instant::now() + self.settings.linger;
        while self.waiting(acker) < self.settings.max_batch {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = changed.notified() => {}
                _ = stop.wait_ref() => return false,
            }
        }
        true
    }

    /// Delivers one batch to the end: every entry is acked or dead-lettered, unless shutdown comes first
    /// (`false`), in which case what is left stays in the spool.
    async fn deliver(&self, batch: Vec<Entry>, stop: &mut Shutdown, acker: &mut Acker) -> bool {
        let mut work = vec![batch];
        let mut attempts = Attempts::default();
        while let Some(batch) = work.pop() {
            let mut batch = self.drop_expired(batch).await;
            if batch.is_empty() {
                continue;
            }
            if let Some(rest) = self.split_to_bytes(&mut batch) {
                work.push(rest);
            }
            if let Some(rest) = self.split_to_budget(&mut batch) {
                work.push(rest);
            }
            if !self.wait_for_budget(batch.len(), stop).await {
                return false;
            }
            attempts.credentials = self.target.auth.generation();
            let action = self.attempt(&batch, attempts.number()).await;
            let flow = self
                .act(action, batch, &mut work, &mut attempts, stop, acker)
                .await;
            if let Flow::Stopped = flow {
                return false;
            }
        }
        true
    }

    /// When the batch's body would pass `max_batch_bytes`, the part to send after it (the batch keeps at
    /// least one conversion: ingest bounds one event's size well below the cap).
    fn split_to_bytes(&self, batch: &mut Vec<Entry>) -> Option<Vec<Entry>> {
        let at_most = batch.iter().fold(BATCH_ENVELOPE, |n, e| {
            n.saturating_add(e.record.conversion.wire_len_at_most() + 1)
        });
        if at_most <= self.settings.max_batch_bytes {
            return None;
        }
        let mut size = BATCH_ENVELOPE;
        let cut = batch.iter().position(|e| {
            // A conversion and the comma before it.
            size += e.record.conversion.wire_len() + 1;
            size > self.settings.max_batch_bytes
        })?;
        let at = cut.max(1);
        (at < batch.len()).then(|| batch.split_off(at))
    }

    /// When the budget allows fewer events than the batch holds, the part to send later: the rest goes now
    /// rather than holding the whole batch back (but not in slivers: at least a quarter of a full batch).
    fn split_to_budget(&self, batch: &mut Vec<Entry>) -> Option<Vec<Entry>> {
        let available = self
            .limiter
            .available(&self.budget_key, self.clock.epoch_nanos());
        let floor = (self.settings.max_batch as u64 / 4).max(1);
        (available < batch.len() as u64 && available >= floor)
            .then(|| batch.split_off(available as usize))
    }

    /// Sends `batch` once and says what to do about the answer; counts, logs and gives back the budget of
    /// a request X refused whole.
    async fn attempt(&self, batch: &[Entry], attempt: u32) -> Action {
        let conversions: Vec<Conversion> =
            batch.iter().map(|e| e.record.conversion.clone()).collect();
        let started = Instant::now();
        let outcome = self.transport.send(&self.target, &conversions).await;
        let latency = started.elapsed();
        self.metrics.upstream_request(
            self.account(),
            &outcome.status_label(),
            latency.as_secs_f64(),
            batch.len(),
        );
        let action = policy::decide(&outcome, batch.len(), self.clock.epoch().as_secs());
        if matches!(
            outcome,
            Outcome::Refused {
                status: 400..=499,
                ..
            } | Outcome::BodyNotSent { .. }
        ) {
            // X refused the request whole and took none of it: its events do not count.
            if let Err(e) = self
                .limiter
                .refund(&self.budget_key, batch.len() as u64)
                .await
            {
                tracing::warn!(account = %self.account(), error = %e, "cannot give back unused budget");
            }
        }
        self.log_attempt(
            batch.len(),
            &outcome,
            &action,
            latency.as_millis() as u64,
            attempt,
        );
        self.status().last_status = Some(outcome.status_label());
        action
    }

    /// Does what `action` says with `batch`; what must be sent again goes back on `work`.
    async fn act(
        &self,
        action: Action,
        batch: Vec<Entry>,
        work: &mut Vec<Vec<Entry>>,
        attempts: &mut Attempts,
        stop: &mut Shutdown,
        acker: &mut Acker,
    ) -> Flow {
        let wait = match action {
            Action::Ack {
                debug_id,
                hold_until,
            } => {
                *attempts = Attempts::default();
                self.delivered(debug_id, hold_until);
                if let Some(until) = hold_until {
                    self.share_hold(until).await;
                }
                let to = AckTarget {
                    spool: self.spool.clone(),
                    account: self.account().to_owned(),
                    status: self.status.clone(),
                    metrics: self.metrics.clone(),
                };
                acker.submit(to, batch.iter().map(|e| e.id).collect()).await;
                None
            }
            Action::Split => {
                let mut left = batch;
                let right = left.split_off(left.len() / 2);
                work.push(right);
                work.push(left);
                None
            }
            Action::DeadLetter { reason, message } => {
                self.dead_letter(&batch, reason, &message).await;
                None
            }
            Action::Pause { reason, message } => {
                attempts.pauses += 1;
                self.paused(reason, message);
                work.push(batch);
                let s = &self.settings;
                let pause = backoff(s.retry_base, s.pause_cap, attempts.pauses).max(s.retry_base);
                let replaced = self.target.auth.changed_since(attempts.credentials);
                tokio::select! {
                    stopped = sleep_or_stop(pause, stop) => if stopped { return Flow::Stopped },
                    _ = replaced => {
                        tracing::info!(account = %self.account(), "credentials replaced: sending again now");
                        attempts.pauses = 0;
                    }
                }
                None
            }
            Action::WaitUntil { until, message } => {
                self.failed_with(message);
                self.status().hold_until = Some(until);
                self.share_hold(until).await;
                work.push(batch);
                None
            }
            Action::Backoff { message } => {
                attempts.failures += 1;
                self.failed_with(message);
                work.push(batch);
                let s = &self.settings;
                Some(backoff(s.retry_base, s.retry_cap, attempts.failures))
            }
        };
        match wait {
            Some(d) if sleep_or_stop(d, stop).await => Flow::Stopped,
            _ => Flow::Continue,
        }
    }

    /// Tells the limiter X's reset time (epoch seconds), so that no dispatcher drawing on the budget,
    /// in this process or (shared) another replica, sends before it.
    async fn share_hold(&self, until: u64) {
        let until = until.saturating_mul(1_000_000_000);
        if let Err(e) = self.limiter.hold(&self.budget_key, until).await {
            tracing::warn!(account = %self.account(), error = %e, "cannot share X's rate-limit hold; this replica keeps it");
        }
    }

    /// X took a batch: what it said is recorded, and a pause ends.
    fn delivered(&self, debug_id: Option<String>, hold_until: Option<u64>) {
        let mut s = self.status();
        s.last_debug_id = debug_id;
        s.hold_until = hold_until;
        if let Some(reason) = s.paused.take() {
            tracing::info!(account = %self.account(), %reason, "account resumed");
            self.metrics.paused(self.account(), None);
        }
    }

    fn paused(&self, reason: PauseReason, message: String) {
        let mut s = self.status();
        if s.paused != Some(reason) {
            tracing::warn!(account = %self.account(), %reason, x_message = %message, "account paused; events are kept");
            self.metrics.paused(self.account(), Some(reason));
        }
        s.paused = Some(reason);
        drop(s);
        self.failed_with(message);
    }

    /// Records the last error and when it happened.
    fn failed_with(&self, message: String) {
        let at = u64::try_from(self.clock.epoch().as_millis()).unwrap_or(u64::MAX);
        let mut s = self.status();
        s.last_error = Some(message);
        s.last_error_at = Some(at);
    }

    /// Waits for X's rate-limit hold and for the account's budget; `false` on shutdown.
    async fn wait_for_budget(&self, n: usize, stop: &mut Shutdown) -> bool {
        let hold = self.status().hold_until;
        if let Some(until) = hold {
            let now = self.clock.epoch();
            let until = Duration::from_secs(until);
            if until > now && !self.delay_for_rate_limit(until - now, stop).await {
                return false;
            }
        }
        loop {
            let now = self.clock.epoch_nanos();
            match self.limiter.reserve(&self.budget_key, n as u64, now).await {
                Ok(at) if at > now => {
                    let wait = Duration::from_nanos(at - now);
                    tracing::debug!(account = %self.account(), wait_ms = wait.as_millis() as u64, "waiting for budget");
                    return self.delay_for_rate_limit(wait, stop).await;
                }
                Ok(_) => return !stop.is_set(),
                Err(e) => {
                    // Without a persisted reservation nothing is sent: a restart must not exceed the
                    // budget, nor a replica the fleet's.
                    tracing::error!(account = %self.account(), error = %e, "cannot reserve from the rate budget; nothing is sent until it can");
                    self.failed_with(format!(
                        "the rate budget cannot be checked, nothing is sent: {e}"
                    ));
                    if sleep_or_stop(self.settings.retry_base, stop).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits `d` for budget or X's reset, counting the time actually waited; `false` on shutdown.
    async fn delay_for_rate_limit(&self, d: Duration, stop: &mut Shutdown) -> bool {
        let started = Instant::now();
        let stopped = sleep_or_stop(d, stop).await;
        self.metrics
            .rate_limit_delay(self.account(), started.elapsed().as_secs_f64());
        !stopped
    }

    /// Moves events older than `max_event_age` to the dead letters and returns the rest.
    async fn drop_expired(&self, batch: Vec<Entry>) -> Vec<Entry> {
        let now_ms = i64::try_from(self.clock.epoch().as_millis()).unwrap_or(i64::MAX);
        let max_age = self.settings.max_event_age;
        let max_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        let (expired, fresh): (Vec<Entry>, Vec<Entry>) = batch.into_iter().partition(|e| {
            chrono::DateTime::parse_from_rfc3339(&e.record.conversion.conversion_time)
                .is_ok_and(|t| now_ms.saturating_sub(t.timestamp_millis()) > max_ms)
        });
        if !expired.is_empty() {
            let message = format!(
                "not delivered within delivery.max_event_age ({})",
                humantime::format_duration(max_age)
            );
            self.dead_letter(&expired, DeadLetterReason::Expired, &message)
                .await;
        }
        fresh
    }

    /// Records that no longer decode cannot be sent: they go to the dead letters as `corrupt`, one by
    /// one (each with its own error), and the account's other events go on.
    async fn dead_letter_undecodable(&self, records: &[Undecodable]) {
        for r in records {
            let message = format!(
                "the stored record ({} bytes) does not decode: {}",
                r.raw_bytes, r.error
            );
            if self
                .move_to_dead_letters(&[r.id], DeadLetterReason::Corrupt, &message)
                .await
            {
                tracing::error!(account = %self.account(), id = r.id, raw_bytes = r.raw_bytes, error = %r.error, "a stored record does not decode; dead-lettered as corrupt");
            }
        }
    }

    async fn dead_letter(&self, entries: &[Entry], reason: DeadLetterReason, message: &str) {
        let ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
        if self.move_to_dead_letters(&ids, reason, message).await {
            let conversion_ids: Vec<&str> = entries
                .iter()
                .map(|e| e.record.conversion.conversion_id.as_str())
                .collect();
            tracing::warn!(account = %self.account(), %reason, count = ids.len(), ?conversion_ids, x_message = %message, "dead-lettered");
        }
    }

    /// Moves `ids` to the dead letters and counts them (status, metrics); `false`, logged, when the spool
    /// could not, in which case they stay waiting.
    async fn move_to_dead_letters(
        &self,
        ids: &[u64],
        reason: DeadLetterReason,
        message: &str,
    ) -> bool {
        match self
            .spool
            .dead_letter(self.account(), ids, reason, message)
            .await
        {
            Ok(()) => {
                self.status().dead_lettered += ids.len() as u64;
                self.metrics
                    .dead_lettered(self.account(), reason, ids.len() as u64);
                true
            }
            Err(e) => {
                tracing::error!(account = %self.account(), %reason, error = %e, "cannot dead-letter; the events stay in the spool");
                false
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
        let account = self.account();
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
