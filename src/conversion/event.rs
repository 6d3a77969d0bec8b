//! The first-party event -> X conversion mapping. Pure: the caller passes the rules and `now`.
//!
//! Each event is judged on its own and every problem is reported with the field it is in. An event
//! flagged `opt_out: true` is suppressed: never stored, never sent. Its fields are still checked — a
//! malformed field is an error whatever the consent — but nothing is required of it (a backend may strip
//! identifiers of users who opted out). Raw email and phone numbers are hashed here and nowhere else; no
//! error message repeats them.

use super::identifiers::{hashed_email, hashed_phone, prehashed, twclid_from_url};
use super::values::{currency, money, parse_time, positive_int, price, wire_time};
use super::wire::{json_len, Content, Conversion, Identifier};
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

impl AccountRules {
    /// The SET id an event name maps to: the name as configured, else the one that differs only in case.
    pub fn event_set(&self, name: &str) -> Option<&String> {
        self.events.get(name).or_else(|| {
            self.events
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
    }
}

#[derive(Debug, Clone)]
pub struct Rules {
    pub accounts: BTreeMap<String, AccountRules>,
    pub max_event_age: Duration,
    /// An accepted conversion's size in X's JSON at most (`server.max_event_bytes`).
    pub max_event_bytes: usize,
}

impl Rules {
    /// The rules of the tests and fuzz targets: `accounts`, each with pixel `o9d7n` and the events
    /// `purchase` (SET `o9d2g`) and `signup` (`o9d2h`), phones in the US, events up to 7 days old.
    #[doc(hidden)]
    pub fn example(accounts: &[&str]) -> Rules {
        let accounts = accounts
            .iter()
            .map(|name| {
                let events = [
                    ("purchase".to_string(), "o9d2g".to_string()),
                    ("signup".to_string(), "o9d2h".to_string()),
                ]
                .into();
                let rules = AccountRules {
                    pixel_id: "o9d7n".into(),
                    events,
                    default_phone_region: phonenumber::country::Id::US,
                };
                (name.to_string(), rules)
            })
            .collect();
        Rules {
            accounts,
            max_event_age: Duration::from_secs(7 * 86400),
            max_event_bytes: 64 << 10,
        }
    }

    /// The configured account an event belongs to, as `map_event` tells it: the one it names, or the only
    /// one. `None` when it names none of them (or none while several are configured).
    pub fn account_of<'a>(&'a self, raw: &Value) -> Option<&'a str> {
        let named = match raw.get("account") {
            Some(Value::String(s)) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
            _ => None,
        };
        match named {
            Some(a) => self.accounts.get_key_value(&a).map(|(k, _)| k.as_str()),
            None if self.accounts.len() == 1 => self.accounts.keys().next().map(String::as_str),
            None => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
// Made once per event and consumed at once; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Judgement {
    Accepted {
        account: String,
        conversion: Conversion,
        /// The `event` name the caller sent, when the SET id came from it: a replayed dead letter is mapped
        /// again with the configuration of the day (e.g. after a wrong SET id was fixed).
        event_name: Option<String>,
        /// Identifiers that could not be used and were left out, each with why (a strong one remained).
        dropped: Vec<FieldError>,
    },
    /// The user opted out: never stored, never sent.
    Suppressed {
        account: Option<String>,
    },
    Rejected(Vec<FieldError>),
}

/// The events of a `POST /v1/events` body: one event object, or `{"events": [...]}` and nothing else.
/// `Err` says what is wrong with the shape; the events themselves are judged one by one by `map_event`.
pub fn events_of(body: Value) -> Result<Vec<Value>, String> {
    match body {
        Value::Object(mut obj) if obj.contains_key("events") => {
            if let Some(extra) = obj.keys().find(|k| *k != "events") {
                return Err(format!(
                    "unexpected top-level field {extra:?}: a batch is {{\"events\": [...]}} and nothing else; put fields inside each event"
                ));
            }
            match obj.remove("events") {
                Some(Value::Array(list)) => Ok(list),
                _ => Err("events must be an array of event objects".into()),
            }
        }
        obj @ Value::Object(_) => Ok(vec![obj]),
        _ => Err("the body must be one event object or {\"events\": [ ... ]}".into()),
    }
}

/// Maps one event as the caller sent it.
pub fn map_event(raw: &Value, rules: &Rules, now: DateTime<Utc>) -> Judgement {
    let Some(obj) = raw.as_object() else {
        return Judgement::Rejected(vec![FieldError::new(
            "",
            "each event must be a JSON object",
        )]);
    };
    let opt_out = match opt_out(obj) {
        Ok(o) => o,
        Err(e) => return Judgement::Rejected(vec![e]),
    };
    if opt_out && obj.get("account").is_none_or(Value::is_null) && rules.accounts.len() > 1 {
        return suppressed_for_some_account(obj, rules, now);
    }
    let mut errs = Vec::new();
    let mut fields = Fields {
        obj,
        errs: &mut errs,
    };
    let account_name = match fields.account(rules) {
        Ok(a) => a,
        Err(errors) => return Judgement::Rejected(errors),
    };
    let account = &rules.accounts[&account_name];

    let event_id = fields.event_id(account);
    let event_name = obj
        .get("event")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| account.event_set(n).is_some())
        .map(str::to_owned);
    let conversion_time = fields.conversion_time(now, rules.max_event_age);
    let event_source_url = fields.event_source_url();
    let (identifiers, dropped) =
        fields.identifiers(event_source_url.as_ref(), account.default_phone_region);
    let (value, price_currency, number_items) = fields.amounts();
    let description = fields.string("description");
    let contents = fields.contents();
    let conversion_id = fields
        .id("conversion_id")
        .unwrap_or_else(|| derive_conversion_id(&account_name, raw));

    if opt_out {
        // What the event holds must be well-formed; what it lacks does not matter, it is never sent.
        errs.extend(dropped);
        errs.retain(|e| {
            let root = e.field.split(['.', '[']).next().unwrap_or("");
            obj.get(root).is_some_and(|v| !v.is_null())
        });
        return if errs.is_empty() {
            Judgement::Suppressed {
                account: Some(account_name),
            }
        } else {
            Judgement::Rejected(errs)
        };
    }

    let conversion = match (event_id, conversion_time) {
        (Some(event_id), Some(t)) if errs.is_empty() => Conversion {
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
        _ => return Judgement::Rejected(errs),
    };
    if let Err(too_large) = within_size(&conversion, rules.max_event_bytes) {
        return Judgement::Rejected(vec![too_large]);
    }
    Judgement::Accepted {
        account: account_name,
        event_name,
        conversion,
        dropped,
    }
}

/// `Ok` when the conversion fits `max` bytes of X's JSON; else the error naming the field that makes it
/// large (it could never be sent: a batch is capped by bytes too).
fn within_size(c: &Conversion, max: usize) -> Result<(), FieldError> {
    if c.wire_len_at_most() <= max {
        return Ok(());
    }
    let len = c.wire_len();
    if len <= max {
        return Ok(());
    }
    let fields = [
        ("description", c.description.as_ref().map_or(0, json_len)),
        ("contents", c.contents.as_ref().map_or(0, json_len)),
        (
            "event_source_url",
            c.event_source_url.as_ref().map_or(0, json_len),
        ),
        ("identifiers", json_len(&c.identifiers)),
        ("conversion_id", json_len(&c.conversion_id)),
    ];
    let (field, _) = fields
        .iter()
        .max_by_key(|(_, n)| *n)
        .copied()
        .unwrap_or(("", 0));
    Err(FieldError::new(
        field,
        format!(
            "makes the event {len} bytes, more than server.max_event_bytes ({max}); shorten it"
        ),
    ))
}

/// Whether the user opted out; unclear consent is an error (such an event is never sent).
fn opt_out(obj: &Map<String, Value>) -> Result<bool, FieldError> {
    match obj.get("opt_out") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(false),
        Some(Value::Bool(true)) => Ok(true),
        Some(_) => Err(FieldError::new("opt_out", "must be true or false")),
    }
}

/// An opted-out event naming no account, with several configured: whose it is cannot be told, and it is
/// never sent, so it only has to be well-formed for one of them.
fn suppressed_for_some_account(
    obj: &Map<String, Value>,
    rules: &Rules,
    now: DateTime<Utc>,
) -> Judgement {
    let mut first_errors = None;
    for name in rules.accounts.keys() {
        let mut named = obj.clone();
        named.insert("account".into(), Value::String(name.clone()));
        match map_event(&Value::Object(named), rules, now) {
            Judgement::Rejected(e) => {
                first_errors.get_or_insert(e);
            }
            _ => return Judgement::Suppressed { account: None },
        }
    }
    Judgement::Rejected(first_errors.unwrap_or_default())
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
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// Reads fields of one event object, recording errors as it goes.
struct Fields<'a, 'e> {
    obj: &'a Map<String, Value>,
    errs: &'e mut Vec<FieldError>,
}

impl<'a> Fields<'a, '_> {
    /// The configured account the event is for; the errors when it names none that is configured.
    fn account(&mut self, rules: &Rules) -> Result<String, Vec<FieldError>> {
        match self.string("account") {
            Some(a) if rules.accounts.contains_key(&a) => Ok(a),
            Some(a) => Err(vec![FieldError::new(
                "account",
                format!(
                    "unknown account {a:?}; configured accounts: {}",
                    names(rules.accounts.keys())
                ),
            )]),
            None if rules.accounts.len() == 1 => {
                Ok(rules.accounts.keys().next().cloned().unwrap_or_default())
            }
            None if !self.errs.is_empty() => Err(std::mem::take(self.errs)),
            None => Err(vec![FieldError::new(
                "account",
                format!(
                    "required when several accounts are configured: one of {}",
                    names(rules.accounts.keys())
                ),
            )]),
        }
    }

    /// When it happened: now when not given; not in the future (beyond a clock skew), not too old.
    fn conversion_time(&mut self, now: DateTime<Utc>, max_age: Duration) -> Option<DateTime<Utc>> {
        let Some(s) = self.string("conversion_time") else {
            return Some(now);
        };
        match parse_time(&s) {
            Err(e) => self.err("conversion_time", e),
            Ok(t) if t > now + MAX_FUTURE => self.err(
                "conversion_time",
                "is more than 5 minutes in the future; check the sender's clock",
            ),
            Ok(t)
                if now
                    .signed_duration_since(t)
                    .to_std()
                    .is_ok_and(|age| age > max_age) =>
            {
                self.err(
                    "conversion_time",
                    format!(
                        "is older than delivery.max_event_age ({}); X would not attribute it",
                        humantime::format_duration(max_age)
                    ),
                )
            }
            Ok(t) => Some(t),
        }
    }

    fn event_source_url(&mut self) -> Option<url::Url> {
        let s = self.string("event_source_url")?;
        match url::Url::parse(&s) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => Some(u),
            _ => self.err(
                "event_source_url",
                "must be an absolute http(s) URL such as https://shop.example/checkout",
            ),
        }
    }

