//! The dispatcher on tokio's paused clock, against a scripted transport and the in-memory spool: linger,
//! budget, bisection, pauses, X's holds, backoff, expiry, shutdown and failing acks, each in milliseconds.

use super::*;
use crate::clock::TokioClock;
use crate::limiter::{EmbeddedLimiter, Gcra, VolatileState};
use crate::spool::{DeadLetterQuery, DeadLetterStore, MemorySpool, Queue, Record};
use crate::upstream::{RateLimitInfo, XError};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::collections::HashMap;

/// What one request carried and when it started (time since the test began).
#[derive(Debug, Clone)]
struct Call {
    at: Duration,
    ids: Vec<String>,
    /// The request body's size in bytes.
    bytes: usize,
}

type Respond = dyn Fn(usize, &[Conversion]) -> Outcome + Send + Sync;

/// A transport that answers as the test says (by call number and content), after `latency`.
struct Scripted {
    respond: Box<Respond>,
    latency: Duration,
    start: Instant,
    calls: Mutex<Vec<Call>>,
}

impl Transport for Scripted {
    fn send<'a>(
        &'a self,
        _target: &'a Target,
        conversions: &'a [Conversion],
    ) -> BoxFuture<'a, Outcome> {
        async move {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(Call {
                    at: self.start.elapsed(),
                    ids: conversions
                        .iter()
                        .map(|c| c.conversion_id.clone())
                        .collect(),
                    bytes: crate::conversion::json_len(&crate::conversion::Batch { conversions }),
                });
                calls.len() - 1
            };
            tokio::time::sleep(self.latency).await;
            (self.respond)(n, conversions)
        }
        .boxed()
    }
}

fn ok() -> Outcome {
    Outcome::Accepted {
        status: 200,
        conversions_processed: None,
        debug_id: Some("d".into()),
        rate_limit: RateLimitInfo::default(),
    }
}

fn refused(status: u16, rate_limit: RateLimitInfo) -> Outcome {
    Outcome::Refused {
        status,
        errors: vec![XError {
            code: "X".into(),
            message: format!("status {status}"),
            parameter: None,
        }],
        rate_limit,
        body_excerpt: None,
    }
}

/// 400 when the batch holds a conversion whose id starts with "bad", else 200.
fn refuse_bad(_: usize, conversions: &[Conversion]) -> Outcome {
    if conversions
        .iter()
        .any(|c| c.conversion_id.starts_with("bad"))
    {
        refused(400, RateLimitInfo::default())
    } else {
        ok()
    }
}

fn settings() -> DispatchSettings {
    DispatchSettings {
        max_batch: 10,
        max_batch_bytes: 1 << 20,
        linger: Duration::from_millis(200),
        max_event_age: Duration::from_secs(7 * 86400),
        retry_base: Duration::from_secs(1),
        retry_cap: Duration::from_secs(10),
        pause_cap: Duration::from_secs(8),
    }
}

/// A whole second, so that X's reset times (epoch seconds) fall on the test's clock exactly.
const ORIGIN: Duration = Duration::from_secs(1_796_000_000);

struct Harness {
    spool: Arc<MemorySpool>,
    transport: Arc<Scripted>,
    status: Arc<Mutex<AccountStatus>>,
    clock: TokioClock,
    trigger: crate::shutdown::Trigger,
    task: tokio::task::JoinHandle<()>,
}

struct Setup {
    settings: DispatchSettings,
    budget: Option<Gcra>,
    latency: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            settings: settings(),
            budget: None,
            latency: Duration::from_millis(5),
        }
    }
}

