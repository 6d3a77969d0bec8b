//! fake-x-api behaves like X: authentication, replay protection, contract errors, rate limit, faults.

/// The X client against real sockets (in this binary: one link less in CI).
#[path = "fake_x_api/upstream_client.rs"]
mod upstream_client;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use conversion_gateway::config::Secret;
use conversion_gateway::fake_x::{app, FakeConfig, FakeRateLimit, FakeX};
use conversion_gateway::upstream::auth::oauth1_header;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

const HOST: &str = "fake.test:18080";

fn fake(rate: Option<FakeRateLimit>) -> (Router, Arc<FakeX>) {
    let mut cfg = FakeConfig::demo();
    if let Some(r) = rate {
        cfg.accounts[0].rate_limit = r;
    }
    let f = FakeX::new(cfg);
    (app(f.clone()), f)
}

fn conversion(id: &str) -> Value {
    json!({"conversion_time": "2026-11-28T12:00:00.000Z", "event_id": "o9d2g", "identifiers": [{"twclid": "t"}], "conversion_id": id})
}

fn body(n: usize) -> String {
    json!({"conversions": (0..n).map(|i| conversion(&format!("c{i}"))).collect::<Vec<_>>()})
        .to_string()
}

fn signed_header(version: &str, secret: &str, fixed: Option<(&str, u64)>) -> String {
    let s = Secret::new;
    oauth1_header(
        &s("fake-consumer-key"),
        &s(secret),
        &s("fake-access-token"),
        &s("fake-access-token-secret"),
        &format!("http://{HOST}/{version}/measurement/conversions/o9d7n"),
        fixed,
    )
}

fn request(path: &str, auth: Option<(&str, String)>, body: String) -> Request<Body> {
    let mut b = Request::post(path)
        .header("host", HOST)
        .header("content-type", "application/json");
    if let Some((name, value)) = auth {
        b = b.header(name, value);
    }
    b.body(Body::from(body)).unwrap()
}

