//! The spool seam's conformance suite: every check of the contract in `super`, written once, generic
//! over the implementation, and run against each (`conformance!` at the bottom). A new backend joins
//! by adding one line there.

use super::{
    Admission, DeadLetterQuery, DeadLetterStore, DiskSpool, DiskSpoolOptions, MemorySpool, Queue,
    Record, Spool, SpoolError, SpoolStats,
};
use crate::conversion::{AccountRules, Conversion, Rules};
use crate::reasons::DeadLetterReason;
use std::sync::Arc;
use std::time::Duration;

/// The bounds a spool is made with.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_dead_letters: u64,
    pub dedup_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 30,
            max_dead_letters: 1000,
            dedup_window: Duration::from_secs(3600),
        }
    }
}

/// How the suite makes (and, for a durable implementation, reopens) the spool under test.
pub trait Subject: Send {
    type S: Spool;
    fn open(&mut self, limits: Limits) -> impl std::future::Future<Output = Arc<Self::S>> + Send;
    /// The same spool again: after a clean close (`clean`), or after its handle was dropped without one.
    /// `None` for an implementation that keeps nothing across a restart.
    fn reopen(
        &mut self,
        spool: Arc<Self::S>,
        clean: bool,
    ) -> impl std::future::Future<Output = Option<Arc<Self::S>>> + Send;
    /// The `max_bytes` under which `records` new records of `one` encoded bytes fit, and half a record
    /// more does too, but not a whole one: what the implementation counts against its bound.
    fn room_for(&self, one: u64, records: u64) -> u64 {
        one * records + one / 2
    }
    /// Whether an id names one record whatever the account (the embedded spools), or only together
    /// with its account (a shared spool: `super::redis`).
    fn global_ids(&self) -> bool {
        true
    }
}

pub struct Memory;

impl Subject for Memory {
    type S = MemorySpool;
    async fn open(&mut self, l: Limits) -> Arc<MemorySpool> {
        Arc::new(
            MemorySpool::new(l.dedup_window, l.max_bytes).with_max_dead_letters(l.max_dead_letters),
        )
    }
    async fn reopen(&mut self, _: Arc<MemorySpool>, _: bool) -> Option<Arc<MemorySpool>> {
        None
    }
}

pub struct Disk {
    dir: tempfile::TempDir,
    /// Each `open` makes a fresh spool in a directory of its own.
    opened: usize,
    limits: Limits,
}

impl Default for Disk {
    fn default() -> Self {
        Disk {
            dir: tempfile::tempdir().expect("a temporary directory"),
            opened: 0,
            limits: Limits::default(),
        }
    }
}

impl Disk {
    fn options(&self) -> DiskSpoolOptions {
        DiskSpoolOptions {
            dir: self.dir.path().join(self.opened.to_string()),
            max_bytes: self.limits.max_bytes,
            max_dead_letters: self.limits.max_dead_letters,
            dedup_window: self.limits.dedup_window,
            cache_bytes: 1 << 20,
            min_free_bytes: 0,
        }
    }
}

