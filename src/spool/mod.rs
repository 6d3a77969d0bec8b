//! Where accepted events wait until X has them.
//!
//! # The seam
//! Three traits, one per kind of caller, and `Spool`, the three together (what the gateway holds):
//! - `Queue`: ingest appends mapped, hashed records and learns which were duplicates; each account's
//!   dispatcher peeks at its oldest events and acks them once X accepted them.
//! - `DeadLetterStore`: the dispatcher moves the events X refused for good there; the admin API lists,
//!   replays and deletes them.
//! - `SpoolStats`: what metrics, the admin API and readiness read.
//!
//! Every method that may touch a disk or a network is async (a durable implementation does its reads on
//! the blocking pool, never on a runtime worker). The synchronous ones (`backlog`, `changed`, `bytes`,
//! `account_bytes`, `health`) answer from memory the implementation keeps, and never wait for a write.
//!
//! # Contract
//! Every implementation keeps these; `conformance` checks each of them against every implementation.
//! - **Append** answers, in order, `Queued` or `Duplicate` for each record. `Ok` means every queued record
//!   is kept (on disk, for a durable implementation); `Err` means nothing of that call was kept. A call
//!   that would take the spool past its byte bound is refused whole with `Full`, and from then on every
//!   call is, and `health` says so, until that much is free again (`bound`: one decision for ingest,
//!   readiness and metrics). What counts against the bound is the implementation's to say, and must be
//!   what it really keeps: the memory spool counts its waiting records; the disk spool what its files
//!   take (waiting events, dead letters, dedup entries, page overhead: `disk::admission`).
//! - **Dedup**: a record is `Duplicate` when a record with the same `(account, event_id, conversion_id)`
//!   was queued earlier (in an earlier call or earlier in the same call) with a `received_at_ms` less than
//!   `dedup_window` before its own — whether that one is still waiting, delivered or dead-lettered. The
//!   clock is the records' `received_at_ms`, the same for every implementation.
//! - **Order**: an account's ids grow with every record queued for it (the embedded spools' grow across
//!   accounts too; a shared one's are unique only together with the account). `peek_after(account,
//!   after, max)` gives up to `max` of the account's waiting records with ids above `after`, oldest
//!   first, and removes nothing; records that no longer decode are reported apart
//!   (`Peek::undecodable`), never as an error of the whole peek. A shared spool hands each replica
//!   only what it may deliver (`redis`): the records it took, and records another replica left idle,
//!   which it gives first whatever `after`.
//! - **Leaving**: a record leaves the queue only through `ack` (X took it) or `dead_letter`. Ids that are
//!   not waiting are ignored; what is not named stays, in order.
//! - **Counts**: `backlog`, `bytes` and `account_bytes` are right after every operation that returned.
//! - **Wake-up**: `changed(account)` is notified after records of `account` are queued (append, replay).
//! - **Dead letters**: ids grow (per account) and are unique across accounts (every implementation's,
//!   the shared one's too); at most `max_dead_letters` are kept (a shared spool: per account), the
//!   oldest evicted first and counted; `dead_letters` pages by id (of one account or all); `replay` moves an account's letters back into its
//!   queue as the given records in one step (ids not among that account's letters are skipped; dedup is
//!   bypassed: a replay is a deliberate resend; `Full` moves nothing); `delete_dead_letters` removes the
//!   account's given letters.
//! - **Durability** (durable implementations): all of the above holds again after a clean close and
//!   reopen, and after the handle is dropped without a close.
//! - **No PII**: records hold hashes only; no raw email or phone ever reaches a spool.

pub mod bound;
pub mod codec;
#[cfg(test)]
mod conformance;
pub mod disk;
pub mod memory;
pub mod redis;

pub use self::redis::{RedisSpool, RedisSpoolOptions};
pub use disk::{DiskLimiterState, DiskSpool, DiskSpoolOptions};
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

/// An event X refused for good, that grew too old to send, or whose stored record no longer decodes,
/// kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub account: String,
    pub reason: DeadLetterReason,
    /// X's message, or what else explains the reason.
    pub message: String,
    pub dead_lettered_at_ms: i64,
    /// The conversion as it would go to X; `None` only for a `corrupt` record (it could not be read).
    pub conversion: Option<Conversion>,
    pub received_at_ms: i64,
    #[serde(default)]
    pub event_name: Option<String>,
    /// For a `corrupt` record: how many bytes were stored.
    #[serde(default)]
    pub raw_bytes: Option<u64>,
}

impl DeadLetter {
    /// The record to queue again on replay: when the caller named the event and the account still maps
    /// that name, the SET id comes from today's mapping (the fix a replay usually follows). `None` for a
    /// `corrupt` letter: there is nothing to send.
    pub fn remapped(&self, rules: &Rules) -> Option<Record> {
        let mut conversion = self.conversion.clone()?;
        if let Some(set) = self
            .event_name
            .as_deref()
            .and_then(|name| rules.accounts.get(&self.account)?.event_set(name))
        {
            conversion.event_id = set.clone();
        }
        Some(Record {
            account: self.account.clone(),
            conversion,
            received_at_ms: self.received_at_ms,
            event_name: self.event_name.clone(),
        })
    }
}

/// Which dead letters to list: of one account or all, after a cursor (an id), at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub account: Option<String>,
    pub after: u64,
    pub limit: usize,
}

/// Dead letters kept, and how many were evicted to stay within the bound since the spool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeadLetterCounts {
    pub kept: u64,
    pub evicted: u64,
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

