//! The embedded, durable spool: one redb file under `spool.dir`.
//!
//! One storage thread owns every write and group-commits: callers hand over their command and wait; the
//! thread drains whatever is queued into one write transaction, commits (fsync), then answers them all.
//! Invariants: an `append` is answered `Ok` only after its commit; an event leaves the `events` table only
//! through `ack` (X accepted it) or `dead_letter` (moved to `dead_letters` in the same transaction); the
//! dedup log and the limiter state are committed in the same transactions as the events they guard.
//! The dedup log is appended in time order; its fingerprints live in memory (`dedup::FingerprintTable`),
//! rebuilt from the log at start-up, and every fingerprint match is confirmed against the full key.
//! Counters (per account events and bytes) live in the `meta` table, so start-up never scans the spool.
//! When the disk fails or fills, the failed transaction is rolled back whole, callers get an error, and
//! the thread reopens the database (redb refuses further writes after an I/O error) until writes succeed.

use super::codec;
use super::dedup::{full_seq, FingerprintTable};
use super::{Admission, DeadLetter, DeadLetterQuery, Entry, Record, Spool, SpoolError};

use crate::limiter::{LimiterState, Nanos};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
/// Dedup log: sequence -> 32-byte key ‖ received time (epoch ms, little endian), in arrival order.
const DEDUP_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("dedup_log");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How many commands one transaction takes at most.
const MAX_GROUP: usize = 4096;
/// Expired dedup entries removed per transaction, so purging never stalls intake.
const PURGE_PER_COMMIT: usize = 2000;

#[derive(Debug, Clone)]
pub struct DiskSpoolOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub max_dead_letters: u64,
    pub dedup_window: Duration,
    /// redb's page cache; bounded so that memory stays small whatever the backlog.
    pub cache_bytes: usize,
    /// Appends are refused while the file system has less than this free.
    pub min_free_bytes: u64,
}

/// A record made ready for the storage thread: its dedup key and its encoded bytes.
struct Prepared {
    key: [u8; 32],
    account: String,
    received_at_ms: i64,
    bytes: Vec<u8>,
}

