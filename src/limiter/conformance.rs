//! The limiter seam's conformance suite: the contract in `super`, written once, generic over the
//! implementation, run against each (`conformance!` at the bottom). A new backend joins by adding a line.

use super::{EmbeddedLimiter, Gcra, Limiter, LimiterState, Nanos, VolatileState};
use crate::spool::{DiskSpool, DiskSpoolOptions};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const SEC: u64 = 1_000_000_000;
/// 1000 events per 10 s, bursts of 100.
const LIMIT: u64 = 1000;
const WINDOW: Duration = Duration::from_secs(10);
const BURST: u64 = 100;

fn rules(keys: &[&str]) -> HashMap<String, Gcra> {
    keys.iter()
        .map(|k| (k.to_string(), Gcra::new(LIMIT, WINDOW, BURST)))
        .collect()
}

/// How the suite makes (and, for a durable implementation, restarts) the limiter under test.
pub trait Subject: Send {
    fn open(&mut self, keys: &[&str])
        -> impl std::future::Future<Output = Arc<dyn Limiter>> + Send;
    /// A new limiter over what the previous one kept (`None`: an implementation that keeps nothing).
    fn restart(
        &mut self,
        keys: &[&str],
    ) -> impl std::future::Future<Output = Option<Arc<dyn Limiter>>> + Send;
    /// Another limiter drawing on the same budget at the same time (another replica), for a shared
    /// implementation; `None` for one whose budget is its process's own.
    fn peer(
        &mut self,
        _keys: &[&str],
    ) -> impl std::future::Future<Output = Option<Arc<dyn Limiter>>> + Send {
        async { None }
    }
}

/// `EmbeddedLimiter` over `VolatileState`: state survives a new limiter in the same process.
#[derive(Default)]
pub struct Volatile(Option<Arc<VolatileState>>);

impl Subject for Volatile {
    async fn open(&mut self, keys: &[&str]) -> Arc<dyn Limiter> {
        let state = Arc::new(VolatileState::default());
        self.0 = Some(state.clone());
        Arc::new(EmbeddedLimiter::new(rules(keys), state))
    }
    async fn restart(&mut self, keys: &[&str]) -> Option<Arc<dyn Limiter>> {
        let state: Arc<dyn LimiterState> = self.0.clone()?;
        Some(Arc::new(EmbeddedLimiter::new(rules(keys), state)))
    }
}

/// `EmbeddedLimiter` over the disk spool's state: state survives closing and reopening the file.
pub struct Disk {
    dir: tempfile::TempDir,
    spool: Option<Arc<DiskSpool>>,
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            dir: tempfile::tempdir().expect("a temporary directory"),
            spool: None,
        }
    }
}

impl Disk {
    fn spool(&self) -> Arc<DiskSpool> {
        DiskSpool::open(DiskSpoolOptions {
            dir: self.dir.path().to_path_buf(),
            max_bytes: 1 << 30,
            max_dead_letters: 10,
            dedup_window: Duration::from_secs(60),
            cache_bytes: 1 << 20,
            min_free_bytes: 0,
        })
        .expect("the spool opens")
    }
}

impl Subject for Disk {
    async fn open(&mut self, keys: &[&str]) -> Arc<dyn Limiter> {
        let spool = self.spool();
        let limiter = Arc::new(EmbeddedLimiter::new(rules(keys), spool.limiter_state()));
        self.spool = Some(spool);
        limiter
    }
    async fn restart(&mut self, keys: &[&str]) -> Option<Arc<dyn Limiter>> {
        if let Some(old) = self.spool.take() {
            old.close().await.expect("a clean close");
        }
        let spool = self.spool();
        let limiter = Arc::new(EmbeddedLimiter::new(rules(keys), spool.limiter_state()));
        self.spool = Some(spool);
        Some(limiter)
    }
}

/// `RedisLimiter` on a `redis-server` of its own: state survives a new limiter (a restart), and a peer
/// is another replica over the same Redis.
pub struct Redis {
    server: crate::redis_store::server::RedisServer,
}

impl Default for Redis {
    fn default() -> Self {
        Redis {
            server: crate::redis_store::server::RedisServer::start(),
        }
    }
}

impl Redis {
    async fn limiter(&self, keys: &[&str]) -> Arc<dyn Limiter> {
        let url = crate::config::RedisUrl::for_tests(&self.server.url());
        let store = crate::redis_store::Store::open(&url, "cg").expect("a store");
        super::RedisLimiter::on_callers_clock(store, rules(keys)).await
    }
}

impl Subject for Redis {
    async fn open(&mut self, keys: &[&str]) -> Arc<dyn Limiter> {
        self.limiter(keys).await
    }
    async fn restart(&mut self, keys: &[&str]) -> Option<Arc<dyn Limiter>> {
        Some(self.limiter(keys).await)
    }
    async fn peer(&mut self, keys: &[&str]) -> Option<Arc<dyn Limiter>> {
        Some(self.limiter(keys).await)
    }
}

/// Random arrivals, each batch sent when the limiter says: no window of length `WINDOW` holds more than
/// `LIMIT` events.
pub async fn no_sliding_window_exceeds_the_limit(mut t: impl Subject) {
    let limiter = t.open(&["k"]).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut clock: Nanos = 1_000 * SEC;
    let mut sent: Vec<(Nanos, u64)> = Vec::new();
    for _ in 0..300 {
        clock += rng.gen_range(0..200_000_000);
        let n = rng.gen_range(1..=BURST);
        let at = limiter.reserve("k", n, clock).await.unwrap();
        assert!(at >= clock, "never before it was asked");
        clock = at;
        sent.push((at, n));
    }
    let most = most_in_a_window(&sent);
    assert!(most <= LIMIT, "{most} events in one window");
    // And the budget is used: 300 batches of ~50 took about as long as the rate allows, not far longer.
    let total: u64 = sent.iter().map(|(_, n)| n).sum();
    let span = sent.last().unwrap().0 - sent[0].0;
    let allowed =
        (total.saturating_sub(BURST)) as f64 / Gcra::new(LIMIT, WINDOW, BURST).rate_per_sec();
    assert!(
        (span as f64 / 1e9) < allowed * 1.1 + 1.0,
        "{span} ns for {total} events"
    );
}

