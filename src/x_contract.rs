//! X's contract for `POST /{version}/measurement/conversions/{pixel_id}`: what X accepts, checked the way
//! X checks it, and how X answers — its error codes, messages and envelope (`shared/x-conversions-api.md`,
//! seed examples). One place for both users of it: the gateway's sandbox transport, which validates the
//! batches it does not send, and the fake of X that tests and benchmarks run. No production module depends on
//! the fake; both depend on this.
//!
//! Pure: no I/O. The caller says which SET ids belong to the account and which ids are pixels.

use serde_json::{json, Value};
use std::collections::HashSet;

/// X's per-request conversion limit.
pub const MAX_CONVERSIONS: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContractError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub parameter: String,
}

fn invalid(parameter: &str, message: impl Into<String>) -> ContractError {
    ContractError {
        status: 400,
        code: "INVALID_PARAMETER",
        message: message.into(),
        parameter: parameter.into(),
    }
}

/// Which event ids the account owns. `None` skips the ownership check (sandbox: no account lookup).
pub struct Scope<'a> {
    pub account_sets: Option<&'a HashSet<String>>,
    pub pixels: &'a HashSet<String>,
}

const CONVERSION_KEYS: &[&str] = &[
    "conversion_time",
    "event_id",
    "identifiers",
    "conversion_id",
    "value",
    "price_currency",
    "number_items",
    "description",
    "contents",
    "event_source_url",
];
const CONTENT_KEYS: &[&str] = &[
    "content_id",
    "content_name",
    "content_type",
    "content_price",
    "num_items",
    "content_group_id",
];

/// Validates a request body; `Ok(conversions)` or every applicable error (X reports them all).
pub fn validate(body: &[u8], scope: &Scope<'_>) -> Result<usize, Vec<ContractError>> {
    validate_value(serde_json::from_slice::<Value>(body).ok().as_ref(), scope)
}

/// Like `validate`, for a body already parsed (`None`: it was not JSON). `Ok(number of conversions)`.
pub fn validate_value(
    parsed: Option<&Value>,
    scope: &Scope<'_>,
) -> Result<usize, Vec<ContractError>> {
    let parsed = parsed.ok_or_else(|| vec![invalid("", "Request body is not valid JSON")])?;
    let Some(list) = parsed.get("conversions").and_then(Value::as_array) else {
        return Err(vec![invalid(
            "conversions",
            "Missing required parameter conversions",
        )]);
    };
    if list.len() > MAX_CONVERSIONS {
        return Err(vec![invalid(
            "conversions",
            "Conversion count limit is 500",
        )]);
    }
    if list.is_empty() {
        return Err(vec![invalid(
            "conversions",
            "At least one conversion must be provided",
        )]);
    }
    let mut errors = Vec::new();
    for c in list {
        check_conversion(c, scope, &mut errors);
    }
    if errors.is_empty() {
        Ok(list.len())
    } else {
        Err(errors)
    }
}

/// The status of a failed request: 400 when any error is a 400, else the first error's.
pub fn status_of(errors: &[ContractError]) -> u16 {
    if errors.iter().any(|e| e.status == 400) {
        400
    } else {
        errors.first().map_or(400, |e| e.status)
    }
}

fn is_wire_time(s: &str) -> bool {
    s.len() == 24
        && chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.3fZ").is_ok()
        && s.as_bytes()[19] == b'.'
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_base36(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

fn check_conversion(c: &Value, scope: &Scope<'_>, errors: &mut Vec<ContractError>) {
    let Some(obj) = c.as_object() else {
        errors.push(invalid("conversions", "Each conversion must be an object"));
        return;
    };
    for key in obj.keys() {
        if !CONVERSION_KEYS.contains(&key.as_str()) {
            errors.push(invalid(key, format!("Unknown parameter {key}")));
        }
    }
    match obj.get("conversion_time") {
        Some(Value::String(t)) if is_wire_time(t) => {}
        Some(Value::String(t)) => errors.push(invalid(
            "conversion_time",
            format!("Expected Time in yyyy-MM-ddTHH:mm:ss.SSSZ, got \"{t}\" for conversion_time"),
        )),
        Some(other) => errors.push(invalid(
            "conversion_time",
            format!("Expected Time in yyyy-MM-ddTHH:mm:ss.SSSZ, got {other} for conversion_time"),
        )),
        None => errors.push(invalid(
            "conversion_time",
            "Missing required parameter conversion_time",
        )),
    }
    match obj.get("event_id") {
        Some(Value::String(id)) => {
            let set = id
                .strip_prefix("tw-")
                .and_then(|r| r.split_once('-'))
                .map_or(id.as_str(), |(_, s)| s);
            if scope.pixels.contains(set) || !is_base36(set) {
                errors.push(invalid(
                    "event_id",
                    format!("event_id ({id}) is not a single event tag (SET)"),
                ));
            } else if scope.account_sets.is_some_and(|sets| !sets.contains(set)) {
                errors.push(ContractError {
                    status: 404,
                    code: "NOT_FOUND",
                    message: format!("event_id ({id}) does not belong to provided account"),
                    parameter: "event_id".into(),
                });
            }
        }
        _ => errors.push(invalid("event_id", "Event ID was not found")),
    }
    check_identifiers(obj.get("identifiers"), errors);
    for key in ["conversion_id", "description", "event_source_url"] {
        if obj.get(key).is_some_and(|v| !v.is_string()) {
            errors.push(invalid(key, format!("{key} must be a string")));
        }
    }
    if let Some(v) = obj.get("value") {
        let ok = v.as_str().is_some_and(|s| {
            s.split_once('.').is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && (a.bytes().chain(b.bytes())).all(|x| x.is_ascii_digit())
            })
        });
        if !ok {
            errors.push(invalid(
                "value",
                format!("Expected a decimal string for value, got {v}"),
            ));
        }
    }
    if let Some(v) = obj.get("price_currency") {
        if !v
            .as_str()
            .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()))
        {
            errors.push(invalid(
                "price_currency",
                format!("price_currency ({v}) is not an ISO 4217 currency code"),
            ));
        }
    }
    if let Some(v) = obj.get("number_items") {
        if v.as_u64().is_none_or(|n| n == 0) {
            errors.push(invalid(
                "number_items",
                format!("Expected a positive integer for number_items, got {v}"),
            ));
        }
    }
    if let Some(v) = obj.get("contents") {
        match v.as_array() {
            Some(items) => items.iter().for_each(|item| check_content(item, errors)),
            None => errors.push(invalid("contents", "contents must be an array")),
        }
    }
}

