//! Whether the spool takes more: its byte bound (`spool.max_bytes`) and the free space under it
//! (`spool.min_free_bytes`), decided per group of appends and reported for readiness.

use super::counters::Shared;
use crate::spool::SpoolError;
use std::cell::Cell;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a free-space reading is trusted. Reading it costs a syscall, and every group needed two;
/// `min_free_bytes` is the margin for what is written in between (and ENOSPC is handled anyway).
const FREE_SPACE_FRESH: Duration = Duration::from_millis(50);

pub(super) struct Bounds {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    /// The last free-space reading: (when, whether below `min_free_bytes`).
    last: Cell<Option<(Instant, bool)>>,
}

impl Bounds {
    pub fn new(dir: PathBuf, max_bytes: u64, min_free_bytes: u64) -> Self {
        Bounds {
            dir,
            max_bytes,
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

    /// How much appends may add in this group, and why they stop there.
    pub fn room(&self, s: &mut Shared) -> Room {
        let total = s.total_bytes;
        let by_size = self.max_bytes.saturating_sub(total);
        let by_disk = if self.disk_low() {
            let mark = *s.low_water.get_or_insert(total);
            Some((mark / 10 * 9).saturating_sub(total))
        } else {
            s.low_water = None;
            None
        };
        Room {
            by_size,
            by_disk,
            min_free: self.min_free_bytes,
        }
    }

    /// Why the spool would refuse an event now (for readiness), if it would.
    pub fn refusal(&self, s: &Shared) -> Option<String> {
        if s.total_bytes >= self.max_bytes {
            return Some(SpoolError::Full.to_string());
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
    by_size: u64,
    by_disk: Option<u64>,
    min_free: u64,
}

impl Room {
    fn disk_message(min_free: u64) -> String {
        format!("the disk under spool.dir is full (less than spool.min_free_bytes = {min_free} bytes free); events are accepted again as the backlog drains or space is freed")
    }

    /// Takes `bytes` from the room, or says why not.
    pub fn take(&mut self, bytes: u64) -> Result<(), SpoolError> {
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
