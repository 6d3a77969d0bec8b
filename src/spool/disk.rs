//! The embedded, durable spool: one redb file and one intake log under `spool.dir`.
//!
//! One storage thread owns every write. Appends are group-committed to the intake log (`intake_log`): the
//! thread drains whatever is queued, checks each event against the dedup index, writes the new ones as one
//! frame (`O_DSYNC`), then answers them all. It moves logged events into redb in one transaction at the
//! latest 25 ms later, or with the next other write (ack, dead letter, limiter save), which it also commits
//! (fsync) before answering; after such a commit the log may start over.
//! Invariants: an `append` is answered `Ok` only once its events are on disk (in the log); a logged event
//! is in exactly one of `pending` (memory, backed by the log) and redb's `events` table, and readers see
//! both as one queue (ids in redb are below every pending id of the same account); the log is reset only
//! when nothing is pending; at start-up, logged events with ids above redb's last one are put into redb
//! before anything else. An event leaves the `events` table only through `ack` (X accepted it) or
//! `dead_letter` (moved to `dead_letters` in the same transaction); the dedup log and the limiter state are
//! committed in the same transactions as the events they guard.
//! The dedup log is appended in time order; its fingerprints live in memory (`dedup::FingerprintTable`),
//! rebuilt from the log at start-up, and every fingerprint match is confirmed against the full key.
//! Counters (per account events and bytes) live in the `meta` table, so start-up never scans the spool.
//! When the disk fails or fills, the failed write is undone whole (a frame is left behind the log's next
//! epoch, a transaction is rolled back), callers get an error, and the thread reopens the database (redb
//! refuses further writes after an I/O error) until writes succeed. Events already logged stay pending.

use super::codec;
use super::dedup::{full_seq, FingerprintTable};
use super::{Admission, DeadLetter, DeadLetterQuery, Entry, Record, Spool, SpoolError};

use crate::limiter::{LimiterState, Nanos};
use crate::reasons::DeadLetterReason;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::intake_log::{IntakeLog, IntakeRecord};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

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

type AppendReply = oneshot::Sender<Result<Vec<Admission>, SpoolError>>;

