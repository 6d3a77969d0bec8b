//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//!
//! Invariants: every label value comes from configuration (account names) or from a fixed set (outcomes,
//! dead-letter and pause reasons, HTTP status codes, route templates) — never an id, a key or anything a
//! client sent; every configured account's series exist at 0 from start-up, so a rate or an alert works
//! before the first event; gauges about the spool are read from it when scraped, so they are never stale.

use crate::activity::{Activity, Kind};
use crate::reasons::{DeadLetterReason, IngestOutcome, PauseReason};
use prometheus::core::Collector;
use prometheus::{CounterVec, GaugeVec};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The account label of a rejected event whose account could not be told (several accounts configured
/// and none, or an unknown one, named). Configuration refuses an account of this name.
pub const UNKNOWN_ACCOUNT: &str = "unknown";

const PREFIX: &str = "conversion_gateway_";

pub struct Metrics {
    registry: Registry,
    accounts: Vec<String>,
    received: IntCounterVec,
    identifiers_dropped: IntCounterVec,
    delivered: IntCounterVec,
    dead_lettered: IntCounterVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    batch_size: HistogramVec,
    spool_events: IntGaugeVec,
    spool_bytes: IntGauge,
    spool_bound_used: IntGauge,
    spool_max_bytes: IntGauge,
    spool_oldest: GaugeVec,
    spool_writable: IntGauge,
    dead_letters_stored: IntGauge,
    paused: IntGaugeVec,
    rate_limit_delay: CounterVec,
    http_duration: HistogramVec,
    evicted_dead_letters: IntCounter,
    resident_memory: IntGauge,
    open_fds: IntGauge,
    requests_shed: IntCounter,
    auth_failures: IntCounterVec,
    connections_refused: IntCounterVec,
    inflight_body_bytes: IntGauge,
    /// Only in the shared mode.
    redis: Option<RedisMetrics>,
    /// The last hour minute by minute, counted with the counters above (the status page's numbers).
    activity: Activity,
}

struct RedisMetrics {
    up: IntGauge,
    durable: IntGauge,
    held: IntGaugeVec,
}

/// The shared mode's state at scrape time.
pub struct RedisSnapshot {
    pub up: bool,
    /// 1 when Redis fsyncs every write; 0 otherwise, or when it cannot be told. `None`: no Redis queue.
    pub durable: Option<i64>,
    /// Per account: events this replica holds unacknowledged (with the Redis queue).
    pub held_here: Vec<(String, u64)>,
}

/// What the spool holds at scrape time.
pub struct SpoolSnapshot {
    /// Per configured account: waiting events and the oldest one's acceptance time (epoch seconds).
    pub accounts: Vec<(String, u64, Option<f64>)>,
    pub bytes: u64,
    pub bound: crate::spool::BoundUsage,
    pub writable: bool,
    pub dead_letters: u64,
    /// Dead letters evicted since the spool was made (persisted, so it survives restarts).
    pub dead_letters_evicted: u64,
    pub redis: Option<RedisSnapshot>,
}

fn name(s: &str) -> String {
    format!("{PREFIX}{s}")
}

/// Registers a metric built from static definitions (which cannot fail, nor be registered twice).
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<C>,
) -> C {
    let metric = metric.expect("static metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

impl Metrics {
    /// Registers every metric and creates the series of every account in `accounts` at 0.
    /// (Long on purpose: it is the table of every metric's name, help and labels, read in one place.)
    pub fn new<'a>(accounts: impl IntoIterator<Item = &'a str>) -> Self {
        Self::build(accounts, false)
    }

    /// With the shared mode's metrics too (Redis reachable, durable, what this replica holds).
    pub fn shared<'a>(accounts: impl IntoIterator<Item = &'a str>) -> Self {
        Self::build(accounts, true)
    }

    fn build<'a>(accounts: impl IntoIterator<Item = &'a str>, shared: bool) -> Self {
        let accounts: Vec<String> = accounts.into_iter().map(str::to_owned).collect();
        let registry = Registry::new();
        let counter = |n: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name(n), help), labels),
            )
        };
        let gauge = |n: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name(n), help), labels),
            )
        };
        let histogram = |n: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            register(
                &registry,
                HistogramVec::new(HistogramOpts::new(name(n), help).buckets(buckets), labels),
            )
        };
        let latency = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ];
        let received = counter(
            "events_received_total",
            "Events POSTed to /v1/events, by what ingest decided.",
            &["account", "outcome"],
        );
        let identifiers_dropped = counter(
            "identifiers_dropped_total",
            "Identifiers left out of accepted events because they could not be used (a strong one remained), by field.",
            &["account", "field"],
        );
        let delivered = counter(
            "events_delivered_total",
            "Conversions X accepted.",
            &["account"],
        );
        let dead_lettered = counter(
            "events_dead_lettered_total",
            "Events moved to the dead letters, by reason.",
            &["account", "reason"],
        );
        let upstream_requests = counter(
            "upstream_requests_total",
            "Requests to X, by HTTP status (or timeout / connect_error).",
            &["account", "status"],
        );
        let upstream_duration = histogram(
            "upstream_request_duration_seconds",
            "Time from sending a batch to X to having its answer.",
            &["account"],
            latency.clone(),
        );
        let batch_size = histogram(
            "batch_size_events",
            "Conversions per request to X.",
            &["account"],
            vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0],
        );
        let spool_events = gauge("spool_events", "Events waiting in the spool.", &["account"]);
        let spool_bytes = register(
            &registry,
            IntGauge::new(name("spool_bytes"), "Bytes of events waiting in the spool."),
        );
        let spool_bound_used = register(
            &registry,
            IntGauge::new(
                name("spool_bound_used_bytes"),
                "What counts against spool.max_bytes: for the disk spool, what its files take (waiting events, dead letters, dedup entries, page overhead).",
            ),
        );
        let spool_max_bytes = register(
            &registry,
            IntGauge::new(
                name("spool_max_bytes"),
                "The spool's byte bound (spool.max_bytes); ingest answers 503 when spool_bound_used_bytes reaches it.",
            ),
        );
        let spool_oldest = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    name("spool_oldest_event_timestamp_seconds"),
                    "When the oldest waiting event was accepted (Unix time); 0 when none waits.",
                ),
                &["account"],
            ),
        );
        let spool_writable = register(
            &registry,
            IntGauge::new(
                name("spool_writable"),
                "1 while the spool takes events, 0 exactly while ingest refuses them (full: from a request that did not fit until that much is free; disk low or failing).",
            ),
        );
        let dead_letters_stored = register(
            &registry,
            IntGauge::new(
                name("dead_letters"),
                "Dead letters kept (see the admin API).",
            ),
        );
        let paused = gauge(
            "account_paused",
            "1 while the account's sending is paused (X refused its credentials or pixel), by reason.",
            &["account", "reason"],
        );
        let rate_limit_delay = register(
            &registry,
            CounterVec::new(
                Opts::new(
                    name("rate_limit_delay_seconds_total"),
                    "Time batches waited for the account's budget or for X's rate-limit reset.",
                ),
                &["account"],
            ),
        );
        let http_duration = histogram(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and status.",
            &["route", "status"],
            latency,
        );
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    name("build_info"),
                    "Always 1; the running version in its label.",
                ),
                &["version"],
            ),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Process metrics under their conventional names, read from /proc at scrape time (Linux).
        let resident_memory = register(
            &registry,
            IntGauge::new(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
        );
        let open_fds = register(
            &registry,
            IntGauge::new("process_open_fds", "Number of open file descriptors."),
        );
        let requests_shed = register(
            &registry,
            IntCounter::new(
                name("requests_shed_total"),
                "Ingest requests answered 503 because server.max_inflight_body_bytes was taken by other bodies (nothing of them was kept).",
            ),
        );
        let auth_failures = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    name("auth_failures_total"),
                    "Requests refused for a missing or unknown key, per listener (ingest, admin); the key is never recorded.",
                ),
                &["listener"],
            ),
        );
        let connections_refused = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    name("connections_refused_total"),
                    "Connections closed as soon as accepted because the listener had server.max_connections open (admin: its own 256), per listener.",
                ),
                &["listener"],
            ),
        );
        for listener in ["ingest", "admin"] {
            auth_failures.with_label_values(&[listener]);
            connections_refused.with_label_values(&[listener]);
        }
        let inflight_body_bytes = register(
            &registry,
            IntGauge::new(
                name("inflight_body_bytes"),
                "Bytes of request bodies being read and parsed now, at most server.max_inflight_body_bytes.",
            ),
        );
        let evicted_dead_letters = register(
            &registry,
            IntCounter::new(
                name("dead_letters_evicted_total"),
                "Dead letters dropped, oldest first, to stay within spool.max_dead_letters.",
            ),
        );

        for a in &accounts {
            for outcome in IngestOutcome::ALL {
                received.with_label_values(&[a.as_str(), outcome.as_str()]);
            }
            delivered.with_label_values(&[a]);
            // The status X answers when all is well, so a success rate is defined before the first request.
            upstream_requests.with_label_values(&[a.as_str(), "200"]);
            for reason in DeadLetterReason::ALL {
                dead_lettered.with_label_values(&[a.as_str(), reason.as_str()]);
            }
            upstream_duration.with_label_values(&[a]);
            batch_size.with_label_values(&[a]);
            spool_events.with_label_values(&[a]);
            spool_oldest.with_label_values(&[a]);
            for reason in PauseReason::ALL {
                paused.with_label_values(&[a.as_str(), reason.as_str()]);
            }
            rate_limit_delay.with_label_values(&[a]);
        }
        received.with_label_values(&[UNKNOWN_ACCOUNT, IngestOutcome::Rejected.as_str()]);
        spool_writable.set(1);
        let redis = shared.then(|| {
            let single = |n: &str, help: &str| register(&registry, IntGauge::new(name(n), help));
            let held = gauge(
                "redis_held_events",
                "Events of the shared Redis queue this replica has taken and not yet acknowledged (another replica takes them over after redis.claim_idle if this one stops).",
                &["account"],
            );
            for a in &accounts {
                held.with_label_values(&[a]);
            }
            RedisMetrics {
                up: single("redis_up", "1 while Redis answered the last command, 0 while it cannot be reached or refuses."),
                durable: single("redis_durable", "1 when Redis fsyncs every write before answering (appendonly yes, appendfsync always): a 202 means on disk. 0 when it does not, or cannot be told (CONFIG GET refused)."),
                held,
            }
        });

        let activity = Activity::new(accounts.iter().map(String::as_str).chain([UNKNOWN_ACCOUNT]));
        Metrics {
            registry,
            accounts,
            activity,
            received,
            identifiers_dropped,
            delivered,
            dead_lettered,
            upstream_requests,
            upstream_duration,
            batch_size,
            spool_events,
            spool_bytes,
            spool_bound_used,
            spool_max_bytes,
            spool_oldest,
            spool_writable,
            dead_letters_stored,
            paused,
            rate_limit_delay,
            http_duration,
            evicted_dead_letters,
            resident_memory,
            open_fds,
            requests_shed,
            auth_failures,
            connections_refused,
            inflight_body_bytes,
            redis,
        }
    }

    /// The account label for `account`: itself when configured, else `unknown`.
    fn account<'a>(&self, account: Option<&'a str>) -> &'a str {
        match account {
            Some(a) if self.accounts.iter().any(|c| c == a) => a,
            _ => UNKNOWN_ACCOUNT,
        }
    }

    /// `n` events of `account` got `outcome`.
    pub fn received(&self, account: Option<&str>, outcome: IngestOutcome, n: u64) {
        if n > 0 {
            let account = self.account(account);
            self.received
                .with_label_values(&[account, outcome.as_str()])
                .inc_by(n);
            self.activity.add(account, Kind::Received, n);
            if outcome == IngestOutcome::Rejected {
                self.activity.add(account, Kind::Rejected, n);
            }
        }
    }

    pub fn delivered(&self, account: &str, n: u64) {
        self.delivered.with_label_values(&[account]).inc_by(n);
        self.activity.add(account, Kind::Delivered, n);
    }

    pub fn dead_lettered(&self, account: &str, reason: DeadLetterReason, n: u64) {
        self.dead_lettered
            .with_label_values(&[account, reason.as_str()])
            .inc_by(n);
        self.activity.add(account, Kind::DeadLettered, n);
    }

    /// Dead letters of `account` since start, per reason (those with none left out).
    pub fn dead_lettered_by_reason(&self, account: &str) -> Vec<(DeadLetterReason, u64)> {
        DeadLetterReason::ALL
            .iter()
            .map(|&r| {
                let n = self
                    .dead_lettered
                    .with_label_values(&[account, r.as_str()])
                    .get();
                (r, n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The last hour of every account, minute by minute.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// One request to X for `account`: its status label, how long it took and how many conversions it held.
    pub fn upstream_request(&self, account: &str, status: &str, seconds: f64, batch: usize) {
        self.upstream_requests
            .with_label_values(&[account, status])
            .inc();
        self.upstream_duration
            .with_label_values(&[account])
            .observe(seconds);
        self.batch_size
            .with_label_values(&[account])
            .observe(batch as f64);
    }

    /// Sets the account's pause gauge: 1 for `reason` (none: not paused), 0 for every other reason.
    pub fn paused(&self, account: &str, reason: Option<PauseReason>) {
        for &r in PauseReason::ALL {
            self.paused
                .with_label_values(&[account, r.as_str()])
                .set(i64::from(Some(r) == reason));
        }
    }

    /// An identifier (`field`, one of the event's identifier fields) of an accepted event of `account`
    /// was left out.
    pub fn identifier_dropped(&self, account: &str, field: &str) {
        self.identifiers_dropped
            .with_label_values(&[account, field])
            .inc();
    }

    pub fn rate_limit_delay(&self, account: &str, seconds: f64) {
        self.rate_limit_delay
            .with_label_values(&[account])
            .inc_by(seconds);
    }

    /// An ingest request shed for lack of in-flight body room.
    pub fn shed(&self) {
        self.requests_shed.inc();
    }

    /// A connection closed as soon as accepted: `listener` had as many open as it may.
    pub fn connection_refused(&self, listener: &'static str) {
        self.connections_refused
            .with_label_values(&[listener])
            .inc();
    }

    /// A request refused on `listener` (`ingest`, `admin`) for a missing or unknown key.
    pub fn auth_failed(&self, listener: &'static str) {
        self.auth_failures.with_label_values(&[listener]).inc();
    }

    /// What the in-flight body budget holds now (set before a scrape is rendered).
    pub fn set_inflight_body_bytes(&self, bytes: usize) {
        self.inflight_body_bytes.set(bytes as i64);
    }

    /// One HTTP request answered; `route` is the matched route template (or `unmatched`).
    pub fn http_request(&self, route: &str, status: u16, seconds: f64) {
        self.http_duration
            .with_label_values(&[route, status_label(status)])
            .observe(seconds);
    }

    /// The text exposition of every metric, with the spool gauges taken from `spool`.
    pub fn render(&self, spool: &SpoolSnapshot) -> String {
        for (account, events, oldest) in &spool.accounts {
            self.spool_events
                .with_label_values(&[account])
                .set(*events as i64);
            self.spool_oldest
                .with_label_values(&[account])
                .set(oldest.unwrap_or(0.0));
        }
        self.spool_bytes.set(spool.bytes as i64);
        self.spool_bound_used.set(spool.bound.used_bytes as i64);
        self.spool_max_bytes.set(spool.bound.max_bytes as i64);
        self.spool_writable.set(i64::from(spool.writable));
        self.dead_letters_stored.set(spool.dead_letters as i64);
        if let (Some(m), Some(r)) = (&self.redis, &spool.redis) {
            m.up.set(i64::from(r.up));
            m.durable.set(r.durable.unwrap_or(0));
            for (account, n) in &r.held_here {
                m.held.with_label_values(&[account]).set(*n as i64);
            }
        }
        if let Some(rss) = resident_bytes() {
            self.resident_memory.set(rss as i64);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        let seen = self.evicted_dead_letters.get();
        if spool.dead_letters_evicted > seen {
            self.evicted_dead_letters
                .inc_by(spool.dead_letters_evicted - seen);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format, and the families are all valid.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The process's resident memory, from `VmRSS` in /proc/self/status (in kB there, whatever the page size).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A status code as a label value, without allocating: the codes the gateway answers with, else the class.
fn status_label(status: u16) -> &'static str {
    const KNOWN: [(u16, &str); 17] = [
        (200, "200"),
        (201, "201"),
        (202, "202"),
        (204, "204"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (429, "429"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, label)) = KNOWN.iter().find(|(code, _)| *code == status) {
        return label;
    }
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(accounts: &[(&str, u64, Option<f64>)]) -> SpoolSnapshot {
        SpoolSnapshot {
            accounts: accounts
                .iter()
                .map(|(a, n, t)| (a.to_string(), *n, *t))
                .collect(),
            bytes: 10,
            bound: crate::spool::BoundUsage {
                used_bytes: 40,
                max_bytes: 100,
            },
            writable: false,
            dead_letters: 3,
            dead_letters_evicted: 2,
            redis: None,
        }
    }

    #[test]
    fn status_labels_are_a_fixed_set() {
        assert_eq!(status_label(202), "202");
        assert_eq!(status_label(418), "4xx");
        assert_eq!(status_label(599), "5xx");
        assert_eq!(status_label(301), "3xx");
        assert_eq!(status_label(0), "5xx");
    }

    #[test]
    fn only_configured_accounts_become_labels() {
        let m = Metrics::new(["acme"]);
        m.received(Some("acme"), IngestOutcome::Accepted, 2);
        m.received(Some("evil\"} 1\n"), IngestOutcome::Rejected, 1);
        m.received(None, IngestOutcome::Rejected, 1);
        let text = m.render(&snapshot(&[("acme", 4, Some(1.5))]));
        assert!(text.contains(
            "conversion_gateway_events_received_total{account=\"acme\",outcome=\"accepted\"} 2"
        ));
        assert!(text.contains(
            "conversion_gateway_events_received_total{account=\"unknown\",outcome=\"rejected\"} 2"
        ));
        assert!(!text.contains("evil"));
        assert!(text.contains("conversion_gateway_spool_events{account=\"acme\"} 4"));
        assert!(text.contains(
            "conversion_gateway_spool_oldest_event_timestamp_seconds{account=\"acme\"} 1.5"
        ));
        assert!(text.contains("conversion_gateway_spool_writable 0"));
        assert!(text.contains("conversion_gateway_dead_letters 3"));
        assert!(text.contains("conversion_gateway_dead_letters_evicted_total 2"));
        assert!(text.contains(&format!(
            "conversion_gateway_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        let sample = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        };
        // This test process: more than a megabyte resident, and stdin/stdout/stderr open.
        assert!(sample("process_resident_memory_bytes") > 1e6);
        assert!(sample("process_open_fds") >= 3.0);
        // The evicted total follows the spool's persisted count without double counting.
        let text = m.render(&snapshot(&[("acme", 0, None)]));
        assert!(text.contains("conversion_gateway_dead_letters_evicted_total 2"));
        assert!(text.contains(
            "conversion_gateway_spool_oldest_event_timestamp_seconds{account=\"acme\"} 0"
        ));
    }

    #[test]
    fn pause_gauge_has_one_reason_at_a_time() {
        let m = Metrics::new(["acme"]);
        m.paused("acme", Some(PauseReason::Forbidden));
        m.paused("acme", Some(PauseReason::Unauthorized));
        let text = m.render(&snapshot(&[]));
        let line = |r: &str| {
            format!("conversion_gateway_account_paused{{account=\"acme\",reason=\"{r}\"}}")
        };
        assert!(text.contains(&format!("{} 1", line("unauthorized"))));
        assert!(text.contains(&format!("{} 0", line("forbidden"))));
        m.paused("acme", None);
        let text = m.render(&snapshot(&[]));
        assert!(PauseReason::ALL
            .iter()
            .all(|r| text.contains(&format!("{} 0", line(r.as_str())))));
    }
}
