//! The rate budget: GCRA per ad account, reserving rather than denying.
//!
//! With a budget of `limit` events per `window` and a burst of `b` events (one full batch), the emission
//! interval is `T = window / (limit - b)` and the bucket holds `b·T`. Taking `n ≤ b` events at time `a`
//! is allowed when `max(TAT, a) + n·T - a ≤ b·T`; it moves the theoretical arrival time to
//! `max(TAT, a) + n·T`. The level never exceeds `b·T` and drains at one per unit of time, so any closed
//! window of length `window` admits at most `b + window/T = limit` events. (A naive bucket of capacity
//! `limit` can let 2·limit through.)
//!
//! # Seams
//! - `Limiter`: what a dispatcher asks (reserve, refund, available). Contract of every implementation
//!   (checked by `conformance` for each): for any arrivals, no window of length `window` sees more than
//!   `limit` events of one key go; a reservation is returned only once it is persisted, so a restart
//!   never hands out a fresh burst; a refund gives back the events of a refused request; after
//!   `hold(key, until)` (X's reset time) no reservation of the key is due before `until`; keys are
//!   independent, and reservations of one key never wait for another's. A shared implementation
//!   (`RedisLimiter`) keeps all of this for every limiter over the same store: one budget for the fleet.
//! - `LimiterState`: where `EmbeddedLimiter` keeps its TATs between runs (`VolatileState` in memory,
//!   `spool::DiskLimiterState` in the spool's file). `load` answers from memory; `save` returns once the
//!   TAT is durable.

#[cfg(test)]
mod conformance;
pub mod redis;

pub use self::redis::RedisLimiter;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Nanoseconds since the Unix epoch.
pub type Nanos = u64;

/// Pure GCRA arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval T, in nanoseconds, rounded up so the guarantee holds.
    pub interval: u64,
    /// Burst b, in events.
    pub burst: u64,
}

impl Gcra {
    /// `limit` events per `window`, bursts of at most `burst` events. Requires `limit > burst > 0`.
    /// The window is widened by 1% (at most one second): X counts arrivals, and requests sent on schedule
    /// arrive with network jitter.
    pub fn new(limit: u64, window: Duration, burst: u64) -> Self {
        let burst = burst.max(1);
        let per = limit.saturating_sub(burst).max(1) as u128;
        let window = window + (window / 100).min(Duration::from_secs(1));
        let interval = window.as_nanos().div_ceil(per).min(u64::MAX as u128) as u64;
        Gcra {
            interval: interval.max(1),
            burst,
        }
    }

    /// When `n` events may go (never before `now`), and the TAT after they do.
    /// `n` above the burst is treated as the burst: a batch is never larger than it.
    pub fn schedule(&self, tat: Nanos, now: Nanos, n: u64) -> (Nanos, Nanos) {
        let n = n.min(self.burst);
        let slack = (self.burst - n).saturating_mul(self.interval);
        let at = now.max(tat.saturating_sub(slack));
        let new_tat = tat.max(at).saturating_add(n.saturating_mul(self.interval));
        (at, new_tat)
    }

    /// How many events could go at `now` without waiting.
    pub fn available(&self, tat: Nanos, now: Nanos) -> u64 {
        let used = tat.saturating_sub(now).div_ceil(self.interval);
        self.burst.saturating_sub(used)
    }

    /// The TAT after giving back `n` events that X did not take (a refused request).
    pub fn refund(&self, tat: Nanos, n: u64) -> Nanos {
        tat.saturating_sub(n.min(self.burst).saturating_mul(self.interval))
    }

    /// The long-run rate in events per second.
    pub fn rate_per_sec(&self) -> f64 {
        1e9 / self.interval as f64
    }
}

/// Where limiter state is kept between runs.
pub trait LimiterState: Send + Sync + 'static {
    /// The persisted TAT of `key`, if any.
    fn load(&self, key: &str) -> Option<Nanos>;
    /// Persists the TAT of `key`; returns once it is durable.
    fn save<'a>(&'a self, key: &'a str, tat: Nanos) -> BoxFuture<'a, Result<(), String>>;
}

/// A limiter shared by every dispatcher of the process.
pub trait Limiter: Send + Sync + 'static {
    /// Reserves `n` events of `key`'s budget and answers when they may be sent (epoch nanoseconds).
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        n: u64,
        now: Nanos,
    ) -> BoxFuture<'a, Result<Nanos, String>>;

    /// How many events of `key`'s budget could go at `now` without waiting (the burst for an unknown key).
    fn available(&self, key: &str, now: Nanos) -> u64;

    /// Gives back the `n` events of the last reservation when X refused the request without taking them.
    /// Sound for GCRA: removing an admission never raises the level at any later time.
    fn refund<'a>(&'a self, key: &'a str, n: u64) -> BoxFuture<'a, Result<(), String>>;

    /// X said to send nothing for `key` before `until` (epoch nanoseconds): no reservation is due earlier.
    fn hold<'a>(&'a self, key: &'a str, until: Nanos) -> BoxFuture<'a, Result<(), String>>;
}

