//! Whether the spool takes more: its byte bound (`spool.max_bytes`) and the free space under it
//! (`spool.min_free_bytes`), decided per group of appends and reported for readiness.
//!
//! # What the bound bounds: the files
//! `spool.max_bytes` bounds what `spool.redb` and `intake.log` take on disk, not just the events' bytes.
//! Everything redb stores counts: waiting events, dead letters (their JSON) and the dedup log's entries
//! (48 bytes each, for the whole dedup window, also after delivery). redb keeps whole 4 KiB pages — a
//! value just over half a page takes a page of its own, a large value is rounded up to a power of two of
//! pages, nearly twice the value just past a power of two, and freed pages are reused only after the next
//! commit — so what it stores is counted `overhead` (2¼) times; the intake log and redb's own structures take
//! at most `RESERVE`. Measured (`tests/spool_footprint.rs`): the files stay under the bound for events of
//! every size, through fills, drains and dead letters.
//!
//! # Invariants
//! The footprint only counts what is durable or about to be; a call is admitted only if the footprint
//! with it stays within the bound (`spool::bound` decides, in footprint bytes).

use super::counters::Shared;
use super::intake_log::KEEP_BYTES;
use super::schema::DEDUP_ENTRY_LEN;
use crate::spool::bound::{ByteBound, Refused};
use crate::spool::SpoolError;
use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a free-space reading is trusted. Reading it costs a syscall, and every group needed two;
/// `min_free_bytes` is the margin for what is written in between (and ENOSPC is handled anyway).
const FREE_SPACE_FRESH: Duration = Duration::from_millis(50);

/// What the files take on disk per byte redb stores, at most: 9/4 (whole pages; see the module doc).
pub(super) fn overhead(stored: u64) -> u64 {
    stored.saturating_mul(9) / 4
}
/// The intake log (what a reset keeps), redb's own structures, and one batch in motion (a batch acked or
/// dead-lettered is stored twice until its transaction commits; 1 MiB at the default
/// `delivery.max_batch_bytes`).
pub(super) const RESERVE: u64 = KEEP_BYTES + (4 << 20);
/// What one dedup log entry stores: its sequence (the key) and the entry.
pub(super) const DEDUP_STORED: u64 = 8 + DEDUP_ENTRY_LEN as u64;
/// The smallest `spool.max_bytes` that holds events at all.
pub const MIN_MAX_BYTES: u64 = 2 * RESERVE;

/// What the spool's files take on disk, at most, when redb stores `stored` bytes.
pub(super) fn footprint(stored: u64) -> u64 {
    overhead(stored).saturating_add(RESERVE)
}

/// The footprint of an empty spool after `records` new events of `one` encoded bytes (each with its
/// dedup entry): to size a bound in tests and the README.
pub fn footprint_of_new(one: u64, records: u64) -> u64 {
    footprint(records.saturating_mul(one + DEDUP_STORED))
}

impl Shared {
    /// What redb stores: waiting events, dead letters, dedup entries.
    pub fn stored_bytes(&self) -> u64 {
        self.total_bytes
            .saturating_add(self.dead_bytes)
            .saturating_add(self.dedup_entries.saturating_mul(DEDUP_STORED))
    }

    pub fn footprint(&self) -> u64 {
        footprint(self.stored_bytes())
    }
}

pub(super) struct Bounds {
    pub dir: PathBuf,
    pub bound: ByteBound,
    pub min_free_bytes: u64,
    /// The last free-space reading: (when, whether below `min_free_bytes`).
    last: Cell<Option<(Instant, bool)>>,
}

impl Bounds {
    pub fn new(dir: PathBuf, max_bytes: u64, min_free_bytes: u64) -> Self {
        Bounds {
            dir,
            bound: ByteBound::with_floor(max_bytes, RESERVE),
            min_free_bytes,
            last: Cell::new(None),
        }
    }

    /// Whether the file system under the spool has less than `min_free_bytes` free (a recent reading).
    fn disk_low(&self) -> bool {
        let now = Instant::now();
        match self.last.get() {
            Some((at, low)) if now.duration_since(at) < FREE_SPACE_FRESH => low,
            _ => {
                let low =
                    fs4::available_space(&self.dir).is_ok_and(|free| free < self.min_free_bytes);
                self.last.set(Some((now, low)));
                low
            }
        }
    }

    /// How much appends may add in this group, and why they stop there. Hand it back with `settle`.
    pub fn room(&self, s: &mut Shared) -> Room {
        let total = s.total_bytes;
        let by_disk = if self.disk_low() {
            let mark = *s.low_water.get_or_insert(total);
            Some((mark / 10 * 9).saturating_sub(total))
        } else {
            s.low_water = None;
            None
        };
        Room {
            bound: self.bound,
            footprint: s.footprint(),
            taken: 0,
            refused: s.refused,
            by_disk,
            min_free: self.min_free_bytes,
        }
    }

    /// Keeps what the group's admission decided (a refusal is remembered).
    pub fn settle(&self, room: Room, s: &mut Shared) {
        s.refused = room.refused;
    }

    /// Why the spool refuses events now (for ingest, readiness and metrics alike), if it does.
    pub fn refusal(&self, s: &mut Shared) -> Option<String> {
        let footprint = s.footprint();
        if let Some(e) = self.bound.refusal(footprint, &mut s.refused) {
            return Some(e.to_string());
        }
        match s.low_water {
            Some(mark) if self.disk_low() && s.total_bytes >= mark / 10 * 9 => {
                Some(Room::disk_message(self.min_free_bytes))
            }
            _ => None,
        }
    }
}

/// What appends may still add within one transaction.
#[derive(Clone)]
pub(super) struct Room {
    bound: ByteBound,
    /// The footprint when the group began, and what it stored since.
    footprint: u64,
    taken: u64,
    refused: Refused,
    by_disk: Option<u64>,
    min_free: u64,
}

impl Room {
    fn disk_message(min_free: u64) -> String {
        format!("the disk under spool.dir is full (less than spool.min_free_bytes = {min_free} bytes free); events are accepted again as the backlog drains or space is freed")
    }

    /// Takes `bytes` that redb will store from the room, or says why not.
    pub fn take(&mut self, bytes: u64) -> Result<(), SpoolError> {
        self.bound.admit(
            self.footprint + overhead(self.taken),
            overhead(bytes),
            &mut self.refused,
        )?;
        if let Some(disk) = self.by_disk.as_mut() {
            if bytes > *disk {
                return Err(SpoolError::Unavailable(Self::disk_message(self.min_free)));
            }
            *disk -= bytes;
        }
        self.taken += bytes;
        Ok(())
    }
}
