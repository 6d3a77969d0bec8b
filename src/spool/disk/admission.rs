//! Whether the spool takes more: its byte bound (`spool.max_bytes`) and the free space under it
//! (`spool.min_free_bytes`), decided per group of appends and reported for readiness.

use super::counters::Shared;
use crate::spool::bound::{ByteBound, Refused};
use crate::spool::SpoolError;
use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a free-space reading is trusted. Reading it costs a syscall, and every group needed two;
/// `min_free_bytes` is the margin for what is written in between (and ENOSPC is handled anyway).
const FREE_SPACE_FRESH: Duration = Duration::from_millis(50);

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
            bound: ByteBound::new(max_bytes),
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
            total,
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
        if let Some(e) = self.bound.refusal(s.total_bytes, &mut s.refused) {
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
    /// Waiting bytes when the group began, and what it took since.
    total: u64,
    taken: u64,
    refused: Refused,
    by_disk: Option<u64>,
    min_free: u64,
}

impl Room {
    fn disk_message(min_free: u64) -> String {
        format!("the disk under spool.dir is full (less than spool.min_free_bytes = {min_free} bytes free); events are accepted again as the backlog drains or space is freed")
    }

    /// Takes `bytes` from the room, or says why not.
    pub fn take(&mut self, bytes: u64) -> Result<(), SpoolError> {
        self.bound
            .admit(self.total + self.taken, bytes, &mut self.refused)?;
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