fn start(
    setup: Setup,
    respond: impl Fn(usize, &[Conversion]) -> Outcome + Send + Sync + 'static,
) -> Harness {
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 30));
    let transport = Arc::new(Scripted {
        respond: Box::new(respond),
        latency: setup.latency,
        start: Instant::now(),
        calls: Mutex::default(),
    });
    let clock = TokioClock::starting_at(ORIGIN);
    let budgets: HashMap<String, Gcra> = setup
        .budget
        .into_iter()
        .map(|g| ("ad".to_string(), g))
        .collect();
    let status: Arc<Mutex<AccountStatus>> = Default::default();
    let (trigger, stop) = Shutdown::new();
    let dispatcher = Dispatcher {
        target: Target {
            account: "acme".into(),
            pixel_id: "o9d7n".into(),
            auth: crate::upstream::Credentials::new(None),
        },
        budget_key: "ad".into(),
        spool: spool.clone(),
        transport: transport.clone(),
        limiter: Arc::new(EmbeddedLimiter::new(
            budgets,
            Arc::new(VolatileState::default()),
        )),
        clock: Arc::new(clock.clone()),
        settings: setup.settings,
        status: status.clone(),
        metrics: Arc::new(Metrics::new(["acme"])),
    };
    let task = tokio::spawn(dispatcher.run(stop));
    Harness {
        spool,
        transport,
        status,
        clock,
        trigger,
        task,
    }
}

