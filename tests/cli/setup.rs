//! `doctor`, `events create` and `events list` against fake-x-api: each pass and each failure the setup
//! guide describes, in the text a person reads and the JSON a script reads.

use super::common::{write, GATEWAY};
use conversion_gateway::fake_x::{app, FakeConfig, FakeX};
use conversion_gateway::redis_store::server::RedisServer;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// The fake's accounts: `18ce552mlaq` with tags and users of several permissions; `5kx2bq9t0a` of an
/// app without Ads API access.
const FAKE: &str = r#"
[[accounts]]
id = "18ce552mlaq"
pixels = ["o9d7n"]
events = ["o9d2g", "o9d2h", "o9d2i", "o9d2j", "o9d2k"]
oauth = { consumer_key = "ck-shop", consumer_secret = "CANARY-cs-shop", access_token = "CANARY-at-shop", access_token_secret = "CANARY-ats-shop" }
users = [
  { user_id = "1001", access_token = "CANARY-at-analyst", access_token_secret = "CANARY-ats-analyst", permissions = ["CAMPAIGN_ANALYST", "TWEET_COMPOSER"] },
  { user_id = "1002", access_token = "CANARY-at-manager", access_token_secret = "CANARY-ats-manager", permissions = ["AD_MANAGER"] },
]
tags = [
  { id = "o9d2g", name = "Purchase", type = "PURCHASE", status = "TRACKING", last_tracked_at = "2026-11-30T09:00:00Z" },
  { id = "o9d2h", name = "Sign up", type = "SIGN_UP" },
  { id = "o9d2i", name = "Cart", type = "ADD_TO_CART" },
  { id = "o9d2j", name = "Search", type = "SEARCH" },
  { id = "o9d2k", name = "Trial", type = "START_TRIAL" },
]

[[accounts]]
id = "5kx2bq9t0a"
pixels = ["p4x1l"]
events = ["e1v2t"]
oauth = { consumer_key = "ck-noads", consumer_secret = "CANARY-cs-noads", access_token = "CANARY-at-noads", access_token_secret = "CANARY-ats-noads", ads_api_access = false }
pixel_token = "CANARY-pixel-token"
"#;

/// Every secret the configurations hold: none may be printed.
const CANARIES: &str = "CANARY-";

/// fake-x-api on a free port of this process; `edit` changes its configuration first.
async fn serve_fake(edit: impl FnOnce(&mut FakeConfig)) -> (String, Arc<FakeX>) {
    let mut config: FakeConfig = toml::from_str(FAKE).unwrap();
    edit(&mut config);
    let fake = FakeX::new(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = app(fake.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, fake)
}

fn oauth(ck: &str, cs: &str, at: &str, ats: &str) -> String {
    format!(
        r#"{{ kind = "oauth1", consumer_key = "{ck}", consumer_secret = "{cs}", access_token = "{at}", access_token_secret = "{ats}" }}"#
    )
}

fn shop_auth() -> String {
    oauth(
        "ck-shop",
        "CANARY-cs-shop",
        "CANARY-at-shop",
        "CANARY-ats-shop",
    )
}

/// A gateway configuration with `accounts` (TOML tables) against the fake at `url`.
fn gateway_config(dir: &Path, url: &str, accounts: &str) -> String {
    let spool = dir.join("spool");
    write(
        dir,
        "gateway.toml",
        &format!(
            "[server]\nallow_unauthenticated = true\n[spool]\ndir = \"{}\"\n[upstream]\nbase_url = \"{url}\"\ntimeout = \"3s\"\n{accounts}",
            spool.display()
        ),
    )
    .display()
    .to_string()
}

/// Runs the gateway binary with `args`: exit code, stdout, stderr. Blocking, off the runtime's threads.
async fn run(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(GATEWAY)
            .args(&args)
            .env_remove("GATEWAY_CONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stdout.contains(CANARIES) && !stderr.contains(CANARIES),
        "a secret was printed:\n{stdout}\n{stderr}"
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

/// `doctor --json`: exit code and the report.
async fn doctor_json(config: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["doctor", "--config", config, "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args).await;
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, report)
}

/// The line `check` of account `account` (or of the gateway when `None`).
fn line<'a>(report: &'a Value, account: Option<&str>, check: &str) -> &'a Value {
    let lines = match account {
        Some(a) => report["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == a)
            .unwrap_or_else(|| panic!("no account {a} in {report:#}"))["checks"]
            .as_array()
            .unwrap(),
        None => report["gateway"].as_array().unwrap(),
    };
    lines
        .iter()
        .find(|l| l["check"] == check)
        .unwrap_or_else(|| panic!("no line {check} for {account:?} in {report:#}"))
}

fn status<'a>(report: &'a Value, account: Option<&str>, check: &str) -> &'a str {
    line(report, account, check)["status"].as_str().unwrap()
}

