//! What the spool keeps in memory besides the data: per-account counters, limiter states, why it refuses
//! events, and the dispatchers' wake-ups. Written by the storage thread after each commit (`Effects`),
//! read by everyone without waiting for a write.

use crate::limiter::Nanos;
use crate::spool::bound::Refused;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Count {
    pub events: u64,
    pub bytes: u64,
}

#[derive(Default)]
pub(super) struct Shared {
    pub counts: HashMap<String, Count>,
    pub total_bytes: u64,
    /// What the dead letters store (their encoding), kept in `meta` like the counts.
    pub dead_bytes: u64,
    /// Live entries of the dedup log.
    pub dedup_entries: u64,
    pub tats: HashMap<String, Nanos>,
    /// Why writes fail right now, if they do.
    pub unhealthy: Option<String>,
    /// Waiting bytes when the disk ran low. The file does not shrink when events leave, but redb reuses
    /// the freed pages: while the disk stays low, appends may refill what acks emptied, up to 90% of this.
    pub low_water: Option<u64>,
    /// The byte bound's remembered refusal (`spool::bound`).
    pub refused: Refused,
    pub notifiers: HashMap<String, Arc<Notify>>,
}

pub(super) fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn notifier(&mut self, account: &str) -> Arc<Notify> {
        self.notifiers
            .entry(account.to_owned())
            .or_default()
            .clone()
    }

    /// Adds `fx`'s changes to the counters.
    pub fn apply(&mut self, fx: &Effects) {
        for (account, (de, db)) in &fx.counts {
            let c = self.counts.entry(account.clone()).or_default();
            c.events = (c.events as i64 + de).max(0) as u64;
            c.bytes = (c.bytes as i64 + db).max(0) as u64;
            self.total_bytes = (self.total_bytes as i64 + db).max(0) as u64;
        }
        self.dead_bytes = (self.dead_bytes as i64 + fx.dead_bytes).max(0) as u64;
        for (k, t) in &fx.tats {
            self.tats.insert(k.clone(), *t);
        }
    }
}

/// The effect of one write on the in-memory counters, applied once it is durable.
#[derive(Default)]
pub(super) struct Effects {
    /// Per account: change in waiting events and in their bytes.
    pub counts: HashMap<String, (i64, i64)>,
    /// Change in the bytes the dead letters store.
    pub dead_bytes: i64,
    pub tats: Vec<(String, Nanos)>,
    /// Accounts that got new events (their dispatchers are woken).
    pub appended: Vec<String>,
}

impl Effects {
    /// `events` more (or fewer) waiting events of `account`, taking `bytes` more (or fewer).
    pub fn count(&mut self, account: &str, events: i64, bytes: i64) {
        let c = match self.counts.get_mut(account) {
            Some(c) => c,
            None => self.counts.entry(account.to_owned()).or_default(),
        };
        c.0 += events;
        c.1 += bytes;
    }

    /// A new event of `account`, `bytes` long: counted, and its dispatcher woken.
    pub fn queued(&mut self, account: &str, bytes: usize) {
        if !self.appended.iter().any(|a| a == account) {
            self.appended.push(account.to_owned());
        }
        self.count(account, 1, bytes as i64);
    }
}