pub async fn a_refund_gives_the_events_back(mut t: impl Subject) {
    let limiter = t.open(&["k"]).await;
    let now = 1_000 * SEC;
    assert_eq!(limiter.reserve("k", BURST, now).await.unwrap(), now);
    assert_eq!(limiter.available("k", now), 0);
    let second = limiter.reserve("k", BURST, now).await.unwrap();
    assert!(second > now);
    // X refused the second batch whole: the same batch may go again when it was due, not later.
    limiter.refund("k", BURST).await.unwrap();
    assert_eq!(limiter.reserve("k", BURST, now).await.unwrap(), second);
}

pub async fn the_state_survives_a_restart(mut t: impl Subject) {
    let limiter = t.open(&["k"]).await;
    let now = 1_000 * SEC;
    assert_eq!(limiter.reserve("k", BURST, now).await.unwrap(), now);
    drop(limiter);
    let Some(limiter) = t.restart(&["k"]).await else {
        return;
    };
    assert_eq!(
        limiter.available("k", now),
        0,
        "no fresh burst after a restart"
    );
    assert!(limiter.reserve("k", BURST, now).await.unwrap() > now);
}

pub async fn keys_are_independent(mut t: impl Subject) {
    let limiter = t.open(&["a", "b"]).await;
    let now = 1_000 * SEC;
    for _ in 0..3 {
        limiter.reserve("a", BURST, now).await.unwrap();
    }
    assert_eq!(limiter.available("b", now), BURST);
    assert_eq!(limiter.reserve("b", BURST, now).await.unwrap(), now);
    // A key without a budget is never held back.
    assert_eq!(limiter.reserve("other", BURST, now).await.unwrap(), now);
    assert_eq!(limiter.available("other", now), u64::MAX);
}

/// X's hold: nothing of the key is due before it, whatever the budget; other keys go on.
pub async fn a_hold_keeps_every_reservation_after_it(mut t: impl Subject) {
    let limiter = t.open(&["k", "other"]).await;
    let now = 1_000 * SEC;
    assert_eq!(limiter.reserve("k", 1, now).await.unwrap(), now);
    limiter.hold("k", now + 30 * SEC).await.unwrap();
    assert!(limiter.reserve("k", 1, now).await.unwrap() >= now + 30 * SEC);
    assert_eq!(limiter.reserve("other", 1, now).await.unwrap(), now);
    // An earlier hold learnt later does not shorten it.
    limiter.hold("k", now + 5 * SEC).await.unwrap();
    assert!(limiter.reserve("k", 1, now + 6 * SEC).await.unwrap() >= now + 30 * SEC);
    if let Some(peer) = t.peer(&["k", "other"]).await {
        assert!(
            peer.reserve("k", 1, now).await.unwrap() >= now + 30 * SEC,
            "another replica holds too"
        );
    }
}

/// Two replicas drawing on one budget at once: together they never exceed it.
pub async fn peers_share_one_budget(mut t: impl Subject) {
    let a = t.open(&["k"]).await;
    let Some(b) = t.peer(&["k"]).await else {
        return;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut clocks: [Nanos; 2] = [1_000 * SEC; 2];
    let mut sent: Vec<(Nanos, u64)> = Vec::new();
    for i in 0..200 {
        let which = i % 2;
        let limiter = if which == 0 { &a } else { &b };
        clocks[which] += rng.gen_range(0..100_000_000);
        let n = rng.gen_range(1..=BURST);
        let at = limiter.reserve("k", n, clocks[which]).await.unwrap();
        clocks[which] = at;
        sent.push((at, n));
    }
    sent.sort();
    let most = most_in_a_window(&sent);
    assert!(
        most <= LIMIT,
        "{most} events in one window across two replicas"
    );
}

/// The most events any window of length `WINDOW` holds, of `sent` (times in order, counts).
fn most_in_a_window(sent: &[(Nanos, u64)]) -> u64 {
    let window = WINDOW.as_nanos() as u64;
    (0..sent.len())
        .map(|i| {
            sent[i..]
                .iter()
                .take_while(|(t, _)| *t < sent[i].0 + window)
                .map(|(_, n)| n)
                .sum()
        })
        .max()
        .unwrap_or(0)
}

macro_rules! conformance {
    ($($name:ident => $subject:expr),+ $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test]
                async fn no_sliding_window_exceeds_the_limit() {
                    super::no_sliding_window_exceeds_the_limit($subject).await
                }
                #[tokio::test]
                async fn a_refund_gives_the_events_back() {
                    super::a_refund_gives_the_events_back($subject).await
                }
                #[tokio::test]
                async fn the_state_survives_a_restart() {
                    super::the_state_survives_a_restart($subject).await
                }
                #[tokio::test]
                async fn keys_are_independent() {
                    super::keys_are_independent($subject).await
                }
                #[tokio::test]
                async fn a_hold_keeps_every_reservation_after_it() {
                    super::a_hold_keeps_every_reservation_after_it($subject).await
                }
                #[tokio::test]
                async fn peers_share_one_budget() {
                    super::peers_share_one_budget($subject).await
                }
            }
        )+
    };
}

conformance! {
    volatile => Volatile::default(),
    disk => Disk::default(),
    redis => Redis::default(),
}
