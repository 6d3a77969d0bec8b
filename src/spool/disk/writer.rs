//! The storage thread: the one writer of both files.
//!
//! It drains whatever is queued into one group. Appends are dedup-checked and written to the intake log
//! as one frame (`O_DSYNC`), then answered (`log_appends`); everything else is one redb transaction
//! (`apply`), committed (fsync) before anyone is answered, which also moves the logged events into redb
//! — at the latest `APPLY_AFTER` after they were logged. When a write fails it is undone whole, its
//! callers get the error, readiness says why, and the database is reopened.

use super::admission::{Bounds, Room, DEDUP_STORED};
use super::counters::{lock, Effects, Shared};
use super::dedup_state::DedupState;
use super::handle::Handle;
use super::intake_log::{IntakeLog, IntakeRecord};
use super::pending::{self, Pending};
use super::protocol::{Answer, Cmd, Op, Prepared, Reply};
use super::schema::{DedupEntry, MetaKey, DEDUP_LOG};
use super::tables::Tables;
use super::{now_ms, storage};
use crate::spool::{Admission as Admitted, SpoolError};
use redb::{Database, ReadableDatabase};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How many commands one group takes at most.
const MAX_GROUP: usize = 4096;
/// Logged events go into redb at the latest this long after the first of them was logged ...
const APPLY_AFTER: Duration = Duration::from_millis(25);
/// ... or once this many wait, or with the next other write (an ack, a dead letter, a limiter save).
const APPLY_EVENTS: usize = 4096;
/// While redb refuses writes, the log takes at most this many events before appends fail too.
const MAX_PENDING: usize = 200_000;
/// How long logged events wait before redb is tried again after a failed transaction.
const APPLY_RETRY: Duration = Duration::from_secs(1);
/// The intake log starts over once this much of it is in redb.
const LOG_RESET_AT: u64 = 1 << 20;
/// ... and this much logged goes into redb at once, whatever the time: the log stays within what a reset
/// keeps (`intake_log::KEEP_BYTES`, part of the spool's reserve). Above what 25 ms of intake logs at full
/// speed, so that it adds no commit in normal operation.
const LOG_APPLY_AT: u64 = 2 << 20;

pub(super) struct Writer {
    pub db: Arc<Handle>,
    pub shared: Arc<Mutex<Shared>>,
    pub pending: Arc<RwLock<Pending>>,
    pub dir: PathBuf,
    pub admission: Bounds,
    pub max_dead_letters: u64,
    pub dedup_window_ms: i64,
    pub dedup: DedupState,
    pub intake: IntakeLog,
    /// The last event id handed out (ids increase across accounts).
    pub seq: u64,
    /// After a failed transaction, logged events wait this long before the next try (ops still try at once).
    pub apply_not_before: Instant,
    #[cfg(test)]
    pub hold_next_commit: Option<std_mpsc::Receiver<()>>,
}

impl Writer {
    /// Serves commands until `Close`, or until every handle is gone.
    pub fn run(mut self, rx: &std_mpsc::Receiver<Cmd>) {
        loop {
            let first = match self.apply_due_in() {
                Some(wait) => match rx.recv_timeout(wait) {
                    Ok(cmd) => Some(cmd),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        self.apply(Vec::new());
                        continue;
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => None,
                },
                None => rx.recv().ok(),
            };
            let Some(first) = first else {
                // Every handle is gone: what the log holds goes into redb now rather than at the next start.
                self.apply(Vec::new());
                return;
            };
            let mut cmds = vec![first];
            while cmds.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            if cmds.iter().any(|c| matches!(c, Cmd::Crash)) {
                panic!("the storage thread was told to crash");
            }
            let Some(at) = cmds.iter().position(|c| matches!(c, Cmd::Close { .. })) else {
                self.commit_group(cmds);
                continue;
            };
            let rest = cmds.split_off(at);
            self.commit_group(cmds);
            self.close(rest, rx);
            return;
        }
    }