fn check_identifiers(v: Option<&Value>, errors: &mut Vec<ContractError>) {
    let none = || invalid("", "At least one user identifier must be provided");
    let Some(items) = v.and_then(Value::as_array) else {
        errors.push(none());
        return;
    };
    let mut strong = 0;
    for item in items {
        let Some(obj) = item.as_object() else {
            errors.push(invalid("identifiers", "Each identifier must be an object"));
            continue;
        };
        let mut strong_here = 0;
        for (key, value) in obj {
            let text = value.as_str();
            match key.as_str() {
                "twclid" => strong_here += usize::from(text.is_some_and(|t| !t.is_empty())),
                "hashed_email" | "hashed_phone_number" => match text {
                    Some("") => {}
                    Some(t) if is_sha256(t) => strong_here += 1,
                    _ => errors.push(invalid(
                        key,
                        format!(
                            "{key} ({}) is not a valid SHA-256 hash",
                            text.unwrap_or_default()
                        ),
                    )),
                },
                "ip_address" | "user_agent" if text.is_some_and(|t| !t.is_empty()) => {}
                "ip_address" | "user_agent" => {
                    errors.push(invalid(key, format!("{key} must be a non-empty string")))
                }
                _ => errors.push(invalid(key, format!("Unknown identifier {key}"))),
            }
        }
        if strong_here > 1 {
            errors.push(invalid("identifiers", "Each identifier object must hold exactly one of twclid, hashed_email, hashed_phone_number"));
        }
        strong += strong_here;
    }
    if strong == 0 {
        errors.push(none());
    }
}

fn check_content(item: &Value, errors: &mut Vec<ContractError>) {
    let Some(obj) = item.as_object() else {
        errors.push(invalid("contents", "Each content must be an object"));
        return;
    };
    for (key, value) in obj {
        match key.as_str() {
            "content_price" if !value.is_number() => errors.push(invalid(
                "content_price",
                format!("Expected a number for content_price, got {value}"),
            )),
            "num_items" if value.as_u64().is_none_or(|n| n == 0) => errors.push(invalid(
                "num_items",
                format!("Expected a positive integer for num_items, got {value}"),
            )),
            "content_price" | "num_items" => {}
            k if CONTENT_KEYS.contains(&k) && !value.is_string() => {
                errors.push(invalid(k, format!("{k} must be a string")))
            }
            k if CONTENT_KEYS.contains(&k) => {}
            k => errors.push(invalid(k, format!("Unknown parameter {k}"))),
        }
    }
}

/// X's error `code` for an answer with `status` (the codes its documentation lists).
pub fn error_code(status: u16) -> &'static str {
    match status {
        400 => "INVALID_PARAMETER",
        401 => "UNAUTHORIZED_ACCESS",
        403 => "UNAUTHORIZED_CLIENT_APPLICATION",
        404 => "NOT_FOUND",
        408 => "CANCELLED_REQUEST",
        423 => "LOCK_ACQUISITION_TIMEOUT",
        429 => "TOO_MANY_REQUESTS",
        503 => "SERVICE_UNAVAILABLE",
        _ => "INTERNAL_ERROR",
    }
}

