//! Start-up: what the files say. The counters and limiter states from `meta` (start-up never scans the
//! events), the dedup fingerprints from the dedup log, and the intake log's events that redb does not
//! have yet (a stop between a frame's write and its transaction), which go into redb before anything else.

use super::counters::{Effects, Shared};
use super::dedup_state::DedupState;
use super::fingerprints::FingerprintTable;
use super::intake_log::IntakeRecord;
use super::pending::Pending;
use super::schema::{fingerprint, DedupEntry, MetaKey, DEAD, DEDUP_LOG, META};
use super::storage;
use super::tables::Tables;
use crate::spool::SpoolError;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

/// The waiting events' counters and the limiter states, from the `meta` table.
pub(super) fn load_counts(db: &Database, shared: &mut Shared) -> Result<(), SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let mut dead_bytes = None;
    for item in meta.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        let (name, v) = (k.value(), v.value());
        match MetaKey::parse(name) {
            Some(MetaKey::Events(account)) => {
                shared.counts.entry(account.to_owned()).or_default().events = v
            }
            Some(MetaKey::Bytes(account)) => {
                shared.counts.entry(account.to_owned()).or_default().bytes = v;
                shared.total_bytes += v;
            }
            Some(MetaKey::Tat(key)) => {
                shared.tats.insert(key.to_owned(), v);
            }
            Some(MetaKey::DeadBytes) => dead_bytes = Some(v),
            _ => {}
        }
    }
    // A spool made before the dead letters' bytes were kept: counted once (they are bounded in number).
    shared.dead_bytes = match dead_bytes {
        Some(v) => v,
        None => {
            let dead = txn.open_table(DEAD).map_err(storage)?;
            let mut total = 0u64;
            for item in dead.iter().map_err(storage)? {
                total += item.map_err(storage)?.1.value().len() as u64;
            }
            total
        }
    };
    Ok(())
}

fn meta_u64(
    meta: &impl ReadableTable<&'static str, u64>,
    key: MetaKey<'_>,
) -> Result<u64, SpoolError> {
    Ok(meta
        .get(key.name().as_str())
        .map_err(storage)?
        .map_or(0, |v| v.value()))
}

/// The logged events that redb does not have (ids after its last one), counted, with the last id and
/// dedup log sequence they take.
pub(super) struct Unapplied {
    pub events: Pending,
    pub effects: Effects,
    pub last_seq: u64,
    pub next_log: u64,
}

pub(super) fn unapplied(db: &Database, logged: Vec<IntakeRecord>) -> Result<Unapplied, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let seq = meta_u64(&meta, MetaKey::Seq)?;
    let mut out = Unapplied {
        events: Pending::default(),
        effects: Effects::default(),
        last_seq: seq,
        next_log: meta_u64(&meta, MetaKey::DedupNext)?,
    };
    for r in logged.into_iter().filter(|r| r.seq > seq) {
        out.effects.count(&r.account, 1, r.bytes.len() as i64);
        out.last_seq = out.last_seq.max(r.seq);
        out.next_log = out.next_log.max(r.log_seq + 1);
        out.events.insert(r);
    }
    Ok(out)
}

/// Puts `missing` into redb in one transaction, with the ids and dedup entries they were logged with.
pub(super) fn recover(
    db: &Database,
    shared: &Shared,
    missing: &Unapplied,
) -> Result<(), SpoolError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut tables = Tables::open(&txn)?;
        tables.put_logged(&missing.events)?;
        tables.set(MetaKey::Seq, missing.last_seq)?;
        tables.set(MetaKey::DedupNext, missing.next_log)?;
        tables.store_counts(&shared.counts, shared.dead_bytes, &missing.effects)?;
    }
    txn.commit().map_err(storage)
}

/// The dedup fingerprints from the dedup log, and the last event id handed out.
pub(super) fn load_dedup(db: &Database) -> Result<(DedupState, u64), SpoolError> {
    let mut dedup = DedupState::default();
    let txn = db.begin_read().map_err(storage)?;
    let log = txn.open_table(DEDUP_LOG).map_err(storage)?;
    dedup.table = FingerprintTable::with_capacity(log.len().map_err(storage)? as usize);
    let mut first = None;
    for item in log.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        let seq = k.value();
        let entry = DedupEntry::decode(seq, v.value())?;
        first.get_or_insert(seq);
        dedup.table.insert(fingerprint(&entry.key), seq);
        dedup.next = seq + 1;
    }
    let meta = txn.open_table(META).map_err(storage)?;
    dedup.next = dedup.next.max(meta_u64(&meta, MetaKey::DedupNext)?);
    dedup.first = first.unwrap_or(dedup.next);
    Ok((dedup, meta_u64(&meta, MetaKey::Seq)?))
}

/// Puts the intake log's events that redb lacks into redb (counted, known to the dedup index, ids
/// after `seq`). When redb cannot take them yet (a full disk, say), they stay in the log and in memory:
/// the answer holds them, pending, and they go into redb once it takes writes.
pub(super) fn intake_log_events(
    db: &Database,
    shared: &mut Shared,
    logged: Vec<IntakeRecord>,
    dedup: &mut DedupState,
    seq: &mut u64,
) -> Result<Pending, SpoolError> {
    let missing = unapplied(db, logged)?;
    if missing.events.len == 0 {
        return Ok(Pending::default());
    }
    let recovered = recover(db, shared, &missing);
    // Their dedup entries, as the log gave them: in redb now, or only in memory until it takes them.
    for queue in missing.events.events.values() {
        for e in queue.values() {
            dedup.table.insert(fingerprint(&e.key), e.log_seq);
            if recovered.is_err() {
                let entry = DedupEntry {
                    key: e.key,
                    received_at_ms: e.received_at_ms,
                };
                dedup.unapplied.insert(e.log_seq, entry);
            }
        }
    }
    dedup.next = dedup.next.max(missing.next_log);
    *seq = (*seq).max(missing.last_seq);
    shared.apply(&missing.effects);
    match recovered {
        Ok(()) => {
            tracing::warn!(
                events = missing.events.len,
                "the spool was not closed cleanly; events of the intake log put into the spool file"
            );
            Ok(Pending::default())
        }
        Err(e) => {
            tracing::error!(
                events = missing.events.len,
                error = %e,
                "cannot put the intake log's events into the spool file yet; they stay pending"
            );
            Ok(missing.events)
        }
    }
}
