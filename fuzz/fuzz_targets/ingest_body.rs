//! `conversion_gateway::fuzzing::ingest_body`: the property lives in the library, shared with the corpus replay test.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| conversion_gateway::fuzzing::ingest_body(data));
