//! An in-memory `Spool`: the seam's reference implementation and the test double for dispatch and the
//! HTTP surfaces. It keeps the whole contract of `super` (the conformance suite runs it) except
//! durability: nothing survives a restart. Its byte counts are the sizes the records would take in the
//! durable spool, so both bound the same way.

use super::bound::{ByteBound, Refused};
use super::{
    AccountBacklog, Admission, DeadLetter, DeadLetterCounts, DeadLetterQuery, DeadLetterStore,
    Entry, Peek, Queue, Record, SpoolError, SpoolStats,
};
use crate::reasons::DeadLetterReason;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

type Key = (String, String, String);

/// A waiting record and its size in the durable spool.
struct Waiting {
    record: Record,
    bytes: u64,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    queues: HashMap<String, BTreeMap<u64, Waiting>>,
    bytes: u64,
    /// Dedup keys with the time they were last queued, and the same keys in arrival order for expiry.
    seen: HashMap<Key, i64>,
    seen_order: VecDeque<(i64, Key)>,
    notifiers: HashMap<String, Arc<Notify>>,
    dead: BTreeMap<u64, DeadLetter>,
    next_dead: u64,
    evicted: u64,
    /// Acks still to refuse (fault injection for the dispatcher's tests).
    failing_acks: usize,
    refused: Refused,
}

pub struct MemorySpool {
    dedup_window: Duration,
    /// Bytes of waiting records at most (`super::bound`).
    bound: ByteBound,
    max_dead_letters: u64,
    inner: Mutex<Inner>,
}

/// The dead letters kept when `with_max_dead_letters` is not called (the configuration's default).
const DEFAULT_MAX_DEAD_LETTERS: u64 = 100_000;

