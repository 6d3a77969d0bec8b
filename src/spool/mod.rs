//! Where accepted events wait until X has them.
//!
//! The `Spool` trait is the seam between ingest and dispatch: ingest appends mapped, hashed records and
//! learns which were duplicates; each account's dispatcher peeks at its oldest events and acks them once
//! X accepted them. Invariants every implementation keeps: an event leaves the spool only through `ack`;
//! `peek` returns an account's events in the order they were appended; a record whose
//! `(account, event_id, conversion_id)` was appended within the dedup window is reported `Duplicate` and
//! not queued again. No raw email or phone ever reaches a spool: records hold hashes only.

pub mod codec;
pub mod dedup;
pub mod disk;
pub mod memory;

pub use disk::{DiskSpool, DiskSpoolOptions};
pub use memory::MemorySpool;

use crate::conversion::Conversion;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::Notify;

/// One accepted event, already mapped to its X form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub account: String,
    pub conversion: Conversion,
    /// When the gateway accepted it (epoch milliseconds).
    pub received_at_ms: i64,
}

impl Record {
    /// The key X deduplicates on, scoped to the account.
    pub fn dedup_key(&self) -> (String, String, String) {
        (
            self.account.clone(),
            self.conversion.event_id.clone(),
            self.conversion.conversion_id.clone(),
        )
    }
}

/// An event X refused for good, or that grew too old to send, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub account: String,
    /// A fixed label: `rejected` (X answered 400 for this conversion alone), `not_found`, `expired`.
    pub reason: String,
    /// X's message, or what else explains the reason.
    pub message: String,
    pub dead_lettered_at_ms: i64,
    pub conversion: Conversion,
    pub received_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Queued,
    Duplicate,
}

/// A waiting record and its position in the account's queue.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: u64,
    pub record: Record,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolError {
    /// No room left; the caller should retry later.
    Full,
    /// The store failed (disk error); nothing of this call was kept.
    Unavailable(String),
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Full => f.write_str("the spool is full"),
            SpoolError::Unavailable(why) => write!(f, "the spool is unavailable: {why}"),
        }
    }
}

impl std::error::Error for SpoolError {}

pub trait Spool: Send + Sync + 'static {
    /// Keeps `records` and answers, in the same order, whether each was queued or a duplicate. When it
    /// returns `Ok`, every queued record is kept (durably, for a durable implementation).
    fn append(&self, records: Vec<Record>) -> BoxFuture<'_, Result<Vec<Admission>, SpoolError>>;

    /// Up to `max` of the oldest waiting records of `account`, oldest first; nothing is removed.
    fn peek<'a>(
        &'a self,
        account: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, SpoolError>> {
        self.peek_after(account, 0, max)
    }

    /// Like `peek`, skipping records with ids up to `after` (those a dispatcher has in hand already).
    fn peek_after<'a>(
        &'a self,
        account: &'a str,
        after: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, SpoolError>>;

    /// Removes the given records of `account` (delivered, or moved to dead letters).
    fn ack<'a>(&'a self, account: &'a str, ids: &'a [u64])
        -> BoxFuture<'a, Result<(), SpoolError>>;

    /// How many records of `account` are waiting.
    fn backlog(&self, account: &str) -> usize;

    /// Signalled whenever records are appended for `account` (one permit is stored if nobody waits).
    fn changed(&self, account: &str) -> Arc<Notify>;

    /// Moves the given records of `account` to the dead letters, with the reason and message.
    fn dead_letter<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
        reason: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>>;

    /// The most recent dead letters, oldest first (at most `limit`).
    fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError>;

    /// Bytes of waiting records.
    fn bytes(&self) -> u64;

    /// `Err(why)` while the spool cannot take events (full, disk failing).
    fn health(&self) -> Result<(), String>;
}
