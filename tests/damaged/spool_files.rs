//! Damaged spool files: a truncated, zero-filled, garbage, newer-format or unreadable `spool.redb` or
//! `intake.log` makes the gateway refuse to start, naming the file and what to do, with nothing written;
//! `spool check` reports what is readable and what is damaged; `spool salvage` moves the files aside
//! (byte for byte) and rebuilds a spool from every readable record, which then opens and still knows
//! its events as duplicates and its rate budget.

use crate::common::{spool_record, GATEWAY};
use conversion_gateway::reasons::DeadLetterReason;
use conversion_gateway::spool::disk::intake_log::{IntakeLog, IntakeRecord};
use conversion_gateway::spool::{
    codec, Admission, DeadLetterStore, DiskSpool, DiskSpoolOptions, Queue, Record,
};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const LOCAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.toml");
const TAT: u64 = 4_102_444_800_000_000_000; // 2100-01-01 in ns: a budget far in debt

fn options(dir: &Path) -> DiskSpoolOptions {
    DiskSpoolOptions {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        max_dead_letters: 100,
        dedup_window: Duration::from_secs(86400),
        cache_bytes: 1 << 20,
        min_free_bytes: 0,
    }
}

/// A closed spool with 1,500 acme and 500 beta events, 5 dead letters and a limiter state.
async fn base(dir: &Path) {
    let spool = DiskSpool::open(options(dir)).unwrap();
    for i in 0..20 {
        let account = if i % 4 == 3 { "beta" } else { "acme" };
        let records = (0..100)
            .map(|j| spool_record(account, &format!("e{i}-{j}")))
            .collect();
        spool.append(records).await.unwrap();
    }
    let first: Vec<u64> = spool
        .peek("acme", 5)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    spool
        .dead_letter("acme", &first, DeadLetterReason::Rejected, "X said no")
        .await
        .unwrap();
    spool
        .limiter_state()
        .save("18ce552mlaq", TAT)
        .await
        .unwrap();
    spool.close().await.unwrap();
}

const FILES: [&str; 2] = ["spool.redb", "intake.log"];