enum Cmd {
    Append {
        records: Vec<Prepared>,
        reply: oneshot::Sender<Result<Vec<Admission>, SpoolError>>,
    },
    Ack {
        account: String,
        ids: Vec<u64>,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    DeadLetter {
        account: String,
        ids: Vec<u64>,
        reason: String,
        message: String,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    SaveTat {
        key: String,
        tat: Nanos,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Dead letters back to the queue, each with its (re-mapped, encoded) record.
    Replay {
        account: String,
        letters: Vec<(u64, Vec<u8>)>,
        reply: oneshot::Sender<Result<usize, SpoolError>>,
    },
    DeleteDead {
        account: String,
        ids: Vec<u64>,
        reply: oneshot::Sender<Result<usize, SpoolError>>,
    },
    /// Finish what is queued before it, close the file, stop the thread.
    Close {
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
struct Count {
    events: u64,
    bytes: u64,
}

#[derive(Default)]
struct Shared {
    counts: HashMap<String, Count>,
    total_bytes: u64,
    tats: HashMap<String, Nanos>,
    /// Why writes fail right now, if they do.
    unhealthy: Option<String>,
    /// Waiting bytes when the disk ran low. The file does not shrink when events leave, but redb reuses the
    /// freed pages: while the disk stays low, appends may refill what acks emptied, up to 90% of this.
    low_water: Option<u64>,
    notifiers: HashMap<String, Arc<Notify>>,
}

pub struct DiskSpool {
    db: Arc<Handle>,
    tx: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Mutex<Shared>>,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Unavailable(e.to_string())
}

fn dedup_key(r: &Record) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        r.account.as_str(),
        r.conversion.event_id.as_str(),
        r.conversion.conversion_id.as_str(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, SpoolError> {
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(storage)?;
    // Create the tables once; reopening an existing spool must not need to write (the disk may be full).
    let ready = db.begin_read().map_err(storage)?.open_table(META).is_ok();
    if !ready {
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(EVENTS).map_err(storage)?;
        txn.open_table(DEDUP_LOG).map_err(storage)?;
        txn.open_table(DEAD).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
        txn.commit().map_err(storage)?;
    }
    Ok(db)
}

/// The database handle, shared by the storage thread and readers; `None` while it is being reopened.
struct Handle {
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
    cache_bytes: usize,
}

impl Handle {
    /// The open database, opening it again first if a failure closed it.
    fn get(&self) -> Result<Arc<Database>, SpoolError> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Ok(db.clone());
        }
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = guard.as_ref() {
            return Ok(db.clone());
        }
        let db = Arc::new(open_db(&self.path, self.cache_bytes)?);
        *guard = Some(db.clone());
        tracing::warn!("spool reopened after a failure");
        Ok(db)
    }

    /// Closes the database: redb refuses every write after an I/O error, so it is reopened afresh.
    fn close(&self) {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = guard.take() {
            // Readers hold a clone for the length of one read; the file lock goes with the last one.
            for _ in 0..400 {
                if Arc::strong_count(&db) == 1 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl DiskSpool {
    /// Opens (or creates) the spool under `opts.dir` and starts its storage thread. What was committed before
    /// is there again; nothing is read into memory but the counters.
    pub fn open(opts: DiskSpoolOptions) -> Result<Arc<Self>, SpoolError> {
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", opts.dir.display())))?;
        let path = opts.dir.join("spool.redb");
        let db = open_db(&path, opts.cache_bytes)?;
        let mut shared = Shared::default();
        let mut dedup = DedupState::default();
        {
            let txn = db.begin_read().map_err(storage)?;
            let log = txn.open_table(DEDUP_LOG).map_err(storage)?;
            dedup.table = FingerprintTable::with_capacity(log.len().map_err(storage)? as usize);
            let mut first = None;
            for item in log.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                let seq = k.value();
                first.get_or_insert(seq);
                dedup.table.insert(fingerprint(v.value()), seq);
                dedup.next = seq + 1;
            }
            let meta = txn.open_table(META).map_err(storage)?;
            dedup.next = dedup.next.max(
                meta.get("dedup_next")
                    .map_err(storage)?
                    .map_or(0, |v| v.value()),
            );
            dedup.first = first.unwrap_or(dedup.next);
            for item in meta.iter().map_err(storage)? {
                let (k, v) = item.map_err(storage)?;
                let (k, v) = (k.value().to_owned(), v.value());
                if let Some(account) = k.strip_prefix("events:") {
                    shared.counts.entry(account.to_owned()).or_default().events = v;
                } else if let Some(account) = k.strip_prefix("bytes:") {
                    shared.counts.entry(account.to_owned()).or_default().bytes = v;
                    shared.total_bytes += v;
                } else if let Some(key) = k.strip_prefix("tat:") {
                    shared.tats.insert(key.to_owned(), v);
                }
            }
        }
        let db = Arc::new(Handle {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.clone(),
            cache_bytes: opts.cache_bytes,
        });
        let shared = Arc::new(Mutex::new(shared));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            opts,
            dedup: Mutex::new(dedup),
            disk_low: Default::default(),
        };
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| storage(format!("cannot start the storage thread: {e}")))?;
        Ok(Arc::new(DiskSpool { db, tx, shared }))
    }

    fn current_db(&self) -> Result<Arc<Database>, SpoolError> {
        self.db.get()
    }

    /// Commits what is queued, closes the database file and stops the storage thread. Later calls fail.
    pub async fn close(&self) -> Result<(), SpoolError> {
        self.call(|reply| Cmd::Close { reply }).await
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Cmd,
    ) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| storage("the storage thread stopped"))?;
        rx.await
            .map_err(|_| storage("the storage thread stopped"))?
    }
}

impl Spool for DiskSpool {
    fn append(&self, records: Vec<Record>) -> BoxFuture<'_, Result<Vec<Admission>, SpoolError>> {
        // Hashing and encoding happen here, in the caller's task, so the one storage thread only inserts.
        let prepared: Result<Vec<Prepared>, SpoolError> = records
            .into_iter()
            .map(|r| {
                let bytes = codec::encode(&r).map_err(storage)?;
                Ok(Prepared {
                    key: dedup_key(&r),
                    account: r.account,
                    received_at_ms: r.received_at_ms,
                    bytes,
                })
            })
            .collect();
        async move {
            let records = prepared?;
            self.call(|reply| Cmd::Append { records, reply }).await
        }
        .boxed()
    }

    fn peek_after<'a>(
        &'a self,
        account: &'a str,
        after: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, SpoolError>> {
        let db = self.current_db();
        let account = account.to_owned();
        async move {
            let db = db?;
            tokio::task::spawn_blocking(move || -> Result<Vec<Entry>, SpoolError> {
                let txn = db.begin_read().map_err(storage)?;
                let table = txn.open_table(EVENTS).map_err(storage)?;
                let mut out = Vec::new();
                for item in table
                    .range(
                        (account.as_str(), after.saturating_add(1))..=(account.as_str(), u64::MAX),
                    )
                    .map_err(storage)?
                    .take(max)
                {
                    let (k, v) = item.map_err(storage)?;
                    out.push(Entry {
                        id: k.value().1,
                        record: codec::decode(&account, v.value()).map_err(storage)?,
                    });
                }
                Ok(out)
            })
            .await
            .map_err(storage)?
        }
        .boxed()
    }

    fn ack<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        async move {
            self.call(|reply| Cmd::Ack {
                account: account.to_owned(),
                ids: ids.to_vec(),
                reply,
            })
            .await
        }
        .boxed()
    }

    fn backlog(&self, account: &str) -> usize {
        lock(&self.shared)
            .counts
            .get(account)
            .map_or(0, |c| c.events as usize)
    }

    fn changed(&self, account: &str) -> Arc<Notify> {
        lock(&self.shared)
            .notifiers
            .entry(account.to_owned())
            .or_default()
            .clone()
    }

    fn dead_letter<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
        reason: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        async move {
            self.call(|reply| Cmd::DeadLetter {
                account: account.to_owned(),
                ids: ids.to_vec(),
                reason: reason.to_owned(),
                message: message.to_owned(),
                reply,
            })
            .await
        }
        .boxed()
    }