/// GCRA in this process, state persisted through a `LimiterState`.
pub struct EmbeddedLimiter {
    rules: HashMap<String, Gcra>,
    tats: Mutex<HashMap<String, Nanos>>,
    state: Arc<dyn LimiterState>,
    /// One gate per budget key: a key's reservations are serialized so that its persisted TAT only moves
    /// forward, while other keys' reservations never wait for its save.
    gates: HashMap<String, tokio::sync::Mutex<()>>,
    /// X's holds, per key (in memory: a restart learns them again from X's next answer).
    holds: Mutex<HashMap<String, Nanos>>,
}

impl EmbeddedLimiter {
    pub fn new(rules: HashMap<String, Gcra>, state: Arc<dyn LimiterState>) -> Self {
        let tats = rules
            .keys()
            .filter_map(|k| state.load(k).map(|t| (k.clone(), t)))
            .collect();
        let gates = rules
            .keys()
            .map(|k| (k.clone(), Default::default()))
            .collect();
        EmbeddedLimiter {
            rules,
            tats: Mutex::new(tats),
            state,
            gates,
            holds: Mutex::default(),
        }
    }
}

impl EmbeddedLimiter {
    fn tat(&self, key: &str) -> Nanos {
        self.tats
            .lock()
            .ok()
            .and_then(|t| t.get(key).copied())
            .unwrap_or(0)
    }

    /// Moves `key`'s TAT as `step` says (`step(gcra, tat) -> (new_tat, answer)`), persisting it before
    /// answering. `None` for a key without a budget.
    async fn update<T>(
        &self,
        key: &str,
        step: impl FnOnce(&Gcra, Nanos) -> (Nanos, T),
    ) -> Result<Option<T>, String> {
        let (Some(gcra), Some(gate)) = (self.rules.get(key), self.gates.get(key)) else {
            return Ok(None);
        };
        let _one_at_a_time = gate.lock().await;
        let (new_tat, answer) = step(gcra, self.tat(key));
        self.state.save(key, new_tat).await?;
        self.tats
            .lock()
            .map_err(|e| e.to_string())?
            .insert(key.to_owned(), new_tat);
        Ok(Some(answer))
    }
}

impl Limiter for EmbeddedLimiter {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        n: u64,
        now: Nanos,
    ) -> BoxFuture<'a, Result<Nanos, String>> {
        async move {
            let hold = self
                .holds
                .lock()
                .ok()
                .and_then(|h| h.get(key).copied())
                .unwrap_or(0);
            let from = now.max(hold);
            let at = self
                .update(key, |gcra, tat| {
                    let (at, new_tat) = gcra.schedule(tat, from, n);
                    (new_tat, at)
                })
                .await?;
            Ok(at.unwrap_or(now))
        }
        .boxed()
    }

    fn available(&self, key: &str, now: Nanos) -> u64 {
        self.rules
            .get(key)
            .map_or(u64::MAX, |gcra| gcra.available(self.tat(key), now))
    }

    fn refund<'a>(&'a self, key: &'a str, n: u64) -> BoxFuture<'a, Result<(), String>> {
        async move {
            self.update(key, |gcra, tat| (gcra.refund(tat, n), ()))
                .await
                .map(|_| ())
        }
        .boxed()
    }

    fn hold<'a>(&'a self, key: &'a str, until: Nanos) -> BoxFuture<'a, Result<(), String>> {
        if self.rules.contains_key(key) {
            if let Ok(mut holds) = self.holds.lock() {
                let h = holds.entry(key.to_owned()).or_insert(0);
                *h = (*h).max(until);
            }
        }
        async { Ok(()) }.boxed()
    }
}

/// Keeps limiter state in memory only (tests, and the in-memory spool).
#[derive(Default)]
pub struct VolatileState(Mutex<HashMap<String, Nanos>>);

