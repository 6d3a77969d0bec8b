//! The fleet's budget: `Gcra` as one Lua script (`gcra.lua`) on the Redis server's clock, one TAT key
//! per ad account, shared by every replica.
//!
//! # Design
//! - **One clock.** Every replica's reservation is computed from Redis's `TIME`, so no replica's clock
//!   skew can let a window hold more than the limit. The answer is a delay from Redis's now, applied to
//!   the caller's clock (`at = now + (at_redis - now_redis)`).
//! - **Microseconds, rounded up.** T is the embedded limiter's interval rounded up to whole µs (Lua
//!   numbers are doubles: epoch nanoseconds do not fit, microseconds do exactly).
//! - **Reserve, never deny.** Like the embedded limiter, a reservation always succeeds and says when the
//!   events may go; a full batch is never starved by small ones.
//! - **X's hold is shared.** Once any replica learns X's reset time (a 429, exhausted rate-limit headers)
//!   it stores it; every reservation of that ad account starts no earlier.
//! - **`available` from memory.** The last TAT any script answered (every reservation, refund, and a
//!   refresh each second) is kept, as the trait asks for a synchronous hint; a key never read is taken
//!   to have nothing available. Reservations themselves always ask Redis.
//!
//! # Failures
//! Redis unreachable: `reserve` answers `Err`, and the dispatcher sends nothing (it cannot know what the
//! fleet has used) and tries again; nothing is over budget, and sending resumes by itself.

use super::{Gcra, Limiter, Nanos};
use crate::clock::{Clock, SystemClock};
use crate::redis_store::Store;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

const SCRIPT: &str = include_str!("gcra.lua");
/// How often the TATs kept for `available` are read again (other replicas move them too).
const REFRESH: Duration = Duration::from_secs(1);

/// One budget key's rule, in the script's units.
#[derive(Debug, Clone, Copy)]
struct Rule {
    interval_us: u64,
    burst: u64,
    /// The same rule in nanoseconds, for `available`.
    gcra: Gcra,
}

/// Whose clock the script runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClockSource {
    /// Redis's TIME: the production setting.
    Server,
    /// The caller's `now`: only for the conformance suite, whose clock is synthetic.
    #[cfg(test)]
    Caller,
}

pub struct RedisLimiter {
    store: Store,
    script: redis::Script,
    rules: HashMap<String, Rule>,
    /// Per key: the TAT on the caller's clock, from the last answer.
    tats: Mutex<HashMap<String, Nanos>>,
    clock: ClockSource,
    /// The last `now` a caller gave (refunds and holds carry none): the synthetic clock of the suite.
    #[cfg(test)]
    last_now: std::sync::atomic::AtomicU64,
}

/// What the script answered, on the caller's clock.
struct Answer {
    at: Nanos,
}

impl RedisLimiter {
    /// A limiter over `store`, its TATs read once (when Redis answers) and then every second.
    pub async fn start(store: Store, rules: HashMap<String, Gcra>) -> Arc<RedisLimiter> {
        let limiter = Arc::new(Self::new(store, rules, ClockSource::Server));
        limiter.refresh().await;
        let weak: Weak<RedisLimiter> = Arc::downgrade(&limiter);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                limiter.refresh().await;
            }
        });
        limiter
    }

    /// On the caller's clock (the conformance suite's synthetic time); TATs read once.
    #[cfg(test)]
    pub(crate) async fn on_callers_clock(
        store: Store,
        rules: HashMap<String, Gcra>,
    ) -> Arc<RedisLimiter> {
        let limiter = Arc::new(Self::new(store, rules, ClockSource::Caller));
        limiter.refresh().await;
        limiter
    }

    fn new(store: Store, rules: HashMap<String, Gcra>, clock: ClockSource) -> RedisLimiter {
        let rules = rules
            .into_iter()
            .map(|(k, g)| {
                let interval_us = g.interval.div_ceil(1000);
                let gcra = Gcra {
                    interval: interval_us * 1000,
                    burst: g.burst,
                };
                let rule = Rule {
                    interval_us,
                    burst: g.burst,
                    gcra,
                };
                (k, rule)
            })
            .collect();
        RedisLimiter {
            store,
            script: redis::Script::new(SCRIPT),
            rules,
            tats: Mutex::new(HashMap::new()),
            clock,
            #[cfg(test)]
            last_now: Default::default(),
        }
    }

    /// Reads every key's TAT again (for `available`); a failure leaves what was known.
    async fn refresh(&self) {
        let now = self.now();
        for key in self.rules.keys() {
            let _ = self.call(key, "peek", 0, now).await;
        }
    }

    /// Runs the script for `key`; `None` for a key without a budget.
    async fn call(
        &self,
        key: &str,
        op: &str,
        n: u64,
        now: Nanos,
    ) -> Result<Option<Answer>, String> {
        let Some(rule) = self.rules.get(key) else {
            return Ok(None);
        };
        let tag = self.store.budget_tag(key);
        let now_arg = match self.clock {
            ClockSource::Server => String::new(),
            #[cfg(test)]
            ClockSource::Caller => (now / 1000).to_string(),
        };
        let mut conn = self.store.conn();
        let got: redis::RedisResult<(i64, i64, i64, i64)> = self
            .script
            .key(format!("{tag}:tat"))
            .key(format!("{tag}:hold"))
            .arg(op)
            .arg(rule.interval_us)
            .arg(rule.burst)
            .arg(n)
            .arg(now_arg)
            .invoke_async(&mut conn)
            .await;
        let (at, tat, server_now, _hold) = self.store.track("budget script", got)?;
        // From the script's clock to the caller's.
        let local = |t: i64| -> Nanos {
            let delta_ns = (t - server_now).saturating_mul(1000);
            if delta_ns >= 0 {
                now.saturating_add(delta_ns as u64)
            } else {
                now.saturating_sub(delta_ns.unsigned_abs())
            }
        };
        let answer = Answer { at: local(at) };
        if let Ok(mut tats) = self.tats.lock() {
            tats.insert(key.to_owned(), local(tat));
        }
        Ok(Some(answer))
    }
}

