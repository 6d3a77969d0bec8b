//! A faithful fake of the X Conversions endpoint, for tests, local runs and benchmarks (`fake-x-api`).
//!
//! It serves `POST /{version}/measurement/conversions/{pixel_id}` like X: the contract checks and seed
//! messages of `crate::x_contract` (shared with the sandbox transport), OAuth 1.0a verification from RFC 5849 (`oauth`, with replayed nonces refused) or
//! `X-Pixel-Token`, and a per-account rate limit with X's headers. It also serves the Ads API account
//! endpoints a setup check needs (`accounts`: who a token is on an account, the account's event tags, and
//! creating one). Under `/_fake` it records every conversions request
//! and takes injected faults. Invariant: every request that reaches the endpoint is recorded, whatever
//! its outcome, so tests can see exactly what the gateway sent.

pub mod accounts;
pub mod oauth;

use crate::x_contract as contract;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// API versions served; the first is current, the others answer with `x-api-warn`.
    #[serde(default = "default_versions")]
    pub versions: Vec<String>,
    /// Seconds an OAuth timestamp may differ from the fake's clock.
    #[serde(default = "default_skew")]
    pub max_clock_skew_secs: u64,
    /// Seconds the fake's clock runs ahead of the machine's (negative: behind): its `Date` header and its
    /// OAuth timestamp check follow it, as X's would when a client's clock is off.
    #[serde(default)]
    pub clock_offset_secs: i64,
    /// Keep every request and its conversions for `/_fake/requests` (turn off for long benchmarks:
    /// `/_fake/stats` still counts).
    #[serde(default = "default_record")]
    pub record: bool,
    #[serde(default)]
    pub accounts: Vec<FakeAccount>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FakeAccount {
    pub id: String,
    pub pixels: Vec<String>,
    /// SET ids that belong to this account.
    pub events: Vec<String>,
    #[serde(default)]
    pub rate_limit: FakeRateLimit,
    pub oauth: Option<FakeOauth>,
    pub pixel_token: Option<String>,
    /// Users of the app on this account and their permissions (`accounts`); the `oauth` token is an
    /// `ACCOUNT_ADMIN` unless listed.
    #[serde(default)]
    pub users: Vec<accounts::FakeUser>,
    /// The account's Single Event Tags; when empty, each of `events` is an `UNVERIFIED` `PURCHASE` tag.
    #[serde(default)]
    pub tags: Vec<accounts::FakeTag>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FakeRateLimit {
    pub events: u64,
    pub window_secs: u64,
}

impl Default for FakeRateLimit {
    fn default() -> Self {
        FakeRateLimit {
            events: 60_000,
            window_secs: 900,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FakeOauth {
    pub consumer_key: String,
    pub consumer_secret: String,
    pub access_token: String,
    pub access_token_secret: String,
    /// Whether the app (the consumer key) has Ads API access; without, the account endpoints answer X's
    /// 403 `UNAUTHORIZED_CLIENT`.
    #[serde(default = "yes")]
    pub ads_api_access: bool,
}

fn default_listen() -> String {
    "127.0.0.1:18080".into()
}
fn default_versions() -> Vec<String> {
    vec!["12".into(), "11".into()]
}
fn default_skew() -> u64 {
    300
}
fn default_record() -> bool {
    true
}

fn yes() -> bool {
    true
}

/// Counters kept whether or not requests are recorded.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FakeStats {
    pub requests: u64,
    pub accepted_requests: u64,
    pub accepted_conversions: u64,
}

impl FakeConfig {
    /// One account matching `config/example.toml` and `config/local.toml`.
    pub fn demo() -> Self {
        FakeConfig {
            listen: default_listen(),
            versions: default_versions(),
            max_clock_skew_secs: default_skew(),
            clock_offset_secs: 0,
            record: true,
            accounts: vec![FakeAccount {
                id: "18ce552mlaq".into(),
                pixels: vec!["o9d7n".into()],
                events: vec!["o9d2g".into(), "o9d2h".into()],
                rate_limit: FakeRateLimit::default(),
                oauth: Some(FakeOauth {
                    consumer_key: "fake-consumer-key".into(),
                    consumer_secret: "fake-consumer-secret".into(),
                    access_token: "fake-access-token".into(),
                    access_token_secret: "fake-access-token-secret".into(),
                    ads_api_access: true,
                }),
                pixel_token: Some("fake-pixel-token".into()),
                users: Vec::new(),
                tags: Vec::new(),
            }],
        }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    pub seq: u64,
    pub received_at_ms: u64,
    pub api_version: String,
    pub pixel_id: String,
    pub account_id: Option<String>,
    /// `oauth1`, `pixel_token` or `none`.
    pub auth: String,
    pub auth_ok: bool,
    pub auth_error: Option<String>,
    pub oauth_nonce: Option<String>,
    pub oauth_timestamp: Option<String>,
    pub status: u16,
    pub debug_id: Option<String>,
    pub errors: Vec<String>,
    /// The conversions of the body, when it parsed.
    pub conversions: Vec<Value>,
}

/// Faults to inject, set through `POST /_fake/faults`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Answer this status to the next `count` requests (default 1), or to every request for `for_secs`.
    pub status: Option<u16>,
    pub count: Option<u32>,
    pub for_secs: Option<u64>,
    /// Added latency for every request, in milliseconds.
    pub latency_ms: Option<u64>,
    /// Answer 429 with `x-rate-limit-reset` this many seconds ahead until then.
    pub rate_limit_reset_after_secs: Option<u64>,
    /// Refuse (400) any batch that contains this conversion_id.
    pub reject_conversion_id: Option<String>,
    /// The message for `reject_conversion_id`.
    pub message: Option<String>,
}

#[derive(Clone, Copy)]
struct StatusFault {
    status: u16,
    /// Requests left to answer, or `None` for a time-bound fault.
    left: Option<u32>,
    /// Epoch milliseconds after which the fault ends.
    until_ms: Option<u64>,
}

#[derive(Default)]
struct Faults {
    status: Option<StatusFault>,
    latency: Duration,
    rate_limited_until: Option<u64>,
    reject: HashMap<String, String>,
}

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    stats: FakeStats,
    faults: Faults,
    nonces: HashMap<String, u64>,
    /// account id -> (window start epoch secs, events counted)
    windows: HashMap<String, (u64, u64)>,
    /// account id -> tags created through `POST .../web_event_tags`, as answered.
    created_tags: HashMap<String, Vec<Value>>,
    next_tag: u64,
}

pub struct FakeX {
    config: FakeConfig,
    inner: Mutex<Inner>,
}

impl FakeX {
    pub fn new(config: FakeConfig) -> Arc<Self> {
        Arc::new(FakeX {
            config,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The fake's clock: the machine's, moved by `clock_offset_secs`.
    fn clock_secs(&self) -> u64 {
        now_secs().saturating_add_signed(self.config.clock_offset_secs)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    fn account_for_pixel(&self, pixel: &str) -> Option<&FakeAccount> {
        self.config
            .accounts
            .iter()
            .find(|a| a.pixels.iter().any(|p| p == pixel))
    }
}

pub fn app(fake: Arc<FakeX>) -> Router {
    Router::new()
        .route(
            "/{version}/measurement/conversions/{pixel_id}",
            post(conversions),
        )
        .route(
            "/{version}/accounts/{account_id}/authenticated_user_access",
            get(accounts::authenticated_user_access),
        )
        .route(
            "/{version}/accounts/{account_id}/web_event_tags",
            get(accounts::web_event_tags).post(accounts::web_event_tags),
        )
        .route("/_fake/requests", get(list_requests))
        .route("/_fake/conversions", get(list_conversions))
        .route("/_fake/faults", post(set_faults).delete(clear_faults))
        .route("/_fake/reset", post(reset))
        .route("/_fake/health", get(|| async { "ok" }))
        .route(
            "/_fake/stats",
            get(|State(fake): State<Arc<FakeX>>| async move { Json(fake.lock().stats) }),
        )
        .layer(axum::middleware::map_response_with_state(
            fake.clone(),
            date_header,
        ))
        .with_state(fake)
}

/// X's `Date` header, from the fake's clock (hyper would write the machine's).
async fn date_header(State(fake): State<Arc<FakeX>>, mut resp: Response) -> Response {
    let at = chrono::DateTime::from_timestamp(fake.clock_secs() as i64, 0).unwrap_or_default();
    if let Ok(v) = HeaderValue::from_str(&at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()) {
        resp.headers_mut().insert(axum::http::header::DATE, v);
    }
    resp
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn x_error(status: u16, errors: &[(&str, String, String)], account_id: Option<&str>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(contract::error_envelope(errors, account_id))).into_response()
}

/// X's 429, with its rate-limit headers.
fn too_many_requests(account_id: Option<&str>, limit: u64, remaining: u64, reset: u64) -> Response {
    let mut resp = x_error(
        429,
        &[(
            "TOO_MANY_REQUESTS",
            "Rate limit exceeded".into(),
            String::new(),
        )],
        account_id,
    );
    rate_headers(&mut resp, limit, remaining, reset);
    resp
}

fn rate_headers(resp: &mut Response, limit: u64, remaining: u64, reset: u64) {
    let h = resp.headers_mut();
    for prefix in ["x-rate-limit", "x-account-rate-limit"] {
        for (suffix, v) in [("limit", limit), ("remaining", remaining), ("reset", reset)] {
            if let (Ok(name), Ok(value)) = (
                axum::http::HeaderName::try_from(format!("{prefix}-{suffix}")),
                HeaderValue::try_from(v.to_string()),
            ) {
                h.insert(name, value);
            }
        }
    }
}

async fn conversions(
    State(fake): State<Arc<FakeX>>,
    Path((version, pixel_id)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = fake.lock().faults.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut rec = Recorded {
        seq: 0,
        received_at_ms: now_ms(),
        api_version: version.clone(),
        pixel_id: pixel_id.clone(),
        account_id: None,
        auth: "none".into(),
        auth_ok: false,
        auth_error: None,
        oauth_nonce: None,
        oauth_timestamp: None,
        status: 0,
        debug_id: None,
        errors: Vec::new(),
        conversions: Vec::new(),
    };
    // Parsed once: validation, fault checks and the record all read this value.
    let mut parsed: Option<Value> = serde_json::from_slice(&body).ok();
    // What the request carried is recorded even when a fault answers before authentication.
    if headers.contains_key("x-pixel-token") {
        rec.auth = "pixel_token".into();
    } else if let Some(params) = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(oauth::parse_header)
    {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        rec.auth = "oauth1".into();
        rec.oauth_nonce = get("oauth_nonce");
        rec.oauth_timestamp = get("oauth_timestamp");
    }
    let mut resp = handle(
        &fake,
        &version,
        &pixel_id,
        &uri,
        &headers,
        parsed.as_ref(),
        &mut rec,
    );
    let count = parsed
        .as_ref()
        .and_then(|v| v.get("conversions"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if fake.config.record {
        if let Some(Value::Array(list)) = parsed
            .as_mut()
            .and_then(|v| v.get_mut("conversions"))
            .map(Value::take)
        {
            rec.conversions = list;
        }
    }
    if let Some(current) = fake.config.versions.first() {
        if let Ok(v) = HeaderValue::try_from(current.as_str()) {
            resp.headers_mut().insert("x-current-api-version", v);
        }
        if current != &version && fake.config.versions.contains(&version) {
            resp.headers_mut().insert(
                "x-api-warn",
                HeaderValue::from_static("This API version is deprecated"),
            );
        }
    }
    rec.status = resp.status().as_u16();
    let mut inner = fake.lock();
    inner.stats.requests += 1;
    rec.seq = inner.stats.requests;
    if (200..300).contains(&rec.status) {
        inner.stats.accepted_requests += 1;
        inner.stats.accepted_conversions += count as u64;
    }
    if fake.config.record {
        inner.requests.push(rec);
    }
    resp
}

/// Answers one conversions request as X would, in X's order: injected faults, the route, the pixel,
/// authentication, the contract, injected per-conversion refusals, the rate limit.
fn handle(
    fake: &FakeX,
    version: &str,
    pixel_id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    parsed: Option<&Value>,
    rec: &mut Recorded,
) -> Response {
    if let Some(resp) = injected_fault(fake, rec) {
        return resp;
    }
    let account = match route(fake, version, pixel_id, rec) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    rec.account_id = Some(account.id.clone());
    if let Err(reason) = authenticate(fake, account, uri, headers) {
        rec.auth_error = Some(reason.clone());
        rec.errors.push(reason);
        return x_error(
            401,
            &[(
                "UNAUTHORIZED_ACCESS",
                "This request is not properly authenticated".into(),
                String::new(),
            )],
            Some(&account.id),
        );
    }
    rec.auth_ok = true;
    let count = match check_contract(fake, account, parsed, rec) {
        Ok(n) => n,
        Err(resp) => return *resp,
    };
    if let Some(resp) = rejected_conversions(fake, account, parsed, rec) {
        return resp;
    }
    let (remaining, reset) = match take_budget(fake, account, count as u64) {
        Ok(r) => r,
        Err(resp) => {
            rec.errors.push("rate limit exceeded".into());
            return *resp;
        }
    };
    accepted(account, count as u64, remaining, reset, rec)
}

/// An injected status fault or rate limit, if one is active (X fails before it looks at anything).
fn injected_fault(fake: &FakeX, rec: &mut Recorded) -> Option<Response> {
    let mut inner = fake.lock();
    let active = inner
        .faults
        .status
        .filter(|f| f.until_ms.is_none_or(|t| now_ms() < t));
    inner.faults.status = active.and_then(|f| match f.left {
        Some(n) if n <= 1 => None,
        Some(n) => Some(StatusFault {
            left: Some(n - 1),
            ..f
        }),
        None => Some(f),
    });
    if let Some(StatusFault { status, .. }) = active {
        drop(inner);
        rec.errors.push(format!("injected {status}"));
        let mut resp = x_error(
            status,
            &[(
                contract::error_code(status),
                format!("Injected fault {status}"),
                String::new(),
            )],
            None,
        );
        if status == 429 {
            rate_headers(&mut resp, 0, 0, now_secs() + 60);
        }
        return Some(resp);
    }
    if let Some(until) = inner.faults.rate_limited_until {
        if now_secs() < until {
            drop(inner);
            rec.errors.push("injected rate limit".into());
            return Some(too_many_requests(None, 0, 0, until));
        }
        inner.faults.rate_limited_until = None;
    }
    None
}

/// The account whose pixel the URL names, or X's 404 for an unknown version or pixel.
fn route<'f>(
    fake: &'f FakeX,
    version: &str,
    pixel_id: &str,
    rec: &mut Recorded,
) -> Result<&'f FakeAccount, Box<Response>> {
    if !fake.config.versions.iter().any(|v| v == version) {
        rec.errors.push("unknown version".into());
        return Err(Box::new(x_error(
            404,
            &[(
                "ROUTE_NOT_FOUND",
                "The requested resource could not be found".into(),
                String::new(),
            )],
            None,
        )));
    }
    fake.account_for_pixel(pixel_id).ok_or_else(|| {
        rec.errors.push("unknown pixel".into());
        Box::new(x_error(
            404,
            &[(
                "NOT_FOUND",
                format!("pixel_id ({pixel_id}) was not found"),
                "pixel_id".into(),
            )],
            None,
        ))
    })
}

/// How many conversions the body holds, or X's answer to what breaks its contract.
fn check_contract(
    fake: &FakeX,
    account: &FakeAccount,
    parsed: Option<&Value>,
    rec: &mut Recorded,
) -> Result<usize, Box<Response>> {
    let mut sets: HashSet<String> = account.events.iter().cloned().collect();
    sets.extend(account.tags.iter().map(|t| t.id.clone()));
    sets.extend(
        fake.lock()
            .created_tags
            .get(&account.id)
            .into_iter()
            .flatten()
            .filter_map(|t| t["id"].as_str().map(str::to_owned)),
    );
    let pixels: HashSet<String> = fake
        .config
        .accounts
        .iter()
        .flat_map(|a| a.pixels.iter().cloned())
        .collect();
    let scope = contract::Scope {
        account_sets: Some(&sets),
        pixels: &pixels,
    };
    contract::validate_value(parsed, &scope).map_err(|errors| {
        rec.errors.extend(errors.iter().map(|e| e.message.clone()));
        let triples: Vec<_> = errors
            .iter()
            .map(|e| (e.code, e.message.clone(), e.parameter.clone()))
            .collect();
        Box::new(x_error(
            contract::status_of(&errors),
            &triples,
            Some(&account.id),
        ))
    })
}

/// X's 400 for conversions a test told the fake to refuse, if the body holds any.
fn rejected_conversions(
    fake: &FakeX,
    account: &FakeAccount,
    parsed: Option<&Value>,
    rec: &mut Recorded,
) -> Option<Response> {
    let inner = fake.lock();
    let list = parsed
        .and_then(|v| v.get("conversions"))
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let rejected: Vec<(&str, String, String)> = list
        .iter()
        .filter_map(|c| c.get("conversion_id").and_then(Value::as_str))
        .filter_map(|id| {
            inner
                .faults
                .reject
                .get(id)
                .map(|m| ("INVALID_PARAMETER", m.clone(), "conversion_id".to_string()))
        })
        .collect();
    if rejected.is_empty() {
        return None;
    }
    rec.errors.extend(rejected.iter().map(|r| r.1.clone()));
    Some(x_error(400, &rejected, Some(&account.id)))
}

/// Counts `n` conversions against the account's fixed window: (remaining, reset), or X's 429.
fn take_budget(fake: &FakeX, account: &FakeAccount, n: u64) -> Result<(u64, u64), Box<Response>> {
    let mut inner = fake.lock();
    let now = now_secs();
    let rl = &account.rate_limit;
    let window = inner.windows.entry(account.id.clone()).or_insert((now, 0));
    if now >= window.0 + rl.window_secs {
        *window = (now, 0);
    }
    let reset = window.0 + rl.window_secs;
    if window.1 + n > rl.events {
        let remaining = rl.events.saturating_sub(window.1);
        drop(inner);
        return Err(Box::new(too_many_requests(
            Some(&account.id),
            rl.events,
            remaining,
            reset,
        )));
    }
    window.1 += n;
    Ok((rl.events - window.1, reset))
}

/// X's 200 with its `debug_id` and rate-limit headers.
fn accepted(
    account: &FakeAccount,
    n: u64,
    remaining: u64,
    reset: u64,
    rec: &mut Recorded,
) -> Response {
    let hex = format!("{:032x}", rand::random::<u128>());
    let debug_id = format!(
        "{}-{}-{}-{}-{}",
        hex.get(..8).unwrap_or_default(),
        hex.get(8..12).unwrap_or_default(),
        hex.get(12..16).unwrap_or_default(),
        hex.get(16..20).unwrap_or_default(),
        hex.get(20..).unwrap_or_default()
    );
    rec.debug_id = Some(debug_id.clone());
    let mut resp = (
        StatusCode::OK,
        Json(json!({"request": {"params": {"account_id": account.id}}, "data": {"conversions_processed": n, "debug_id": debug_id}})),
    )
        .into_response();
    rate_headers(&mut resp, account.rate_limit.events, remaining, reset);
    resp
}

fn authenticate(
    fake: &FakeX,
    account: &FakeAccount,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), String> {
    if let Some(token) = headers.get("x-pixel-token") {
        return match &account.pixel_token {
            Some(expected) if token.as_bytes() == expected.as_bytes() => Ok(()),
            _ => Err("wrong pixel token".into()),
        };
    }
    verify_oauth(fake, "POST", uri, headers, &[], |consumer_key, token| {
        let creds = account
            .oauth
            .as_ref()
            .ok_or("account has no OAuth credentials")?;
        if consumer_key != creds.consumer_key {
            return Err("unknown consumer key".into());
        }
        if token != creds.access_token {
            return Err("unknown access token".into());
        }
        Ok((
            creds.consumer_secret.clone(),
            creds.access_token_secret.clone(),
        ))
    })
    .map(|_| ())
}

/// Verifies an `Authorization: OAuth` header (RFC 5849) of a `method` request to `uri`, whose form body
/// parameters are `form` (they are signed; a JSON body is not). `secrets(consumer_key, token)` answers the
/// consumer and token secrets, or why the pair is not known. Answers the access token.
pub(crate) fn verify_oauth(
    fake: &FakeX,
    method: &str,
    uri: &Uri,
    headers: &HeaderMap,
    form: &[(String, String)],
    secrets: impl FnOnce(&str, &str) -> Result<(String, String), String>,
) -> Result<String, String> {
    let Some(header) = headers.get("authorization").and_then(|h| h.to_str().ok()) else {
        return Err("no credentials".into());
    };
    let params = oauth::parse_header(header).ok_or("Authorization is not an OAuth header")?;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    if get("oauth_signature_method") != Some("HMAC-SHA1") {
        return Err("oauth_signature_method must be HMAC-SHA1".into());
    }
    if get("oauth_version").is_some_and(|v| v != "1.0") {
        return Err("oauth_version must be 1.0".into());
    }
    let consumer_key = get("oauth_consumer_key").ok_or("missing oauth_consumer_key")?;
    let token = get("oauth_token").ok_or("missing oauth_token")?;
    let (consumer_secret, token_secret) = secrets(consumer_key, token)?;
    let timestamp: u64 = get("oauth_timestamp")
        .and_then(|t| t.parse().ok())
        .ok_or("missing oauth_timestamp")?;
    if timestamp.abs_diff(fake.clock_secs()) > fake.config.max_clock_skew_secs {
        return Err("oauth_timestamp too far from the server clock".into());
    }
    let nonce = get("oauth_nonce")
        .filter(|n| !n.is_empty())
        .ok_or("missing oauth_nonce")?;
    let signature = get("oauth_signature").ok_or("missing oauth_signature")?;
    let mut all = params.clone();
    if let Some(q) = uri.query() {
        all.extend(
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned())),
        );
    }
    all.extend(form.iter().cloned());
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .ok_or("no Host header")?;
    let base = oauth::base_string(
        method,
        &oauth::base_string_uri("http", host, uri.path()),
        &all,
    );
    let expected = oauth::sign(&base, &consumer_secret, &token_secret);
    if expected != signature {
        return Err("signature does not match".into());
    }
    let mut inner = fake.lock();
    let horizon = fake
        .clock_secs()
        .saturating_sub(2 * fake.config.max_clock_skew_secs);
    inner.nonces.retain(|_, ts| *ts >= horizon);
    if inner
        .nonces
        .insert(format!("{consumer_key}:{nonce}"), timestamp)
        .is_some()
    {
        return Err("replayed nonce".into());
    }
    Ok(token.to_owned())
}

async fn list_requests(State(fake): State<Arc<FakeX>>) -> Json<Value> {
    Json(json!({"requests": fake.requests()}))
}

async fn list_conversions(State(fake): State<Arc<FakeX>>) -> Json<Value> {
    let out: Vec<Value> = fake
        .requests()
        .into_iter()
        .filter(|r| (200..300).contains(&r.status))
        .flat_map(|r| {
            let (seq, pixel, debug) = (r.seq, r.pixel_id, r.debug_id);
            r.conversions.into_iter().map(
                move |c| json!({"seq": seq, "pixel_id": pixel, "debug_id": debug, "conversion": c}),
            )
        })
        .collect();
    Json(json!({"conversions": out}))
}

async fn set_faults(
    State(fake): State<Arc<FakeX>>,
    Json(spec): Json<FaultSpec>,
) -> impl IntoResponse {
    let mut inner = fake.lock();
    if let Some(status) = spec.status {
        inner.faults.status = Some(match spec.for_secs {
            Some(secs) => StatusFault {
                status,
                left: None,
                until_ms: Some(now_ms() + secs * 1000),
            },
            None => StatusFault {
                status,
                left: Some(spec.count.unwrap_or(1).max(1)),
                until_ms: None,
            },
        });
    }
    if let Some(ms) = spec.latency_ms {
        inner.faults.latency = Duration::from_millis(ms);
    }
    if let Some(secs) = spec.rate_limit_reset_after_secs {
        inner.faults.rate_limited_until = Some(now_secs() + secs);
    }
    if let Some(id) = spec.reject_conversion_id {
        let message = spec
            .message
            .unwrap_or_else(|| format!("conversion_id ({id}) was rejected by fake-x-api"));
        inner.faults.reject.insert(id, message);
    }
    let until = inner.faults.rate_limited_until;
    (
        StatusCode::OK,
        Json(json!({"ok": true, "rate_limited_until": until})),
    )
}

async fn clear_faults(State(fake): State<Arc<FakeX>>) -> StatusCode {
    fake.lock().faults = Faults::default();
    StatusCode::NO_CONTENT
}

async fn reset(State(fake): State<Arc<FakeX>>) -> StatusCode {
    *fake.lock() = Inner::default();
    StatusCode::NO_CONTENT
}