    /// Commits what is logged, closes the file and answers what came after the close.
    fn close(&mut self, rest: Vec<Cmd>, rx: &std_mpsc::Receiver<Cmd>) {
        self.apply(Vec::new());
        self.db.close();
        let closed = SpoolError::Unavailable("the spool is closed".into());
        for cmd in rest
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            match cmd {
                Cmd::Close { reply } => {
                    let _ = reply.send(Ok(()));
                }
                other => other.fail(&closed),
            }
        }
    }

    /// How long until the logged events are due in redb, if any are waiting.
    fn apply_due_in(&self) -> Option<Duration> {
        let since = pending::read(&self.pending).since?;
        let due = (since + APPLY_AFTER).max(self.apply_not_before);
        Some(due.saturating_duration_since(Instant::now()))
    }

    fn commit_group(&mut self, cmds: Vec<Cmd>) {
        let mut appends = Vec::new();
        let mut ops = Vec::new();
        for cmd in cmds {
            match cmd {
                Cmd::Append { records, reply } => appends.push((records, reply)),
                Cmd::Write(op) => ops.push(op),
                Cmd::Close { reply } => {
                    let _ = reply.send(Ok(()));
                }
                Cmd::Crash => {}
                #[cfg(test)]
                Cmd::HoldNextCommit(rx) => self.hold_next_commit = Some(rx),
            }
        }
        if !appends.is_empty() {
            self.log_appends(appends);
        }
        let due = {
            let p = pending::read(&self.pending);
            (p.len >= APPLY_EVENTS
                || self.intake.len() >= LOG_APPLY_AT
                || p.since.is_some_and(|t| t.elapsed() >= APPLY_AFTER))
                && Instant::now() >= self.apply_not_before
        };
        if !ops.is_empty() || due {
            self.apply(ops);
        }
    }

    /// Why appends cannot be logged now, if they cannot: only a commit to redb makes room (and lets the
    /// log start over after a failure), so one is tried first when it may help.
    fn intake_refusal(&mut self) -> Option<&'static str> {
        let waiting = pending::read(&self.pending).len;
        if (self.intake.is_broken() || waiting >= MAX_PENDING)
            && Instant::now() >= self.apply_not_before
        {
            self.apply(Vec::new());
        }
        if self.intake.is_broken() {
            Some("the intake log could not be written and redb cannot take its events yet")
        } else if pending::read(&self.pending).len >= MAX_PENDING {
            Some("events are not moving into the spool file; writes to it fail")
        } else {
            None
        }
    }

    /// Appends: dedup-checked, written to the intake log as one frame and synced, then answered. They go
    /// into redb with the next `apply`; until then readers find them in `pending`.
    fn log_appends(&mut self, appends: Vec<(Vec<Prepared>, Answer<Vec<Admitted>>)>) {
        if let Some(why) = self.intake_refusal() {
            let e = SpoolError::Unavailable(why.into());
            for (_, reply) in appends {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        let mut room = self.admission.room(&mut lock(&self.shared));
        let mut batch = LogBatch::default();
        let db = self.db.get();
        let mut durable = durable_lookup(db.as_ref().ok());
        for (records, reply) in appends {
            // Each new event stores its record and a dedup entry.
            let stored = records
                .iter()
                .map(|p| p.bytes.len() as u64 + DEDUP_STORED)
                .sum();
            if let Err(why) = room.take(stored) {
                batch.replies.push(Reply::Admissions(reply, Err(why)));
                continue;
            }
            let admissions = self.admit(records, &mut batch, &mut durable);
            batch.replies.push(Reply::Admissions(reply, Ok(admissions)));
        }
        self.admission.settle(room, &mut lock(&self.shared));
        let failed = match batch.failed.take() {
            Some(e) => Some(e),
            None if batch.logged.is_empty() => None,
            None => self.intake.append(&batch.logged).err().map(|e| {
                storage(format!(
                    "cannot write the intake log under {}: {e}",
                    self.dir.display()
                ))
            }),
        };
        if let Some(e) = failed {
            // Not accepted: forget their keys, so that the caller's retry is not taken for a duplicate.
            // (Ids and log sequences handed out stay unused; a gap is harmless.)
            for r in &batch.logged {
                self.dedup.forget(r.log_seq, &r.key);
            }
            self.failed(&e);
            batch.replies.into_iter().for_each(|r| r.send(Some(&e)));
            return;
        }
        {
            let mut p = pending::write(&self.pending);
            for r in batch.logged {
                p.insert(r);
            }
        }
        self.publish(&batch.effects);
        batch.replies.into_iter().for_each(|r| r.send(None));
    }

    /// Judges one call's records against the dedup index; the new ones join `batch` to be logged.
    fn admit(
        &mut self,
        records: Vec<Prepared>,
        batch: &mut LogBatch,
        durable: &mut impl FnMut(u64) -> Result<Option<DedupEntry>, SpoolError>,
    ) -> Vec<Admitted> {
        let mut admissions = Vec::with_capacity(records.len());
        for p in records {
            let horizon = p.received_at_ms.saturating_sub(self.dedup_window_ms);
            match self.dedup.seen(&p.key, horizon, durable) {
                Ok(true) => {
                    admissions.push(Admitted::Duplicate);
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    batch.failed.get_or_insert(e);
                    break;
                }
            }
            let log_seq = self.dedup.add(DedupEntry {
                key: p.key,
                received_at_ms: p.received_at_ms,
            });
            self.seq += 1;
            batch.effects.queued(&p.account, p.bytes.len());
            batch.logged.push(IntakeRecord {
                seq: self.seq,
                log_seq,
                received_at_ms: p.received_at_ms,
                key: p.key,
                account: p.account,
                bytes: p.bytes,
            });
            admissions.push(Admitted::Queued);
        }
        admissions
    }

    /// One redb transaction: the logged events first, then `ops`, then the dedup purge and the counters.
    /// Committed (fsync) before anyone is answered; after it the intake log may start over.
    fn apply(&mut self, ops: Vec<Op>) {
        if ops.is_empty() && !self.intake.is_broken() && pending::read(&self.pending).len == 0 {
            return;
        }
        let db = match self.db.get() {
            Ok(db) => db,
            Err(e) => {
                for op in ops {
                    op.fail(&e);
                }
                // Do not spin while the disk is gone.
                std::thread::sleep(Duration::from_millis(100));
                self.apply_not_before = Instant::now() + APPLY_RETRY;
                return;
            }
        };
        let mut replies = Vec::with_capacity(ops.len());
        let mut effects = Effects::default();
        // Readers keep reading `pending` (a read lock) while this commits; it is emptied only after.
        let outcome = {
            let pending = self.pending.clone();
            let logged = pending::read(&pending);
            self.transaction(&db, &logged, ops, &mut replies, &mut effects)
        };
        let purged = match outcome {
            Ok(purged) => purged,
            Err(e) => {
                // The logged events stay pending (and in the log). Ids a failed replay took stay unused.
                self.apply_not_before = Instant::now() + APPLY_RETRY;
                self.failed(&e);
                // Reopen before answering, so that no caller reads through the failed handle.
                drop(db);
                self.db.close();
                if let Err(e) = self.db.get() {
                    tracing::error!(error = %e, "cannot reopen the spool yet; retrying on the next access");
                }
                replies.into_iter().for_each(|r| r.send(Some(&e)));
                return;
            }
        };
        pending::write(&self.pending).clear();
        self.dedup.unapplied.clear();
        self.dedup.purged(&purged);
        // Everything logged is in redb now, durably.
        if self.intake.is_broken() || self.intake.len() >= LOG_RESET_AT {
            if let Err(e) = self.intake.reset() {
                tracing::error!(error = %e, "cannot reset the intake log; appends wait until it can be");
            }
        }
        self.publish(&effects);
        replies.into_iter().for_each(|r| r.send(None));
    }

    /// Writes and commits one transaction; answers the dedup entries it purged.
    fn transaction(
        &mut self,
        db: &Database,
        logged: &Pending,
        ops: Vec<Op>,
        replies: &mut Vec<Reply>,
        effects: &mut Effects,
    ) -> Result<Vec<(u64, u64)>, SpoolError> {
        let mut room = self.admission.room(&mut lock(&self.shared));
        let txn = db.begin_write().map_err(storage)?;
        let purged = {
            let mut tables = Tables::open(&txn)?;
            tables.put_logged(logged)?;
            // Their counts are in memory already (since they were logged); this stores them.
            for account in logged.events.keys() {
                effects.count(account, 0, 0);
            }
            for op in ops {
                replies.push(self.apply_op(&mut tables, op, &mut room, effects)?);
            }
            tables.set(MetaKey::Seq, self.seq)?;
            tables.set(MetaKey::DedupNext, self.dedup.next)?;
            let purged = tables.purge_dedup(&self.dedup, now_ms() - self.dedup_window_ms)?;
            {
                let s = lock(&self.shared);
                tables.store_counts(&s.counts, s.dead_bytes, effects)?;
            }
            purged
        };
        self.admission.settle(room, &mut lock(&self.shared));
        #[cfg(test)]
        if let Some(hold) = self.hold_next_commit.take() {
            let _ = hold.recv();
        }
        txn.commit().map_err(storage)?;
        Ok(purged)
    }

    fn apply_op(
        &mut self,
        tables: &mut Tables<'_>,
        op: Op,
        room: &mut Room,
        effects: &mut Effects,
    ) -> Result<Reply, SpoolError> {
        Ok(match op {
            Op::Ack {
                account,
                ids,
                reply,
            } => {
                tables.remove(&account, &ids, None, effects)?;
                Reply::Unit(reply, Ok(()))
            }
            Op::DeadLetter {
                account,
                ids,
                reason,
                message,
                reply,
            } => {
                tables.remove(&account, &ids, Some((reason, &message)), effects)?;
                tables.evict_dead(self.max_dead_letters, effects)?;
                Reply::Unit(reply, Ok(()))
            }
            Op::Replay {
                account,
                letters,
                reply,
            } => {
                let moved = tables.replay(&account, letters, &mut self.seq, room, effects)?;
                Reply::Count(reply, moved)
            }
            Op::DeleteDead {
                account,
                ids,
                reply,
            } => Reply::Count(reply, Ok(tables.delete_dead(&account, &ids, effects)?)),
            Op::SaveTat { key, tat, reply } => {
                tables.set(MetaKey::Tat(&key), tat)?;
                effects.tats.push((key, tat));
                Reply::Unit(reply, Ok(()))
            }
        })
    }

    /// Applies what a write did to the in-memory counters and readiness, and wakes the dispatchers.
    fn publish(&self, effects: &Effects) {
        let mut s = lock(&self.shared);
        s.apply(effects);
        s.dedup_entries = self.dedup.table.len() as u64;
        let now = self.admission.refusal(&mut s);
        match (&s.unhealthy, &now) {
            (None, Some(why)) => {
                tracing::warn!(reason = %why, "spool refusing events; ingest answers 503")
            }
            (Some(_), None) => tracing::info!("spool accepting events again"),
            _ => {}
        }
        s.unhealthy = now;
        let to_notify: Vec<_> = effects.appended.iter().map(|a| s.notifier(a)).collect();
        drop(s);
        for n in to_notify {
            n.notify_one();
        }
    }

    /// A write failed: ingest is told (readiness), and, as most write failures are a full disk, appends
    /// only refill what acks empty from here on.
    fn failed(&self, e: &SpoolError) {
        tracing::error!(error = %e, "spool write failed; nothing of this group was kept");
        let mut s = lock(&self.shared);
        s.unhealthy = Some(e.to_string());
        let total = s.total_bytes;
        s.low_water.get_or_insert(total);
    }
}

/// What one group of appends logs, and how each call is answered.
#[derive(Default)]
struct LogBatch {
    logged: Vec<IntakeRecord>,
    effects: Effects,
    replies: Vec<Reply>,
    failed: Option<SpoolError>,
}

/// Reads dedup log entries from redb by sequence, opening one read transaction on first use.
fn durable_lookup(
    db: Option<&Arc<Database>>,
) -> impl FnMut(u64) -> Result<Option<DedupEntry>, SpoolError> + '_ {
    let mut table: Option<redb::ReadOnlyTable<u64, &'static [u8]>> = None;
    move |seq| {
        if table.is_none() {
            let db = db.ok_or_else(|| storage("the spool file is not open"))?;
            let txn = db.begin_read().map_err(storage)?;
            table = Some(txn.open_table(DEDUP_LOG).map_err(storage)?);
        }
        let Some(t) = table.as_ref() else {
            return Ok(None);
        };
        match t.get(seq).map_err(storage)? {
            Some(v) => Ok(Some(DedupEntry::decode(seq, v.value())?)),
            None => Ok(None),
        }
    }
}
