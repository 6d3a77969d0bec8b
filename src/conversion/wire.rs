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
