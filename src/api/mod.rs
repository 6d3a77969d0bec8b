//! HTTP surfaces: the ingest API (`app`) and the admin listener (`admin_app`).
//!
//! Both are plain functions of their state returning a `Router`, so tests drive them with `oneshot`.

pub mod auth;
pub mod ingest;
pub mod problem;

pub use auth::ApiKeys;
pub use problem::Problem;

use crate::conversion::Rules;
use crate::spool::Spool;
use axum::http::Uri;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
}

impl AppState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// Layers both listeners share: a panic in a handler becomes a 500 problem (the process and the other
/// requests carry on), and every request gets a debug-level span with method, path, status and latency.
fn common_layers(router: Router) -> Router {
    router.layer(
        tower::ServiceBuilder::new()
            .layer(tower_http::trace::TraceLayer::new_for_http())
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
    common_layers(
        Router::new()
            .route(
                "/v1/events",
                post(ingest::ingest).fallback(|| async { Problem::method_not_allowed("POST") }),
            )
            .fallback(|uri: Uri| async move { Problem::not_found(uri.path()) })
            .with_state(state),
    )
}

/// The admin listener on `server.admin_listen`: liveness (never depends on X) and readiness (the gateway
/// can accept and durably spool; an X outage or a backlog is not a reason to be unready).
pub fn admin_app(state: Arc<AppState>) -> Router {
    common_layers(
        Router::new()
            .route("/livez", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(
                    |axum::extract::State(st): axum::extract::State<Arc<AppState>>| async move {
                        if st.is_shutting_down() {
                            return Err(Problem::unavailable("shutting down", 5));
                        }
                        match st.spool.health() {
                            Ok(()) => Ok("ready\n"),
                            Err(why) => Err(Problem::unavailable(
                                format!("the spool cannot take events: {why}"),
                                5,
                            )),
                        }
                    },
                ),
            )
            .fallback(|uri: Uri| async move { Problem::not_found(uri.path()) })
            .with_state(state),
    )
}
