//! The durable spool on a tiny tmpfs: when the disk fills, appends fail cleanly (nothing accepted is lost,
//! nothing half-written), and they succeed again once space is freed. Needs root to mount tmpfs (CI is root).

use conversion_gateway::spool::{
    Admission, DiskSpool, DiskSpoolOptions, Queue, Record, SpoolError, SpoolStats,
};
use std::time::Duration;

mod common;
use common::{sized_record, spool_opts, Tmpfs};

fn record(i: usize) -> Record {
    sized_record(i, format!("click-{i}-{}", "x".repeat(200)), "d".repeat(300))
}

/// The write itself fails with ENOSPC: redb's transaction is rolled back and the file reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_fails_cleanly_and_recovers() {
    disk_full_scenario(0).await;
}

/// The free-space reserve refuses appends before the disk is actually full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_refuses_before_the_disk_is_full() {
    disk_full_scenario(256 * 1024).await;
}

async fn disk_full_scenario(min_free_bytes: u64) {
    let fs = Tmpfs::mount("4m");
    let spool_dir = fs.path().join("spool");
    let spool = DiskSpool::open(DiskSpoolOptions {
        min_free_bytes,
        ..spool_opts(spool_dir.clone())
    })
    .unwrap();
    // Something else fills the disk.
    let filler = fs.path().join("filler");
    let mut accepted = Vec::new();
    let mut i = 0;
    let mut refused = None;
    std::fs::write(&filler, vec![0u8; 2 * 1024 * 1024]).unwrap();
    while i < 100_000 {
        let batch: Vec<Record> = (i..i + 20).map(record).collect();
        match spool.append(batch).await {
            Ok(adm) => {
                assert!(adm.iter().all(|a| *a == Admission::Queued));
                accepted.extend(i..i + 20);
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        i += 20;
    }
    let refused = refused.expect("the disk filled up");
    assert!(
        matches!(refused, SpoolError::Unavailable(_) | SpoolError::Full),
        "{refused:?}"
    );
    assert!(spool.health().is_err(), "unhealthy while full");
    // Everything accepted is there.
    let waiting = spool.peek("acme", 1_000_000).await.unwrap();
    assert_eq!(waiting.len(), accepted.len());
    // Space returns: intake resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let mut resumed = false;
    for _ in 0..50 {
        if spool.append(vec![record(1_000_000)]).await.is_ok() {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(resumed, "appends succeed again once space is freed");
    assert!(spool.health().is_ok());
    assert_eq!(
        spool.peek("acme", 1_000_000).await.unwrap().len(),
        accepted.len() + 1
    );
    spool.close().await.unwrap();
}

/// Fills the file system under `path` to the last byte.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
}

fn conversion_ids(entries: &[conversion_gateway::spool::Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.record.conversion.conversion_id.clone())
        .collect()
}

/// The intake log cannot grow: the append is refused whole, a restart finds nothing of it (its half-written
/// frame is not read back), and once space returns the same events are taken as new, not as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_intake_log_cannot_grow_the_append_is_refused_whole() {
    let fs = Tmpfs::mount("4m");
    let dir = fs.path().join("spool");
    let spool = DiskSpool::open(spool_opts(dir.clone())).unwrap();
    assert_eq!(
        spool.append(vec![record(0)]).await.unwrap(),
        [Admission::Queued]
    );
    // Any other write moves logged events into redb first.
    spool.ack("acme", &[]).await.unwrap();
    let filler = fs.path().join("filler");
    fill(&filler);
    let batch: Vec<Record> = (1..101).map(record).collect();
    let refused = spool.append(batch.clone()).await.unwrap_err();
    assert!(
        matches!(&refused, SpoolError::Unavailable(why) if why.contains("intake log")),
        "{refused:?}"
    );
    assert!(spool.health().is_err());
    assert_eq!(
        conversion_ids(&spool.peek("acme", 1000).await.unwrap()),
        ["c0"]
    );
    spool.close().await.unwrap();
    drop(spool);

    let spool = DiskSpool::open(spool_opts(dir.clone())).unwrap();
    assert_eq!(
        conversion_ids(&spool.peek("acme", 1000).await.unwrap()),
        ["c0"]
    );
    std::fs::remove_file(&filler).unwrap();
    let again = spool.append(batch).await.unwrap();
    assert!(again.iter().all(|a| *a == Admission::Queued), "{again:?}");
    assert!(spool.health().is_ok());
    assert_eq!(spool.peek("acme", 1000).await.unwrap().len(), 101);
    spool.close().await.unwrap();
}

/// A restart on a full disk with events in the intake log that redb does not have: the spool opens, holds
/// them as waiting (readable, counted), and puts them into redb once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_full_disk_keeps_the_logged_events_waiting() {
    use conversion_gateway::spool::codec;
    use conversion_gateway::spool::disk::dedup_key;
    use conversion_gateway::spool::disk::intake_log::{IntakeLog, IntakeRecord};

    let fs = Tmpfs::mount("4m");
    let dir = fs.path().join("spool");
    let spool = DiskSpool::open(spool_opts(dir.clone())).unwrap();
    spool.append(vec![record(0)]).await.unwrap();
    spool.close().await.unwrap();
    drop(spool);
    // The process died with 2,000 events (1.4 MB) logged but not yet in redb.
    let logged: Vec<IntakeRecord> = (1..2001)
        .map(|i| {
            let r = record(i);
            IntakeRecord {
                seq: i as u64 + 1,
                log_seq: i as u64,
                received_at_ms: r.received_at_ms,
                key: dedup_key(&r),
                account: r.account.clone(),
                bytes: codec::encode(&r).unwrap(),
            }
        })
        .collect();
    let (mut log, _) = IntakeLog::open(&dir.join("intake.log")).unwrap();
    log.append(&logged).unwrap();
    drop(log);
    let filler = fs.path().join("filler");
    fill(&filler);

    let spool = DiskSpool::open(spool_opts(dir.clone())).unwrap();
    assert_eq!(spool.backlog("acme"), 2001);
    assert_eq!(spool.peek("acme", 5000).await.unwrap().len(), 2001);
    assert_eq!(
        spool.append(vec![record(7)]).await.unwrap(),
        [Admission::Duplicate],
        "the dedup index knows what waits in the log"
    );
    std::fs::remove_file(&filler).unwrap();
    // Once redb takes writes again (retried every second), the next write puts them there.
    let mut moved = false;
    for _ in 0..50 {
        if spool.ack("acme", &[]).await.is_ok() {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(moved, "redb takes writes again");
    spool.close().await.unwrap();
    drop(spool);
    let spool = DiskSpool::open(spool_opts(dir)).unwrap();
    assert_eq!(spool.backlog("acme"), 2001);
    assert_eq!(
        conversion_ids(&spool.peek("acme", 2).await.unwrap()),
        ["c0", "c1"]
    );
    spool.close().await.unwrap();
}
