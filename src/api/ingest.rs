//! `POST /v1/events`: authenticate, bound and parse the body, judge every event on its own, spool the
//! accepted ones, answer with counts and per-event errors.
//!
//! Invariants: raw email and phone numbers live only in this request's memory; `202` is answered only
//! after the spool took the accepted events; one bad event never affects the others of the request.

use super::body_budget::Lease;
use super::{AppState, Problem, Scope};
use crate::conversion::{events_of, map_event, FieldError, Judgement};
use crate::reasons::IngestOutcome;
use crate::spool::{Admission, Record};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;

#[derive(Debug, Serialize, PartialEq)]
pub struct IngestResponse {
    pub accepted: usize,
    pub duplicates: usize,
    pub suppressed: usize,
    pub rejected: Vec<RejectedEvent>,
    /// Identifiers left out of accepted events because they could not be used (a strong one remained).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

/// An identifier of event `index` that was left out, and why.
#[derive(Debug, Serialize, PartialEq)]
pub struct Warning {
    pub index: usize,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct RejectedEvent {
    pub index: usize,
    pub errors: Vec<FieldError>,
}

pub async fn ingest(State(st): State<Arc<AppState>>, request: Request) -> Response {
    match handle(&st, request).await {
        Ok(r) => r,
        Err(p) => p.into_response(),
    }
}

/// `Ok` for JSON in UTF-8 (`application/json` or `application/*+json`, no charset or `utf-8`); else the
/// `415` that says what to send.
fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let unsupported = |detail: String| {
        Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
        )
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut parts = ct.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if !json {
        return Err(unsupported(
            "send the events as JSON with Content-Type: application/json".into(),
        ));
    }
    for param in parts {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        let charset = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !charset.eq_ignore_ascii_case("utf-8")
            && !charset.eq_ignore_ascii_case("utf8")
        {
            return Err(unsupported(format!(
                "charset {charset:?} is not supported: send the JSON in UTF-8 (charset=utf-8, or no charset)"
            )));
        }
    }
    Ok(())
}

/// How the body is compressed.
enum Encoding {
    Identity,
    Gzip,
}

/// The body's `Content-Encoding`: none or gzip; anything else is a `415` naming it.
fn content_encoding(headers: &HeaderMap) -> Result<Encoding, Problem> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(Encoding::Identity);
    };
    let text = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
    match text.as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        _ => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-encoding",
            "Unsupported content encoding",
            format!("Content-Encoding {text:?} is not supported: send the body uncompressed or gzip-compressed"),
        )),
    }
}

fn too_large(what: &str, limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Payload too large",
        format!("the {what} is larger than server.max_body_bytes ({limit} bytes); send fewer events per request"),
    )
}

/// The `503` of a body the in-flight budget has no room for (counted).
fn shed(st: &AppState) -> Problem {
    st.metrics.shed();
    let budget = &st.body_budget;
    Problem::unavailable(
        format!(
            "the gateway is reading as many request bodies as server.max_inflight_body_bytes ({} bytes) allows; nothing of this request was read, retry in a moment",
            budget.total()
        ),
        1,
    )
}

/// A gzip body, decompressed under `limit` and held in `lease` as it inflates: a body that inflates past
/// the limit (a zip bomb) is a `413`, and is never inflated further than the limit.
fn gunzip(
    compressed: &[u8],
    limit: usize,
    lease: &mut Lease,
    st: &AppState,
) -> Result<Bytes, Problem> {
    use std::io::Read;
    const STEP: usize = 64 << 10;
    let mut decoder = flate2::read::GzDecoder::new(compressed);
    let mut out = Vec::new();
    loop {
        let before = out.len();
        if before > limit {
            return Err(too_large("decompressed body", limit));
        }
        if !lease.hold(compressed.len() + before + STEP) {
            return Err(shed(st));
        }
        let n = (&mut decoder)
            .take(STEP as u64)
            .read_to_end(&mut out)
            .map_err(|e| {
                Problem::bad_request(format!("the gzip body could not be decompressed: {e}"))
            })?;
        if n == 0 {
            return Ok(out.into());
        }
    }
}

