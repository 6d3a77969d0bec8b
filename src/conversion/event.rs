//! The first-party event -> X conversion mapping. Pure: the caller passes the rules and `now`.
//!
//! Each event is judged on its own and every problem is reported with the field it is in. An event
//! flagged `opt_out: true` is suppressed before anything else is looked at. Raw email and phone numbers
//! are hashed here and nowhere else; no error message repeats them.

use super::identifiers::{hashed_email, hashed_phone, prehashed, twclid_from_url};
use super::values::{currency, money, parse_time, positive_int, price, wire_time};
use super::wire::{Content, Conversion, Identifier};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Duration;

/// How far ahead of the gateway's clock a conversion time may be.
pub const MAX_FUTURE: Duration = Duration::from_secs(5 * 60);

/// What the mapping needs to know of one configured account.
#[derive(Debug, Clone)]
pub struct AccountRules {
    pub pixel_id: String,
    /// First-party event name -> SET id.
    pub events: BTreeMap<String, String>,
    pub default_phone_region: phonenumber::country::Id,
}

#[derive(Debug, Clone)]
pub struct Rules {
    pub accounts: BTreeMap<String, AccountRules>,
    pub max_event_age: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    Accepted { account: String, conversion: Conversion },
    /// The user opted out: never stored, never sent.
    Suppressed { account: Option<String> },
    Rejected(Vec<FieldError>),
}

/// Maps one event as the caller sent it.
pub fn map_event(raw: &Value, rules: &Rules, now: DateTime<Utc>) -> Judgement {
    let Some(obj) = raw.as_object() else {
        return Judgement::Rejected(vec![FieldError::new("", "each event must be a JSON object")]);
    };
    let mut errs = Vec::new();
    let mut fields = Fields { obj, errs: &mut errs };

    match obj.get("opt_out") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            let account = fields.string("account").filter(|a| rules.accounts.contains_key(a));
            return Judgement::Suppressed { account };
        }
        Some(_) => {
            // Unclear consent is never sent.
            return Judgement::Rejected(vec![FieldError::new("opt_out", "must be true or false")]);
        }
    }

    let account_name = match fields.string("account") {
        Some(a) if rules.accounts.contains_key(&a) => a,
        Some(a) => {
            return Judgement::Rejected(vec![FieldError::new(
                "account",
                format!("unknown account {a:?}; configured accounts: {}", names(rules.accounts.keys())),
            )])
        }
        None if rules.accounts.len() == 1 => rules.accounts.keys().next().cloned().unwrap_or_default(),
        None if !fields.errs.is_empty() => return Judgement::Rejected(errs),
        None => {
            return Judgement::Rejected(vec![FieldError::new(
                "account",
                format!("required when several accounts are configured: one of {}", names(rules.accounts.keys())),
            )])
        }
    };
    let account = &rules.accounts[&account_name];

    let event_id = fields.event_id(account);

    let conversion_time = match fields.string("conversion_time") {
        None => Some(now),
        Some(s) => match parse_time(&s) {
            Err(e) => fields.err("conversion_time", e),
            Ok(t) if t > now + MAX_FUTURE => {
                fields.err("conversion_time", "is more than 5 minutes in the future; check the sender's clock")
            }
            Ok(t) if now.signed_duration_since(t).to_std().is_ok_and(|age| age > rules.max_event_age) => fields.err(
                "conversion_time",
                format!(
                    "is older than delivery.max_event_age ({}); X would not attribute it",
                    humantime::format_duration(rules.max_event_age)
                ),
            ),
            Ok(t) => Some(t),
        },
    };

    let event_source_url = fields.string("event_source_url").and_then(|s| match url::Url::parse(&s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Some(u),
        _ => fields.err("event_source_url", "must be an absolute http(s) URL such as https://shop.example/checkout"),
    });

    let mut identifiers = Vec::new();
    let identifier_errors_before = fields.errs.len();
    let twclid = fields.string("twclid").or_else(|| event_source_url.as_ref().and_then(twclid_from_url));
    if let Some(t) = twclid {
        identifiers.push(Identifier::Twclid { twclid: t });
    }
    let region = account.default_phone_region;
    let email = fields.hashed_pair("email", "hashed_email", hashed_email);
    if let Some(h) = email {
        identifiers.push(Identifier::HashedEmail { hashed_email: h });
    }
    let phone = fields.hashed_pair("phone", "hashed_phone_number", |raw| hashed_phone(raw, region));
    if let Some(h) = phone {
        identifiers.push(Identifier::HashedPhoneNumber { hashed_phone_number: h });
    }
    if identifiers.is_empty() && fields.errs.len() == identifier_errors_before {
        fields.err::<()>(
            "identifiers",
            "at least one of twclid (or a twclid in event_source_url), email, hashed_email, phone or hashed_phone_number is required; ip_address and user_agent do not count alone",
        );
    }
    let ip_address = fields.string("ip_address").and_then(|ip| match ip.parse::<std::net::IpAddr>() {
        Ok(addr) => Some(addr.to_string()),
        Err(_) => fields.err("ip_address", "must be an IPv4 or IPv6 address"),
    });
    let user_agent = fields.string("user_agent");
    if ip_address.is_some() || user_agent.is_some() {
        identifiers.push(Identifier::Device { ip_address, user_agent });
    }

    let value = fields.present("value").and_then(|v| money(v).map_err(|e| fields.errs.push(FieldError::new("value", e))).ok());
    let price_currency = fields.string("price_currency").and_then(|c| currency(&c).map_err(|e| fields.errs.push(FieldError::new("price_currency", e))).ok());
    let number_items = fields
        .present("number_items")
        .and_then(|v| positive_int(v).map_err(|e| fields.errs.push(FieldError::new("number_items", e))).ok());
    let description = fields.string("description");
    let contents = fields.contents();
    let conversion_id = fields.string("conversion_id").unwrap_or_else(|| derive_conversion_id(&account_name, raw));

    match (event_id, conversion_time) {
        (Some(event_id), Some(t)) if errs.is_empty() => Judgement::Accepted {
            account: account_name,
            conversion: Conversion {
                conversion_time: wire_time(t),
                event_id,
                identifiers,
                conversion_id,
                value,
                price_currency,
                number_items,
                description,
                contents,
                event_source_url: event_source_url.map(String::from),
            },
        },
        _ => Judgement::Rejected(errs),
    }
}

