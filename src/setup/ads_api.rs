//! A client of the Ads API account endpoints (`shared/x-ads-account-api.md`): who the token's user is on an
//! ad account and the account's Single Event Tags, listed (every page) and created.
//!
//! Every call is signed with the account's OAuth 1.0a credentials, its query or form parameters in the
//! signature (unlike the conversions endpoint's JSON body). Every answer, error or not, keeps X's `Date`
//! header and the local time the call took place around, so the clock can be judged from any of them.

use crate::config::{Account, Auth, Secret, Upstream};
use crate::upstream::auth::{encode_params, oauth1_header_for};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::SystemTime;

/// What X answered about the token's user on an ad account.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UserAccess {
    pub user_id: String,
    #[serde(default)]
    pub permissions: Vec<String>,
}

/// A Single Event Tag as X lists it (the fields a setup check shows; the rest is ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Tag {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub website_tag_id: Option<String>,
    #[serde(default)]
    pub last_tracked_at: Option<String>,
    #[serde(default)]
    pub click_window: Option<u32>,
    #[serde(default)]
    pub view_through_window: Option<u32>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default, skip_serializing)]
    pub embed_code: Option<String>,
}

impl Tag {
    /// Whether `set_id` (an `event_id` of the configuration) names this tag: its `id` or, as X's setup
    /// guide calls it, its `website_tag_id`.
    pub fn is(&self, set_id: &str) -> bool {
        self.id == set_id || self.website_tag_id.as_deref() == Some(set_id)
    }
}

pub use crate::upstream::outcome::XError;

/// Why a call did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// X answered with an error status.
    Status { status: u16, errors: Vec<XError> },
    /// Nothing usable came back: no connection, a timeout, a body that is not X's envelope.
    Unreachable(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Status { status, errors } if errors.is_empty() => {
                write!(f, "X answered {status}")
            }
            CallError::Status { status, errors } => {
                write!(f, "X answered {status}: ")?;
                let parts: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{} {:?}", e.code, e.message))
                    .collect();
                f.write_str(&parts.join("; "))
            }
            CallError::Unreachable(why) => write!(f, "X could not be asked: {why}"),
        }
    }
}

/// X's clock as its `Date` header gave it, and the local clock around the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    pub x_date: SystemTime,
    pub sent: SystemTime,
    pub received: SystemTime,
}

impl ClockReading {
    /// X's `Date` header of an answer to a call sent at `sent` and answered at `received`.
    pub fn of(
        headers: &reqwest::header::HeaderMap,
        sent: SystemTime,
        received: SystemTime,
    ) -> Option<ClockReading> {
        headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_http_date)
            .map(|x_date| ClockReading {
                x_date,
                sent,
                received,
            })
    }
}

/// An answer or why not, and X's clock if any response came back.
#[derive(Debug)]
pub struct Answer<T> {
    pub result: Result<T, CallError>,
    pub clock: Option<ClockReading>,
}

pub struct AdsApi {
    http: reqwest::Client,
    base: String,
    credentials: [Secret; 4],
    /// Tags asked for per page (X allows 1 to 1000).
    pub page_size: u32,
}

/// The account's OAuth 1.0a secrets in signing order, or `None` (a pixel token, or none in sandbox mode).
pub fn oauth_credentials(account: &Account) -> Option<[Secret; 4]> {
    match &account.auth {
        Some(Auth::Oauth1 {
            consumer_key,
            consumer_secret,
            access_token,
            access_token_secret,
        }) => Some([
            consumer_key.clone(),
            consumer_secret.clone(),
            access_token.clone(),
            access_token_secret.clone(),
        ]),
        _ => None,
    }
}

/// Pages followed at most when listing tags: a cursor that never ends is X's fault, not a reason to hang.
const MAX_PAGES: usize = 1000;