impl Limiter for RedisLimiter {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        n: u64,
        now: Nanos,
    ) -> BoxFuture<'a, Result<Nanos, String>> {
        async move {
            #[cfg(test)]
            self.last_now
                .store(now, std::sync::atomic::Ordering::Relaxed);
            let answer = self.call(key, "reserve", n, now).await?;
            Ok(answer.map_or(now, |a| a.at.max(now)))
        }
        .boxed()
    }

    fn available(&self, key: &str, now: Nanos) -> u64 {
        let Some(rule) = self.rules.get(key) else {
            return u64::MAX;
        };
        let tat = self.tats.lock().ok().and_then(|t| t.get(key).copied());
        tat.map_or(0, |tat| rule.gcra.available(tat, now))
    }

    fn refund<'a>(&'a self, key: &'a str, n: u64) -> BoxFuture<'a, Result<(), String>> {
        async move { self.call(key, "refund", n, self.now()).await.map(|_| ()) }.boxed()
    }

    fn hold<'a>(&'a self, key: &'a str, until: Nanos) -> BoxFuture<'a, Result<(), String>> {
        async move {
            let now = self.now();
            // The hold is on the caller's clock (X's reset time, epoch): stored on Redis's, as a delay.
            let until_us = match self.clock {
                ClockSource::Server => {
                    let server_now = self.server_time_us().await?;
                    server_now.saturating_add(until.saturating_sub(now) / 1000)
                }
                #[cfg(test)]
                ClockSource::Caller => until / 1000,
            };
            self.call(key, "hold", until_us, now).await.map(|_| ())
        }
        .boxed()
    }
}

impl RedisLimiter {
    /// The caller's clock where a call carries none.
    fn now(&self) -> Nanos {
        match self.clock {
            ClockSource::Server => SystemClock.epoch_nanos(),
            #[cfg(test)]
            ClockSource::Caller => self.last_now.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    async fn server_time_us(&self) -> Result<u64, String> {
        let got: redis::RedisResult<(u64, u64)> =
            redis::cmd("TIME").query_async(&mut self.store.conn()).await;
        let (s, us) = self.store.track("TIME", got)?;
        Ok(s * 1_000_000 + us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisUrl;
    use crate::redis_store::server::RedisServer;

    const SEC: u64 = 1_000_000_000;

    async fn limiter(server: &RedisServer) -> Arc<RedisLimiter> {
        let store = Store::open(&RedisUrl::for_tests(&server.url()), "cg").unwrap();
        let rules = [(
            "k".to_string(),
            Gcra::new(1000, Duration::from_secs(10), 100),
        )]
        .into();
        RedisLimiter::start(store, rules).await
    }

    /// Two replicas whose clocks disagree by an hour still share one schedule: Redis's.
    #[tokio::test]
    async fn replicas_with_skewed_clocks_share_the_servers_schedule() {
        let server = RedisServer::start();
        let (a, b) = (limiter(&server).await, limiter(&server).await);
        let now = SystemClock.epoch_nanos();
        assert_eq!(a.reserve("k", 100, now).await.unwrap(), now);
        let skewed = now + 3600 * SEC;
        let at = b.reserve("k", 100, skewed).await.unwrap();
        let interval = a.rules["k"].gcra.interval;
        let wait = at - skewed;
        // The second burst waits for the first to drain (100 T), less the little time that passed.
        assert!(
            wait <= 100 * interval && wait + SEC / 2 >= 100 * interval,
            "waited {wait} ns, 100 T is {} ns",
            100 * interval
        );
        // B's clock an hour ahead did not let it treat the bucket as drained; and a hold set by B
        // in its terms (30 s from its now) holds A, in A's.
        b.hold("k", skewed + 30 * SEC).await.unwrap();
        let at_a = a.reserve("k", 1, now).await.unwrap();
        assert!(at_a >= now + 29 * SEC, "held: {} s", (at_a - now) / SEC);
    }

    /// Redis gone: no reservation (nothing may be sent), and it comes back by itself.
    #[tokio::test]
    async fn no_reservation_while_redis_is_down() {
        let mut server = RedisServer::start();
        let l = limiter(&server).await;
        let now = SystemClock.epoch_nanos();
        assert!(l.reserve("k", 1, now).await.is_ok());
        server.kill();
        let err = l.reserve("k", 1, now).await.unwrap_err();
        assert!(err.starts_with("Redis budget script:"), "{err}");
        assert!(!l.store.up());
        server.restart();
        let mut ok = false;
        for _ in 0..50 {
            if l.reserve("k", 1, SystemClock.epoch_nanos()).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "reservations resume once Redis is back");
        assert!(l.store.up());
    }
}