/// The `conversion_id` of an event sent without one: a digest of the account and the event exactly as the
/// caller sent it (keys in sorted order), so an identical retried POST yields the same id. A defaulted
/// `conversion_time` is not part of it, because it is not in the event.
pub fn derive_conversion_id(account: &str, raw: &Value) -> String {
    let mut h = Sha256::new();
    h.update(b"conversion-gateway/conversion_id/v1\n");
    h.update(account.as_bytes());
    h.update(b"\n");
    canonical(raw, &mut h);
    format!("cg-{}", &hex::encode(h.finalize())[..32])
}

fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update(b"{");
            for k in keys {
                h.update(serde_json::to_string(k).unwrap_or_default().as_bytes());
                h.update(b":");
                canonical(&m[k], h);
                h.update(b",");
            }
            h.update(b"}");
        }
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                canonical(x, h);
                h.update(b",");
            }
            h.update(b"]");
        }
        other => h.update(other.to_string().as_bytes()),
    }
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// A base-36 tag id as X issues them (`o9d2g`).
pub fn is_base36_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// Reads fields of one event object, recording errors as it goes.
struct Fields<'a, 'e> {
    obj: &'a Map<String, Value>,
    errs: &'e mut Vec<FieldError>,
}

impl<'a> Fields<'a, '_> {
    fn err<T>(&mut self, field: &str, message: impl Into<String>) -> Option<T> {
        self.errs.push(FieldError::new(field, message));
        None
    }

    /// The value of a field that is present and not null.
    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A string field, trimmed; empty counts as absent. Numbers are accepted as their text (order ids).
    fn string(&mut self, key: &str) -> Option<String> {
        match self.present(key)? {
            Value::String(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
            Value::Number(n) => Some(n.to_string()),
            _ => self.err(key, "must be a string"),
        }
    }

    /// Like `string`, but never coerces other types (raw identifiers).
    fn strict_string(&mut self, key: &str) -> Option<String> {
        match self.present(key)? {
            Value::String(s) => Some(s.clone()).filter(|s| !s.trim().is_empty()),
            _ => self.err(key, "must be a string"),
        }
    }

    /// A raw field that is hashed (`email`) and its pre-hashed twin (`hashed_email`).
    fn hashed_pair(&mut self, raw_key: &str, hashed_key: &str, hash: impl Fn(&str) -> Result<String, &'static str>) -> Option<String> {
        let from_raw = self.strict_string(raw_key).and_then(|r| match hash(&r) {
            Ok(h) => Some(h),
            Err(e) => self.err(raw_key, e),
        });
        let from_hashed = self.strict_string(hashed_key).and_then(|r| match prehashed(&r) {
            Ok(h) => Some(h),
            Err(e) => self.err(hashed_key, format!("{e}; send raw values in {raw_key}")),
        });
        match (from_raw, from_hashed) {
            (Some(a), Some(b)) if a != b => {
                self.err(hashed_key, format!("does not match the hash of {raw_key}; send one of the two"))
            }
            (a, b) => a.or(b),
        }
    }

    fn event_id(&mut self, account: &AccountRules) -> Option<String> {
        let by_name = self.string("event").and_then(|name| {
            let found = account.events.get(&name).or_else(|| {
                account.events.iter().find(|(k, _)| k.eq_ignore_ascii_case(&name)).map(|(_, v)| v)
            });
            match found {
                Some(set) => Some(set.clone()),
                None => self.err(
                    "event",
                    format!(
                        "unknown event name {name:?}; configured names: {} (or send event_id with the SET id)",
                        names(account.events.keys())
                    ),
                ),
            }
        });
        let by_id = self.string("event_id").and_then(|id| {
            let id = id.to_ascii_lowercase();
            let set = match id.strip_prefix("tw-").and_then(|rest| rest.split_once('-')) {
                Some((pixel, set)) if pixel == account.pixel_id => set.to_owned(),
                Some((pixel, _)) => {
                    return self.err(
                        "event_id",
                        format!("{id:?} belongs to pixel {pixel:?}, but this account's pixel_id is {:?}", account.pixel_id),
                    )
                }
                None => id.clone(),
            };
            if is_base36_id(&set) {
                Some(set)
            } else {
                self.err("event_id", format!("{id:?} is not a Single Event Tag id (base-36, e.g. \"o9d2g\" or \"tw-o9d7n-o9d2g\")"))
            }
        });
        match (by_name, by_id) {
            (Some(a), Some(b)) if a != b => {
                self.err("event_id", format!("{b:?} disagrees with event, which maps to {a:?}; send one of the two"))
            }
            (Some(a), _) => Some(a),
            (None, Some(b)) => Some(b),
            (None, None) if !self.errs.iter().any(|e| e.field.starts_with("event")) => self.err(
                "event",
                "required: send event (an event name configured for the account) or event_id (the SET id)",
            ),
            (None, None) => None,
        }
    }

    fn contents(&mut self) -> Option<Vec<Content>> {
        let items = match self.present("contents")? {
            Value::Array(items) => items,
            _ => return self.err("contents", "must be an array of objects"),
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Some(obj) = item.as_object() else {
                self.err::<()>(&format!("contents[{i}]"), "must be an object");
                continue;
            };
            let mut f = Fields { obj, errs: &mut *self.errs };
            let before = f.errs.len();
            let mut sub = |key: &str| f.string(key);
            let content_id = sub("content_id");
            let content_name = sub("content_name");
            let content_type = sub("content_type");
            let content_group_id = sub("content_group_id");
            let content_price = f.present("content_price").and_then(|v| price(v).map_err(|e| f.errs.push(FieldError::new("content_price", e))).ok());
            let num_items = f.present("num_items").and_then(|v| positive_int(v).map_err(|e| f.errs.push(FieldError::new("num_items", e))).ok());
            for e in &mut f.errs[before..] {
                e.field = format!("contents[{i}].{}", e.field);
            }
            out.push(Content { content_id, content_name, content_type, content_price, num_items, content_group_id });
        }
        Some(out).filter(|c| !c.is_empty())
    }
}
