//! Reads, on tokio's blocking pool (never on a runtime worker), from a redb snapshot and the pending
//! events; no read waits for a commit (see `pending` for why the merge by id is exact).

use super::handle::Handle;
use super::pending::{self, Pending};
use super::schema::{MetaKey, DEAD, EVENTS, META};
use super::{codec, storage};
use crate::spool::{
    DeadLetter, DeadLetterCounts, DeadLetterQuery, Entry, Peek, SpoolError, Undecodable,
};
use redb::{ReadableDatabase, ReadableTableMetadata};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// What a read says when the handle it used was broken by a failed write (redb refuses every use of a
/// handle after an I/O error) and the storage thread is reopening the file.
const REOPENING: &str = "the spool file is being reopened after a failed write";
/// How long a read waits for that reopen before it reports the failure.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A read error: a handle broken by a failed write is `REOPENING` (the read is tried again).
pub(super) fn read_error(e: impl Into<redb::Error>) -> SpoolError {
    match e.into() {
        redb::Error::PreviousIo => SpoolError::Unavailable(REOPENING.into()),
        e => storage(e),
    }
}

/// Runs `read` on the blocking pool. A read that met a handle a failed write had just broken is tried
/// again on the reopened one (for at most `REOPEN_WAIT`): a full disk fails writes, never reads.
pub(super) async fn blocking<T: Send + 'static>(
    read: impl Fn() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            match read() {
                Err(SpoolError::Unavailable(why))
                    if why == REOPENING && started.elapsed() < REOPEN_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    })
    .await
    .map_err(|e| storage(format!("a spool read stopped: {e}")))?
}

/// Up to `max` of `account`'s stored records with ids above `after`, as raw bytes, in order.
fn raw_after(
    db: &Handle,
    pending: &RwLock<Pending>,
    account: &str,
    after: u64,
    max: usize,
) -> Result<BTreeMap<u64, Vec<u8>>, SpoolError> {
    // Pending first, the snapshot after (see `pending`): an event that moved into redb meanwhile is in
    // the snapshot, and so is anything done to it since (an ack in the same transaction, say). The
    // snapshot's `Seq` is the last id any transaction in it put into redb, so pending copies at or below
    // it are stale and dropped.
    let logged: Vec<(u64, Vec<u8>)> = pending::read(pending)
        .after(account, after)
        .take(max)
        .map(|(id, e)| (*id, e.bytes.clone()))
        .collect();
    let db = db.get()?;
    let txn = db.begin_read().map_err(read_error)?;
    let applied = meta(&txn, MetaKey::Seq)?;
    let mut found: BTreeMap<u64, Vec<u8>> =
        logged.into_iter().filter(|(id, _)| *id > applied).collect();
    let table = txn.open_table(EVENTS).map_err(read_error)?;
    let range = (account, after.saturating_add(1))..=(account, u64::MAX);
    for item in table.range(range).map_err(read_error)?.take(max) {
        let (k, v) = item.map_err(read_error)?;
        found
            .entry(k.value().1)
            .or_insert_with(|| v.value().to_vec());
    }
    while found.len() > max {
        found.pop_last();
    }
    Ok(found)
}

pub(super) fn peek_after(
    db: &Handle,
    pending: &RwLock<Pending>,
    account: &str,
    after: u64,
    max: usize,
) -> Result<Peek, SpoolError> {
    let mut peek = Peek::default();
    for (id, bytes) in raw_after(db, pending, account, after, max)? {
        match codec::decode(account, &bytes) {
            Ok(record) => peek.entries.push(Entry { id, record }),
            Err(error) => peek.undecodable.push(Undecodable {
                id,
                raw_bytes: bytes.len() as u64,
                error,
            }),
        }
    }
    Ok(peek)
}

/// When `account`'s oldest waiting record was accepted (a record that does not decode is skipped).
pub(super) fn oldest(
    db: &Handle,
    pending: &RwLock<Pending>,
    account: &str,
) -> Result<Option<i64>, SpoolError> {
    let mut after = 0;
    loop {
        let raw = raw_after(db, pending, account, after, 16)?;
        let Some(last) = raw.keys().next_back().copied() else {
            return Ok(None);
        };
        if let Some(r) = raw.values().find_map(|b| codec::decode(account, b).ok()) {
            return Ok(Some(r.received_at_ms));
        }
        after = last;
    }
}

pub(super) fn dead_letters(
    db: &Handle,
    q: &DeadLetterQuery,
) -> Result<Vec<DeadLetter>, SpoolError> {
    let db = db.get()?;
    let txn = db.begin_read().map_err(read_error)?;
    let table = txn.open_table(DEAD).map_err(read_error)?;
    let mut out = Vec::new();
    for item in table
        .range(q.after.saturating_add(1)..)
        .map_err(read_error)?
    {
        if out.len() >= q.limit {
            break;
        }
        let (k, v) = item.map_err(read_error)?;
        let letter: DeadLetter = serde_json::from_slice(v.value()).map_err(|e| {
            storage(format!(
                "table dead_letters: entry {} does not decode: {e}",
                k.value()
            ))
        })?;
        if q.account.as_ref().is_none_or(|a| *a == letter.account) {
            out.push(letter);
        }
    }
    Ok(out)
}

pub(super) fn dead_letter_counts(db: &Handle) -> Result<DeadLetterCounts, SpoolError> {
    let db = db.get()?;
    let txn = db.begin_read().map_err(read_error)?;
    let kept = txn
        .open_table(DEAD)
        .map_err(read_error)?
        .len()
        .map_err(read_error)?;
    let evicted = meta(&txn, MetaKey::DeadEvicted)?;
    Ok(DeadLetterCounts { kept, evicted })
}

/// A counter of the `meta` table in a snapshot (0 when never written).
fn meta(txn: &redb::ReadTransaction, key: MetaKey<'_>) -> Result<u64, SpoolError> {
    Ok(txn
        .open_table(META)
        .map_err(read_error)?
        .get(key.name().as_str())
        .map_err(read_error)?
        .map_or(0, |v| v.value()))
}

/// Shares what readers need with the blocking pool.
#[derive(Clone)]
pub(super) struct Readers {
    pub db: Arc<Handle>,
    pub pending: Arc<RwLock<Pending>>,
}