    fn dead_letters(&self, q: &DeadLetterQuery) -> Result<Vec<DeadLetter>, SpoolError> {
        let db = self.current_db()?;
        let txn = db.begin_read().map_err(storage)?;
        let table = txn.open_table(DEAD).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.range(q.after.saturating_add(1)..).map_err(storage)? {
            if out.len() >= q.limit {
                break;
            }
            let (_, v) = item.map_err(storage)?;
            let letter: DeadLetter = serde_json::from_slice(v.value()).map_err(storage)?;
            if q.account.as_ref().is_none_or(|a| *a == letter.account) {
                out.push(letter);
            }
        }
        Ok(out)
    }

    fn dead_letter_counts(&self) -> Result<(u64, u64), SpoolError> {
        let db = self.current_db()?;
        let txn = db.begin_read().map_err(storage)?;
        let kept = txn
            .open_table(DEAD)
            .map_err(storage)?
            .len()
            .map_err(storage)?;
        let evicted = txn
            .open_table(META)
            .map_err(storage)?
            .get("dead_evicted")
            .map_err(storage)?
            .map_or(0, |v| v.value());
        Ok((kept, evicted))
    }

    fn replay<'a>(
        &'a self,
        account: &'a str,
        letters: Vec<(u64, Record)>,
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        let encoded: Result<Vec<(u64, Vec<u8>)>, SpoolError> = letters
            .iter()
            .map(|(id, r)| Ok((*id, codec::encode(r).map_err(storage)?)))
            .collect();
        async move {
            let letters = encoded?;
            self.call(|reply| Cmd::Replay {
                account: account.to_owned(),
                letters,
                reply,
            })
            .await
        }
        .boxed()
    }

    fn delete_dead_letters<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<usize, SpoolError>> {
        async move {
            self.call(|reply| Cmd::DeleteDead {
                account: account.to_owned(),
                ids: ids.to_vec(),
                reply,
            })
            .await
        }
        .boxed()
    }

    fn oldest(&self, account: &str) -> Result<Option<i64>, SpoolError> {
        let db = self.current_db()?;
        let txn = db.begin_read().map_err(storage)?;
        let table = txn.open_table(EVENTS).map_err(storage)?;
        let first = table
            .range((account, 0)..=(account, u64::MAX))
            .map_err(storage)?
            .next();
        match first {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(storage)?;
                Ok(Some(
                    codec::decode(account, v.value())
                        .map_err(storage)?
                        .received_at_ms,
                ))
            }
        }
    }

    fn bytes(&self) -> u64 {
        lock(&self.shared).total_bytes
    }

    fn account_bytes(&self, account: &str) -> u64 {
        lock(&self.shared)
            .counts
            .get(account)
            .map_or(0, |c| c.bytes)
    }

    fn health(&self) -> Result<(), String> {
        match &lock(&self.shared).unhealthy {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }
}

impl LimiterState for DiskSpool {
    fn load(&self, key: &str) -> Option<Nanos> {
        lock(&self.shared).tats.get(key).copied()
    }

    fn save<'a>(&'a self, key: &'a str, tat: Nanos) -> BoxFuture<'a, Result<(), String>> {
        async move {
            self.call(|reply| Cmd::SaveTat {
                key: key.to_owned(),
                tat,
                reply,
            })
            .await
            .map_err(|e| e.to_string())
        }
        .boxed()
    }
}

/// The storage thread.
struct Writer {
    db: Arc<Handle>,
    shared: Arc<Mutex<Shared>>,
    opts: DiskSpoolOptions,
    dedup: Mutex<DedupState>,
    /// The last free-space reading: (when, whether below `min_free_bytes`).
    disk_low: std::cell::Cell<Option<(std::time::Instant, bool)>>,
}

/// How long a free-space reading is trusted. Reading it costs a syscall, and every group needed two;
/// `min_free_bytes` is the margin for what is written in between (and ENOSPC is handled anyway).
const FREE_SPACE_FRESH: Duration = Duration::from_millis(50);

/// The live range of the dedup log and the fingerprints of its entries.
#[derive(Default)]
struct DedupState {
    table: FingerprintTable,
    /// First live sequence (equal to `next` when the log is empty).
    first: u64,
    next: u64,
}

/// Changes to the dedup state made by a transaction, undone if it fails.
#[derive(Default)]
struct DedupChanges {
    inserted: Vec<(u64, u64)>,
    purged: Vec<(u64, u64)>,
    next_before: u64,
}

fn fingerprint(entry: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&entry[..8]);
    u64::from_le_bytes(b)
}

/// The effect of one transaction, applied to the in-memory counters after its commit.
#[derive(Default)]
struct Effects {
    counts: HashMap<String, (i64, i64)>,
    tats: Vec<(String, Nanos)>,
    appended: Vec<String>,
}

impl Effects {
    /// `events` more (or fewer) waiting events of `account`, taking `bytes` more (or fewer).
    fn count(&mut self, account: &str, events: i64, bytes: i64) {
        let c = match self.counts.get_mut(account) {
            Some(c) => c,
            None => self.counts.entry(account.to_owned()).or_default(),
        };
        c.0 += events;
        c.1 += bytes;
    }
}

