//! The admin listener (`server.admin_listen`): probes, `/metrics`, and the operator's `/v1` API — accounts
//! and dead letters (list, replay, delete).
//!
//! Invariants: `/livez` never depends on X or the spool; `/readyz` fails only while this process cannot
//! take requests at all (starting, shutting down, its spool's storage stopped) — a condition every replica
//! shares (X down, Redis down, spools filling during a long outage) never makes it unready, because a
//! sidecar's readiness is its pod's and would take the whole site out of service; such conditions are
//! answered with 503 to the callers and shown in metrics and `/v1/accounts`. `server.ready_requires_spool
//! = true` (a standalone gateway behind a load balancer) also fails it while the spool refuses events.
//! Every `/v1` route needs an admin key — `server.admin_api_keys` or `[[server.admin_keys]]` (none
//! configured: the `/v1` API is off and answers 403); a key with role `read` may only read (GET), a
//! `write` key may also replay and delete (401s are counted per listener); nothing here shows a raw
//! email, phone number, secret or token — spooled events hold hashes only.

use super::status_page::{AccountActivity, ActivityReport, MinuteAt, SpoolState};
use super::{ApiKeys, AppState, Problem};
use crate::config::AdminRole;
use crate::dispatch::AccountStatus;
use crate::limiter::Limiter;
use crate::metrics::{RedisSnapshot, SpoolSnapshot};
use crate::spool::{DeadLetter, DeadLetterQuery, SpoolError};
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What the admin API knows of a configured account.
pub struct AccountView {
    pub name: String,
    pub ad_account_id: String,
    pub pixel_id: String,
    pub rate_limit_events: u64,
    pub rate_limit_window: Duration,
    /// Shared with the account's dispatcher.
    pub status: Arc<Mutex<AccountStatus>>,
}

pub struct AdminState {
    pub app: Arc<AppState>,
    /// `server.admin_api_keys` and `[[server.admin_keys]]`, with their roles; with none the `/v1` API
    /// is off.
    pub keys: ApiKeys<AdminRole>,
    pub accounts: Vec<AccountView>,
    pub limiter: Arc<dyn Limiter>,
    /// `server.ready_requires_spool`: whether `/readyz` fails while the spool refuses events.
    pub ready_requires_spool: bool,
    /// The Redis of the shared mode, when configured.
    pub shared: Option<SharedState>,
}

/// What the admin API and metrics show of the shared mode.
pub struct SharedState {
    pub store: crate::redis_store::Store,
    /// The Redis queue, when events wait there.
    pub spool: Option<Arc<crate::spool::RedisSpool>>,
    /// Read at start-up, when events wait in Redis.
    pub durability: Option<crate::redis_store::durability::Durability>,
    /// Whether the budget is the fleet's (`limiter.backend = "redis"`).
    pub limiter: bool,
}

impl SharedState {
    fn report(&self) -> RedisReport {
        use crate::redis_store::durability::Durability;
        let (durability, durability_note) = match &self.durability {
            None => (None, None),
            Some(Durability::Durable) => (Some("durable"), None),
            Some(Durability::NotDurable(why)) => (Some("not_durable"), Some(why.clone())),
            Some(Durability::Unknown(why)) => (Some("unknown"), Some(why.clone())),
        };
        RedisReport {
            spool: self.spool.is_some(),
            limiter: self.limiter,
            up: self.store.up(),
            down_because: self.store.down_because(),
            durability,
            durability_note,
        }
    }
}

/// Dead letters per page when `limit` is not given, and the most one page holds.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Dead letters moved per transaction by a replay.
const REPLAY_CHUNK: usize = 500;

const HINT: &str =
    "the admin listener serves / (the status page), /livez, /readyz, /metrics, /v1/accounts, /v1/activity and /v1/dead-letters";

