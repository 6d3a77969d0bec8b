//! The fuzz targets' kept corpus (`fuzz/corpus/<target>/`), replayed through the same properties
//! (`conversion_gateway::fuzzing`) as an ordinary test: fast and deterministic, so CI runs it on every
//! commit. Inputs that once broke a parser are kept there too, named `regression-*`.

use conversion_gateway::fuzzing::TARGETS;
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
    assert!(
        conversion_gateway::spool::codec::decode("acme", &read("spool_record/minimal")).is_ok()
    );
    let body: serde_json::Value = serde_json::from_slice(&read("ingest_body/batch.json")).unwrap();
    assert_eq!(
        conversion_gateway::conversion::event::events_of(body)
            .unwrap()
            .len(),
        3
    );
    assert!(conversion_gateway::fake_x::oauth::parse_header(
        std::str::from_utf8(&read("oauth_header/classic")).unwrap()
    )
    .is_some_and(|p| p.len() == 7));
    let frames = read("intake_frames/two_frames");
    let epoch = u64::from_le_bytes(frames[..8].try_into().unwrap());
    let (records, used) =
        conversion_gateway::spool::disk::intake_log::decode_frames(epoch, &frames);
    assert_eq!((records.len(), used), (2, frames.len()));
}
