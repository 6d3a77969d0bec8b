//! What a `202` means with the Redis queue: read from Redis's persistence settings at start-up.
//!
//! With `appendonly yes` and `appendfsync always`, Redis answers a write only after it is fsynced to
//! its append-only file: a `202` means "on the primary's disk". Anything else (`everysec`, `no`, no AOF)
//! can lose the last writes on a power cut or a crash of the machine. Managed Redis often refuses
//! `CONFIG GET`; "cannot tell" is its own state and never taken for durable.

use super::Store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// AOF with `appendfsync always`.
    Durable,
    /// What Redis said that falls short, in words.
    NotDurable(String),
    /// `CONFIG GET` refused or failed, with why.
    Unknown(String),
}

impl Durability {
    /// What the `conversion_gateway_redis_durable` gauge shows: 1 only when known to be durable.
    pub fn gauge(&self) -> i64 {
        i64::from(matches!(self, Durability::Durable))
    }

    /// From the values of `appendonly` and `appendfsync`.
    pub fn of(appendonly: &str, appendfsync: &str) -> Durability {
        match (appendonly, appendfsync) {
            ("yes", "always") => Durability::Durable,
            ("yes", other) => Durability::NotDurable(format!(
                "appendfsync is {other:?}: Redis acknowledges writes before they are on disk; set appendfsync always"
            )),
            _ => Durability::NotDurable(
                "appendonly is off: queued events live in Redis's memory until its next snapshot; set appendonly yes and appendfsync always".into(),
            ),
        }
    }
}

/// Asks Redis for its persistence settings.
pub async fn probe(store: &Store) -> Durability {
    let mut conn = store.conn();
    let got: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query_async(&mut conn)
        .await;
    match store.track("CONFIG GET", got) {
        Ok(pairs) => {
            let value = |name: &str| {
                pairs
                    .chunks(2)
                    .find(|kv| kv.first().map(String::as_str) == Some(name))
                    .and_then(|kv| kv.get(1).cloned())
                    .unwrap_or_default()
            };
            Durability::of(&value("appendonly"), &value("appendfsync"))
        }
        Err(why) => Durability::Unknown(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_always_fsynced_aof_is_durable() {
        assert_eq!(Durability::of("yes", "always"), Durability::Durable);
        assert!(
            matches!(Durability::of("yes", "everysec"), Durability::NotDurable(w) if w.contains("everysec"))
        );
        assert!(
            matches!(Durability::of("no", "always"), Durability::NotDurable(w) if w.contains("appendonly"))
        );
        assert_eq!(Durability::Unknown("x".into()).gauge(), 0);
        assert_eq!(Durability::Durable.gauge(), 1);
    }
}
