//! The disk spool's own tests (the seam's contract is checked by `spool::conformance`).
use super::intake_log::IntakeRecord;
use super::*;
use crate::conversion::Conversion;
use crate::reasons::DeadLetterReason;
use crate::spool::conformance::{all_letters, ids_of};
use crate::spool::{Admission, Entry};
use std::path::Path;

fn opts(dir: &Path) -> DiskSpoolOptions {
    DiskSpoolOptions {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        max_dead_letters: 3,
        dedup_window: Duration::from_secs(3600),
        cache_bytes: 1 << 20,
        min_free_bytes: 0,
    }
}

fn record(account: &str, id: &str) -> Record {
    Record {
        account: account.into(),
        received_at_ms: now_ms(),
        event_name: Some("purchase".into()),
        conversion: Conversion {
            value: Some("1.00".into()),
            ..Conversion::minimal("2026-11-28T00:00:00.000Z", "o9d2g", "t", id)
        },
    }
}

fn ids(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.record.conversion.conversion_id.clone())
        .collect()
}

#[tokio::test]
async fn what_was_committed_is_there_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    let got = spool
        .append(vec![
            record("a", "1"),
            record("a", "2"),
            record("b", "1"),
            record("a", "1"),
        ])
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            Admission::Queued,
            Admission::Queued,
            Admission::Queued,
            Admission::Duplicate
        ]
    );
    let first = spool.peek("a", 1).await.unwrap();
    spool.ack("a", &[first[0].id]).await.unwrap();
    spool.limiter_state().save("acct", 42).await.unwrap();
    let bytes = spool.bytes();
    assert!(bytes > 0);
    spool.close().await.unwrap();
    drop(spool);

    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    assert_eq!((spool.backlog("a"), spool.backlog("b")), (1, 1));
    assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["2"]);
    assert_eq!(spool.limiter_state().load("acct"), Some(42));
    assert_eq!(spool.bytes(), bytes, "counters are persisted, not rebuilt");
    // The dedup index survived too: "1" was delivered, a resend is still a duplicate.
    assert_eq!(
        spool.append(vec![record("a", "1")]).await.unwrap(),
        [Admission::Duplicate]
    );
    assert_eq!(
        spool.append(vec![record("a", "3")]).await.unwrap(),
        [Admission::Queued]
    );
    let waiting = spool.peek("a", 10).await.unwrap();
    assert_eq!(ids(&waiting), ["2", "3"]);
    // A dispatcher with "2" in hand takes what comes after it.
    assert_eq!(
        ids(&spool
            .peek_after("a", waiting[0].id, 10)
            .await
            .unwrap()
            .entries),
        ["3"]
    );
    assert!(spool
        .peek_after("a", waiting[1].id, 10)
        .await
        .unwrap()
        .entries
        .is_empty());
}

/// What the storage thread logs but has not yet put into redb when the process dies (kill -9 is tested
/// end to end in tests/delivery.rs; here the log is written by hand to know exactly what is in it).
#[tokio::test]
async fn an_unclean_stop_loses_nothing_the_intake_log_holds_and_recovers_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    spool.append(vec![record("a", "1")]).await.unwrap();
    spool.close().await.unwrap();
    drop(spool);
    let bytes_before = {
        let spool = DiskSpool::open(opts(dir.path())).unwrap();
        let b = spool.bytes();
        spool.close().await.unwrap();
        b
    };

    // The process died after logging three events: the first was in redb already (a crash between the
    // commit and the log's reset), the other two only in the log.
    let logged = |seq: u64, log_seq: u64, r: Record| IntakeRecord {
        seq,
        log_seq,
        received_at_ms: r.received_at_ms,
        key: dedup_key(&r),
        account: r.account.clone(),
        bytes: codec::encode(&r).unwrap(),
    };
    let extra: Vec<IntakeRecord> = vec![
        logged(1, 0, record("a", "1")),
        logged(2, 1, record("a", "2")),
        logged(3, 2, record("b", "3")),
    ];
    let (mut log, _) = IntakeLog::open(&dir.path().join("intake.log")).unwrap();
    log.append(&extra).unwrap();
    drop(log);

    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    assert_eq!((spool.backlog("a"), spool.backlog("b")), (2, 1));
    assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["1", "2"]);
    let added: u64 = extra[1..].iter().map(|r| r.bytes.len() as u64).sum();
    assert_eq!(spool.bytes(), bytes_before + added);
    // The dedup index knows the recovered events; new ones get ids after theirs.
    assert_eq!(
        spool
            .append(vec![record("a", "2"), record("b", "3"), record("a", "4")])
            .await
            .unwrap(),
        [
            Admission::Duplicate,
            Admission::Duplicate,
            Admission::Queued
        ]
    );
    let waiting = spool.peek("a", 10).await.unwrap();
    assert_eq!(ids(&waiting), ["1", "2", "4"]);
    assert!(waiting[2].id > 3);
    spool.close().await.unwrap();
    drop(spool);

    // Recovered once: the log starts over after it, so a second start adds nothing.
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    assert_eq!((spool.backlog("a"), spool.backlog("b")), (3, 1));
    assert_eq!(ids(&spool.peek("b", 10).await.unwrap()), ["3"]);
}

