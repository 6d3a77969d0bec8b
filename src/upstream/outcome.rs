//! What an X response means, decided from status, headers and body alone (no I/O).
//!
//! Every response becomes an `Outcome`, JSON or not: the status code rules, the body only adds detail.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One entry of X's `errors` array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub parameter: Option<String>,
}

/// The rate-limit headers of a response (`x-rate-limit-*` and `x-account-rate-limit-*`), and `Retry-After`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RateLimitInfo {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Epoch seconds.
    pub reset: Option<u64>,
    pub account_limit: Option<u64>,
    pub account_remaining: Option<u64>,
    pub account_reset: Option<u64>,
    pub retry_after: Option<Duration>,
}

impl RateLimitInfo {
    /// The latest reset time any header announces (epoch seconds).
    pub fn latest_reset(&self) -> Option<u64> {
        self.reset.into_iter().chain(self.account_reset).max()
    }

    /// Whether the headers say the budget is spent.
    pub fn exhausted(&self) -> bool {
        self.remaining == Some(0) || self.account_remaining == Some(0)
    }
}

/// The typed result of one request to X.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx: X took the batch.
    Accepted {
        status: u16,
        conversions_processed: Option<u64>,
        debug_id: Option<String>,
        rate_limit: RateLimitInfo,
    },
    /// Any other status, with whatever the body said.
    Refused {
        status: u16,
        errors: Vec<XError>,
        rate_limit: RateLimitInfo,
        /// The start of a body that was not X's error JSON (an HTML 404 page, a proxy's message).
        body_excerpt: Option<String>,
    },
    /// No response within `upstream.timeout`.
    Timeout,
    /// The connection could not be made or broke.
    Transport { message: String },
    /// X closed the connection while a large body was still being sent: what it does with a body it
    /// will not take (its 413 may never be read). Treated like a 413.
    BodyNotSent { bytes: usize, message: String },
}

impl Outcome {
    /// A short, fixed label for metrics and logs: the status code, `timeout` or `connect_error`.
    pub fn status_label(&self) -> String {
        match self {
            Outcome::Accepted { status, .. } | Outcome::Refused { status, .. } => {
                status.to_string()
            }
            Outcome::Timeout => "timeout".into(),
            Outcome::Transport { .. } => "connect_error".into(),
            Outcome::BodyNotSent { .. } => "body_not_sent".into(),
        }
    }

    /// X's messages joined, or what is known instead.
    pub fn message(&self) -> String {
        match self {
            Outcome::Accepted { .. } => "accepted".into(),
            Outcome::Refused {
                errors,
                body_excerpt,
                status,
                ..
            } if errors.is_empty() => body_excerpt
                .clone()
                .unwrap_or_else(|| format!("HTTP {status} without a body")),
            Outcome::Refused { errors, .. } => errors
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            Outcome::Timeout => "no response within upstream.timeout".into(),
            Outcome::Transport { message } => message.clone(),
            Outcome::BodyNotSent { bytes, message } => {
                format!(
                    "X closed the connection while the {bytes}-byte body was being sent: {message}"
                )
            }
        }
    }
}

#[derive(Deserialize)]
struct SuccessBody {
    data: Option<SuccessData>,
}

#[derive(Deserialize)]
struct SuccessData {
    conversions_processed: Option<u64>,
    debug_id: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<XError>,
}

/// Classifies a response. `header` looks a header up by lower-case name.
pub fn classify<'a>(status: u16, header: impl Fn(&str) -> Option<&'a str>, body: &[u8]) -> Outcome {
    let num = |name: &str| header(name).and_then(|v| v.trim().parse::<u64>().ok());
    let rate_limit = RateLimitInfo {
        limit: num("x-rate-limit-limit"),
        remaining: num("x-rate-limit-remaining"),
        reset: num("x-rate-limit-reset"),
        account_limit: num("x-account-rate-limit-limit"),
        account_remaining: num("x-account-rate-limit-remaining"),
        account_reset: num("x-account-rate-limit-reset"),
        retry_after: num("retry-after").map(Duration::from_secs),
    };
    if (200..300).contains(&status) {
        let data = serde_json::from_slice::<SuccessBody>(body)
            .ok()
            .and_then(|b| b.data);
        return Outcome::Accepted {
            status,
            conversions_processed: data.as_ref().and_then(|d| d.conversions_processed),
            debug_id: data.and_then(|d| d.debug_id),
            rate_limit,
        };
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) if !b.errors.is_empty() => Outcome::Refused {
            status,
            errors: b.errors,
            rate_limit,
            body_excerpt: None,
        },
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let excerpt = (!text.is_empty()).then(|| text.chars().take(200).collect::<String>());
            Outcome::Refused {
                status,
                errors: Vec::new(),
                rate_limit,
                body_excerpt: excerpt,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn no_headers(_: &str) -> Option<&'static str> {
        None
    }

    #[test]
    fn success_keeps_debug_id() {
        let body = br#"{"request":{"params":{"account_id":"18ce552mlaq"}},"data":{"conversions_processed":1,"debug_id":"ff02e052-36e4-47d6-bdf0-6d8986446562"}}"#;
        match classify(200, no_headers, body) {
            Outcome::Accepted {
                conversions_processed,
                debug_id,
                ..
            } => {
                assert_eq!(conversions_processed, Some(1));
                assert_eq!(
                    debug_id.as_deref(),
                    Some("ff02e052-36e4-47d6-bdf0-6d8986446562")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn x_errors_are_parsed() {
        let body = br#"{"errors":[{"code":"INVALID_PARAMETER","message":"event_id (o6dkt) is not a single event tag (SET)","parameter":"event_id"}],"request":{"params":{"account_id":"18ce552mlaq"}}}"#;
        let o = classify(400, no_headers, body);
        assert_eq!(o.status_label(), "400");
        assert_eq!(
            o.message(),
            "event_id (o6dkt) is not a single event tag (SET)"
        );
        match o {
            Outcome::Refused { errors, .. } => {
                assert_eq!(errors[0].code, "INVALID_PARAMETER");
                assert_eq!(errors[0].parameter.as_deref(), Some("event_id"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn html_and_empty_bodies_still_classify() {
        let o = classify(
            404,
            no_headers,
            b"<html><body>Sorry, that page does not exist</body></html>",
        );
        assert!(
            matches!(&o, Outcome::Refused { status: 404, errors, body_excerpt: Some(_), .. } if errors.is_empty())
        );
        let o = classify(503, no_headers, b"");
        assert_eq!(o.message(), "HTTP 503 without a body");
    }

    #[test]
    fn rate_limit_headers() {
        let h = |name: &str| match name {
            "x-rate-limit-remaining" => Some("0"),
            "x-rate-limit-reset" => Some("1764331200"),
            "x-account-rate-limit-reset" => Some("1764331260"),
            "retry-after" => Some("30"),
            _ => None,
        };
        match classify(
            429,
            h,
            br#"{"errors":[{"code":"TOO_MANY_REQUESTS","message":"Rate limit exceeded"}]}"#,
        ) {
            Outcome::Refused { rate_limit, .. } => {
                assert!(rate_limit.exhausted());
                assert_eq!(rate_limit.latest_reset(), Some(1764331260));
                assert_eq!(rate_limit.retry_after, Some(Duration::from_secs(30)));
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn any_response_classifies_by_status(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let o = classify(status, no_headers, &body);
            prop_assert_eq!(matches!(o, Outcome::Accepted { .. }), (200..300).contains(&status));
            prop_assert_eq!(o.status_label(), status.to_string());
        }
    }
}