/// A waiting record that no longer decodes: what could be read of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    pub id: u64,
    pub raw_bytes: u64,
    pub error: String,
}

/// What `peek_after` found: the records, in order, and those among them that no longer decode.
#[derive(Debug, Clone, Default)]
pub struct Peek {
    pub entries: Vec<Entry>,
    pub undecodable: Vec<Undecodable>,
}

impl Peek {
    /// The highest id seen, decodable or not.
    pub fn last_id(&self) -> Option<u64> {
        let a = self.entries.last().map(|e| e.id);
        let b = self.undecodable.iter().map(|u| u.id).max();
        a.max(b)
    }
}

/// What the spool holds of one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountBacklog {
    pub events: u64,
    pub bytes: u64,
    /// When the oldest waiting record was accepted (epoch milliseconds).
    pub oldest_ms: Option<i64>,
}

/// What counts against a spool's byte bound (its own measure: see the contract), and the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BoundUsage {
    pub used_bytes: u64,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolError {
    /// No room left; the caller should retry later.
    Full,
    /// The store failed (disk error); nothing of this call was kept.
    Unavailable(String),
    /// A file of the spool cannot be used as it is (damaged, of a newer format, not readable): found at
    /// start-up, with nothing written to it.
    Unusable {
        file: std::path::PathBuf,
        why: String,
    },
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpoolError::Full => f.write_str(
                "the spool is full (spool.max_bytes: waiting events, dead letters and the dedup window's entries fill it)",
            ),
            SpoolError::Unavailable(why) => write!(f, "the spool is unavailable: {why}"),
            SpoolError::Unusable { file, why } => {
                write!(f, "spool file {} cannot be used: {why}", file.display())
            }
        }
    }
}

impl std::error::Error for SpoolError {}

/// The per-account queues (see the module's contract).
pub trait Queue: Send + Sync + 'static {
    /// Keeps `records` and answers, in the same order, whether each was queued or a duplicate.
    fn append(&self, records: Vec<Record>) -> BoxFuture<'_, Result<Vec<Admission>, SpoolError>>;

    /// Up to `max` of `account`'s waiting records with ids above `after`, oldest first; nothing removed.
    fn peek_after<'a>(
        &'a self,
        account: &'a str,
        after: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Peek, SpoolError>>;

    /// The decodable ones of the oldest `max` waiting records of `account`.
    fn peek<'a>(
        &'a self,
        account: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Entry>, SpoolError>> {
        Box::pin(async move { Ok(self.peek_after(account, 0, max).await?.entries) })
    }

    /// Removes the given records of `account` (X accepted them).
    fn ack<'a>(&'a self, account: &'a str, ids: &'a [u64])
        -> BoxFuture<'a, Result<(), SpoolError>>;

    /// How many records of `account` are waiting (from memory).
    fn backlog(&self, account: &str) -> usize;

    /// Signalled whenever records are queued for `account` (one permit is stored if nobody waits).
    fn changed(&self, account: &str) -> Arc<Notify>;
}

/// Where events end that X refused for good (see the module's contract).
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Moves the given waiting records of `account` to the dead letters, with the reason and message.
    fn dead_letter<'a>(
        &'a self,
        account: &'a str,
        ids: &'a [u64],
        reason: DeadLetterReason,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), SpoolError>>;

    /// Dead letters with ids above `q.after`, oldest first, at most `q.limit`, of `q.account` or all.
    fn dead_letters(
        &self,
        q: DeadLetterQuery,
    ) -> BoxFuture<'_, Result<Vec<DeadLetter>, SpoolError>>;

    fn dead_letter_counts(&self) -> BoxFuture<'_, Result<DeadLetterCounts, SpoolError>>;

    /// Moves dead letters back to their account's queue, each as the given record (mapped again by the
    /// caller), in one step; ids no longer among the account's dead letters are skipped. Answers how many
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
}

/// What the spool holds, and whether it takes events (see the module's contract).
pub trait SpoolStats: Send + Sync + 'static {
    /// `account`'s waiting events, their bytes and the oldest one's acceptance time.
    fn account_backlog<'a>(
        &'a self,
        account: &'a str,
    ) -> BoxFuture<'a, Result<AccountBacklog, SpoolError>>;

    /// Bytes of waiting records (from memory).
    fn bytes(&self) -> u64;

    /// Bytes of waiting records of `account` (from memory).
    fn account_bytes(&self, account: &str) -> u64;

    /// What counts against the byte bound now, and the bound (`spool.max_bytes`), from memory.
    fn bound_usage(&self) -> BoundUsage;

    /// `Err(why)` while the spool cannot take events (full, disk failing, storage stopped); from memory.
    fn health(&self) -> Result<(), String>;

    /// `Some(cause)` once the spool can no longer keep its promises at all (its storage stopped), from
    /// memory: unlike `health`, never for a condition that passes (full, Redis unreachable).
    fn stopped(&self) -> Option<String> {
        None
    }

    /// Resolves, with the cause, once the spool can no longer keep its promises at all (its storage
    /// stopped): the process should stop taking events and exit, to be restarted on its durable state.
    fn fatal(&self) -> BoxFuture<'static, String> {
        Box::pin(std::future::pending())
    }
}

/// The whole spool: what the gateway holds.
pub trait Spool: Queue + DeadLetterStore + SpoolStats {}

impl<T: Queue + DeadLetterStore + SpoolStats> Spool for T {}