impl LimiterState for VolatileState {
    fn load(&self, key: &str) -> Option<Nanos> {
        self.0.lock().ok()?.get(key).copied()
    }
    fn save<'a>(&'a self, key: &'a str, tat: Nanos) -> BoxFuture<'a, Result<(), String>> {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key.to_owned(), tat);
        }
        async { Ok(()) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn interval_and_burst() {
        let g = Gcra::new(60_000, Duration::from_secs(900), 500);
        assert_eq!(
            g.interval,
            (901 * SEC).div_ceil(59_500),
            "a one-second margin on 15 minutes"
        );
        assert_eq!(
            Gcra::new(1000, Duration::from_secs(10), 100).interval,
            (10_100 * 1_000_000u64).div_ceil(900)
        );
        // A fresh bucket lets one full batch go at once, the next one waits for it to drain.
        let (at, tat) = g.schedule(0, 100 * SEC, 500);
        assert_eq!(at, 100 * SEC);
        let (at2, _) = g.schedule(tat, 100 * SEC, 500);
        assert_eq!(at2, tat);
        // Right after a full burst nothing is available; it comes back one per interval.
        assert_eq!(g.available(tat, 100 * SEC), 0);
        assert_eq!(g.available(tat, 100 * SEC + 10 * g.interval), 10);
        assert_eq!(g.available(0, 100 * SEC), 500);
        let (at3, _) = g.schedule(tat, 100 * SEC + 10 * g.interval, 10);
        assert_eq!(
            at3,
            100 * SEC + 10 * g.interval,
            "what `available` offers goes without waiting"
        );
    }

    #[test]
    fn naive_double_burst_is_impossible() {
        // limit 1000 / 10 s, burst 100: 1000 events right away is impossible; the 1000th waits ~10 s.
        let g = Gcra::new(1000, Duration::from_secs(10), 100);
        let (mut tat, mut last) = (0, 0);
        for _ in 0..10 {
            let (at, t) = g.schedule(tat, 0, 100);
            tat = t;
            last = at;
        }
        assert!(last >= 10 * SEC, "{last}");
    }

    #[tokio::test]
    async fn state_survives_a_restart() {
        let state: Arc<dyn LimiterState> = Arc::new(VolatileState::default());
        let rules: HashMap<String, Gcra> = [(
            "a".to_string(),
            Gcra::new(1000, Duration::from_secs(10), 500),
        )]
        .into();
        let first = EmbeddedLimiter::new(rules.clone(), state.clone());
        assert_eq!(first.reserve("a", 500, SEC).await.unwrap(), SEC);
        // A new limiter over the same state does not hand out a fresh burst.
        let second = EmbeddedLimiter::new(rules, state);
        assert!(second.reserve("a", 500, SEC).await.unwrap() > SEC);
        assert_eq!(second.reserve("unknown", 500, 7).await.unwrap(), 7);
        // A refused request gives its events back: the same batch may go again at once.
        let rules = [(
            "b".to_string(),
            Gcra::new(1000, Duration::from_secs(10), 500),
        )]
        .into();
        let third = EmbeddedLimiter::new(rules, Arc::new(VolatileState::default()));
        assert_eq!(third.reserve("b", 500, SEC).await.unwrap(), SEC);
        third.refund("b", 500).await.unwrap();
        assert_eq!(third.reserve("b", 500, SEC).await.unwrap(), SEC);
    }

    /// A state whose saves of key "slow" wait until released.
    struct SlowState {
        inner: VolatileState,
        release: tokio::sync::Notify,
    }

    impl LimiterState for SlowState {
        fn load(&self, key: &str) -> Option<Nanos> {
            self.inner.load(key)
        }
        fn save<'a>(&'a self, key: &'a str, tat: Nanos) -> BoxFuture<'a, Result<(), String>> {
            async move {
                if key == "slow" {
                    self.release.notified().await;
                }
                self.inner.save(key, tat).await
            }
            .boxed()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_waiting_on_its_save_does_not_hold_up_another() {
        let rules: HashMap<String, Gcra> = ["slow", "fast"]
            .into_iter()
            .map(|k| (k.to_string(), Gcra::new(1000, Duration::from_secs(10), 100)))
            .collect();
        let state = Arc::new(SlowState {
            inner: VolatileState::default(),
            release: tokio::sync::Notify::new(),
        });
        let limiter = Arc::new(EmbeddedLimiter::new(rules, state.clone()));
        let slow = tokio::spawn({
            let l = limiter.clone();
            async move { l.reserve("slow", 10, SEC).await }
        });
        tokio::task::yield_now().await;
        let fast =
            tokio::time::timeout(Duration::from_secs(1), limiter.reserve("fast", 10, SEC)).await;
        assert_eq!(fast.expect("not held up by the other key").unwrap(), SEC);
        assert!(!slow.is_finished(), "the slow save is still waiting");
        state.release.notify_one();
        assert_eq!(slow.await.unwrap().unwrap(), SEC);
    }

    proptest! {
        /// Whatever the arrival pattern, no window of length `window` holds more than `limit` events.
        #[test]
        fn no_sliding_window_exceeds_the_limit(
            limit in 2u64..3000,
            burst_frac in 1u64..100,
            window_ms in 10u64..20_000,
            arrivals in proptest::collection::vec((0u64..30_000, 1u64..600), 1..200),
        ) {
            let burst = (limit * burst_frac / 100).clamp(1, limit - 1);
            let window = window_ms * 1_000_000;
            let g = Gcra::new(limit, Duration::from_nanos(window), burst);
            let mut arrivals = arrivals;
            arrivals.sort();
            let (mut tat, mut clock) = (0u64, 0u64);
            let mut sent: Vec<(u64, u64)> = Vec::new();
            for (t_ms, n) in arrivals {
                // A dispatcher asks when its batch arrives, or when the previous one went, whichever is later.
                clock = clock.max(t_ms * 1_000_000);
                let n = n.min(burst);
                let (at, new_tat) = g.schedule(tat, clock, n);
                prop_assert!(at >= clock);
                tat = new_tat;
                clock = at;
                sent.push((at, n));
            }
            for (i, (start, _)) in sent.iter().enumerate() {
                let in_window: u64 = sent[i..].iter().take_while(|(t, _)| *t <= start + window).map(|(_, n)| n).sum();
                prop_assert!(in_window <= limit, "{} events in a window, limit {}", in_window, limit);
            }
        }
    }
}
