//! The durable spool on a tiny tmpfs: when the disk fills, appends fail cleanly (nothing accepted is lost,
//! nothing half-written), and they succeed again once space is freed. Needs root to mount tmpfs (CI is root).

use conversion_gateway::conversion::{Conversion, Identifier};
use conversion_gateway::spool::{
    Admission, DiskSpool, DiskSpoolOptions, Record, Spool, SpoolError,
};
use std::time::Duration;

mod common;
use common::Tmpfs;

fn record(i: usize) -> Record {
    Record {
        account: "acme".into(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        event_name: None,
        conversion: Conversion {
            conversion_time: "2026-11-28T00:00:00.000Z".into(),
            event_id: "o9d2g".into(),
            identifiers: vec![Identifier::Twclid {
                twclid: format!("click-{i}-{}", "x".repeat(200)),
            }],
            conversion_id: format!("c{i}"),
            value: None,
            price_currency: None,
            number_items: None,
            description: Some("d".repeat(300)),
            contents: None,
            event_source_url: None,
        },
    }
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
        dir: spool_dir.clone(),
        max_bytes: 1 << 30,
        max_dead_letters: 1000,
        dedup_window: Duration::from_secs(3600),
        cache_bytes: 1 << 20,
        min_free_bytes,
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
