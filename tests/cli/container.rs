//! The container and the local stack. There is no Docker engine on this kind of machine, so the image
//! is not built here; instead the conditions it runs the gateway under are reproduced and tested: user
//! 65532, a read-only root file system with only the spool volume writable, and the `healthcheck`
//! subcommand as the health check. The Dockerfile, the compose file and the Prometheus configuration
//! they ship are checked for what the image and the stack rely on.

use crate::common::*;
use conversion_gateway::metrics::{Metrics, RedisSnapshot, SpoolSnapshot};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap()
}

#[test]
fn the_dockerfile_builds_a_hardened_image() {
    let d = read("Dockerfile");
    let stages: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "multi-stage: {stages:?}");
    assert!(
        stages[1].contains("gcr.io/distroless/cc-debian12:nonroot"),
        "{}",
        stages[1]
    );
    assert!(d.contains("cargo build --release --locked"));
    assert!(d.contains("USER 65532:65532"));
    assert!(d.contains("VOLUME /var/lib/conversion-gateway"));
    assert!(d.contains("GATEWAY_SPOOL__DIR=/var/lib/conversion-gateway"));
    let health = d
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<String>();
    assert!(
        health.contains("\"/usr/local/bin/conversion-gateway\"")
            && health.contains("\"healthcheck\""),
        "exec-form health check through the binary (no shell, no curl): {health}"
    );
    // Every path the image copies from the repository exists.
    for line in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            assert!(Path::new(ROOT).join(src).exists(), "{line}: {src} missing");
        }
    }
    for config in ["local.toml", "fake-x.toml", "fake-x-api.toml"] {
        assert!(Path::new(ROOT).join("config").join(config).exists());
    }
}

#[test]
fn the_compose_stack_and_prometheus_configuration_are_consistent() {
    let compose = read("docker-compose.yml");
    for needle in [
        "fake-x-api:",
        "gateway:",
        "prometheus:",
        "GATEWAY_UPSTREAM__BASE_URL: http://fake-x-api:18080",
        "./config/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
        "./config/alerts.yml:/etc/prometheus/alerts.yml:ro",
        "read_only: true",
        "condition: service_healthy",
    ] {
        assert!(
            compose.contains(needle),
            "docker-compose.yml lacks {needle:?}"
        );
    }
    // The shared profile: Redis durable and without eviction, three replicas on it.
    for needle in [
        "profiles: [\"shared\"]",
        "\"--appendonly\", \"yes\", \"--appendfsync\", \"always\", \"--maxmemory-policy\", \"noeviction\"",
        "replicas: 3",
        "GATEWAY_REDIS__URL: redis://redis:6379/0",
        "GATEWAY_SPOOL__BACKEND: redis",
        "GATEWAY_LIMITER__BACKEND: redis",
    ] {
        assert!(
            compose.contains(needle),
            "docker-compose.yml's shared profile lacks {needle:?}"
        );
    }
    assert!(read("config/prometheus.yml").contains("targets: [\"gateway:9090\"]"));
    let config = Path::new(ROOT).join("config/prometheus.yml");
    let out = Command::new(promtool())
        .args(["check", "config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The alerts name only metrics the gateway exports.
    let exported = Metrics::shared(["acme"]).render(&SpoolSnapshot {
        accounts: vec![("acme".into(), 0, None)],
        bytes: 0,
        bound: conversion_gateway::spool::BoundUsage {
            used_bytes: 0,
            max_bytes: 1 << 30,
        },
        writable: true,
        dead_letters: 0,
        dead_letters_evicted: 0,
        redis: Some(RedisSnapshot {
            up: true,
            durable: Some(1),
            held_here: vec![("acme".into(), 0)],
        }),
    });
    let alerts = read("config/alerts.yml");
    let names: HashSet<&str> = alerts
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("conversion_gateway_"))
        .collect();
    assert!(names.len() >= 4, "{names:?}");
    for name in names {
        assert!(
            exported.contains(&format!("\n{name}{{")) || exported.contains(&format!("\n{name} ")),
            "config/alerts.yml uses {name}, which /metrics does not export"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_uid_65532_on_a_read_only_root_with_only_the_spool_writable() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let (_fake, fake_port, fake_url) = start_fake(dir.path());
    let cfg = write(
        dir.path(),
        "gateway.toml",
        &gateway_config(port, admin, fake_port, "CANARY-consumer-secret"),
    );
    // The volume: a directory of its own, owned by the image's user.
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let chown = Command::new("chown")
        .args(["65532:65532"])
        .arg(&spool)
        .status()
        .unwrap();
    assert!(chown.success());
    let script = format!(
        "mount --make-rprivate / && mount --bind {spool} {spool} && mount -o remount,bind,ro / && \
         touch /cannot-write 2>/dev/null && exit 90; \
         cd / && exec setpriv --reuid 65532 --regid 65532 --clear-groups {GATEWAY} --config {cfg}",
        spool = spool.display(),
        cfg = cfg.display(),
    );
    let mut gateway = spawn(
        "unshare",
        &["--mount", "sh", "-c", &script],
        &[
            ("GATEWAY_SPOOL__DIR", spool.to_str().unwrap()),
            ("GATEWAY_LOG__LEVEL", "info"),
        ],
        dir.path().join("gateway.log"),
    );
    let ready = eventually(Duration::from_secs(10), async || {
        get_ok(&format!("http://127.0.0.1:{admin}/readyz")).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "the gateway did not start: {}",
        gateway.log_text()
    );

    let health = Command::new(GATEWAY)
        .args(["--config", cfg.to_str().unwrap(), "healthcheck"])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );

    let http = reqwest::Client::new();
    let events: Vec<Value> = (0..50)
        .map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("ro-{i}"), "conversion_id": format!("ro-{i}")}))
        .collect();
    let resp = post_events(
        &http,
        &format!("http://127.0.0.1:{port}/v1/events"),
        &json!({ "events": events }),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let want: HashSet<String> = (0..50).map(|i| format!("ro-{i}")).collect();
    wait_received(&http, &fake_url, &want, Duration::from_secs(20)).await;

    gateway.signal("TERM");
    let status = gateway.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}: {}", gateway.log_text());
    // Everything it wrote is in the spool, owned by its user.
    let written: Vec<_> = std::fs::read_dir(&spool).unwrap().flatten().collect();
    assert!(!written.is_empty());
    use std::os::unix::fs::MetadataExt;
    assert!(written.iter().all(|e| e.metadata().unwrap().uid() == 65532));
    assert!(!gateway.log_text().contains("Read-only file system"));
}
