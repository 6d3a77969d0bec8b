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
pub mod intake_log;
pub mod memory;

pub use disk::{DiskSpool, DiskSpoolOptions};
pub use memory::MemorySpool;

use crate::conversion::{Conversion, Rules};
use crate::reasons::DeadLetterReason;
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
    /// The caller's event name when the SET id was mapped from it (see `Judgement::Accepted`).
    #[serde(default)]
    pub event_name: Option<String>,
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
    pub reason: DeadLetterReason,
    /// X's message, or what else explains the reason.
    pub message: String,
    pub dead_lettered_at_ms: i64,
    pub conversion: Conversion,
    pub received_at_ms: i64,
    #[serde(default)]
    pub event_name: Option<String>,
}

impl DeadLetter {
    /// The record to queue again on replay: when the caller named the event and the account still maps
    /// that name, the SET id comes from today's mapping (the fix a replay usually follows).
    pub fn remapped(&self, rules: &Rules) -> Record {
        let mut conversion = self.conversion.clone();
        if let Some(set) = self
            .event_name
            .as_deref()
            .and_then(|name| rules.accounts.get(&self.account)?.event_set(name))
        {
            conversion.event_id = set.clone();
        }
        Record {
            account: self.account.clone(),
            conversion,
            received_at_ms: self.received_at_ms,
            event_name: self.event_name.clone(),
        }
    }
}

/// Which dead letters to list: of one account or all, after a cursor (an id), at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub account: Option<String>,
    pub after: u64,
    pub limit: usize,
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
        reason: DeadLetterReason,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>>;

    /// Dead letters with ids above `q.after`, oldest first, at most `q.limit`, of `q.account` or all.
    fn dead_letters(&self, q: &DeadLetterQuery) -> Result<Vec<DeadLetter>, SpoolError>;

    /// Dead letters kept, and how many were evicted to stay within the bound since the spool was made.
    fn dead_letter_counts(&self) -> Result<(u64, u64), SpoolError>;

    /// Moves dead letters back to their account's queue, each as the given record (mapped again by the
    /// caller), in one transaction; ids no longer among the dead letters are skipped. Answers how many
    /// moved. Replayed records bypass the ingest dedup index: a replay is a deliberate resend.
    fn replay<'a>(
        &'a self,
        account: &'a str,
        letters: Vec<(u64, Record)>,
    ) -> BoxFuture<'a, Result<usize, SpoolError>>;

    /// Deletes the given dead letters of `account`; answers how many there were.
    fn delete_dead_letters<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
    ) -> BoxFuture<'a, Result<usize, SpoolError>>;

    /// When the oldest waiting record of `account` was accepted (epoch milliseconds).
    fn oldest(&self, account: &str) -> Result<Option<i64>, SpoolError>;

    /// Bytes of waiting records.
    fn bytes(&self) -> u64;

    /// Bytes of waiting records of `account`.
    fn account_bytes(&self, account: &str) -> u64;

    /// `Err(why)` while the spool cannot take events (full, disk failing).
    fn health(&self) -> Result<(), String>;
}
