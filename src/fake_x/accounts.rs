//! The Ads API account endpoints a setup check needs (`shared/x-ads-account-api.md`), served like X:
//! `GET /{version}/accounts/{id}/authenticated_user_access` and `GET`/`POST
//! /{version}/accounts/{id}/web_event_tags`, in the Ads API envelope (`request.params`, `data`,
//! `next_cursor`), OAuth 1.0a verified with the query and form parameters in the signature base string.
//!
//! # Who may do what
//! Every access token the configuration names (each account's `oauth` token, and each account's `users`)
//! is a user of the app. On an account, its own `oauth` token is an `ACCOUNT_ADMIN` unless `users` says
//! otherwise; a token listed in `users` has the permissions listed there; any other known token is a user
//! without access (`404`, X's "User … does not have access to account …"); an unknown one is `401`.
//!
//! # Tags
//! An account's tags are `tags` from the configuration (or, when none, one `UNVERIFIED` `PURCHASE` tag per
//! id of `events`), plus the ones created through `POST`, which the conversions endpoint then takes as the
//! account's SET ids too.

use super::{now_secs, verify_oauth, x_error, FakeAccount, FakeX};
use crate::setup::tag_spec::TagSpec;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// A user of the app on one account.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FakeUser {
    pub user_id: String,
    pub access_token: String,
    pub access_token_secret: String,
    /// `ACCOUNT_ADMIN`, `AD_MANAGER`, `CREATIVE_MANAGER`, `CAMPAIGN_ANALYST`, `ANALYST`, ...
    pub permissions: Vec<String>,
}

/// A Single Event Tag as the configuration gives it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FakeTag {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default = "unverified")]
    pub status: String,
    #[serde(default)]
    pub last_tracked_at: Option<String>,
}

fn unverified() -> String {
    "UNVERIFIED".into()
}

/// The tag as the API answers it; its embed code names the account's pixel and the tag as X's event
/// snippets do (`tw-{pixel}-{tag}`).
fn tag_json(tag: &FakeTag, pixel: &str, click: u32, view: u32, created: &str) -> Value {
    json!({
        "id": tag.id,
        "name": tag.name,
        "type": tag.kind,
        "status": tag.status,
        "click_window": click,
        "view_through_window": view,
        "retargeting_enabled": false,
        "website_tag_id": tag.id,
        "embed_code": format!("<script>twq('event','tw-{pixel}-{}',{{}});</script>", tag.id),
        "last_tracked_at": tag.last_tracked_at,
        "deleted": false,
        "created_at": created,
        "updated_at": created,
    })
}

/// The account's tags as answered: configured ones first, then those created, in order.
pub(super) fn tags_of(fake: &FakeX, account: &FakeAccount) -> Vec<Value> {
    let pixel = account.pixels.first().map(String::as_str).unwrap_or("");
    let mut out: Vec<Value> = if account.tags.is_empty() {
        account
            .events
            .iter()
            .map(|id| FakeTag {
                id: id.clone(),
                name: id.clone(),
                kind: "PURCHASE".into(),
                status: unverified(),
                last_tracked_at: None,
            })
            .map(|t| tag_json(&t, pixel, 30, 1, "2026-01-01T00:00:00Z"))
            .collect()
    } else {
        account
            .tags
            .iter()
            .map(|t| tag_json(t, pixel, 30, 1, "2026-01-01T00:00:00Z"))
            .collect()
    };
    out.extend(
        fake.lock()
            .created_tags
            .get(&account.id)
            .cloned()
            .unwrap_or_default(),
    );
    out
}

fn not_found(what: &str, account_id: &str) -> Response {
    x_error(
        404,
        &[("NOT_FOUND", what.to_owned(), "account_id".into())],
        Some(account_id),
    )
}

fn invalid(parameter: &str, message: String, account_id: &str) -> Response {
    x_error(
        400,
        &[("INVALID_PARAMETER", message, parameter.into())],
        Some(account_id),
    )
}

/// Who signed a request: the account it names, the user's id and permissions on it.
struct Caller {
    account: FakeAccount,
    user_id: String,
    permissions: Vec<String>,
}

