//! The gateway binary's command line: check-config, refusal to start half-configured, the shipped
//! configurations, sandbox runs, and graceful shutdown.

mod common;
#[path = "cli/container.rs"]
mod container;
#[path = "cli/setup.rs"]
mod setup;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

fn check_config(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(GATEWAY);
    cmd.arg("check-config").args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_config_prints_redacted_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write(dir.path(), "cs", "SECRET-FROM-FILE\n");
    let cfg = write(
        dir.path(),
        "g.toml",
        &format!(
            r#"
[server]
api_keys = ["SECRET-API-KEY"]
[accounts.acme]
ad_account_id = "18ce552mlaq"
pixel_id = "o9d7n"
auth = {{ kind = "oauth1", consumer_key = "SECRET-CK", consumer_secret_file = "{}", access_token = "SECRET-AT", access_token_secret = "SECRET-ATS" }}
"#,
            secret_file.display()
        ),
    );
    let (code, out, err) = check_config(
        &["--config", cfg.to_str().unwrap()],
        &[
            ("GATEWAY_UPSTREAM__TIMEOUT", "3s"),
            // The shared mode's Redis URL holds a password: shown redacted, like every secret.
            (
                "GATEWAY_REDIS__URL",
                "redis://:SECRET-REDIS-PASSWORD@redis:6379/0",
            ),
            ("GATEWAY_LIMITER__BACKEND", "redis"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("timeout = \"3s\""), "{out}");
    assert!(
        out.contains("url = \"redis://:[REDACTED]@redis:6379/0\""),
        "{out}"
    );
    assert!(out.contains("[REDACTED]"));
    assert!(
        !out.contains("SECRET") && !err.contains("SECRET"),
        "{out}{err}"
    );
    // GATEWAY_CONFIG works like --config.
    let (code, out, _) = check_config(&[], &[("GATEWAY_CONFIG", cfg.to_str().unwrap())]);
    assert_eq!(code, 0);
    assert!(out.contains("ad_account_id = \"18ce552mlaq\""));
}

#[test]
fn bad_configuration_exits_1_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "g.toml", "[server]\napi_keys = [\"k\"]\n[delivery]\nmax_batch = 900\n[accounts.acme]\nad_account_id = \"a1\"\npixel_id = \"o9d7n\"\nauth = { kind = \"pixel_token\", token = \"t\" }\n");
    let (code, _, err) = check_config(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("delivery.max_batch"), "{err}");
    // `run` refuses the same way, before listening on anything.
    let out = Command::new(GATEWAY)
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("delivery.max_batch"));
    // Environment overrides are validated too.
    let ok = write(dir.path(), "ok.toml", "[server]\napi_keys = [\"k\"]\n[accounts.acme]\nad_account_id = \"a1\"\npixel_id = \"o9d7n\"\nauth = { kind = \"pixel_token\", token = \"t\" }\n");
    let (code, _, err) = check_config(
        &["--config", ok.to_str().unwrap()],
        &[("GATEWAY_ACCOUNTS__ACME__PIXEL_ID", "Not Base36")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("accounts.acme.pixel_id"), "{err}");
    let (code, _, err) = check_config(
        &[
            "--config",
            dir.path().join("missing.toml").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    let (code, _, err) = check_config(&[], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("server.api_keys") || err.contains("accounts"),
        "{err}"
    );
}

#[test]
fn shipped_configurations_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    for name in ["local.toml", "fake-x.toml"] {
        let (code, _, err) = check_config(&["--config", &format!("{root}/config/{name}")], &[]);
        assert_eq!(code, 0, "{name}: {err}");
    }
    // The production template differs only in where its secrets live.
    let (code, _, err) = check_config(&["--config", &format!("{root}/config/example.toml")], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("server.api_keys_file"), "{err}");
    let fake: conversion_gateway::fake_x::FakeConfig =
        toml::from_str(&std::fs::read_to_string(format!("{root}/config/fake-x-api.toml")).unwrap())
            .unwrap();
    assert_eq!(fake.accounts[0].pixels, ["o9d7n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_runs_without_credentials_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let root = env!("CARGO_MANIFEST_DIR");
    let gw = spawn(
        GATEWAY,
        &["--config", &format!("{root}/config/local.toml")],
        &[
            ("GATEWAY_SERVER__LISTEN", &format!("127.0.0.1:{port}")),
            (
                "GATEWAY_SERVER__ADMIN_LISTEN",
                &format!("127.0.0.1:{admin}"),
            ),
            ("GATEWAY_DELIVERY__LINGER", "50ms"),
            ("GATEWAY_LOG__FORMAT", "json"),
            (
                "GATEWAY_SPOOL__DIR",
                dir.path().join("spool").to_str().unwrap(),
            ),
            // Unroutable on purpose: sandbox mode must not even try.
            ("GATEWAY_UPSTREAM__BASE_URL", "http://127.0.0.1:9"),
        ],
        dir.path().join("gw.log"),
    );
    wait_http(&format!("http://127.0.0.1:{admin}/readyz"));
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/events"))
        .bearer_auth("dev-key")
        .json(
            &json!({"event": "purchase", "email": "someone@example.com", "conversion_id": "sb-1"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let line = eventually(Duration::from_secs(10), async || {
        gw.log_text()
            .lines()
            .find(|l| l.contains("upstream request"))
            .map(String::from)
    })
    .await
    .expect("the sandbox records the batch");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert!(
        v["debug_id"].as_str().unwrap().starts_with("sandbox-"),
        "{line}"
    );
    assert_eq!(v["batch_size"], 1);
    assert!(!gw.log_text().contains("someone@example.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_and_what_was_accepted_goes_out_after_restart() {
    let http = reqwest::Client::new();
    // A long linger: the partial batch is still waiting when SIGTERM comes.
    let mut stack = start_stack_with(
        "CANARY-consumer-secret",
        &[("GATEWAY_DELIVERY__LINGER", "1h")],
    );
    let events: Vec<Value> = (0..50).map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("c{i}"), "conversion_id": format!("s-{i}")})).collect();
    let resp = post_events(&http, &stack.ingest_url, &json!({ "events": events })).await;
    assert_eq!(resp.status(), 202);
    let started = std::time::Instant::now();
    let status = stack.stop_gateway("TERM");
    assert!(status.success(), "{status:?}\n{}", stack.gateway_logs());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exits within server.shutdown_timeout"
    );
    assert!(stack.gateway_logs().contains("shutdown requested"));
    assert!(
        fake_conversions(&http, &stack.fake_url).await.is_empty(),
        "nothing was sent yet"
    );
    stack.restart_gateway(
        "CANARY-consumer-secret",
        &[("GATEWAY_DELIVERY__LINGER", "100ms")],
    );
    let got = eventually(Duration::from_secs(15), async || {
        let c = fake_conversions(&http, &stack.fake_url).await;
        (c.len() >= 50).then_some(c)
    })
    .await
    .expect("the spooled events go out after the restart");
    assert_eq!(got.len(), 50);
}

/// Runs `conversion-gateway <args>` with `stdin`; (exit code, stdout, stderr).
fn run_with_stdin(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(GATEWAY)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A gateway that stops before reading (a configuration error) closes the pipe: not a failure here.
    let wrote = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = wrote {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn preview_shows_each_conversion_or_its_errors_and_sends_nothing() {
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.toml");
    let events = concat!(
        r#"{"event": "purchase", "email": "Preview.Person@Example.com", "phone": "(650) 253-0000", "conversion_id": "p-1", "value": 20}"#,
        "\n",
        r#"{"event": "purchase", "email": "not-an-email"}"#,
        "\n",
        r#"{"event": "signup", "twclid": "t", "opt_out": true}"#,
        "\n"
    );
    let (code, out, err) = run_with_stdin(&["--config", local, "preview"], events);
    assert_eq!(code, 1, "one event is rejected: {err}");
    assert!(err.contains("1 of 3 events would be rejected"), "{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            &report["accepted"],
            &report["suppressed"],
            &report["rejected"]
        ),
        (&json!(1), &json!(1), &json!(1))
    );
    let first = &report["events"][0];
    assert_eq!(first["outcome"], "accepted");
    assert_eq!(first["pixel_id"], "o9d7n");
    assert_eq!(first["conversion"]["event_id"], "o9d2g");
    assert_eq!(first["conversion"]["value"], "20.00");
    // SHA-256 of the normalized email and E.164 phone, never the raw values.
    assert_eq!(
        first["conversion"]["identifiers"][0]["hashed_email"],
        sha256_hex("preview.person@example.com")
    );
    assert_eq!(
        first["conversion"]["identifiers"][1]["hashed_phone_number"],
        sha256_hex("+16502530000")
    );
    assert!(!out.contains("Preview.Person") && !out.contains("253-0000"));
    assert_eq!(report["events"][1]["errors"][0]["field"], "email");
    assert_eq!(report["events"][2]["outcome"], "suppressed");

    let (code, out, _) = run_with_stdin(
        &["--config", local, "preview"],
        r#"{"events": [{"event": "signup", "twclid": "t"}]}"#,
    );
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = run_with_stdin(&["--config", local, "preview"], "not json");
    assert_eq!(code, 2);
    assert!(err.contains("not JSON"), "{err}");
    let (code, _, err) = run_with_stdin(&["--config", "/nonexistent.toml", "preview"], "{}");
    assert_eq!(code, 2, "{err}");
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_asks_the_running_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let cfg = write(
        dir.path(),
        "g.toml",
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"0.0.0.0:{admin}\"\napi_keys = [\"k\"]\n[upstream]\nsandbox = true\n\
             [accounts.acme]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\n"
        ),
    );
    let cfg = cfg.to_str().unwrap();
    let health = |extra: &[&str]| {
        let mut args = vec!["--config", cfg, "healthcheck", "--timeout", "2"];
        args.extend_from_slice(extra);
        Command::new(GATEWAY).args(&args).output().unwrap()
    };
    let out = health(&[]);
    assert_eq!(out.status.code(), Some(1), "nobody listens yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    let spool = dir.path().join("spool");
    let _gateway = spawn(
        GATEWAY,
        &["--config", cfg],
        &[("GATEWAY_SPOOL__DIR", spool.to_str().unwrap())],
        dir.path().join("gateway.log"),
    );
    wait_http(&format!("http://127.0.0.1:{admin}/readyz"));
    assert_eq!(health(&[]).status.code(), Some(0));
    assert_eq!(health(&["--live"]).status.code(), Some(0));
}
