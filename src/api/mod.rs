//! HTTP surfaces: the ingest API (`app`) and the admin listener (`admin_app`).
//!
//! Both are plain functions of their state returning a `Router`, so tests drive them with `oneshot`.

pub mod admin;
pub mod auth;
pub mod body_budget;
mod explained;
mod framing;
pub mod ingest;
pub mod problem;
mod server;
pub mod status_page;

pub use admin::{admin_app, AccountView, AdminState, SharedState};
pub use auth::{admin_keys, ingest_keys, ApiKeys, Scope};
pub use problem::Problem;
pub use server::{serve, ServeOptions};

use crate::conversion::Rules;
use crate::metrics::Metrics;
use crate::spool::Spool;
use axum::extract::{MatchedPath, Request};
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use chrono::{DateTime, Utc};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

pub struct AppState {
    pub rules: Rules,
    pub spool: Arc<dyn Spool>,
    /// Ingest keys and the accounts each may send events for.
    pub keys: ApiKeys<Scope>,
    /// The suppression list and Global Privacy Control (`privacy`).
    pub privacy: Arc<crate::privacy::Privacy>,
    pub max_body_bytes: usize,
    /// A request's body must arrive whole within this (`server.body_timeout`).
    pub body_timeout: std::time::Duration,
    pub max_events_per_request: usize,
    /// Bytes of request bodies in flight (`server.max_inflight_body_bytes`).
    pub body_budget: Arc<body_budget::BodyBudget>,
    /// Once it fires, new requests get 503.
    pub shutdown: crate::shutdown::Shutdown,
    /// The clock (replaceable in tests).
    pub now: fn() -> DateTime<Utc>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_set()
    }
}

/// Times every request into `http_request_duration_seconds` (by route template, never the raw path) and
/// logs it at debug level. A plain tower layer: no boxed future or cloned router per request.
#[derive(Clone)]
struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
struct ObserveLayer(Arc<Metrics>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.0.clone(),
        }
    }
}

impl<S, B> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = axum::http::Response<B>>,
{
    type Response = axum::http::Response<B>;
    type Error = S::Error;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = tracing::enabled!(tracing::Level::DEBUG).then(|| request.method().clone());
        Observed {
            inner: self.inner.call(request),
            started: Instant::now(),
            route,
            method,
            metrics: self.metrics.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    struct Observed<F> {
        #[pin]
        inner: F,
        started: Instant,
        route: Option<MatchedPath>,
        method: Option<axum::http::Method>,
        metrics: Arc<Metrics>,
    }
}

impl<F, B, E> Future for Observed<F>
where
    F: Future<Output = Result<axum::http::Response<B>, E>>,
{
    type Output = Result<axum::http::Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let elapsed = this.started.elapsed();
            let route = this.route.as_ref().map_or("unmatched", |p| p.as_str());
            let status = response.status().as_u16();
            this.metrics
                .http_request(route, status, elapsed.as_secs_f64());
            if let Some(method) = this.method {
                tracing::debug!(%method, route, status, latency_us = elapsed.as_micros() as u64, "http request");
            }
        }
        Poll::Ready(result)
    }
}

/// Layers both listeners share: a panic in a handler becomes a 500 problem (the process and the other
/// requests carry on), and every request is timed and logged at debug level (`observe`).
fn common_layers(router: Router, metrics: Arc<Metrics>) -> Router {
    router.layer(
        tower::ServiceBuilder::new()
            .layer(ObserveLayer(metrics))
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
