//! The connection to the Redis the shared mode uses, and how its keys are named.
//!
//! # Keys
//! Every key starts with `redis.key_prefix`. The keys of one gateway account (its queue, dead letters,
//! byte counters, dedup entries) share the hash tag `{prefix:q:account}`, and those of one ad account's
//! budget (its TAT and X's hold) the tag `{prefix:b:ad_account_id}`, so that every script touches one
//! hash slot only and runs on Redis Cluster as well.
//!
//! # Failures
//! The connection reconnects by itself (`ConnectionManager`, with short connect and response timeouts,
//! so that a caller is never held longer than about `RESPONSE_TIMEOUT` by a Redis that is gone). Every
//! error is described without the URL, which may hold a password; `up()` says whether the last command
//! succeeded, for metrics and the admin API.
//!
//! # Scripts
//! Every script starts with `#!lua` (Redis ≥ 7): Redis then refuses a writing script *before* it runs
//! when it is out of memory, so a script either does all of its writes or none.

pub mod durability;
#[doc(hidden)]
pub mod server;

use crate::config::RedisUrl;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one command may take before it counts as failed.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A shared, reconnecting connection and the key naming.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: Arc<str>,
    health: Arc<Health>,
}

#[derive(Default)]
struct Health {
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Store {
    /// A store for `url`; connects lazily, so the gateway starts (and its disk spool takes events) while
    /// Redis is down.
    pub fn open(url: &RedisUrl, prefix: &str) -> Result<Store, String> {
        let client = redis::Client::open(url.expose())
            .map_err(|e| format!("redis.url {}: {}", url.redacted(), describe(&e)))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis.url {}: {}", url.redacted(), describe(&e)))?;
        Ok(Store {
            conn,
            prefix: prefix.into(),
            health: Default::default(),
        })
    }

    /// A connection to send commands on (cheap: the connection is multiplexed).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The keys of the gateway account `account`'s queue share this tag.
    pub fn queue_tag(&self, account: &str) -> String {
        format!("{{{}:q:{account}}}", self.prefix)
    }

    /// The keys of the budget of `ad_account` share this tag.
    pub fn budget_tag(&self, ad_account: &str) -> String {
        format!("{{{}:b:{ad_account}}}", self.prefix)
    }

    /// Records how a command went, and passes its result on with the error described.
    pub fn track<T>(&self, what: &str, result: redis::RedisResult<T>) -> Result<T, String> {
        match result {
            Ok(v) => {
                self.health.up.store(true, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => {
                let why = format!("Redis {what}: {}", describe(&e));
                self.health.up.store(false, Ordering::Relaxed);
                if let Ok(mut last) = self.health.last_error.lock() {
                    *last = Some(why.clone());
                }
                Err(why)
            }
        }
    }

    /// Whether the last command succeeded (false before the first one).
    pub fn up(&self) -> bool {
        self.health.up.load(Ordering::Relaxed)
    }

    /// The last failure, while Redis is not up.
    pub fn down_because(&self) -> Option<String> {
        if self.up() {
            return None;
        }
        self.health
            .last_error
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .or_else(|| Some("Redis has not answered yet".into()))
    }

    /// PING: whether Redis answers now.
    pub async fn ping(&self) -> Result<(), String> {
        let r: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut self.conn()).await;
        self.track("PING", r).map(|_| ())
    }
}

/// A Redis error in words, without anything from the URL: the kind, and the server's message.
pub fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        return "no answer in time (timed out)".into();
    }
    if e.is_connection_refusal() {
        return "connection refused".into();
    }
    if e.is_connection_dropped() || e.is_io_error() {
        return format!("connection lost ({})", e.category());
    }
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_owned(),
        // A pipeline's errors: the server's own words (codes and messages, never the URL).
        _ if e.clone().into_server_errors().is_some() => e.to_string(),
        _ => e.category().to_owned(),
    }
}

/// A Redis stream id `ms-seq` as one number that orders the same way: the milliseconds in the high
/// bits, the sequence in the low 20 (Redis's own auto ids never reach a million within one millisecond
/// from this gateway's writes: a script adds at most one request's events).
pub fn stream_id_to_u64(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    (ms < (1 << 44) && seq < (1 << SEQ_BITS)).then_some((ms << SEQ_BITS) | seq)
}

/// The stream id a number from `stream_id_to_u64` stands for.
pub fn u64_to_stream_id(id: u64) -> String {
    format!("{}-{}", id >> SEQ_BITS, id & ((1 << SEQ_BITS) - 1))
}

const SEQ_BITS: u32 = 20;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn stream_ids_round_trip_and_keep_their_order(a in 0u64..(1 << 44), b in 0u64..(1 << 20), c in 0u64..(1 << 44), d in 0u64..(1 << 20)) {
            let x = format!("{a}-{b}");
            let y = format!("{c}-{d}");
            let (nx, ny) = (stream_id_to_u64(&x).unwrap(), stream_id_to_u64(&y).unwrap());
            prop_assert_eq!(u64_to_stream_id(nx), x);
            prop_assert_eq!((a, b).cmp(&(c, d)), nx.cmp(&ny));
        }
    }

    #[test]
    fn ids_that_do_not_fit_are_refused() {
        assert_eq!(stream_id_to_u64("1-1048576"), None);
        assert_eq!(stream_id_to_u64("x-1"), None);
        assert_eq!(stream_id_to_u64("17"), None);
    }
}
