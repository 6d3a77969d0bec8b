//! The embedded, durable spool: one redb file and one intake log under `spool.dir`.
//!
//! # Files on disk
//! - `spool.redb`: the queue, the dead letters, the dedup log and the counters (`schema`), an embedded
//!   crash-safe B-tree store with one writer and MVCC readers.
//! - `intake.log`: appends made durable cheaply, one CRC-checked frame per group written in place with
//!   `O_DSYNC` (`intake_log`), until they move into redb.
//!
//! # Layout
//! | file | holds |
//! |---|---|
//! | `schema` | table definitions, `meta` keys, the checked dedup entry encoding |
//! | `handle` | the database handle, opened and reopened after a failure |
//! | `recovery` | start-up: counters, dedup fingerprints, intake log events redb lacks |
//! | `protocol` | the commands the storage thread takes and how it answers |
//! | `writer` | the storage thread: group commit, intake log, transactions |
//! | `tables` | the writes of one transaction, table by table |
//! | `pending` | logged events not yet in redb, and why readers never wait for a commit |
//! | `dedup_state`, `fingerprints` | the dedup index: in-memory fingerprints over the durable log |
//! | `admission` | the byte bound and the free-space floor |
//! | `counters` | per-account counters, readiness, wake-ups |
//! | `reader` | reads on the blocking pool |
//! | `limiter_store` | the limiter's state in the same file, as its own seam |
//!
//! # Invariants
//! - An `append` is answered `Ok` only once its events are on disk (in the intake log). A logged event is
//!   in `pending` (memory, backed by the log) or in redb's `events` table; readers see both as one queue;
//!   ids in redb are below every pending id of the same account. The log is reset only when nothing is
//!   pending; at start-up, logged events with ids above redb's last one go into redb before anything else.
//! - An event leaves `events` only through `ack` (X accepted it) or `dead_letter` (moved to `dead_letters`
//!   in the same transaction); the dedup log and the limiter state are committed in the same transactions
//!   as the events they guard. Counters live in `meta`, so start-up never scans the spool.
//! - One storage thread owns every write; readers never wait for it (they read a snapshot, off the
//!   runtime's workers).
//!
//! # Failure handling
//! - When the disk fails or fills, the failed write is undone whole (a frame is left behind the log's
//!   next epoch, a transaction is rolled back), callers get an error, readiness says why, and the thread
//!   reopens the database (redb refuses further writes after an I/O error) until writes succeed. Events
//!   already logged stay pending.
//! - A stored record that no longer decodes is reported apart by `peek_after` (the dispatcher moves it to
//!   the dead letters as `corrupt`); a stored value of the wrong length is an error naming its table.
//! - If the storage thread stops for any other reason (a bug: a panic), the spool refuses everything,
//!   readiness says so, and `fatal` resolves with the cause: the process exits and is restarted on what
//!   the files hold (crash-only).

mod admission;
mod counters;
mod dedup_state;
pub mod fingerprints;
mod handle;
pub mod intake_log;
mod limiter_store;
mod pending;
mod protocol;
mod reader;
mod recovery;
pub mod salvage;
mod schema;
mod tables;
#[cfg(test)]
mod tests;
mod writer;

pub use admission::{footprint_of_new, MIN_MAX_BYTES};
pub use limiter_store::DiskLimiterState;

use super::codec;
use super::{
    AccountBacklog, Admission, DeadLetter, DeadLetterCounts, DeadLetterQuery, DeadLetterStore,
    Peek, Queue, Record, SpoolError, SpoolStats,
};
use crate::limiter::LimiterState;
use crate::reasons::DeadLetterReason;
use admission::Bounds;
use counters::{lock, Shared};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use handle::{open_checked, Handle};
use intake_log::IntakeLog;
use protocol::{Cmd, Op, Prepared};
use reader::{blocking, Readers};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch, Notify};
use writer::Writer;

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

