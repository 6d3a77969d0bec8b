//! The redb database handle, shared by the storage thread and the readers, and reopened after a failure
//! (redb refuses every write after an I/O error, so the thread closes it and opens it afresh).

use super::schema::{MetaKey, DEAD, DEDUP_LOG, EVENTS, FORMAT, META};
use super::storage;
use crate::spool::SpoolError;
use redb::{Database, ReadableDatabase};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Opens (or creates) the file and its tables.
pub(super) fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, SpoolError> {
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(storage)?;
    ensure_tables(&db)?;
    Ok(db)
}

/// Creates the tables of a new file; reopening an existing spool must not need to write (the disk may be full).
fn ensure_tables(db: &Database) -> Result<(), SpoolError> {
    if db.begin_read().map_err(storage)?.open_table(META).is_ok() {
        return Ok(());
    }
    let txn = db.begin_write().map_err(storage)?;
    txn.open_table(EVENTS).map_err(storage)?;
    txn.open_table(DEDUP_LOG).map_err(storage)?;
    txn.open_table(DEAD).map_err(storage)?;
    txn.open_table(META)
        .map_err(storage)?
        .insert(MetaKey::Format.name().as_str(), FORMAT)
        .map_err(storage)?;
    txn.commit().map_err(storage)
}

/// Opens the file at start-up and checks every page of it first (redb's integrity check, which also
/// repairs what an interrupted commit left). redb answers some damage with a panic when it reads the page,
/// so the check runs inside `catch_unwind`, quietly: a damaged file is `SpoolError::Unusable` naming it,
/// never a crash, and it is not written to.
pub(super) fn open_checked(path: &Path, cache_bytes: usize) -> Result<Database, SpoolError> {
    let unusable = |why: String| SpoolError::Unusable {
        file: path.to_path_buf(),
        why,
    };
    let existed = path.exists();
    // A file of a later format is refused before anything opens it for writing (which rewrites its header).
    if existed {
        let format = quiet_catch(|| -> Option<u64> {
            let db = Database::builder().open_read_only(path).ok()?;
            let txn = db.begin_read().ok()?;
            let meta = txn.open_table(META).ok()?;
            let v = meta.get(MetaKey::Format.name().as_str()).ok()?;
            v.map(|v| v.value())
        });
        if let Ok(Some(format)) = format {
            known_format(format).map_err(unusable)?;
        }
    }
    let opened = quiet_catch(|| -> Result<Database, redb::DatabaseError> {
        let mut db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?;
        if existed && !db.check_integrity()? {
            tracing::warn!(file = %path.display(), "the spool file was repaired by its integrity check");
        }
        Ok(db)
    });
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(unusable(describe(&e))),
        Err(panic) => {
            return Err(unusable(format!(
                "it is damaged (a page does not read back: {panic})"
            )))
        }
    };
    ensure_tables(&db)?;
    // Again on the open file: the read-only look above cannot open a file that needed repairing.
    let format = db
        .begin_read()
        .map_err(storage)?
        .open_table(META)
        .map_err(storage)?
        .get(MetaKey::Format.name().as_str())
        .map_err(storage)?
        .map_or(1, |v| v.value());
    known_format(format).map_err(unusable)?;
    Ok(db)
}

/// `Err(why)` for a file of a format this version does not read.
pub(super) fn known_format(format: u64) -> Result<(), String> {
    if format > FORMAT {
        return Err(format!(
            "it was written by a newer conversion-gateway (spool format {format}; this version reads format {FORMAT}): run that version again, or move the spool aside"
        ));
    }
    Ok(())
}

/// Why a spool file cannot be opened when the process may not read or write it.
pub(super) const PERMISSION_DENIED: &str = "this process may not read and write it (permission denied): give the gateway's user read and write access to spool.dir and its files";

fn describe(e: &redb::DatabaseError) -> String {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            "another process has it open: two gateways cannot share one spool.dir".into()
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            PERMISSION_DENIED.into()
        }
        redb::DatabaseError::UpgradeRequired(v) => {
            format!("its storage format {v} is older than this version reads")
        }
        other => format!("it is damaged ({other})"),
    }
}

/// Runs `f`, answering a panic as its message instead of printing it: a panic here is a finding about a
/// file, reported by the caller, not a bug of this thread.
pub(super) fn quiet_catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let me = std::thread::current().id();
    let previous: std::sync::Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
        std::panic::take_hook().into();
    let others = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != me {
            others(info)
        }
    }));
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let _ = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| previous(info)));
    ran.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into())
    })
}

/// `None` inside while the database is being reopened.
pub(super) struct Handle {
    db: RwLock<Option<Arc<Database>>>,
    path: PathBuf,
    cache_bytes: usize,
}

impl Handle {
    pub fn new(db: Database, path: PathBuf, cache_bytes: usize) -> Self {
        Handle {
            db: RwLock::new(Some(Arc::new(db))),
            path,
            cache_bytes,
        }
    }

    /// The open database, opening it again first if a failure closed it.
    pub fn get(&self) -> Result<Arc<Database>, SpoolError> {
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

    /// Closes the database. Readers hold a clone for the length of one read; the file lock goes with the
    /// last one, so this waits (at most two seconds) for them.
    pub fn close(&self) {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = guard.take() {
            for _ in 0..400 {
                if Arc::strong_count(&db) == 1 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}