/// `events list --json` of the account `shop`.
async fn tags_listed(config: &str) -> Vec<Value> {
    let (code, out, err) = run(&[
        "events",
        "list",
        "--config",
        config,
        "--account",
        "shop",
        "--json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_right_setup_and_prints_each_line() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _fake) = serve_fake(|_| {}).await;
    let config = gateway_config(
        dir.path(),
        &url,
        &format!(
            "[accounts.shop]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ purchase = \"o9d2g\", signup = \"o9d2h\" }}\nauth = {}\n",
            shop_auth()
        ),
    );
    let (code, out, err) = run(&["doctor", "--config", &config]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    for expected in [
        "account shop (ad account 18ce552mlaq, pixel o9d7n)",
        "is ACCOUNT_ADMIN on ad account 18ce552mlaq",
        "o9d2g: PURCHASE tag \"Purchase\", TRACKING, last tracked 2026-11-30T09:00:00Z",
        "o9d2h: SIGN_UP tag \"Sign up\", UNVERIFIED, never tracked",
        "o9d7n is the pixel the account's tags report to",
        "this machine's clock is within",
        "is writable",
        "0 failed",
    ] {
        assert!(out.contains(expected), "{expected:?} not in\n{out}");
    }
    let (code, report) = doctor_json(&config, &[]).await;
    assert_eq!(code, 0);
    assert_eq!(report["ok"], true);
    for check in ["credentials", "event purchase", "event signup", "pixel"] {
        assert_eq!(status(&report, Some("shop"), check), "pass", "{check}");
    }
    assert_eq!(
        line(&report, Some("shop"), "event purchase")["tag"]["status"],
        "TRACKING"
    );
    for check in ["configuration", "clock", "spool"] {
        assert_eq!(status(&report, None, check), "pass", "{check}");
    }
    assert_eq!(status(&report, None, "redis"), "skip");
    assert_eq!(report["summary"]["failed"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_every_setup_mistake_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _fake) = serve_fake(|_| {}).await;
    let account = |name: &str, ad: &str, pixel: &str, events: &str, auth: &str| {
        format!("[accounts.{name}]\nad_account_id = \"{ad}\"\npixel_id = \"{pixel}\"\nevents = {{ {events} }}\nauth = {auth}\n")
    };
    let accounts = [
        account(
            "analyst",
            "18ce552mlaq",
            "o9d7n",
            "purchase = \"o9d2g\"",
            &oauth(
                "ck-shop",
                "CANARY-cs-shop",
                "CANARY-at-analyst",
                "CANARY-ats-analyst",
            ),
        ),
        account(
            "manager",
            "18ce552mlaq",
            "o9d7n",
            "purchase = \"o9d2g\"",
            &oauth(
                "ck-shop",
                "CANARY-cs-shop",
                "CANARY-at-manager",
                "CANARY-ats-manager",
            ),
        ),
        account(
            "badsecret",
            "18ce552mlaq",
            "o9d7n",
            "purchase = \"o9d2g\"",
            &oauth(
                "ck-shop",
                "CANARY-wrong",
                "CANARY-at-shop",
                "CANARY-ats-shop",
            ),
        ),
        account(
            "otheraccount",
            "5kx2bq9t0a",
            "p4x1l",
            "lead = \"e1v2t\"",
            &shop_auth(),
        ),
        account(
            "noaccount",
            "zzzzzzzzzz",
            "o9d7n",
            "purchase = \"o9d2g\"",
            &shop_auth(),
        ),
        account(
            "noads",
            "5kx2bq9t0a",
            "p4x1l",
            "lead = \"e1v2t\"",
            &oauth(
                "ck-noads",
                "CANARY-cs-noads",
                "CANARY-at-noads",
                "CANARY-ats-noads",
            ),
        ),
        account(
            "typos",
            "18ce552mlaq",
            "abcde",
            "purchase = \"o9d2g\", lead = \"zzzzz\"",
            &shop_auth(),
        ),
        account(
            "pixeltoken",
            "5kx2bq9t0a",
            "p4x1l",
            "lead = \"e1v2t\"",
            "{ kind = \"pixel_token\", token = \"CANARY-pixel-token\" }",
        ),
    ]
    .concat();
    let config = gateway_config(dir.path(), &url, &accounts);
    let (code, report) =
        doctor_json(&config, &["--event-id", "o9d2j", "--event-id", "qqqqq"]).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["ok"], false);
    let detail = |a: &str, c: &str| {
        line(&report, Some(a), c)["detail"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let fix = |a: &str, c: &str| {
        line(&report, Some(a), c)["fix"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };

    // A user without the permission the Conversions API needs: what it holds, and who can grant it.
    assert_eq!(status(&report, Some("analyst"), "credentials"), "fail");
    assert!(detail("analyst", "credentials").contains("holds CAMPAIGN_ANALYST, TWEET_COMPOSER"));
    assert!(fix("analyst", "credentials").contains("Ad Manager"));
    assert_eq!(status(&report, Some("manager"), "credentials"), "pass");
    assert!(detail("manager", "credentials").contains("AD_MANAGER"));
    // 401: the credentials; their keys named, never shown.
    assert_eq!(status(&report, Some("badsecret"), "credentials"), "fail");
    assert!(detail("badsecret", "credentials").contains("401"));
    assert!(fix("badsecret", "credentials").contains("accounts.badsecret.auth.consumer_key"));
    assert_eq!(status(&report, Some("badsecret"), "event purchase"), "skip");
    // 404: a user of another account, and an account X does not know.
    assert!(detail("otheraccount", "credentials").contains("no access to ad account 5kx2bq9t0a"));
    assert!(fix("otheraccount", "credentials").contains("add the user to ad account 5kx2bq9t0a"));
    assert!(detail("noaccount", "credentials").contains("X knows no ad account zzzzzzzzzz"));
    assert!(fix("noaccount", "credentials").contains("accounts.noaccount.ad_account_id"));
    // 403: the app has no Ads API access.
    assert!(detail("noads", "credentials").contains("no Ads API access (403 UNAUTHORIZED_CLIENT)"));
    // A SET id of no tag of the account, a pixel its tags do not report to, a caller's event_id.
    assert_eq!(status(&report, Some("typos"), "credentials"), "pass");
    assert_eq!(status(&report, Some("typos"), "event purchase"), "pass");
    assert_eq!(status(&report, Some("typos"), "event lead"), "fail");
    assert!(detail("typos", "event lead")
        .contains("zzzzz is not a Single Event Tag of ad account 18ce552mlaq"));
    assert!(fix("typos", "event lead").contains("events create --account typos --name lead"));
    assert_eq!(status(&report, Some("typos"), "pixel"), "fail");
    assert!(detail("typos", "pixel").contains("its tags report to o9d7n"));
    assert_eq!(status(&report, Some("typos"), "event_id o9d2j"), "pass");
    assert_eq!(status(&report, Some("typos"), "event_id qqqqq"), "fail");
    // A pixel token: what cannot be asked is skipped, saying why, and fails nothing.
    for check in ["credentials", "event lead", "pixel"] {
        assert_eq!(status(&report, Some("pixeltoken"), check), "skip");
        assert!(detail("pixeltoken", check).contains("pixel token"));
    }
    // Every failed line says what to do.
    for a in report["accounts"].as_array().unwrap() {
        for l in a["checks"].as_array().unwrap() {
            if l["status"] == "fail" {
                assert!(l["fix"].is_string(), "no fix: {l}");
            }
        }
    }
    assert_eq!(report["summary"]["failed"], 10, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_pages_through_every_tag() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _fake) = serve_fake(|_| {}).await;
    let config = gateway_config(
        dir.path(),
        &url,
        &format!(
            "[accounts.shop]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ first = \"o9d2g\", last = \"o9d2k\" }}\nauth = {}\n",
            shop_auth()
        ),
    );
    let settings =
        conversion_gateway::config::load(Some(Path::new(&config)), std::iter::empty()).unwrap();
    use conversion_gateway::setup::doctor::{run, Options};
    // Two tags a page: the last tag is on the third page.
    let report = run(
        &settings,
        &Options {
            event_ids: Vec::new(),
            page_size: Some(2),
        },
    )
    .await;
    let lines = &report.accounts[0].checks;
    let of = |c: &str| lines.iter().find(|l| l.check == c).unwrap();
    assert_eq!(of("event last").tag.as_ref().unwrap().name, "Trial");
    assert!(report.ok, "{}", report.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_a_clock_x_would_refuse_and_says_so_for_the_401() {
    let dir = tempfile::tempdir().unwrap();
    // X's clock 400 s ahead: beyond its OAuth timestamp window (300 s) as well as the doctor's minute.
    let (url, _fake) = serve_fake(|c| c.clock_offset_secs = 400).await;
    let config = gateway_config(
        dir.path(),
        &url,
        &format!(
            "[accounts.shop]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nauth = {}\n",
            shop_auth()
        ),
    );
    let (code, report) = doctor_json(&config, &[]).await;
    assert_eq!(code, 1);
    let clock = line(&report, None, "clock");
    assert_eq!(clock["status"], "fail");
    let detail = clock["detail"].as_str().unwrap();
    assert!(detail.contains("s behind X's"), "{detail}");
    assert!(clock["fix"].as_str().unwrap().contains("NTP"));
    let credentials = line(&report, Some("shop"), "credentials");
    assert_eq!(credentials["status"], "fail");
    assert!(credentials["fix"].as_str().unwrap().contains("clock"));

    // 100 s behind: inside X's window, outside a minute: the clock fails, the credentials work.
    let (url, _fake) = serve_fake(|c| c.clock_offset_secs = -100).await;
    let config = gateway_config(
        dir.path(),
        &url,
        &format!(
            "[accounts.shop]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nauth = {}\n",
            shop_auth()
        ),
    );
    let (_, report) = doctor_json(&config, &[]).await;
    assert!(line(&report, None, "clock")["detail"]
        .as_str()
        .unwrap()
        .contains("ahead of X's"));
    assert_eq!(status(&report, Some("shop"), "credentials"), "pass");
    // No event names: a warning, which fails nothing by itself.
    assert_eq!(status(&report, Some("shop"), "events"), "warn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_spool_directory_and_redis() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _fake) = serve_fake(|_| {}).await;
    let blocker = write(dir.path(), "a-file", "not a directory");
    let account = format!(
        "[accounts.shop]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ purchase = \"o9d2g\" }}\nauth = {}\n",
        shop_auth()
    );
    // spool.dir under a file: cannot be created.
    let config = write(
        dir.path(),
        "unwritable.toml",
        &format!(
            "[server]\nallow_unauthenticated = true\n[spool]\ndir = \"{}/spool\"\n[upstream]\nbase_url = \"{url}\"\n{account}",
            blocker.display()
        ),
    );
    let (code, report) = doctor_json(config.to_str().unwrap(), &[]).await;
    assert_eq!(code, 1);
    assert_eq!(status(&report, None, "spool"), "fail");
    assert!(line(&report, None, "spool")["detail"]
        .as_str()
        .unwrap()
        .contains("is not writable"));

    // Redis: durable passes; one that acknowledges before fsync fails; one that is not there fails.
    let durable = RedisServer::start();
    let everysec = RedisServer::start_with(&["--appendfsync", "everysec"]);
    let gone = format!(
        "redis://127.0.0.1:{}/0",
        conversion_gateway::ports::free_port()
    );
    for (redis_url, expected, says) in [
        (durable.url(), "pass", "appendfsync always"),
        (everysec.url(), "fail", "everysec"),
        (gone, "fail", "does not answer"),
    ] {
        let config = write(
            dir.path(),
            "redis.toml",
            &format!(
                "[server]\nallow_unauthenticated = true\n[spool]\nbackend = \"redis\"\n[limiter]\nbackend = \"redis\"\n[redis]\nurl = \"{redis_url}\"\n[upstream]\nbase_url = \"{url}\"\n{account}"
            ),
        );
        let (_, report) = doctor_json(config.to_str().unwrap(), &[]).await;
        let redis = line(&report, None, "redis");
        assert_eq!(redis["status"], expected, "{redis}");
        assert!(redis["detail"].as_str().unwrap().contains(says), "{redis}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_in_sandbox_mode_checks_what_needs_no_x() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "sandbox.toml",
        &format!(
            "[server]\nallow_unauthenticated = true\n[spool]\ndir = \"{}/spool\"\n[upstream]\nsandbox = true\nbase_url = \"http://127.0.0.1:9\"\n[accounts.shop]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ purchase = \"o9d2g\" }}\n",
            dir.path().display()
        ),
    );
    let (code, report) = doctor_json(config.to_str().unwrap(), &[]).await;
    assert_eq!(code, 0, "{report:#}");
    for check in ["credentials", "event purchase", "pixel"] {
        let l = line(&report, Some("shop"), check);
        assert_eq!(l["status"], "skip");
        assert!(l["detail"].as_str().unwrap().contains("sandbox"));
    }
    assert_eq!(status(&report, None, "spool"), "pass");
    assert_eq!(status(&report, None, "clock"), "skip");

    // A configuration that does not load is the failed line, naming the key, in either output.
    let broken = write(
        dir.path(),
        "broken.toml",
        &std::fs::read_to_string(&config)
            .unwrap()
            .replace("pixel_id = \"o9d7n\"", "pixel_id = \"O9-D7N\""),
    );
    let (code, report) = doctor_json(broken.to_str().unwrap(), &[]).await;
    assert_eq!(code, 1);
    let l = line(&report, None, "configuration");
    assert_eq!(l["status"], "fail");
    assert!(
        l["detail"]
            .as_str()
            .unwrap()
            .contains("accounts.shop.pixel_id"),
        "{l}"
    );
    let (code, out, _) = run(&["doctor", "--config", broken.to_str().unwrap()]).await;
    assert!(
        code == 1 && out.contains("FAIL  configuration  invalid: accounts.shop.pixel_id"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_create_makes_a_tag_doctor_then_finds() {
    let dir = tempfile::tempdir().unwrap();
    let (url, _fake) = serve_fake(|_| {}).await;
    let accounts = format!(
        "[accounts.shop]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ purchase = \"o9d2g\" }}\nauth = {}\n[accounts.beta]\nad_account_id = \"5kx2bq9t0a\"\npixel_id = \"p4x1l\"\nauth = {{ kind = \"pixel_token\", token = \"CANARY-pixel-token\" }}\n",
        shop_auth()
    );
    let config = gateway_config(dir.path(), &url, &accounts);
    let (code, out, err) = run(&[
        "events",
        "create",
        "--config",
        &config,
        "--account",
        "shop",
        "--name",
        "signup",
        "--type",
        "SIGN_UP",
        "--click-window",
        "7",
    ])
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("(SIGN_UP, click window 7 d, view-through window 1 d)"),
        "{out}"
    );
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("signup = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no configuration line in\n{out}"))
        .to_owned();
    assert!(
        out.contains("add this line under accounts.shop.events"),
        "{out}"
    );

    // The tag is listed, and the printed line makes a setup doctor passes.
    let (code, out, _) = run(&["events", "list", "--config", &config, "--account", "shop"]).await;
    assert_eq!(code, 0);
    let row = out
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        row.contains("signup") && row.contains("SIGN_UP") && row.contains("UNVERIFIED"),
        "{row}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("o9d2g") && l.ends_with("purchase")),
        "{out}"
    );
    let listed = tags_listed(&config).await;
    assert_eq!(listed.len(), 6);

    let with_line = accounts.replace(
        "events = { purchase = \"o9d2g\" }",
        &format!("events = {{ purchase = \"o9d2g\", signup = \"{id}\" }}"),
    );
    let config2 = gateway_config(dir.path(), &url, &with_line);
    let (_, report) = doctor_json(&config2, &[]).await;
    assert_eq!(
        status(&report, Some("shop"), "event signup"),
        "pass",
        "{report:#}"
    );

    // Refused before anything is sent, naming the flag.
    for (args, flag) in [
        (vec!["--type", "purchase"], "--type"),
        (
            vec!["--type", "PURCHASE", "--click-window", "3"],
            "--click-window",
        ),
        (
            vec![
                "--type",
                "PURCHASE",
                "--click-window",
                "7",
                "--view-through-window",
                "14",
            ],
            "--view-through-window",
        ),
    ] {
        let mut all = vec![
            "events",
            "create",
            "--config",
            &config,
            "--account",
            "shop",
            "--name",
            "x",
        ];
        all.extend(args);
        let (code, _, err) = run(&all).await;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(flag), "{flag}: {err}");
    }
    let listed = tags_listed(&config).await;
    assert_eq!(listed.len(), 6, "nothing was created");

    // A pixel token cannot manage tags; an unknown account is named with the configured ones.
    let (code, _, err) = run(&[
        "events",
        "create",
        "--config",
        &config,
        "--account",
        "beta",
        "--name",
        "x",
        "--type",
        "CUSTOM",
    ])
    .await;
    assert!(
        code == 2 && err.contains("accounts.beta.auth is not OAuth 1.0a"),
        "{err}"
    );
    let (code, _, err) = run(&["events", "list", "--config", &config, "--account", "nope"]).await;
    assert!(code == 2 && err.contains("configured: beta, shop"), "{err}");

    // X's refusal: exit 1 with what X said.
    let bad = gateway_config(
        dir.path(),
        &url,
        &accounts.replace("CANARY-cs-shop", "CANARY-wrong"),
    );
    let (code, _, err) = run(&[
        "events",
        "create",
        "--config",
        &bad,
        "--account",
        "shop",
        "--name",
        "x",
        "--type",
        "CUSTOM",
    ])
    .await;
    assert!(code == 1 && err.contains("401"), "{err}");
}