pub fn admin_app(state: Arc<AdminState>) -> Router {
    let metrics = state.app.metrics.clone();
    let v1 = Router::new()
        .route("/v1/accounts", get(accounts).fallback(not_allowed_get))
        .route("/v1/activity", get(activity).fallback(not_allowed_get))
        .route(
            "/v1/dead-letters",
            get(list_dead_letters)
                .delete(delete_dead_letters)
                .fallback(|| async { Problem::method_not_allowed("GET, DELETE") }),
        )
        .route(
            "/v1/dead-letters/replay",
            post(replay_dead_letters).fallback(|| async { Problem::method_not_allowed("POST") }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ));
    super::common_layers(
        Router::new()
            .route("/", get(status_page).fallback(not_allowed_get))
            .route("/livez", get(|| async { "ok\n" }).fallback(not_allowed_get))
            .route("/readyz", get(readyz).fallback(not_allowed_get))
            .route("/metrics", get(metrics_text).fallback(not_allowed_get))
            .merge(v1)
            .fallback(|uri: Uri| async move { Problem::not_found(uri.path(), HINT) })
            .with_state(state),
        metrics,
    )
}

async fn not_allowed_get() -> Problem {
    Problem::method_not_allowed("GET")
}

async fn require_admin_key(
    State(st): State<Arc<AdminState>>,
    request: Request,
    next: Next,
) -> Response {
    if st.keys.accepts_none() {
        return Problem::forbidden(
            "the admin API is off: configure server.admin_api_keys to use it",
        )
        .into_response();
    }
    let role = match st.keys.check(request.headers()) {
        Ok(role) => role,
        Err(why) => {
            st.app.metrics.auth_failed("admin");
            return Problem::unauthorized(why).into_response();
        }
    };
    let reads = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if role == AdminRole::Read && !reads {
        return Problem::forbidden(
            "this admin key has role \"read\": replaying and deleting dead letters need a key with role = \"write\" (server.admin_keys) or one of server.admin_api_keys",
        )
        .into_response();
    }
    next.run(request).await
}

async fn readyz(State(st): State<Arc<AdminState>>) -> Result<String, Problem> {
    if st.app.is_shutting_down() {
        return Err(Problem::unavailable("shutting down", 5));
    }
    // This process cannot take requests at all: whatever the configuration, it is not ready.
    if let Some(why) = st.app.spool.stopped() {
        return Err(Problem::unavailable(
            format!("the spool cannot take events: {why}"),
            5,
        ));
    }
    match st.app.spool.health() {
        Ok(()) => Ok("ready\n".into()),
        // Configured to stay in service: the pod's application keeps serving, its POSTs get 503.
        Err(why) if !st.ready_requires_spool => Ok(format!(
            "ready (server.ready_requires_spool = false); ingest answers 503: the spool cannot take events: {why}\n"
        )),
        Err(why) => Err(Problem::unavailable(
            format!("the spool cannot take events: {why}"),
            5,
        )),
    }
}

