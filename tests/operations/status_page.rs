//! The status page as a person sees it: loaded in headless Chromium (Debian's `chromium`, installed when
//! missing) from a running gateway with one account delivering and one paused; a screenshot is kept at
//! `target/status-page.png`.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn chromium() -> &'static str {
    debian_tool("/usr/bin/chromium", "chromium")
}

/// Runs headless Chromium on `url` with `args`: its stdout.
fn headless(profile: &Path, args: &[&str], url: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `<tr>` of `account` in the rendered DOM.
fn row<'a>(dom: &'a str, account: &str) -> &'a str {
    let start = dom
        .find(&format!("<tr data-account=\"{account}\""))
        .unwrap_or_else(|| panic!("no row for {account} in\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</tr>").unwrap()]
}

/// The y values of the chart line `class` in `row`.
fn line_ys(row: &str, class: &str) -> Vec<f64> {
    let points = row
        .split(&format!("<polyline class=\"{class}\" points=\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no {class} line in {row}"));
    points[..points.find('"').unwrap()]
        .split(' ')
        .map(|p| p.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_account_in_headless_chromium() {
    // beta's pixel token is wrong: X answers 401 and the account pauses; acme delivers.
    let stack = start_stack_with(
        "CANARY-consumer-secret",
        &[("GATEWAY_ACCOUNTS__BETA__AUTH__TOKEN", "CANARY-wrong-token")],
    );
    let http = reqwest::Client::new();
    let mut events: Vec<Value> = (0..40)
        .map(|i| json!({"account": "acme", "event": "purchase", "conversion_id": format!("a-{i}"), "email": format!("CANARY.{i}@example.com")}))
        .collect();
    events.extend((0..5).map(|i| json!({"account": "beta", "event": "lead", "conversion_id": format!("b-{i}"), "email": "CANARY.b@example.com"})));
    events.push(json!({"account": "acme", "event": "refund", "email": "CANARY.x@example.com"}));
    let resp = post_events(&http, &stack.ingest_url, &json!({ "events": events })).await;
    assert_eq!(resp.status(), 202);
    let acme: HashSet<String> = (0..40).map(|i| format!("a-{i}")).collect();
    wait_received(&http, &stack.fake_url, &acme, Duration::from_secs(20)).await;
    eventually(Duration::from_secs(20), async || {
        let accounts = admin_json(&http, &stack.admin_url, "GET", "/v1/accounts").await;
        let beta = accounts["accounts"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == "beta")?
            .clone();
        (beta["paused"] == "unauthorized").then_some(())
    })
    .await
    .expect("beta pauses on X's 401");

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/", stack.admin_url);
    // The DOM after the page's script ran, with virtual time enough for one refresh of itself.
    let dom = headless(
        profile.path(),
        &["--virtual-time-budget=15000", "--dump-dom"],
        &url,
    );
    let acme = row(&dom, "acme");
    let beta = row(&dom, "beta");
    assert!(acme.contains("data-state=\"sending\""), "{acme}");
    assert!(acme.contains("ad account 18ce552mlaq"), "{acme}");
    assert!(
        acme.contains("40 of 60000 sent in the last 15 min"),
        "{acme}"
    );
    assert!(
        acme.contains("debug_id "),
        "X's last debug_id is shown: {acme}"
    );
    assert!(beta.contains("data-state=\"paused\""), "{beta}");
    assert!(
        beta.contains("paused: X refuses the credentials (401)"),
        "{beta}"
    );
    assert!(beta.contains("5 events"), "beta's backlog: {beta}");
    // A chart with points: sixty minutes, the last ones above the baseline.
    for class in ["received", "delivered", "rejected", "dead"] {
        assert_eq!(line_ys(acme, class).len(), 60, "{class}");
    }
    let delivered = line_ys(acme, "delivered");
    let baseline = delivered[0];
    assert!(
        delivered.iter().any(|y| *y < baseline),
        "acme's deliveries are drawn: {delivered:?}"
    );
    assert!(
        line_ys(acme, "rejected").iter().any(|y| *y < baseline),
        "the refund event's rejection is drawn"
    );
    assert!(
        line_ys(beta, "delivered").iter().all(|y| *y == baseline),
        "beta delivered nothing"
    );
    // It refreshed itself (the script fetched the page again and swapped it in).
    assert!(
        dom.contains("data-refreshes=\""),
        "no refresh happened:\n{dom}"
    );
    // Nothing it shows is a secret, an identifier, or X's message.
    assert!(!dom.contains("CANARY"), "a canary on the page");
    assert!(
        !dom.contains("not properly authenticated"),
        "X's message on the page"
    );

    let shot: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    headless(
        profile.path(),
        &[
            "--window-size=1400,520",
            "--virtual-time-budget=2000",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    println!("screenshot: {}", shot.display());

    // The same numbers for scripts, behind the admin key.
    let activity = admin_json(&http, &stack.admin_url, "GET", "/v1/activity").await;
    let acme = activity["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "acme")
        .unwrap();
    let minutes = acme["per_minute"].as_array().unwrap();
    assert_eq!(minutes.len(), 60);
    let sum = |k: &str| minutes.iter().map(|m| m[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        (sum("received"), sum("delivered"), sum("rejected")),
        (41, 40, 1)
    );
    let unkeyed = http
        .get(format!("{}/v1/activity", stack.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 401);
}
