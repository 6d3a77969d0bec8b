//! One record that no longer decodes stops nothing: the gateway moves it to the dead letters as
//! `corrupt` (with what could be read: its id, account and length) and delivers the account's others.

mod common;
/// Damaged spool files (a binary shared with the damaged records: one link less in CI).
#[path = "damaged/spool_files.rs"]
mod spool_files;

use conversion_gateway::spool::{DiskSpool, DiskSpoolOptions, Queue, Record};
use conversion_gateway::{app, config};
use std::time::Duration;

const EVENTS: redb::TableDefinition<(&str, u64), &[u8]> = redb::TableDefinition::new("events");

fn options(dir: &std::path::Path) -> DiskSpoolOptions {
    DiskSpoolOptions {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        max_dead_letters: 100,
        dedup_window: Duration::from_secs(3600),
        cache_bytes: 1 << 20,
        min_free_bytes: 0,
    }
}

fn record(id: &str) -> Record {
    common::spool_record("acme", id)
}

async fn get(admin: std::net::SocketAddr, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://{admin}{path}"))
        .bearer_auth("admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_dead_lettered_and_the_others_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    let spool = DiskSpool::open(options(&spool_dir)).unwrap();
    spool
        .append(vec![record("c1"), record("c2"), record("c3")])
        .await
        .unwrap();
    let ids: Vec<u64> = spool
        .peek("acme", 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    spool.close().await.unwrap();
    drop(spool);
    {
        let db = redb::Database::open(spool_dir.join("spool.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(EVENTS)
            .unwrap()
            .insert(("acme", ids[0]), [0xFFu8, 0, 1, 2, 3].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\napi_keys = [\"k\"]\nadmin_api_keys = [\"admin\"]\n\
         [spool]\ndir = \"{}\"\nmin_free_bytes = 0\n[upstream]\nsandbox = true\n[delivery]\nlinger = \"20ms\"\n\
         [accounts.acme]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ purchase = \"o9d2g\" }}\n",
        spool_dir.display()
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    let running = app::start(config::load(Some(&path), std::iter::empty()).unwrap())
        .await
        .unwrap();
    let admin = running.admin_addr;
    let mut report = serde_json::Value::Null;
    for _ in 0..200 {
        report = get(admin, "/v1/accounts").await;
        let acme = &report["accounts"][0];
        if acme["delivered"] == 2 && acme["dead_lettered"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let acme = &report["accounts"][0];
    assert_eq!(acme["delivered"], 2, "{report}");
    assert_eq!(acme["dead_lettered"], 1, "{report}");
    assert_eq!(acme["backlog"]["events"], 0, "{report}");
    let page = get(admin, "/v1/dead-letters").await;
    let letter = &page["dead_letters"][0];
    assert_eq!(letter["reason"], "corrupt", "{page}");
    assert_eq!(letter["account"], "acme");
    assert_eq!(letter["raw_bytes"], 5);
    assert!(letter["conversion"].is_null());
    assert!(letter["message"]
        .as_str()
        .unwrap()
        .contains("does not decode"));
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(
        "conversion_gateway_events_dead_lettered_total{account=\"acme\",reason=\"corrupt\"} 1"
    ));
    running.stop();
    running.wait().await.unwrap();
}
