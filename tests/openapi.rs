//! openapi.yaml describes every route the routers serve, with the statuses the ingest route answers.

const SPEC: &str = include_str!("../openapi.yaml");
const ROUTERS: &str = include_str!("../src/api/mod.rs");

#[test]
fn every_router_path_is_in_the_spec() {
    let paths: Vec<&str> = ROUTERS
        .split(".route(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
        .collect();
    assert!(
        paths.contains(&"/v1/events") && paths.contains(&"/readyz"),
        "{paths:?}"
    );
    for path in paths {
        assert!(
            SPEC.contains(&format!("\n  {path}:\n")),
            "{path} is served but missing from openapi.yaml"
        );
    }
}

#[test]
fn ingest_statuses_are_documented() {
    let ingest = SPEC
        .split("\n  /v1/events:\n")
        .nth(1)
        .unwrap()
        .split("\n  /livez:")
        .next()
        .unwrap();
    for status in ["202", "400", "401", "405", "413", "415", "422", "503"] {
        assert!(ingest.contains(&format!("'{status}':")), "{status} missing");
    }
    assert!(SPEC.starts_with("openapi: 3.1"));
}
