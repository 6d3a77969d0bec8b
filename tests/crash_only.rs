//! Crash-only: when the spool's storage thread stops (a bug), the gateway stops taking events — ingest and
//! readiness answer 503 with the cause — and `serve_until` returns the cause within about a second, which
//! `main` turns into a non-zero exit; a restart on the same files takes events again.

use conversion_gateway::{app, config};
use serde_json::json;
use std::time::Duration;

fn settings(dir: &std::path::Path) -> config::Settings {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\napi_keys = [\"k\"]\n\
         [spool]\ndir = \"{}\"\nmin_free_bytes = 0\n[upstream]\nsandbox = true\n\
         [delivery]\nlinger = \"50ms\"\n\
         [accounts.acme]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ purchase = \"o9d2g\" }}\n",
        dir.join("spool").display()
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    config::load(Some(&path), std::iter::empty()).unwrap()
}

async fn post(http: &reqwest::Client, addr: std::net::SocketAddr, id: &str) -> u16 {
    http.post(format!("http://{addr}/v1/events"))
        .bearer_auth("k")
        .json(&json!({"event": "purchase", "twclid": "t", "conversion_id": id}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_storage_thread_refuses_events_and_ends_the_process_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let running = app::start(settings(dir.path())).await.unwrap();
    let (ingest, admin) = (running.ingest_addr, running.admin_addr);
    assert_eq!(post(&http, ingest, "before").await, 202);

    running.crash_storage_thread();
    let serving = tokio::spawn(running.serve_until(std::future::pending()));
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve_until ends by itself")
        .unwrap();
    let cause = ended.expect_err("a fatal stop is an error (a non-zero exit)");
    assert!(cause.contains("storage thread stopped"), "{cause}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The listeners are gone with it: nothing is accepted that could not be kept.
    assert_eq!(post(&http, ingest, "after").await, 0, "no one answers");
    assert!(reqwest::get(format!("http://{admin}/readyz"))
        .await
        .is_err());

    // The supervisor's restart on the same files takes events again.
    let running = app::start(settings(dir.path())).await.unwrap();
    assert_eq!(post(&http, running.ingest_addr, "restarted").await, 202);
    running.stop();
    running.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_the_stop_and_the_exit_ingest_and_readiness_answer_503() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let running = app::start(settings(dir.path())).await.unwrap();
    let (ingest, admin) = (running.ingest_addr, running.admin_addr);
    running.crash_storage_thread();
    // Not served: nothing reacts to the stop yet, so this shows what ingest itself answers.
    let mut status = 0;
    for _ in 0..100 {
        status = post(&http, ingest, "x").await;
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 503);
    let ready = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let body = ready.text().await.unwrap();
    assert!(body.contains("storage thread stopped"), "{body}");
    running.stop();
    let _ = running.wait().await;
}