impl Subject for Disk {
    type S = DiskSpool;
    fn room_for(&self, one: u64, records: u64) -> u64 {
        super::disk::footprint_of_new(one, records)
            + (super::disk::footprint_of_new(one, 1) - super::disk::footprint_of_new(0, 0)) / 2
    }
    async fn open(&mut self, limits: Limits) -> Arc<DiskSpool> {
        self.limits = limits;
        self.opened += 1;
        DiskSpool::open(self.options()).expect("the spool opens")
    }
    async fn reopen(&mut self, spool: Arc<DiskSpool>, clean: bool) -> Option<Arc<DiskSpool>> {
        if clean {
            spool.close().await.expect("a clean close");
        }
        drop(spool);
        // Without a close the old storage thread lets go of the file once it has seen the handle go.
        for _ in 0..500 {
            if let Ok(s) = DiskSpool::open(self.options()) {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the spool could not be opened again");
    }
}

/// `RedisSpool` on a `redis-server` of its own; each `open` uses fresh keys (a prefix of its own), a
/// reopen the same keys and consumer name (a replica restarted).
pub struct Redis {
    server: crate::redis_store::server::RedisServer,
    opened: usize,
    limits: Limits,
}

impl Default for Redis {
    fn default() -> Self {
        Redis {
            server: crate::redis_store::server::RedisServer::start(),
            opened: 0,
            limits: Limits::default(),
        }
    }
}

impl Redis {
    async fn spool(&self) -> Arc<super::RedisSpool> {
        let url = crate::config::RedisUrl::for_tests(&self.server.url());
        let store =
            crate::redis_store::Store::open(&url, &format!("cg{}", self.opened)).expect("a store");
        super::RedisSpool::open(
            store,
            super::RedisSpoolOptions {
                accounts: vec!["a".into(), "b".into()],
                consumer: "replica-1".into(),
                claim_idle: Duration::from_secs(60),
                dedup_window: self.limits.dedup_window,
                max_bytes: self.limits.max_bytes,
                max_dead_letters: self.limits.max_dead_letters,
            },
        )
        .await
    }
}

impl Subject for Redis {
    type S = super::RedisSpool;
    fn global_ids(&self) -> bool {
        false
    }
    async fn open(&mut self, limits: Limits) -> Arc<super::RedisSpool> {
        self.limits = limits;
        self.opened += 1;
        self.spool().await
    }
    async fn reopen(
        &mut self,
        spool: Arc<super::RedisSpool>,
        _clean: bool,
    ) -> Option<Arc<super::RedisSpool>> {
        drop(spool);
        Some(self.spool().await)
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn record(account: &str, conversion_id: &str, received_at_ms: i64) -> Record {
    Record {
        account: account.into(),
        received_at_ms,
        event_name: Some("purchase".into()),
        conversion: Conversion {
            value: Some("1.00".into()),
            ..Conversion::minimal("2026-11-28T00:00:00.000Z", "o9d2g", "t", conversion_id)
        },
    }
}

fn new(account: &str, conversion_id: &str) -> Record {
    record(account, conversion_id, now_ms())
}

async fn waiting(spool: &impl Spool, account: &str) -> Vec<String> {
    spool
        .peek(account, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.record.conversion.conversion_id)
        .collect()
}

pub(crate) async fn ids_of(spool: &impl Spool, account: &str) -> Vec<u64> {
    spool
        .peek(account, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect()
}

pub(crate) fn all_letters() -> DeadLetterQuery {
    DeadLetterQuery {
        account: None,
        after: 0,
        limit: 10_000,
    }
}

/// Counts, bytes and oldest agree with what the queues hold.
async fn assert_counts(spool: &impl Spool, accounts: &[&str]) {
    let mut total = 0;
    for a in accounts {
        let entries = spool.peek(a, 10_000).await.unwrap();
        let backlog = spool.account_backlog(a).await.unwrap();
        assert_eq!(spool.backlog(a), entries.len(), "{a}: backlog");
        assert_eq!(backlog.events, entries.len() as u64, "{a}: account_backlog");
        let bytes: u64 = entries
            .iter()
            .map(|e| super::codec::encode(&e.record).unwrap().len() as u64)
            .sum();
        assert_eq!(spool.account_bytes(a), bytes, "{a}: account_bytes");
        assert_eq!(backlog.bytes, bytes, "{a}: account_backlog bytes");
        assert_eq!(
            backlog.oldest_ms,
            entries.first().map(|e| e.record.received_at_ms),
            "{a}: oldest"
        );
        total += bytes;
    }
    assert_eq!(spool.bytes(), total, "bytes");
}

pub async fn order_per_account_and_peek_after(mut t: impl Subject) {
    let spool = t.open(Limits::default()).await;
    let got = spool
        .append(vec![
            new("a", "a1"),
            new("b", "b1"),
            new("a", "a2"),
            new("a", "a3"),
        ])
        .await
        .unwrap();
    assert_eq!(got, [Admission::Queued; 4]);
    assert_eq!(waiting(&*spool, "a").await, ["a1", "a2", "a3"]);
    assert_eq!(waiting(&*spool, "b").await, ["b1"]);
    let ids = ids_of(&*spool, "a").await;
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    assert_peek_after(&*spool, &ids).await;
    // Ids grow per account, with every append.
    spool.append(vec![new("b", "b2")]).await.unwrap();
    let b = ids_of(&*spool, "b").await;
    assert!(b[1] > b[0]);
    // The same after another write (a durable implementation may hold new records apart until one).
    spool.ack("b", &b[..1]).await.unwrap();
    assert_peek_after(&*spool, &ids).await;
    assert_counts(&*spool, &["a", "b"]).await;
}

/// `peek_after` on account `a`, whose waiting ids are `ids` (three of them).
async fn assert_peek_after(spool: &impl Spool, ids: &[u64]) {
    let after = spool.peek_after("a", ids[0], 10).await.unwrap();
    let got: Vec<u64> = after.entries.iter().map(|e| e.id).collect();
    assert_eq!(got, ids[1..]);
    assert!(after.undecodable.is_empty());
    assert_eq!(after.last_id(), Some(ids[2]));
    assert_eq!(
        spool
            .peek_after("a", ids[2], 10)
            .await
            .unwrap()
            .entries
            .len(),
        0
    );
    let first_two: Vec<u64> = spool
        .peek("a", 2)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(first_two, ids[..2], "at most max, oldest first");
    let one = spool.peek_after("a", ids[0], 1).await.unwrap();
    assert_eq!(one.entries.len(), 1);
    assert_eq!(one.entries[0].id, ids[1]);
    assert!(spool.peek("nobody", 10).await.unwrap().is_empty());
}

pub async fn ack_of_a_subset_leaves_the_rest_in_order(mut t: impl Subject) {
    let spool = t.open(Limits::default()).await;
    spool
        .append((0..5).map(|i| new("a", &format!("c{i}"))).collect())
        .await
        .unwrap();
    spool.append(vec![new("b", "x")]).await.unwrap();
    let ids = ids_of(&*spool, "a").await;
    spool.ack("a", &[ids[1], ids[3]]).await.unwrap();
    assert_eq!(waiting(&*spool, "a").await, ["c0", "c2", "c4"]);
    // Ids not waiting (unknown, already acked, another account's where ids are global) are ignored.
    let b = ids_of(&*spool, "b").await;
    let mut stale = vec![ids[1], 999_999];
    if t.global_ids() {
        stale.push(b[0]);
    }
    spool.ack("a", &stale).await.unwrap();
    assert_eq!(waiting(&*spool, "a").await, ["c0", "c2", "c4"]);
    assert_eq!(waiting(&*spool, "b").await, ["x"]);
    assert_counts(&*spool, &["a", "b"]).await;
    spool.ack("a", &[ids[0], ids[2], ids[4]]).await.unwrap();
    assert_eq!(spool.backlog("a"), 0);
    assert_counts(&*spool, &["a", "b"]).await;
}

pub async fn dedup_inside_and_after_the_window(mut t: impl Subject) {
    let window = Duration::from_secs(10);
    let spool = t
        .open(Limits {
            dedup_window: window,
            ..Limits::default()
        })
        .await;
    let now = now_ms();
    // Seen 5 s ago: a duplicate, whether it is still waiting, delivered or dead-lettered.
    spool
        .append(vec![record("a", "w", now - 5_000)])
        .await
        .unwrap();
    assert_eq!(
        spool.append(vec![new("a", "w")]).await.unwrap(),
        [Admission::Duplicate]
    );
    let ids = ids_of(&*spool, "a").await;
    spool.ack("a", &ids).await.unwrap();
    assert_eq!(
        spool.append(vec![new("a", "w")]).await.unwrap(),
        [Admission::Duplicate]
    );
    spool
        .append(vec![record("a", "d", now - 5_000)])
        .await
        .unwrap();
    let ids = ids_of(&*spool, "a").await;
    spool
        .dead_letter("a", &ids, DeadLetterReason::Rejected, "x")
        .await
        .unwrap();
    assert_eq!(
        spool.append(vec![new("a", "d")]).await.unwrap(),
        [Admission::Duplicate]
    );
    // Seen 20 s ago, beyond the window: new again.
    spool
        .append(vec![record("a", "old", now - 20_000)])
        .await
        .unwrap();
    assert_eq!(
        spool.append(vec![new("a", "old")]).await.unwrap(),
        [Admission::Queued]
    );
    // The key is the account, the SET id and the conversion id.
    assert_eq!(
        spool.append(vec![new("b", "w")]).await.unwrap(),
        [Admission::Queued]
    );
    let mut other_set = new("a", "w");
    other_set.conversion.event_id = "o9d2h".into();
    assert_eq!(
        spool.append(vec![other_set]).await.unwrap(),
        [Admission::Queued]
    );
    assert_counts(&*spool, &["a", "b"]).await;
}

pub async fn a_repeat_within_one_append_is_a_duplicate(mut t: impl Subject) {
    let spool = t.open(Limits::default()).await;
    let got = spool
        .append(vec![
            new("a", "x"),
            new("a", "x"),
            new("a", "y"),
            new("a", "y"),
        ])
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            Admission::Queued,
            Admission::Duplicate,
            Admission::Queued,
            Admission::Duplicate
        ]
    );
    assert_eq!(waiting(&*spool, "a").await, ["x", "y"]);
}

pub async fn a_full_spool_refuses_a_call_whole(mut t: impl Subject) {
    let spool = holding(&mut t, 5).await;
    spool
        .append((0..4).map(|i| new("a", &format!("c{i:03}"))).collect())
        .await
        .unwrap();
    let refused = spool.append(vec![new("a", "c100"), new("a", "c101")]).await;
    assert_eq!(refused, Err(SpoolError::Full));
    assert_eq!(spool.backlog("a"), 4, "nothing of a refused call is kept");
    // Nothing of it was taken for seen either.
    let ids = ids_of(&*spool, "a").await;
    spool.ack("a", &ids[..2]).await.unwrap();
    assert_eq!(
        spool
            .append(vec![new("a", "c100"), new("a", "c101")])
            .await
            .unwrap(),
        [Admission::Queued, Admission::Queued]
    );
    assert_counts(&*spool, &["a"]).await;
}

pub async fn a_refusal_for_room_is_reported_until_room_is_free(mut t: impl Subject) {
    let spool = holding(&mut t, 5).await;
    assert!(spool.health().is_ok());
    let mut n = 0;
    let refused = loop {
        match spool.append(vec![new("a", &format!("c{n:03}"))]).await {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n <= 6, "the bound holds");
    };
    assert_eq!(refused, SpoolError::Full);
    // What ingest was told is what readiness and metrics are told.
    let why = spool
        .health()
        .expect_err("a call refused for room is reported");
    assert!(why.contains("full"), "{why}");
    // While it says so, every call is refused, even one smaller than what still fits.
    assert_eq!(
        spool.append(vec![new("a", "x")]).await,
        Err(SpoolError::Full)
    );
    // Acks make room: it says it takes events again, and does.
    let ids = ids_of(&*spool, "a").await;
    spool.ack("a", &ids[..2]).await.unwrap();
    assert!(spool.health().is_ok());
    assert_eq!(
        spool.append(vec![new("a", "c100")]).await.unwrap(),
        [Admission::Queued]
    );
}

pub async fn appends_wake_the_account(mut t: impl Subject) {
    let spool = t.open(Limits::default()).await;
    let a = spool.changed("a");
    spool.append(vec![new("a", "x")]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), a.notified())
        .await
        .expect("an append notifies its account");
    let ids = ids_of(&*spool, "a").await;
    spool
        .dead_letter("a", &ids, DeadLetterReason::Rejected, "x")
        .await
        .unwrap();
    let letters = spool.dead_letters(all_letters()).await.unwrap();
    let records = remapped(&letters);
    spool.replay("a", records).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), a.notified())
        .await
        .expect("a replay notifies its account");
}