/// X's error body: `{"errors": [{code, message, parameter}], "request": {"params": {...}}}`.
pub fn error_envelope(errors: &[(&str, String, String)], account_id: Option<&str>) -> Value {
    let errors: Vec<Value> = errors
        .iter()
        .map(|(code, message, parameter)| {
            json!({"code": code, "message": message, "parameter": parameter})
        })
        .collect();
    let params = account_id.map_or(json!({}), |a| json!({"account_id": a}));
    json!({"errors": errors, "request": {"params": params}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope_sets() -> (HashSet<String>, HashSet<String>) {
        (
            ["o9d2g".to_string()].into(),
            ["o9d7n".to_string(), "o6dkt".to_string()].into(),
        )
    }

    fn check(body: &str) -> Result<usize, Vec<ContractError>> {
        let (sets, pixels) = scope_sets();
        validate(
            body.as_bytes(),
            &Scope {
                account_sets: Some(&sets),
                pixels: &pixels,
            },
        )
    }

    fn one(conversion: &str) -> String {
        format!(r#"{{"conversions":[{conversion}]}}"#)
    }

    #[test]
    fn seed_request_is_accepted() {
        let body = one(
            r#"{"conversion_time":"2022-02-18T01:14:00.603Z","event_id":"o9d2g","identifiers":[{"twclid":"23opevjt88psuo13lu8d020qkn"},{"hashed_email":"63dc92389e3326e3ee3d7e6e715fda270977b9d293d97760f89105c86b3e2f11"}],"value":"20.00","number_items":3,"price_currency":"USD","conversion_id":"23294827","description":"Pet supply purchases","contents":[{"content_id":"1","content_name":"Blankets","content_type":"Pet supplies","content_price":100.99,"num_items":1,"content_group_id":"123"}]}"#,
        );
        assert_eq!(check(&body), Ok(1));
    }

    #[test]
    fn seed_error_messages() {
        let cases = [
            (r#"{"conversion_time":"2022-06-16T01:14:00.603Z","event_id":"o6dkt","identifiers":[{"twclid":"x"}]}"#, 400, "event_id (o6dkt) is not a single event tag (SET)"),
            (r#"{"conversion_time":"2022-06-16T01:14:00.603Z","event_id":"o9d2g","identifiers":[{"twclid":""}]}"#, 400, "At least one user identifier must be provided"),
            (r#"{"conversion_time":"2022-06-16T01:14:00.603Z","event_id":"o9d2g","identifiers":[{"hashed_email":"abc"}]}"#, 400, "hashed_email (abc) is not a valid SHA-256 hash"),
            (r#"{"conversion_time":"2022-06-16T01:14:00.603","event_id":"o9d2g","identifiers":[{"twclid":"x"}]}"#, 400, "Expected Time in yyyy-MM-ddTHH:mm:ss.SSSZ, got \"2022-06-16T01:14:00.603\" for conversion_time"),
            (r#"{"conversion_time":"2022-06-16T01:14:00.603Z","event_id":"abc","identifiers":[{"twclid":"x"}]}"#, 404, "event_id (abc) does not belong to provided account"),
        ];
        for (conversion, status, message) in cases {
            let errs = check(&one(conversion)).unwrap_err();
            assert_eq!(status_of(&errs), status, "{message}");
            assert_eq!(errs[0].message, message);
        }
    }

    #[test]
    fn more_than_500_is_refused() {
        let c = r#"{"conversion_time":"2022-06-16T01:14:00.603Z","event_id":"o9d2g","identifiers":[{"twclid":"x"}]}"#;
        let body = format!(r#"{{"conversions":[{}]}}"#, vec![c; 501].join(","));
        assert_eq!(
            check(&body).unwrap_err()[0].message,
            "Conversion count limit is 500"
        );
        let body = format!(r#"{{"conversions":[{}]}}"#, vec![c; 500].join(","));
        assert_eq!(check(&body), Ok(500));
    }

    #[test]
    fn ip_and_user_agent_never_count_alone() {
        let c = r#"{"conversion_time":"2022-06-16T01:14:00.603Z","event_id":"o9d2g","identifiers":[{"ip_address":"1.2.3.4","user_agent":"ua"}]}"#;
        assert_eq!(
            check(&one(c)).unwrap_err()[0].message,
            "At least one user identifier must be provided"
        );
    }

    #[test]
    fn uppercase_hash_and_bad_formats_are_refused() {
        let c = format!(
            r#"{{"conversion_time":"2022-06-16T01:14:00.603Z","event_id":"o9d2g","identifiers":[{{"hashed_phone_number":"{}"}}],"value":"20","number_items":"3"}}"#,
            "A".repeat(64)
        );
        let errs = check(&one(&c)).unwrap_err();
        let params: Vec<_> = errs.iter().map(|e| e.parameter.as_str()).collect();
        assert!(
            params.contains(&"hashed_phone_number")
                && params.contains(&"value")
                && params.contains(&"number_items"),
            "{errs:?}"
        );
    }
}