enum Reply {
    Append(
        oneshot::Sender<Result<Vec<Admission>, SpoolError>>,
        Result<Vec<Admission>, SpoolError>,
    ),
    Unit(
        oneshot::Sender<Result<(), SpoolError>>,
        Result<(), SpoolError>,
    ),
    Count(
        oneshot::Sender<Result<usize, SpoolError>>,
        Result<usize, SpoolError>,
    ),
}

impl Reply {
    fn send(self, override_err: Option<&SpoolError>) {
        match self {
            Reply::Append(tx, r) => {
                let _ = tx.send(override_err.map_or(r, |e| Err(e.clone())));
            }
            Reply::Unit(tx, r) => {
                let _ = tx.send(override_err.map_or(r, |e| Err(e.clone())));
            }
            Reply::Count(tx, r) => {
                let _ = tx.send(override_err.map_or(r, |e| Err(e.clone())));
            }
        }
    }
}

impl Writer {
    fn run(self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut cmds = vec![first];
            while cmds.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            let close = cmds.iter().position(|c| matches!(c, Cmd::Close { .. }));
            let Some(at) = close else {
                self.commit_group(cmds);
                continue;
            };
            let rest = cmds.split_off(at);
            if !cmds.is_empty() {
                self.commit_group(cmds);
            }
            self.db.close();
            rx.close();
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
            return;
        }
    }

    fn commit_group(&self, cmds: Vec<Cmd>) {
        let db = match self.db.get() {
            Ok(db) => db,
            Err(e) => {
                for cmd in cmds {
                    cmd.fail(&e);
                }
                // Do not spin while the disk is gone.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        let room = self.room();
        let mut replies = Vec::with_capacity(cmds.len());
        let mut effects = Effects::default();
        let mut dedup = self.dedup.lock().unwrap_or_else(|p| p.into_inner());
        let mut changes = DedupChanges {
            next_before: dedup.next,
            ..Default::default()
        };
        let outcome = (|| -> Result<(), SpoolError> {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut tables = Tables {
                    events: txn.open_table(EVENTS).map_err(storage)?,
                    log: txn.open_table(DEDUP_LOG).map_err(storage)?,
                    dedup: &mut dedup,
                    changes: &mut changes,
                    dead: txn.open_table(DEAD).map_err(storage)?,
                    meta: txn.open_table(META).map_err(storage)?,
                };
                let mut room = room.clone();
                for cmd in cmds {
                    match cmd {
                        Cmd::Append { records, reply } => {
                            let result = tables.append(records, &mut room, &mut effects)?;
                            replies.push(Reply::Append(reply, result));
                        }
                        Cmd::Ack {
                            account,
                            ids,
                            reply,
                        } => {
                            tables.remove(&account, &ids, None, &mut effects)?;
                            replies.push(Reply::Unit(reply, Ok(())));
                        }
                        Cmd::DeadLetter {
                            account,
                            ids,
                            reason,
                            message,
                            reply,
                        } => {
                            tables.remove(
                                &account,
                                &ids,
                                Some((&reason, &message)),
                                &mut effects,
                            )?;
                            tables.evict_dead(self.opts.max_dead_letters)?;
                            replies.push(Reply::Unit(reply, Ok(())));
                        }
                        Cmd::Replay {
                            account,
                            letters,
                            reply,
                        } => {
                            let result =
                                tables.replay(&account, letters, &mut room, &mut effects)?;
                            replies.push(Reply::Count(reply, result));
                        }
                        Cmd::DeleteDead {
                            account,
                            ids,
                            reply,
                        } => {
                            let mut deleted = 0;
                            for id in ids {
                                if tables.take_dead(&account, id)?.is_some() {
                                    deleted += 1;
                                }
                            }
                            replies.push(Reply::Count(reply, Ok(deleted)));
                        }
                        Cmd::Close { reply } => replies.push(Reply::Unit(reply, Ok(()))),
                        Cmd::SaveTat { key, tat, reply } => {
                            tables
                                .meta
                                .insert(format!("tat:{key}").as_str(), tat)
                                .map_err(storage)?;
                            effects.tats.push((key, tat));
                            replies.push(Reply::Unit(reply, Ok(())));
                        }
                    }
                }
                tables.purge_dedup(now_ms() - self.opts.dedup_window.as_millis() as i64)?;
                if tables.dedup.next != tables.changes.next_before {
                    let next = tables.dedup.next;
                    tables.meta.insert("dedup_next", next).map_err(storage)?;
                }
                tables.store_counts(&self.shared, &effects)?;
            }
            txn.commit().map_err(storage)
        })();
        match &outcome {
            Ok(()) => {
                for (fp, seq) in &changes.purged {
                    dedup.table.remove(*fp, *seq);
                    dedup.first = dedup.first.max(seq + 1);
                }
            }
            Err(_) => {
                for (fp, seq) in &changes.inserted {
                    dedup.table.remove(*fp, *seq);
                }
                dedup.next = changes.next_before;
            }
        }
        drop(dedup);
        match outcome {
            Ok(()) => {
                let mut s = lock(&self.shared);
                for (account, (de, db)) in &effects.counts {
                    let c = s.counts.entry(account.clone()).or_default();
                    c.events = (c.events as i64 + de).max(0) as u64;
                    c.bytes = (c.bytes as i64 + db).max(0) as u64;
                    s.total_bytes = (s.total_bytes as i64 + db).max(0) as u64;
                }
                for (k, t) in &effects.tats {
                    s.tats.insert(k.clone(), *t);
                }
                let now = self.refusal(&s);
                match (&s.unhealthy, &now) {
                    (None, Some(why)) => {
                        tracing::warn!(reason = %why, "spool refusing events; ingest answers 503")
                    }
                    (Some(_), None) => tracing::info!("spool accepting events again"),
                    _ => {}
                }
                s.unhealthy = now;
                let to_notify: Vec<Arc<Notify>> = effects
                    .appended
                    .iter()
                    .map(|a| s.notifiers.entry(a.clone()).or_default().clone())
                    .collect();
                drop(s);
                for n in to_notify {
                    n.notify_one();
                }
                replies.into_iter().for_each(|r| r.send(None));
            }
            Err(e) => {
                tracing::error!(error = %e, "spool write failed; nothing of this group was kept");
                {
                    let mut s = lock(&self.shared);
                    s.unhealthy = Some(e.to_string());
                    // Most write failures are a full disk: only refill what acks empty from here on.
                    let total = s.total_bytes;
                    s.low_water.get_or_insert(total);
                }
                // Reopen before answering, so that no caller reads through the failed handle.
                drop(db);
                self.db.close();
                if let Err(e) = self.db.get() {
                    tracing::error!(error = %e, "cannot reopen the spool yet; retrying on the next access");
                }
                replies.into_iter().for_each(|r| r.send(Some(&e)));
            }
        }
    }

    /// Whether the file system under the spool has less than `min_free_bytes` free (a recent reading).
    fn disk_low(&self) -> bool {
        let now = std::time::Instant::now();
        match self.disk_low.get() {
            Some((at, low)) if now.duration_since(at) < FREE_SPACE_FRESH => low,
            _ => {
                let low = fs4::available_space(&self.opts.dir)
                    .is_ok_and(|free| free < self.opts.min_free_bytes);
                self.disk_low.set(Some((now, low)));
                low
            }
        }
    }

    /// How much appends may add in this group, and why they stop there.
    fn room(&self) -> Room {
        let mut s = lock(&self.shared);
        let total = s.total_bytes;
        let by_size = self.opts.max_bytes.saturating_sub(total);
        let low = self.disk_low();
        let by_disk = if low {
            let mark = *s.low_water.get_or_insert(total);
            Some((mark / 10 * 9).saturating_sub(total))
        } else {
            s.low_water = None;
            None
        };
        Room {
            by_size,
            by_disk,
            min_free: self.opts.min_free_bytes,
        }
    }

    /// Why the spool would refuse an event now (for readiness), if it would.
    fn refusal(&self, s: &Shared) -> Option<String> {
        if s.total_bytes >= self.opts.max_bytes {
            return Some(SpoolError::Full.to_string());
        }
        let low = self.disk_low();
        match s.low_water {
            Some(mark) if low && s.total_bytes >= mark / 10 * 9 => {
                Some(Room::disk_message(self.opts.min_free_bytes))
            }
            _ => None,
        }
    }
}

