//! openapi.yaml checked against the live gateway (fake-x-api behind it) by schemathesis: every default
//! check, every operation of the spec, on both listeners. schemathesis comes from PyPI into a virtualenv
//! under the target directory on first use (pinned, so runs are comparable).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const VERSION: &str = "4.32.5";
/// Seconds of generated requests per listener.
const SECONDS: &str = "30";

fn schemathesis() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("schemathesis-{VERSION}"));
    let bin = venv.join("bin/schemathesis");
    if bin.exists() {
        return bin;
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 -m venv failed (Debian: apt-get install python3-venv)"
    );
    let ok = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", &format!("schemathesis=={VERSION}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "pip install schemathesis=={VERSION} failed");
    bin
}

/// Runs schemathesis on the operations of one listener; answers (selected, tested) operations.
fn run(base_url: &str, key: &str, filter: &[&str]) -> (usize, usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Its working directory takes schemathesis' cache (.schemathesis/), kept out of the repository.
    let out = Command::new(schemathesis())
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .arg("--no-color")
        .arg("--config-file")
        .arg(root.join("tests/schemathesis/schemathesis.toml"))
        .arg("run")
        .arg(root.join("openapi.yaml"))
        .args(["--url", base_url])
        .args(["--header", &format!("Authorization: Bearer {key}")])
        .args(["--max-time", SECONDS])
        .args(filter)
        .output()
        .expect("schemathesis runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    let count = |label: &str| -> usize {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.trim().split('/').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in the output:\n{text}"))
    };
    (count("Selected:"), count("Tested:"))
}

#[test]
fn the_live_gateway_meets_its_openapi_contract() {
    // warn level: the generated requests would make trace logs huge.
    let stack = start_stack_with("CANARY-consumer-secret", &[("GATEWAY_LOG__LEVEL", "warn")]);
    let ingest_base = stack.ingest_url.trim_end_matches("/v1/events").to_owned();
    schemathesis(); // installed once, before the two runs
                    // The two listeners at once: each run is one Python process, and there are two cores.
    let admin_url = stack.admin_url.clone();
    let admin =
        std::thread::spawn(move || run(&admin_url, ADMIN_KEY, &["--exclude-path", "/v1/events"]));
    let (selected, tested) = run(&ingest_base, API_KEY, &["--include-path", "/v1/events"]);
    assert_eq!(
        (selected, tested),
        (1, 1),
        "the ingest operation was tested"
    );
    let (selected, tested) = admin.join().expect("the admin listener's run");
    assert_eq!(selected, tested, "every admin operation was tested");
    let in_spec = include_str!("../openapi.yaml")
        .lines()
        .filter(|l| {
            matches!(
                l.trim_end(),
                "    get:" | "    post:" | "    delete:" | "    put:" | "    patch:"
            )
        })
        .count();
    assert_eq!(
        1 + tested,
        in_spec,
        "every operation of the spec was tested"
    );
}