    /// The identifiers, normalized and hashed, and those that could not be used. An unusable one (a
    /// malformed email, a phone number X cannot match, a bad IP address) is an optional extra that is
    /// left out while a strong one (click id, email, phone) remains; without a strong one left, every
    /// reason is an error of the event.
    fn identifiers(
        &mut self,
        url: Option<&url::Url>,
        region: phonenumber::country::Id,
    ) -> (Vec<Identifier>, Vec<FieldError>) {
        let mut identifiers = Vec::new();
        let errors_before = self.errs.len();
        let twclid = self
            .string("twclid")
            .or_else(|| url.and_then(twclid_from_url));
        if let Some(t) = twclid {
            identifiers.push(Identifier::Twclid { twclid: t });
        }
        if let Some(h) = self.hashed_pair("email", "hashed_email", hashed_email) {
            identifiers.push(Identifier::HashedEmail { hashed_email: h });
        }
        let phone = self.hashed_pair("phone", "hashed_phone_number", |raw| {
            hashed_phone(raw, region)
        });
        if let Some(h) = phone {
            identifiers.push(Identifier::HashedPhoneNumber {
                hashed_phone_number: h,
            });
        }
        let ip_address =
            self.string("ip_address")
                .and_then(|ip| match ip.parse::<std::net::IpAddr>() {
                    Ok(addr) => Some(addr.to_string()),
                    Err(_) => self.err("ip_address", "must be an IPv4 or IPv6 address"),
                });
        let user_agent = self.string("user_agent");
        if ip_address.is_some() || user_agent.is_some() {
            identifiers.push(Identifier::Device {
                ip_address,
                user_agent,
            });
        }
        let unusable: Vec<FieldError> = self.errs.drain(errors_before..).collect();
        if identifiers.iter().any(Identifier::is_strong) {
            return (identifiers, unusable);
        }
        if unusable.is_empty() {
            self.err::<()>(
                "identifiers",
                "at least one of twclid (or a twclid in event_source_url), email, hashed_email, phone or hashed_phone_number is required; ip_address and user_agent do not count alone",
            );
        }
        self.errs.extend(unusable);
        (identifiers, Vec::new())
    }

