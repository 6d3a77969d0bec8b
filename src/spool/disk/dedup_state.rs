//! The dedup index: the live range of the durable dedup log and the in-memory fingerprints of its
//! entries (`fingerprints::FingerprintTable`).
//!
//! Invariant: every live entry of the log has exactly one slot in the table, and nothing else does;
//! every fingerprint match is confirmed against the full key (from memory for entries still only in the
//! intake log, from redb for the others), so a collision never turns a new event into a duplicate.

use super::fingerprints::{full_seq, FingerprintTable};
use super::schema::{fingerprint, DedupEntry};
use crate::spool::SpoolError;
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct DedupState {
    pub table: FingerprintTable,
    /// First live sequence (equal to `next` when the log is empty).
    pub first: u64,
    pub next: u64,
    /// Entries still only in the intake log.
    pub unapplied: HashMap<u64, DedupEntry>,
}

impl DedupState {
    /// Whether an entry for `key` received after `horizon_ms` is in the dedup log. `durable` reads an
    /// entry from redb by sequence.
    pub fn seen(
        &self,
        key: &[u8; 32],
        horizon_ms: i64,
        durable: &mut impl FnMut(u64) -> Result<Option<DedupEntry>, SpoolError>,
    ) -> Result<bool, SpoolError> {
        let Some(last) = self.next.checked_sub(1) else {
            return Ok(false);
        };
        for low in self.table.candidates(fingerprint(key)) {
            let Some(seq) = full_seq(low, self.first, last) else {
                continue;
            };
            let entry = match self.unapplied.get(&seq) {
                Some(e) => Some(*e),
                None => durable(seq)?,
            };
            if entry.is_some_and(|e| e.key == *key && e.received_at_ms > horizon_ms) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Takes the next sequence for `entry`, known from now on (still only in the intake log).
    pub fn add(&mut self, entry: DedupEntry) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.table.insert(fingerprint(&entry.key), seq);
        self.unapplied.insert(seq, entry);
        seq
    }

    /// Forgets an entry that was not kept after all (its append failed).
    pub fn forget(&mut self, seq: u64, key: &[u8; 32]) {
        self.table.remove(fingerprint(key), seq);
        self.unapplied.remove(&seq);
    }

    /// Entries removed from redb by a committed transaction.
    pub fn purged(&mut self, purged: &[(u64, u64)]) {
        for (fp, seq) in purged {
            self.table.remove(*fp, *seq);
            self.first = self.first.max(seq + 1);
        }
    }
}