/// Reads the body under `limit`, holding its bytes in `lease` as they arrive: a declared length is held
/// before anything is read, a chunked body frame by frame. An oversized body is never buffered whole.
async fn read_body(
    mut body: Body,
    limit: usize,
    headers: &HeaderMap,
    lease: &mut Lease,
    st: &AppState,
) -> Result<Bytes, Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large("body", limit));
    }
    let declared = declared.map_or(0, |n| n as usize);
    if !lease.hold(declared) {
        return Err(shed(st));
    }
    // A body that arrives in one frame (most do) is kept as it came; a second frame makes the copy.
    let mut only: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut len = 0;
    let deadline = tokio::time::Instant::now() + st.body_timeout;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, body.frame()).await else {
            return Err(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                "Request body too slow",
                format!(
                    "the body did not arrive within server.body_timeout ({}); nothing of this request was kept: send it again, faster or smaller",
                    humantime::format_duration(st.body_timeout)
                ),
            ));
        };
        let Some(frame) = next else { break };
        let frame =
            frame.map_err(|_| Problem::bad_request("the request body could not be read"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > limit {
            return Err(too_large("body", limit));
        }
        if !lease.hold(len) {
            return Err(shed(st));
        }
        match only.take() {
            None if buf.is_empty() => only = Some(data),
            first => {
                if let Some(first) = first {
                    buf.reserve(declared.max(len));
                    buf.extend_from_slice(&first);
                }
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(only.unwrap_or_else(|| buf.freeze()))
}

async fn handle(st: &AppState, request: Request) -> Result<Response, Problem> {
    // Held until the answer is made: the body, its events and their records live that long.
    let mut lease = st.body_budget.lease();
    let (events, scope, gpc) = read_events(st, request, &mut lease).await?;
    let now = (st.now)();
    let mut out = IngestResponse {
        accepted: 0,
        duplicates: 0,
        suppressed: 0,
        rejected: Vec::new(),
        warnings: Vec::new(),
    };
    let opted_out = gpc && st.privacy.honors_gpc();
    let records = judge(st, &events, &scope, opted_out, now, &mut out);
    drop(events);
    if !records.is_empty() {
        spool(st, records, &mut out).await?;
    }
    tracing::debug!(
        accepted = out.accepted,
        duplicates = out.duplicates,
        suppressed = out.suppressed,
        rejected = out.rejected.len(),
        "ingest"
    );
    let total = out.accepted + out.duplicates + out.suppressed + out.rejected.len();
    let status = if out.rejected.len() == total {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(out)).into_response())
}

/// The request's events, once it is allowed in (not shutting down, authenticated, JSON, within the
/// size and count limits).
async fn read_events(
    st: &AppState,
    request: Request,
    lease: &mut Lease,
) -> Result<(Vec<Value>, Scope, bool), Problem> {
    if st.is_shutting_down() {
        return Err(Problem::unavailable(
            "the gateway is shutting down; retry against another instance or in a moment",
            5,
        ));
    }
    let (parts, body) = request.into_parts();
    let scope = st.keys.check(&parts.headers).map_err(|why| {
        st.metrics.auth_failed("ingest");
        Problem::unauthorized(why)
    })?;
    check_content_type(&parts.headers)?;
    let encoding = content_encoding(&parts.headers)?;
    let bytes = read_body(body, st.max_body_bytes, &parts.headers, lease, st).await?;
    let bytes = match encoding {
        Encoding::Identity => bytes,
        Encoding::Gzip => gunzip(&bytes, st.max_body_bytes, lease, st)?,
    };
    let parsed: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))?;
    let events = events_of(parsed).map_err(Problem::bad_request)?;
    if events.is_empty() {
        return Err(Problem::bad_request(
            "events is empty; send at least one event",
        ));
    }
    if events.len() > st.max_events_per_request {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-many-events",
            "Too many events",
            format!(
                "{} events in one request; at most {} are accepted (server.max_events_per_request): split the request",
                events.len(),
                st.max_events_per_request
            ),
        ));
    }
    // Global Privacy Control, as the browser sent it and the backend forwarded it.
    let gpc = parts
        .headers
        .get("sec-gpc")
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"1");
    Ok((events, scope, gpc))
}

