//! First-party events, X conversions, and the pure mapping between them.
//!
//! Nothing here does I/O or reads a clock: `map_event` gets `now` from its caller, so every rule is
//! testable with fixed inputs. See `event` for the mapping, `identifiers` for normalization and hashing,
//! `values` for time and money formats, `wire` for what X receives.

pub mod event;
pub mod identifiers;
pub mod values;
pub mod wire;

pub use event::{
    derive_conversion_id, events_of, is_base36_id, map_event, AccountRules, FieldError, Judgement,
    Rules,
};
pub use wire::{json_len, Batch, Content, Conversion, Identifier, BATCH_ENVELOPE};

#[cfg(test)]
mod known_answers {
    //! Every case of `tests/vectors/identifiers.json` (a copy of `shared/vectors`, computed independently).
    use super::identifiers::*;
    use super::values::*;
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../../tests/vectors/identifiers.json"))
            .expect("vectors parse")
    }

    #[test]
    fn emails() {
        let v = vectors();
        for case in v["email"]["valid"].as_array().unwrap() {
            let input = case["input"].as_str().unwrap();
            assert_eq!(
                normalize_email(input).unwrap(),
                case["normalized"].as_str().unwrap(),
                "{input}"
            );
            assert_eq!(
                hashed_email(input).unwrap(),
                case["hashed_email"].as_str().unwrap(),
                "{input}"
            );
        }
        for bad in v["email"]["invalid"].as_array().unwrap() {
            assert!(hashed_email(bad.as_str().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn phones() {
        let v = vectors();
        for case in v["phone"]["valid"].as_array().unwrap() {
            let input = case["input"].as_str().unwrap();
            let region = case["default_region"].as_str().unwrap().parse().unwrap();
            assert_eq!(
                normalize_phone(input, region).unwrap(),
                case["e164"].as_str().unwrap(),
                "{input}"
            );
            assert_eq!(
                hashed_phone(input, region).unwrap(),
                case["hashed_phone_number"].as_str().unwrap(),
                "{input}"
            );
        }
        for bad in v["phone"]["invalid"].as_array().unwrap() {
            let bad = bad.as_str().unwrap();
            assert!(
                hashed_phone(bad, phonenumber::country::Id::US).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn prehashed_values() {
        for case in vectors()["prehashed"].as_array().unwrap() {
            let input = case["input"].as_str().unwrap();
            let want = case["expected"].as_str().unwrap();
            assert_eq!(hashed_email(input).unwrap(), want);
            assert_eq!(
                hashed_phone(input, phonenumber::country::Id::US).unwrap(),
                want
            );
            assert_eq!(prehashed(input).unwrap(), want);
        }
    }

    #[test]
    fn twclid_from_urls() {
        for case in vectors()["twclid_from_url"].as_array().unwrap() {
            let url = url::Url::parse(case["event_source_url"].as_str().unwrap()).unwrap();
            assert_eq!(
                twclid_from_url(&url).as_deref(),
                case["twclid"].as_str(),
                "{url}"
            );
        }
    }

    #[test]
    fn times() {
        let v = vectors();
        for case in v["conversion_time"]["valid"].as_array().unwrap() {
            let t = parse_time(case["input"].as_str().unwrap()).unwrap();
            assert_eq!(wire_time(t), case["conversion_time"].as_str().unwrap());
        }
        for bad in v["conversion_time"]["invalid_without_offset"]
            .as_array()
            .unwrap()
        {
            assert!(parse_time(bad.as_str().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn money_values() {
        for case in vectors()["value"].as_array().unwrap() {
            assert_eq!(
                money(&case["input"]).unwrap(),
                case["value"].as_str().unwrap(),
                "{}",
                case["input"]
            );
        }
    }

    #[test]
    fn vendored_vectors_match_shared() {
        let shared = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/vectors/identifiers.json"
        );
        if let Ok(text) = std::fs::read_to_string(shared) {
            let a: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                a,
                vectors(),
                "tests/vectors is out of date with shared/vectors"
            );
        }
    }
}
