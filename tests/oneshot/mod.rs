//! Routers driven with `oneshot`: the state they are built from and request helpers.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use conversion_gateway::api::{self, ApiKeys, AppState, Scope};
use conversion_gateway::config::{AdminRole, Secret};
use conversion_gateway::conversion::{AccountRules, Rules};
use conversion_gateway::limiter::{EmbeddedLimiter, Gcra, VolatileState};
use conversion_gateway::metrics::Metrics;
use conversion_gateway::shutdown::{Shutdown, Trigger};
use conversion_gateway::spool::{MemorySpool, Spool};
use http_body_util::BodyExt;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

pub const ADMIN_KEY: &str = "admin-key";
pub const KEY: &str = "test-key-1";

pub fn state_with(spool: Arc<dyn Spool>, accounts: &[&str]) -> Arc<AppState> {
    state_mapping(spool, accounts, "o9d2g")
}

/// Like `state_with`, with `purchase` mapped to the SET id `purchase_set`.
pub fn state_mapping(
    spool: Arc<dyn Spool>,
    accounts: &[&str],
    purchase_set: &str,
) -> Arc<AppState> {
    state_stopped_by(spool, accounts, purchase_set, Shutdown::never())
}

/// Like `state_with`, with a shutdown the caller can trigger.
pub fn stoppable_state(spool: Arc<dyn Spool>, accounts: &[&str]) -> (Arc<AppState>, Trigger) {
    let (trigger, shutdown) = Shutdown::new();
    (
        state_stopped_by(spool, accounts, "o9d2g", shutdown),
        trigger,
    )
}

fn state_stopped_by(
    spool: Arc<dyn Spool>,
    accounts: &[&str],
    purchase_set: &str,
    shutdown: Shutdown,
) -> Arc<AppState> {
    let accounts_names = accounts;
    let accounts = accounts
        .iter()
        .map(|n| {
            let events = [("purchase".to_string(), purchase_set.to_string())].into();
            (
                n.to_string(),
                AccountRules {
                    pixel_id: "o9d7n".into(),
                    events,
                    default_phone_region: phonenumber::country::Id::US,
                },
            )
        })
        .collect();
    Arc::new(AppState {
        rules: Rules {
            accounts,
            max_event_age: Duration::from_secs(7 * 86400),
            max_event_bytes: 64 << 10,
        },
        spool,
        keys: ApiKeys::new(
            [
                (&Secret::new(KEY), Scope::Every),
                (&Secret::new("other-key"), Scope::Every),
            ],
            None,
        ),
        privacy: Arc::new(conversion_gateway::privacy::Privacy::off()),
        max_body_bytes: 4096,
        body_timeout: Duration::from_secs(30),
        max_events_per_request: 5,
        body_budget: conversion_gateway::api::body_budget::BodyBudget::new(64 << 20),
        shutdown,
        now: chrono::Utc::now,
        metrics: Arc::new(Metrics::new(accounts_names.iter().copied())),
    })
}

pub fn admin_state(app: Arc<AppState>) -> Arc<api::AdminState> {
    let accounts = app
        .rules
        .accounts
        .keys()
        .map(|name| api::AccountView {
            name: name.clone(),
            ad_account_id: "18ce552mlaq".into(),
            pixel_id: "o9d7n".into(),
            rate_limit_events: 60_000,
            rate_limit_window: Duration::from_secs(900),
            status: Default::default(),
        })
        .collect();
    Arc::new(api::AdminState {
        app,
        keys: ApiKeys::new([(&Secret::new(ADMIN_KEY), AdminRole::Write)], None),
        accounts,
        limiter: Arc::new(EmbeddedLimiter::new(
            [(
                "18ce552mlaq".to_string(),
                Gcra::new(60_000, Duration::from_secs(900), 500),
            )]
            .into(),
            Arc::new(VolatileState::default()),
        )),
        ready_requires_spool: true,
        shared: None,
    })
}

pub fn setup() -> (Router, Arc<MemorySpool>, Arc<AppState>) {
    let spool = Arc::new(MemorySpool::new(Duration::from_secs(3600), 1 << 20));
    let st = state_with(spool.clone(), &["acme"]);
    (api::app(st.clone()), spool, st)
}

pub fn post() -> axum::http::request::Builder {
    Request::post("/v1/events")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
}

pub async fn send(app: &Router, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, body, headers)
}

pub async fn post_json(app: &Router, body: Value) -> (StatusCode, Value, axum::http::HeaderMap) {
    send(app, post().body(Body::from(body.to_string())).unwrap()).await
}

pub fn assert_problem(
    status: StatusCode,
    body: &Value,
    headers: &axum::http::HeaderMap,
    want: StatusCode,
    needle: &str,
) {
    assert_eq!(status, want, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
    assert_eq!(body["status"], want.as_u16());
    assert!(body["detail"].as_str().unwrap().contains(needle), "{body}");
}