pub async fn dead_letters_are_bounded_and_evictions_counted(mut t: impl Subject) {
    let spool = t
        .open(Limits {
            max_dead_letters: 3,
            ..Limits::default()
        })
        .await;
    spool
        .append((0..5).map(|i| new("a", &format!("d{i}"))).collect())
        .await
        .unwrap();
    spool.append(vec![new("b", "keep")]).await.unwrap();
    let ids = ids_of(&*spool, "a").await;
    spool
        .dead_letter("a", &ids[..2], DeadLetterReason::Rejected, "X refused it")
        .await
        .unwrap();
    spool
        .dead_letter("a", &ids[2..], DeadLetterReason::Expired, "too old")
        .await
        .unwrap();
    // Not waiting: ignored.
    spool
        .dead_letter("a", &[ids[0], 999_999], DeadLetterReason::Rejected, "again")
        .await
        .unwrap();
    assert_eq!(spool.backlog("a"), 0);
    assert_eq!(waiting(&*spool, "b").await, ["keep"]);
    let kept = spool.dead_letters(all_letters()).await.unwrap();
    let names: Vec<&str> = kept
        .iter()
        .map(|d| d.conversion.as_ref().unwrap().conversion_id.as_str())
        .collect();
    assert_eq!(names, ["d2", "d3", "d4"], "the oldest are evicted first");
    assert!(kept.windows(2).all(|w| w[0].id < w[1].id));
    assert!(kept
        .iter()
        .all(|d| d.reason == DeadLetterReason::Expired && d.message == "too old"));
    let counts = spool.dead_letter_counts().await.unwrap();
    assert_eq!((counts.kept, counts.evicted), (3, 2));
    assert_counts(&*spool, &["a", "b"]).await;
}