#[tokio::test]
async fn concurrent_appends_are_group_committed_and_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = spool.clone();
        tasks.push(tokio::spawn(async move {
            s.append(vec![record("a", &format!("c{i}"))]).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), [Admission::Queued]);
    }
    assert_eq!(spool.backlog("a"), 200);
    assert_eq!(spool.peek("a", 1000).await.unwrap().len(), 200);
}

#[tokio::test]
async fn expired_dedup_entries_are_purged() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.dedup_window = Duration::from_millis(1);
    let spool = DiskSpool::open(o).unwrap();
    let mut old = record("a", "x");
    old.received_at_ms -= 10_000;
    spool.append(vec![old]).await.unwrap();
    let w = spool.peek("a", 1).await.unwrap();
    spool.ack("a", &[w[0].id]).await.unwrap();
    // The ack's commit purged the key; the same event is new again.
    assert_eq!(
        spool.append(vec![record("a", "x")]).await.unwrap(),
        [Admission::Queued]
    );
}

#[tokio::test]
async fn the_purge_removes_expired_entries_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.dedup_window = Duration::from_millis(1);
    let spool = DiskSpool::open(o.clone()).unwrap();
    let mut old = record("a", "x");
    old.received_at_ms -= 10_000;
    spool.append(vec![old, record("a", "y")]).await.unwrap();
    let w = spool.peek("a", 10).await.unwrap();
    spool.ack("a", &[w[0].id]).await.unwrap();
    spool.close().await.unwrap();
    drop(spool);
    // The ack's commit purged the expired key (x); y may have expired by then too.
    let db = redb::Database::open(dir.path().join("spool.redb")).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    let log = txn.open_table(schema::DEDUP_LOG).unwrap();
    let left = redb::ReadableTableMetadata::len(&log).unwrap();
    assert!(left <= 1, "{left} entries left in the dedup log");
    drop(log);
    drop(txn);
    drop(db);
    let spool = DiskSpool::open(o).unwrap();
    assert_eq!(
        spool.append(vec![record("a", "x")]).await.unwrap(),
        [Admission::Queued]
    );
}

/// Writes `bytes` as account `a`'s event `id` straight into the file, as damage would.
fn write_raw_event(dir: &Path, id: u64, bytes: &[u8]) {
    let db = redb::Database::open(dir.join("spool.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(schema::EVENTS)
        .unwrap()
        .insert(("a", id), bytes)
        .unwrap();
    txn.commit().unwrap();
}

#[tokio::test]
async fn a_record_that_no_longer_decodes_is_reported_apart_and_dead_lettered_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    spool
        .append(vec![record("a", "1"), record("a", "2"), record("a", "3")])
        .await
        .unwrap();
    let ids_before: Vec<u64> = ids_of(&*spool, "a").await;
    spool.close().await.unwrap();
    drop(spool);
    // The middle record's bytes are damaged.
    write_raw_event(dir.path(), ids_before[1], &[0xFF, 1, 2, 3, 4, 5, 6]);

    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    let peek = spool.peek_after("a", 0, 10).await.unwrap();
    assert_eq!(ids(&peek.entries), ["1", "3"], "the others are still read");
    assert_eq!(peek.undecodable.len(), 1);
    assert_eq!(peek.undecodable[0].id, ids_before[1]);
    assert_eq!(peek.undecodable[0].raw_bytes, 7);
    assert_eq!(peek.last_id(), Some(ids_before[2]));
    // Its account's oldest is still known (the damaged record is skipped only if it comes first).
    assert!(spool
        .account_backlog("a")
        .await
        .unwrap()
        .oldest_ms
        .is_some());
    spool
        .dead_letter(
            "a",
            &[ids_before[1]],
            DeadLetterReason::Corrupt,
            "the stored record does not decode",
        )
        .await
        .unwrap();
    let dead = spool.dead_letters(all_letters()).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, DeadLetterReason::Corrupt);
    assert_eq!(dead[0].conversion, None);
    assert_eq!(dead[0].raw_bytes, Some(7));
    assert_eq!(dead[0].message, "the stored record does not decode");
    assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["1", "3"]);
    assert_eq!(spool.backlog("a"), 2);
}