enum Cmd {
    Append {
        records: Vec<Prepared>,
        reply: AppendReply,
    },
    Write(Op),
    /// Finish what is queued before it, close the file, stop the thread.
    Close {
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// What changes the redb file directly, in the storage thread's next transaction.
enum Op {
    Ack {
        account: String,
        ids: Vec<u64>,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    DeadLetter {
        account: String,
        ids: Vec<u64>,
        reason: DeadLetterReason,
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
    tx: std_mpsc::Sender<Cmd>,
    shared: Arc<Mutex<Shared>>,
    pending: Arc<Mutex<Pending>>,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Unavailable(e.to_string())
}

/// The 32-byte key the dedup index keeps for a record: SHA-256 over its account, event id and conversion id.
pub fn dedup_key(r: &Record) -> [u8; 32] {
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

/// The waiting events' counters and the limiter states, from the `meta` table.
fn load_counts(db: &Database, shared: &mut Shared) -> Result<(), SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
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
    Ok(())
}

/// The logged events that redb does not have (ids after its last one), counted, with the last id and dedup
/// log sequence they take.
struct Unapplied {
    events: Pending,
    effects: Effects,
    last_seq: u64,
    next_log: u64,
}

fn unapplied(db: &Database, logged: Vec<IntakeRecord>) -> Result<Unapplied, SpoolError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let meta_u64 = |name: &str| -> Result<u64, SpoolError> {
        Ok(meta.get(name).map_err(storage)?.map_or(0, |v| v.value()))
    };
    let seq = meta_u64("seq")?;
    let mut out = Unapplied {
        events: Pending::default(),
        effects: Effects::default(),
        last_seq: seq,
        next_log: meta_u64("dedup_next")?,
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
fn recover(db: &Database, shared: &Shared, missing: &Unapplied) -> Result<(), SpoolError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut tables = Tables::open(&txn)?;
        tables.put_logged(&missing.events)?;
        tables
            .meta
            .insert("seq", missing.last_seq)
            .map_err(storage)?;
        tables
            .meta
            .insert("dedup_next", missing.next_log)
            .map_err(storage)?;
        tables.store_counts(&shared.counts, &missing.effects)?;
    }
    txn.commit().map_err(storage)
}

/// The dedup fingerprints from the dedup log, and the last event id handed out.
fn load_dedup(db: &Database) -> Result<(DedupState, u64), SpoolError> {
    let mut dedup = DedupState::default();
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
    let meta_u64 = |name: &str| -> Result<u64, SpoolError> {
        Ok(meta.get(name).map_err(storage)?.map_or(0, |v| v.value()))
    };
    dedup.next = dedup.next.max(meta_u64("dedup_next")?);
    dedup.first = first.unwrap_or(dedup.next);
    Ok((dedup, meta_u64("seq")?))
}

impl DiskSpool {
    /// Opens (or creates) the spool under `opts.dir` and starts its storage thread. What was committed before
    /// is there again, and what the intake log holds beyond it is put into redb first; nothing is read into
    /// memory but the counters and the dedup fingerprints.
    pub fn open(opts: DiskSpoolOptions) -> Result<Arc<Self>, SpoolError> {
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", opts.dir.display())))?;
        let path = opts.dir.join("spool.redb");
        let db = open_db(&path, opts.cache_bytes)?;
        let mut shared = Shared::default();
        load_counts(&db, &mut shared)?;
        let log_path = opts.dir.join("intake.log");
        let (mut intake, logged) = IntakeLog::open(&log_path)
            .map_err(|e| storage(format!("cannot read {}: {e}", log_path.display())))?;
        let missing = unapplied(&db, logged)?;
        let (mut dedup, mut seq) = load_dedup(&db)?;
        let mut pending = Pending::default();
        if missing.events.len > 0 {
            let recovered = recover(&db, &shared, &missing);
            // Their dedup entries, as the log gave them: in redb now, or only in memory until it takes them.
            for queue in missing.events.events.values() {
                for e in queue.values() {
                    dedup.table.insert(fingerprint(&e.key), e.log_seq);
                    if recovered.is_err() {
                        dedup.unapplied.insert(e.log_seq, e.key);
                    }
                }
            }
            dedup.next = dedup.next.max(missing.next_log);
            seq = seq.max(missing.last_seq);
            match recovered {
                Ok(()) => tracing::warn!(
                    events = missing.events.len,
                    "the spool was not closed cleanly; events of the intake log put into the spool file"
                ),
                // A full disk, say: they stay in the log and in memory, and go into redb once it takes writes.
                Err(e) => {
                    tracing::error!(
                        events = missing.events.len,
                        error = %e,
                        "cannot put the intake log's events into the spool file yet; they stay pending"
                    );
                    pending = missing.events;
                }
            }
            for (account, (de, db)) in &missing.effects.counts {
                let c = shared.counts.entry(account.clone()).or_default();
                c.events += *de as u64;
                c.bytes += *db as u64;
                shared.total_bytes += *db as u64;
            }
        }
        if pending.len == 0 {
            // Everything logged is in redb; the log may start over. (If it cannot, it refuses frames until a
            // later reset succeeds: the first append tries again.)
            if let Err(e) = intake.reset() {
                tracing::warn!(error = %e, "cannot reset the intake log at start-up");
            }
        }
        let db = Arc::new(Handle {
            db: RwLock::new(Some(Arc::new(db))),
            path: path.clone(),
            cache_bytes: opts.cache_bytes,
        });
        let shared = Arc::new(Mutex::new(shared));
        let pending = Arc::new(Mutex::new(pending));
        let (tx, rx) = std_mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            pending: pending.clone(),
            opts,
            dedup,
            intake,
            seq,
            disk_low: Default::default(),
            apply_not_before: Instant::now(),
        };
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| storage(format!("cannot start the storage thread: {e}")))?;
        Ok(Arc::new(DiskSpool {
            db,
            tx,
            shared,
            pending,
        }))
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
        let pending = self.pending.clone();
        async move {
            let db = db?;
            tokio::task::spawn_blocking(move || -> Result<Vec<Entry>, SpoolError> {
                // One view: the storage thread moves pending events into redb under this lock.
                let (txn, logged) = {
                    let p = lock_pending(&pending);
                    let txn = db.begin_read().map_err(storage)?;
                    let logged: Vec<(u64, Vec<u8>)> = p
                        .after(&account, after)
                        .take(max)
                        .map(|(id, e)| (*id, e.bytes.clone()))
                        .collect();
                    (txn, logged)
                };
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
                // Every id in redb is below every pending id of the same account.
                for (id, bytes) in logged.into_iter().take(max - out.len()) {
                    out.push(Entry {
                        id,
                        record: codec::decode(&account, &bytes).map_err(storage)?,
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
            self.call(|reply| {
                Cmd::Write(Op::Ack {
                    account: account.to_owned(),
                    ids: ids.to_vec(),
                    reply,
                })
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
        reason: DeadLetterReason,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        async move {
            self.call(|reply| {
                Cmd::Write(Op::DeadLetter {
                    account: account.to_owned(),
                    ids: ids.to_vec(),
                    reason,
                    message: message.to_owned(),
                    reply,
                })
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
            self.call(|reply| {
                Cmd::Write(Op::Replay {
                    account: account.to_owned(),
                    letters,
                    reply,
                })
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
            self.call(|reply| {
                Cmd::Write(Op::DeleteDead {
                    account: account.to_owned(),
                    ids: ids.to_vec(),
                    reply,
                })
            })
            .await
        }
        .boxed()
    }

    fn oldest(&self, account: &str) -> Result<Option<i64>, SpoolError> {
        let db = self.current_db()?;
        let (txn, logged) = {
            let p = lock_pending(&self.pending);
            let txn = db.begin_read().map_err(storage)?;
            let logged = p.after(account, 0).next().map(|(_, e)| e.received_at_ms);
            (txn, logged)
        };
        let table = txn.open_table(EVENTS).map_err(storage)?;
        let first = table
            .range((account, 0)..=(account, u64::MAX))
            .map_err(storage)?
            .next();
        match first {
            None => Ok(logged),
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
            self.call(|reply| {
                Cmd::Write(Op::SaveTat {
                    key: key.to_owned(),
                    tat,
                    reply,
                })
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
    pending: Arc<Mutex<Pending>>,
    opts: DiskSpoolOptions,
    dedup: DedupState,
    intake: IntakeLog,
    /// The last event id handed out (ids increase across accounts).
    seq: u64,
    /// The last free-space reading: (when, whether below `min_free_bytes`).
    disk_low: std::cell::Cell<Option<(Instant, bool)>>,
    /// After a failed transaction, logged events wait this long before the next try (ops still try at once).
    apply_not_before: Instant,
}

/// How long a free-space reading is trusted. Reading it costs a syscall, and every group needed two;
/// `min_free_bytes` is the margin for what is written in between (and ENOSPC is handled anyway).
const FREE_SPACE_FRESH: Duration = Duration::from_millis(50);

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

/// Events in the intake log but not yet in redb, by account and id. Readers see them as queued.
#[derive(Default)]
struct Pending {
    events: HashMap<String, BTreeMap<u64, PendingEvent>>,
    len: usize,
    /// When the oldest of them was logged.
    since: Option<Instant>,
}

struct PendingEvent {
    log_seq: u64,
    key: [u8; 32],
    received_at_ms: i64,
    bytes: Vec<u8>,
}

impl Pending {
    fn insert(&mut self, r: IntakeRecord) {
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
    fn after(&self, account: &str, after: u64) -> impl Iterator<Item = (&u64, &PendingEvent)> {
        self.events
            .get(account)
            .into_iter()
            .flat_map(move |q| q.range(after.saturating_add(1)..))
    }

    fn clear(&mut self) {
        self.events.clear();
        self.len = 0;
        self.since = None;
    }
}

fn lock_pending(m: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The live range of the dedup log and the fingerprints of its entries.
#[derive(Default)]
struct DedupState {
    table: FingerprintTable,
    /// First live sequence (equal to `next` when the log is empty).
    first: u64,
    next: u64,
    /// Full keys of the entries still only in the intake log.
    unapplied: HashMap<u64, [u8; 32]>,
}

impl DedupState {
    /// Whether `key` is in the dedup log: a fingerprint match confirmed by the full key, from memory for
    /// entries not yet in redb, from `durable` for the others.
    fn seen(
        &self,
        key: &[u8; 32],
        durable: &mut impl FnMut(u64) -> Result<Option<[u8; 32]>, SpoolError>,
    ) -> Result<bool, SpoolError> {
        let Some(last) = self.next.checked_sub(1) else {
            return Ok(false);
        };
        for low in self.table.candidates(fingerprint(key)) {
            let Some(seq) = full_seq(low, self.first, last) else {
                continue;
            };
            let full = match self.unapplied.get(&seq) {
                Some(k) => Some(*k),
                None => durable(seq)?,
            };
            if full.as_ref() == Some(key) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Dedup log entries removed by a transaction, dropped from memory once it committed.
#[derive(Default)]
struct DedupChanges {
    purged: Vec<(u64, u64)>,
}

fn fingerprint(entry: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&entry[..8]);
    u64::from_le_bytes(b)
}

/// A dedup log entry: the 32-byte key, then the received time (epoch ms, little endian).
fn log_entry(key: &[u8; 32], received_at_ms: i64) -> [u8; 40] {
    let mut entry = [0u8; 40];
    entry[..32].copy_from_slice(key);
    entry[32..].copy_from_slice(&(received_at_ms.max(0) as u64).to_le_bytes());
    entry
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

    /// A new event of `account`, `bytes` long: counted, and its dispatcher woken.
    fn queued(&mut self, account: &str, bytes: usize) {
        if !self.appended.iter().any(|a| a == account) {
            self.appended.push(account.to_owned());
        }
        self.count(account, 1, bytes as i64);
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
    fn run(mut self, rx: std_mpsc::Receiver<Cmd>) {
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
            let close = cmds.iter().position(|c| matches!(c, Cmd::Close { .. }));
            let Some(at) = close else {
                self.commit_group(cmds);
                continue;
            };
            let rest = cmds.split_off(at);
            self.commit_group(cmds);
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
            return;
        }
    }

    /// How long until the logged events are due in redb, if any are waiting.
    fn apply_due_in(&self) -> Option<Duration> {
        let since = lock_pending(&self.pending).since?;
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
            }
        }
        if !appends.is_empty() {
            self.log_appends(appends);
        }
        let due = {
            let p = lock_pending(&self.pending);
            (p.len >= APPLY_EVENTS || p.since.is_some_and(|t| t.elapsed() >= APPLY_AFTER))
                && Instant::now() >= self.apply_not_before
        };
        if !ops.is_empty() || due {
            self.apply(ops);
        }
    }

    /// Appends: dedup-checked, written to the intake log as one frame and synced, then answered. They go
    /// into redb with the next `apply`; until then readers find them in `pending`.
    fn log_appends(&mut self, appends: Vec<(Vec<Prepared>, AppendReply)>) {
        let waiting = lock_pending(&self.pending).len;
        if (self.intake.is_broken() || waiting >= MAX_PENDING)
            && Instant::now() >= self.apply_not_before
        {
            // Only a commit to redb makes room (and lets the log start over after a failure).
            self.apply(Vec::new());
        }
        let refused = if self.intake.is_broken() {
            Some("the intake log could not be written and redb cannot take its events yet")
        } else if lock_pending(&self.pending).len >= MAX_PENDING {
            Some("events are not moving into the spool file; writes to it fail")
        } else {
            None
        };
        if let Some(why) = refused {
            let e = SpoolError::Unavailable(why.into());
            for (_, reply) in appends {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
        let mut room = self.room();
        let mut logged: Vec<IntakeRecord> = Vec::new();
        let mut effects = Effects::default();
        let mut replies = Vec::with_capacity(appends.len());
        let mut read: Option<redb::ReadOnlyTable<u64, &'static [u8]>> = None;
        let db = self.db.get();
        let mut durable = |seq: u64| -> Result<Option<[u8; 32]>, SpoolError> {
            if read.is_none() {
                let db = db.as_ref().map_err(Clone::clone)?;
                let txn = db.begin_read().map_err(storage)?;
                read = Some(txn.open_table(DEDUP_LOG).map_err(storage)?);
            }
            let Some(table) = read.as_ref() else {
                return Ok(None);
            };
            Ok(table
                .get(seq)
                .map_err(storage)?
                .and_then(|v| v.value().get(..32)?.try_into().ok()))
        };
        let mut failed = None;
        for (records, reply) in appends {
            if let Err(why) = room.take(records.iter().map(|p| p.bytes.len() as u64).sum()) {
                replies.push(Reply::Append(reply, Err(why)));
                continue;
            }
            let mut admissions = Vec::with_capacity(records.len());
            for p in records {
                match self.dedup.seen(&p.key, &mut durable) {
                    Ok(true) => {
                        admissions.push(Admission::Duplicate);
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failed.get_or_insert(e);
                        break;
                    }
                }
                let log_seq = self.dedup.next;
                self.dedup.next += 1;
                self.dedup.table.insert(fingerprint(&p.key), log_seq);
                self.dedup.unapplied.insert(log_seq, p.key);
                self.seq += 1;
                effects.queued(&p.account, p.bytes.len());
                logged.push(IntakeRecord {
                    seq: self.seq,
                    log_seq,
                    received_at_ms: p.received_at_ms,
                    key: p.key,
                    account: p.account,
                    bytes: p.bytes,
                });
                admissions.push(Admission::Queued);
            }
            replies.push(Reply::Append(reply, Ok(admissions)));
        }
        let failed = match failed {
            Some(e) => Some(e),
            None if logged.is_empty() => None,
            None => self.intake.append(&logged).err().map(|e| {
                storage(format!(
                    "cannot write the intake log under {}: {e}",
                    self.opts.dir.display()
                ))
            }),
        };
        if let Some(e) = failed {
            // Not accepted: forget their keys, so that the caller's retry is not taken for a duplicate.
            // (Ids and log sequences handed out stay unused; a gap is harmless.)
            for r in &logged {
                self.dedup.table.remove(fingerprint(&r.key), r.log_seq);
                self.dedup.unapplied.remove(&r.log_seq);
            }
            self.failed(&e);
            replies.into_iter().for_each(|r| r.send(Some(&e)));
            return;
        }
        {
            let mut p = lock_pending(&self.pending);
            for r in logged {
                p.insert(r);
            }
        }
        self.publish(&effects);
        replies.into_iter().for_each(|r| r.send(None));
    }

    /// One redb transaction: the logged events first, then `ops`, then the dedup purge and the counters.
    /// Committed (fsync) before anyone is answered; after it the intake log may start over.
    fn apply(&mut self, ops: Vec<Op>) {
        if ops.is_empty() && !self.intake.is_broken() && lock_pending(&self.pending).len == 0 {
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
        let mut room = self.room();
        let mut replies = Vec::with_capacity(ops.len());
        let mut effects = Effects::default();
        let mut changes = DedupChanges::default();
        let mut pending = lock_pending(&self.pending);
        let outcome = (|| -> Result<(), SpoolError> {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut tables = Tables::open(&txn)?;
                tables.put_logged(&pending)?;
                // Their counts are in memory already (since they were logged); this stores them.
                for account in pending.events.keys() {
                    effects.count(account, 0, 0);
                }
                for op in ops {
                    match op {
                        Op::Ack {
                            account,
                            ids,
                            reply,
                        } => {
                            tables.remove(&account, &ids, None, &mut effects)?;
                            replies.push(Reply::Unit(reply, Ok(())));
                        }
                        Op::DeadLetter {
                            account,
                            ids,
                            reason,
                            message,
                            reply,
                        } => {
                            tables.remove(
                                &account,
                                &ids,
                                Some((reason, &message)),
                                &mut effects,
                            )?;
                            tables.evict_dead(self.opts.max_dead_letters)?;
                            replies.push(Reply::Unit(reply, Ok(())));
                        }
                        Op::Replay {
                            account,
                            letters,
                            reply,
                        } => {
                            let result = tables.replay(
                                &account,
                                letters,
                                &mut self.seq,
                                &mut room,
                                &mut effects,
                            )?;
                            replies.push(Reply::Count(reply, result));
                        }
                        Op::DeleteDead {
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
                        Op::SaveTat { key, tat, reply } => {
                            tables
                                .meta
                                .insert(format!("tat:{key}").as_str(), tat)
                                .map_err(storage)?;
                            effects.tats.push((key, tat));
                            replies.push(Reply::Unit(reply, Ok(())));
                        }
                    }
                }
                tables.meta.insert("seq", self.seq).map_err(storage)?;
                tables
                    .meta
                    .insert("dedup_next", self.dedup.next)
                    .map_err(storage)?;
                tables.purge_dedup(
                    &self.dedup,
                    &mut changes,
                    now_ms() - self.opts.dedup_window.as_millis() as i64,
                )?;
                tables.store_counts(&lock(&self.shared).counts, &effects)?;
            }
            txn.commit().map_err(storage)
        })();
        if let Err(e) = outcome {
            // The logged events stay pending (and in the log). Ids a failed replay took stay unused.
            drop(pending);
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
        pending.clear();
        drop(pending);
        self.dedup.unapplied.clear();
        for (fp, seq) in &changes.purged {
            self.dedup.table.remove(*fp, *seq);
            self.dedup.first = self.dedup.first.max(seq + 1);
        }
        // Everything logged is in redb now, durably.
        if self.intake.is_broken() || self.intake.len() >= LOG_RESET_AT {
            if let Err(e) = self.intake.reset() {
                tracing::error!(error = %e, "cannot reset the intake log; appends wait until it can be");
            }
        }
        self.publish(&effects);
        replies.into_iter().for_each(|r| r.send(None));
    }

    /// Applies what a write did to the in-memory counters and readiness, and wakes the dispatchers.
    fn publish(&self, effects: &Effects) {
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
    }

    /// A write failed: ingest is told (readiness), and, as most write failures are a full disk, appends only
    /// refill what acks empty from here on.
    fn failed(&self, e: &SpoolError) {
        tracing::error!(error = %e, "spool write failed; nothing of this group was kept");
        let mut s = lock(&self.shared);
        s.unhealthy = Some(e.to_string());
        let total = s.total_bytes;
        s.low_water.get_or_insert(total);
    }

    /// Whether the file system under the spool has less than `min_free_bytes` free (a recent reading).
    fn disk_low(&self) -> bool {
        let now = Instant::now();
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
            Cmd::Write(op) => op.fail(e),
            Cmd::Close { reply } => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

impl Op {
    fn fail(self, e: &SpoolError) {
        match self {
            Op::Replay { reply, .. } | Op::DeleteDead { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            Op::Ack { reply, .. } | Op::DeadLetter { reply, .. } | Op::SaveTat { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

struct Tables<'t> {
    events: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    log: redb::Table<'t, u64, &'static [u8]>,
    dead: redb::Table<'t, u64, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, SpoolError> {
        Ok(Tables {
            events: txn.open_table(EVENTS).map_err(storage)?,
            log: txn.open_table(DEDUP_LOG).map_err(storage)?,
            dead: txn.open_table(DEAD).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
        })
    }

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
    fn put_logged(&mut self, logged: &Pending) -> Result<(), SpoolError> {
        for (account, queue) in &logged.events {
            for (seq, e) in queue {
                self.events
                    .insert((account.as_str(), *seq), e.bytes.as_slice())
                    .map_err(storage)?;
                self.log
                    .insert(e.log_seq, log_entry(&e.key, e.received_at_ms).as_slice())
                    .map_err(storage)?;
            }
        }
        Ok(())
    }

    /// Removes events; with `dead = Some((reason, message))` they move to the dead letters.
    fn remove(
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
                let record = codec::decode(account, &value).map_err(storage)?;
                let id = self.next("dead_seq")?;
                let letter = DeadLetter {
                    id,
                    account: account.to_owned(),
                    reason,
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
        seq: &mut u64,
        room: &mut Room,
        fx: &mut Effects,
    ) -> Result<Result<usize, SpoolError>, SpoolError> {
        if let Err(why) = room.take(letters.iter().map(|(_, b)| b.len() as u64).sum()) {
            return Ok(Err(why));
        }
        let mut moved = 0;
        for (id, bytes) in letters {
            if self.take_dead(account, id)?.is_none() {
                continue;
            }
            *seq += 1;
            self.queue(account, *seq, &bytes, fx)?;
            moved += 1;
        }
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

    /// Removes log entries older than the window, oldest first, a bounded number per transaction.
    fn purge_dedup(
        &mut self,
        dedup: &DedupState,
        changes: &mut DedupChanges,
        horizon_ms: i64,
    ) -> Result<(), SpoolError> {
        let horizon = horizon_ms.max(0) as u64;
        let mut expired = Vec::new();
        for item in self
            .log
            .range(dedup.first..)
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
            changes.purged.push((fp, seq));
        }
        Ok(())
    }

    /// Stores the counters of the accounts `fx` touched: `base` (what memory holds) changed by `fx`.
    fn store_counts(
        &mut self,
        base: &HashMap<String, Count>,
        fx: &Effects,
    ) -> Result<(), SpoolError> {
        for (account, (de, db)) in &fx.counts {
            let c = base.get(account).copied().unwrap_or_default();
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

    /// What the storage thread logs but has not yet put into redb when the process dies (kill -9 is tested
    /// end to end in tests/delivery.rs; here the log is written by hand to know exactly what is in it).
    #[tokio::test]
    async fn an_unclean_stop_loses_nothing_the_intake_log_holds_and_recovers_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        spool.append(vec![record("a", "1")]).await.unwrap();
        spool.close().await.unwrap();
        drop(spool);
        let bytes_before = {
            let spool = DiskSpool::open(opts(dir.path())).unwrap();
            let b = spool.bytes();
            spool.close().await.unwrap();
            b
        };

        // The process died after logging three events: the first was in redb already (a crash between the
        // commit and the log's reset), the other two only in the log.
        let logged = |seq: u64, log_seq: u64, r: Record| IntakeRecord {
            seq,
            log_seq,
            received_at_ms: r.received_at_ms,
            key: dedup_key(&r),
            account: r.account.clone(),
            bytes: codec::encode(&r).unwrap(),
        };
        let extra: Vec<IntakeRecord> = vec![
            logged(1, 0, record("a", "1")),
            logged(2, 1, record("a", "2")),
            logged(3, 2, record("b", "3")),
        ];
        let (mut log, _) = IntakeLog::open(&dir.path().join("intake.log")).unwrap();
        log.append(&extra).unwrap();
        drop(log);

        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        assert_eq!((spool.backlog("a"), spool.backlog("b")), (2, 1));
        assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["1", "2"]);
        let added: u64 = extra[1..].iter().map(|r| r.bytes.len() as u64).sum();
        assert_eq!(spool.bytes(), bytes_before + added);
        // The dedup index knows the recovered events; new ones get ids after theirs.
        assert_eq!(
            spool
                .append(vec![record("a", "2"), record("b", "3"), record("a", "4")])
                .await
                .unwrap(),
            [
                Admission::Duplicate,
                Admission::Duplicate,
                Admission::Queued
            ]
        );
        let waiting = spool.peek("a", 10).await.unwrap();
        assert_eq!(ids(&waiting), ["1", "2", "4"]);
        assert!(waiting[2].id > 3);
        spool.close().await.unwrap();
        drop(spool);

        // Recovered once: the log starts over after it, so a second start adds nothing.
        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        assert_eq!((spool.backlog("a"), spool.backlog("b")), (3, 1));
        assert_eq!(ids(&spool.peek("b", 10).await.unwrap()), ["3"]);
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
                DeadLetterReason::Rejected,
                "hashed_email (abc) is not a valid SHA-256 hash",
            )
            .await
            .unwrap();
        spool
            .dead_letter(
                "a",
                &all[1..],
                DeadLetterReason::Expired,
                "older than max_event_age",
            )
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
            .all(|d| d.reason == DeadLetterReason::Expired && d.account == "a"));
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
                .dead_letter(account, &ids, DeadLetterReason::Rejected, "unknown event")
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
