//! The redb database handle, shared by the storage thread and the readers, and reopened after a failure
//! (redb refuses every write after an I/O error, so the thread closes it and opens it afresh).

use super::schema::{DEAD, DEDUP_LOG, EVENTS, META};
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