#[tokio::test]
async fn readers_do_not_wait_for_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    spool
        .append(vec![record("a", "1"), record("a", "2")])
        .await
        .unwrap();
    let first = spool.peek("a", 1).await.unwrap()[0].id;
    // The next transaction (this ack's) is held open just before its commit.
    let hold = spool.hold_next_commit();
    let acking = tokio::spawn({
        let s = spool.clone();
        async move { s.ack("a", &[first]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!acking.is_finished(), "the commit is held");
    let limit = Duration::from_secs(5);
    let peek = tokio::time::timeout(limit, spool.peek_after("a", 0, 10))
        .await
        .expect("peek answers during a commit")
        .unwrap();
    assert_eq!(
        ids(&peek.entries),
        ["1", "2"],
        "the ack is not visible before its commit"
    );
    let backlog = tokio::time::timeout(limit, spool.account_backlog("a"))
        .await
        .expect("the backlog answers during a commit")
        .unwrap();
    assert_eq!(backlog.events, 2);
    let counts = tokio::time::timeout(limit, spool.dead_letter_counts())
        .await
        .expect("dead-letter counts answer during a commit")
        .unwrap();
    assert_eq!(counts.kept, 0);
    // /metrics, through the admin router, answers too.
    let metrics = tokio::time::timeout(limit, metrics_of(spool.clone()))
        .await
        .expect("/metrics answers during a commit");
    assert!(
        metrics.contains("conversion_gateway_spool_events{account=\"a\"} 2"),
        "{metrics}"
    );
    drop(hold);
    acking.await.unwrap().unwrap();
    assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["2"]);
}

/// `/metrics` of an admin router over `spool`, with one account `a`.
async fn metrics_of(spool: Arc<DiskSpool>) -> String {
    use tower::ServiceExt;
    let metrics = Arc::new(crate::metrics::Metrics::new(["a"]));
    let app = Arc::new(crate::api::AppState {
        rules: crate::conversion::Rules {
            accounts: Default::default(),
            max_event_age: Duration::from_secs(86400),
            max_event_bytes: 64 << 10,
        },
        spool: spool.clone(),
        keys: crate::api::ApiKeys::new([], Some(crate::api::Scope::Every)),
        privacy: Arc::new(crate::privacy::Privacy::off()),
        max_body_bytes: 1024,
        body_timeout: Duration::from_secs(30),
        max_events_per_request: 10,
        body_budget: crate::api::body_budget::BodyBudget::new(64 << 20),
        shutdown: crate::shutdown::Shutdown::never(),
        now: chrono::Utc::now,
        metrics,
    });
    let admin = Arc::new(crate::api::AdminState {
        app,
        keys: crate::api::ApiKeys::new([], None),
        accounts: vec![crate::api::AccountView {
            name: "a".into(),
            ad_account_id: "18ce552mlaq".into(),
            pixel_id: "o9d7n".into(),
            rate_limit_events: 60_000,
            rate_limit_window: Duration::from_secs(900),
            status: Default::default(),
        }],
        limiter: Arc::new(crate::limiter::EmbeddedLimiter::new(
            Default::default(),
            spool.limiter_state(),
        )),
        ready_requires_spool: true,
        shared: None,
    });
    let response = crate::api::admin_app(admin)
        .oneshot(
            axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn a_stopped_storage_thread_refuses_everything_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    spool.append(vec![record("a", "1")]).await.unwrap();
    assert!(spool.health().is_ok());
    let fatal = spool.fatal();
    spool.crash_storage_thread();
    let cause = tokio::time::timeout(Duration::from_secs(5), fatal)
        .await
        .expect("fatal resolves");
    assert!(cause.contains("storage thread stopped"), "{cause}");
    let why = spool.health().unwrap_err();
    assert!(why.contains("storage thread stopped"), "{why}");
    assert!(spool.append(vec![record("a", "2")]).await.is_err());
    assert!(spool.ack("a", &[1]).await.is_err());
    // What was kept before is still in the files: a restart finds it.
    drop(spool);
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["1"]);
}

/// The moment between a commit and the removal of its events from `pending`: a reader that saw them
/// pending and opened its snapshot after the commit must take the snapshot's word (here: acked).
#[tokio::test]
async fn a_pending_copy_older_than_the_snapshot_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    let e = record("a", "acked");
    spool
        .append(vec![e.clone(), record("a", "kept")])
        .await
        .unwrap();
    let first = spool.peek("a", 1).await.unwrap()[0].id;
    spool.ack("a", &[first]).await.unwrap();
    // Put back a stale pending copy of the acked event, as a reader could have seen it.
    pending::write(&spool.readers.pending).insert(intake_log::IntakeRecord {
        seq: first,
        log_seq: 0,
        received_at_ms: e.received_at_ms,
        key: dedup_key(&e),
        account: "a".into(),
        bytes: codec::encode(&e).unwrap(),
    });
    assert_eq!(ids(&spool.peek("a", 10).await.unwrap()), ["kept"]);
    assert_eq!(
        spool.account_backlog("a").await.unwrap().oldest_ms,
        Some(spool.peek("a", 1).await.unwrap()[0].record.received_at_ms)
    );
    pending::write(&spool.readers.pending).clear();
}

