//! The admin router driven with `oneshot`: probes, metrics, accounts and the dead-letter routes, with
//! every status they answer.

mod oneshot;
/// openapi.yaml against the routers (in this binary: one link less in CI).
#[path = "admin_api/openapi.rs"]
mod openapi;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use conversion_gateway::api::{self, AdminState};

use conversion_gateway::reasons::{DeadLetterReason, PauseReason};
use conversion_gateway::spool::{DeadLetterStore, MemorySpool, Queue, SpoolStats};
use http_body_util::BodyExt;
use oneshot::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

struct Admin {
    ingest: Router,
    admin: Router,
    spool: Arc<MemorySpool>,
    state: Arc<AdminState>,
    shutdown: conversion_gateway::shutdown::Trigger,
}

fn setup(accounts: &[&str]) -> Admin {
    setup_with(
        Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20)),
        accounts,
    )
}

fn setup_with(spool: Arc<MemorySpool>, accounts: &[&str]) -> Admin {
    let (app, shutdown) = stoppable_state(spool.clone(), accounts);
    let state = admin_state(app.clone());
    Admin {
        ingest: api::app(app),
        admin: api::admin_app(state.clone()),
        spool,
        state,
        shutdown,
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}"))
        .body(Body::empty())
        .unwrap()
}

fn call(method: &str, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {ADMIN_KEY}"))
        .body(Body::empty())
        .unwrap()
}

