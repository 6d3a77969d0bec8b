//! Operating the gateway, against the real binaries and fake-x-api: readiness stays green through an X
//! outage, a dead letter replayed after the mapping is fixed reaches X, `/metrics` after a scenario
//! passes `promtool check metrics` and counts what happened, and no canary (raw email or phone, secret,
//! token, key) reaches a log line, a metric, an admin answer or any file under `spool.dir`.

mod common;
/// The dashboard and the alerts, checked (in this binary: one link less in CI).
#[path = "operations/dashboards.rs"]
mod dashboards;
/// The status page in headless Chromium.
#[path = "operations/status_page.rs"]
mod status_page;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

async fn admin(http: &reqwest::Client, stack: &Stack, method: &str, path: &str) -> Value {
    admin_json(http, &stack.admin_url, method, path).await
}

async fn metrics_text(http: &reqwest::Client, stack: &Stack) -> String {
    let resp = http
        .get(format!("{}/metrics", stack.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    resp.text().await.unwrap()
}

/// The value of the sample `series` (name and labels as printed).
fn sample(metrics: &str, series: &str) -> f64 {
    metric_sample(metrics, series).unwrap_or_else(|| panic!("no sample {series}"))
}

async fn readyz(http: &reqwest::Client, stack: &Stack) -> u16 {
    http.get(format!("{}/readyz", stack.admin_url))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x_outage_is_not_a_reason_to_be_unready() {
    let stack = start_stack();
    let http = reqwest::Client::new();
    http.post(format!("{}/_fake/faults", stack.fake_url))
        .json(&json!({"status": 503, "for_secs": 60}))
        .send()
        .await
        .unwrap();
    let events: Vec<Value> = (0..20)
        .map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("o-{i}"), "conversion_id": format!("o-{i}")}))
        .collect();
    let resp = post_events(&http, &stack.ingest_url, &json!({ "events": events })).await;
    assert_eq!(resp.status(), 202);
    eventually(Duration::from_secs(10), async || {
        let failed = fake_requests(&http, &stack.fake_url)
            .await
            .iter()
            .any(|r| r["status"] == 503);
        failed.then_some(())
    })
    .await
    .expect("X answered 503");
    assert_eq!(
        readyz(&http, &stack).await,
        200,
        "X down, the gateway ready"
    );
    let accounts = admin(&http, &stack, "GET", "/v1/accounts").await;
    assert_eq!(accounts["accounts"][0]["last_status"], "503");
    assert_eq!(accounts["accounts"][0]["backlog"]["events"], 20);
    assert!(accounts["accounts"][0]["backlog"]["oldest_event_at"].is_string());
    let m = metrics_text(&http, &stack).await;
    assert!(
        sample(
            &m,
            "conversion_gateway_upstream_requests_total{account=\"acme\",status=\"503\"}"
        ) >= 1.0
    );
    assert_eq!(
        sample(&m, "conversion_gateway_spool_events{account=\"acme\"}"),
        20.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_after_the_mapping_is_fixed_reaches_x() {
    // purchase is mapped to a SET id the ad account does not have: X answers 404 for those conversions.
    let mut stack = start_stack_with(
        "CANARY-consumer-secret",
        &[("GATEWAY_ACCOUNTS__ACME__EVENTS__PURCHASE", "o9zzz")],
    );
    let http = reqwest::Client::new();
    let events: Vec<Value> = (0..3)
        .map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("r-{i}"), "conversion_id": format!("r-{i}")}))
        .chain(std::iter::once(json!({"account": "acme", "event": "signup", "twclid": "ok", "conversion_id": "signup-1"})))
        .collect();
    let resp = post_events(&http, &stack.ingest_url, &json!({ "events": events })).await;
    assert_eq!(resp.status(), 202);
    wait_received(
        &http,
        &stack.fake_url,
        &HashSet::from(["signup-1".to_string()]),
        Duration::from_secs(20),
    )
    .await;
    let dead = eventually(Duration::from_secs(20), async || {
        let page = admin(&http, &stack, "GET", "/v1/dead-letters?account=acme").await;
        (page["dead_letters"].as_array()?.len() == 3).then_some(page)
    })
    .await
    .expect("the three purchases are dead-lettered");
    for d in dead["dead_letters"].as_array().unwrap() {
        assert_eq!(d["reason"], "not_found");
        assert_eq!(d["event_name"], "purchase");
        assert_eq!(d["conversion"]["event_id"], "o9zzz");
        assert!(d["message"].as_str().unwrap().contains("o9zzz"), "{d}");
    }
    let m = metrics_text(&http, &stack).await;
    assert_eq!(
        sample(
            &m,
            "conversion_gateway_events_dead_lettered_total{account=\"acme\",reason=\"not_found\"}"
        ),
        3.0
    );

    // The mapping is fixed (the override goes) and the gateway restarted: replay delivers them.
    assert!(stack.stop_gateway("TERM").success());
    stack.restart_gateway("CANARY-consumer-secret", &[]);
    let replayed = admin(
        &http,
        &stack,
        "POST",
        "/v1/dead-letters/replay?account=acme",
    )
    .await;
    assert_eq!(replayed, json!({"replayed": 3, "remapped": 3}));
    let want: HashSet<String> = (0..3).map(|i| format!("r-{i}")).collect();
    wait_received(&http, &stack.fake_url, &want, Duration::from_secs(20)).await;
    let conversions = fake_conversions(&http, &stack.fake_url).await;
    for c in conversions
        .iter()
        .filter(|c| want.contains(c["conversion"]["conversion_id"].as_str().unwrap_or("")))
    {
        assert_eq!(c["conversion"]["event_id"], "o9d2g");
    }
    let page = admin(&http, &stack, "GET", "/v1/dead-letters?account=acme").await;
    assert_eq!(page["dead_letters"], json!([]));
    // The fake records a request before it answers, and the ack commits after the answer.
    let drained = eventually(Duration::from_secs(10), async || {
        let accounts = admin(&http, &stack, "GET", "/v1/accounts").await;
        (accounts["accounts"][0]["backlog"]["events"] == 0).then_some(())
    })
    .await;
    assert!(drained.is_some(), "the replayed events left the backlog");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_scenario_pass_promtool_and_count_it() {
    let stack = start_stack();
    let http = reqwest::Client::new();
    http.post(format!("{}/_fake/faults", stack.fake_url))
        .json(&json!({"reject_conversion_id": "m-bad", "message": "value (abc) is not valid for conversion m-bad"}))
        .send()
        .await
        .unwrap();
    let mut events: Vec<Value> = (0..9)
        .map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("m-{i}"), "conversion_id": format!("m-{i}")}))
        .collect();
    events.push(
        json!({"account": "acme", "event": "purchase", "twclid": "m", "conversion_id": "m-bad"}),
    );
    events.push(
        json!({"account": "acme", "event": "purchase", "twclid": "m-0", "conversion_id": "m-0"}),
    );
    events.push(json!({"account": "beta", "event": "lead", "twclid": "b", "opt_out": true}));
    events.push(json!({"account": "beta", "event": "lead"}));
    events.push(json!({"account": "nobody", "event": "lead", "twclid": "n"}));
    let resp = post_events(&http, &stack.ingest_url, &json!({ "events": events })).await;
    assert_eq!(resp.status(), 202);
    let want: HashSet<String> = (0..9).map(|i| format!("m-{i}")).collect();
    wait_received(&http, &stack.fake_url, &want, Duration::from_secs(20)).await;
    let m = eventually(Duration::from_secs(10), async || {
        let m = metrics_text(&http, &stack).await;
        (sample(
            &m,
            "conversion_gateway_events_dead_lettered_total{account=\"acme\",reason=\"rejected\"}",
        ) == 1.0
            && sample(
                &m,
                "conversion_gateway_events_delivered_total{account=\"acme\"}",
            ) == 9.0
            // Acks reach the spool in the background, after the delivered counter.
            && sample(&m, "conversion_gateway_spool_events{account=\"acme\"}") == 0.0)
            .then_some(m)
    })
    .await
    .expect("9 delivered, 1 dead-lettered and none left waiting show in the metrics");

    let received = |account: &str, outcome: &str| {
        sample(
            &m,
            &format!("conversion_gateway_events_received_total{{account=\"{account}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(received("acme", "accepted"), 10.0);
    assert_eq!(received("acme", "duplicate"), 1.0);
    assert_eq!(received("beta", "suppressed"), 1.0);
    assert_eq!(received("beta", "rejected"), 1.0);
    assert_eq!(received("unknown", "rejected"), 1.0);
    assert_eq!(
        received("beta", "accepted"),
        0.0,
        "every account from start-up"
    );
    // One request, then bisection down to the bad conversion: all counted, 400s among them.
    assert!(
        sample(
            &m,
            "conversion_gateway_upstream_requests_total{account=\"acme\",status=\"400\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &m,
            "conversion_gateway_upstream_requests_total{account=\"acme\",status=\"200\"}"
        ) >= 1.0
    );
    assert!(
        sample(
            &m,
            "conversion_gateway_batch_size_events_sum{account=\"acme\"}"
        ) >= 10.0
    );
    assert_eq!(
        sample(&m, "conversion_gateway_spool_events{account=\"acme\"}"),
        0.0
    );
    assert_eq!(
        sample(
            &m,
            "conversion_gateway_account_paused{account=\"acme\",reason=\"unauthorized\"}"
        ),
        0.0
    );
    assert!(sample(&m, "conversion_gateway_http_request_duration_seconds_count{route=\"/v1/events\",status=\"202\"}") >= 1.0);
    assert!(
        !m.contains("nobody"),
        "label values only from configuration"
    );

    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `dir`, recursively, as bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_reaches_logs_metrics_admin_answers_or_the_spool() {
    // Trace level (the test configuration's), OAuth and pixel-token accounts, accepted, rejected,
    // opted-out and dead-lettered events, every admin route.
    let mut stack = start_stack();
    let http = reqwest::Client::new();
    http.post(format!("{}/_fake/faults", stack.fake_url))
        .json(&json!({"reject_conversion_id": "c-poison"}))
        .send()
        .await
        .unwrap();
    let events = json!({"events": [
        {"account": "acme", "event": "purchase", "conversion_id": "c-1", "email": "CANARY.Person@Example.com", "phone": "+1 (650) 253-0000"},
        {"account": "acme", "event": "purchase", "conversion_id": "c-poison", "email": "CANARY.Person@Example.com"},
        {"account": "beta", "event": "lead", "conversion_id": "c-2", "phone": "020 7946 0958", "email": "canary.other@example.org"},
        {"account": "beta", "event": "lead", "email": "CANARY.bad@@example", "phone": "+1 650 253 0000 x"},
        {"account": "acme", "event": "purchase", "email": "CANARY.optout@example.com", "opt_out": true}
    ]});
    let resp = post_events(&http, &stack.ingest_url, &events).await;
    assert_eq!(resp.status(), 202);
    let ingest_answer = resp.text().await.unwrap();
    wait_received(
        &http,
        &stack.fake_url,
        &HashSet::from(["c-1".to_string(), "c-2".to_string()]),
        Duration::from_secs(20),
    )
    .await;
    eventually(Duration::from_secs(20), async || {
        let page = admin(&http, &stack, "GET", "/v1/dead-letters").await;
        (page["dead_letters"].as_array()?.len() == 1).then_some(())
    })
    .await
    .expect("the poison event is dead-lettered");

    let mut seen = vec![ingest_answer, metrics_text(&http, &stack).await];
    // The status page shows no text of X's messages (they can quote identifiers): the poison event's is
    // in its dead letter, not on the page.
    let letters = admin(&http, &stack, "GET", "/v1/dead-letters").await;
    let x_message = letters["dead_letters"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!x_message.is_empty());
    let page = http
        .get(format!("{}/", stack.admin_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("data-account=\"acme\""), "{page}");
    assert!(
        !page.contains(&x_message),
        "X's message {x_message:?} is on the status page"
    );
    seen.push(page);
    for (method, path) in [
        ("GET", "/v1/accounts"),
        ("GET", "/v1/activity"),
        ("GET", "/v1/dead-letters"),
        ("GET", "/v1/dead-letters?account=acme&limit=1"),
        ("POST", "/v1/dead-letters/replay?account=acme"),
        ("DELETE", "/v1/dead-letters?account=beta"),
    ] {
        seen.push(admin(&http, &stack, method, path).await.to_string());
    }
    for path in ["/livez", "/readyz"] {
        seen.push(
            http.get(format!("{}{path}", stack.admin_url))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    // Refused requests too: wrong keys are not echoed.
    let wrong = http
        .get(format!("{}/v1/accounts", stack.admin_url))
        .bearer_auth("CANARY-wrong-key")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    seen.push(wrong.text().await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stack.stop_gateway("TERM").success());
    seen.push(stack.gateway_logs());
    let spool_files = files_under(&stack.dir.path().join("spool"));
    assert!(!spool_files.is_empty());

    let canaries = [
        "CANARY.Person",
        "canary.person",
        "canary.other",
        "CANARY.bad",
        "CANARY.optout",
        "canary.optout",
        "253-0000",
        "6502530000",
        "7946 0958",
        "2079460958",
        "CANARY-consumer-secret",
        "CANARY-token-secret",
        "CANARY-access-token",
        "CANARY-pixel-token",
        "CANARY-wrong-key",
        ADMIN_KEY,
        API_KEY,
    ];
    let text = seen.join("\n");
    assert!(text.len() > 10_000, "trace-level logs were written");
    let start = stack
        .gateway_logs()
        .lines()
        .find(|l| l.contains("\"starting\""))
        .map(String::from)
        .expect("the effective configuration is logged at start-up");
    assert!(
        start.contains("[REDACTED]") && start.contains("o9d7n"),
        "{start}"
    );
    for canary in canaries {
        assert!(
            !text.contains(canary),
            "{canary} leaked into an answer or a log"
        );
        for (path, bytes) in &spool_files {
            assert!(
                !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "{canary} is in {}",
                path.display()
            );
        }
    }
}