/// Each spool file's length and SHA-256.
fn files(dir: &Path) -> BTreeMap<String, (usize, String)> {
    use sha2::Digest;
    FILES
        .iter()
        .filter_map(|f| {
            let bytes = std::fs::read(dir.join(f)).ok()?;
            Some((
                f.to_string(),
                (bytes.len(), hex::encode(sha2::Sha256::digest(&bytes))),
            ))
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in FILES {
        if let Ok(bytes) = std::fs::read(from.join(name)) {
            std::fs::write(to.join(name), bytes).unwrap();
        }
    }
}

fn gateway(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(GATEWAY)
        .arg("--config")
        .arg(LOCAL)
        .args(args)
        .env("GATEWAY_SPOOL__DIR", dir)
        .env("GATEWAY_SERVER__LISTEN", "127.0.0.1:0")
        .env("GATEWAY_SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .env("GATEWAY_LOG__FORMAT", "text")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The gateway refuses to start on `dir`, naming `file` and what to do, and changes nothing.
fn refuses_to_start(dir: &Path, file: &str, why: &str) {
    let before = files(dir);
    let (code, _, err) = gateway(dir, &["run"]);
    assert_eq!(code, 1, "{err}");
    let named = dir.join(file);
    assert!(
        err.contains(&format!("spool file {} cannot be used", named.display())),
        "{err}"
    );
    assert!(err.contains(why), "{why}: {err}");
    assert!(
        err.contains("spool check") && err.contains("spool salvage"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "a refusal, not a crash: {err}");
    assert_eq!(files(dir), before, "nothing written");
}

fn check(dir: &Path) -> (i32, serde_json::Value, String) {
    let (code, out, err) = gateway(dir, &["spool", "check", "--json"]);
    (
        code,
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}")),
        err,
    )
}

fn events_in(report: &serde_json::Value, account: &str) -> u64 {
    report["accounts"][account]["events"].as_u64().unwrap_or(0)
}

/// Salvages `dir`: the old files end in `damaged-*` unchanged, and the rebuilt spool opens.
async fn salvage_and_open(dir: &Path) -> std::sync::Arc<DiskSpool> {
    let before = files(dir);
    let (code, out, err) = gateway(dir, &["spool", "salvage"]);
    assert_eq!(code, 0, "{out} {err}");
    let aside: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        files(&aside[0]),
        before,
        "the damaged files are kept byte for byte"
    );
    assert!(out.contains(&aside[0].display().to_string()), "{out}");
    let (code, report, err) = check(dir);
    assert_eq!(code, 0, "the rebuilt spool reads whole: {report} {err}");
    DiskSpool::open(options(dir)).unwrap()
}

/// Every waiting event of the rebuilt spool decodes, ids are unique, and each is still a duplicate.
async fn still_known(spool: &DiskSpool, account: &str) -> usize {
    let entries = spool.peek(account, 10_000).await.unwrap();
    let mut ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), entries.len());
    let again: Vec<Record> = entries.iter().map(|e| e.record.clone()).collect();
    let n = again.len();
    let admitted = spool.append(again).await.unwrap();
    assert!(
        admitted.iter().all(|a| matches!(a, Admission::Duplicate)),
        "salvaged events are still known as duplicates"
    );
    n
}

fn limiter_kept(spool: &DiskSpool) {
    assert_eq!(
        spool.limiter_state().load("18ce552mlaq"),
        Some(TAT),
        "the budget is not handed out afresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_spool_checks_clean_and_salvages_losslessly() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    base(&spool_dir).await;
    let (code, report, err) = check(&spool_dir);
    assert_eq!(code, 0, "{report} {err}");
    assert_eq!(events_in(&report, "acme"), 1495);
    assert_eq!(events_in(&report, "beta"), 500);
    assert_eq!(report["dead_letters"], 5);
    assert_eq!(report["dedup_entries"], 2000);
    assert_eq!(report["limiter_states"], 1);
    // Not while a gateway holds the spool.
    let running = DiskSpool::open(options(&spool_dir)).unwrap();
    let (code, _, err) = gateway(&spool_dir, &["spool", "salvage"]);
    assert_eq!(code, 2);
    assert!(err.contains("stop the gateway"), "{err}");
    running.close().await.unwrap();
    drop(running);
    let spool = salvage_and_open(&spool_dir).await;
    assert_eq!(still_known(&spool, "acme").await, 1495);
    assert_eq!(still_known(&spool, "beta").await, 500);
    let dead = spool.dead_letter_counts().await.unwrap();
    assert_eq!(dead.kept, 5);
    limiter_kept(&spool);
    spool.close().await.unwrap();
}

/// `damage` done to the base spool's `spool.redb`: the start is refused saying `why`, check reports the damage,
/// and salvage keeps every waiting event: those `spool.redb` still holds, and the intake log's (with the
/// counters lost, all 2,000 of its events are kept, the 5 dead-lettered ones among them going out again:
/// nothing that waited is lost).
async fn damaged_redb_is_refused_and_salvaged(
    what: &str,
    why: &str,
    damage: impl FnOnce(&std::fs::File, u64),
) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("spool");
    base(&d).await;
    let len = std::fs::metadata(d.join("spool.redb")).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("spool.redb"))
        .unwrap();
    damage(&f, len);
    drop(f);
    refuses_to_start(&d, "spool.redb", why);
    let (code, report, _) = check(&d);
    assert_eq!(code, 1, "{report}");
    assert!(
        report["files"][0]["damage"].to_string().contains(why),
        "{report}"
    );
    let readable = events_in(&report, "acme") + events_in(&report, "beta");
    let spool = salvage_and_open(&d).await;
    let kept = still_known(&spool, "acme").await + still_known(&spool, "beta").await;
    println!("{what}: {kept} events salvaged (1,995 were waiting)");
    assert!(kept >= 1995, "{kept}");
    assert_eq!(
        kept as u64, readable,
        "what check called readable is what the rebuilt spool holds"
    );
    spool.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_spool_file_is_refused_and_salvaged_up_to_the_cut() {
    damaged_redb_is_refused_and_salvaged("truncated to 3/4", "truncated", |f, len| {
        f.set_len(len * 3 / 4).unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_filled_pages_are_refused_and_the_rest_salvaged() {
    damaged_redb_is_refused_and_salvaged("16 KiB zero-filled", "damaged", |f, len| {
        f.write_all_at(&[0u8; 16384], (len / 2) & !4095).unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("spool");
    base(&d).await;
    let len = std::fs::metadata(d.join("spool.redb")).unwrap().len() as usize;
    let pristine = dir.path().join("pristine");
    copy_dir(&d, &pristine);

    let garbage: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(d.join("spool.redb"), &garbage).unwrap();
    refuses_to_start(&d, "spool.redb", "damaged");
    let (code, report, _) = check(&d);
    assert_eq!(code, 1);
    assert!(report["files"][0]["damage"]
        .to_string()
        .contains("no record could be read"));

    // A spool written by a later version: refused, and salvage will not rebuild it with this one.
    let newer = dir.path().join("newer");
    copy_dir(&pristine, &newer);
    {
        let db = redb::Database::create(newer.join("spool.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("format", 2)
            .unwrap();
        txn.commit().unwrap();
    }
    refuses_to_start(
        &newer,
        "spool.redb",
        "newer conversion-gateway (spool format 2",
    );
    let before = files(&newer);
    let (code, _, err) = gateway(&newer, &["spool", "salvage"]);
    assert_eq!(code, 2);
    assert!(err.contains("Run the newer version"), "{err}");
    assert_eq!(files(&newer), before);

    let newer_log = dir.path().join("newer-log");
    copy_dir(&pristine, &newer_log);
    let mut log = std::fs::read(newer_log.join("intake.log")).unwrap();
    log[7] = b'3';
    std::fs::write(newer_log.join("intake.log"), log).unwrap();
    refuses_to_start(&newer_log, "intake.log", "intake log format 3");
}

/// Events only in the intake log (a stop before they moved into redb), with bytes in the middle of the log
/// damaged: refused; check finds the frames on both sides; salvage keeps them all but the damaged frame's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_intake_log_is_refused_and_both_sides_of_the_damage_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("spool");
    base(&d).await;
    // 2,000 ids and 2,000 dedup entries in redb; ten frames of ten more events each in the log.
    let (mut log, _) = IntakeLog::open(&d.join("intake.log")).unwrap();
    let mut ends = Vec::new();
    for frame in 0..10u64 {
        let records: Vec<IntakeRecord> = (0..10u64)
            .map(|i| {
                let n = frame * 10 + i;
                let r = spool_record("acme", &format!("late-{n}"));
                IntakeRecord {
                    seq: 2001 + n,
                    log_seq: 2000 + n,
                    received_at_ms: r.received_at_ms,
                    key: conversion_gateway::spool::disk::dedup_key(&r),
                    account: "acme".into(),
                    bytes: codec::encode(&r).unwrap(),
                }
            })
            .collect();
        log.append(&records).unwrap();
        ends.push(std::fs::metadata(d.join("intake.log")).unwrap().len());
    }
    drop(log);
    let pristine = dir.path().join("pristine");
    copy_dir(&d, &pristine);
    let (code, report, _) = check(&pristine);
    assert_eq!(code, 0, "{report}");
    assert_eq!(events_in(&report, "acme"), 1495 + 100);
    assert_eq!(report["accounts"]["acme"]["only_in_intake_log"], 100);

    // Zero-filled inside the fourth frame.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("intake.log"))
        .unwrap();
    f.write_all_at(&[0u8; 64], ends[2] + 30).unwrap();
    drop(f);
    refuses_to_start(&d, "intake.log", "zero-filled");
    let (code, report, _) = check(&d);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["accounts"]["acme"]["only_in_intake_log"], 90);
    let spool = salvage_and_open(&d).await;
    assert_eq!(still_known(&spool, "acme").await, 1495 + 90);
    limiter_kept(&spool);
    spool.close().await.unwrap();

    // Garbage: refused as not an intake log.
    let garbage = dir.path().join("garbage");
    copy_dir(&pristine, &garbage);
    std::fs::write(garbage.join("intake.log"), vec![0xa7u8; 20_000]).unwrap();
    refuses_to_start(&garbage, "intake.log", "not an intake log");
}

/// A file the gateway's user may not read: refused with what to change, as an unprivileged user (root
/// reads every file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_spool_file_is_refused_naming_the_permission() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path().join("spool");
    base(&d).await;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let as_nobody = || {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                GATEWAY,
                "--config",
                LOCAL,
                "run",
            ])
            .env("GATEWAY_SPOOL__DIR", &d)
            .env("GATEWAY_SERVER__LISTEN", "127.0.0.1:0")
            .env("GATEWAY_SERVER__ADMIN_LISTEN", "127.0.0.1:0")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (readable, unreadable) in [("intake.log", "spool.redb"), ("spool.redb", "intake.log")] {
        std::fs::set_permissions(d.join(readable), std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(d.join(unreadable), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let before = files(&d);
        let (code, err) = as_nobody();
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "spool file {} cannot be used",
                d.join(unreadable).display()
            )) && err.contains("permission denied"),
            "{err}"
        );
        assert_eq!(files(&d), before, "nothing written");
    }
}
