//! The X wire types: what one conversion looks like in `{"conversions": [...]}`.
//!
//! Invariants (kept by `event::map_event`, the only producer): `identifiers` holds at least one strong
//! identifier (`twclid`, `hashed_email`, `hashed_phone_number`), no identifier value is empty, hashes are
//! 64 lower-case hex characters, `conversion_time` is `yyyy-MM-ddTHH:mm:ss.SSSZ`.

use serde::{Deserialize, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    pub conversion_time: String,
    pub event_id: String,
    pub identifiers: Vec<Identifier>,
    pub conversion_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number_items: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contents: Option<Vec<Content>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source_url: Option<String>,
}

impl Conversion {
    /// The smallest valid conversion: a time, a SET id, a click id and a conversion id.
    pub fn minimal(
        conversion_time: &str,
        event_id: &str,
        twclid: &str,
        conversion_id: &str,
    ) -> Self {
        Conversion {
            conversion_time: conversion_time.into(),
            event_id: event_id.into(),
            identifiers: vec![Identifier::Twclid {
                twclid: twclid.into(),
            }],
            conversion_id: conversion_id.into(),
            value: None,
            price_currency: None,
            number_items: None,
            description: None,
            contents: None,
            event_source_url: None,
        }
    }
}

/// One object of the `identifiers` array. Each strong identifier is its own object; IP address and
/// user agent travel together in one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Identifier {
    Twclid {
        twclid: String,
    },
    HashedEmail {
        hashed_email: String,
    },
    HashedPhoneNumber {
        hashed_phone_number: String,
    },
    Device {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip_address: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_agent: Option<String>,
    },
}

impl Identifier {
    /// Whether X counts it as the required identifier (IP and user agent never do).
    pub fn is_strong(&self) -> bool {
        !matches!(self, Identifier::Device { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "plain_price"
    )]
    pub content_price: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_items: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_group_id: Option<String>,
}

/// A price as X takes it: plain digits with a decimal point, never an exponent or a negative zero
/// (`1e16` -> `10000000000000000.0`, `-0.0` -> `0.0`, `20` -> `20.0`).
pub fn plain_decimal(price: f64) -> String {
    if price == 0.0 || !price.is_finite() {
        return "0.0".into();
    }
    // f64's Display is the shortest text that reads back as the same number, and never uses an exponent.
    let text = price.to_string();
    if text.contains('.') {
        text
    } else {
        format!("{text}.0")
    }
}

fn plain_price<S: Serializer>(price: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match price {
        None => s.serialize_none(),
        Some(p) => serde_json::value::RawValue::from_string(plain_decimal(*p))
            .map_err(serde::ser::Error::custom)?
            .serialize(s),
    }
}

/// Bytes of `{"conversions":[]}` around the conversions of a batch.
pub const BATCH_ENVELOPE: usize = 18;

impl Conversion {
    /// Its size in X's JSON (as it goes in a batch), without building the text.
    pub fn wire_len(&self) -> usize {
        json_len(self)
    }

