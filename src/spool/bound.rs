//! The byte bound (`spool.max_bytes`) as one admission decision, kept by every spool implementation, so
//! that ingest, readiness, the `spool_writable` gauge and `/v1/accounts` never disagree.
//!
//! # The rule
//! - While the spool says it takes events (`refusal` is `None`), every call of up to `headroom` bytes fits.
//! - A call that does not fit is refused and remembered: from then on every call is refused, and `refusal`
//!   says why, until that many bytes are free again. (A call larger than the whole bound can never be
//!   taken: it is refused without changing what the spool says.)
//!
//! So whenever a call was refused for lack of room, the spool says it refuses, until it would take that
//! call. Pure: the implementation keeps the `Refused` state beside its byte count.

use super::SpoolError;

#[derive(Debug, Clone, Copy)]
pub struct ByteBound {
    max_bytes: u64,
    /// What the bound holds before any call: a durable spool's fixed reserve (its files' own structures).
    floor: u64,
}

/// The last refusal's need, kept by the implementation (under the same lock as its byte count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused(Option<u64>);

impl ByteBound {
    pub fn new(max_bytes: u64) -> Self {
        ByteBound {
            max_bytes,
            floor: 0,
        }
    }

    /// A bound of which `floor` is always taken (by what the implementation keeps besides the calls).
    pub fn with_floor(max_bytes: u64, floor: u64) -> Self {
        ByteBound { max_bytes, floor }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Room the spool keeps before it says it refuses: 1/64 of what the bound leaves for calls, at most
    /// 16 KiB (a few events).
    pub fn headroom(&self) -> u64 {
        (self.max_bytes.saturating_sub(self.floor) / 64).clamp(1, 16 << 10)
    }

    /// Why the spool refuses calls while it holds `total` bytes, if it does. A remembered refusal is
    /// forgotten once its need is free.
    pub fn refusal(&self, total: u64, refused: &mut Refused) -> Option<SpoolError> {
        let need = refused.0.unwrap_or(0).max(self.headroom());
        if total.saturating_add(need) > self.max_bytes {
            return Some(SpoolError::Full);
        }
        refused.0 = None;
        None
    }

    /// Takes a call adding `bytes` to `total`, or refuses it (and remembers the refusal).
    pub fn admit(&self, total: u64, bytes: u64, refused: &mut Refused) -> Result<(), SpoolError> {
        let fits = total.saturating_add(bytes) <= self.max_bytes;
        if fits && self.refusal(total, refused).is_none() {
            return Ok(());
        }
        if bytes <= self.max_bytes {
            refused.0 = Some(refused.0.unwrap_or(0).max(bytes));
        }
        Err(SpoolError::Full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forty_eight_bytes_short_the_spool_says_it_is_full() {
        let bound = ByteBound::new(20 << 20);
        let mut refused = Refused::default();
        let total = (20 << 20) - 48;
        // Less than the headroom is left: the spool says so before any call is refused ...
        assert_eq!(bound.refusal(total, &mut refused), Some(SpoolError::Full));
        // ... and refuses every call, even one that would fit.
        assert_eq!(bound.admit(total, 40, &mut refused), Err(SpoolError::Full));
        // Once the headroom is free, it takes events again.
        assert_eq!(bound.refusal(total - (16 << 10), &mut refused), None);
        assert_eq!(bound.admit(total - (16 << 10), 500, &mut refused), Ok(()));
    }

    #[test]
    fn a_refused_large_call_holds_the_refusal_until_it_would_fit() {
        let bound = ByteBound::new(1 << 20);
        let mut refused = Refused::default();
        let total = 900 << 10;
        assert_eq!(bound.refusal(total, &mut refused), None);
        assert_eq!(
            bound.admit(total, 200 << 10, &mut refused),
            Err(SpoolError::Full)
        );
        assert!(bound.refusal(total, &mut refused).is_some());
        assert_eq!(bound.admit(total, 100, &mut refused), Err(SpoolError::Full));
        // 200 KiB free again: taken.
        let total = (1 << 20) - (200 << 10);
        assert_eq!(bound.refusal(total, &mut refused), None);
        assert_eq!(bound.admit(total, 200 << 10, &mut refused), Ok(()));
    }

    #[test]
    fn a_call_larger_than_the_bound_does_not_refuse_forever() {
        let bound = ByteBound::new(1000);
        let mut refused = Refused::default();
        assert_eq!(bound.admit(500, 5000, &mut refused), Err(SpoolError::Full));
        // It could never be taken: what fits is still taken.
        assert_eq!(bound.refusal(500, &mut refused), None);
        assert_eq!(bound.admit(500, 100, &mut refused), Ok(()));
    }

    proptest! {
        /// Under any sequence of calls and of bytes leaving: a refused call leaves the spool saying it
        /// refuses; while it says it takes events, a call of up to `headroom` is taken; nothing is ever
        /// taken past the bound.
        #[test]
        fn the_decision_and_what_is_reported_agree(
            max in 1u64..100_000,
            ops in proptest::collection::vec((any::<bool>(), 0u64..20_000), 1..200),
        ) {
            let bound = ByteBound::new(max);
            let mut refused = Refused::default();
            let mut total = 0u64;
            for (add, n) in ops {
                if add {
                    let open = bound.refusal(total, &mut refused).is_none();
                    match bound.admit(total, n, &mut refused) {
                        Ok(()) => {
                            total += n;
                            prop_assert!(total <= max);
                        }
                        Err(_) => {
                            prop_assert!(!(open && n <= bound.headroom()), "refused {} while open", n);
                            if n <= max {
                                prop_assert!(bound.refusal(total, &mut refused).is_some());
                            }
                        }
                    }
                } else {
                    total = total.saturating_sub(n);
                }
            }
        }
    }
}