/// What appends may still add within one transaction.
#[derive(Clone)]
struct Room {
    by_size: u64,
    by_disk: Option<u64>,
    min_free: u64,
}

impl Room {
    fn disk_message(min_free: u64) -> String {
        format!("the disk under spool.dir is full (less than spool.min_free_bytes = {min_free} bytes free); events are accepted again as the backlog drains or space is freed")
    }

    /// Takes `bytes` from the room, or says why not.
    fn take(&mut self, bytes: u64) -> Result<(), SpoolError> {
        if bytes > self.by_size {
            return Err(SpoolError::Full);
        }
        if let Some(disk) = self.by_disk.as_mut() {
            if bytes > *disk {
                return Err(SpoolError::Unavailable(Self::disk_message(self.min_free)));
            }
            *disk -= bytes;
        }
        self.by_size -= bytes;
        Ok(())
    }
}

impl Cmd {
    fn fail(self, e: &SpoolError) {
        match self {
            Cmd::Append { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Cmd::Replay { reply, .. } | Cmd::DeleteDead { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Cmd::Ack { reply, .. }
            | Cmd::DeadLetter { reply, .. }
            | Cmd::SaveTat { reply, .. }
            | Cmd::Close { reply } => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

struct Tables<'t> {
    events: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    log: redb::Table<'t, u64, &'static [u8]>,
    dedup: &'t mut DedupState,
    changes: &'t mut DedupChanges,
    dead: redb::Table<'t, u64, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl Tables<'_> {
    fn next(&mut self, name: &str) -> Result<u64, SpoolError> {
        let n = self
            .meta
            .get(name)
            .map_err(storage)?
            .map_or(0, |v| v.value())
            + 1;
        self.meta.insert(name, n).map_err(storage)?;
        Ok(n)
    }

    /// The last event id handed out (ids increase across accounts).
    fn last_seq(&self) -> Result<u64, SpoolError> {
        Ok(self
            .meta
            .get("seq")
            .map_err(storage)?
            .map_or(0, |v| v.value()))
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
        if !fx.appended.iter().any(|a| a == account) {
            fx.appended.push(account.to_owned());
        }
        fx.count(account, 1, bytes.len() as i64);
        Ok(())
    }

    /// Appends what is new; `Ok(Err(why))` when the records do not fit in `room` (nothing written).
    fn append(
        &mut self,
        encoded: Vec<Prepared>,
        room: &mut Room,
        fx: &mut Effects,
    ) -> Result<Result<Vec<Admission>, SpoolError>, SpoolError> {
        if let Err(why) = room.take(encoded.iter().map(|p| p.bytes.len() as u64).sum()) {
            return Ok(Err(why));
        }
        let mut out = Vec::with_capacity(encoded.len());
        let mut seq = self.last_seq()?;
        for Prepared {
            key,
            account,
            received_at_ms,
            bytes,
        } in encoded
        {
            if self.seen(&key)? {
                out.push(Admission::Duplicate);
                continue;
            }
            let at = received_at_ms.max(0) as u64;
            let log_seq = self.dedup.next;
            let mut entry = [0u8; 40];
            entry[..32].copy_from_slice(&key);
            entry[32..].copy_from_slice(&at.to_le_bytes());
            self.log
                .insert(log_seq, entry.as_slice())
                .map_err(storage)?;
            let fp = fingerprint(&key);
            self.dedup.table.insert(fp, log_seq);
            self.dedup.next += 1;
            self.changes.inserted.push((fp, log_seq));
            seq += 1;
            self.queue(&account, seq, &bytes, fx)?;
            out.push(Admission::Queued);
        }
        self.meta.insert("seq", seq).map_err(storage)?;
        Ok(Ok(out))
    }

    /// Removes events; with `dead = Some((reason, message))` they move to the dead letters.
    fn remove(
        &mut self,
        account: &str,
        ids: &[u64],
        dead: Option<(&str, &str)>,
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
                let record = codec::decode(account, &value).map_err(storage)?;
                let id = self.next("dead_seq")?;
                let letter = DeadLetter {
                    id,
                    account: account.to_owned(),
                    reason: reason.to_owned(),
                    message: message.to_owned(),
                    dead_lettered_at_ms: now_ms(),
                    conversion: record.conversion,
                    received_at_ms: record.received_at_ms,
                    event_name: record.event_name,
                };
                let bytes = serde_json::to_vec(&letter).map_err(storage)?;
                self.dead.insert(id, bytes.as_slice()).map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Removes dead letter `id` if it is `account`'s.
    fn take_dead(&mut self, account: &str, id: u64) -> Result<Option<DeadLetter>, SpoolError> {
        let letter: Option<DeadLetter> = match self.dead.get(id).map_err(storage)? {
            Some(v) => Some(serde_json::from_slice(v.value()).map_err(storage)?),
            None => None,
        };
        match letter {
            Some(l) if l.account == account => {
                self.dead.remove(id).map_err(storage)?;
                Ok(Some(l))
            }
            _ => Ok(None),
        }
    }

    /// Dead letters of `account` back into its queue as the given encoded records; `Ok(Err(why))` when they
    /// do not fit in `room` (nothing moved).
    fn replay(
        &mut self,
        account: &str,
        letters: Vec<(u64, Vec<u8>)>,
        room: &mut Room,
        fx: &mut Effects,
    ) -> Result<Result<usize, SpoolError>, SpoolError> {
        if let Err(why) = room.take(letters.iter().map(|(_, b)| b.len() as u64).sum()) {
            return Ok(Err(why));
        }
        let mut seq = self.last_seq()?;
        let mut moved = 0;
        for (id, bytes) in letters {
            if self.take_dead(account, id)?.is_none() {
                continue;
            }
            seq += 1;
            self.queue(account, seq, &bytes, fx)?;
            moved += 1;
        }
        self.meta.insert("seq", seq).map_err(storage)?;
        Ok(Ok(moved))
    }

    fn evict_dead(&mut self, max: u64) -> Result<(), SpoolError> {
        let mut len = self.dead.len().map_err(storage)?;
        while len > max {
            if self.dead.pop_first().map_err(storage)?.is_none() {
                break;
            }
            len -= 1;
            self.next("dead_evicted")?;
        }
        Ok(())
    }

    /// Whether `key` is in the dedup log: a fingerprint match confirmed by the full key.
    fn seen(&self, key: &[u8; 32]) -> Result<bool, SpoolError> {
        let Some(last) = self.dedup.next.checked_sub(1) else {
            return Ok(false);
        };
        let candidates: Vec<u64> = self
            .dedup
            .table
            .candidates(fingerprint(key))
            .filter_map(|low| full_seq(low, self.dedup.first, last))
            .collect();
        for seq in candidates {
            if let Some(entry) = self.log.get(seq).map_err(storage)? {
                if entry.value().get(..32) == Some(key.as_slice()) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Removes log entries older than the window, oldest first, a bounded number per transaction.
    fn purge_dedup(&mut self, horizon_ms: i64) -> Result<(), SpoolError> {
        let horizon = horizon_ms.max(0) as u64;
        let mut expired = Vec::new();
        for item in self
            .log
            .range(self.dedup.first..)
            .map_err(storage)?
            .take(PURGE_PER_COMMIT)
        {
            let (k, v) = item.map_err(storage)?;
            let entry = v.value();
            let mut t = [0u8; 8];
            t.copy_from_slice(&entry[32..40]);
            if u64::from_le_bytes(t) >= horizon {
                break;
            }
            expired.push((fingerprint(entry), k.value()));
        }
        for (fp, seq) in expired {
            self.log.remove(seq).map_err(storage)?;
            self.changes.purged.push((fp, seq));
        }
        Ok(())
    }

    fn store_counts(&mut self, shared: &Mutex<Shared>, fx: &Effects) -> Result<(), SpoolError> {
        let s = lock(shared);
        for (account, (de, db)) in &fx.counts {
            let c = s.counts.get(account).copied().unwrap_or_default();
            self.meta
                .insert(
                    format!("events:{account}").as_str(),
                    (c.events as i64 + de).max(0) as u64,
                )
                .map_err(storage)?;
            self.meta
                .insert(
                    format!("bytes:{account}").as_str(),
                    (c.bytes as i64 + db).max(0) as u64,
                )
                .map_err(storage)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion::Conversion;

    fn opts(dir: &Path) -> DiskSpoolOptions {
        DiskSpoolOptions {
            dir: dir.to_path_buf(),
            max_bytes: 1 << 30,
            max_dead_letters: 3,
            dedup_window: Duration::from_secs(3600),
            cache_bytes: 1 << 20,
            min_free_bytes: 0,
        }
    }

    fn record(account: &str, id: &str) -> Record {
        Record {
            account: account.into(),
            received_at_ms: now_ms(),
            event_name: Some("purchase".into()),
            conversion: Conversion {
                value: Some("1.00".into()),
                ..Conversion::minimal("2026-11-28T00:00:00.000Z", "o9d2g", "t", id)
            },
        }
    }

    fn ids(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| e.record.conversion.conversion_id.clone())
            .collect()
    }

    #[tokio::test]
    async fn what_was_committed_is_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        let got = spool
            .append(vec![
                record("a", "1"),
                record("a", "2"),
                record("b", "1"),
                record("a", "1"),
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
        let first = spool.peek("a", 1).await.unwrap();
        spool.ack("a", &[first[0].id]).await.unwrap();
        spool.save("acct", 42).await.unwrap();
        let bytes = spool.bytes();
        assert!(bytes > 0);
        spool.close().await.unwrap();
        drop(spool);

        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        assert_eq!((spool.backlog("a"), spool.backlog("b")), (1, 1));
        assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["2"]);
        assert_eq!(spool.load("acct"), Some(42));
        assert_eq!(spool.bytes(), bytes, "counters are persisted, not rebuilt");
        // The dedup index survived too: "1" was delivered, a resend is still a duplicate.
        assert_eq!(
            spool.append(vec![record("a", "1")]).await.unwrap(),
            [Admission::Duplicate]
        );
        assert_eq!(
            spool.append(vec![record("a", "3")]).await.unwrap(),
            [Admission::Queued]
        );
        let waiting = spool.peek("a", 10).await.unwrap();
        assert_eq!(ids(&waiting), ["2", "3"]);
        // A dispatcher with "2" in hand takes what comes after it.
        assert_eq!(
            ids(&spool.peek_after("a", waiting[0].id, 10).await.unwrap()),
            ["3"]
        );
        assert!(spool
            .peek_after("a", waiting[1].id, 10)
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn concurrent_appends_are_group_committed_and_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = spool.clone();
            tasks.push(tokio::spawn(async move {
                s.append(vec![record("a", &format!("c{i}"))]).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), [Admission::Queued]);
        }
        assert_eq!(spool.backlog("a"), 200);
        assert_eq!(spool.peek("a", 1000).await.unwrap().len(), 200);
    }

    #[tokio::test]
    async fn full_spool_refuses_and_recovers_when_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.max_bytes = 1000;
        let spool = DiskSpool::open(o).unwrap();
        let mut n = 0;
        loop {
            match spool.append(vec![record("a", &format!("c{n}"))]).await {
                Ok(_) => n += 1,
                Err(e) => {
                    assert_eq!(e, SpoolError::Full);
                    break;
                }
            }
        }
        assert!(n >= 2 && spool.bytes() <= 1000, "{n} {}", spool.bytes());
        let waiting = spool.peek("a", 1).await.unwrap();
        spool.ack("a", &[waiting[0].id]).await.unwrap();
        assert_eq!(
            spool.append(vec![record("a", "after")]).await.unwrap(),
            [Admission::Queued]
        );
    }

    #[tokio::test]
    async fn dead_letters_are_kept_with_reason_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        spool
            .append((0..5).map(|i| record("a", &format!("d{i}"))).collect())
            .await
            .unwrap();
        let waiting = spool.peek("a", 10).await.unwrap();
        let all: Vec<u64> = waiting.iter().map(|e| e.id).collect();
        spool
            .dead_letter(
                "a",
                &all[..1],
                "rejected",
                "hashed_email (abc) is not a valid SHA-256 hash",
            )
            .await
            .unwrap();
        spool
            .dead_letter("a", &all[1..], "expired", "older than max_event_age")
            .await
            .unwrap();
        assert_eq!(spool.backlog("a"), 0);
        let dead = spool.dead_letters(&page(None, 0, 10)).unwrap();
        assert_eq!(dead.len(), 3, "bounded by max_dead_letters, oldest evicted");
        assert_eq!(spool.dead_letter_counts().unwrap(), (3, 2));
        assert_eq!(
            dead.iter()
                .map(|d| d.conversion.conversion_id.as_str())
                .collect::<Vec<_>>(),
            ["d2", "d3", "d4"]
        );
        assert!(dead
            .iter()
            .all(|d| d.reason == "expired" && d.account == "a"));
    }

    fn page(account: Option<&str>, after: u64, limit: usize) -> DeadLetterQuery {
        DeadLetterQuery {
            account: account.map(String::from),
            after,
            limit,
        }
    }

    fn rules(set: &str) -> crate::conversion::Rules {
        crate::conversion::Rules {
            accounts: [(
                "a".to_string(),
                crate::conversion::AccountRules {
                    pixel_id: "o9d7n".into(),
                    events: [("purchase".to_string(), set.to_string())].into(),
                    default_phone_region: phonenumber::country::Id::US,
                },
            )]
            .into(),
            max_event_age: Duration::from_secs(86400),
        }
    }

    #[tokio::test]
    async fn dead_letters_page_by_account_replay_remapped_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.max_dead_letters = 100;
        let spool = DiskSpool::open(o.clone()).unwrap();
        let mut batch: Vec<Record> = (0..6).map(|i| record("a", &format!("a{i}"))).collect();
        batch.extend((0..2).map(|i| record("b", &format!("b{i}"))));
        spool.append(batch).await.unwrap();
        let first_at = spool.oldest("a").unwrap().expect("a has events");
        assert!(first_at > 0 && spool.oldest("nobody").unwrap().is_none());
        assert!(spool.account_bytes("a") > spool.account_bytes("b"));
        assert_eq!(
            spool.account_bytes("a") + spool.account_bytes("b"),
            spool.bytes()
        );
        for account in ["a", "b"] {
            let ids: Vec<u64> = spool
                .peek(account, 10)
                .await
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect();
            spool
                .dead_letter(account, &ids, "rejected", "unknown event")
                .await
                .unwrap();
        }
        assert_eq!(spool.backlog("a"), 0);
        assert_eq!(spool.oldest("a").unwrap(), None);

        // Pages of two, account a only, in order, each after the previous page's last id.
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let p = spool.dead_letters(&page(Some("a"), after, 2)).unwrap();
            let Some(last) = p.last() else { break };
            after = last.id;
            assert!(p.len() <= 2);
            seen.extend(p.iter().map(|d| d.conversion.conversion_id.clone()));
        }
        assert_eq!(seen, ["a0", "a1", "a2", "a3", "a4", "a5"]);
        assert_eq!(spool.dead_letters(&page(None, 0, 100)).unwrap().len(), 8);

        // Replay three of a's with a fixed mapping: back in the queue with the new SET id, out of the dead letters.
        let letters = spool.dead_letters(&page(Some("a"), 0, 3)).unwrap();
        assert_eq!(letters[0].event_name.as_deref(), Some("purchase"));
        let fixed = rules("o9d2h");
        let records: Vec<(u64, Record)> =
            letters.iter().map(|d| (d.id, d.remapped(&fixed))).collect();
        // An id of b's is not replayed into a.
        let b_id = spool.dead_letters(&page(Some("b"), 0, 1)).unwrap()[0].id;
        let mut with_foreign = records.clone();
        with_foreign.push((b_id, records[0].1.clone()));
        assert_eq!(spool.replay("a", with_foreign).await.unwrap(), 3);
        assert_eq!(
            spool.replay("a", records).await.unwrap(),
            0,
            "already replayed"
        );
        let queued = spool.peek("a", 10).await.unwrap();
        assert_eq!(ids(&queued), ["a0", "a1", "a2"]);
        assert!(queued
            .iter()
            .all(|e| e.record.conversion.event_id == "o9d2h"));
        assert_eq!(spool.dead_letter_counts().unwrap(), (5, 0));

        // Delete: only the named account's letters go.
        let all_a: Vec<u64> = spool
            .dead_letters(&page(Some("a"), 0, 100))
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(spool.delete_dead_letters("b", &all_a).await.unwrap(), 0);
        assert_eq!(spool.delete_dead_letters("a", &all_a).await.unwrap(), 3);
        assert_eq!(spool.dead_letters(&page(None, 0, 100)).unwrap().len(), 2);
        spool.close().await.unwrap();

        // All of it survives a restart.
        let spool = DiskSpool::open(o).unwrap();
        assert_eq!(spool.backlog("a"), 3);
        assert_eq!(spool.dead_letter_counts().unwrap(), (2, 0));
        spool.close().await.unwrap();
    }

    #[tokio::test]
    async fn expired_dedup_entries_are_purged() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.dedup_window = Duration::from_millis(1);
        let spool = DiskSpool::open(o).unwrap();
        let mut old = record("a", "x");
        old.received_at_ms -= 10_000;
        spool.append(vec![old]).await.unwrap();
        let w = spool.peek("a", 1).await.unwrap();
        spool.ack("a", &[w[0].id]).await.unwrap();
        // The ack's commit purged the key; the same event is new again.
        assert_eq!(
            spool.append(vec![record("a", "x")]).await.unwrap(),
            [Admission::Queued]
        );
    }
}
