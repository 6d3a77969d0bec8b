//! An in-memory `Spool`: the seam's reference implementation and the test double for dispatch.
//! It keeps the trait's invariants but nothing survives a restart.

use super::{Admission, DeadLetter, DeadLetterQuery, Entry, Record, Spool, SpoolError};
use crate::reasons::DeadLetterReason;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

type Key = (String, String, String);

#[derive(Default)]
struct Inner {
    next_id: u64,
    queues: HashMap<String, BTreeMap<u64, Record>>,
    /// Dedup keys with the time they were first seen, and the same keys in arrival order for expiry.
    seen: HashMap<Key, i64>,
    seen_order: VecDeque<(i64, Key)>,
    notifiers: HashMap<String, Arc<Notify>>,
    dead: Vec<DeadLetter>,
    /// Acks still to refuse (fault injection for the dispatcher's tests).
    failing_acks: usize,
}

pub struct MemorySpool {
    dedup_window: Duration,
    /// At most this many waiting records in all; beyond, `append` answers `Full`.
    capacity: usize,
    inner: Mutex<Inner>,
}

impl MemorySpool {
    pub fn new(dedup_window: Duration, capacity: usize) -> Self {
        MemorySpool {
            dedup_window,
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The next `n` calls to `ack` fail and remove nothing, as a failing disk would.
    pub fn fail_acks(&self, n: usize) {
        self.lock().failing_acks = n;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn notifier(&mut self, account: &str) -> Arc<Notify> {
        self.notifiers
            .entry(account.to_owned())
            .or_default()
            .clone()
    }

    fn expire(&mut self, horizon_ms: i64) {
        while let Some((t, _)) = self.seen_order.front() {
            if *t >= horizon_ms {
                break;
            }
            if let Some((t, key)) = self.seen_order.pop_front() {
                if self.seen.get(&key) == Some(&t) {
                    self.seen.remove(&key);
                }
            }
        }
    }
}

impl Spool for MemorySpool {
    fn append(&self, records: Vec<Record>) -> BoxFuture<'_, Result<Vec<Admission>, SpoolError>> {
        let result = (|| {
            let mut inner = self.lock();
            let waiting: usize = inner.queues.values().map(BTreeMap::len).sum();
            if waiting + records.len() > self.capacity {
                return Err(SpoolError::Full);
            }
            let now = records.iter().map(|r| r.received_at_ms).max().unwrap_or(0);
            inner.expire(now - self.dedup_window.as_millis() as i64);
            let mut out = Vec::with_capacity(records.len());
            let mut touched = Vec::new();
            for record in records {
                let key = record.dedup_key();
                if inner.seen.contains_key(&key) {
                    out.push(Admission::Duplicate);
                    continue;
                }
                inner.seen.insert(key.clone(), record.received_at_ms);
                inner.seen_order.push_back((record.received_at_ms, key));
                inner.next_id += 1;
                let id = inner.next_id;
                if !touched.contains(&record.account) {
                    touched.push(record.account.clone());
                }
                inner
                    .queues
                    .entry(record.account.clone())
                    .or_default()
                    .insert(id, record);
                out.push(Admission::Queued);
            }
            for account in touched {
                inner.notifier(&account).notify_one();
            }
            Ok(out)
        })();
        async move { result }.boxed()
    }

    fn peek_after<'a>(
        &'a self,
        account: &'a str,
        after: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, SpoolError>> {
        let entries = self
            .lock()
            .queues
            .get(account)
            .map(|q| {
                q.range(after.saturating_add(1)..)
                    .take(max)
                    .map(|(id, r)| Entry {
                        id: *id,
                        record: r.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        async move { Ok(entries) }.boxed()
    }

    fn ack<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        let mut inner = self.lock();
        if inner.failing_acks > 0 {
            inner.failing_acks -= 1;
            return async { Err(SpoolError::Unavailable("injected ack failure".into())) }.boxed();
        }
        if let Some(q) = inner.queues.get_mut(account) {
            for id in ids {
                q.remove(id);
            }
        }
        async move { Ok(()) }.boxed()
    }

    fn backlog(&self, account: &str) -> usize {
        self.lock().queues.get(account).map_or(0, BTreeMap::len)
    }

    fn changed(&self, account: &str) -> Arc<Notify> {
        self.lock().notifier(account)
    }

    fn dead_letter<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
        reason: DeadLetterReason,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        let mut inner = self.lock();
        for id in ids {
            if let Some(record) = inner.queues.get_mut(account).and_then(|q| q.remove(id)) {
                inner.next_id += 1;
                let letter = DeadLetter {
                    id: inner.next_id,
                    account: account.to_owned(),
                    reason,
                    message: message.to_owned(),
                    dead_lettered_at_ms: chrono::Utc::now().timestamp_millis(),
                    conversion: record.conversion,
                    received_at_ms: record.received_at_ms,
                    event_name: record.event_name,
                };
                inner.dead.push(letter);
            }
        }
        async move { Ok(()) }.boxed()
    }

    fn dead_letters(&self, q: &DeadLetterQuery) -> Result<Vec<DeadLetter>, SpoolError> {
        Ok(self
            .lock()
            .dead
            .iter()
            .filter(|d| d.id > q.after && q.account.as_ref().is_none_or(|a| *a == d.account))
            .take(q.limit)
            .cloned()
            .collect())
    }

    fn dead_letter_counts(&self) -> Result<(u64, u64), SpoolError> {
        Ok((self.lock().dead.len() as u64, 0))
    }

    fn replay<'a>(
        &'a self,
        account: &'a str,
        letters: Vec<(u64, Record)>,
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        let mut inner = self.lock();
        let mut moved = 0;
        for (id, record) in letters {
            let Some(at) = inner
                .dead
                .iter()
                .position(|d| d.id == id && d.account == account)
            else {
                continue;
            };
            inner.dead.remove(at);
            inner.next_id += 1;
            let next = inner.next_id;
            inner
                .queues
                .entry(account.to_owned())
                .or_default()
                .insert(next, record);
            moved += 1;
        }
        if moved > 0 {
            inner.notifier(account).notify_one();
        }
        async move { Ok(moved) }.boxed()
    }

    fn delete_dead_letters<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        let mut inner = self.lock();
        let before = inner.dead.len();
        inner
            .dead
            .retain(|d| !(d.account == account && ids.contains(&d.id)));
        let deleted = before - inner.dead.len();
        async move { Ok(deleted) }.boxed()
    }

    fn oldest(&self, account: &str) -> Result<Option<i64>, SpoolError> {
        Ok(self
            .lock()
            .queues
            .get(account)
            .and_then(|q| q.values().next())
            .map(|r| r.received_at_ms))
    }

    /// The size the records would have in the durable spool, computed on demand (this is the test double).
    fn bytes(&self) -> u64 {
        let inner = self.lock();
        inner
            .queues
            .values()
            .flat_map(|q| q.values())
            .map(encoded_len)
            .sum()
    }

    fn account_bytes(&self, account: &str) -> u64 {
        self.lock()
            .queues
            .get(account)
            .map_or(0, |q| q.values().map(encoded_len).sum())
    }

    fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

fn encoded_len(r: &Record) -> u64 {
    super::codec::encode(r).map_or(0, |b| b.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::Conversion;

    fn record(account: &str, conversion_id: &str, at: i64) -> Record {
        Record {
            account: account.into(),
            received_at_ms: at,
            event_name: None,
            conversion: Conversion::minimal(
                "2026-11-28T00:00:00.000Z",
                "o9d2g",
                "t",
                conversion_id,
            ),
        }
    }

    #[tokio::test]
    async fn order_ack_and_dedup() {
        let spool = MemorySpool::new(Duration::from_secs(10), 100);
        let got = spool
            .append(vec![
                record("a", "1", 0),
                record("a", "2", 0),
                record("b", "1", 0),
                record("a", "1", 5),
            ])
            .await
            .unwrap();
        assert_eq!(
            got,
            [
                Admission::Queued,
                Admission::Queued,
                Admission::Queued,
                Admission::Duplicate
            ]
        );
        let batch = spool.peek("a", 10).await.unwrap();
        assert_eq!(
            batch
                .iter()
                .map(|e| e.record.conversion.conversion_id.as_str())
                .collect::<Vec<_>>(),
            ["1", "2"]
        );
        spool.ack("a", &[batch[0].id]).await.unwrap();
        assert_eq!(spool.backlog("a"), 1);
        assert_eq!(spool.backlog("b"), 1);
        assert!(spool.bytes() > 0);
        // After the window the same key is new again.
        let got = spool.append(vec![record("a", "1", 20_001)]).await.unwrap();
        assert_eq!(got, [Admission::Queued]);
    }

    #[tokio::test]
    async fn full_spool_refuses_whole_call() {
        let spool = MemorySpool::new(Duration::from_secs(10), 2);
        assert_eq!(
            spool
                .append(vec![
                    record("a", "1", 0),
                    record("a", "2", 0),
                    record("a", "3", 0)
                ])
                .await,
            Err(SpoolError::Full)
        );
        assert_eq!(spool.backlog("a"), 0);
    }
}
