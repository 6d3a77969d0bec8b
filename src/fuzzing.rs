//! The properties the fuzz targets check, one function per parser, shared by `fuzz/fuzz_targets/*` (libFuzzer,
//! coverage-guided) and the replay of the kept corpus at the bottom of this file (an ordinary,
//! deterministic unit test).
//!
//! # Contract
//! Each function takes arbitrary bytes and returns normally whatever they are; it panics only when the
//! parser broke a promise: a panic inside it, a non-deterministic answer, an accepted value that does not
//! survive its own encoding, or an accepted conversion that X's contract would refuse. No I/O, no clock.

use crate::conversion::event::{events_of, map_event, Judgement, Rules};
use crate::conversion::Batch;
use crate::spool::disk::intake_log::{decode_frames, encode_frame, scan_frames};
use crate::spool::{codec, DeadLetter};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::HashSet;

const PIXEL: &str = "o9d7n";

fn rules(accounts: &[&str]) -> Rules {
    Rules::example(accounts)
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 12, 0, 0)
        .single()
        .unwrap_or_default()
}

/// An ingest body through `events_of` and `map_event` (one account configured, and two): never a panic,
/// the same judgement twice, and every accepted conversion passes X's contract check.
pub fn ingest_body(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(events) = events_of(body) else {
        return;
    };
    let pixels: HashSet<String> = [PIXEL.to_string()].into();
    let scope = crate::x_contract::Scope {
        account_sets: None,
        pixels: &pixels,
    };
    for rules in [rules(&["acme"]), rules(&["acme", "beta"])] {
        for raw in &events {
            let judged = map_event(raw, &rules, now());
            assert_eq!(
                judged,
                map_event(raw, &rules, now()),
                "mapping is deterministic"
            );
            if let Judgement::Accepted { conversion, .. } = judged {
                let batch = Batch {
                    conversions: std::slice::from_ref(&conversion),
                };
                let body = serde_json::to_vec(&batch).expect("a conversion serializes");
                let checked = crate::x_contract::validate(&body, &scope);
                assert!(checked.is_ok(), "X would refuse {raw}: {checked:?}");
            }
        }
    }
}

/// A stored spool record: decoding never panics, and what decodes encodes to bytes that decode to a record
/// encoding to the same bytes (a fixed point: floats such as NaN make record equality the wrong test).
pub fn spool_record(data: &[u8]) {
    let Ok(record) = codec::decode("acme", data) else {
        return;
    };
    let Ok(once) = codec::encode(&record) else {
        return;
    };
    let again = codec::decode("acme", &once).expect("a record the codec wrote decodes");
    assert_eq!(
        codec::encode(&again).as_deref(),
        Ok(once.as_slice()),
        "re-encoding is stable"
    );
}

/// Intake-log frames: reading never panics, never reads past the data, reads back what it re-encodes, and the
/// damage scan finds no intact frame inside the part already read.
pub fn intake_frames(data: &[u8]) {
    let epoch = data
        .first_chunk::<8>()
        .map_or(0, |b| u64::from_le_bytes(*b));
    let (records, used) = decode_frames(epoch, data);
    assert!(used <= data.len());
    let scan = scan_frames(epoch, data);
    assert_eq!(
        scan.readable_end, used,
        "the scan starts where reading stops"
    );
    assert!(scan.later.iter().all(|at| *at > used && *at <= data.len()));
    let mut again = Vec::new();
    encode_frame(epoch, &records, &mut again);
    let (back, used_again) = decode_frames(epoch, &again);
    assert_eq!(back, records);
    assert_eq!(used_again, again.len());
}

/// A dead letter as the disk spool stores it (JSON): decoding never panics and round-trips.
pub fn dead_letter(data: &[u8]) {
    let Ok(letter) = serde_json::from_slice::<DeadLetter>(data) else {
        return;
    };
    let once = serde_json::to_vec(&letter).expect("a dead letter serializes");
    let again: DeadLetter = serde_json::from_slice(&once).expect("what was written reads back");
    assert_eq!(
        serde_json::to_vec(&again).ok().as_deref(),
        Some(once.as_slice())
    );
}

/// A configuration file: never a panic; an error always names what to fix.
pub fn config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = crate::config::load_str(text, std::iter::empty()) {
        assert!(!e.message.is_empty(), "an error says what is wrong");
    }
}

/// The fake's `Authorization: OAuth` parser: never a panic, and what it parses, written again, parses the same.
pub fn oauth_header(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(params) = crate::fake_x::oauth::parse_header(text) else {
        return;
    };
    let written = params
        .iter()
        .map(|(k, v)| {
            format!(
                "{}=\"{}\"",
                crate::fake_x::oauth::encode(k),
                crate::fake_x::oauth::encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let again = crate::fake_x::oauth::parse_header(&format!("OAuth {written}"));
    assert_eq!(again.as_ref(), Some(&params));
}

/// A target's property: arbitrary bytes in, a panic only for a broken promise.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("ingest_body", ingest_body),
    ("spool_record", spool_record),
    ("intake_frames", intake_frames),
    ("dead_letter", dead_letter),
    ("config_text", config_text),
    ("oauth_header", oauth_header),
];

/// The kept corpus (`fuzz/corpus/<target>/`), replayed through the same properties on every test run:
/// fast and deterministic. Inputs that once broke a parser are kept there too, named `regression-*`.
#[cfg(test)]
mod corpus {
    use super::TARGETS;
    use std::path::Path;

    #[test]
    fn every_target_replays_its_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (name, check) in TARGETS {
            let dir = root.join(name);
            let mut inputs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            inputs.sort();
            assert!(inputs.len() >= 2, "{name}: a corpus of at least two inputs");
            for input in inputs {
                let data = std::fs::read(&input).unwrap();
                let ran = std::panic::catch_unwind(|| check(&data));
                assert!(
                    ran.is_ok(),
                    "{name}: {} breaks its property",
                    input.display()
                );
            }
        }
    }

    /// The properties are not vacuous: a known-good input of each kind gets past the parser it targets.
    #[test]
    fn seeds_reach_past_their_parsers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let read = |p: &str| std::fs::read(root.join(p)).unwrap();
        assert!(crate::spool::codec::decode("acme", &read("spool_record/minimal")).is_ok());
        let body: serde_json::Value =
            serde_json::from_slice(&read("ingest_body/batch.json")).unwrap();
        assert_eq!(crate::conversion::event::events_of(body).unwrap().len(), 3);
        assert!(crate::fake_x::oauth::parse_header(
            std::str::from_utf8(&read("oauth_header/classic")).unwrap()
        )
        .is_some_and(|p| p.len() == 7));
        let frames = read("intake_frames/two_frames");
        let epoch = u64::from_le_bytes(frames[..8].try_into().unwrap());
        let (records, used) = crate::spool::disk::intake_log::decode_frames(epoch, &frames);
        assert_eq!((records.len(), used), (2, frames.len()));
    }
}
