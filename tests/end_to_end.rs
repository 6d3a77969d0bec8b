//! The real `conversion-gateway` in front of the real `fake-x-api`: events in every accepted form go in,
//! and what X receives is checked field by field, signatures verified by the fake, with both auth modes.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const RAW_EMAIL: &str = "CANARY.Person@Example.com";
const RAW_PHONE: &str = "+1 (650) 253-0000";

fn by_id<'a>(conversions: &'a [Value], id: &str) -> &'a Value {
    &conversions
        .iter()
        .find(|c| c["conversion"]["conversion_id"] == id)
        .unwrap_or_else(|| panic!("{id} not received: {conversions:#?}"))["conversion"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_reaches_x_field_by_field_with_both_auth_modes() {
    let stack = start_stack();
    let http = reqwest::Client::new();
    let post = |body: Value| {
        http.post(&stack.ingest_url)
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };

    let now = chrono::Utc::now();
    let t = (now - chrono::Duration::minutes(10))
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap());
    let single = json!({
        "account": "acme", "event": "purchase", "conversion_id": "order-1", "conversion_time": t.to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
        "email": RAW_EMAIL, "phone": RAW_PHONE, "value": 20, "price_currency": "usd", "number_items": 3,
        "description": "Pet supply purchases", "ip_address": "203.0.113.7", "user_agent": "Mozilla/5.0 (e2e)",
        "contents": [{"content_id": "1", "content_name": "Blankets", "content_type": "Pet supplies", "content_price": 100.99, "num_items": 1, "content_group_id": "123"}]
    });
    let resp = post(single).await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"accepted": 1, "duplicates": 0, "suppressed": 0, "rejected": []})
    );

    let digest = "355BE7E68E2F3A0CA64E397F0F811E6CC93FE253E4DFFD044605107AF99E9912";
    let batch = json!({"events": [
        {"account": "acme", "event_id": "o9d2h", "conversion_id": "order-2", "hashed_email": digest, "hashed_phone_number": digest, "value": "5.5"},
        {"account": "acme", "event": "signup", "event_source_url": "https://shop.example/landing?twclid=23opevjt88psuo13lu8d020qkn"},
        {"account": "acme", "event": "purchase", "twclid": "opted-out-click", "opt_out": true},
        {"account": "acme", "event": "purchase", "email": "not-an-email"},
        {"account": "acme", "event": "refund", "twclid": "x"},
        {"account": "beta", "event": "lead", "conversion_id": "lead-1", "twclid": "beta-click", "phone": "020 7946 0958", "number_items": "2"},
        {"account": "beta", "event": "lead", "conversion_id": "lead-2", "ip_address": "203.0.113.7"}
    ]});
    let resp = post(batch).await.unwrap();
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (
            body["accepted"].as_u64(),
            body["suppressed"].as_u64(),
            body["duplicates"].as_u64()
        ),
        (Some(3), Some(1), Some(0))
    );
    let rejected: Vec<(u64, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["errors"][0]["field"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        [
            (3, "email".into()),
            (4, "event".into()),
            (6, "identifiers".into())
        ]
    );

    let received = eventually(Duration::from_secs(15), async || {
        let c = fake_conversions(&http, &stack.fake_url).await;
        (c.len() >= 4).then_some(c)
    })
    .await
    .expect("X received the four accepted conversions");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = {
        let again = fake_conversions(&http, &stack.fake_url).await;
        assert_eq!(
            again.len(),
            received.len(),
            "nothing more than the accepted events is sent"
        );
        again
    };
    assert_eq!(received.len(), 4, "{received:#?}");

    let c1 = by_id(&received, "order-1");
    assert_eq!(c1["event_id"], "o9d2g");
    assert_eq!(
        c1["conversion_time"],
        (now - chrono::Duration::minutes(10))
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string()
    );
    assert_eq!(
        c1["identifiers"],
        json!([
            {"hashed_email": sha256("canary.person@example.com")},
            {"hashed_phone_number": "3ad9f10d73829a714b1383221691d4dbf08484f3ceeae884f53053a1c7bb0a92"},
            {"ip_address": "203.0.113.7", "user_agent": "Mozilla/5.0 (e2e)"}
        ])
    );
    assert_eq!(c1["value"], "20.00");
    assert_eq!(c1["price_currency"], "USD");
    assert_eq!(c1["number_items"], 3);
    assert_eq!(c1["description"], "Pet supply purchases");
    assert_eq!(
        c1["contents"],
        json!([{"content_id": "1", "content_name": "Blankets", "content_type": "Pet supplies", "content_price": 100.99, "num_items": 1, "content_group_id": "123"}])
    );

    let c2 = by_id(&received, "order-2");
    assert_eq!(c2["event_id"], "o9d2h");
    assert_eq!(
        c2["identifiers"],
        json!([{"hashed_email": digest.to_lowercase()}, {"hashed_phone_number": digest.to_lowercase()}])
    );
    assert_eq!(c2["value"], "5.50");

    let from_url = received
        .iter()
        .map(|c| &c["conversion"])
        .find(|c| c["identifiers"][0]["twclid"] == "23opevjt88psuo13lu8d020qkn")
        .expect("twclid taken from event_source_url");
    assert_eq!(from_url["event_id"], "o9d2h");
    assert_eq!(
        from_url["event_source_url"],
        "https://shop.example/landing?twclid=23opevjt88psuo13lu8d020qkn"
    );
    assert!(from_url["conversion_id"]
        .as_str()
        .unwrap()
        .starts_with("cg-"));

    let lead = by_id(&received, "lead-1");
    assert_eq!(lead["event_id"], "e1v2t");
    assert_eq!(lead["number_items"], 2);
    assert_eq!(
        lead["identifiers"],
        json!([{"twclid": "beta-click"}, {"hashed_phone_number": "f0bf0228144d9fe2bdf1da2d8ca698f17bf1410ee688b075c27062e47b6f0b6d"}])
    );

    // Every request was authenticated the way its account is configured, and verified by the fake.
    let requests = fake_requests(&http, &stack.fake_url).await;
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["auth_ok"], true, "{r}");
        assert_eq!(r["api_version"], "12");
        match r["pixel_id"].as_str().unwrap() {
            "o9d7n" => {
                assert_eq!(r["auth"], "oauth1");
                assert!(r["oauth_nonce"].as_str().is_some_and(|n| !n.is_empty()));
            }
            "p4x1l" => assert_eq!(r["auth"], "pixel_token"),
            other => panic!("unexpected pixel {other}"),
        }
    }
    let nonces: std::collections::HashSet<_> = requests
        .iter()
        .filter_map(|r| r["oauth_nonce"].as_str())
        .collect();
    assert_eq!(
        nonces.len(),
        requests.iter().filter(|r| r["auth"] == "oauth1").count(),
        "a fresh nonce per request"
    );

    // The opted-out event never left, and raw identifiers appear nowhere X or the logs can see.
    let everything = format!("{requests:?}{}", stack.gateway.log_text());
    assert!(!everything.contains("opted-out-click"));
    for canary in [
        "CANARY.Person",
        "canary.person",
        "253-0000",
        "6502530000",
        "CANARY-consumer-secret",
        "CANARY-token-secret",
        "CANARY-access-token",
        "CANARY-pixel-token",
        API_KEY,
    ] {
        assert!(!everything.contains(canary), "{canary} leaked");
    }
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_is_resent_unchanged_and_signed_afresh() {
    let stack = start_stack();
    let http = reqwest::Client::new();
    http.post(format!("{}/_fake/faults", stack.fake_url))
        .json(&json!({"status": 503, "count": 2}))
        .send()
        .await
        .unwrap();
    let resp = http
        .post(&stack.ingest_url)
        .bearer_auth(API_KEY)
        .json(&json!({"account": "acme", "event": "purchase", "twclid": "retry-me", "conversion_id": "r-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let got = eventually(Duration::from_secs(15), async || {
        let c = fake_conversions(&http, &stack.fake_url).await;
        (!c.is_empty()).then_some(c)
    })
    .await
    .expect("delivered after the outage");
    assert_eq!(got.len(), 1);
    let requests = fake_requests(&http, &stack.fake_url).await;
    assert_eq!(
        requests
            .iter()
            .map(|r| r["status"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [503, 503, 200]
    );
    let bodies: Vec<&Value> = requests.iter().map(|r| &r["conversions"]).collect();
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "the same conversions every attempt"
    );
    let nonces: std::collections::HashSet<_> = requests
        .iter()
        .map(|r| r["oauth_nonce"].as_str().unwrap())
        .collect();
    assert_eq!(nonces.len(), 3, "signed afresh on every attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_by_the_fake() {
    let stack = start_stack_with("wrong-secret", &[]);
    let (fake_url, ingest_url) = (&stack.fake_url, &stack.ingest_url);
    let http = reqwest::Client::new();
    let resp = http
        .post(ingest_url)
        .bearer_auth(API_KEY)
        .json(&json!({"account": "acme", "event": "purchase", "twclid": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let refused = eventually(Duration::from_secs(10), async || {
        let r = fake_requests(&http, fake_url).await;
        r.into_iter().find(|r| r["status"] == 401)
    })
    .await
    .expect("the fake saw the badly signed request");
    assert_eq!(refused["auth_error"], "signature does not match");
    assert!(fake_conversions(&http, fake_url).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_at_most_max_batch_and_partial_batches_linger() {
    let stack = start_stack_with(
        "CANARY-consumer-secret",
        &[
            ("GATEWAY_DELIVERY__MAX_BATCH", "3"),
            ("GATEWAY_DELIVERY__LINGER", "1h"),
            // A burst of 3 refills in 15 ms: on a slow machine the budget would cut the second batch
            // (a budget split, tested in delivery.rs); this test is about batch size and linger.
            ("GATEWAY_ACCOUNTS__ACME__RATE_LIMIT__EVENTS", "100000000"),
        ],
    );
    let fake_url = &stack.fake_url;
    let http = reqwest::Client::new();
    let events: Vec<Value> = (0..7).map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("b{i}"), "conversion_id": format!("b-{i}")})).collect();
    let resp = post_events(&http, &stack.ingest_url, &json!({ "events": events })).await;
    assert_eq!(resp.status(), 202);
    let sizes = eventually(Duration::from_secs(10), async || {
        let r = fake_requests(&http, fake_url).await;
        (r.len() >= 2).then(|| {
            r.iter()
                .map(|r| r["conversions"].as_array().unwrap().len())
                .collect::<Vec<_>>()
        })
    })
    .await
    .expect("full batches go out at once");
    assert_eq!(sizes, [3, 3]);
    // The seventh event waits for more (linger is an hour here); it is not sent in the meantime.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake_requests(&http, fake_url).await.len(), 2);
    let ids: Vec<String> = fake_conversions(&http, fake_url)
        .await
        .iter()
        .map(|c| {
            c["conversion"]["conversion_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        ["b-0", "b-1", "b-2", "b-3", "b-4", "b-5"],
        "in the order accepted"
    );
}