fn oauth_request(n: usize) -> Request<Body> {
    request(
        "/12/measurement/conversions/o9d7n",
        Some((
            "authorization",
            signed_header("12", "fake-consumer-secret", None),
        )),
        body(n),
    )
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn control(app: &Router, method: &str, path: &str, body: Value) -> Value {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(app, req).await.2
}

#[tokio::test]
async fn signed_request_is_accepted_like_x() {
    let (app, _) = fake(None);
    let (status, headers, body) = send(&app, oauth_request(2)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["conversions_processed"], 2);
    assert_eq!(body["request"]["params"]["account_id"], "18ce552mlaq");
    assert_eq!(body["data"]["debug_id"].as_str().unwrap().len(), 36);
    assert_eq!(headers["x-current-api-version"], "12");
    assert_eq!(headers["x-rate-limit-remaining"], "59998");
    assert!(headers.contains_key("x-account-rate-limit-reset"));
    let received = control(&app, "GET", "/_fake/conversions", Value::Null).await;
    assert_eq!(received["conversions"].as_array().unwrap().len(), 2);
    let req = Request::get("/_fake/stats").body(Body::empty()).unwrap();
    let stats = send(&app, req).await.2;
    assert_eq!(
        stats,
        json!({"requests": 1, "accepted_requests": 1, "accepted_conversions": 2})
    );
}

#[tokio::test]
async fn bad_signatures_replays_and_stale_timestamps_get_401() {
    let (app, fake) = fake(None);
    let header = signed_header("12", "fake-consumer-secret", None);
    let path = "/12/measurement/conversions/o9d7n";
    assert_eq!(
        send(
            &app,
            request(path, Some(("authorization", header.clone())), body(1))
        )
        .await
        .0,
        StatusCode::OK
    );
    let (status, _, body401) = send(
        &app,
        request(path, Some(("authorization", header)), body(1)),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body401["errors"][0]["code"], "UNAUTHORIZED_ACCESS");
    let wrong = signed_header("12", "not-the-secret", None);
    assert_eq!(
        send(&app, request(path, Some(("authorization", wrong)), body(1)))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let stale = signed_header(
        "12",
        "fake-consumer-secret",
        Some(("n0nce-stale", 1_000_000_000)),
    );
    assert_eq!(
        send(&app, request(path, Some(("authorization", stale)), body(1)))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    // Signed for another path: the signature covers the URL.
    let other = signed_header("11", "fake-consumer-secret", None);
    assert_eq!(
        send(&app, request(path, Some(("authorization", other)), body(1)))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&app, request(path, None, body(1))).await.0,
        StatusCode::UNAUTHORIZED
    );
    let reasons: Vec<_> = fake
        .requests()
        .into_iter()
        .filter_map(|r| r.auth_error)
        .collect();
    assert_eq!(
        reasons,
        [
            "replayed nonce",
            "signature does not match",
            "oauth_timestamp too far from the server clock",
            "signature does not match",
            "no credentials"
        ]
    );
}

#[tokio::test]
async fn pixel_token_auth() {
    let (app, _) = fake(None);
    let path = "/12/measurement/conversions/o9d7n";
    assert_eq!(
        send(
            &app,
            request(
                path,
                Some(("x-pixel-token", "fake-pixel-token".into())),
                body(1)
            )
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        send(
            &app,
            request(path, Some(("x-pixel-token", "nope".into())), body(1))
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn routes_versions_and_contract_errors() {
    let (app, _) = fake(None);
    let token = || Some(("x-pixel-token", "fake-pixel-token".to_string()));
    let (s, _, b) = send(
        &app,
        request("/12/measurement/conversions/zzzzz", token(), body(1)),
    )
    .await;
    assert_eq!(
        (s, b["errors"][0]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOT_FOUND"))
    );
    let (s, _, b) = send(
        &app,
        request("/9/measurement/conversions/o9d7n", token(), body(1)),
    )
    .await;
    assert_eq!(
        (s, b["errors"][0]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("ROUTE_NOT_FOUND"))
    );
    let (s, h, _) = send(
        &app,
        request("/11/measurement/conversions/o9d7n", token(), body(1)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.contains_key("x-api-warn"));
    let (s, _, b) = send(
        &app,
        request("/12/measurement/conversions/o9d7n", token(), body(501)),
    )
    .await;
    assert_eq!(
        (s, b["errors"][0]["message"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("Conversion count limit is 500")
        )
    );
    let bad = json!({"conversions": [{"conversion_time": "2022-06-16T01:14:00.603", "event_id": "o9d2g", "identifiers": [{"twclid": "t"}]}]}).to_string();
    let (s, _, b) = send(
        &app,
        request("/12/measurement/conversions/o9d7n", token(), bad),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["errors"][0]["parameter"], "conversion_time");
}

#[tokio::test]
async fn rate_limit_answers_429_with_headers() {
    let (app, _) = fake(Some(FakeRateLimit {
        events: 10,
        window_secs: 60,
    }));
    let (s, h, _) = send(&app, oauth_request(6)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h["x-rate-limit-remaining"], "4");
    let (s, h, b) = send(&app, oauth_request(6)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(b["errors"][0]["code"], "TOO_MANY_REQUESTS");
    assert_eq!(h["x-rate-limit-limit"], "10");
    assert_eq!(h["x-rate-limit-remaining"], "4");
    let reset: u64 = h["x-rate-limit-reset"].to_str().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(reset > now && reset <= now + 60);
    assert_eq!(send(&app, oauth_request(4)).await.0, StatusCode::OK);
}

#[tokio::test]
async fn injected_faults() {
    let (app, fake) = fake(None);
    control(
        &app,
        "POST",
        "/_fake/faults",
        json!({"status": 503, "count": 2}),
    )
    .await;
    assert_eq!(
        send(&app, oauth_request(1)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&app, oauth_request(1)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(send(&app, oauth_request(1)).await.0, StatusCode::OK);

    control(
        &app,
        "POST",
        "/_fake/faults",
        json!({"reject_conversion_id": "c1", "message": "poison"}),
    )
    .await;
    let (s, _, b) = send(&app, oauth_request(3)).await;
    assert_eq!(
        (s, b["errors"][0]["message"].as_str()),
        (StatusCode::BAD_REQUEST, Some("poison"))
    );
    assert_eq!(
        send(&app, oauth_request(1)).await.0,
        StatusCode::OK,
        "a batch without c1 passes"
    );

    let set = control(
        &app,
        "POST",
        "/_fake/faults",
        json!({"rate_limit_reset_after_secs": 30}),
    )
    .await;
    let (s, h, _) = send(&app, oauth_request(1)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        h["x-rate-limit-reset"].to_str().unwrap(),
        set["rate_limited_until"].to_string()
    );

    control(&app, "DELETE", "/_fake/faults", Value::Null).await;
    control(
        &app,
        "POST",
        "/_fake/faults",
        json!({"status": 500, "for_secs": 1}),
    )
    .await;
    assert_eq!(
        send(&app, oauth_request(1)).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        send(&app, oauth_request(1)).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        send(&app, oauth_request(1)).await.0,
        StatusCode::OK,
        "a time-bound fault ends"
    );

    control(&app, "POST", "/_fake/faults", json!({"latency_ms": 150})).await;
    let started = std::time::Instant::now();
    assert_eq!(send(&app, oauth_request(1)).await.0, StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));

    assert_eq!(fake.requests().len(), 10);
    control(&app, "POST", "/_fake/reset", Value::Null).await;
    assert!(fake.requests().is_empty());
}

/// A signed call to the Ads API's account endpoints with the demo account's credentials (or `token` /
/// `token_secret` instead of its own), `params` in the query (GET) or the form body (POST).
fn account_call(
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    token: Option<(&str, &str)>,
) -> Request<Body> {
    use conversion_gateway::upstream::auth::{encode_params, oauth1_header_for};
    let s = Secret::new;
    let (t, ts) = token.unwrap_or(("fake-access-token", "fake-access-token-secret"));
    let creds = [
        &s("fake-consumer-key"),
        &s("fake-consumer-secret"),
        &s(t),
        &s(ts),
    ];
    let header = oauth1_header_for(creds, method, &format!("http://{HOST}{path}"), params);
    let encoded = encode_params(params);
    let b = Request::builder()
        .method(method)
        .header("host", HOST)
        .header("authorization", header);
    if method == "GET" {
        let uri = if encoded.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{encoded}")
        };
        b.uri(uri).body(Body::empty()).unwrap()
    } else {
        b.uri(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(encoded))
            .unwrap()
    }
}

fn fake_with_users() -> (Router, Arc<FakeX>) {
    use conversion_gateway::fake_x::accounts::FakeUser;
    let mut cfg = FakeConfig::demo();
    cfg.accounts[0].users = vec![FakeUser {
        user_id: "756201191646691328".into(),
        access_token: "analyst-token".into(),
        access_token_secret: "analyst-secret".into(),
        permissions: vec!["ANALYST".into(), "TWEET_COMPOSER".into()],
    }];
    let mut other = cfg.accounts[0].clone();
    other.id = "5kx2bq9t0a".into();
    other.pixels = vec!["p4x1l".into()];
    other.users = Vec::new();
    if let Some(o) = other.oauth.as_mut() {
        o.access_token = "other-token".into();
        o.access_token_secret = "other-secret".into();
    }
    cfg.accounts.push(other);
    let f = FakeX::new(cfg);
    (app(f.clone()), f)
}

#[tokio::test]
async fn authenticated_user_access_answers_who_the_token_is_and_what_it_may_do() {
    let (app, _) = fake_with_users();
    let path = "/12/accounts/18ce552mlaq/authenticated_user_access";
    let (status, _, body) = send(&app, account_call("GET", path, &[], None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["request"]["params"]["account_id"], "18ce552mlaq");
    assert_eq!(body["data"]["permissions"], json!(["ACCOUNT_ADMIN"]));
    assert!(body["data"]["user_id"]
        .as_str()
        .is_some_and(|u| !u.is_empty()));
    // A listed user: its own permissions.
    let analyst = Some(("analyst-token", "analyst-secret"));
    let (status, _, body) = send(&app, account_call("GET", path, &[], analyst)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["user_id"], "756201191646691328");
    assert_eq!(
        body["data"]["permissions"],
        json!(["ANALYST", "TWEET_COMPOSER"])
    );
    // Another account's user: 404 in X's words.
    let other = Some(("other-token", "other-secret"));
    let (status, _, body) = send(&app, account_call("GET", path, &[], other)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("User ")
            && message.ends_with("does not have access to account 18ce552mlaq"),
        "{message}"
    );
    // An account that does not exist: 404; a bad signature: 401.
    let (status, _, body) = send(
        &app,
        account_call(
            "GET",
            "/12/accounts/nosuch/authenticated_user_access",
            &[],
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["errors"][0]["code"], "NOT_FOUND");
    let bad = Some(("fake-access-token", "wrong-secret"));
    let (status, _, body) = send(&app, account_call("GET", path, &[], bad)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn web_event_tags_are_listed_paged_and_created_and_a_created_tag_takes_conversions() {
    let (app, _) = fake_with_users();
    let path = "/12/accounts/18ce552mlaq/web_event_tags";
    let (status, _, body) = send(&app, account_call("GET", path, &[], None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["o9d2g", "o9d2h"]);
    assert_eq!(body["data"][0]["status"], "UNVERIFIED");
    assert_eq!(body["next_cursor"], Value::Null);
    // Paged with a cursor; the query parameters are signed.
    let (_, _, page) = send(
        &app,
        account_call(
            "GET",
            path,
            &[("count", "1"), ("with_total_count", "true")],
            None,
        ),
    )
    .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["total_count"], 2);
    assert_eq!(page["request"]["params"]["count"], "1");
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, _, next) = send(
        &app,
        account_call("GET", path, &[("count", "1"), ("cursor", &cursor)], None),
    )
    .await;
    assert_eq!(next["data"][0]["id"], "o9d2h", "{next}");
    assert_eq!(next["next_cursor"], Value::Null);
    // Bad parameters are X's 400 naming them.
    for (params, parameter) in [
        (vec![("count", "0")], "count"),
        (vec![("name", "x")], "type"),
        (vec![("type", "PURCHASE")], "name"),
        (vec![("name", "x"), ("type", "REFUND")], "type"),
        (
            vec![("name", "x"), ("type", "PURCHASE"), ("click_window", "3")],
            "click_window",
        ),
        (
            vec![
                ("name", "x"),
                ("type", "PURCHASE"),
                ("click_window", "7"),
                ("view_through_window", "14"),
            ],
            "view_through_window",
        ),
    ] {
        let method = if parameter == "count" { "GET" } else { "POST" };
        let (status, _, body) = send(&app, account_call(method, path, &params, None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{params:?}: {body}");
        assert_eq!(body["errors"][0]["parameter"], parameter, "{body}");
    }
    // Created (form body, signed): answered with its id, then listed, then taking conversions.
    let (status, _, created) = send(
        &app,
        account_call(
            "POST",
            path,
            &[
                ("name", "checkout"),
                ("type", "CHECKOUT_INITIATED"),
                ("click_window", "7"),
            ],
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["data"]["type"], "CHECKOUT_INITIATED");
    assert_eq!(created["data"]["click_window"], 7);
    assert_eq!(created["data"]["view_through_window"], 1);
    let (_, _, listed) = send(
        &app,
        account_call("GET", path, &[("web_event_tag_ids", &id)], None),
    )
    .await;
    assert_eq!(listed["data"][0]["id"], id.as_str(), "{listed}");
    let conversion = json!({"conversions": [{"conversion_time": "2026-11-28T12:00:00.000Z", "event_id": id, "identifiers": [{"twclid": "t"}], "conversion_id": "new-tag"}]});
    let (status, _, body) = send(
        &app,
        request(
            "/12/measurement/conversions/o9d7n",
            Some((
                "authorization",
                signed_header("12", "fake-consumer-secret", None),
            )),
            conversion.to_string(),
        ),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a created tag is one of the account's SET ids: {body}"
    );
    // A form parameter changed after signing: 401.
    let mut tampered = account_call("POST", path, &[("name", "a"), ("type", "PURCHASE")], None);
    *tampered.body_mut() = Body::from("name=b&type=PURCHASE");
    let (status, _, _) = send(&app, tampered).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
