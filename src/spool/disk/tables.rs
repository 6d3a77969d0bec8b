//! The writes of one redb transaction, table by table. Each keeps the counters in step (`Effects`) and
//! the invariants of `super`: an event leaves `events` only by `remove` (acked, or moved to `dead` in the
//! same transaction); the dedup log only loses entries older than the window.

use super::admission::Room;
use super::codec;
use super::counters::{Count, Effects};
use super::dedup_state::DedupState;
use super::pending::Pending;
use super::schema::{fingerprint, DedupEntry, MetaKey, DEAD, DEDUP_LOG, EVENTS, META};
use super::{now_ms, storage};
use crate::reasons::DeadLetterReason;
use crate::spool::{DeadLetter, SpoolError};
use redb::ReadableTable;
use std::collections::HashMap;

/// Expired dedup entries removed per transaction, so purging never stalls intake.
const PURGE_PER_COMMIT: usize = 2000;

pub(super) struct Tables<'t> {
    pub events: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    pub log: redb::Table<'t, u64, &'static [u8]>,
    pub dead: redb::Table<'t, u64, &'static [u8]>,
    pub meta: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t redb::WriteTransaction) -> Result<Self, SpoolError> {
        Ok(Tables {
            events: txn.open_table(EVENTS).map_err(storage)?,
            log: txn.open_table(DEDUP_LOG).map_err(storage)?,
            dead: txn.open_table(DEAD).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
        })
    }

    pub fn set(&mut self, key: MetaKey<'_>, value: u64) -> Result<(), SpoolError> {
        self.meta
            .insert(key.name().as_str(), value)
            .map_err(storage)?;
        Ok(())
    }

    /// Increments the counter `key` and answers its new value.
    fn next(&mut self, key: MetaKey<'_>) -> Result<u64, SpoolError> {
        let name = key.name();
        let n = self
            .meta
            .get(name.as_str())
            .map_err(storage)?
            .map_or(0, |v| v.value())
            + 1;
        self.meta.insert(name.as_str(), n).map_err(storage)?;
        Ok(n)
    }

    /// Queues the encoded event `bytes` as `account`'s event `seq`, counted in `fx`.
    fn queue(
        &mut self,
        account: &str,
        seq: u64,
        bytes: &[u8],
        fx: &mut Effects,
    ) -> Result<(), SpoolError> {
        self.events.insert((account, seq), bytes).map_err(storage)?;
        fx.queued(account, bytes.len());
        Ok(())
    }

    /// Puts logged events into the queue and their keys into the dedup log, as they were logged.
    pub fn put_logged(&mut self, logged: &Pending) -> Result<(), SpoolError> {
        for (account, queue) in &logged.events {
            for (seq, e) in queue {
                self.events
                    .insert((account.as_str(), *seq), e.bytes.as_slice())
                    .map_err(storage)?;
                let entry = DedupEntry {
                    key: e.key,
                    received_at_ms: e.received_at_ms,
                };
                self.log
                    .insert(e.log_seq, entry.encode().as_slice())
                    .map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Removes events; with `dead = Some((reason, message))` they move to the dead letters. A record that
    /// no longer decodes moves as what could be read of it (its length), never failing the call.
    pub fn remove(
        &mut self,
        account: &str,
        ids: &[u64],
        dead: Option<(DeadLetterReason, &str)>,
        fx: &mut Effects,
    ) -> Result<(), SpoolError> {
        for id in ids {
            let Some(value) = self
                .events
                .remove((account, *id))
                .map_err(storage)?
                .map(|v| v.value().to_vec())
            else {
                continue;
            };
            fx.count(account, -1, -(value.len() as i64));
            if let Some((reason, message)) = dead {
                let id = self.next(MetaKey::DeadSeq)?;
                let letter = dead_letter(id, account, reason, message, &value);
                let bytes = serde_json::to_vec(&letter).map_err(storage)?;
                fx.dead_bytes += bytes.len() as i64;
                self.dead.insert(id, bytes.as_slice()).map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Removes dead letter `id` if it is `account`'s.
    pub fn take_dead(
        &mut self,
        account: &str,
        id: u64,
        fx: &mut Effects,
    ) -> Result<Option<DeadLetter>, SpoolError> {
        let letter: Option<(DeadLetter, usize)> = match self.dead.get(id).map_err(storage)? {
            Some(v) => Some((
                serde_json::from_slice(v.value()).map_err(|e| {
                    storage(format!(
                        "table dead_letters: entry {id} does not decode: {e}"
                    ))
                })?,
                v.value().len(),
            )),
            None => None,
        };
        match letter {
            Some((l, len)) if l.account == account => {
                self.dead.remove(id).map_err(storage)?;
                fx.dead_bytes -= len as i64;
                Ok(Some(l))
            }
            _ => Ok(None),
        }
    }

    /// Dead letters of `account` back into its queue as the given encoded records; `Ok(Err(why))` when
    /// they do not fit in `room` (nothing moved).
    pub fn replay(
        &mut self,
        account: &str,
        letters: Vec<(u64, Vec<u8>)>,
        seq: &mut u64,
        room: &mut Room,
        fx: &mut Effects,
    ) -> Result<Result<usize, SpoolError>, SpoolError> {
        if let Err(why) = room.take(letters.iter().map(|(_, b)| b.len() as u64).sum()) {
            return Ok(Err(why));
        }
        let mut moved = 0;
        for (id, bytes) in letters {
            if self.take_dead(account, id, fx)?.is_none() {
                continue;
            }
            *seq += 1;
            self.queue(account, *seq, &bytes, fx)?;
            moved += 1;
        }
        Ok(Ok(moved))
    }

    pub fn delete_dead(
        &mut self,
        account: &str,
        ids: &[u64],
        fx: &mut Effects,
    ) -> Result<usize, SpoolError> {
        let mut deleted = 0;
        for id in ids {
            if self.take_dead(account, *id, fx)?.is_some() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    pub fn evict_dead(&mut self, max: u64, fx: &mut Effects) -> Result<(), SpoolError> {
        use redb::ReadableTableMetadata;
        let mut len = self.dead.len().map_err(storage)?;
        while len > max {
            let Some(evicted) = self
                .dead
                .pop_first()
                .map_err(storage)?
                .map(|(_, letter)| letter.value().len())
            else {
                break;
            };
            fx.dead_bytes -= evicted as i64;
            len -= 1;
            self.next(MetaKey::DeadEvicted)?;
        }
        Ok(())
    }

    /// Removes log entries received before `horizon_ms`, oldest first, a bounded number per transaction;
    /// answers their (fingerprint, sequence), to drop from memory once the transaction committed.
    pub fn purge_dedup(
        &mut self,
        dedup: &DedupState,
        horizon_ms: i64,
    ) -> Result<Vec<(u64, u64)>, SpoolError> {
        let mut expired = Vec::new();
        for item in self
            .log
            .range(dedup.first..)
            .map_err(storage)?
            .take(PURGE_PER_COMMIT)
        {
            let (k, v) = item.map_err(storage)?;
            let entry = DedupEntry::decode(k.value(), v.value())?;
            if entry.received_at_ms >= horizon_ms {
                break;
            }
            expired.push((fingerprint(&entry.key), k.value()));
        }
        for (_, seq) in &expired {
            self.log.remove(*seq).map_err(storage)?;
        }
        Ok(expired)
    }

    /// Stores the counters of the accounts `fx` touched and the dead letters' bytes: `base` (what memory
    /// holds) changed by `fx`.
    pub fn store_counts(
        &mut self,
        base: &HashMap<String, Count>,
        dead_bytes: u64,
        fx: &Effects,
    ) -> Result<(), SpoolError> {
        if fx.dead_bytes != 0 {
            self.set(
                MetaKey::DeadBytes,
                (dead_bytes as i64 + fx.dead_bytes).max(0) as u64,
            )?;
        }
        for (account, (de, db)) in &fx.counts {
            let c = base.get(account).copied().unwrap_or_default();
            self.set(
                MetaKey::Events(account),
                (c.events as i64 + de).max(0) as u64,
            )?;
            self.set(MetaKey::Bytes(account), (c.bytes as i64 + db).max(0) as u64)?;
        }
        Ok(())
    }
}

/// The dead letter for the stored record `value` of `account`: the record, or, when it no longer
/// decodes, what could be read of it.
fn dead_letter(
    id: u64,
    account: &str,
    reason: DeadLetterReason,
    message: &str,
    value: &[u8],
) -> DeadLetter {
    let (conversion, received_at_ms, event_name, raw_bytes, message) =
        match codec::decode(account, value) {
            Ok(r) => (
                Some(r.conversion),
                r.received_at_ms,
                r.event_name,
                None,
                message.to_owned(),
            ),
            Err(e) => {
                let message = match reason {
                    DeadLetterReason::Corrupt => message.to_owned(),
                    _ => format!("{message} (the stored record does not decode: {e})"),
                };
                (None, 0, None, Some(value.len() as u64), message)
            }
        };
    DeadLetter {
        id,
        account: account.to_owned(),
        reason,
        message,
        dead_lettered_at_ms: now_ms(),
        conversion,
        received_at_ms,
        event_name,
        raw_bytes,
    }
}