/// The letters as today's mapping makes them, to replay.
fn remapped(letters: &[super::DeadLetter]) -> Vec<(u64, Record)> {
    let rules = rules();
    letters
        .iter()
        .map(|d| (d.id, d.remapped(&rules).expect("a decodable letter")))
        .collect()
}

/// A spool with room for `records` records (and half of one more) of the size `new` makes.
async fn holding<T: Subject>(t: &mut T, records: u64) -> Arc<T::S> {
    let one = super::codec::encode(&new("a", "c000")).unwrap().len() as u64;
    let max_bytes = t.room_for(one, records);
    t.open(Limits {
        max_bytes,
        ..Limits::default()
    })
    .await
}

fn rules() -> Rules {
    Rules {
        accounts: ["a", "b"]
            .into_iter()
            .map(|a| {
                let rules = AccountRules {
                    pixel_id: "o9d7n".into(),
                    events: [("purchase".to_string(), "o9d2h".to_string())].into(),
                    default_phone_region: phonenumber::country::Id::US,
                };
                (a.to_string(), rules)
            })
            .collect(),
        max_event_age: Duration::from_secs(86400),
        max_event_bytes: 64 << 10,
    }
}

pub async fn dead_letters_page_replay_remapped_and_delete(mut t: impl Subject) {
    let spool = t.open(Limits::default()).await;
    let mut batch: Vec<Record> = (0..6).map(|i| new("a", &format!("a{i}"))).collect();
    batch.extend((0..2).map(|i| new("b", &format!("b{i}"))));
    spool.append(batch).await.unwrap();
    for account in ["a", "b"] {
        let ids = ids_of(&*spool, account).await;
        spool
            .dead_letter(account, &ids, DeadLetterReason::NotFound, "unknown event")
            .await
            .unwrap();
    }
    // Pages of two, account a only, in order, each after the previous page's last id.
    let (mut seen, mut after) = (Vec::new(), 0);
    loop {
        let q = DeadLetterQuery {
            account: Some("a".into()),
            after,
            limit: 2,
        };
        let page = spool.dead_letters(q).await.unwrap();
        let Some(last) = page.last() else { break };
        assert!(page.len() <= 2);
        after = last.id;
        seen.extend(
            page.iter()
                .map(|d| d.conversion.clone().unwrap().conversion_id),
        );
    }
    assert_eq!(seen, ["a0", "a1", "a2", "a3", "a4", "a5"]);

    // Replay three of a's with today's mapping: back in the queue with the new SET id.
    let q = DeadLetterQuery {
        account: Some("a".into()),
        after: 0,
        limit: 3,
    };
    let letters = spool.dead_letters(q).await.unwrap();
    let records = remapped(&letters);
    let q = DeadLetterQuery {
        account: Some("b".into()),
        after: 0,
        limit: 1,
    };
    let b_id = spool.dead_letters(q).await.unwrap()[0].id;
    let mut with_foreign = records.clone();
    if t.global_ids() {
        with_foreign.push((b_id, records[0].1.clone()));
    }
    assert_eq!(
        spool.replay("a", with_foreign).await.unwrap(),
        3,
        "b's letter is not a's"
    );
    assert_eq!(
        spool.replay("a", records).await.unwrap(),
        0,
        "already replayed"
    );
    let queued = spool.peek("a", 10).await.unwrap();
    let names: Vec<&str> = queued
        .iter()
        .map(|e| e.record.conversion.conversion_id.as_str())
        .collect();
    assert_eq!(names, ["a0", "a1", "a2"]);
    assert!(queued
        .iter()
        .all(|e| e.record.conversion.event_id == "o9d2h"));
    // A replay bypasses dedup: the same keys were seen, they are queued all the same.
    assert_eq!(spool.dead_letter_counts().await.unwrap().kept, 5);
    assert_counts(&*spool, &["a", "b"]).await;

    // Delete: only the named account's letters go.
    let a_ids: Vec<u64> = spool
        .dead_letters(DeadLetterQuery {
            account: Some("a".into()),
            ..all_letters()
        })
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(spool.delete_dead_letters("b", &a_ids).await.unwrap(), 0);
    assert_eq!(spool.delete_dead_letters("a", &a_ids).await.unwrap(), 3);
    assert_eq!(spool.dead_letters(all_letters()).await.unwrap().len(), 2);
}