/// The request's account and the user whose token signed it, or X's answer.
fn caller(
    fake: &FakeX,
    method: &str,
    account_id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    form: &[(String, String)],
) -> Result<Caller, Box<Response>> {
    let config = &fake.config;
    // Every token the apps have: (consumer key, consumer secret, token, token secret, Ads API access).
    let mut known: Vec<(String, String, String, String, bool)> = Vec::new();
    for a in &config.accounts {
        if let Some(o) = &a.oauth {
            known.push((
                o.consumer_key.clone(),
                o.consumer_secret.clone(),
                o.access_token.clone(),
                o.access_token_secret.clone(),
                o.ads_api_access,
            ));
            for u in &a.users {
                known.push((
                    o.consumer_key.clone(),
                    o.consumer_secret.clone(),
                    u.access_token.clone(),
                    u.access_token_secret.clone(),
                    o.ads_api_access,
                ));
            }
        }
    }
    let token = verify_oauth(fake, method, uri, headers, form, |ck, tok| {
        known
            .iter()
            .find(|(k, _, t, _, _)| k == ck && t == tok)
            .map(|(_, cs, _, ts, _)| (cs.clone(), ts.clone()))
            .ok_or_else(|| "unknown consumer key or access token".to_string())
    })
    .map_err(|_| {
        Box::new(x_error(
            401,
            &[(
                "UNAUTHORIZED_ACCESS",
                "This request is not properly authenticated".into(),
                String::new(),
            )],
            None,
        ))
    })?;
    if let Some((consumer_key, ..)) = known
        .iter()
        .find(|(_, _, t, _, access)| *t == token && !access)
    {
        return Err(Box::new(x_error(
            403,
            &[(
                "UNAUTHORIZED_CLIENT",
                format!("The client application with id {} making this request does not have access to Twitter Ads API. Ensure your application has advertiser-api access.", user_id_of(consumer_key)),
                String::new(),
            )],
            None,
        )));
    }
    let Some(account) = config.accounts.iter().find(|a| a.id == account_id) else {
        return Err(Box::new(not_found(
            &format!("Account {account_id} was not found"),
            account_id,
        )));
    };
    if let Some(u) = account.users.iter().find(|u| u.access_token == token) {
        return Ok(Caller {
            account: account.clone(),
            user_id: u.user_id.clone(),
            permissions: u.permissions.clone(),
        });
    }
    if account
        .oauth
        .as_ref()
        .is_some_and(|o| o.access_token == token)
    {
        return Ok(Caller {
            account: account.clone(),
            user_id: user_id_of(&token),
            permissions: vec!["ACCOUNT_ADMIN".into()],
        });
    }
    Err(Box::new(not_found(
        &format!(
            "User {} does not have access to account {account_id}",
            user_id_of(&token)
        ),
        account_id,
    )))
}

/// A stable user id for a token the configuration gives no id to.
fn user_id_of(token: &str) -> String {
    let digest = crate::conversion::identifiers::sha256_hex(token);
    let n = u64::from_str_radix(digest.get(..15).unwrap_or("0"), 16).unwrap_or(0);
    n.to_string()
}

fn params_of(uri: &Uri, form: &[(String, String)]) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    all.extend(form.iter().cloned());
    all
}

fn echo(account_id: &str, params: &[(String, String)]) -> Value {
    let mut m = Map::new();
    m.insert("account_id".into(), json!(account_id));
    for (k, v) in params {
        m.insert(k.clone(), json!(v));
    }
    json!({ "params": m })
}

pub(super) async fn authenticated_user_access(
    State(fake): State<Arc<FakeX>>,
    Path((_version, account_id)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let who = match caller(&fake, "GET", &account_id, &uri, &headers, &[]) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    Json(json!({
        "request": {"params": {"account_id": who.account.id}},
        "data": {"user_id": who.user_id, "permissions": who.permissions},
    }))
    .into_response()
}

pub(super) async fn web_event_tags(
    State(fake): State<Arc<FakeX>>,
    Path((_version, account_id)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = headers
        .get("content-type")
        .and_then(|c| c.to_str().ok())
        .filter(|c| c.starts_with("application/x-www-form-urlencoded"))
        .map(|_| {
            url::form_urlencoded::parse(&body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let account = match caller(&fake, method.as_str(), &account_id, &uri, &headers, &form) {
        Ok(c) => c.account,
        Err(resp) => return *resp,
    };
    let params = params_of(&uri, &form);
    if method == Method::POST {
        create(&fake, &account, &params)
    } else {
        list(&fake, &account, &params)
    }
}

fn get<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn list(fake: &FakeX, account: &FakeAccount, params: &[(String, String)]) -> Response {
    let count = match get(params, "count").map(str::parse::<usize>) {
        None => 200,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return invalid(
                "count",
                "count must be an integer from 1 to 1000".into(),
                &account.id,
            )
        }
    };
    let start = match get(params, "cursor").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return invalid("cursor", "cursor is not valid".into(), &account.id),
    };
    let mut tags = tags_of(fake, account);
    if let Some(ids) = get(params, "web_event_tag_ids") {
        let wanted: Vec<&str> = ids.split(',').map(str::trim).collect();
        tags.retain(|t| t["id"].as_str().is_some_and(|id| wanted.contains(&id)));
    }
    let total = tags.len();
    let page: Vec<Value> = tags.into_iter().skip(start).take(count).collect();
    let next = (start + page.len() < total).then(|| (start + page.len()).to_string());
    let mut answer = json!({
        "request": echo(&account.id, params),
        "data": page,
        "next_cursor": next,
    });
    if get(params, "with_total_count") == Some("true") {
        answer["total_count"] = json!(total);
    }
    Json(answer).into_response()
}

fn create(fake: &FakeX, account: &FakeAccount, params: &[(String, String)]) -> Response {
    let spec = match TagSpec::new(
        get(params, "name"),
        get(params, "type"),
        get(params, "click_window"),
        get(params, "view_through_window"),
    ) {
        Ok(s) => s,
        Err(e) => return invalid(e.parameter, e.message, &account.id),
    };
    let mut inner = fake.lock();
    inner.next_tag += 1;
    let id = format!("f{}", radix36(now_secs() * 1000 + inner.next_tag));
    let tag = FakeTag {
        id: id.clone(),
        name: spec.name,
        kind: spec.kind,
        status: unverified(),
        last_tracked_at: None,
    };
    let created = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let pixel = account.pixels.first().map(String::as_str).unwrap_or("");
    let answer = tag_json(
        &tag,
        pixel,
        spec.click_window,
        spec.view_through_window,
        &created,
    );
    inner
        .created_tags
        .entry(account.id.clone())
        .or_default()
        .push(answer.clone());
    drop(inner);
    Json(json!({"request": echo(&account.id, params), "data": answer})).into_response()
}

fn radix36(mut n: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while n > 0 {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}