    /// At least `wire_len`, from the strings' lengths alone (JSON writes a byte as six at most, and every
    /// key, bracket and number fits the fixed allowances): callers skip the exact count when even this
    /// fits.
    pub fn wire_len_at_most(&self) -> usize {
        // Keys and punctuation: the conversion's own, an identifier's, a content's; a number's digits
        // (a price is written in plain digits: an f64 needs at most 309 of them and a decimal part).
        const CONVERSION: usize = 256;
        const IDENTIFIER: usize = 64;
        const CONTENT: usize = 128;
        const NUMBER: usize = 400;
        let s = |x: &str| 6 * x.len();
        let o = |x: &Option<String>| x.as_deref().map_or(0, s);
        let identifiers: usize = self
            .identifiers
            .iter()
            .map(|i| {
                IDENTIFIER
                    + match i {
                        Identifier::Twclid { twclid } => s(twclid),
                        Identifier::HashedEmail { hashed_email } => s(hashed_email),
                        Identifier::HashedPhoneNumber {
                            hashed_phone_number,
                        } => s(hashed_phone_number),
                        Identifier::Device {
                            ip_address,
                            user_agent,
                        } => o(ip_address) + o(user_agent),
                    }
            })
            .sum();
        let contents: usize = self
            .contents
            .iter()
            .flatten()
            .map(|c| {
                CONTENT
                    + 2 * NUMBER
                    + o(&c.content_id)
                    + o(&c.content_name)
                    + o(&c.content_type)
                    + o(&c.content_group_id)
            })
            .sum();
        CONVERSION
            + NUMBER
            + s(&self.conversion_time)
            + s(&self.event_id)
            + s(&self.conversion_id)
            + o(&self.value)
            + o(&self.price_currency)
            + o(&self.description)
            + o(&self.event_source_url)
            + identifiers
            + contents
    }
}

/// The length of `value`'s JSON, counted as it is written.
pub fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing into a counter cannot fail, and every wire type serializes.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The request body X expects.
#[derive(Debug, Serialize)]
pub struct Batch<'a> {
    pub conversions: &'a [Conversion],
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        // Any Unicode, control characters and quotes included (the ones JSON escapes longest).
        prop_oneof![
            any::<String>(),
            "[\u{0}-\u{1f}\"\\\\]{0,40}",
            "[a-f0-9]{64}"
        ]
    }

    fn identifier() -> impl Strategy<Value = Identifier> {
        prop_oneof![
            text().prop_map(|twclid| Identifier::Twclid { twclid }),
            text().prop_map(|hashed_email| Identifier::HashedEmail { hashed_email }),
            text().prop_map(|hashed_phone_number| Identifier::HashedPhoneNumber {
                hashed_phone_number
            }),
            (proptest::option::of(text()), proptest::option::of(text())).prop_map(
                |(ip_address, user_agent)| Identifier::Device {
                    ip_address,
                    user_agent
                }
            ),
        ]
    }

    fn content() -> impl Strategy<Value = Content> {
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(any::<f64>()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(text()),
        )
            .prop_map(|(id, name, kind, price, n, group)| Content {
                content_id: id,
                content_name: name,
                content_type: kind,
                content_price: price,
                num_items: n,
                content_group_id: group,
            })
    }

    fn conversion() -> impl Strategy<Value = Conversion> {
        (
            (text(), text(), text()),
            proptest::collection::vec(identifier(), 0..4),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(any::<u64>()),
            ),
            proptest::option::of(text()),
            proptest::option::of(proptest::collection::vec(content(), 0..4)),
            proptest::option::of(text()),
        )
            .prop_map(
                |((time, event, id), identifiers, (value, currency, n), desc, contents, url)| {
                    Conversion {
                        conversion_time: time,
                        event_id: event,
                        identifiers,
                        conversion_id: id,
                        value,
                        price_currency: currency,
                        number_items: n,
                        description: desc,
                        contents,
                        event_source_url: url,
                    }
                },
            )
    }

    proptest! {
        /// The cheap bound is never below the exact size, so skipping the exact count is safe.
        #[test]
        fn the_bound_is_never_below_the_size(c in conversion()) {
            prop_assert!(c.wire_len() <= c.wire_len_at_most(), "{} > {}", c.wire_len(), c.wire_len_at_most());
        }
    }

    #[test]
    fn the_extremes_fit_the_bound() {
        let mut c = Conversion::minimal("\u{0}", "\"", "\\", "\u{1f}");
        c.number_items = Some(u64::MAX);
        c.contents = Some(vec![Content {
            content_price: Some(f64::MAX),
            num_items: Some(u64::MAX),
            ..Content::default()
        }]);
        assert!(c.wire_len() <= c.wire_len_at_most());
        assert!(plain_decimal(f64::MAX).len() < 400);
    }
}
