//! The operator's dashboard (`config/grafana/dashboards/`) and alerts (`config/alerts.yml`) are checked: every
//! expression names only metrics the gateway exports, promtool accepts the rules, and `promtool test rules`
//! runs `config/alerts.test.yml`, in which every alert fires when it should and stays quiet otherwise.

use crate::common::promtool;
use conversion_gateway::metrics::{Metrics, RedisSnapshot, SpoolSnapshot};
use conversion_gateway::reasons::{DeadLetterReason, IngestOutcome, PauseReason};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn config(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(file)
}

/// Every metric family the gateway can export (shared mode, every recorder called once), with the series
/// names a histogram adds.
fn exported() -> BTreeSet<String> {
    let m = Metrics::shared(["acme"]);
    m.received(Some("acme"), IngestOutcome::Accepted, 1);
    m.identifier_dropped("acme", "phone");
    m.delivered("acme", 1);
    m.dead_lettered("acme", DeadLetterReason::Rejected, 1);
    m.upstream_request("acme", "200", 0.1, 10);
    m.paused("acme", Some(PauseReason::Unauthorized));
    m.rate_limit_delay("acme", 0.5);
    m.shed();
    m.connection_refused("ingest");
    m.auth_failed("ingest");
    m.set_inflight_body_bytes(10);
    m.http_request("/v1/events", 202, 0.001);
    let text = m.render(&SpoolSnapshot {
        accounts: vec![("acme".into(), 3, Some(1.0))],
        bytes: 10,
        bound: conversion_gateway::spool::BoundUsage {
            used_bytes: 10,
            max_bytes: 100,
        },
        writable: true,
        dead_letters: 1,
        dead_letters_evicted: 0,
        redis: Some(RedisSnapshot {
            up: true,
            durable: Some(1),
            held_here: vec![("acme".into(), 1)],
        }),
    });
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    assert!(names.len() > 20, "{names:?}");
    names
}

/// The metric names an expression uses: identifiers of the gateway's and the process's families.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = |p: &str| expr[i..].starts_with(p);
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (starts("conversion_gateway_") || starts("process_")) {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            out.push(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs(panel: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(targets) = panel["targets"].as_array() {
        out.extend(
            targets
                .iter()
                .filter_map(|t| t["expr"].as_str().map(str::to_owned)),
        );
    }
    for child in panel["panels"].as_array().into_iter().flatten() {
        dashboard_exprs(child, out);
    }
}

/// The `expr:` lines of the alert rules (one line each, as the file keeps them).
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(config("alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(a) = line.strip_prefix("- alert:") {
            alert = a.trim().to_owned();
        } else if let Some(e) = line.strip_prefix("expr:") {
            out.push((alert.clone(), e.trim().to_owned()));
        }
    }
    out
}

#[test]
fn every_expression_of_the_dashboard_and_the_alerts_names_an_exported_metric() {
    let exported = exported();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(config("grafana/dashboards/conversion-gateway.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        dashboard_exprs(panel, &mut exprs);
    }
    assert!(exprs.len() >= 20, "{} panel expressions", exprs.len());
    let alerts = alert_exprs();
    assert!(alerts.len() >= 8, "{alerts:?}");
    let mut unknown = Vec::new();
    for (place, expr) in exprs
        .iter()
        .map(|e| ("dashboard".to_string(), e.clone()))
        .chain(
            alerts
                .iter()
                .map(|(a, e)| (format!("alert {a}"), e.clone())),
        )
    {
        let used = metrics_in(&expr);
        assert!(!used.is_empty(), "{place}: {expr} names no metric");
        for m in used {
            if !exported.contains(&m) {
                unknown.push(format!("{place}: {m} in {expr}"));
            }
        }
    }
    assert!(unknown.is_empty(), "not exported: {unknown:#?}");
    // The check itself sees a typo.
    assert!(!exported.contains("conversion_gateway_events_delivred_total"));
    assert_eq!(
        metrics_in("rate(conversion_gateway_x_total[5m]) / process_open_fds"),
        ["conversion_gateway_x_total", "process_open_fds"]
    );
}

#[test]
fn promtool_accepts_the_rules_and_every_alert_passes_its_unit_tests() {
    let check = Command::new(promtool())
        .args(["check", "rules"])
        .arg(config("alerts.yml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new(promtool())
        .args(["test", "rules"])
        .arg(config("alerts.test.yml"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
    // Every alert has a case where it fires and one where it does not.
    let tests = std::fs::read_to_string(config("alerts.test.yml")).unwrap();
    for (alert, _) in alert_exprs() {
        let cases: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no case where it stays quiet"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{alert}: no case where it fires"
        );
    }
}
