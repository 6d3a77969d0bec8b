//! What each account's events did, minute by minute, over the last hour: the numbers of the status page
//! (`GET /` on the admin listener) and of `GET /v1/activity`.
//!
//! # Memory
//! A ring of `MINUTES` slots per configured account (and one for events of no configured account), each
//! slot its minute and four counters: 40 bytes a slot, 2,400 bytes an account, fixed at start-up whatever
//! the traffic. A slot is reused when its minute comes round again, so a count never outlives the hour.
//!
//! # Invariants
//! - Counted where the metrics count (`Metrics::received`, `delivered`, `dead_lettered`): the page and
//!   `/metrics` never disagree about what happened, only about how far back they look.
//! - Only counts and configured account names: nothing an event carried.
//! - Pure bookkeeping behind one short lock per account; the caller gives the minute (`add_at`) or the
//!   wall clock does (`add`).

use serde::Serialize;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Minutes kept.
pub const MINUTES: usize = 60;

/// What happened to events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Arrived at ingest, whatever became of them (queued, duplicate, suppressed or rejected).
    Received = 0,
    /// Accepted by X.
    Delivered = 1,
    /// Refused at ingest.
    Rejected = 2,
    /// Given up on after being queued (X refused them, too old, ...).
    DeadLettered = 3,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    /// Minutes since the epoch this slot counts; 0: never used.
    minute: u64,
    counts: [u64; 4],
}

/// One minute of one account, as served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// Minutes since the epoch.
    #[serde(skip)]
    pub minute: u64,
    pub received: u64,
    pub delivered: u64,
    pub rejected: u64,
    pub dead_lettered: u64,
}

pub struct Activity {
    accounts: Vec<(String, Mutex<[Slot; MINUTES]>)>,
}

/// The minute of `t` since the epoch.
pub fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

impl Activity {
    /// Rings for `accounts` (the configured names and the label of events of no configured account).
    pub fn new<'a>(accounts: impl IntoIterator<Item = &'a str>) -> Activity {
        Activity {
            accounts: accounts
                .into_iter()
                .map(|a| (a.to_owned(), Mutex::new([Slot::default(); MINUTES])))
                .collect(),
        }
    }

    /// Counts `n` events of `account` as `kind` now.
    pub fn add(&self, account: &str, kind: Kind, n: u64) {
        self.add_at(account, kind, n, minute_of(SystemTime::now()));
    }

    /// Counts `n` events of `account` as `kind` in `minute`; an account without a ring is ignored.
    pub fn add_at(&self, account: &str, kind: Kind, n: u64, minute: u64) {
        let Some((_, ring)) = self.accounts.iter().find(|(a, _)| a == account) else {
            return;
        };
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut ring[(minute % MINUTES as u64) as usize];
        if slot.minute != minute {
            // A slot of an hour ago (or of a clock that went back) starts again.
            *slot = Slot {
                minute,
                counts: [0; 4],
            };
        }
        slot.counts[kind as usize] = slot.counts[kind as usize].saturating_add(n);
    }

    /// The last `MINUTES` minutes up to `now` (oldest first) of every account, zeros where nothing happened.
    pub fn series(&self, now: u64) -> Vec<(String, Vec<Minute>)> {
        self.accounts
            .iter()
            .map(|(name, ring)| {
                let ring = *ring.lock().unwrap_or_else(|p| p.into_inner());
                let first = now.saturating_sub(MINUTES as u64 - 1);
                let minutes = (first..=now)
                    .map(|m| {
                        let slot = ring[(m % MINUTES as u64) as usize];
                        let c = if slot.minute == m {
                            slot.counts
                        } else {
                            [0; 4]
                        };
                        Minute {
                            minute: m,
                            received: c[0],
                            delivered: c[1],
                            rejected: c[2],
                            dead_lettered: c[3],
                        }
                    })
                    .collect();
                (name.clone(), minutes)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_land_in_their_minute_and_leave_after_an_hour() {
        let a = Activity::new(["shop", "unknown"]);
        a.add_at("shop", Kind::Received, 5, 1000);
        a.add_at("shop", Kind::Delivered, 3, 1000);
        a.add_at("shop", Kind::Received, 2, 1001);
        a.add_at("nobody", Kind::Received, 9, 1001);
        let series = a.series(1001);
        let shop = &series[0].1;
        assert_eq!(shop.len(), MINUTES);
        assert_eq!(
            (shop[58].minute, shop[58].received, shop[58].delivered),
            (1000, 5, 3)
        );
        assert_eq!((shop[59].minute, shop[59].received), (1001, 2));
        assert!(series[1].1.iter().all(|m| m.received == 0));
        // An hour on, minute 1000's slot is 1060's: the old counts are gone, not added to.
        a.add_at("shop", Kind::Rejected, 1, 1060);
        let shop = &a.series(1060)[0].1;
        assert_eq!(shop.iter().map(|m| m.received).sum::<u64>(), 2);
        assert_eq!((shop[59].received, shop[59].rejected), (0, 1));
    }

    #[test]
    fn an_account_costs_what_the_readme_says() {
        assert_eq!(std::mem::size_of::<[Slot; MINUTES]>(), 2_400);
    }

    proptest! {
        /// Whatever was added in the last hour is what the series holds, minute by minute.
        #[test]
        fn the_series_is_what_was_added_in_the_hour(adds in proptest::collection::vec((0u64..200, 0usize..4, 1u64..100), 0..300)) {
            let a = Activity::new(["shop"]);
            let kinds = [Kind::Received, Kind::Delivered, Kind::Rejected, Kind::DeadLettered];
            let mut sorted = adds.clone();
            sorted.sort_by_key(|(m, _, _)| *m);
            for (m, k, n) in &sorted {
                a.add_at("shop", kinds[*k], *n, 10_000 + m);
            }
            let now = 10_199;
            let series = &a.series(now)[0].1;
            for m in series {
                let expected = |k: usize| sorted.iter().filter(|(mm, kk, _)| 10_000 + mm == m.minute && *kk == k).map(|(_, _, n)| n).sum::<u64>();
                prop_assert_eq!([m.received, m.delivered, m.rejected, m.dead_lettered], [expected(0), expected(1), expected(2), expected(3)]);
            }
        }
    }
}