/// What the dead letters store is kept in `meta`; a spool made before it was (no `dead_bytes` key) has
/// it counted at start-up, so the bound holds for files written by an older version too.
#[tokio::test]
async fn dead_letter_bytes_count_against_the_bound_and_are_recounted_for_an_old_spool() {
    let dir = tempfile::tempdir().unwrap();
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    let empty = spool.bound_usage().used_bytes;
    spool
        .append((0..3).map(|i| record("a", &i.to_string())).collect())
        .await
        .unwrap();
    let queued = spool.bound_usage().used_bytes;
    let ids: Vec<u64> = ids_of(&*spool, "a").await;
    spool
        .dead_letter("a", &ids, DeadLetterReason::Rejected, "refused")
        .await
        .unwrap();
    let dead = spool.bound_usage().used_bytes;
    // The events left the queue, their dead letters (larger: JSON with the reason) took their place.
    assert_eq!(spool.bytes(), 0);
    assert!(dead > queued && queued > empty, "{empty} {queued} {dead}");
    spool.close().await.unwrap();
    drop(spool);

    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    assert_eq!(
        spool.bound_usage().used_bytes,
        dead,
        "kept across a restart"
    );
    spool.close().await.unwrap();
    drop(spool);

    // An older version's file: no dead_bytes key.
    {
        let db = redb::Database::open(dir.path().join("spool.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(schema::META).unwrap();
            meta.remove(schema::MetaKey::DeadBytes.name().as_str())
                .unwrap()
                .expect("the key was there");
        }
        txn.commit().unwrap();
    }
    let spool = DiskSpool::open(opts(dir.path())).unwrap();
    assert_eq!(
        spool.bound_usage().used_bytes,
        dead,
        "recounted at start-up"
    );
    // Deleting them gives their room back.
    let letters = spool.dead_letters(all_letters()).await.unwrap();
    let ids: Vec<u64> = letters.iter().map(|d| d.id).collect();
    assert_eq!(spool.delete_dead_letters("a", &ids).await.unwrap(), 3);
    let after = spool.bound_usage().used_bytes;
    assert!(
        after < queued,
        "{after} vs {queued}: only the dedup entries are left"
    );
    assert!(after > empty);
}