pub struct DiskSpool {
    readers: Readers,
    tx: std_mpsc::Sender<Cmd>,
    shared: Arc<Mutex<Shared>>,
    max_bytes: u64,
    /// `Some(cause)` once the storage thread stopped on its own.
    fatal: watch::Receiver<Option<String>>,
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Unavailable(e.to_string())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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

/// Sends a command to the storage thread and waits for its answer.
async fn call<T>(
    tx: &std_mpsc::Sender<Cmd>,
    make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Cmd,
) -> Result<T, SpoolError> {
    let (reply, rx) = oneshot::channel();
    tx.send(make(reply))
        .map_err(|_| storage("the storage thread stopped"))?;
    rx.await
        .map_err(|_| storage("the storage thread stopped"))?
}

impl DiskSpool {
    /// Opens (or creates) the spool under `opts.dir` and starts its storage thread. What was committed
    /// before is there again, and what the intake log holds beyond it is put into redb first; nothing is
    /// read into memory but the counters and the dedup fingerprints.
    pub fn open(opts: DiskSpoolOptions) -> Result<Arc<Self>, SpoolError> {
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| storage(format!("cannot create {}: {e}", opts.dir.display())))?;
        let path = opts.dir.join("spool.redb");
        let log_path = opts.dir.join("intake.log");
        // The log is judged before the database file is opened for writing: a refusal writes nothing.
        let unusable = |why: String| SpoolError::Unusable {
            file: log_path.clone(),
            why,
        };
        match std::fs::read(&log_path) {
            Ok(data) => {
                if let Some(why) = intake_log::inspect(&data).damage {
                    return Err(unusable(why));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(unusable(handle::PERMISSION_DENIED.into()))
            }
            Err(e) => return Err(storage(format!("cannot read {}: {e}", log_path.display()))),
        }
        let db = open_checked(&path, opts.cache_bytes)?;
        let mut shared = Shared::default();
        recovery::load_counts(&db, &mut shared)?;
        let (mut intake, logged) = IntakeLog::open(&log_path).map_err(|e| match e {
            intake_log::OpenError::Damaged(why) => SpoolError::Unusable {
                file: log_path.clone(),
                why,
            },
            intake_log::OpenError::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                SpoolError::Unusable {
                    file: log_path.clone(),
                    why: handle::PERMISSION_DENIED.into(),
                }
            }
            intake_log::OpenError::Io(e) => {
                storage(format!("cannot read {}: {e}", log_path.display()))
            }
        })?;
        let (mut dedup, mut seq) = recovery::load_dedup(&db)?;
        let pending = recovery::intake_log_events(&db, &mut shared, logged, &mut dedup, &mut seq)?;
        shared.dedup_entries = dedup.table.len() as u64;
        if pending.len == 0 {
            // Everything logged is in redb; the log may start over. (If it cannot, it refuses frames until
            // a later reset succeeds: the first append tries again.)
            if let Err(e) = intake.reset() {
                tracing::warn!(error = %e, "cannot reset the intake log at start-up");
            }
        }
        let db = Arc::new(Handle::new(db, path, opts.cache_bytes));
        let shared = Arc::new(Mutex::new(shared));
        let pending = Arc::new(RwLock::new(pending));
        let (tx, rx) = std_mpsc::channel();
        let admission = Bounds::new(opts.dir.clone(), opts.max_bytes, opts.min_free_bytes);
        // A spool reopened nearly full says so from the start.
        let refusing = admission.refusal(&mut lock(&shared));
        lock(&shared).unhealthy = refusing;
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            pending: pending.clone(),
            dir: opts.dir.clone(),
            admission,
            max_dead_letters: opts.max_dead_letters,
            dedup_window_ms: i64::try_from(opts.dedup_window.as_millis()).unwrap_or(i64::MAX),
            dedup,
            intake,
            seq,
            apply_not_before: Instant::now(),
            #[cfg(test)]
            hold_next_commit: None,
        };
        let (fatal_tx, fatal) = watch::channel(None);
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                let ran =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(&rx)));
                if let Err(panic) = ran {
                    let cause = panic_message(panic.as_ref());
                    let why = format!("the spool's storage thread stopped: {cause}");
                    tracing::error!(
                        cause,
                        "the spool's storage thread stopped; no event can be kept"
                    );
                    // `health` reads the cause from here first.
                    fatal_tx.send_replace(Some(why));
                }
                // Only now do callers' commands fail: readiness already says why.
                drop(rx);
            })
            .map_err(|e| storage(format!("cannot start the storage thread: {e}")))?;
        Ok(Arc::new(DiskSpool {
            readers: Readers { db, pending },
            tx,
            shared,
            max_bytes: opts.max_bytes,
            fatal,
        }))
    }

    /// Commits what is queued, closes the database file and stops the storage thread. Later calls fail.
    pub async fn close(&self) -> Result<(), SpoolError> {
        self.call(|reply| Cmd::Close { reply }).await
    }

    /// The limiter's state, kept in this spool's file.
    pub fn limiter_state(&self) -> Arc<dyn LimiterState> {
        Arc::new(DiskLimiterState {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        })
    }

    /// Stops the storage thread as a bug would (a panic), for tests of what follows: every call fails,
    /// `health` and `fatal` say why.
    #[doc(hidden)]
    pub fn crash_storage_thread(&self) {
        let _ = self.tx.send(Cmd::Crash);
    }

    /// Holds the storage thread's next transaction open before its commit until the answer's sender is
    /// dropped.
    #[cfg(test)]
    fn hold_next_commit(&self) -> std::sync::mpsc::SyncSender<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel(0);
        let _ = self.tx.send(Cmd::HoldNextCommit(rx));
        tx
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, SpoolError>>) -> Cmd,
    ) -> Result<T, SpoolError> {
        call(&self.tx, make).await
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

impl Queue for DiskSpool {
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
    ) -> BoxFuture<'a, Result<Peek, SpoolError>> {
        let r = self.readers.clone();
        let account = account.to_owned();
        blocking(move || reader::peek_after(&r.db, &r.pending, &account, after, max)).boxed()
    }

    fn ack<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        self.call(|reply| {
            Cmd::Write(Op::Ack {
                account: account.to_owned(),
                ids: ids.to_vec(),
                reply,
            })
        })
        .boxed()
    }

    fn backlog(&self, account: &str) -> usize {
        lock(&self.shared)
            .counts
            .get(account)
            .map_or(0, |c| c.events as usize)
    }

    fn changed(&self, account: &str) -> Arc<Notify> {
        lock(&self.shared).notifier(account)
    }
}