fn wire_time(epoch: Duration) -> String {
    chrono::DateTime::from_timestamp_millis(epoch.as_millis() as i64)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl Harness {
    async fn append(&self, ids: &[&str]) {
        self.append_at(ids, self.clock.epoch()).await
    }

    /// Events whose conversion happened at `when`.
    async fn append_at(&self, ids: &[&str], when: Duration) {
        let now_ms = self.clock.epoch().as_millis() as i64;
        let records = ids
            .iter()
            .map(|id| Record {
                account: "acme".into(),
                conversion: Conversion::minimal(&wire_time(when), "o9d2g", "t", id),
                received_at_ms: now_ms,
                event_name: None,
            })
            .collect();
        self.spool.append(records).await.unwrap();
    }

    fn calls(&self) -> Vec<Call> {
        self.transport.calls.lock().unwrap().clone()
    }

    fn status(&self) -> AccountStatus {
        self.status.lock().unwrap().clone()
    }

    /// Lets the dispatcher run for `d` of (paused) time.
    async fn run_for(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    async fn dead(&self) -> Vec<(String, DeadLetterReason)> {
        self.spool
            .dead_letters(DeadLetterQuery {
                account: None,
                after: 0,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_iter()
            .map(|d| {
                (
                    d.conversion.map(|c| c.conversion_id).unwrap_or_default(),
                    d.reason,
                )
            })
            .collect()
    }

    async fn stop(self) {
        self.trigger.fire();
        self.task.await.unwrap();
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_goes_at_once_a_partial_one_after_linger() {
    let h = start(
        Setup {
            settings: DispatchSettings {
                linger: Duration::from_secs(3600),
                ..settings()
            },
            ..Setup::default()
        },
        |_, _| ok(),
    );
    h.append(&strs(&ids("c", 10))).await;
    h.run_for(Duration::from_millis(50)).await;
    let calls = h.calls();
    assert_eq!(calls.len(), 1, "a full batch does not linger");
    assert_eq!(calls[0].ids, ids("c", 10));
    assert!(calls[0].at < Duration::from_millis(1), "{:?}", calls[0].at);
    assert_eq!(h.spool.backlog("acme"), 0);
    h.stop().await;

    let h = start(Setup::default(), |_, _| ok());
    h.append(&["a", "b", "c"]).await;
    h.run_for(Duration::from_millis(150)).await;
    assert!(
        h.calls().is_empty(),
        "three events wait for the linger time"
    );
    h.run_for(Duration::from_millis(100)).await;
    let calls = h.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].ids, ["a", "b", "c"]);
    let linger = settings().linger;
    assert!(
        calls[0].at >= linger && calls[0].at < linger + Duration::from_millis(5),
        "{:?}",
        calls[0].at
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_budget_smaller_than_the_batch_sends_what_it_allows_now() {
    // 1000 events per 10 s, bursts of 100: one event per ~11.2 ms once the burst is spent.
    let gcra = Gcra::new(1000, Duration::from_secs(10), 100);
    let h = start(
        Setup {
            settings: DispatchSettings {
                max_batch: 100,
                ..settings()
            },
            budget: Some(gcra),
            latency: Duration::ZERO,
        },
        |_, _| ok(),
    );
    h.append(&strs(&ids("a", 100))).await;
    h.run_for(Duration::from_millis(1)).await;
    // 40 intervals later the budget holds 40 events: at least a quarter batch, so 40 go at once.
    let forty = Duration::from_nanos(gcra.interval * 40);
    h.run_for(forty).await;
    h.append(&strs(&ids("b", 100))).await;
    h.run_for(Duration::from_secs(5)).await;
    let calls = h.calls();
    let sizes: Vec<usize> = calls.iter().map(|c| c.ids.len()).collect();
    assert_eq!(sizes, [100, 40, 60], "{calls:?}");
    assert!(
        calls[1].at <= forty + Duration::from_millis(2),
        "{:?}",
        calls[1].at
    );
    // The other 60 wait for their own budget: 60 intervals after the 40.
    let waited = calls[2].at - calls[1].at;
    assert!(
        waited >= Duration::from_nanos(gcra.interval * 59),
        "{waited:?}"
    );
    assert_eq!(calls[2].ids, ids("b", 100)[40..].to_vec());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_cut_by_bytes_as_well_as_by_count() {
    let cap = 600;
    let h = start(
        Setup {
            settings: DispatchSettings {
                max_batch: 10,
                max_batch_bytes: cap,
                ..settings()
            },
            ..Setup::default()
        },
        |_, _| ok(),
    );
    let all = ids("c", 10);
    h.append(&strs(&all)).await;
    h.run_for(Duration::from_secs(1)).await;
    let calls = h.calls();
    let one =
        crate::conversion::json_len(&Conversion::minimal(&wire_time(ORIGIN), "o9d2g", "t", "c0"));
    assert!(
        calls.len() > 1,
        "ten conversions of {one} bytes do not fit {cap} bytes"
    );
    for c in &calls {
        assert!(c.bytes <= cap, "{} bytes", c.bytes);
    }
    let sent: Vec<String> = calls.iter().flat_map(|c| c.ids.clone()).collect();
    assert_eq!(sent, all, "all of them, once, in order");
    // Each batch was as full as the cap allows: adding the next conversion would have passed it.
    for pair in calls.windows(2) {
        assert!(pair[0].bytes + one + 1 > cap, "{:?}", pair[0]);
    }
    assert_eq!(h.spool.backlog("acme"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_bad_event_is_isolated_within_the_bisection_bound() {
    let h = start(
        Setup {
            settings: DispatchSettings {
                max_batch: 16,
                ..settings()
            },
            ..Setup::default()
        },
        refuse_bad,
    );
    let mut batch = ids("c", 16);
    batch[11] = "bad".into();
    h.append(&strs(&batch)).await;
    h.run_for(Duration::from_secs(1)).await;
    let calls = h.calls();
    // One request, then two per halving down to the single event: 1 + 2·log2(16).
    assert!(calls.len() <= 9, "{} requests", calls.len());
    assert_eq!(
        h.dead().await,
        [("bad".to_string(), DeadLetterReason::Rejected)]
    );
    assert_eq!(h.spool.backlog("acme"), 0);
    assert_eq!(h.status().delivered, 15);
    assert_eq!(h.status().dead_lettered, 1);
    // No event went to X twice after X took it, and every good one went once in an accepted batch.
    let accepted: Vec<String> = calls
        .iter()
        .filter(|c| !c.ids.iter().any(|i| i == "bad"))
        .flat_map(|c| c.ids.clone())
        .collect();
    assert_eq!(accepted.len(), 15);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn several_bad_events_are_each_isolated_and_the_rest_delivered() {
    let h = start(
        Setup {
            settings: DispatchSettings {
                max_batch: 64,
                ..settings()
            },
            ..Setup::default()
        },
        refuse_bad,
    );
    let mut batch = ids("c", 64);
    for i in [0, 30, 63] {
        batch[i] = format!("bad{i}");
    }
    h.append(&strs(&batch)).await;
    h.run_for(Duration::from_secs(1)).await;
    // At most 1 + 2·k·log2(n) requests for k bad events among n.
    assert!(h.calls().len() <= 1 + 2 * 3 * 6, "{}", h.calls().len());
    let mut dead = h.dead().await;
    dead.sort();
    assert_eq!(
        dead,
        ["bad0", "bad30", "bad63"].map(|s| (s.to_string(), DeadLetterReason::Rejected))
    );
    assert_eq!(h.status().delivered, 61);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn configuration_faults_pause_and_probe_with_a_capped_backoff() {
    for (status, reason) in [
        (401, PauseReason::Unauthorized),
        (403, PauseReason::Forbidden),
        (404, PauseReason::NotFound),
    ] {
        let h = start(Setup::default(), move |n, _| {
            if n < 8 {
                refused(status, RateLimitInfo::default())
            } else {
                ok()
            }
        });
        h.append(&["a", "b"]).await;
        h.run_for(Duration::from_secs(5)).await;
        assert_eq!(h.status().paused, Some(reason), "{status}");
        assert_eq!(h.spool.backlog("acme"), 2, "events are kept while paused");
        h.run_for(Duration::from_secs(120)).await;
        let calls = h.calls();
        assert_eq!(calls.len(), 9, "{status}: eight refusals, then delivered");
        let (base, cap) = (settings().retry_base, settings().pause_cap);
        for pair in calls.windows(2) {
            let gap = pair[1].at - pair[0].at;
            // At least retry_base between probes, at most pause_cap (plus the request's own latency).
            assert!(gap >= base, "{status}: {gap:?}");
            assert!(gap <= cap + Duration::from_millis(10), "{status}: {gap:?}");
        }
        assert!(calls.iter().all(|c| c.ids == ["a", "b"]));
        assert_eq!(h.status().paused, None, "a success ends the pause");
        assert_eq!(h.spool.backlog("acme"), 0);
        h.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_holds_every_request_until_xs_reset() {
    let reset = ORIGIN.as_secs() + 120;
    let h = start(Setup::default(), move |n, _| {
        if n == 0 {
            refused(
                429,
                RateLimitInfo {
                    remaining: Some(0),
                    reset: Some(reset),
                    ..Default::default()
                },
            )
        } else {
            ok()
        }
    });
    h.append(&["a"]).await;
    h.run_for(Duration::from_secs(60)).await;
    assert_eq!(h.calls().len(), 1, "nothing is sent before the reset");
    assert_eq!(h.status().hold_until, Some(reset));
    h.run_for(Duration::from_secs(70)).await;
    let calls = h.calls();
    assert_eq!(calls.len(), 2);
    let reset_at = Duration::from_secs(120);
    assert!(
        calls[1].at >= reset_at && calls[1].at < reset_at + Duration::from_millis(10),
        "{:?}",
        calls[1].at
    );
    assert_eq!(h.spool.backlog("acme"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn transient_faults_back_off_with_full_jitter_within_base_and_cap() {
    let h = start(Setup::default(), |n, _| {
        if n < 10 {
            refused(503, RateLimitInfo::default())
        } else {
            ok()
        }
    });
    h.append(&["a"]).await;
    h.run_for(Duration::from_secs(300)).await;
    let calls = h.calls();
    assert_eq!(calls.len(), 11);
    let (base, cap) = (settings().retry_base, settings().retry_cap);
    let latency = Setup::default().latency;
    for (i, pair) in calls.windows(2).enumerate() {
        let waited = pair[1].at - pair[0].at - latency;
        let ceiling = backoff_ceiling(base, cap, i as u32 + 1);
        assert!(
            waited <= ceiling,
            "attempt {}: {waited:?} > {ceiling:?}",
            i + 1
        );
    }
    // Full jitter: the waits are spread, not all at the ceiling.
    let total: Duration = calls.windows(2).map(|p| p[1].at - p[0].at).sum();
    let ceilings: Duration = (1..=10).map(|a| backoff_ceiling(base, cap, a)).sum();
    assert!(total < ceilings, "{total:?} vs {ceilings:?}");
    assert_eq!(h.spool.backlog("acme"), 0);
    // The last error stays after the success, with when it happened; the last status says how it went.
    let status = h.status();
    assert_eq!(status.last_status.as_deref(), Some("200"));
    assert_eq!(status.last_error.as_deref(), Some("status 503"));
    let last_failure = ORIGIN + calls[9].at + latency;
    assert_eq!(status.last_error_at, Some(last_failure.as_millis() as u64));
    h.stop().await;
}

#[tokio::test]
async fn backoff_draws_stay_within_zero_and_the_ceiling_and_spread() {
    let (base, cap) = (Duration::from_millis(100), Duration::from_secs(5));
    for attempt in 1..40 {
        let ceiling = backoff_ceiling(base, cap, attempt);
        assert!(ceiling <= cap);
        let draws: Vec<Duration> = (0..200).map(|_| backoff(base, cap, attempt)).collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        assert!(draws.iter().any(|d| *d < ceiling / 2), "{attempt}");
        assert!(draws.iter().any(|d| *d > ceiling / 2), "{attempt}");
    }
    assert_eq!(backoff_ceiling(base, cap, 1), base);
    assert_eq!(backoff_ceiling(base, cap, 3), base * 4);
}

#[tokio::test(start_paused = true)]
async fn events_too_old_go_to_the_dead_letters_without_a_request() {
    let h = start(Setup::default(), |_, _| ok());
    let old = ORIGIN - Duration::from_secs(8 * 86400);
    h.append_at(&["old"], old).await;
    h.append(&["new"]).await;
    h.run_for(Duration::from_secs(1)).await;
    assert_eq!(
        h.dead().await,
        [("old".to_string(), DeadLetterReason::Expired)]
    );
    let calls = h.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].ids, ["new"]);
    assert_eq!(h.spool.backlog("acme"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_the_request_in_flight_finish_and_its_ack_commit() {
    let h = start(
        Setup {
            latency: Duration::from_secs(5),
            ..Setup::default()
        },
        |_, _| ok(),
    );
    h.append(&["a", "b"]).await;
    h.run_for(Duration::from_secs(1)).await;
    assert_eq!(h.calls().len(), 1, "the request is in flight");
    h.append(&["c"]).await;
    h.trigger.fire();
    let spool = h.spool.clone();
    let started = Instant::now();
    h.task.await.unwrap();
    // It ended when the answer came (4.2 s later), not before and not much after.
    let ended = started.elapsed();
    assert!(
        ended >= Duration::from_secs(4) && ended < Duration::from_secs(5),
        "{ended:?}"
    );
    assert_eq!(
        h.transport.calls.lock().unwrap().len(),
        1,
        "nothing new is sent"
    );
    let left: Vec<String> = spool
        .peek("acme", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.record.conversion.conversion_id)
        .collect();
    assert_eq!(left, ["c"], "what X took is acked, the rest stays");
}

#[tokio::test(start_paused = true)]
async fn a_failed_ack_resends_the_same_events() {
    let h = start(Setup::default(), |_, _| ok());
    h.spool.fail_acks(1);
    h.append(&["a", "b"]).await;
    h.run_for(Duration::from_secs(5)).await;
    let calls = h.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].ids, calls[1].ids, "the same conversions, same ids");
    assert_eq!(h.spool.backlog("acme"), 0);
    assert_eq!(h.status().delivered, 2);
    h.stop().await;
}
