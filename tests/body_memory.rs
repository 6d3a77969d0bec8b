//! Memory under concurrent large bodies (issue 10's hostile run: 256 concurrent ~1 MB bodies took the
//! resident set to 567 MB). The bodies being read and parsed are bounded by
//! `server.max_inflight_body_bytes`: beyond it a body is shed with `503` and `Retry-After`, the
//! gateway's peak resident set stays under the README's suggested 256 MiB container limit, and small
//! requests keep being served throughout.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

/// Concurrent large bodies: twice the hostile run's worst, so that without the bound the peak would be
/// far past the limit (measured here without it: 236 MiB for 256, 330 MiB for 512; with the default
/// 64 MiB bound: 117 MiB).
const LARGE: usize = 512;

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// ~1 MB bodies of the two shapes that cost the most: one huge field, and a thousand small events.
fn large_body(i: usize) -> Vec<u8> {
    let body = if i % 2 == 0 {
        json!({"events": [{"account": "acme", "event": "purchase", "email": "a@example.com",
                           "conversion_id": format!("big-{i}"), "page_url": format!("https://example.com/?q={}", "x".repeat(1_000_000))}]})
    } else {
        let events: Vec<_> = (0..1000)
            .map(|n| json!({"account": "nowhere", "event": "purchase", "conversion_id": format!("o-{i}-{n}"),
                            "email": "a@example.com", "page_url": format!("https://example.com/{}", "p".repeat(900))}))
            .collect();
        json!({ "events": events })
    };
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_large_bodies_are_shed_beyond_the_budget_and_small_ones_still_served() {
    let stack = start_stack();
    let pid = stack.gateway.child.id();
    let before = peak_rss(pid);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..2).map(large_body).collect();

    let mut large = tokio::task::JoinSet::new();
    for i in 0..LARGE {
        let (http, url, body) = (
            http.clone(),
            stack.ingest_url.clone(),
            bodies[i % 2].clone(),
        );
        large.spawn(async move {
            let r = http
                .post(&url)
                .bearer_auth(API_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            match r {
                Ok(r) => (r.status().as_u16(), r.headers().contains_key("retry-after")),
                Err(_) => (0, false),
            }
        });
    }
    // Small requests all along, each a fresh connection: every one is served.
    let small = {
        let (http, url) = (http.clone(), stack.ingest_url.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 0..100 {
                let event = json!({"account": "acme", "event": "purchase", "conversion_id": format!("small-{n}"), "email": "s@example.com"});
                let r = post_events(&http, &url, &event).await;
                statuses.push(r.status().as_u16());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            statuses
        })
    };
    let mut outcomes = Vec::new();
    while let Some(o) = large.join_next().await {
        outcomes.push(o.unwrap());
    }
    let small = small.await.unwrap();
    let peak = peak_rss(pid);
    println!(
        "peak resident set {:.1} MiB (at start {:.1} MiB) for {LARGE} concurrent ~1 MB bodies",
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0
    );

    let shed = outcomes.iter().filter(|(s, _)| *s == 503).count();
    let answered = outcomes
        .iter()
        .filter(|(s, _)| *s == 202 || *s == 422)
        .count();
    assert!(
        outcomes.iter().all(|(s, ra)| *s != 503 || *ra),
        "a 503 without Retry-After"
    );
    assert_eq!(
        shed + answered,
        LARGE,
        "every large body answered or shed: {outcomes:?}"
    );
    assert!(
        shed > 0,
        "512 MB of bodies at once must exceed the budget: {outcomes:?}"
    );
    assert!(answered > 0, "some large bodies are served");
    assert!(
        small.iter().all(|s| *s == 202),
        "small requests were refused: {small:?}"
    );
    assert!(peak < 256 << 20, "peak resident set {} MiB", peak >> 20);
    // Every shed request is counted, and nothing is held once they are all answered.
    let metrics = reqwest::get(format!("{}/metrics", stack.admin_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_sample(&metrics, "conversion_gateway_requests_shed_total"),
        Some(shed as f64)
    );
    assert_eq!(
        metric_sample(&metrics, "conversion_gateway_inflight_body_bytes"),
        Some(0.0)
    );
}
