//! The shared mode on Redis, against real processes: a `redis-server` of each test's own (AOF,
//! `appendfsync always`), fake-x-api, and several gateway replicas. One budget for the fleet, one queue
//! for the fleet (a replica killed or scaled down strands nothing), Redis killed and back, duplicates
//! across replicas, and the disk spool riding out Redis being down.

mod common;

use common::*;
use conversion_gateway::redis_store::server::RedisServer;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// The fake, with a rate limit of `limit` events per `window_secs` on the OAuth account when given.
fn fake(dir: &Path, limit: Option<(u64, u64)>) -> (Proc, String) {
    let (fake, _, url) = start_fake_with(dir, |config| {
        match limit {
        None => config,
        Some((limit, window_secs)) => config.replacen(
            "events = [\"o9d2g\", \"o9d2h\"]",
            &format!(
                "events = [\"o9d2g\", \"o9d2h\"]\nrate_limit = {{ events = {limit}, window_secs = {window_secs} }}"
            ),
            1,
        ),
    }
    });
    (fake, url)
}

/// Redis, the fake and `n` replicas on them: what every test here starts with.
struct Fleet {
    replicas: Vec<Replica>,
    http: reqwest::Client,
    fake_url: String,
    redis: RedisServer,
    _fake: Proc,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn start(n: usize, mode: Mode, envs: &[(&str, &str)], limit: Option<(u64, u64)>) -> Fleet {
        let redis = RedisServer::start();
        let url = redis.url();
        Self::start_on(redis, &url, n, mode, envs, limit)
    }

    /// On `redis`, reached at `url` (one with a password, say).
    fn start_on(
        redis: RedisServer,
        url: &str,
        n: usize,
        mode: Mode,
        envs: &[(&str, &str)],
        limit: Option<(u64, u64)>,
    ) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let (fake, fake_url) = fake(dir.path(), limit);
        let replicas = (0..n)
            .map(|i| replica(dir.path(), i, &fake_url, url, mode, envs))
            .collect();
        Fleet {
            replicas,
            http: reqwest::Client::new(),
            fake_url,
            redis,
            _fake: fake,
            _dir: dir,
        }
    }

    /// POSTs `ids` to replica `n` as one request; the status (0: no answer).
    async fn post(&self, n: usize, ids: &[String]) -> u16 {
        post(&self.http, &self.replicas[n], ids).await
    }

    async fn fault(&self, spec: Value) {
        fault(&self.http, &self.fake_url, spec).await
    }

    async fn clear_faults(&self) {
        clear_faults(&self.http, &self.fake_url).await
    }

    async fn wait_received(&self, want: &HashSet<String>, limit: Duration) {
        wait_received(&self.http, &self.fake_url, want, limit).await;
    }
}

struct Replica {
    proc: Proc,
    ingest_url: String,
    admin_url: String,
}

/// How the replicas of a test are set up.
#[derive(Clone, Copy)]
struct Mode {
    spool_redis: bool,
    limiter_redis: bool,
}

/// A budget far above what a test sends: these tests are about the queue, not the budget.
const UNBUDGETED: (&str, &str) = ("GATEWAY_ACCOUNTS__ACME__RATE_LIMIT__EVENTS", "100000000");

const SHARED: Mode = Mode {
    spool_redis: true,
    limiter_redis: true,
};

/// Starts replica `n` against the fake and Redis, with extra `GATEWAY_*` variables.
fn replica(
    dir: &Path,
    n: usize,
    fake_url: &str,
    redis_url: &str,
    mode: Mode,
    envs: &[(&str, &str)],
) -> Replica {
    let (port, admin_port) = (free_port(), free_port());
    let fake_port: u16 = fake_url.rsplit(':').next().unwrap().parse().unwrap();
    let cfg = write(
        dir,
        &format!("replica-{n}.toml"),
        &gateway_config(port, admin_port, fake_port, "CANARY-consumer-secret"),
    );
    let spool_dir = dir.join(format!("spool-{n}"));
    let consumer = format!("replica-{n}");
    let mut all: Vec<(&str, &str)> = vec![
        ("GATEWAY_SPOOL__DIR", spool_dir.to_str().unwrap()),
        ("GATEWAY_REDIS__URL", redis_url),
        ("GATEWAY_REDIS__CONSUMER", &consumer),
        ("GATEWAY_REDIS__CLAIM_IDLE", "3s"),
        ("GATEWAY_LOG__LEVEL", "info"),
        (
            "GATEWAY_SPOOL__BACKEND",
            if mode.spool_redis { "redis" } else { "disk" },
        ),
        (
            "GATEWAY_LIMITER__BACKEND",
            if mode.limiter_redis {
                "redis"
            } else {
                "embedded"
            },
        ),
    ];
    all.extend_from_slice(envs);
    let mut proc = spawn(
        GATEWAY,
        &["--config", cfg.to_str().unwrap()],
        &all,
        dir.join(format!("replica-{n}.log")),
    );
    let admin_url = format!("http://127.0.0.1:{admin_port}");
    wait_ready(&mut proc, &format!("{admin_url}/readyz"));
    Replica {
        proc,
        ingest_url: format!("http://127.0.0.1:{port}/v1/events"),
        admin_url,
    }
}