/// Maps every event on its own; the accepted ones become records, the others are counted in `out`.
/// An event for an account the request's key may not send for is rejected before it is mapped; one
/// whose user opted out (`opted_out`: the request's GPC signal, honoured; or on the suppression list)
/// is suppressed.
fn judge(
    st: &AppState,
    events: &[Value],
    scope: &Scope,
    opted_out: bool,
    now: chrono::DateTime<chrono::Utc>,
    out: &mut IngestResponse,
) -> Vec<Record> {
    let received_at_ms = now.timestamp_millis();
    let mut records = Vec::new();
    let list = st.privacy.list();
    for (index, raw) in events.iter().enumerate() {
        // Only a scoped key needs the account before mapping (it costs a lookup per event).
        let forbidden = match scope {
            Scope::Every => None,
            Scope::Only(_) => st.rules.account_of(raw).filter(|a| !scope.allows(a)),
        };
        if let Some(account) = forbidden {
            st.metrics
                .received(Some(account), IngestOutcome::Rejected, 1);
            out.rejected.push(RejectedEvent {
                index,
                errors: vec![FieldError {
                    field: "account".into(),
                    message: format!(
                        "this key may not send events for account {account:?}; use a key whose server.keys entry lists it"
                    ),
                }],
            });
            continue;
        }
        match map_event(raw, &st.rules, now) {
            Judgement::Accepted {
                account,
                conversion,
                ..
            } if opted_out || list.matches(&conversion) => {
                out.suppressed += 1;
                st.metrics
                    .received(Some(&account), IngestOutcome::Suppressed, 1);
            }
            Judgement::Accepted {
                account,
                conversion,
                event_name,
                dropped,
            } => {
                for d in dropped {
                    st.metrics.identifier_dropped(&account, &d.field);
                    out.warnings.push(Warning {
                        index,
                        field: d.field,
                        message: d.message,
                    });
                }
                records.push(Record {
                    account,
                    conversion,
                    received_at_ms,
                    event_name,
                })
            }
            Judgement::Suppressed { account } => {
                out.suppressed += 1;
                st.metrics
                    .received(account.as_deref(), IngestOutcome::Suppressed, 1);
            }
            Judgement::Rejected(errors) => {
                st.metrics
                    .received(st.rules.account_of(raw), IngestOutcome::Rejected, 1);
                out.rejected.push(RejectedEvent { index, errors });
            }
        }
    }
    records
}

/// Spools the accepted records (the answer waits for it) and counts what the spool said of each.
async fn spool(
    st: &AppState,
    records: Vec<Record>,
    out: &mut IngestResponse,
) -> Result<(), Problem> {
    let accounts: Vec<String> = records.iter().map(|r| r.account.clone()).collect();
    let admissions = st.spool.append(records).await.map_err(|e| {
        tracing::error!(error = %e, "spool refused events");
        Problem::unavailable(
            format!("{e}; nothing of this request was accepted, retry later"),
            1,
        )
    })?;
    // Counted per (account, outcome), not per event: one metric update each.
    let mut tally: Vec<(&str, IngestOutcome, u64)> = Vec::new();
    for (a, account) in admissions.into_iter().zip(&accounts) {
        let outcome = match a {
            Admission::Queued => {
                out.accepted += 1;
                IngestOutcome::Accepted
            }
            Admission::Duplicate => {
                out.duplicates += 1;
                IngestOutcome::Duplicate
            }
        };
        match tally
            .iter_mut()
            .find(|(acc, o, _)| *acc == account && *o == outcome)
        {
            Some(t) => t.2 += 1,
            None => tally.push((account, outcome, 1)),
        }
    }
    for (account, outcome, n) in tally {
        st.metrics.received(Some(account), outcome, n);
    }
    Ok(())
}
