//! openapi.yaml describes every route the routers serve, with the statuses each answers.

const SPEC: &str = include_str!("../../openapi.yaml");
/// The files that define the two routers.
const ROUTERS: [&str; 2] = [
    include_str!("../../src/api/mod.rs"),
    include_str!("../../src/api/admin.rs"),
];

/// The spec's text for one path, up to the next path.
fn path_section(path: &str) -> &'static str {
    let rest = SPEC
        .split(&format!("\n  {path}:\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("{path} missing from openapi.yaml"));
    let end = rest
        .match_indices("\n  /")
        .next()
        .map_or(rest.len(), |(i, _)| i);
    let end = end.min(rest.find("\ncomponents:").unwrap_or(rest.len()));
    &rest[..end]
}

#[test]
fn every_router_path_is_in_the_spec() {
    let paths: Vec<&str> = ROUTERS
        .iter()
        .flat_map(|src| src.split(".route(").skip(1))
        .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
        .collect();
    for expected in [
        "/v1/events",
        "/livez",
        "/readyz",
        "/metrics",
        "/v1/accounts",
        "/v1/dead-letters",
        "/v1/dead-letters/replay",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} not found in {paths:?}"
        );
    }
    for path in paths {
        assert!(
            SPEC.contains(&format!("\n  {path}:\n")),
            "{path} is served but missing from openapi.yaml"
        );
    }
}

#[test]
fn statuses_are_documented() {
    let cases: &[(&str, &[&str])] = &[
        (
            "/v1/events",
            &["202", "400", "401", "405", "413", "415", "422", "503"],
        ),
        ("/readyz", &["200", "503"]),
        ("/v1/accounts", &["200", "401", "403", "503"]),
        (
            "/v1/dead-letters",
            &["200", "400", "401", "403", "404", "503"],
        ),
        (
            "/v1/dead-letters/replay",
            &["200", "400", "401", "403", "404", "503"],
        ),
    ];
    for (path, statuses) in cases {
        let section = path_section(path);
        for status in *statuses {
            assert!(
                section.contains(&format!("'{status}':")),
                "{path}: {status} missing"
            );
        }
    }
    assert!(path_section("/v1/dead-letters").contains("\n    delete:\n"));
    assert!(SPEC.starts_with("openapi: 3.1"));
}