pub async fn a_replay_that_does_not_fit_moves_nothing(mut t: impl Subject) {
    let spool = holding(&mut t, 3).await;
    spool
        .append((0..3).map(|i| new("a", &format!("c{i:03}"))).collect())
        .await
        .unwrap();
    let ids = ids_of(&*spool, "a").await;
    spool
        .dead_letter("a", &ids[..2], DeadLetterReason::Rejected, "x")
        .await
        .unwrap();
    // Filled up again, with what room the dead letters leave (an implementation may count them).
    let mut n = 0;
    while spool
        .append(vec![new("a", &format!("d{n:03}"))])
        .await
        .is_ok()
    {
        n += 1;
        assert!(n <= 3, "the bound holds");
    }
    let backlog = spool.backlog("a");
    let letters = spool.dead_letters(all_letters()).await.unwrap();
    let records = remapped(&letters);
    assert_eq!(spool.replay("a", records).await, Err(SpoolError::Full));
    assert_eq!(spool.dead_letter_counts().await.unwrap().kept, 2);
    assert_eq!(spool.backlog("a"), backlog);
}

/// What can be observed of a spool, to compare before and after a restart.
#[derive(Debug, PartialEq)]
struct Observed {
    waiting: Vec<(String, Vec<(u64, Record)>)>,
    bytes: u64,
    bound: super::BoundUsage,
    letters: Vec<(u64, String, DeadLetterReason, Option<String>)>,
    evicted: u64,
}

