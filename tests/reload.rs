//! `SIGHUP` reloads the keys and X credentials given as files, atomically, without dropping a request:
//! the real gateway, a client posting all along, a key rotated (old and new, then new only) and the
//! consumer secret fixed (the paused account sends at once); a configuration that does not load changes
//! nothing.

mod common;

use common::*;
use serde_json::json;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn config(port: u16, admin_port: u16, fake_port: u16, keys: &str, secret: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
admin_api_keys = ["{ADMIN_KEY}"]

[[server.keys]]
key_file = "{keys}"
accounts = ["acme"]

[upstream]
base_url = "http://127.0.0.1:{fake_port}"
timeout = "2s"

[delivery]
linger = "100ms"
retry_base = "30s"
pause_cap = "10m"

[log]
format = "json"
level = "debug"

[accounts.acme]
ad_account_id = "18ce552mlaq"
pixel_id = "o9d7n"
events = {{ purchase = "o9d2g" }}
auth = {{ kind = "oauth1", consumer_key = "ck-e2e", consumer_secret_file = "{secret}", access_token = "CANARY-access-token", access_token_secret = "CANARY-token-secret" }}
"#
    )
}

async fn post_as(http: &reqwest::Client, url: &str, key: &str, id: &str) -> u16 {
    http.post(url)
        .bearer_auth(key)
        .json(&json!({"event": "purchase", "twclid": "t", "conversion_id": id}))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_and_a_secret_rotate_without_dropping_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, fake_port, fake_url) = start_fake(dir.path());
    let keys = write(dir.path(), "keys", "CANARY-old-key\n");
    let secret = write(dir.path(), "secret", "wrong-secret\n");
    let (port, admin_port) = (free_port(), free_port());
    let text = config(
        port,
        admin_port,
        fake_port,
        keys.to_str().unwrap(),
        secret.to_str().unwrap(),
    );
    let cfg = write(dir.path(), "gateway.toml", &text);
    let spool = dir.path().join("spool");
    let mut gateway = spawn(
        GATEWAY,
        &["--config", cfg.to_str().unwrap()],
        &[("GATEWAY_SPOOL__DIR", spool.to_str().unwrap())],
        dir.path().join("gateway.log"),
    );
    wait_ready(
        &mut gateway,
        &format!("http://127.0.0.1:{admin_port}/readyz"),
    );
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let http = reqwest::Client::new();

    // A client posting all along with whichever key it was given last.
    let key = Arc::new(Mutex::new("CANARY-old-key".to_owned()));
    let statuses = Arc::new(Mutex::new(Vec::<(String, u16)>::new()));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let client = {
        let (http, url, key, statuses, running) = (
            http.clone(),
            url.clone(),
            key.clone(),
            statuses.clone(),
            running.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let k = key.lock().unwrap().clone();
                let id = format!("c{n}");
                let status = post_as(&http, &url, &k, &id).await;
                statuses.lock().unwrap().push((id, status));
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // The wrong secret: X refuses the first batch (401) and the account pauses (at least 30 s).
    let refused = eventually(Duration::from_secs(10), async || {
        let requests = fake_requests(&http, &fake_url).await;
        requests.iter().any(|r| r["status"] == 401).then_some(())
    })
    .await;
    assert!(refused.is_some(), "X never refused the wrong secret");

    // Rotation, step 1: both keys, and the right secret.
    write(dir.path(), "keys", "CANARY-old-key\nCANARY-new-key\n");
    write(dir.path(), "secret", "CANARY-consumer-secret\n");
    let reloaded = Instant::now();
    gateway.signal("HUP");
    let new_works = eventually(Duration::from_secs(5), async || {
        (post_as(&http, &url, "CANARY-new-key", "probe-new").await == 202).then_some(())
    })
    .await;
    assert!(new_works.is_some(), "the new key was not taken");
    // The client keeps posting with the old key a little while both are good, then switches.
    tokio::time::sleep(Duration::from_millis(300)).await;
    *key.lock().unwrap() = "CANARY-new-key".to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Step 2: the new key only.
    write(dir.path(), "keys", "CANARY-new-key\n");
    gateway.signal("HUP");
    let old_refused = eventually(Duration::from_secs(5), async || {
        (post_as(&http, &url, "CANARY-old-key", "probe-old").await == 401).then_some(())
    })
    .await;
    assert!(old_refused.is_some(), "the old key still works");
    // A configuration that does not load changes nothing.
    write(dir.path(), "gateway.toml", "[server\nthis is not TOML");
    gateway.signal("HUP");
    let logged = eventually(Duration::from_secs(5), async || {
        gateway
            .log_text()
            .contains("keeping the current keys and credentials")
            .then_some(())
    })
    .await;
    assert!(logged.is_some(), "{}", gateway.log_text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    client.await.unwrap();

    let statuses = statuses.lock().unwrap().clone();
    let dropped: Vec<&(String, u16)> = statuses.iter().filter(|(_, s)| *s != 202).collect();
    assert!(
        statuses.len() > 30 && dropped.is_empty(),
        "{} requests, not accepted: {dropped:?}",
        statuses.len()
    );
    // Every accepted event reaches X long before the 30 s pause would have ended.
    let mut want: HashSet<String> = statuses.iter().map(|(id, _)| id.clone()).collect();
    want.insert("probe-new".into());
    wait_received(&http, &fake_url, &want, Duration::from_secs(10)).await;
    assert!(
        reloaded.elapsed() < Duration::from_secs(25),
        "delivered {:?} after the reload",
        reloaded.elapsed()
    );
    let log = gateway.log_text();
    for canary in ["CANARY-old-key", "CANARY-new-key", "CANARY-consumer-secret"] {
        assert!(!log.contains(canary), "{canary} in the log");
    }
    assert!(log.contains("credentials replaced"), "{log}");
}
