//! What only a shared spool does: replicas taking over a dead one's events, keeping their own claims,
//! deduplicating each other's events, seeing each other's appends; and Redis going away and back.

use super::*;
use crate::config::RedisUrl;
use crate::conversion::Conversion;
use crate::redis_store::server::RedisServer;

fn replica(
    server: &RedisServer,
    consumer: &str,
    claim_idle: Duration,
) -> impl std::future::Future<Output = Arc<RedisSpool>> {
    replica_of(server, consumer, claim_idle, &["a"])
}

/// A replica serving the given accounts.
fn replica_of(
    server: &RedisServer,
    consumer: &str,
    claim_idle: Duration,
    accounts: &[&str],
) -> impl std::future::Future<Output = Arc<RedisSpool>> {
    let store = Store::open(&RedisUrl::for_tests(&server.url()), "cg").unwrap();
    RedisSpool::open(
        store,
        RedisSpoolOptions {
            accounts: accounts.iter().map(|a| a.to_string()).collect(),
            consumer: consumer.into(),
            claim_idle,
            dedup_window: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            max_dead_letters: 100,
        },
    )
}

fn record(conversion_id: &str) -> Record {
    Record {
        account: "a".into(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        event_name: None,
        conversion: Conversion::minimal("2026-11-28T00:00:00.000Z", "o9d2g", "t", conversion_id),
    }
}

fn names(peek: &Peek) -> Vec<String> {
    peek.entries
        .iter()
        .map(|e| e.record.conversion.conversion_id.clone())
        .collect()
}

#[tokio::test]
async fn a_dead_replicas_events_are_taken_over_a_live_ones_are_not() {
    let server = RedisServer::start();
    let idle = Duration::from_secs(1);
    let (one, two, three) = (
        replica(&server, "one", idle).await,
        replica(&server, "two", idle).await,
        replica(&server, "three", idle).await,
    );
    // Two requests: a request's records for one account are one entry, handed to one replica.
    for pair in [["c0", "c1"], ["c2", "c3"]] {
        one.append(pair.iter().map(|c| record(c)).collect())
            .await
            .unwrap();
    }
    // One takes one request's, three the other's; each has its own.
    assert_eq!(
        names(&one.peek_after("a", 0, 2).await.unwrap()),
        ["c0", "c1"]
    );
    assert_eq!(
        names(&three.peek_after("a", 0, 2).await.unwrap()),
        ["c2", "c3"]
    );
    assert!(two.peek_after("a", 0, 10).await.unwrap().entries.is_empty());
    // Three dies (its claims are no longer refreshed); one lives on, holding its batch well past
    // claim_idle (as while X is down).
    drop(three);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let taken = two.peek_after("a", 0, 10).await.unwrap();
    assert_eq!(
        names(&taken),
        ["c2", "c3"],
        "the dead replica's, not the live one's"
    );
    assert_eq!(
        names(&one.peek_after("a", 0, 10).await.unwrap()),
        ["c0", "c1"]
    );
    one.append(vec![record("c4")]).await.unwrap();
    two.ack("a", &taken.entries.iter().map(|e| e.id).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(two.backlog("a"), 3);
    tokio::time::sleep(POLL * 3).await;
    assert_eq!(
        one.backlog("a"),
        3,
        "another replica's ack is seen at the next poll"
    );
}

#[tokio::test]
async fn replicas_deduplicate_and_see_each_others_events() {
    let server = RedisServer::start();
    let idle = Duration::from_secs(60);
    let (one, two) = (
        replica(&server, "one", idle).await,
        replica(&server, "two", idle).await,
    );
    let woken = two.changed("a");
    assert_eq!(
        one.append(vec![record("x")]).await.unwrap(),
        [Admission::Queued]
    );
    assert_eq!(
        two.append(vec![record("x"), record("y")]).await.unwrap(),
        [Admission::Duplicate, Admission::Queued],
        "the same event POSTed to another replica is queued once"
    );
    tokio::time::timeout(Duration::from_secs(2), woken.notified())
        .await
        .expect("woken for its account");
    // One sees the shared backlog (two queued "y") once it has polled.
    tokio::time::sleep(POLL * 3).await;
    assert_eq!(one.backlog("a"), 2);
    let backlog = one.account_backlog("a").await.unwrap();
    assert_eq!(backlog.events, 2);
    assert!(backlog.oldest_ms.is_some());
    // Each replica's unacknowledged events are its own.
    two.peek_after("a", 0, 10).await.unwrap();
    tokio::time::sleep(POLL * 3).await;
    assert_eq!((one.held_here("a"), two.held_here("a")), (0, 2));
}

#[tokio::test]
async fn nothing_is_accepted_while_redis_is_down_and_it_resumes() {
    let mut server = RedisServer::start();
    let spool = replica(&server, "one", Duration::from_secs(60)).await;
    spool.append(vec![record("before")]).await.unwrap();
    assert!(spool.health().is_ok());
    server.kill();
    let refused = spool.append(vec![record("during")]).await;
    assert!(
        matches!(&refused, Err(SpoolError::Unavailable(why)) if why.contains("Redis")),
        "{refused:?}"
    );
    let why = spool.health().unwrap_err();
    assert!(why.contains("Redis"), "{why}");
    server.restart();
    let mut back = false;
    for _ in 0..50 {
        if spool.append(vec![record("after")]).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "appends resume once Redis is back");
    assert!(spool.health().is_ok());
    // The write acknowledged before the kill was fsynced and replayed; the refused one is not there.
    assert_eq!(
        names(&spool.peek_after("a", 0, 10).await.unwrap()),
        ["before", "after"]
    );
}

/// Redis out of memory (`maxmemory`, `noeviction`) refuses the write whole: no 202, nothing half-kept.
#[tokio::test]
async fn a_redis_out_of_memory_refuses_a_request_whole() {
    let server = RedisServer::start_with(&["--maxmemory", "4mb"]);
    let spool = replica(&server, "one", Duration::from_secs(60)).await;
    let mut queued = 0;
    let refused = loop {
        let batch: Vec<Record> = (0..100)
            .map(|i| record(&format!("c{queued}-{i}")))
            .collect();
        match spool.append(batch).await {
            Ok(a) => queued += a.len(),
            Err(e) => break e,
        }
        assert!(queued < 1_000_000, "Redis never refused");
    };
    assert!(
        matches!(&refused, SpoolError::Unavailable(why) if why.contains("OOM")),
        "{refused}"
    );
    assert!(queued > 0);
    let got = spool.account_backlog("a").await.unwrap();
    assert_eq!(
        got.events as usize, queued,
        "every accepted request whole, the refused one not at all"
    );
}

/// A replica that took over entries and the one that held them both ack them: they leave once, and
/// their bytes are subtracted once.
#[tokio::test]
async fn an_entry_acked_by_two_replicas_leaves_once() {
    let server = RedisServer::start();
    let idle = Duration::from_secs(1);
    let (one, two) = (
        replica(&server, "one", idle).await,
        replica(&server, "two", idle).await,
    );
    one.append((0..3).map(|i| record(&format!("c{i}"))).collect())
        .await
        .unwrap();
    let held = one.peek_after("a", 0, 10).await.unwrap();
    let ids: Vec<u64> = held.entries.iter().map(|e| e.id).collect();
    // One stalls past claim_idle (its refresh stopped: dropped below); two takes the entries over.
    drop(one);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        names(&two.peek_after("a", 0, 10).await.unwrap()),
        ["c0", "c1", "c2"]
    );
    two.ack("a", &ids).await.unwrap();
    // The first holder comes back and acks what it had sent (a late answer from X).
    let one = replica(&server, "one", idle).await;
    one.ack("a", &ids).await.unwrap();
    assert_eq!(one.backlog("a"), 0);
    let new = record("after");
    let size = codec::encode(&new).unwrap().len() as u64;
    one.append(vec![new]).await.unwrap();
    assert_eq!(
        one.account_bytes("a"),
        size,
        "the bytes were subtracted once"
    );
}

/// Dead letters of different accounts never share an id (their sequence numbers end in the account's
/// slot), so the list of every account's letters pages through all of them.
#[tokio::test]
async fn dead_letter_ids_are_unique_across_accounts() {
    let server = RedisServer::start();
    let spool = replica_of(&server, "one", Duration::from_secs(60), &["b", "a"]).await;
    let mut b = record("b0");
    b.account = "b".into();
    spool
        .append(vec![record("a0"), record("a1"), b])
        .await
        .unwrap();
    let a_ids: Vec<u64> = spool
        .peek("a", 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let b_ids: Vec<u64> = spool
        .peek("b", 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let (x, y) = tokio::join!(
        spool.dead_letter("a", &a_ids, DeadLetterReason::Rejected, "no"),
        spool.dead_letter("b", &b_ids, DeadLetterReason::Rejected, "no"),
    );
    x.unwrap();
    y.unwrap();
    let all = spool
        .dead_letters(DeadLetterQuery {
            account: None,
            after: 0,
            limit: 100,
        })
        .await
        .unwrap();
    let slots: Vec<(String, u64)> = all
        .iter()
        .map(|d| (d.account.clone(), d.id & 1023))
        .collect();
    assert!(
        slots
            .iter()
            .all(|(a, s)| (a == "a" && *s == 0) || (a == "b" && *s == 1)),
        "{slots:?}"
    );
    // Paged one at a time, every letter comes once.
    let (mut after, mut seen) = (0, Vec::new());
    loop {
        let page = spool
            .dead_letters(DeadLetterQuery {
                account: None,
                after,
                limit: 1,
            })
            .await
            .unwrap();
        let Some(d) = page.first() else { break };
        after = d.id;
        seen.push(d.conversion.clone().unwrap().conversion_id);
    }
    seen.sort();
    assert_eq!(seen, ["a0", "a1", "b0"]);
}

fn ids(peek: &Peek) -> Vec<u64> {
    peek.entries.iter().map(|e| e.id).collect()
}

fn size_of(records: &[Record]) -> u64 {
    records
        .iter()
        .map(|r| codec::encode(r).unwrap().len() as u64)
        .sum()
}

/// A request's records are one entry; its records still leave one by one (a batch boundary, an ack
/// of part of it), and what is done of it is never handed out again, here or to another replica.
#[tokio::test]
async fn the_records_of_a_request_leave_one_by_one() {
    let server = RedisServer::start();
    let idle = Duration::from_secs(1);
    let (one, two) = (
        replica(&server, "one", idle).await,
        replica(&server, "two", idle).await,
    );
    let all: Vec<Record> = (0..10).map(|i| record(&format!("c{i}"))).collect();
    one.append(all.clone()).await.unwrap();
    let first = one.peek_after("a", 0, 4).await.unwrap();
    assert_eq!(names(&first), ["c0", "c1", "c2", "c3"]);
    assert_eq!(
        one.held_here("a"),
        10,
        "the whole request is in this replica's hands"
    );
    // The cursor inside the entry: the next peek goes on from it.
    let next = one
        .peek_after("a", first.last_id().unwrap(), 3)
        .await
        .unwrap();
    assert_eq!(names(&next), ["c4", "c5", "c6"]);
    one.ack("a", &ids(&first)).await.unwrap();
    assert_eq!(one.backlog("a"), 6);
    assert_eq!(one.account_bytes("a"), size_of(&all[4..]));
    assert_eq!(one.held_here("a"), 6);
    // A second ack of the same records changes nothing.
    one.ack("a", &ids(&first)).await.unwrap();
    assert_eq!(one.account_bytes("a"), size_of(&all[4..]));
    one.dead_letter("a", &ids(&next)[..1], DeadLetterReason::Rejected, "no")
        .await
        .unwrap();
    assert_eq!(one.backlog("a"), 5);
    assert_eq!(one.account_bytes("a"), size_of(&all[5..]));
    // One stalls; two takes the entry over and gets exactly what is not done.
    drop(one);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rest = two.peek_after("a", 0, 100).await.unwrap();
    assert_eq!(names(&rest), ["c5", "c6", "c7", "c8", "c9"]);
    two.ack("a", &ids(&rest)).await.unwrap();
    assert_eq!((two.backlog("a"), two.account_bytes("a")), (0, 0));
    let letters = two
        .dead_letters(DeadLetterQuery {
            account: Some("a".into()),
            after: 0,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].conversion.as_ref().unwrap().conversion_id, "c4");
    // Nothing is left behind in Redis: the entry and its done indices are gone.
    let mut conn = two.store().conn();
    let done: u64 = redis::cmd("HLEN")
        .arg("{cg:q:a}:done")
        .query_async(&mut conn)
        .await
        .unwrap();
    let len: u64 = redis::cmd("XLEN")
        .arg("{cg:q:a}:q")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((done, len), (0, 0));
}

/// A clean stop hands back what is not done of the entries this replica holds.
#[tokio::test]
async fn a_release_hands_back_what_is_not_done() {
    let server = RedisServer::start();
    let idle = Duration::from_secs(60);
    let (one, two) = (
        replica(&server, "one", idle).await,
        replica(&server, "two", idle).await,
    );
    let all: Vec<Record> = (0..6).map(|i| record(&format!("c{i}"))).collect();
    one.append(all.clone()).await.unwrap();
    let first = one.peek_after("a", 0, 2).await.unwrap();
    one.ack("a", &ids(&first)).await.unwrap();
    assert!(two.peek_after("a", 0, 10).await.unwrap().entries.is_empty());
    assert_eq!(one.release().await, 4);
    assert_eq!(one.held_here("a"), 0);
    let rest = two.peek_after("a", 0, 10).await.unwrap();
    assert_eq!(names(&rest), ["c2", "c3", "c4", "c5"]);
    let shared = two.account_backlog("a").await.unwrap();
    assert_eq!((shared.events, shared.bytes), (4, size_of(&all[2..])));
}

/// Duplicates are left out of a request's entry; admissions answer each record in the request's
/// order, whatever accounts its records are for.
#[tokio::test]
async fn duplicates_are_left_out_of_a_requests_entry() {
    let server = RedisServer::start();
    let spool = replica_of(&server, "one", Duration::from_secs(60), &["a", "b"]).await;
    let for_b = |c: &str| Record {
        account: "b".into(),
        ..record(c)
    };
    spool.append(vec![record("a1"), for_b("b1")]).await.unwrap();
    let got = spool
        .append(vec![
            record("a2"),
            for_b("b1"),
            record("a1"),
            record("a3"),
            for_b("b2"),
        ])
        .await
        .unwrap();
    use Admission::{Duplicate, Queued};
    assert_eq!(got, [Queued, Duplicate, Duplicate, Queued, Queued]);
    assert_eq!(
        names(&spool.peek_after("a", 0, 10).await.unwrap()),
        ["a1", "a2", "a3"]
    );
    assert_eq!(
        names(&spool.peek_after("b", 0, 10).await.unwrap()),
        ["b1", "b2"]
    );
    assert_eq!(
        spool.account_bytes("a"),
        size_of(&[record("a1"), record("a2"), record("a3")])
    );
    assert_eq!(spool.backlog("b"), 2);
}

/// A peek gathers `max` records from entries of any sizes, and never more.
#[tokio::test]
async fn a_peek_gathers_records_from_entries_of_any_size() {
    let server = RedisServer::start();
    let spool = replica(&server, "one", Duration::from_secs(60)).await;
    for n in [1, 1, 1, 1, 50, 1] {
        let batch: Vec<Record> = (0..n)
            .map(|i| record(&format!("n{n}-{i}-{}", spool.backlog("a"))))
            .collect();
        spool.append(batch).await.unwrap();
    }
    let got = spool.peek_after("a", 0, 30).await.unwrap();
    assert_eq!(got.entries.len(), 30);
    let rest = spool
        .peek_after("a", got.last_id().unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(rest.entries.len(), 25);
    let mut all = ids(&got);
    all.extend(ids(&rest));
    assert!(all.windows(2).all(|w| w[0] < w[1]), "in queue order");
}

/// A stream id whose sequence number does not fit a record id (4,096 or more entries in one
/// millisecond) is never given: the pack moves to the next millisecond.
#[tokio::test]
async fn packs_keep_their_sequence_numbers_within_record_ids() {
    let server = RedisServer::start();
    let spool = replica(&server, "one", Duration::from_secs(60)).await;
    spool.append(vec![record("first")]).await.unwrap();
    let future = chrono::Utc::now().timestamp_millis() + 60_000;
    let raw = codec::encode(&record("planted")).unwrap();
    let mut conn = spool.store().conn();
    let _: String = redis::cmd("XADD")
        .arg("{cg:q:a}:q")
        .arg(format!("{future}-4095"))
        .arg("r")
        .arg(&raw)
        .arg("l")
        .arg(raw.len().to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    spool.append(vec![record("after")]).await.unwrap();
    let got = spool.peek_after("a", 0, 10).await.unwrap();
    assert_eq!(names(&got), ["first", "planted", "after"]);
    let (last, _) = PackId::of(got.last_id().unwrap());
    assert_eq!((last.ms, last.seq), (u64::try_from(future).unwrap() + 1, 0));
    spool.ack("a", &ids(&got)).await.unwrap();
    assert_eq!(spool.backlog("a"), 0);
}
