//! HTTP surfaces: the ingest API (`app`) and the admin listener (`admin_app`).
//!
//! Both are plain functions of their state returning a `Router`, so tests drive them with `oneshot`.

pub mod admin;
pub mod auth;
pub mod ingest;
pub mod problem;

pub use admin::{admin_app, AccountView, AdminState};
pub use auth::ApiKeys;
pub use problem::Problem;

use crate::conversion::Rules;
use crate::metrics::Metrics;
use crate::spool::Spool;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Uri;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct AppState {
    pub rules: Rules,
    pub spool: Arc<dyn Spool>,
    pub keys: ApiKeys,
    pub max_body_bytes: usize,
    pub max_events_per_request: usize,
    /// Set when shutdown begins: new requests get 503.
    pub shutting_down: AtomicBool,
    /// The clock (replaceable in tests).
    pub now: fn() -> DateTime<Utc>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Times every request into `http_request_duration_seconds` (by route template, never the raw path) and
/// logs it at debug level.
async fn observe(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics.http_request(&route, status, elapsed.as_secs_f64());
    tracing::debug!(%method, route, status, latency_us = elapsed.as_micros() as u64, "http request");
    response
}

/// Layers both listeners share: a panic in a handler becomes a 500 problem (the process and the other
/// requests carry on), and every request is timed and logged at debug level (`observe`).
fn common_layers(router: Router, metrics: Arc<Metrics>) -> Router {
    router.layer(
        tower::ServiceBuilder::new()
            .layer(axum::middleware::from_fn_with_state(metrics, observe))
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
                Problem::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "the gateway failed while handling this request; nothing of it was accepted",
                )
                .into_response()
            })),
    )
}

/// The ingest API on `server.listen`.
pub fn app(state: Arc<AppState>) -> Router {
    let metrics = state.metrics.clone();
    common_layers(
        Router::new()
            .route(
                "/v1/events",
                post(ingest::ingest).fallback(|| async { Problem::method_not_allowed("POST") }),
            )
            .fallback(|uri: Uri| async move {
                Problem::not_found(uri.path(), "events go to POST /v1/events")
            })
            .with_state(state),
        metrics,
    )
}
