//! Events in the intake log but not yet in redb, by account and id. Readers see them as queued.
//!
//! Only the storage thread changes this, and it moves events into redb in this order: commit the redb
//! transaction (which puts every pending event and records the last id it put as `meta` `Seq`), then
//! remove them from here. A reader takes what it needs from here first and opens its redb snapshot
//! after; pending copies with ids at or below the snapshot's `Seq` are in the snapshot already (or were
//! acked or dead-lettered in it) and are dropped. So an event moving between the two is seen exactly once,
//! as the snapshot has it, never missed and never stale — and no reader waits for a commit.

use super::intake_log::IntakeRecord;
use std::collections::{BTreeMap, HashMap};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

#[derive(Default)]
pub(super) struct Pending {
    pub events: HashMap<String, BTreeMap<u64, PendingEvent>>,
    pub len: usize,
    /// When the oldest of them was logged.
    pub since: Option<Instant>,
}

pub(super) struct PendingEvent {
    pub log_seq: u64,
    pub key: [u8; 32],
    pub received_at_ms: i64,
    pub bytes: Vec<u8>,
}

impl Pending {
    pub fn insert(&mut self, r: IntakeRecord) {
        let event = PendingEvent {
            log_seq: r.log_seq,
            key: r.key,
            received_at_ms: r.received_at_ms,
            bytes: r.bytes,
        };
        let queue = match self.events.get_mut(&r.account) {
            Some(q) => q,
            None => self.events.entry(r.account).or_default(),
        };
        queue.insert(r.seq, event);
        self.len += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// `account`'s events with ids above `after`, in order.
    pub fn after(&self, account: &str, after: u64) -> impl Iterator<Item = (&u64, &PendingEvent)> {
        self.events
            .get(account)
            .into_iter()
            .flat_map(move |q| q.range(after.saturating_add(1)..))
    }

    pub fn clear(&mut self) {
        self.events.clear();
        self.len = 0;
        self.since = None;
    }
}

pub(super) fn read(m: &RwLock<Pending>) -> RwLockReadGuard<'_, Pending> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn write(m: &RwLock<Pending>) -> RwLockWriteGuard<'_, Pending> {
    m.write().unwrap_or_else(|p| p.into_inner())
}