async fn observe(spool: &impl Spool, accounts: &[&str]) -> Observed {
    let mut waiting = Vec::new();
    for a in accounts {
        let entries = spool.peek(a, 10_000).await.unwrap();
        waiting.push((
            a.to_string(),
            entries.into_iter().map(|e| (e.id, e.record)).collect(),
        ));
    }
    let letters = spool
        .dead_letters(all_letters())
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            (
                d.id,
                d.account,
                d.reason,
                d.conversion.map(|c| c.conversion_id),
            )
        })
        .collect();
    Observed {
        waiting,
        bytes: spool.bytes(),
        bound: spool.bound_usage(),
        letters,
        evicted: spool.dead_letter_counts().await.unwrap().evicted,
    }
}

/// Everything above, again after a restart: clean, and with the handle dropped without a close.
pub async fn everything_survives_a_restart(mut t: impl Subject) {
    for clean in [true, false] {
        let spool = t
            .open(Limits {
                max_dead_letters: 2,
                ..Limits::default()
            })
            .await;
        let base = if clean { "clean" } else { "dropped" };
        spool
            .append((0..6).map(|i| new("a", &format!("{base}{i}"))).collect())
            .await
            .unwrap();
        spool
            .append(vec![new("b", &format!("{base}-b"))])
            .await
            .unwrap();
        let ids = ids_of(&*spool, "a").await;
        spool.ack("a", &ids[..1]).await.unwrap();
        spool
            .dead_letter("a", &ids[1..4], DeadLetterReason::Rejected, "refused")
            .await
            .unwrap();
        let before = observe(&*spool, &["a", "b"]).await;
        let Some(spool) = t.reopen(spool, clean).await else {
            return;
        };
        assert_eq!(
            observe(&*spool, &["a", "b"]).await,
            before,
            "clean: {clean}"
        );
        assert_counts(&*spool, &["a", "b"]).await;
        // The dedup index survived: every key seen before is still a duplicate.
        let again: Vec<Record> = (0..6)
            .map(|i| new("a", &format!("{base}{i}")))
            .chain([new("b", &format!("{base}-b"))])
            .collect();
        let n = again.len();
        assert_eq!(
            spool.append(again).await.unwrap(),
            vec![Admission::Duplicate; n],
            "clean: {clean}"
        );
        // New ids come after the old ones.
        let last_before = ids.last().copied().unwrap_or(0);
        spool
            .append(vec![new("a", &format!("{base}-new"))])
            .await
            .unwrap();
        assert!(ids_of(&*spool, "a").await.last().copied().unwrap_or(0) > last_before);
        // Clean up for the next round.
        for a in ["a", "b"] {
            let ids = ids_of(&*spool, a).await;
            spool.ack(a, &ids).await.unwrap();
        }
        if let Some(s) = t.reopen(spool, true).await {
            drop(s);
        }
    }
}