async fn text(app: &Router, req: Request<Body>) -> (StatusCode, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// The value of the sample `name{labels}` in a text exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Dead-letters every waiting event of `account` with `reason`.
async fn dead_letter_all(spool: &MemorySpool, account: &str, reason: DeadLetterReason) {
    let ids: Vec<u64> = spool
        .peek(account, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    spool
        .dead_letter(
            account,
            &ids,
            reason,
            "event_id (o9zzz) does not belong to provided account",
        )
        .await
        .unwrap();
}

/// POSTs `events` in requests of at most 5 (the test state's `max_events_per_request`); the last status.
async fn post_events(app: &Router, events: Value) -> StatusCode {
    let mut last = StatusCode::BAD_REQUEST;
    for chunk in events.as_array().unwrap().chunks(5) {
        last = post_json(app, json!({ "events": chunk })).await.0;
    }
    last
}

#[tokio::test]
async fn probes_and_metrics_need_no_key_the_v1_api_does() {
    let a = setup(&["acme"]);
    for path in ["/livez", "/readyz", "/metrics"] {
        let (s, _) = text(&a.admin, Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{path}");
    }
    for (method, path) in [
        ("GET", "/v1/accounts"),
        ("GET", "/v1/dead-letters"),
        ("DELETE", "/v1/dead-letters?account=acme"),
        ("POST", "/v1/dead-letters/replay?account=acme"),
    ] {
        let req = |auth: Option<&str>| {
            let mut b = Request::builder().method(method).uri(path);
            if let Some(a) = auth {
                b = b.header(header::AUTHORIZATION, a);
            }
            b.body(Body::empty()).unwrap()
        };
        let (s, b, h) = send(&a.admin, req(None)).await;
        assert_problem(s, &b, &h, StatusCode::UNAUTHORIZED, "Authorization");
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
        // The ingest key is not an admin key.
        let (s, _, _) = send(&a.admin, req(Some(&format!("Bearer {KEY}")))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {path}");
        let (s, _, _) = send(&a.admin, req(Some(&format!("Bearer {ADMIN_KEY}")))).await;
        assert_eq!(s, StatusCode::OK, "{method} {path}");
    }
}

#[tokio::test]
async fn without_admin_keys_the_v1_api_is_off() {
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20));
    let base = admin_state(state_with(spool, &["acme"]));
    let state = Arc::new(AdminState {
        app: base.app.clone(),
        keys: api::ApiKeys::new([], None),
        accounts: Vec::new(),
        limiter: base.limiter.clone(),
        ready_requires_spool: true,
        shared: None,
    });
    let admin = api::admin_app(state);
    let (s, b, h) = send(&admin, get("/v1/accounts")).await;
    assert_problem(s, &b, &h, StatusCode::FORBIDDEN, "server.admin_api_keys");
    let (s, _) = text(&admin, Request::get("/livez").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths() {
    let a = setup(&["acme"]);
    for (method, path, allow) in [
        ("POST", "/livez", "GET"),
        ("DELETE", "/readyz", "GET"),
        ("POST", "/metrics", "GET"),
        ("POST", "/v1/accounts", "GET"),
        ("PUT", "/v1/dead-letters", "GET, DELETE"),
        ("GET", "/v1/dead-letters/replay", "POST"),
    ] {
        let (s, b, h) = send(&a.admin, call(method, path)).await;
        assert_problem(s, &b, &h, StatusCode::METHOD_NOT_ALLOWED, allow);
        assert_eq!(h[header::ALLOW], allow, "{method} {path}");
    }
    let (s, b, h) = send(&a.admin, get("/v1/events")).await;
    assert_problem(s, &b, &h, StatusCode::NOT_FOUND, "/v1/dead-letters");
}

#[tokio::test]
async fn readiness_follows_the_spool_and_shutdown_only() {
    let a = setup(&["acme"]);
    let (s, body) = text(
        &a.admin,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "ready\n"));
    // A paused account (an X-side problem) does not make the gateway unready.
    a.state.accounts[0].status.lock().unwrap().paused = Some(PauseReason::Unauthorized);
    let (s, _) = text(
        &a.admin,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    a.shutdown.fire();
    let (s, b, h) = send(
        &a.admin,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_problem(s, &b, &h, StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    assert!(h.contains_key(header::RETRY_AFTER));
}

/// Once ingest refuses for lack of room, readiness, the gauge and /v1/accounts say so too (they used to
/// say "writable" until the spool was past its bound, which a refused append never makes it).
#[tokio::test]
async fn a_spool_refusing_for_room_is_unready_unwritable_and_says_why() {
    // Room for three events and half of a fourth: the fourth is refused while half an event is free.
    let one = {
        let probe = setup(&["acme"]);
        let body = json!({"event": "purchase", "twclid": "t", "conversion_id": "c0"});
        post_json(&probe.ingest, body).await;
        probe.spool.bytes()
    };
    let a = setup_with(
        Arc::new(MemorySpool::new(
            Duration::from_secs(3600),
            one * 3 + one / 2,
        )),
        &["acme"],
    );
    let mut accepted = 0;
    let refused = loop {
        let body =
            json!({"event": "purchase", "twclid": "t", "conversion_id": format!("c{accepted}")});
        let (s, b, _) = post_json(&a.ingest, body).await;
        if s != StatusCode::ACCEPTED {
            break (s, b);
        }
        accepted += 1;
        assert!(accepted <= 3, "the bound holds");
    };
    assert_eq!(refused.0, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.1);
    assert_eq!(accepted, 3);
    let (s, b, _) = send(
        &a.admin,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(b["detail"].as_str().unwrap().contains("full"), "{b}");
    let (_, m) = text(
        &a.admin,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(sample(&m, "conversion_gateway_spool_writable"), Some(0.0));
    let (_, report, _) = send(&a.admin, get("/v1/accounts")).await;
    assert_eq!(report["spool"]["writable"], false, "{report}");
    assert!(report["spool"]["refusing_because"]
        .as_str()
        .unwrap()
        .contains("full"));
    // Room again (the events delivered): all of them say so, and ingest takes events.
    let ids: Vec<u64> = a
        .spool
        .peek("acme", 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    a.spool.ack("acme", &ids).await.unwrap();
    let (s, _) = text(
        &a.admin,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, m) = text(
        &a.admin,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(sample(&m, "conversion_gateway_spool_writable"), Some(1.0));
    let body = json!({"event": "purchase", "twclid": "t", "conversion_id": "after"});
    assert_eq!(post_json(&a.ingest, body).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn accounts_take_no_parameters_and_show_when_the_last_error_happened() {
    let a = setup(&["acme"]);
    let (s, b, h) = send(&a.admin, get("/v1/accounts?x=1")).await;
    assert_problem(s, &b, &h, StatusCode::BAD_REQUEST, "\"x\"");
    {
        let mut status = a.state.accounts[0].status.lock().unwrap();
        status.last_error = Some("HTTP 503".into());
        status.last_error_at = Some(1_796_000_000_123);
        status.last_status = Some("200".into());
    }
    let (s, report, _) = send(&a.admin, get("/v1/accounts")).await;
    assert_eq!(s, StatusCode::OK);
    let acme = &report["accounts"][0];
    assert_eq!(
        acme["last_error_at"], "2026-11-30T00:53:20.123Z",
        "{report}"
    );
    assert_eq!(acme["last_status"], "200");
}

#[tokio::test]
async fn metrics_start_at_zero_for_every_account_and_count_outcomes() {
    let a = setup(&["acme", "beta"]);
    let (s, m) = text(
        &a.admin,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for account in ["acme", "beta"] {
        for outcome in ["accepted", "duplicate", "suppressed", "rejected"] {
            let series = format!(
                "conversion_gateway_events_received_total{{account=\"{account}\",outcome=\"{outcome}\"}}"
            );
            assert_eq!(sample(&m, &series), Some(0.0), "{series}");
        }
        for series in [
                        format!("conversion_gateway_events_delivered_total{{account=\"{account}\"}}"),
            format!("conversion_gateway_upstream_requests_total{{account=\"{account}\",status=\"200\"}}"),
            format!("conversion_gateway_events_dead_lettered_total{{account=\"{account}\",reason=\"rejected\"}}"),
            format!("conversion_gateway_spool_events{{account=\"{account}\"}}"),
            format!("conversion_gateway_spool_oldest_event_timestamp_seconds{{account=\"{account}\"}}"),
            format!("conversion_gateway_account_paused{{account=\"{account}\",reason=\"unauthorized\"}}"),
            format!("conversion_gateway_rate_limit_delay_seconds_total{{account=\"{account}\"}}"),
            format!("conversion_gateway_upstream_request_duration_seconds_count{{account=\"{account}\"}}"),
            format!("conversion_gateway_batch_size_events_count{{account=\"{account}\"}}"),
        ] {
            assert_eq!(sample(&m, &series), Some(0.0), "{series}");
        }
    }
    assert_eq!(sample(&m, "conversion_gateway_spool_bytes"), Some(0.0));

    let events = json!([
        {"account": "acme", "event": "purchase", "twclid": "t1", "conversion_id": "1"},
        {"account": "acme", "event": "purchase", "twclid": "t1", "conversion_id": "1"},
        {"account": "beta", "event": "purchase", "twclid": "t2", "opt_out": true},
        {"account": "beta", "event": "nope", "twclid": "t3"},
        {"account": "gamma", "event": "purchase", "twclid": "t4"},
                {"event": "purchase", "twclid": "t5"}
    ]);
    // The second request of two holds only the last event, rejected: 422.
    assert_eq!(
        post_events(&a.ingest, events).await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (_, m) = text(
        &a.admin,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    for (series, want) in [
        ("{account=\"acme\",outcome=\"accepted\"}", 1.0),
        ("{account=\"acme\",outcome=\"duplicate\"}", 1.0),
        ("{account=\"beta\",outcome=\"suppressed\"}", 1.0),
        ("{account=\"beta\",outcome=\"rejected\"}", 1.0),
        // No configured account could be told: never the name the caller sent.
        ("{account=\"unknown\",outcome=\"rejected\"}", 2.0),
    ] {
        let series = format!("conversion_gateway_events_received_total{series}");
        assert_eq!(sample(&m, &series), Some(want), "{series}\n{m}");
    }
    assert!(!m.contains("gamma"), "caller input never becomes a label");
    assert_eq!(
        sample(&m, "conversion_gateway_spool_events{account=\"acme\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "conversion_gateway_spool_bytes"),
        Some(a.spool.bytes() as f64)
    );
    let oldest = sample(
        &m,
        "conversion_gateway_spool_oldest_event_timestamp_seconds{account=\"acme\"}",
    )
    .unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((now - 60.0..=now + 1.0).contains(&oldest), "{oldest}");
    // Requests are timed by route template, including the metrics scrape itself.
    assert!(sample(
        &m,
        "conversion_gateway_http_request_duration_seconds_count{route=\"/v1/events\",status=\"202\"}"
    )
    .is_some_and(|n| n >= 1.0));
}

#[tokio::test]
async fn accounts_show_backlog_budget_and_delivery_state() {
    let a = setup(&["acme", "beta"]);
    let events: Vec<Value> = (0..3)
        .map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("t{i}")}))
        .collect();
    assert_eq!(
        post_events(&a.ingest, json!(events)).await,
        StatusCode::ACCEPTED
    );
    {
        let mut s = a.state.accounts[1].status.lock().unwrap();
        s.paused = Some(PauseReason::Unauthorized);
        s.last_status = Some("401".into());
        s.last_error = Some("This request is not properly authenticated".into());
    }
    let (s, b, _) = send(&a.admin, get("/v1/accounts")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let acme = &b["accounts"][0];
    assert_eq!(acme["name"], "acme");
    assert_eq!(acme["backlog"]["events"], 3);
    assert_eq!(acme["backlog"]["bytes"], a.spool.account_bytes("acme"));
    assert!(acme["backlog"]["oldest_event_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert_eq!(acme["budget"]["events"], 60_000);
    assert_eq!(acme["budget"]["window_seconds"], 900);
    assert_eq!(
        acme["budget"]["available_now"], 500,
        "a fresh budget: one burst"
    );
    assert_eq!(acme["paused"], Value::Null);
    let beta = &b["accounts"][1];
    assert_eq!(beta["backlog"]["events"], 0);
    assert_eq!(beta["backlog"]["oldest_event_at"], Value::Null);
    assert_eq!(beta["paused"], "unauthorized");
    assert_eq!(beta["last_status"], "401");
    assert_eq!(b["spool"]["writable"], true);
    assert_eq!(b["spool"]["dead_letters"], 0);
}

#[tokio::test]
async fn dead_letters_page_replay_with_the_fixed_mapping_and_delete() {
    let a = setup(&["acme", "beta"]);
    // Events came in while purchase was mapped to a wrong SET id; the admin state has the fixed mapping.
    let wrong = api::app(state_mapping(a.spool.clone(), &["acme", "beta"], "o9zzz"));
    let events: Vec<Value> = (0..5)
        .map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("a{i}"), "conversion_id": format!("a{i}")}))
                .chain((0..2).map(|i| json!({"account": "beta", "event_id": "o9d2g", "twclid": format!("b{i}"), "conversion_id": format!("b{i}")})))
        .collect();
    assert_eq!(
        post_events(&wrong, json!(events)).await,
        StatusCode::ACCEPTED
    );
    dead_letter_all(&a.spool, "acme", DeadLetterReason::NotFound).await;
    dead_letter_all(&a.spool, "beta", DeadLetterReason::Rejected).await;

    // Pages of two for acme, in order, linked by next_cursor.
    let mut ids = Vec::new();
    let mut uri = "/v1/dead-letters?account=acme&limit=2".to_string();
    loop {
        let (s, b, _) = send(&a.admin, get(&uri)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let page = b["dead_letters"].as_array().unwrap();
        assert!(page.len() <= 2);
        for d in page {
            assert_eq!(d["account"], "acme");
            assert_eq!(d["reason"], "not_found");
            assert_eq!(d["event_name"], "purchase");
            assert!(d["dead_lettered_at"].as_str().unwrap().ends_with('Z'));
            ids.push(
                d["conversion"]["conversion_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        match b["next_cursor"].as_str() {
            Some(c) => uri = format!("/v1/dead-letters?account=acme&limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(ids, ["a0", "a1", "a2", "a3", "a4"]);
    let (_, all, _) = send(&a.admin, get("/v1/dead-letters")).await;
    assert_eq!(all["dead_letters"].as_array().unwrap().len(), 7);
    assert_eq!(all["next_cursor"], Value::Null);

    for (uri, needle) in [
        ("/v1/dead-letters?limit=0", "limit"),
        ("/v1/dead-letters?limit=1001", "limit"),
        ("/v1/dead-letters?limit=ten", "limit"),
        ("/v1/dead-letters?cursor=abc", "cursor"),
        ("/v1/dead-letters?account=Acme", "account must be"),
        ("/v1/dead-letters?cursor=", "cursor"),
        ("/v1/dead-letters?limit=+5", "limit"),
        ("/v1/dead-letters?acount=acme", "acount"),
    ] {
        let (s, b, h) = send(&a.admin, get(uri)).await;
        assert_problem(s, &b, &h, StatusCode::BAD_REQUEST, needle);
    }
    for (method, uri) in [
        ("POST", "/v1/dead-letters/replay"),
        ("DELETE", "/v1/dead-letters"),
    ] {
        let (s, b, h) = send(&a.admin, call(method, uri)).await;
        assert_problem(s, &b, &h, StatusCode::BAD_REQUEST, "account is required");
        let (s, b, h) = send(&a.admin, call(method, &format!("{uri}?account=acne"))).await;
        assert_problem(s, &b, &h, StatusCode::NOT_FOUND, "\"acme\", \"beta\"");
    }
    let (s, b, h) = send(&a.admin, get("/v1/dead-letters?account=acne")).await;
    assert_problem(s, &b, &h, StatusCode::NOT_FOUND, "no account \"acne\"");

    // Replay acme's: back in its queue; the SET id comes from today's mapping (purchase -> o9d2g).
    let (s, b, _) = send(
        &a.admin,
        call("POST", "/v1/dead-letters/replay?account=acme"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["replayed"].clone(), b["remapped"].clone()),
        (json!(5), json!(5))
    );
    assert_eq!(a.spool.backlog("acme"), 5);
    let queued = a.spool.peek("acme", 10).await.unwrap();
    assert!(queued
        .iter()
        .all(|e| e.record.conversion.event_id == "o9d2g"));
    assert_eq!(a.spool.backlog("beta"), 0, "only the named account");
    let (_, rest, _) = send(&a.admin, get("/v1/dead-letters")).await;
    let rest = rest["dead_letters"].as_array().unwrap();
    assert!(rest.iter().all(|d| d["account"] == "beta"), "{rest:?}");

    let (s, b, _) = send(&a.admin, call("DELETE", "/v1/dead-letters?account=beta")).await;
    assert_eq!((s, b["deleted"].clone()), (StatusCode::OK, json!(2)));
    let (_, none, _) = send(&a.admin, get("/v1/dead-letters")).await;
    assert_eq!(none["dead_letters"], json!([]));
}

/// `server.ready_requires_spool = false`: a sidecar whose pod must stay in service. `/readyz` stays
/// 200 and says why ingest refuses; the gauge and `/v1/accounts` still say the spool refuses.
#[tokio::test]
async fn readiness_can_be_kept_while_the_spool_refuses() {
    let one = {
        let probe = setup(&["acme"]);
        let body = json!({"event": "purchase", "twclid": "t", "conversion_id": "c0"});
        post_json(&probe.ingest, body).await;
        probe.spool.bytes()
    };
    // Room for one event and half of another.
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), one + one / 2));
    let base = setup_with(spool, &["acme"]);
    let state = Arc::new(AdminState {
        app: base.state.app.clone(),
        keys: api::ApiKeys::new([], None),
        accounts: Vec::new(),
        limiter: base.state.limiter.clone(),
        ready_requires_spool: false,
        shared: None,
    });
    let admin = api::admin_app(state);
    for (id, status) in [
        ("c0", StatusCode::ACCEPTED),
        ("c1", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let body = json!({"event": "purchase", "twclid": "t", "conversion_id": id});
        assert_eq!(post_json(&base.ingest, body).await.0, status);
    }
    let (s, text_body) = text(&admin, Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        text_body.contains("ingest answers 503") && text_body.contains("full"),
        "{text_body}"
    );
    // The default configuration (the setup's state) is unready for the same spool.
    let (s, _, _) = send(
        &base.admin,
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (_, m) = text(
        &admin,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(sample(&m, "conversion_gateway_spool_writable"), Some(0.0));
}

/// A `read` admin key reads; replaying and deleting need a `write` key. Unknown keys are counted.
#[tokio::test]
async fn a_read_key_reads_and_only_a_write_key_changes_dead_letters() {
    use conversion_gateway::config::{AdminRole, Secret};
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20));
    let mut state = Arc::try_unwrap(admin_state(state_with(spool.clone(), &["acme"])))
        .ok()
        .unwrap();
    state.keys = api::ApiKeys::new(
        [
            (&Secret::new("reader"), AdminRole::Read),
            (&Secret::new("writer"), AdminRole::Write),
        ],
        None,
    );
    let ingest = api::app(state.app.clone());
    let admin = api::admin_app(Arc::new(state));
    post_events(
        &ingest,
        json!([{"event": "purchase", "twclid": "t", "conversion_id": "c1"}]),
    )
    .await;
    dead_letter_all(&spool, "acme", DeadLetterReason::Rejected).await;
    let with = |method: &str, uri: &str, key: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap()
    };
    for uri in ["/v1/accounts", "/v1/dead-letters"] {
        assert_eq!(
            text(&admin, with("GET", uri, "reader")).await.0,
            StatusCode::OK,
            "{uri}"
        );
    }
    for (method, uri) in [
        ("POST", "/v1/dead-letters/replay?account=acme"),
        ("DELETE", "/v1/dead-letters?account=acme"),
    ] {
        let (s, b, h) = send(&admin, with(method, uri, "reader")).await;
        assert_problem(s, &b, &h, StatusCode::FORBIDDEN, "role = \"write\"");
    }
    assert_eq!(
        spool.dead_letter_counts().await.unwrap().kept,
        1,
        "a read key changed nothing"
    );
    let (s, _) = text(
        &admin,
        with("DELETE", "/v1/dead-letters?account=acme", "writer"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(spool.dead_letter_counts().await.unwrap().kept, 0);
    let (s, _) = text(&admin, with("GET", "/v1/accounts", "wrong-key")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (_, metrics) = text(
        &admin,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        sample(
            &metrics,
            "conversion_gateway_auth_failures_total{listener=\"admin\"}"
        ),
        Some(1.0)
    );
    assert!(!metrics.contains("wrong-key"));
}