fn event(id: &str) -> Value {
    json!({"account": "acme", "event": "purchase", "twclid": id, "conversion_id": id})
}

/// POSTs `ids` as one request; the status.
async fn post(http: &reqwest::Client, r: &Replica, ids: &[String]) -> u16 {
    let events: Vec<Value> = ids.iter().map(|i| event(i)).collect();
    match http
        .post(&r.ingest_url)
        .bearer_auth(API_KEY)
        .json(&json!({ "events": events }))
        .timeout(Duration::from_secs(10))
        .send()
        .await
    {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => 0,
    }
}

async fn fault(http: &reqwest::Client, fake_url: &str, spec: Value) {
    let resp = http
        .post(format!("{fake_url}/_fake/faults"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
}

async fn clear_faults(http: &reqwest::Client, fake_url: &str) {
    http.delete(format!("{fake_url}/_fake/faults"))
        .send()
        .await
        .unwrap();
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Every copy of a conversion the fake accepted is the same conversion (a resend, deduplicated by X).
async fn assert_duplicates_are_resends(http: &reqwest::Client, fake_url: &str) {
    let mut seen: HashMap<String, Value> = HashMap::new();
    for c in fake_conversions(http, fake_url).await {
        let conversion = c["conversion"].clone();
        let id = conversion["conversion_id"].as_str().unwrap().to_owned();
        if let Some(first) = seen.get(&id) {
            assert_eq!(
                (&first["event_id"], &first["conversion_id"]),
                (&conversion["event_id"], &conversion["conversion_id"]),
                "a duplicate with other ids"
            );
            assert_eq!(first, &conversion, "a resend is the same conversion");
        } else {
            seen.insert(id, conversion);
        }
    }
}

/// The most conversions any `window` of arrival times at the fake held, and the 429s it answered.
async fn window_peak(http: &reqwest::Client, fake_url: &str, window: Duration) -> (u64, usize) {
    let requests = fake_requests(http, fake_url).await;
    let accepted: Vec<(u64, u64)> = requests
        .iter()
        .filter(|r| {
            r["status"]
                .as_u64()
                .is_some_and(|s| (200..300).contains(&s))
        })
        .map(|r| {
            (
                r["received_at_ms"].as_u64().unwrap(),
                r["conversions"].as_array().map_or(0, |c| c.len() as u64),
            )
        })
        .collect();
    let refused = requests.iter().filter(|r| r["status"] == 429).count();
    let w = window.as_millis() as u64;
    let peak = accepted
        .iter()
        .map(|(start, _)| {
            accepted
                .iter()
                .filter(|(t, _)| *t >= *start && *t < start + w)
                .map(|(_, n)| n)
                .sum()
        })
        .max()
        .unwrap_or(0);
    (peak, refused)
}

/// Three replicas, each with a backlog of its own, drain against 1,000 events per 10 s at the fake.
/// Returns (peak 10-s window, 429s, seconds from the first delivery to the last, events).
async fn drain_three(limiter_redis: bool) -> (u64, usize, f64, usize) {
    let mode = Mode {
        spool_redis: false,
        limiter_redis,
    };
    let label = if limiter_redis {
        "shared budget"
    } else {
        "embedded budgets"
    };
    let f = Fleet::start(3, mode, &BUDGET_1000_PER_10S, Some((1000, 10)));
    let mut all = HashSet::new();
    for n in 0..3 {
        for chunk in ids(&format!("budget{n}"), 600).chunks(100) {
            assert_eq!(f.post(n, chunk).await, 202);
            all.extend(chunk.iter().cloned());
        }
    }
    f.wait_received(&all, Duration::from_secs(90)).await;
    let (peak, refused) = window_peak(&f.http, &f.fake_url, Duration::from_secs(10)).await;
    let times: Vec<u64> = fake_requests(&f.http, &f.fake_url)
        .await
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| r["received_at_ms"].as_u64().unwrap())
        .collect();
    let span = (times.iter().max().unwrap() - times.iter().min().unwrap()) as f64 / 1000.0;
    let events = all.len();
    eprintln!("{label}: peak 10 s window {peak}, 429s {refused}, {events} events in {span:.1} s");
    (peak, refused, span, events)
}

/// 1,000 events per 10 s, batches of 100, quick retries.
const BUDGET_1000_PER_10S: [(&str, &str); 5] = [
    ("GATEWAY_ACCOUNTS__ACME__RATE_LIMIT__EVENTS", "1000"),
    ("GATEWAY_ACCOUNTS__ACME__RATE_LIMIT__WINDOW", "10s"),
    ("GATEWAY_DELIVERY__MAX_BATCH", "100"),
    ("GATEWAY_DELIVERY__RETRY_BASE", "200ms"),
    ("GATEWAY_DELIVERY__RETRY_CAP", "1s"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget() {
    let (peak, refused, span, events) = drain_three(true).await;
    assert_eq!(
        refused, 0,
        "the fake never had to refuse a request for budget"
    );
    assert!(peak <= 1000, "{peak} conversions in one 10 s window");
    // The limit allows 1,000 per 10 s after the first burst of one batch: at least 80% of that rate.
    let rate = (events - 100) as f64 / span;
    assert!(
        rate >= 0.8 * 100.0,
        "drained at {rate:.1} events/s over {span:.1} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_their_own_budgets_overrun_it() {
    // What the shared budget guards against: each replica sends the account's whole rate.
    let (peak, refused, _, _) = drain_three(false).await;
    assert!(
        refused > 0 || peak > 1000,
        "three embedded budgets drew no refusal (peak {peak})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_events_are_delivered_by_the_others() {
    let mut f = Fleet::start(3, SHARED, &[UNBUDGETED], None);
    // Slow answers: every replica holds a batch in flight for a while.
    f.fault(json!({"latency_ms": 1500})).await;
    let mut accepted = HashSet::new();
    for (i, chunk) in ids("kill", 1500).chunks(50).enumerate() {
        assert_eq!(f.post(i % 3, chunk).await, 202);
        accepted.extend(chunk.iter().cloned());
    }
    // Replica 1 has taken events and not acknowledged them when it is killed.
    assert!(
        eventually(Duration::from_secs(10), async || {
            (held_by(&f.redis, "replica-1").await > 0).then_some(())
        })
        .await
        .is_some(),
        "replica 1 holds events"
    );
    f.replicas[1].proc.signal("KILL");
    f.replicas[1].proc.wait_exit(Duration::from_secs(5));
    let killed_at = Instant::now();
    f.clear_faults().await;
    // Within claim_idle (3 s) plus a few seconds.
    f.wait_received(&accepted, Duration::from_secs(15)).await;
    eprintln!(
        "delivered everything {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(held_by(&f.redis, "replica-1").await, 0, "taken over");
    assert_duplicates_are_resends(&f.http, &f.fake_url).await;
}

/// What `consumer` holds unacknowledged in acme's queue, from Redis itself.
async fn held_by(redis: &RedisServer, consumer: &str) -> u64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg("{cg:q:acme}:q")
        .arg("dispatch")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(parts) = summary else {
        return 0;
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return 0;
    };
    consumers
        .iter()
        .filter_map(|c| match c {
            redis::Value::Array(kv) => Some(kv),
            _ => None,
        })
        .filter(|kv| matches!(kv.first(), Some(redis::Value::BulkString(n)) if n == consumer.as_bytes()))
        .filter_map(|kv| match kv.get(1) {
            Some(redis::Value::BulkString(n)) => std::str::from_utf8(n).ok()?.parse::<u64>().ok(),
            _ => None,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_scaled_down_leaves_its_events_to_the_others() {
    // A claim_idle longer than the test: what the stopped replica held comes back because it hands it
    // back on its way out, not because it was taken over.
    let long_claims = ("GATEWAY_REDIS__CLAIM_IDLE", "120s");
    let mut f = Fleet::start(3, SHARED, &[UNBUDGETED, long_claims], None);
    f.fault(json!({"status": 503, "for_secs": 600})).await;
    let all = ids("down", 300);
    for chunk in all.chunks(100) {
        assert_eq!(f.post(0, chunk).await, 202);
    }
    // Replica 0 takes part of the backlog and retries it against X's 503s.
    let taken = eventually(Duration::from_secs(10), async || {
        let v = admin_json(&f.http, &f.replicas[0].admin_url, "GET", "/v1/accounts").await;
        (v["accounts"][0]["held_here"].as_u64()? > 0).then_some(())
    })
    .await;
    assert!(taken.is_some(), "replica 0 holds a batch");
    let stopping = Instant::now();
    f.replicas[0].proc.signal("TERM");
    let status = f.replicas[0]
        .proc
        .wait_exit(Duration::from_secs(12))
        .expect("exits within server.shutdown_timeout (10 s)");
    assert!(status.success(), "{status}");
    assert!(stopping.elapsed() < Duration::from_secs(11));
    assert!(f.replicas[0].proc.log_text().contains("handed_back"));
    f.clear_faults().await;
    let want: HashSet<String> = all.into_iter().collect();
    f.wait_received(&want, Duration::from_secs(20)).await;
    assert_duplicates_are_resends(&f.http, &f.fake_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_nothing_and_ingest_never_lies() {
    let mut f = Fleet::start(2, SHARED, &[UNBUDGETED], None);
    let mut accepted = HashSet::new();
    let mut refused_while_down = 0;
    for (i, chunk) in ids("redis", 2000).chunks(20).enumerate() {
        if i == 30 {
            f.redis.kill();
        }
        let status = f.post(i % 2, chunk).await;
        if !f.redis.is_running() {
            assert_eq!(status, 503, "never a 202 while Redis is down");
            refused_while_down += 1;
            if refused_while_down == 5 {
                for r in &f.replicas {
                    assert!(
                        get_ok(&format!("{}/readyz", r.admin_url)),
                        "readiness stays while Redis is down"
                    );
                }
                f.redis.restart();
            }
        }
        if status == 202 {
            accepted.extend(chunk.iter().cloned());
        }
    }
    assert_eq!(refused_while_down, 5);
    f.wait_received(&accepted, Duration::from_secs(30)).await;
    assert_duplicates_are_resends(&f.http, &f.fake_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_events_posted_to_two_replicas_are_delivered_once() {
    // A Redis with a password: it must show nowhere.
    const PASSWORD: &str = "CANARY-redis-password";
    let redis = RedisServer::start_with(&["--requirepass", PASSWORD]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", redis.port);
    let f = Fleet::start_on(redis, &url, 2, SHARED, &[UNBUDGETED], None);
    let all = ids("dup", 200);
    for chunk in all.chunks(50) {
        for n in 0..2 {
            assert_eq!(f.post(n, chunk).await, 202);
        }
    }
    let want: HashSet<String> = all.iter().cloned().collect();
    f.wait_received(&want, Duration::from_secs(20)).await;
    // Time for a second copy to arrive, were one queued.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = received_ids(&f.http, &f.fake_url).await;
    assert_eq!(got.len(), all.len(), "each event once");
    for r in &f.replicas {
        let mut seen = r.proc.log_text();
        for path in ["/metrics", "/v1/accounts"] {
            let resp = f
                .http
                .get(format!("{}{path}", r.admin_url))
                .bearer_auth(ADMIN_KEY)
                .send()
                .await
                .unwrap();
            seen.push_str(&resp.text().await.unwrap());
        }
        assert!(seen.contains("[REDACTED]"), "the URL is shown redacted");
        assert!(
            seen.contains("conversion_gateway_redis_durable 1"),
            "appendfsync always is durable"
        );
        assert!(!seen.contains(PASSWORD), "the Redis password leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_disk_spool_ingest_rides_out_redis_down_and_sends_within_budget_after() {
    let mode = Mode {
        spool_redis: false,
        limiter_redis: true,
    };
    let mut f = Fleet::start(1, mode, &BUDGET_1000_PER_10S, Some((1000, 10)));
    f.redis.kill();
    let all = ids("offline", 1200);
    for chunk in all.chunks(100) {
        assert_eq!(f.post(0, chunk).await, 202, "the disk spool takes events");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        fake_requests(&f.http, &f.fake_url).await.is_empty(),
        "nothing sent while the budget cannot be checked"
    );
    let v = admin_json(&f.http, &f.replicas[0].admin_url, "GET", "/v1/accounts").await;
    let why = v["accounts"][0]["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("rate budget"), "the account shows why: {v}");
    assert_eq!(v["redis"]["up"], false, "{v}");
    f.redis.restart();
    let want: HashSet<String> = all.into_iter().collect();
    f.wait_received(&want, Duration::from_secs(40)).await;
    let (peak, refused) = window_peak(&f.http, &f.fake_url, Duration::from_secs(10)).await;
    assert_eq!(refused, 0);
    assert!(peak <= 1000, "{peak}");
}

/// Bisection and dead letters with the Redis queue: the refused event alone ends in the Redis store, any
/// replica lists, replays and deletes it; and a Redis that does not fsync every write is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_live_in_redis_for_every_replica() {
    let redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let url = redis.url();
    let f = Fleet::start_on(redis, &url, 2, SHARED, &[UNBUDGETED], None);
    f.fault(json!({"reject_conversion_id": "dl-00007", "message": "value (abc) is not valid"}))
        .await;
    let all = ids("dl", 40);
    assert_eq!(f.post(0, &all).await, 202);
    let want: HashSet<String> = all
        .iter()
        .filter(|i| i.as_str() != "dl-00007")
        .cloned()
        .collect();
    f.wait_received(&want, Duration::from_secs(20)).await;
    // Replica 1 sees the letter replica 0's dispatcher (or its own) made.
    let (zero, one) = (&f.replicas[0].admin_url, &f.replicas[1].admin_url);
    let page = eventually(Duration::from_secs(10), async || {
        let page = admin_json(&f.http, one, "GET", "/v1/dead-letters?account=acme").await;
        (page["dead_letters"].as_array()?.len() == 1).then_some(page)
    })
    .await
    .expect("one dead letter, listed by the other replica");
    let letter = &page["dead_letters"][0];
    assert_eq!(letter["conversion"]["conversion_id"], "dl-00007");
    assert_eq!(letter["reason"], "rejected");
    // Fixed at X: replayed from one replica, delivered, gone from the store for both.
    f.clear_faults().await;
    let replayed = admin_json(
        &f.http,
        zero,
        "POST",
        "/v1/dead-letters/replay?account=acme",
    )
    .await;
    assert_eq!(replayed["replayed"], 1);
    let again: HashSet<String> = ["dl-00007".to_string()].into();
    f.wait_received(&again, Duration::from_secs(20)).await;
    let page = admin_json(&f.http, one, "GET", "/v1/dead-letters").await;
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 0);
    // Delete works on the shared store too.
    f.fault(json!({"reject_conversion_id": "dl2-00001", "message": "no"}))
        .await;
    assert_eq!(f.post(1, &ids("dl2", 3)).await, 202);
    let gone = eventually(Duration::from_secs(20), async || {
        let page = admin_json(&f.http, zero, "GET", "/v1/dead-letters?account=acme").await;
        (page["dead_letters"].as_array()?.len() == 1).then_some(())
    })
    .await;
    assert!(gone.is_some());
    let deleted = admin_json(&f.http, zero, "DELETE", "/v1/dead-letters?account=acme").await;
    assert_eq!(deleted["deleted"], 1);
    // everysec: a 202 is not known to be on disk, and every replica says so.
    for r in &f.replicas {
        let accounts = admin_json(&f.http, &r.admin_url, "GET", "/v1/accounts").await;
        assert_eq!(accounts["redis"]["durability"], "not_durable", "{accounts}");
        let metrics = metrics_of(&f.http, &r.admin_url).await;
        assert!(
            metrics.contains("conversion_gateway_redis_durable 0"),
            "{metrics}"
        );
        assert!(r
            .proc
            .log_text()
            .contains("Redis may lose acknowledged writes"));
    }
}