impl AdsApi {
    /// A client for `settings`' host and version, signing with the four OAuth secrets (consumer key and
    /// secret, access token and secret).
    pub fn new(settings: &Upstream, credentials: [Secret; 4]) -> Result<AdsApi, String> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("conversion-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(AdsApi {
            http,
            base: format!(
                "{}/{}",
                settings.base_url.trim_end_matches('/'),
                settings.api_version
            ),
            credentials,
            page_size: 1000,
        })
    }

    /// `GET accounts/{ad_account}/authenticated_user_access`.
    pub async fn user_access(&self, ad_account: &str) -> Answer<UserAccess> {
        let path = format!("accounts/{ad_account}/authenticated_user_access");
        let answer = self.call("GET", &path, &[]).await;
        Answer {
            result: answer.result.and_then(|v| data_of(v).map(|(d, _)| d)),
            clock: answer.clock,
        }
    }

    /// Every tag of `ad_account`: `GET accounts/{ad_account}/web_event_tags`, following `next_cursor`.
    pub async fn tags(&self, ad_account: &str) -> Answer<Vec<Tag>> {
        let path = format!("accounts/{ad_account}/web_event_tags");
        let count = self.page_size.to_string();
        let mut tags = Vec::new();
        let mut cursor: Option<String> = None;
        let mut clock = None;
        for _ in 0..MAX_PAGES {
            let mut params = vec![("count", count.as_str())];
            if let Some(c) = &cursor {
                params.push(("cursor", c.as_str()));
            }
            let answer = self.call("GET", &path, &params).await;
            clock = clock.or(answer.clock);
            let page: Result<(Vec<Tag>, Option<String>), CallError> =
                answer.result.and_then(data_of);
            match page {
                Ok((page, next)) => {
                    tags.extend(page);
                    match next {
                        Some(n) if Some(&n) != cursor.as_ref() => cursor = Some(n),
                        _ => {
                            return Answer {
                                result: Ok(tags),
                                clock,
                            }
                        }
                    }
                }
                Err(e) => {
                    return Answer {
                        result: Err(e),
                        clock,
                    }
                }
            }
        }
        Answer {
            result: Err(CallError::Unreachable(format!(
                "the list of tags did not end after {MAX_PAGES} pages"
            ))),
            clock,
        }
    }

    /// `POST accounts/{ad_account}/web_event_tags` with `params` as a form body.
    pub async fn create_tag(&self, ad_account: &str, params: &[(&str, &str)]) -> Answer<Tag> {
        let path = format!("accounts/{ad_account}/web_event_tags");
        let answer = self.call("POST", &path, params).await;
        Answer {
            result: answer.result.and_then(|v| data_of(v).map(|(d, _)| d)),
            clock: answer.clock,
        }
    }

    /// One signed call; GET parameters go in the query, POST parameters in a form body.
    async fn call(&self, method: &str, path: &str, params: &[(&str, &str)]) -> Answer<Value> {
        let uri = format!("{}/{path}", self.base);
        let [a, b, c, d] = &self.credentials;
        let authorization = oauth1_header_for([a, b, c, d], method, &uri, params);
        let encoded = encode_params(params);
        let request = if method == "POST" {
            self.http
                .post(&uri)
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(encoded)
        } else if encoded.is_empty() {
            self.http.get(&uri)
        } else {
            self.http.get(format!("{uri}?{encoded}"))
        };
        let sent = SystemTime::now();
        let response = match request
            .header(reqwest::header::AUTHORIZATION, authorization)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Answer {
                    result: Err(CallError::Unreachable(transport_error(&e))),
                    clock: None,
                }
            }
        };
        let clock = ClockReading::of(response.headers(), sent, SystemTime::now());
        let status = response.status().as_u16();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Answer {
                    result: Err(CallError::Unreachable(transport_error(&e))),
                    clock,
                }
            }
        };
        let value: Option<Value> = serde_json::from_slice(&body).ok();
        let result = if (200..300).contains(&status) {
            value.ok_or_else(|| {
                CallError::Unreachable(format!("X answered {status} with a body that is not JSON"))
            })
        } else {
            let errors = value
                .and_then(|v| v.get("errors").cloned())
                .and_then(|e| serde_json::from_value(e).ok())
                .unwrap_or_default();
            Err(CallError::Status { status, errors })
        };
        Answer { result, clock }
    }
}

/// The envelope's `data` as `T`, and its `next_cursor`.
fn data_of<T: serde::de::DeserializeOwned>(v: Value) -> Result<(T, Option<String>), CallError> {
    let next = v
        .get("next_cursor")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let data = v.get("data").cloned().ok_or_else(|| {
        CallError::Unreachable("X's answer has no \"data\" (not the Ads API envelope)".into())
    })?;
    let data = serde_json::from_value(data).map_err(|e| {
        CallError::Unreachable(format!("X's answer is not what the Ads API documents: {e}"))
    })?;
    Ok((data, next))
}

/// An HTTP date (`Wed, 02 Dec 2026 00:58:00 GMT`, RFC 9110's preferred form).
pub fn parse_http_date(text: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc2822(text.trim())
        .ok()
        .map(|d| SystemTime::from(d.with_timezone(&chrono::Utc)))
}

/// A transport error in words, without its URL (which is only the configured host and path anyway).
fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "the request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn http_dates_are_read_as_x_sends_them() {
        let t = parse_http_date("Wed, 02 Dec 2026 00:58:00 GMT").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_secs(1_796_173_080)
        );
        assert_eq!(parse_http_date("yesterday"), None);
    }

    #[test]
    fn a_set_id_is_a_tags_id_or_its_website_tag_id() {
        let tag: Tag = serde_json::from_value(serde_json::json!({
            "id": "abc", "website_tag_id": "o9d2g", "name": "n", "type": "PURCHASE", "status": "TRACKING"
        }))
        .unwrap();
        assert!(tag.is("abc") && tag.is("o9d2g") && !tag.is("o9d2"));
    }

    #[test]
    fn the_envelope_gives_data_and_cursor() {
        let v = serde_json::json!({"request": {}, "data": [{"id": "a"}], "next_cursor": "200"});
        let (tags, next): (Vec<Tag>, _) = data_of(v).unwrap();
        assert_eq!((tags.len(), next.as_deref()), (1, Some("200")));
        assert!(matches!(
            data_of::<Vec<Tag>>(serde_json::json!({"errors": []})),
            Err(CallError::Unreachable(w)) if w.contains("data")
        ));
    }
}