impl MemorySpool {
    /// A spool that deduplicates over `dedup_window` and holds at most `max_bytes` of waiting records.
    pub fn new(dedup_window: Duration, max_bytes: u64) -> Self {
        MemorySpool {
            dedup_window,
            bound: ByteBound::new(max_bytes),
            max_dead_letters: DEFAULT_MAX_DEAD_LETTERS,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn with_max_dead_letters(mut self, n: u64) -> Self {
        self.max_dead_letters = n;
        self
    }

    /// The next `n` calls to `ack` fail and remove nothing, as a failing disk would.
    pub fn fail_acks(&self, n: usize) {
        self.lock().failing_acks = n;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn window_ms(&self) -> i64 {
        i64::try_from(self.dedup_window.as_millis()).unwrap_or(i64::MAX)
    }
}

impl Inner {
    fn notifier(&mut self, account: &str) -> Arc<Notify> {
        self.notifiers
            .entry(account.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets keys last queued before `horizon_ms` (they no longer make anything a duplicate).
    fn expire(&mut self, horizon_ms: i64) {
        while self
            .seen_order
            .front()
            .is_some_and(|(t, _)| *t < horizon_ms)
        {
            if let Some((t, key)) = self.seen_order.pop_front() {
                if self.seen.get(&key) == Some(&t) {
                    self.seen.remove(&key);
                }
            }
        }
    }

    fn queue(&mut self, record: Record) {
        self.next_id += 1;
        let bytes = encoded_len(&record);
        self.bytes += bytes;
        self.queues
            .entry(record.account.clone())
            .or_default()
            .insert(self.next_id, Waiting { record, bytes });
    }

    fn take(&mut self, account: &str, id: u64) -> Option<Waiting> {
        let w = self.queues.get_mut(account)?.remove(&id)?;
        self.bytes -= w.bytes;
        Some(w)
    }

    fn evict_dead(&mut self, max: u64) {
        while self.dead.len() as u64 > max {
            if self.dead.pop_first().is_none() {
                break;
            }
            self.evicted += 1;
        }
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, T> {
    async move { value }.boxed()
}

impl Queue for MemorySpool {
    fn append(&self, records: Vec<Record>) -> BoxFuture<'_, Result<Vec<Admission>, SpoolError>> {
        let window = self.window_ms();
        let mut inner = self.lock();
        let adding: u64 = records.iter().map(encoded_len).sum();
        let total = inner.bytes;
        if let Err(e) = self.bound.admit(total, adding, &mut inner.refused) {
            return ready(Err(e));
        }
        if let Some(oldest) = records.iter().map(|r| r.received_at_ms).min() {
            inner.expire(oldest.saturating_sub(window));
        }
        let mut out = Vec::with_capacity(records.len());
        let mut touched = Vec::new();
        for record in records {
            let key = record.dedup_key();
            let horizon = record.received_at_ms.saturating_sub(window);
            if inner.seen.get(&key).is_some_and(|t| *t > horizon) {
                out.push(Admission::Duplicate);
                continue;
            }
            inner.seen.insert(key.clone(), record.received_at_ms);
            inner.seen_order.push_back((record.received_at_ms, key));
            if !touched.contains(&record.account) {
                touched.push(record.account.clone());
            }
            inner.queue(record);
            out.push(Admission::Queued);
        }
        for account in touched {
            inner.notifier(&account).notify_one();
        }
        ready(Ok(out))
    }

    fn peek_after<'a>(
        &'a self,
        account: &'a str,
        after: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Peek, SpoolError>> {
        let entries = self
            .lock()
            .queues
            .get(account)
            .map(|q| {
                q.range(after.saturating_add(1)..)
                    .take(max)
                    .map(|(id, w)| Entry {
                        id: *id,
                        record: w.record.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        ready(Ok(Peek {
            entries,
            undecodable: Vec::new(),
        }))
    }

    fn ack<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        let mut inner = self.lock();
        if inner.failing_acks > 0 {
            inner.failing_acks -= 1;
            return ready(Err(SpoolError::Unavailable("injected ack failure".into())));
        }
        for id in ids {
            inner.take(account, *id);
        }
        ready(Ok(()))
    }

    fn backlog(&self, account: &str) -> usize {
        self.lock().queues.get(account).map_or(0, BTreeMap::len)
    }

    fn changed(&self, account: &str) -> Arc<Notify> {
        self.lock().notifier(account)
    }
}

impl DeadLetterStore for MemorySpool {
    fn dead_letter<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
        reason: DeadLetterReason,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        let mut inner = self.lock();
        for id in ids {
            let Some(w) = inner.take(account, *id) else {
                continue;
            };
            inner.next_dead += 1;
            let letter = DeadLetter {
                id: inner.next_dead,
                account: account.to_owned(),
                reason,
                message: message.to_owned(),
                dead_lettered_at_ms: chrono::Utc::now().timestamp_millis(),
                conversion: Some(w.record.conversion),
                received_at_ms: w.record.received_at_ms,
                event_name: w.record.event_name,
                raw_bytes: None,
            };
            inner.dead.insert(letter.id, letter);
        }
        inner.evict_dead(self.max_dead_letters);
        ready(Ok(()))
    }

    fn dead_letters(
        &self,
        q: DeadLetterQuery,
    ) -> BoxFuture<'_, Result<Vec<DeadLetter>, SpoolError>> {
        let found = self
            .lock()
            .dead
            .range(q.after.saturating_add(1)..)
            .map(|(_, d)| d)
            .filter(|d| q.account.as_ref().is_none_or(|a| *a == d.account))
            .take(q.limit)
            .cloned()
            .collect();
        ready(Ok(found))
    }

    fn dead_letter_counts(&self) -> BoxFuture<'_, Result<DeadLetterCounts, SpoolError>> {
        let inner = self.lock();
        ready(Ok(DeadLetterCounts {
            kept: inner.dead.len() as u64,
            evicted: inner.evicted,
        }))
    }

    fn replay<'a>(
        &'a self,
        account: &'a str,
        letters: Vec<(u64, Record)>,
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        let mut inner = self.lock();
        let theirs =
            |inner: &Inner, id: u64| inner.dead.get(&id).is_some_and(|d| d.account == account);
        let adding: u64 = letters
            .iter()
            .filter(|(id, _)| theirs(&inner, *id))
            .map(|(_, r)| encoded_len(r))
            .sum();
        let total = inner.bytes;
        if let Err(e) = self.bound.admit(total, adding, &mut inner.refused) {
            return ready(Err(e));
        }
        let mut moved = 0;
        for (id, record) in letters {
            if !theirs(&inner, id) {
                continue;
            }
            inner.dead.remove(&id);
            inner.queue(record);
            moved += 1;
        }
        if moved > 0 {
            inner.notifier(account).notify_one();
        }
        ready(Ok(moved))
    }

    fn delete_dead_letters<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        let mut inner = self.lock();
        let mut deleted = 0;
        for id in ids {
            if inner.dead.get(id).is_some_and(|d| d.account == account) {
                inner.dead.remove(id);
                deleted += 1;
            }
        }
        ready(Ok(deleted))
    }
}

impl SpoolStats for MemorySpool {
    fn account_backlog<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<AccountBacklog, SpoolError>> {
        let inner = self.lock();
        let backlog = inner
            .queues
            .get(account)
            .map(|q| AccountBacklog {
                events: q.len() as u64,
                bytes: q.values().map(|w| w.bytes).sum(),
                oldest_ms: q.values().next().map(|w| w.record.received_at_ms),
            })
            .unwrap_or_default();
        ready(Ok(backlog))
    }

    fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn account_bytes(&self, account: &str) -> u64 {
        self.lock()
            .queues
            .get(account)
            .map_or(0, |q| q.values().map(|w| w.bytes).sum())
    }

    fn bound_usage(&self) -> super::BoundUsage {
        super::BoundUsage {
            used_bytes: self.lock().bytes,
            max_bytes: self.bound.max_bytes(),
        }
    }

    fn health(&self) -> Result<(), String> {
        let mut inner = self.lock();
        let total = inner.bytes;
        match self.bound.refusal(total, &mut inner.refused) {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        }
    }
}

/// The size the record takes in the durable spool.
fn encoded_len(r: &Record) -> u64 {
    super::codec::encode(r).map_or(0, |b| b.len() as u64)
}