macro_rules! conformance {
    ($($name:ident => $subject:expr),+ $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test]
                async fn order_per_account_and_peek_after() {
                    super::order_per_account_and_peek_after($subject).await
                }
                #[tokio::test]
                async fn ack_of_a_subset_leaves_the_rest_in_order() {
                    super::ack_of_a_subset_leaves_the_rest_in_order($subject).await
                }
                #[tokio::test]
                async fn dedup_inside_and_after_the_window() {
                    super::dedup_inside_and_after_the_window($subject).await
                }
                #[tokio::test]
                async fn a_repeat_within_one_append_is_a_duplicate() {
                    super::a_repeat_within_one_append_is_a_duplicate($subject).await
                }
                #[tokio::test]
                async fn a_full_spool_refuses_a_call_whole() {
                    super::a_full_spool_refuses_a_call_whole($subject).await
                }
                #[tokio::test]
                async fn a_refusal_for_room_is_reported_until_room_is_free() {
                    super::a_refusal_for_room_is_reported_until_room_is_free($subject).await
                }
                #[tokio::test]
                async fn appends_wake_the_account() {
                    super::appends_wake_the_account($subject).await
                }
                #[tokio::test]
                async fn dead_letters_are_bounded_and_evictions_counted() {
                    super::dead_letters_are_bounded_and_evictions_counted($subject).await
                }
                #[tokio::test]
                async fn dead_letters_page_replay_remapped_and_delete() {
                    super::dead_letters_page_replay_remapped_and_delete($subject).await
                }
                #[tokio::test]
                async fn a_replay_that_does_not_fit_moves_nothing() {
                    super::a_replay_that_does_not_fit_moves_nothing($subject).await
                }
                #[tokio::test]
                async fn everything_survives_a_restart() {
                    super::everything_survives_a_restart($subject).await
                }
            }
        )+
    };
}

conformance! {
    memory => Memory,
    disk => Disk::default(),
    redis => Redis::default(),
}
