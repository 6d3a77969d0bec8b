//! The in-memory side of the dedup index: 64-bit fingerprints of `(account, event_id, conversion_id)` and
//! where the full key sits in the durable dedup log.
//!
//! Why: a B-tree keyed by a random hash costs a page rewrite per new event (measured: 70% of the spool's
//! time). The durable log is appended in time order (cheap) in the same transaction as the events; this
//! table answers "seen?" in memory and the log confirms a fingerprint match with the full 32-byte key, so a
//! fingerprint collision can never turn a new event into a "duplicate". Memory: 8 bytes per slot, at
//! most 85% full, 10 to 14 bytes per event in the dedup window.
//!
//! Invariant: every live entry of the log within the window has exactly one slot here, and nothing else
//! does. Open addressing with linear probing and backward-shift deletion, so there are no tombstones.

/// A fingerprint table mapping `fp -> log sequence`. Both are stored as 32 bits: the fingerprint only
/// selects candidates (each is confirmed against the full key in the log, so a collision costs a read, never
/// a wrong answer), and the sequence's high bits are recovered from the live range of the log, which never
/// spans 2^32 entries.
#[derive(Debug, Clone)]
pub struct FingerprintTable {
    fps: Vec<u32>,
    seqs: Vec<u32>,
    len: usize,
}

/// 0 marks an empty slot; a fingerprint of 0 is stored as 1.
fn norm(fp: u64) -> u32 {
    (fp as u32).max(1)
}

/// Most slots in use before the table grows (by half): linear probing stays short below this.
const MAX_LOAD: f64 = 0.85;

impl Default for FingerprintTable {
    fn default() -> Self {
        Self::with_capacity(1024)
    }
}

impl FingerprintTable {
    pub fn with_capacity(n: usize) -> Self {
        let slots = ((n.max(16) as f64 / MAX_LOAD) as usize + 1).max(16);
        FingerprintTable {
            fps: vec![0; slots],
            seqs: vec![0; slots],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the table.
    pub fn memory_bytes(&self) -> usize {
        self.fps.len() * 8
    }

    fn home(&self, fp: u32) -> usize {
        // Fingerprints are hash output: map them onto any table size by multiply-shift.
        ((fp as u64 * self.fps.len() as u64) >> 32) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.fps.len() {
            0
        } else {
            i + 1
        }
    }

    /// The low 32 bits of every sequence stored under `fp`'s fingerprint.
    pub fn candidates(&self, fp: u64) -> impl Iterator<Item = u32> + '_ {
        let fp = norm(fp);
        let mut i = self.home(fp);
        std::iter::from_fn(move || loop {
            let here = self.fps[i];
            if here == 0 {
                return None;
            }
            let slot = i;
            i = self.next(i);
            if here == fp {
                return Some(self.seqs[slot]);
            }
        })
    }

    pub fn insert(&mut self, fp: u64, seq: u64) {
        if (self.len + 1) as f64 > self.fps.len() as f64 * MAX_LOAD {
            self.grow();
        }
        self.place(norm(fp), seq as u32);
        self.len += 1;
    }

    fn place(&mut self, fp: u32, seq: u32) {
        let mut i = self.home(fp);
        while self.fps[i] != 0 {
            i = self.next(i);
        }
        self.fps[i] = fp;
        self.seqs[i] = seq;
    }

    /// Removes the entry `(fp, seq)`; `false` when it is not there.
    pub fn remove(&mut self, fp: u64, seq: u64) -> bool {
        let (fp, seq) = (norm(fp), seq as u32);
        let n = self.fps.len();
        let mut i = self.home(fp);
        loop {
            match self.fps[i] {
                0 => return false,
                f if f == fp && self.seqs[i] == seq => break,
                _ => i = self.next(i),
            }
        }
        // Backward-shift deletion: pull later entries of the run into the hole when their home allows it.
        let mut hole = i;
        let mut j = self.next(i);
        while self.fps[j] != 0 {
            let home = self.home(self.fps[j]);
            let dist_j = (j + n - home) % n;
            let dist_hole = (j + n - hole) % n;
            if dist_j >= dist_hole {
                self.fps[hole] = self.fps[j];
                self.seqs[hole] = self.seqs[j];
                hole = j;
            }
            j = self.next(j);
        }
        self.fps[hole] = 0;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let old_fps = std::mem::take(&mut self.fps);
        let old_seqs = std::mem::take(&mut self.seqs);
        let slots = (old_fps.len() + old_fps.len() / 2).max(16);
        self.fps = vec![0; slots];
        self.seqs = vec![0; slots];
        for (fp, seq) in old_fps.into_iter().zip(old_seqs) {
            if fp != 0 {
                self.place(fp, seq);
            }
        }
    }
}

/// The full sequence number for the low 32 bits `low`, given the live range `[first, last]` of the log
/// (which spans fewer than 2^32 entries).
pub fn full_seq(low: u32, first: u64, last: u64) -> Option<u64> {
    let base = first & !0xFFFF_FFFF;
    [base, base.wrapping_add(1 << 32)]
        .into_iter()
        .map(|b| b | low as u64)
        .find(|s| (first..=last).contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn collisions_keep_every_candidate() {
        let mut t = FingerprintTable::with_capacity(4);
        for seq in 0..100 {
            t.insert(42, seq);
        }
        t.insert(0, 7);
        assert_eq!(t.candidates(42).count(), 100);
        assert!(t.remove(42, 50));
        assert!(!t.remove(42, 50));
        assert_eq!(t.candidates(42).count(), 99);
        assert_eq!(t.candidates(0).collect::<Vec<_>>(), [7]);
        assert_eq!(t.len(), 100);
    }

    #[test]
    fn sequences_beyond_32_bits() {
        let first = (5u64 << 32) - 10;
        assert_eq!(
            full_seq((first + 3) as u32, first, first + 100),
            Some(first + 3)
        );
        assert_eq!(full_seq(2, first, first + 100), Some((5u64 << 32) + 2));
        assert_eq!(full_seq(2, first, first + 5), None);
    }

    proptest! {
        /// The table behaves like a multimap under any mix of inserts and removes.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..40), 0..600)) {
            let mut t = FingerprintTable::with_capacity(2);
            let mut model: HashMap<(u64, u64), usize> = HashMap::new();
            for (insert, fp, seq) in ops {
                // Few distinct fingerprints, many shared home slots: long probe runs and wrap-around.
                let fp = fp.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 0xFFFF_0000;
                if insert {
                    t.insert(fp, seq);
                    *model.entry((fp, seq)).or_default() += 1;
                } else {
                    let had = model.get(&(fp, seq)).copied().unwrap_or(0) > 0;
                    prop_assert_eq!(t.remove(fp, seq), had);
                    if had {
                        *model.get_mut(&(fp, seq)).unwrap() -= 1;
                    }
                }
                prop_assert_eq!(t.len(), model.values().sum::<usize>());
            }
            for ((fp, seq), n) in &model {
                let found = t.candidates(*fp).filter(|s| *s == *seq as u32).count();
                prop_assert_eq!(found, *n);
            }
        }
    }
}
