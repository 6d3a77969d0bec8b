//! The mapping micro-benchmark: instructions per event of what ingest does to one event body — parse the
//! JSON, take its events (`events_of`), map each (`map_event`: validate, normalize, hash) — per payload
//! shape, counted by valgrind's callgrind (repeatable on shared machines, where timings are not).
//!
//! # How it counts
//! `bench --mapping` runs this binary under `valgrind --tool=callgrind --toggle-collect=*map_all*` twice per
//! shape, mapping `SMALL` and then `LARGE` events (bodies made beforehand, outside the counted function),
//! and reports (I(LARGE) − I(SMALL)) / (LARGE − SMALL): what one more event costs, without start-up and
//! first-use costs (the phone metadata is loaded once, on first use).

use conversion_gateway::conversion::event::{events_of, map_event, Judgement, Rules};
use std::path::Path;
use std::process::Command;

const SMALL: u64 = 200;
const LARGE: u64 = 1_200;

/// A payload shape: its name and the body of event `n`.
type Shape = (&'static str, fn(u64) -> String);

pub const SHAPES: [Shape; 4] = [
    ("email only", |n| {
        format!(
            r#"{{"event":"purchase","conversion_id":"bench-{n:012}","email":"Jane.Doe+{}@Example.com"}}"#,
            n % 1000
        )
    }),
    ("E.164 phone", |n| {
        format!(
            r#"{{"event":"purchase","conversion_id":"bench-{n:012}","phone":"+1 (650) 253-{:04}"}}"#,
            n % 10_000
        )
    }),
    ("national phone", |n| {
        format!(
            r#"{{"event":"purchase","conversion_id":"bench-{n:012}","phone":"(650) 253-{:04}"}}"#,
            n % 10_000
        )
    }),
    ("full event", super::event),
];

/// The child: maps `events` bodies of `shape` inside the one function callgrind counts.
pub fn run_child(shape: &str, events: u64) -> Result<(), String> {
    let make = SHAPES
        .iter()
        .find(|(name, _)| *name == shape)
        .map(|(_, f)| *f)
        .ok_or_else(|| format!("no shape {shape:?}"))?;
    let bodies: Vec<String> = (0..events).map(make).collect();
    let rules = Rules::example(&["shop"]);
    let accepted = map_all(&bodies, &rules);
    if accepted != bodies.len() {
        return Err(format!("{accepted} of {} events accepted", bodies.len()));
    }
    Ok(())
}

/// What ingest does to each body; the count of accepted events (so nothing is optimized away).
#[inline(never)]
fn map_all(bodies: &[String], rules: &Rules) -> usize {
    let now = chrono::Utc::now();
    let mut accepted = 0;
    for body in bodies {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body.as_bytes()) else {
            continue;
        };
        let Ok(events) = events_of(value) else {
            continue;
        };
        for raw in &events {
            if matches!(map_event(raw, rules, now), Judgement::Accepted { .. }) {
                accepted += 1;
            }
        }
    }
    accepted
}

/// Instructions per event of every shape.
pub fn measure(exe: &Path, scratch: &Path) -> Result<Vec<(&'static str, f64)>, String> {
    let valgrind = conversion_gateway::apt::ensure("valgrind", "valgrind")?;
    let mut out = Vec::new();
    for (shape, _) in SHAPES {
        let count = |events: u64| -> Result<u64, String> {
            let file = scratch.join(format!("callgrind-{events}.out"));
            let status = Command::new(&valgrind)
                .args(["--tool=callgrind", "--toggle-collect=*map_all*"])
                .arg(format!("--callgrind-out-file={}", file.display()))
                .arg(exe)
                .args(["--map-only", shape, "--events", &events.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("valgrind: {e}"))?;
            if !status.success() {
                return Err(format!("valgrind on {shape:?} exited {status}"));
            }
            let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("summary: ")
                        .or_else(|| l.strip_prefix("totals: "))
                })
                .and_then(|n| n.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| format!("no instruction count in {}", file.display()))
        };
        let (small, large) = (count(SMALL)?, count(LARGE)?);
        out.push((
            shape,
            large.saturating_sub(small) as f64 / (LARGE - SMALL) as f64,
        ));
    }
    Ok(out)
}
