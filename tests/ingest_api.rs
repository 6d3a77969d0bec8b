//! The ingest router driven with `oneshot`: every status and shape of `POST /v1/events`.

mod oneshot;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use conversion_gateway::api::{self, ApiKeys};
use conversion_gateway::spool::{MemorySpool, Queue};
use oneshot::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

#[tokio::test]
async fn single_event_is_accepted_and_spooled_hashed() {
    let (app, spool, _) = setup();
    let (status, body, _) = post_json(
        &app,
        json!({"event": "purchase", "email": "Jane.Doe@Example.com", "phone": "(650) 253-0000"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        body,
        json!({"accepted": 1, "duplicates": 0, "suppressed": 0, "rejected": []})
    );
    let waiting = spool.peek("acme", 10).await.unwrap();
    assert_eq!(waiting.len(), 1);
    let stored = serde_json::to_string(&waiting[0].record).unwrap();
    assert!(
        !stored.to_lowercase().contains("jane") && !stored.contains("253"),
        "{stored}"
    );
}

#[tokio::test]
async fn batch_counts_every_outcome_and_keeps_indexes() {
    let (app, spool, _) = setup();
    let events = json!({"events": [
        {"event": "purchase", "twclid": "a", "conversion_id": "1"},
        {"event": "purchase", "twclid": "a", "conversion_id": "1"},
        {"event": "purchase", "twclid": "b", "opt_out": true},
        {"event": "nope", "twclid": "c"},
        "not an object",
    ]});
    let (status, body, _) = post_json(&app, events).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(body["suppressed"], 1);
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(
        rejected
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(rejected[0]["errors"][0]["field"], "event");
    assert_eq!(spool.backlog("acme"), 1);

    // The identical POST again: recognised, nothing queued twice.
    let (status, body, _) = post_json(
        &app,
        json!({"event": "purchase", "twclid": "a", "conversion_id": "1"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(spool.backlog("acme"), 1);
}

#[tokio::test]
async fn identical_retry_without_conversion_id_is_a_duplicate() {
    let (app, spool, _) = setup();
    let ev = json!({"event": "purchase", "email": "a@example.com", "value": 10});
    assert_eq!(post_json(&app, ev.clone()).await.1["accepted"], 1);
    assert_eq!(post_json(&app, ev).await.1["duplicates"], 1);
    assert_eq!(spool.backlog("acme"), 1);
}

#[tokio::test]
async fn all_rejected_is_422_with_the_same_body() {
    let (app, spool, _) = setup();
    let (status, body, _) = post_json(
        &app,
        json!({"events": [{"event": "purchase"}, {"twclid": "x"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["accepted"], 0);
    assert_eq!(body["rejected"][0]["errors"][0]["field"], "identifiers");
    assert_eq!(body["rejected"][1]["errors"][0]["field"], "event");
    assert_eq!(spool.backlog("acme"), 0);
}

#[tokio::test]
async fn authentication() {
    let (app, _, _) = setup();
    let no_auth = Request::post("/v1/events")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let (s, b, h) = send(&app, no_auth).await;
    assert_problem(s, &b, &h, StatusCode::UNAUTHORIZED, "Authorization");
    assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
    for bad in [
        "Bearer wrong",
        "Bearer test-key-",
        "Basic dGVzdA==",
        "Bearer ",
    ] {
        let req = Request::post("/v1/events")
            .header(header::AUTHORIZATION, bad)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::UNAUTHORIZED, "{bad}");
    }
    let second = Request::post("/v1/events")
        .header(header::AUTHORIZATION, "bearer other-key")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"event": "purchase", "twclid": "t"}).to_string(),
        ))
        .unwrap();
    assert_eq!(send(&app, second).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn unauthenticated_mode_accepts_without_key() {
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20));
    let mut st = Arc::try_unwrap(state_with(spool, &["acme"])).ok().unwrap();
    st.keys = ApiKeys::new([], Some(api::Scope::Every));
    let app = api::app(Arc::new(st));
    let req = Request::post("/v1/events")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"event": "purchase", "twclid": "t"}).to_string(),
        ))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn media_type_size_method_and_shape() {
    let (app, _, _) = setup();
    let req = Request::post("/v1/events")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("{}"))
        .unwrap();
    let (s, b, h) = send(&app, req).await;
    assert_problem(
        s,
        &b,
        &h,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "application/json",
    );
    let req = Request::post("/v1/events")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let req = post()
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(
            json!({"event": "purchase", "twclid": "t"}).to_string(),
        ))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::ACCEPTED);

    // Declared too large, and streamed too large without a length: both 413.
    let big = format!(
        "{{\"event\":\"purchase\",\"twclid\":\"{}\"}}",
        "x".repeat(5000)
    );
    let (s, b, h) = send(&app, post().body(Body::from(big.clone())).unwrap()).await;
    assert_problem(s, &b, &h, StatusCode::PAYLOAD_TOO_LARGE, "max_body_bytes");
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(100)
        .map(|c| Ok(String::from_utf8(c.to_vec()).unwrap()))
        .collect();
    let streamed = Body::from_stream(futures_util::stream::iter(chunks));
    assert_eq!(
        send(&app, post().body(streamed).unwrap()).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let req = Request::builder()
            .method(method)
            .uri("/v1/events")
            .body(Body::empty())
            .unwrap();
        let (s, b, h) = send(&app, req).await;
        assert_problem(s, &b, &h, StatusCode::METHOD_NOT_ALLOWED, "POST");
        assert_eq!(h[header::ALLOW], "POST");
    }
    let (s, b, h) = send(
        &app,
        Request::get("/v2/nothing").body(Body::empty()).unwrap(),
    )
    .await;
    assert_problem(s, &b, &h, StatusCode::NOT_FOUND, "/v1/events");

    for (body, needle) in [
        ("{\"event\": ", "not valid JSON"),
        ("[1,2]", "one event object"),
        ("\"text\"", "one event object"),
        ("{\"events\": {}}", "array"),
        ("{\"events\": []}", "at least one"),
        (
            "{\"events\": [], \"account\": \"acme\"}",
            "unexpected top-level field",
        ),
    ] {
        let (s, b, h) = send(&app, post().body(Body::from(body)).unwrap()).await;
        assert_problem(s, &b, &h, StatusCode::BAD_REQUEST, needle);
    }
}