    /// `value`, `price_currency` and `number_items`, each checked on its own.
    fn amounts(&mut self) -> (Option<String>, Option<String>, Option<u64>) {
        let value = self.present("value").and_then(|v| {
            money(v)
                .map_err(|e| self.errs.push(FieldError::new("value", e)))
                .ok()
        });
        let price_currency = self.string("price_currency").and_then(|c| {
            currency(&c)
                .map_err(|e| self.errs.push(FieldError::new("price_currency", e)))
                .ok()
        });
        let number_items = self.present("number_items").and_then(|v| {
            positive_int(v)
                .map_err(|e| self.errs.push(FieldError::new("number_items", e)))
                .ok()
        });
        (value, price_currency, number_items)
    }

    fn err<T>(&mut self, field: &str, message: impl Into<String>) -> Option<T> {
        self.errs.push(FieldError::new(field, message));
        None
    }

    /// The value of a field that is present and not null.
    fn present(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// A string field, trimmed; empty counts as absent.
    fn string(&mut self, key: &str) -> Option<String> {
        match self.present(key)? {
            Value::String(s) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
            _ => self.err(key, "must be a string"),
        }
    }

    /// An id field: a string as `string` reads it, or a number taken as its text (order ids often are).
    /// An identifier given as a string, or as a JSON integer kept to the digit. A number that is not
    /// an exact integer (a fraction, or more digits than 64 bits hold: JSON parsers keep those only
    /// approximately) is refused rather than sent changed.
    fn id(&mut self, key: &str) -> Option<String> {
        match self.present(key)? {
            Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
            Value::Number(n) => self.err(
                key,
                format!("{n} cannot be kept exactly as a JSON number; send it as a string"),
            ),
            _ => self.string(key),
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
    fn hashed_pair(
        &mut self,
        raw_key: &str,
        hashed_key: &str,
        hash: impl Fn(&str) -> Result<String, &'static str>,
    ) -> Option<String> {
        let from_raw = self.strict_string(raw_key).and_then(|r| match hash(&r) {
            Ok(h) => Some(h),
            Err(e) => self.err(raw_key, e),
        });
        let from_hashed = self
            .strict_string(hashed_key)
            .and_then(|r| match prehashed(&r) {
                Ok(h) => Some(h),
                Err(e) => self.err(hashed_key, format!("{e}; send raw values in {raw_key}")),
            });
        match (from_raw, from_hashed) {
            (Some(a), Some(b)) if a != b => self.err(
                hashed_key,
                format!("does not match the hash of {raw_key}; send one of the two"),
            ),
            (a, b) => a.or(b),
        }
    }

    fn event_id(&mut self, account: &AccountRules) -> Option<String> {
        let by_name = self.string("event").and_then(|name| {
            match account.event_set(&name) {
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
            let mut f = Fields {
                obj,
                errs: &mut *self.errs,
            };
            let before = f.errs.len();
            let content_id = f.id("content_id");
            let content_name = f.string("content_name");
            let content_type = f.string("content_type");
            let content_group_id = f.id("content_group_id");
            let content_price = f.present("content_price").and_then(|v| {
                price(v)
                    .map_err(|e| f.errs.push(FieldError::new("content_price", e)))
                    .ok()
            });
            let num_items = f.present("num_items").and_then(|v| {
                positive_int(v)
                    .map_err(|e| f.errs.push(FieldError::new("num_items", e)))
                    .ok()
            });
            for e in &mut f.errs[before..] {
                e.field = format!("contents[{i}].{}", e.field);
            }
            out.push(Content {
                content_id,
                content_name,
                content_type,
                content_price,
                num_items,
                content_group_id,
            });
        }
        Some(out).filter(|c| !c.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use serde_json::json;

    fn rules(accounts: &[&str]) -> Rules {
        Rules::example(accounts)
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0).unwrap()
    }

    fn accept(raw: Value) -> Conversion {
        match map_event(&raw, &rules(&["acme"]), now()) {
            Judgement::Accepted { conversion, .. } => conversion,
            other => panic!("{raw} -> {other:?}"),
        }
    }

    fn reject(raw: Value) -> Vec<FieldError> {
        reject_with(raw, &rules(&["acme"]))
    }

    /// The conversion of an accepted event and the identifiers left out of it.
    fn accept_dropping(raw: Value) -> (Conversion, Vec<FieldError>) {
        match map_event(&raw, &rules(&["acme"]), now()) {
            Judgement::Accepted {
                conversion,
                dropped,
                ..
            } => (conversion, dropped),
            other => panic!("{raw} -> {other:?}"),
        }
    }

    #[test]
    fn an_unusable_identifier_is_left_out_while_a_strong_one_remains() {
        let email = hashed_email("jane@example.com").unwrap();
        // A good email, a mistyped phone: accepted without the phone.
        let (c, dropped) = accept_dropping(
            json!({"event": "purchase", "email": "jane@example.com", "phone": "12"}),
        );
        assert_eq!(
            c.identifiers,
            [Identifier::HashedEmail {
                hashed_email: email.clone()
            }]
        );
        assert_eq!(fields(&dropped), ["phone"]);
        assert!(
            dropped[0].message.contains("phone number"),
            "{}",
            dropped[0].message
        );
        // A malformed email, a good phone and a bad IP: the phone is sent, both others dropped.
        let (c, dropped) = accept_dropping(
            json!({"event": "purchase", "email": "jane(at)example.com", "phone": "+1 650 253 0000", "ip_address": "300.1.1.1"}),
        );
        assert_eq!(
            c.identifiers,
            [Identifier::HashedPhoneNumber {
                hashed_phone_number: hashed_phone("+16502530000", phonenumber::country::Id::US)
                    .unwrap()
            }]
        );
        assert_eq!(fields(&dropped), ["email", "ip_address"]);
        // A hashed twin that does not match its raw value: both dropped, the click id remains.
        let (c, dropped) = accept_dropping(
            json!({"event": "purchase", "twclid": "t", "email": "jane@example.com", "hashed_email": "ab".repeat(32)}),
        );
        assert_eq!(c.identifiers, [Identifier::Twclid { twclid: "t".into() }]);
        assert_eq!(fields(&dropped), ["hashed_email"]);
        // A local number without an area code is not a number X can match: dropped, never +15551234.
        let (c, dropped) =
            accept_dropping(json!({"event": "purchase", "twclid": "t", "phone": "555-1234"}));
        assert_eq!(c.identifiers.len(), 1);
        assert_eq!(fields(&dropped), ["phone"]);
        assert!(
            dropped[0].message.contains("area code"),
            "{}",
            dropped[0].message
        );
        // No strong identifier left: rejected with every reason, as before.
        let e = reject(
            json!({"event": "purchase", "phone": "12", "email": "x@", "ip_address": "1.2.3.4"}),
        );
        assert_eq!(fields(&e), ["email", "phone"]);
        // The other fields keep their strict rules.
        let e = reject(json!({"event": "purchase", "twclid": "t", "phone": "12", "value": "abc"}));
        assert_eq!(fields(&e), ["value"]);
    }

    fn reject_with(raw: Value, rules: &Rules) -> Vec<FieldError> {
        match map_event(&raw, rules, now()) {
            Judgement::Rejected(e) => e,
            other => panic!("{raw} -> {other:?}"),
        }
    }

    fn fields(errs: &[FieldError]) -> Vec<&str> {
        errs.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn account_is_required_only_with_several() {
        let two = rules(&["acme", "beta"]);
        let e = reject_with(json!({"event": "purchase", "twclid": "t"}), &two);
        assert_eq!(fields(&e), ["account"]);
        assert!(e[0].message.contains("acme, beta"));
        let e = reject_with(
            json!({"account": "gamma", "event": "purchase", "twclid": "t"}),
            &two,
        );
        assert!(e[0].message.contains("unknown account \"gamma\""));
        match map_event(
            &json!({"account": "beta", "event": "purchase", "twclid": "t"}),
            &two,
            now(),
        ) {
            Judgement::Accepted { account, .. } => assert_eq!(account, "beta"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            accept(json!({"event": "purchase", "twclid": "t"})).event_id,
            "o9d2g"
        );
    }

    #[test]
    fn event_name_or_set_id() {
        assert_eq!(
            accept(json!({"event": "signup", "twclid": "t"})).event_id,
            "o9d2h"
        );
        assert_eq!(
            accept(json!({"event": "SignUp", "twclid": "t"})).event_id,
            "o9d2h"
        );
        assert_eq!(
            accept(json!({"event_id": "o9d2z", "twclid": "t"})).event_id,
            "o9d2z"
        );
        assert_eq!(
            accept(json!({"event_id": "tw-o9d7n-o9d2g", "twclid": "t"})).event_id,
            "o9d2g"
        );
        assert_eq!(
            accept(json!({"event": "purchase", "event_id": "o9d2g", "twclid": "t"})).event_id,
            "o9d2g"
        );
        assert_eq!(fields(&reject(json!({"twclid": "t"}))), ["event"]);
        assert_eq!(
            fields(&reject(json!({"event": "refund", "twclid": "t"}))),
            ["event"]
        );
        assert_eq!(
            fields(&reject(json!({"event_id": "o9-d2g", "twclid": "t"}))),
            ["event_id"]
        );
        assert_eq!(
            fields(&reject(
                json!({"event_id": "tw-zzzzz-o9d2g", "twclid": "t"})
            )),
            ["event_id"]
        );
        assert_eq!(
            fields(&reject(
                json!({"event": "purchase", "event_id": "o9d2h", "twclid": "t"})
            )),
            ["event_id"]
        );
    }

    #[test]
    fn conversion_time_rules() {
        assert_eq!(
            accept(json!({"event": "purchase", "twclid": "t"})).conversion_time,
            "2026-11-28T12:00:00.000Z"
        );
        assert_eq!(
            accept(json!({"event": "purchase", "twclid": "t", "conversion_time": "2026-11-28T12:54:00.6034567+01:00"})).conversion_time,
            "2026-11-28T11:54:00.603Z"
        );
        assert_eq!(accept(json!({"event": "purchase", "twclid": "t", "conversion_time": "2026-11-28T12:04:59Z"})).conversion_time, "2026-11-28T12:04:59.000Z");
        for (t, needle) in [
            ("2026-11-28T12:05:01Z", "future"),
            ("2026-11-21T11:59:59Z", "max_event_age"),
            ("2026-11-28T12:00:00", "offset"),
            ("yesterday", "RFC 3339"),
        ] {
            let e = reject(json!({"event": "purchase", "twclid": "t", "conversion_time": t}));
            assert_eq!(fields(&e), ["conversion_time"], "{t}");
            assert!(e[0].message.contains(needle), "{t}: {}", e[0].message);
        }
    }

    #[test]
    fn identifiers_raw_prehashed_and_from_url() {
        let c = accept(
            json!({"event": "purchase", "email": "  Test-Email@Test.com ", "phone": "+1 (123) 456-7890"}),
        );
        assert_eq!(
            c.identifiers,
            [
                Identifier::HashedEmail {
                    hashed_email:
                        "e586883b2b4faf78d48300a79e0e15138d664cdf796ffb86e533170a9893eda8".into()
                },
                Identifier::HashedPhoneNumber {
                    hashed_phone_number:
                        "1fa6b8d986d9b9cd01bf36951815158bbde9f520c0567c835dfe34783d0a4231".into()
                },
            ]
        );
        let digest = "355BE7E68E2F3A0CA64E397F0F811E6CC93FE253E4DFFD044605107AF99E9912";
        let c = accept(
            json!({"event": "purchase", "hashed_email": digest, "hashed_phone_number": digest}),
        );
        assert_eq!(
            c.identifiers[0],
            Identifier::HashedEmail {
                hashed_email: digest.to_lowercase()
            }
        );
        assert_eq!(
            c.identifiers[1],
            Identifier::HashedPhoneNumber {
                hashed_phone_number: digest.to_lowercase()
            }
        );
        // A digest in the raw field is passed through, never hashed twice.
        assert_eq!(
            accept(json!({"event": "purchase", "email": digest})).identifiers[0],
            Identifier::HashedEmail {
                hashed_email: digest.to_lowercase()
            }
        );

        let c = accept(
            json!({"event": "purchase", "event_source_url": "https://shop.example/p?utm_source=x&twclid=abc123&x=1"}),
        );
        assert_eq!(
            c.identifiers,
            [Identifier::Twclid {
                twclid: "abc123".into()
            }]
        );
        assert_eq!(
            c.event_source_url.as_deref(),
            Some("https://shop.example/p?utm_source=x&twclid=abc123&x=1")
        );
        let c = accept(
            json!({"event": "purchase", "twclid": "explicit", "event_source_url": "https://shop.example/?twclid=url"}),
        );
        assert_eq!(
            c.identifiers,
            [Identifier::Twclid {
                twclid: "explicit".into()
            }]
        );
    }

    #[test]
    fn identifier_errors_are_clear_and_never_echo_pii() {
        let e = reject(
            json!({"event": "purchase", "email": "jane.doe.secret@", "phone": "555-CALL-JANE-12345678"}),
        );
        assert_eq!(fields(&e), ["email", "phone"]);
        for err in &e {
            assert!(!err.message.contains("jane"), "{}", err.message);
        }
        let e = reject(json!({"event": "purchase", "hashed_email": "jane@example.com"}));
        assert_eq!(fields(&e), ["hashed_email"]);
        assert!(!e[0].message.contains("jane"));
        let e = reject(
            json!({"event": "purchase", "email": "a@example.com", "hashed_email": "0".repeat(64)}),
        );
        assert_eq!(fields(&e), ["hashed_email"]);
        assert_eq!(
            fields(&reject(json!({"event": "purchase", "email": 42}))),
            ["email"]
        );
    }

    #[test]
    fn empty_strings_are_absent_and_ip_ua_never_count_alone() {
        let e = reject(
            json!({"event": "purchase", "twclid": "", "email": "  ", "phone": "", "ip_address": "1.2.3.4", "user_agent": "Mozilla/5.0"}),
        );
        assert_eq!(fields(&e), ["identifiers"]);
        let c = accept(
            json!({"event": "purchase", "twclid": "t", "ip_address": " 2001:db8::1 ", "user_agent": " Mozilla/5.0 "}),
        );
        assert_eq!(
            c.identifiers[1],
            Identifier::Device {
                ip_address: Some("2001:db8::1".into()),
                user_agent: Some("Mozilla/5.0".into())
            }
        );
        // A bad IP address next to a strong identifier is left out, not fatal.
        let (c, dropped) = accept_dropping(
            json!({"event": "purchase", "twclid": "t", "ip_address": "1.2.3", "user_agent": "ua"}),
        );
        assert_eq!(fields(&dropped), ["ip_address"]);
        assert_eq!(
            c.identifiers[1],
            Identifier::Device {
                ip_address: None,
                user_agent: Some("ua".into())
            }
        );
        let c = accept(json!({"event": "purchase", "twclid": "t", "user_agent": "ua"}));
        assert_eq!(
            c.identifiers[1],
            Identifier::Device {
                ip_address: None,
                user_agent: Some("ua".into())
            }
        );
    }

    #[test]
    fn money_counts_text_and_contents() {
        let c = accept(json!({
            "event": "purchase", "twclid": "t", "value": 20, "price_currency": "eur", "number_items": 3,
            "description": " Pet supplies ",
            "contents": [{"content_id": 1, "content_name": "Blankets", "content_type": "Pet supplies", "content_price": 100, "num_items": "2", "content_group_id": "123"}]
        }));
        assert_eq!(c.value.as_deref(), Some("20.00"));
        assert_eq!(c.price_currency.as_deref(), Some("EUR"));
        assert_eq!(c.number_items, Some(3));
        assert_eq!(c.description.as_deref(), Some("Pet supplies"));
        let content = &c.contents.as_ref().unwrap()[0];
        assert_eq!(content.content_id.as_deref(), Some("1"));
        assert_eq!(content.num_items, Some(2));
        let wire = serde_json::to_string(&c).unwrap();
        assert!(wire.contains("\"content_price\":100.0"), "{wire}");
        assert_eq!(
            accept(json!({"event": "purchase", "twclid": "t", "value": "20.5"}))
                .value
                .as_deref(),
            Some("20.50")
        );

        let e = reject(json!({
            "event": "purchase", "twclid": "t", "value": "twenty", "price_currency": "ABC", "number_items": 0,
            "contents": [{"content_price": "free", "num_items": -1}], "event_source_url": "not a url"
        }));
        assert_eq!(
            fields(&e),
            [
                "event_source_url",
                "value",
                "price_currency",
                "number_items",
                "contents[0].content_price",
                "contents[0].num_items"
            ]
        );
        assert_eq!(
            fields(&reject(
                json!({"event": "purchase", "twclid": "t", "contents": {"a": 1}})
            )),
            ["contents"]
        );
    }

    #[test]
    fn numbers_are_kept_to_the_digit_or_refused() {
        // An integer id that fits 64 bits keeps its digits; a longer one cannot be kept exactly.
        let c = accept(
            json!({"event": "purchase", "twclid": "t", "conversion_id": 1234567890123456789u64}),
        );
        assert_eq!(c.conversion_id, "1234567890123456789");
        let long: Value = serde_json::from_str(
            r#"{"event": "purchase", "twclid": "t", "conversion_id": 123456789012345678901234567890}"#,
        )
        .unwrap();
        let errors = reject(long);
        assert_eq!(fields(&errors), ["conversion_id"]);
        assert!(
            errors[0].message.contains("send it as a string"),
            "{errors:?}"
        );
        assert_eq!(
            fields(&reject(
                json!({"event": "purchase", "twclid": "t", "conversion_id": 1.5})
            )),
            ["conversion_id"]
        );
        // A value that cannot carry two decimals, counts beyond 64 bits: refused, the field named.
        assert_eq!(
            fields(&reject(
                json!({"event": "purchase", "twclid": "t", "value": 1e27})
            )),
            ["value"]
        );
        assert_eq!(
            fields(&reject(
                json!({"event": "purchase", "twclid": "t", "number_items": 1e20,
                "contents": [{"content_id": "a", "num_items": 1e300}]})
            )),
            ["number_items", "contents[0].num_items"]
        );
        // Prices go out as plain digits with a decimal point.
        let c = accept(json!({"event": "purchase", "twclid": "t",
            "contents": [{"content_id": "a", "content_price": 1e16}, {"content_id": "b", "content_price": -0.0}]}));
        let wire = serde_json::to_string(&c).unwrap();
        assert!(
            wire.contains("\"content_price\":10000000000000000.0"),
            "{wire}"
        );
        assert!(wire.contains("\"content_price\":0.0"), "{wire}");
        assert!(!wire.contains("e+") && !wire.contains("-0.0"), "{wire}");
    }

    #[test]
    fn an_event_larger_than_max_event_bytes_is_rejected_naming_what_makes_it_large() {
        let errors =
            reject(json!({"event": "purchase", "twclid": "t", "description": "x".repeat(70_000)}));
        assert_eq!(fields(&errors), ["description"]);
        assert!(
            errors[0].message.contains("server.max_event_bytes (65536)"),
            "{errors:?}"
        );
        let contents: Vec<Value> = (0..2000)
            .map(|i| json!({"content_id": format!("item-{i}"), "content_name": "a blanket"}))
            .collect();
        assert_eq!(
            fields(&reject(
                json!({"event": "purchase", "twclid": "t", "contents": contents})
            )),
            ["contents"]
        );
        // Just under the bound: taken.
        accept(json!({"event": "purchase", "twclid": "t", "description": "x".repeat(60_000)}));
    }

    #[test]
    fn opt_out_suppresses_well_formed_events_and_requires_nothing() {
        for raw in [
            json!({"opt_out": true}),
            json!({"event": "purchase", "email": "jane@example.com", "opt_out": true}),
        ] {
            assert_eq!(
                map_event(&raw, &rules(&["acme"]), now()),
                Judgement::Suppressed {
                    account: Some("acme".into())
                },
                "{raw}"
            );
        }
        assert_eq!(
            map_event(&json!({"opt_out": true}), &rules(&["acme", "beta"]), now()),
            Judgement::Suppressed { account: None }
        );
        assert_eq!(
            fields(&reject_with(
                json!({"opt_out": true, "price_currency": 5}),
                &rules(&["acme", "beta"])
            )),
            ["price_currency"]
        );
        // A malformed field is an error whatever the consent.
        assert_eq!(
            fields(&reject(
                json!({"opt_out": true, "phone": 5, "contents": [{"num_items": -1}]})
            )),
            ["phone", "contents[0].num_items"]
        );
        assert_eq!(
            fields(&reject(json!({"opt_out": true, "event": "nope"}))),
            ["event"]
        );
        assert!(matches!(
            map_event(
                &json!({"event": "purchase", "twclid": "t", "opt_out": false}),
                &rules(&["acme"]),
                now()
            ),
            Judgement::Accepted { .. }
        ));
        assert_eq!(
            fields(&reject(
                json!({"event": "purchase", "twclid": "t", "opt_out": "yes"})
            )),
            ["opt_out"]
        );
        assert_eq!(fields(&reject(json!([1, 2]))), [""]);
    }

    #[test]
    fn conversion_id_is_kept_or_derived_stably() {
        assert_eq!(
            accept(json!({"event": "purchase", "twclid": "t", "conversion_id": "order-1"}))
                .conversion_id,
            "order-1"
        );
        assert_eq!(
            accept(json!({"event": "purchase", "twclid": "t", "conversion_id": 23294827}))
                .conversion_id,
            "23294827"
        );
        let a = json!({"event": "purchase", "twclid": "t", "value": 5});
        let b = json!({"value": 5, "twclid": "t", "event": "purchase"});
        let id = accept(a.clone()).conversion_id;
        assert!(id.starts_with("cg-") && id.len() == 35);
        assert_eq!(id, accept(b).conversion_id, "key order does not matter");
        // A defaulted time is not part of it: the same event a minute later keeps its id.
        match map_event(&a, &rules(&["acme"]), now() + chrono::Duration::minutes(1)) {
            Judgement::Accepted { conversion, .. } => assert_eq!(conversion.conversion_id, id),
            other => panic!("{other:?}"),
        }
        assert_ne!(
            id,
            accept(json!({"event": "purchase", "twclid": "t", "value": 6})).conversion_id
        );
    }

    fn arb_event() -> impl Strategy<Value = Value> {
        let opt = |s: BoxedStrategy<Value>| prop_oneof![Just(Value::Null), s].boxed();
        (
            opt(prop_oneof![
                Just(json!("purchase")),
                Just(json!("signup")),
                Just(json!("x")),
                Just(json!(""))
            ]
            .boxed()),
            opt("[a-z0-9]{0,8}".prop_map(Value::from).boxed()),
            opt("[ A-Za-z0-9@.]{0,20}".prop_map(Value::from).boxed()),
            opt("[ +0-9()-]{0,16}".prop_map(Value::from).boxed()),
            opt("[0-9a-fA-F]{60,66}".prop_map(Value::from).boxed()),
            opt(prop_oneof![
                Just(json!("https://s.example/?twclid=q")),
                Just(json!("https://s.example/?twclid=")),
                Just(json!("x"))
            ]
            .boxed()),
            opt(prop_oneof![Just(json!("1.2.3.4")), Just(json!(""))].boxed()),
        )
            .prop_map(|(event, twclid, email, phone, hashed, url, ip)| {
                let mut m = Map::new();
                for (k, v) in [
                    ("event", event),
                    ("twclid", twclid),
                    ("email", email),
                    ("phone", phone),
                    ("hashed_email", hashed),
                    ("event_source_url", url),
                    ("ip_address", ip),
                ] {
                    if !v.is_null() {
                        m.insert(k.to_string(), v);
                    }
                }
                Value::Object(m)
            })
    }

    proptest! {
        /// An accepted event always carries a strong identifier; a dropped identifier never reaches X
        /// (its field contributes nothing to the conversion); every identifier given is used, dropped or
        /// the reason for a rejection.
        #[test]
        fn dropped_identifiers_never_reach_x(
            email in prop_oneof![Just(None), Just(Some("jane@example.com")), Just(Some("jane(at)example")), Just(Some(""))],
            phone in prop_oneof![Just(None), Just(Some("+1 650 253 0000")), Just(Some("12")), Just(Some("555-1234"))],
            ip in prop_oneof![Just(None), Just(Some("203.0.113.7")), Just(Some("1.2.3"))],
            twclid in prop_oneof![Just(None), Just(Some("t"))],
        ) {
            let mut raw = json!({"event": "purchase"});
            for (k, v) in [("email", email), ("phone", phone), ("ip_address", ip), ("twclid", twclid)] {
                if let Some(v) = v {
                    raw[k] = json!(v);
                }
            }
            match map_event(&raw, &rules(&["acme"]), now()) {
                Judgement::Accepted { conversion, dropped, .. } => {
                    prop_assert!(conversion.identifiers.iter().any(Identifier::is_strong));
                    for d in &dropped {
                        let present = conversion.identifiers.iter().any(|i| match (d.field.as_str(), i) {
                            ("email" | "hashed_email", Identifier::HashedEmail { .. }) => true,
                            ("phone" | "hashed_phone_number", Identifier::HashedPhoneNumber { .. }) => true,
                            ("ip_address", Identifier::Device { ip_address, .. }) => ip_address.is_some(),
                            ("twclid", Identifier::Twclid { .. }) => true,
                            _ => false,
                        });
                        prop_assert!(!present, "{} was dropped yet sent: {:?}", d.field, conversion.identifiers);
                    }
                    let sent = conversion.identifiers.iter().map(|i| match i {
                        Identifier::Twclid { .. } => 1,
                        Identifier::HashedEmail { .. } | Identifier::HashedPhoneNumber { .. } => 1,
                        Identifier::Device { ip_address, user_agent } => ip_address.is_some() as usize + user_agent.is_some() as usize,
                    }).sum::<usize>();
                    let given = [email, phone, ip, twclid].iter().filter(|v| v.is_some_and(|v| !v.is_empty())).count();
                    prop_assert_eq!(sent + dropped.len(), given, "used + dropped = given");
                }
                Judgement::Rejected(errors) => {
                    prop_assert!(!errors.is_empty());
                    let strong_given = [(email, "jane@example.com"), (phone, "+1 650 253 0000"), (twclid, "t")]
                        .iter().any(|(v, good)| *v == Some(*good));
                    prop_assert!(!strong_given, "rejected with a good strong identifier: {:?}", errors);
                }
                Judgement::Suppressed { .. } => prop_assert!(false, "not opted out"),
            }
        }

        #[test]
        fn accepted_conversions_keep_the_wire_invariants(raw in arb_event()) {
            if let Judgement::Accepted { conversion, .. } = map_event(&raw, &rules(&["acme"]), now()) {
                prop_assert!(conversion.identifiers.iter().any(Identifier::is_strong));
                for id in &conversion.identifiers {
                    match id {
                        Identifier::Twclid { twclid } => prop_assert!(!twclid.is_empty()),
                        Identifier::HashedEmail { hashed_email: h } | Identifier::HashedPhoneNumber { hashed_phone_number: h } => {
                            prop_assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
                        }
                        Identifier::Device { ip_address, user_agent } => {
                            prop_assert!(ip_address.as_deref().is_none_or(|v| !v.is_empty()));
                            prop_assert!(user_agent.as_deref().is_none_or(|v| !v.is_empty()));
                            prop_assert!(ip_address.is_some() || user_agent.is_some());
                        }
                    }
                }
                // What the gateway sends passes X's own checks.
                let body = serde_json::to_vec(&crate::conversion::Batch { conversions: std::slice::from_ref(&conversion) }).unwrap();
                let pixels = ["o9d7n".to_string()].into();
                let scope = crate::x_contract::Scope { account_sets: None, pixels: &pixels };
                let checked = crate::x_contract::validate(&body, &scope);
                prop_assert!(checked.is_ok(), "{:?}", checked);
            }
        }
    }
}