fn epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn ms_to_rfc3339(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

async fn metrics_text(State(st): State<Arc<AdminState>>) -> Response {
    let spool = &st.app.spool;
    // Unreadable: the gauge shows 0 and the evicted counter keeps its value (it only moves up).
    let dead = spool.dead_letter_counts().await.unwrap_or_default();
    let mut accounts = Vec::with_capacity(st.accounts.len());
    for a in &st.accounts {
        let backlog = spool.account_backlog(&a.name).await.ok();
        accounts.push((
            a.name.clone(),
            backlog.map_or(spool.backlog(&a.name) as u64, |b| b.events),
            backlog
                .and_then(|b| b.oldest_ms)
                .map(|ms| ms as f64 / 1000.0),
        ));
    }
    let snapshot = SpoolSnapshot {
        accounts,
        bytes: spool.bytes(),
        bound: spool.bound_usage(),
        writable: spool.health().is_ok(),
        dead_letters: dead.kept,
        dead_letters_evicted: dead.evicted,
        redis: st.shared.as_ref().map(|sh| RedisSnapshot {
            up: sh.store.up(),
            durable: sh.durability.as_ref().map(|d| d.gauge()),
            held_here: st
                .accounts
                .iter()
                .map(|a| {
                    let held = sh.spool.as_ref().map_or(0, |s| s.held_here(&a.name));
                    (a.name.clone(), held)
                })
                .collect(),
        }),
    };
    st.app
        .metrics
        .set_inflight_body_bytes(st.app.body_budget.used());
    // Rendering reads /proc (memory, open files): off the runtime's workers like every other file read.
    let metrics = st.app.metrics.clone();
    let text = tokio::task::spawn_blocking(move || metrics.render(&snapshot))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[derive(Serialize)]
struct Backlog {
    events: u64,
    bytes: u64,
    /// When the oldest waiting event was accepted.
    oldest_event_at: Option<String>,
}

#[derive(Serialize)]
struct Budget {
    /// `rate_limit.events` per `rate_limit.window` (seconds), shared by accounts of one ad account.
    events: u64,
    window_seconds: u64,
    /// Conversions that could be sent right now.
    available_now: u64,
    /// X asked for no requests before this time (its rate-limit reset), if it did.
    held_until: Option<String>,
}

#[derive(Serialize)]
struct AccountReport {
    name: String,
    ad_account_id: String,
    pixel_id: String,
    backlog: Backlog,
    budget: Budget,
    /// Why sending is paused (X refused the credentials or the pixel), or null.
    paused: Option<crate::reasons::PauseReason>,
    last_status: Option<String>,
    last_error: Option<String>,
    /// When `last_error` happened; it stays after later successes (see `last_status`).
    last_error_at: Option<String>,
    last_debug_id: Option<String>,
    /// Since this process started.
    delivered: u64,
    dead_lettered: u64,
    /// With the Redis queue: events of this account this replica has taken and not yet acknowledged
    /// (the backlog is the whole fleet's).
    #[serde(skip_serializing_if = "Option::is_none")]
    held_here: Option<u64>,
}

#[derive(Serialize)]
struct RedisReport {
    /// `spool.backend` and `limiter.backend`: what lives in Redis.
    spool: bool,
    limiter: bool,
    /// Whether Redis answered the last command, and why not.
    up: bool,
    down_because: Option<String>,
    /// With the Redis queue: "durable" (a 202 means fsynced), "not_durable" or "unknown", and why.
    durability: Option<&'static str>,
    durability_note: Option<String>,
}

#[derive(Serialize)]
struct SpoolReport {
    bytes: u64,
    /// What counts against `spool.max_bytes`, and the bound.
    bound_used_bytes: u64,
    max_bytes: u64,
    writable: bool,
    /// Why the spool refuses events, while it does.
    refusing_because: Option<String>,
    dead_letters: u64,
    dead_letters_evicted: u64,
}

#[derive(Serialize)]
struct AccountsReport {
    accounts: Vec<AccountReport>,
    spool: SpoolReport,
    /// The shared mode's Redis, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<RedisReport>,
}

fn unavailable(e: SpoolError) -> Problem {
    Problem::unavailable(format!("{e}; retry later"), 1)
}

async fn dead_letters(st: &AdminState, q: DeadLetterQuery) -> Result<Vec<DeadLetter>, Problem> {
    st.app.spool.dead_letters(q).await.map_err(unavailable)
}

async fn accounts(
    State(st): State<Arc<AdminState>>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<AccountsReport>, Problem> {
    // The same rule as every admin route: an unknown parameter is an error, not silently ignored.
    params(&st, &raw, &[], false)?;
    let spool = &st.app.spool;
    let now = epoch();
    let mut out = Vec::with_capacity(st.accounts.len());
    for a in &st.accounts {
        let (status, backlog) = account_now(&st, a).await;
        out.push(AccountReport {
            name: a.name.clone(),
            ad_account_id: a.ad_account_id.clone(),
            pixel_id: a.pixel_id.clone(),
            backlog: Backlog {
                events: backlog.events,
                bytes: backlog.bytes,
                oldest_event_at: backlog.oldest_ms.and_then(ms_to_rfc3339),
            },
            budget: Budget {
                events: a.rate_limit_events,
                window_seconds: a.rate_limit_window.as_secs(),
                available_now: st
                    .limiter
                    .available(&a.ad_account_id, now.as_nanos() as u64),
                held_until: held_until(&status, now),
            },
            paused: status.paused,
            last_error_at: last_error_at(&status),
            last_status: status.last_status,
            last_error: status.last_error,
            last_debug_id: status.last_debug_id,
            delivered: status.delivered,
            dead_lettered: status.dead_lettered,
            held_here: st
                .shared
                .as_ref()
                .and_then(|sh| sh.spool.as_ref())
                .map(|s| s.held_here(&a.name)),
        });
    }
    let dead = spool.dead_letter_counts().await.unwrap_or_default();
    let refusing_because = spool.health().err();
    let bound = spool.bound_usage();
    Ok(Json(AccountsReport {
        accounts: out,
        spool: SpoolReport {
            bytes: spool.bytes(),
            bound_used_bytes: bound.used_bytes,
            max_bytes: bound.max_bytes,
            writable: refusing_because.is_none(),
            refusing_because,
            dead_letters: dead.kept,
            dead_letters_evicted: dead.evicted,
        },
        redis: st.shared.as_ref().map(SharedState::report),
    }))
}

/// An account's dispatch status and backlog now; the backlog unreadable (Redis down) is what was last
/// known, without the oldest event's time.
async fn account_now(
    st: &AdminState,
    a: &AccountView,
) -> (AccountStatus, crate::spool::AccountBacklog) {
    let spool = &st.app.spool;
    let status = a.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let backlog =
        spool
            .account_backlog(&a.name)
            .await
            .unwrap_or_else(|_| crate::spool::AccountBacklog {
                events: spool.backlog(&a.name) as u64,
                bytes: spool.account_bytes(&a.name),
                oldest_ms: None,
            });
    (status, backlog)
}

/// X's hold on the account, while it lasts.
fn held_until(status: &AccountStatus, now: Duration) -> Option<String> {
    status
        .hold_until
        .filter(|until| *until > now.as_secs())
        .and_then(|s| ms_to_rfc3339(s as i64 * 1000))
}

fn last_error_at(status: &AccountStatus) -> Option<String> {
    status
        .last_error_at
        .and_then(|ms| i64::try_from(ms).ok())
        .and_then(ms_to_rfc3339)
}

/// What the status page and `/v1/activity` show.
async fn activity_report(st: &AdminState) -> ActivityReport {
    let now = epoch();
    let minute = crate::activity::minute_of(SystemTime::now());
    let series = st.app.metrics.activity().series(minute);
    let per_minute = |name: &str| -> Vec<MinuteAt> {
        series
            .iter()
            .find(|(a, _)| a == name)
            .map(|(_, minutes)| {
                minutes
                    .iter()
                    .map(|m| MinuteAt {
                        at: ms_to_rfc3339(m.minute as i64 * 60_000).unwrap_or_default(),
                        counts: *m,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut accounts = Vec::with_capacity(st.accounts.len());
    for a in &st.accounts {
        let (status, backlog) = account_now(st, a).await;
        let minutes = per_minute(&a.name);
        let available = st
            .limiter
            .available(&a.ad_account_id, now.as_nanos() as u64);
        accounts.push(AccountActivity {
            name: a.name.clone(),
            ad_account_id: a.ad_account_id.clone(),
            pixel_id: a.pixel_id.clone(),
            paused: status.paused,
            backlog_events: backlog.events,
            oldest_event_at: backlog.oldest_ms.and_then(ms_to_rfc3339),
            oldest_event_age_seconds: backlog
                .oldest_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| (now.as_millis() as u64).saturating_sub(ms) / 1000),
            budget_limit: a.rate_limit_events,
            budget_window_seconds: a.rate_limit_window.as_secs(),
            budget_used: delivered_within(&minutes, a.rate_limit_window),
            budget_available_now: available,
            held_until: held_until(&status, now),
            last_error_at: last_error_at(&status),
            last_status: status.last_status,
            last_debug_id: status.last_debug_id,
            dead_letters_by_reason: st.app.metrics.dead_lettered_by_reason(&a.name),
            per_minute: minutes,
        });
    }
    let spool = &st.app.spool;
    let bound = spool.bound_usage();
    let dead = spool.dead_letter_counts().await.unwrap_or_default();
    ActivityReport {
        generated_at: ms_to_rfc3339(now.as_millis() as i64).unwrap_or_default(),
        minutes: crate::activity::MINUTES,
        accounts,
        unattributed: per_minute(crate::metrics::UNKNOWN_ACCOUNT),
        spool: SpoolState {
            bytes: bound.used_bytes,
            max_bytes: bound.max_bytes,
            dead_letters: dead.kept,
            refusing_because: spool.health().err(),
        },
    }
}

/// What `minutes` (oldest first) delivered in their last `window` (at most all of them).
fn delivered_within(minutes: &[MinuteAt], window: Duration) -> u64 {
    let n = window.as_secs().div_ceil(60).max(1) as usize;
    minutes
        .iter()
        .rev()
        .take(n)
        .map(|m| m.counts.delivered)
        .sum()
}

/// `GET /v1/activity`: the last hour per account, minute by minute, and the state beside it.
async fn activity(
    State(st): State<Arc<AdminState>>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<ActivityReport>, Problem> {
    params(&st, &raw, &[], false)?;
    Ok(Json(activity_report(&st).await))
}

/// `GET /`: the status page (no key, like `/metrics`).
async fn status_page(State(st): State<Arc<AdminState>>) -> Response {
    let html = super::status_page::render(&activity_report(&st).await);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// Query parameters, each checked by name: an unknown one is an error, not silently ignored.
struct Params {
    account: Option<String>,
    limit: usize,
    cursor: u64,
}

fn params(
    st: &AdminState,
    raw: &HashMap<String, String>,
    allowed: &[&str],
    account_required: bool,
) -> Result<Params, Problem> {
    if let Some(unknown) = raw.keys().find(|k| !allowed.contains(&k.as_str())) {
        let takes = if allowed.is_empty() {
            "this route takes none".to_owned()
        } else {
            format!("this route takes {}", allowed.join(", "))
        };
        return Err(Problem::bad_request(format!(
            "unknown query parameter {unknown:?}; {takes}"
        )));
    }
    let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    let account = match raw.get("account") {
        None if account_required => {
            return Err(Problem::bad_request(format!(
                "account is required: one of {}",
                st.account_names()
            )))
        }
        None => None,
        Some(a) if st.accounts.iter().any(|v| v.name == *a) => Some(a.clone()),
        Some(a) if !crate::config::is_account_name(a) => {
            return Err(Problem::bad_request(format!(
                "account must be an account name (a-z, 0-9, _), one of {}",
                st.account_names()
            )))
        }
        Some(a) => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                format!(
                    "account: no account {a:?} is configured; configured accounts: {}",
                    st.account_names()
                ),
            ))
        }
    };
    let limit = match raw.get("limit") {
        None => DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if digits(l) && (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(Problem::bad_request(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT} (got {l:?})"
                )))
            }
        },
    };
    let cursor = match raw.get("cursor") {
        None => 0,
        // A cursor beyond every id (however many digits) is past the last page.
        Some(c) if digits(c) => c.parse::<u64>().unwrap_or(u64::MAX),
        Some(c) => {
            return Err(Problem::bad_request(format!(
                "cursor must be the next_cursor of a previous page (got {c:?})"
            )))
        }
    };
    Ok(Params {
        account,
        limit,
        cursor,
    })
}

impl AdminState {
    fn account_names(&self) -> String {
        self.accounts
            .iter()
            .map(|a| format!("{:?}", a.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Serialize)]
struct DeadLetterView {
    id: u64,
    account: String,
    /// `rejected` (X refused this conversion), `not_found`, `expired` (older than max_event_age), or
    /// `corrupt` (the stored record no longer decodes).
    reason: crate::reasons::DeadLetterReason,
    /// X's message, or what else explains the reason.
    message: String,
    dead_lettered_at: Option<String>,
    received_at: Option<String>,
    /// The event name the caller sent, when the SET id was mapped from it (a replay maps it again).
    event_name: Option<String>,
    /// The conversion as it would go to X: identifiers are hashed. Null for a `corrupt` record.
    conversion: Option<crate::conversion::Conversion>,
    /// For a `corrupt` record: how many bytes were stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_bytes: Option<u64>,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            id: d.id,
            account: d.account,
            reason: d.reason,
            message: d.message,
            dead_lettered_at: ms_to_rfc3339(d.dead_lettered_at_ms),
            received_at: ms_to_rfc3339(d.received_at_ms),
            event_name: d.event_name,
            conversion: d.conversion,
            raw_bytes: d.raw_bytes,
        }
    }
}

#[derive(Serialize)]
struct DeadLetterPage {
    dead_letters: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; null on the last page.
    next_cursor: Option<String>,
}

async fn list_dead_letters(
    State(st): State<Arc<AdminState>>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<DeadLetterPage>, Problem> {
    let p = params(&st, &raw, &["account", "limit", "cursor"], false)?;
    // One more than asked tells whether another page follows.
    let mut letters = dead_letters(
        &st,
        DeadLetterQuery {
            account: p.account,
            after: p.cursor,
            limit: p.limit + 1,
        },
    )
    .await?;
    let more = letters.len() > p.limit;
    letters.truncate(p.limit);
    let next_cursor = more
        .then(|| letters.last().map(|d| d.id.to_string()))
        .flatten();
    Ok(Json(DeadLetterPage {
        dead_letters: letters.into_iter().map(DeadLetterView::from).collect(),
        next_cursor,
    }))
}

#[derive(Serialize)]
struct Deleted {
    deleted: usize,
}

async fn delete_dead_letters(
    State(st): State<Arc<AdminState>>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<Json<Deleted>, Problem> {
    let p = params(&st, &raw, &["account"], true)?;
    let account = p.account.unwrap_or_default();
    let spool = &st.app.spool;
    let mut deleted = 0;
    loop {
        let ids: Vec<u64> = dead_letters(
            &st,
            DeadLetterQuery {
                account: Some(account.clone()),
                after: 0,
                limit: REPLAY_CHUNK,
            },
        )
        .await?
        .iter()
        .map(|d| d.id)
        .collect();
        if ids.is_empty() {
            break;
        }
        let n = spool
            .delete_dead_letters(&account, &ids)
            .await
            .map_err(unavailable)?;
        deleted += n;
        if n == 0 {
            break;
        }
    }
    tracing::info!(account = %account, deleted, "dead letters deleted");
    Ok(Json(Deleted { deleted }))
}

#[derive(Serialize)]
struct Replayed {
    /// Dead letters moved back to the account's queue.
    replayed: usize,
    /// Of those, how many got a different SET id from today's `events` mapping.
    remapped: usize,
}

async fn replay_dead_letters(
    State(st): State<Arc<AdminState>>,
    Query(raw): Query<HashMap<String, String>>,
) -> Result<(StatusCode, Json<Replayed>), Problem> {
    let p = params(&st, &raw, &["account"], true)?;
    let account = p.account.unwrap_or_default();
    let spool = &st.app.spool;
    let rules = &st.app.rules;
    let (mut replayed, mut remapped) = (0, 0);
    let mut after = 0;
    loop {
        let letters = dead_letters(
            &st,
            DeadLetterQuery {
                account: Some(account.clone()),
                after,
                limit: REPLAY_CHUNK,
            },
        )
        .await?;
        let Some(last) = letters.last().map(|d| d.id) else {
            break;
        };
        after = last;
        // A corrupt letter has nothing to send: it stays until deleted.
        let records: Vec<_> = letters
            .iter()
            .filter_map(|d| {
                let r = d.remapped(rules)?;
                if d.conversion.as_ref().map(|c| &c.event_id) != Some(&r.conversion.event_id) {
                    remapped += 1;
                }
                Some((d.id, r))
            })
            .collect();
        replayed += spool
            .replay(&account, records)
            .await
            .map_err(|e| match e {
                SpoolError::Full => Problem::unavailable(
                    format!("the spool is full; {replayed} dead letters were replayed before it filled, retry the rest later"),
                    5,
                ),
                other => unavailable(other),
            })?;
    }
    tracing::info!(account = %account, replayed, remapped, "dead letters replayed");
    Ok((StatusCode::OK, Json(Replayed { replayed, remapped })))
}