#[tokio::test]
async fn too_many_events() {
    let (app, spool, _) = setup();
    let events: Vec<Value> = (0..6)
        .map(|i| json!({"event": "purchase", "twclid": format!("t{i}")}))
        .collect();
    let (s, b, h) = post_json(&app, json!({ "events": events })).await;
    assert_problem(
        s,
        &b,
        &h,
        StatusCode::PAYLOAD_TOO_LARGE,
        "max_events_per_request",
    );
    assert_eq!(spool.backlog("acme"), 0);
}

#[tokio::test]
async fn full_spool_and_shutdown_answer_503_with_retry_after() {
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1));
    let (st, shutdown) = stoppable_state(spool.clone(), &["acme"]);
    let app = api::app(st.clone());
    let two = json!({"events": [{"event": "purchase", "twclid": "a"}, {"event": "purchase", "twclid": "b"}]});
    let (s, b, h) = post_json(&app, two).await;
    assert_problem(s, &b, &h, StatusCode::SERVICE_UNAVAILABLE, "full");
    assert!(h.contains_key(header::RETRY_AFTER));
    assert_eq!(spool.backlog("acme"), 0);
    shutdown.fire();
    let (s, b, h) = post_json(&app, json!({"event": "purchase", "twclid": "a"})).await;
    assert_problem(s, &b, &h, StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    let admin = api::admin_app(admin_state(st));
    assert_eq!(
        send(&admin, Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&admin, Request::get("/livez").body(Body::empty()).unwrap())
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn several_accounts_route_by_name() {
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20));
    let app = api::app(state_with(spool.clone(), &["acme", "beta"]));
    let (s, b, _) = post_json(&app, json!({"events": [{"account": "beta", "event": "purchase", "twclid": "a"}, {"event": "purchase", "twclid": "b"}]})).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(b["rejected"][0]["errors"][0]["field"], "account");
    assert_eq!((spool.backlog("acme"), spool.backlog("beta")), (0, 1));
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[tokio::test]
async fn gzip_bodies_are_taken_and_decompressed_under_the_limit() {
    let (app, spool, _) = setup();
    let body = json!({"events": [{"event": "purchase", "twclid": "a"}, {"event": "purchase", "twclid": "b"}]});
    let req = post()
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(gzip(body.to_string().as_bytes())))
        .unwrap();
    let (s, b, _) = send(&app, req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(b["accepted"], 2);
    assert_eq!(spool.backlog("acme"), 2);
    // A small body that inflates past server.max_body_bytes (4096 here) is refused, nothing kept.
    let bomb = gzip(&vec![b' '; 1 << 20]);
    assert!(bomb.len() < 4096);
    let req = post()
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(bomb))
        .unwrap();
    let (s, b, h) = send(&app, req).await;
    assert_problem(s, &b, &h, StatusCode::PAYLOAD_TOO_LARGE, "decompressed");
    // Not gzip after all: a clear 400.
    let req = post()
        .header(header::CONTENT_ENCODING, "gzip")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (s, b, h) = send(&app, req).await;
    assert_problem(s, &b, &h, StatusCode::BAD_REQUEST, "gzip");
    assert_eq!(spool.backlog("acme"), 2);
}

