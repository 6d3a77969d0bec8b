//! The bytes of request bodies being read, decompressed and parsed at once, bounded
//! (`server.max_inflight_body_bytes`), so that many concurrent large bodies cannot take the process past
//! its memory limit. A body that does not fit is shed at once with a `503` and `Retry-After`: queueing it
//! would hold its connection and its memory all the same.
//!
//! # Small bodies keep being served
//! A lease of at most `SMALL` bytes may use the whole budget. A lease growing past it must leave an eighth
//! of the budget free: large bodies can never take the room the common small requests need.
//!
//! # Invariants
//! The bytes held by all leases never exceed the budget; a lease gives back everything it holds when it
//! is dropped, whatever path the request took.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Leases up to this size may use the whole budget.
pub const SMALL: usize = 64 << 10;

#[derive(Debug)]
pub struct BodyBudget {
    total: usize,
    used: AtomicUsize,
}

/// Bytes of one request's body held against the budget.
#[derive(Debug)]
pub struct Lease {
    budget: Arc<BodyBudget>,
    held: usize,
}

impl BodyBudget {
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(BodyBudget {
            total,
            used: AtomicUsize::new(0),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held by leases now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// An empty lease, grown as the body arrives.
    pub fn lease(self: &Arc<Self>) -> Lease {
        Lease {
            budget: self.clone(),
            held: 0,
        }
    }

    /// Takes `n` more bytes for a lease that will then hold `after`; `false` (nothing taken) when they
    /// do not fit.
    fn take(&self, n: usize, after: usize) -> bool {
        let keep_free = if after > SMALL { self.total / 8 } else { 0 };
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let next = used.checked_add(n)?;
                (next.checked_add(keep_free)? <= self.total).then_some(next)
            })
            .is_ok()
    }
}

impl Lease {
    /// Makes the lease hold at least `bytes`; `false` (the lease unchanged) when the budget has no room.
    pub fn hold(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            return true;
        }
        let more = bytes - self.held;
        if !self.budget.take(more, bytes) {
            return false;
        }
        self.held = bytes;
        true
    }

    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn large_leases_leave_room_for_small_ones() {
        let budget = BodyBudget::new(1 << 20);
        let mut big = Vec::new();
        loop {
            let mut l = budget.lease();
            if !l.hold(100 << 10) {
                break;
            }
            big.push(l);
        }
        // Large ones stopped with an eighth of the budget still free...
        assert!(budget.used() + budget.total() / 8 <= budget.total());
        assert!(budget.used() + budget.total() / 8 + (100 << 10) > budget.total());
        // ...which small ones can use.
        let mut small = budget.lease();
        assert!(small.hold(SMALL));
        drop(big);
        drop(small);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_refused_growth_keeps_what_the_lease_held() {
        let budget = BodyBudget::new(200 << 10);
        let mut a = budget.lease();
        assert!(a.hold(10 << 10));
        let mut b = budget.lease();
        assert!(b.hold(150 << 10));
        assert!(!a.hold(100 << 10));
        assert_eq!(a.held(), 10 << 10);
        assert_eq!(budget.used(), 160 << 10);
        drop(b);
        assert!(a.hold(100 << 10));
        assert_eq!(budget.used(), 100 << 10);
    }

    proptest! {
        /// Whatever leases grow and drop, in whatever order, the budget is never exceeded and is whole
        /// again at the end.
        #[test]
        fn never_more_than_the_budget(steps in proptest::collection::vec((0usize..8, 0usize..300_000), 1..200)) {
            let budget = BodyBudget::new(1 << 20);
            let mut leases: Vec<Lease> = (0..8).map(|_| budget.lease()).collect();
            for (i, bytes) in steps {
                if bytes < 1000 {
                    leases[i] = budget.lease();
                } else {
                    let before = leases[i].held();
                    let ok = leases[i].hold(bytes);
                    prop_assert!(ok || leases[i].held() == before);
                }
                let held: usize = leases.iter().map(Lease::held).sum();
                prop_assert_eq!(held, budget.used());
                prop_assert!(budget.used() <= budget.total());
            }
            drop(leases);
            prop_assert_eq!(budget.used(), 0);
        }
    }
}