impl DeadLetterStore for DiskSpool {
    fn dead_letter<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
        reason: DeadLetterReason,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>> {
        self.call(move |reply| {
            Cmd::Write(Op::DeadLetter {
                account: account.to_owned(),
                ids: ids.to_vec(),
                reason,
                message: message.to_owned(),
                reply,
            })
        })
        .boxed()
    }

    fn dead_letters(
        &self,
        q: DeadLetterQuery,
    ) -> BoxFuture<'_, Result<Vec<DeadLetter>, SpoolError>> {
        let db = self.readers.db.clone();
        blocking(move || reader::dead_letters(&db, &q)).boxed()
    }

    fn dead_letter_counts(&self) -> BoxFuture<'_, Result<DeadLetterCounts, SpoolError>> {
        let db = self.readers.db.clone();
        blocking(move || reader::dead_letter_counts(&db)).boxed()
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
        self.call(|reply| {
            Cmd::Write(Op::DeleteDead {
                account: account.to_owned(),
                ids: ids.to_vec(),
                reply,
            })
        })
        .boxed()
    }
}

impl SpoolStats for DiskSpool {
    fn account_backlog<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<AccountBacklog, SpoolError>> {
        let count = lock(&self.shared)
            .counts
            .get(account)
            .copied()
            .unwrap_or_default();
        let r = self.readers.clone();
        let account = account.to_owned();
        async move {
            let oldest_ms = blocking(move || reader::oldest(&r.db, &r.pending, &account)).await?;
            Ok(AccountBacklog {
                events: count.events,
                bytes: count.bytes,
                oldest_ms,
            })
        }
        .boxed()
    }

    fn bytes(&self) -> u64 {
        lock(&self.shared).total_bytes
    }

    fn bound_usage(&self) -> super::BoundUsage {
        super::BoundUsage {
            used_bytes: lock(&self.shared).footprint(),
            max_bytes: self.max_bytes,
        }
    }

    fn account_bytes(&self, account: &str) -> u64 {
        lock(&self.shared)
            .counts
            .get(account)
            .map_or(0, |c| c.bytes)
    }

    fn health(&self) -> Result<(), String> {
        if let Some(why) = self.fatal.borrow().as_ref() {
            return Err(why.clone());
        }
        match &lock(&self.shared).unhealthy {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    fn stopped(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    fn fatal(&self) -> BoxFuture<'static, String> {
        let mut rx = self.fatal.clone();
        async move {
            let cause = rx
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|c| c.clone());
            match cause {
                Some(cause) => cause,
                // The thread ended cleanly (closed) without a cause: nothing fatal will come.
                None => std::future::pending().await,
            }
        }
        .boxed()
    }
}