#[tokio::test]
async fn other_encodings_and_charsets_are_415_naming_them() {
    let (app, spool, _) = setup();
    let body = json!({"event": "purchase", "twclid": "a"}).to_string();
    for encoding in ["br", "deflate", "gzip, br"] {
        let req = post()
            .header(header::CONTENT_ENCODING, encoding)
            .body(Body::from(body.clone()))
            .unwrap();
        let (s, b, h) = send(&app, req).await;
        assert_problem(s, &b, &h, StatusCode::UNSUPPORTED_MEDIA_TYPE, encoding);
    }
    let req = Request::post("/v1/events")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "application/json; charset=ISO-8859-1")
        .body(Body::from(body.clone()))
        .unwrap();
    let (s, b, h) = send(&app, req).await;
    assert_problem(s, &b, &h, StatusCode::UNSUPPORTED_MEDIA_TYPE, "ISO-8859-1");
    assert_eq!(spool.backlog("acme"), 0);
    for ct in [
        "application/json; charset=utf-8",
        "application/json;charset=\"UTF-8\"",
    ] {
        let req = Request::post("/v1/events")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_TYPE, ct)
            .body(Body::from(body.clone()))
            .unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::ACCEPTED, "{ct}");
    }
}

/// A body sent in several frames without a Content-Length (chunked) is read whole, and held to
/// `server.max_body_bytes` as it arrives.
#[tokio::test]
async fn a_chunked_body_is_read_whole_and_bounded() {
    let (app, spool, _) = setup();
    let text = json!({"events": [
        {"event": "purchase", "twclid": "a", "conversion_id": "chunk-1"},
        {"event": "purchase", "twclid": "b", "conversion_id": "chunk-2"},
    ]})
    .to_string();
    let frames: Vec<Result<axum::body::Bytes, std::io::Error>> = text
        .as_bytes()
        .chunks(7)
        .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
        .collect();
    let req = post()
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .unwrap();
    let (status, body, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["accepted"], 2);
    assert_eq!(spool.backlog("acme"), 2);

    // 5,000 bytes in frames of 100: past the test state's 4,096-byte limit without declaring it.
    let frames: Vec<Result<axum::body::Bytes, std::io::Error>> = (0..50)
        .map(|_| Ok(axum::body::Bytes::from(vec![b' '; 100])))
        .collect();
    let req = post()
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .unwrap();
    let (status, body, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(spool.backlog("acme"), 2);
}

/// A key scoped to some accounts gets other accounts' events rejected, naming the account; they are
/// counted and never queued; the request's other events are accepted. Unknown keys are counted.
#[tokio::test]
async fn a_scoped_key_sends_only_its_accounts_events() {
    use conversion_gateway::config::Secret;
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20));
    let mut st = Arc::try_unwrap(state_with(spool.clone(), &["shop", "blog"]))
        .ok()
        .unwrap();
    st.keys = ApiKeys::new(
        [
            (
                &Secret::new("shop-key"),
                api::Scope::Only(vec!["shop".to_string()].into()),
            ),
            (&Secret::new("any-key"), api::Scope::Every),
        ],
        None,
    );
    let st = Arc::new(st);
    let app = api::app(st.clone());
    let post_as = |key: &str, body: Value| {
        Request::post("/v1/events")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let events = json!({"events": [
        {"account": "shop", "event": "purchase", "twclid": "t", "conversion_id": "s1"},
        {"account": "blog", "event": "purchase", "twclid": "t", "conversion_id": "b1"},
    ]});
    let (s, b, _) = send(&app, post_as("shop-key", events.clone())).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(b["accepted"], 1);
    assert_eq!(b["rejected"][0]["index"], 1);
    assert_eq!(b["rejected"][0]["errors"][0]["field"], "account");
    let message = b["rejected"][0]["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("may not send events for account \"blog\""),
        "{message}"
    );
    assert_eq!((spool.backlog("shop"), spool.backlog("blog")), (1, 0));
    // Only another account's events: nothing accepted.
    let only_blog =
        json!({"account": "blog", "event": "purchase", "twclid": "t", "conversion_id": "b2"});
    let (s, _, _) = send(&app, post_as("shop-key", only_blog.clone())).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(spool.backlog("blog"), 0);
    // An unscoped key sends for both.
    let (s, b, _) = send(&app, post_as("any-key", events)).await;
    assert_eq!((s, b["accepted"].clone()), (StatusCode::ACCEPTED, json!(1)));
    assert_eq!(b["duplicates"], 1, "shop's event was queued before");
    assert_eq!(spool.backlog("blog"), 1);
    let (s, _, _) = send(&app, post_as("no-such-key", only_blog)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let metrics = metrics_of(&st).await;
    assert!(
        metrics.contains("conversion_gateway_auth_failures_total{listener=\"ingest\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "conversion_gateway_events_received_total{account=\"blog\",outcome=\"rejected\"} 2"
    ));
}

/// Events of users on the suppression list, and every event of a request with `Sec-GPC: 1` (when
/// honoured), are suppressed: answered and counted as such, never queued.
#[tokio::test]
async fn opted_out_users_are_suppressed_by_list_and_by_gpc() {
    use conversion_gateway::privacy::Privacy;
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("opted-out");
    std::fs::write(&list, "# users who opted out\nOpted.Out@Example.com\n").unwrap();
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20));
    let with = |honor_gpc: bool| {
        let mut st = Arc::try_unwrap(state_with(spool.clone(), &["acme"]))
            .ok()
            .unwrap();
        st.privacy = Arc::new(
            Privacy::load(&conversion_gateway::config::Privacy {
                suppression_list_file: Some(list.clone()),
                honor_gpc,
            })
            .unwrap(),
        );
        api::app(Arc::new(st))
    };
    let event =
        |email: &str, id: &str| json!({"event": "purchase", "email": email, "conversion_id": id});
    let app = with(true);
    let (s, b, _) = post_json(
        &app,
        json!({"events": [event("opted.out@example.com", "o1"), event("someone@example.com", "s1")]}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(
        (b["accepted"].clone(), b["suppressed"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(
        spool.backlog("acme"),
        1,
        "the opted-out user's event is not queued"
    );
    let gpc = |app: &axum::Router, id: &str| {
        let req = post()
            .header("sec-gpc", "1")
            .body(Body::from(event("someone@example.com", id).to_string()))
            .unwrap();
        let app = app.clone();
        async move { send(&app, req).await }
    };
    let (s, b, _) = gpc(&app, "g1").await;
    assert_eq!(
        (s, b["suppressed"].clone(), b["accepted"].clone()),
        (StatusCode::ACCEPTED, json!(1), json!(0))
    );
    assert_eq!(spool.backlog("acme"), 1);
    // Not honoured: the header changes nothing.
    let (_, b, _) = gpc(&with(false), "g2").await;
    assert_eq!(b["accepted"], 1);
    assert_eq!(spool.backlog("acme"), 2);
}

/// A user's typo never costs a conversion: an unusable identifier next to a strong one is left out of
/// the event, listed under `warnings` and counted; the event is queued with what could be used. With no
/// strong identifier left, the event is rejected with every reason.
#[tokio::test]
async fn an_unusable_identifier_is_dropped_with_a_warning_and_the_event_kept() {
    let (app, spool, st) = setup();
    let events = json!({"events": [
        {"event": "purchase", "email": "jane@example.com", "phone": "12", "conversion_id": "typo-1"},
        {"event": "purchase", "twclid": "t", "ip_address": "1.2.3", "email": "no-at-sign", "conversion_id": "typo-2"},
        {"event": "purchase", "phone": "12", "conversion_id": "typo-3"},
    ]});
    let (status, body, _) = post_json(&app, events).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], 2, "{body}");
    let warnings: Vec<(u64, &str)> = body["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["index"].as_u64().unwrap(), w["field"].as_str().unwrap()))
        .collect();
    assert_eq!(warnings, [(0, "phone"), (1, "email"), (1, "ip_address")]);
    assert!(body["warnings"][0]["message"]
        .as_str()
        .unwrap()
        .contains("phone number"));
    assert!(
        !body.to_string().contains("no-at-sign"),
        "errors never echo the value"
    );
    let rejected = &body["rejected"][0];
    assert_eq!(rejected["index"], 2);
    assert_eq!(rejected["errors"][0]["field"], "phone");
    // What is queued carries only what could be used.
    let waiting = spool.peek("acme", 10).await.unwrap();
    let ids: Vec<Vec<&str>> = waiting
        .iter()
        .map(|e| {
            e.record
                .conversion
                .identifiers
                .iter()
                .map(|i| match i {
                    conversion_gateway::conversion::Identifier::Twclid { .. } => "twclid",
                    conversion_gateway::conversion::Identifier::HashedEmail { .. } => "email",
                    conversion_gateway::conversion::Identifier::HashedPhoneNumber { .. } => "phone",
                    conversion_gateway::conversion::Identifier::Device {
                        ip_address: None, ..
                    } => "device without ip",
                    conversion_gateway::conversion::Identifier::Device { .. } => "device",
                })
                .collect()
        })
        .collect();
    assert_eq!(ids, [vec!["email"], vec!["twclid"]]);
    // Counted per account and field.
    let metrics = metrics_of(&st).await;
    for field in ["phone", "email", "ip_address"] {
        assert!(
            metrics.contains(&format!(
                "conversion_gateway_identifiers_dropped_total{{account=\"acme\",field=\"{field}\"}} 1"
            )),
            "{field}: {metrics}"
        );
    }
    // Without drops the answer is as before: no `warnings` key.
    let (_, body, _) = post_json(&app, json!({"event": "purchase", "twclid": "x"})).await;
    assert!(body.get("warnings").is_none(), "{body}");
}

/// What the admin listener's `/metrics` shows for the gateway `st` belongs to.
async fn metrics_of(st: &Arc<conversion_gateway::api::AppState>) -> String {
    let admin = api::admin_app(admin_state(st.clone()));
    let resp = admin
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}
