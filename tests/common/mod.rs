//! Helpers for tests that run the real binaries on free ports.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const GATEWAY: &str = env!("CARGO_BIN_EXE_conversion-gateway");
pub const FAKE: &str = env!("CARGO_BIN_EXE_fake-x-api");
pub const API_KEY: &str = "e2e-api-key";
/// The admin key: a canary too, it must never show anywhere.
pub const ADMIN_KEY: &str = "CANARY-admin-key";

pub use conversion_gateway::ports::free_port;

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

pub fn spawn(bin: &str, args: &[&str], envs: &[(&str, &str)], log: PathBuf) -> Proc {
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().unwrap(),
        log,
    }
}

pub fn wait_http(url: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if get_ok(url) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} did not come up");
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub async fn eventually<T>(limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `GET url` (`http://ip:port/path`) answers 200: the gateway's own `healthcheck` probe, usable
/// outside a runtime.
pub fn get_ok(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let addr = host.parse().expect("an ip:port URL");
    conversion_gateway::healthcheck::check(addr, &path, Duration::from_secs(2)).is_ok()
}

/// The fake's configuration for two accounts: one OAuth 1.0a, one pixel token.
pub fn fake_config(port: u16) -> String {
    format!(
        r#"
listen = "127.0.0.1:{port}"

[[accounts]]
id = "18ce552mlaq"
pixels = ["o9d7n"]
events = ["o9d2g", "o9d2h"]
oauth = {{ consumer_key = "ck-e2e", consumer_secret = "CANARY-consumer-secret", access_token = "CANARY-access-token", access_token_secret = "CANARY-token-secret" }}

[[accounts]]
id = "5kx2bq9t0a"
pixels = ["p4x1l"]
events = ["e1v2t"]
pixel_token = "CANARY-pixel-token"
"#
    )
}

/// The gateway's configuration pointing at the fake on `fake_port`.
pub fn gateway_config(port: u16, admin_port: u16, fake_port: u16, consumer_secret: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
api_keys = ["{API_KEY}"]
admin_api_keys = ["{ADMIN_KEY}"]
shutdown_timeout = "10s"

[upstream]
base_url = "http://127.0.0.1:{fake_port}"
timeout = "2s"

[delivery]
linger = "200ms"

[log]
format = "json"
level = "trace"

[accounts.acme]
ad_account_id = "18ce552mlaq"
pixel_id = "o9d7n"
events = {{ purchase = "o9d2g", signup = "o9d2h" }}
auth = {{ kind = "oauth1", consumer_key = "ck-e2e", consumer_secret = "{consumer_secret}", access_token = "CANARY-access-token", access_token_secret = "CANARY-token-secret" }}

[accounts.beta]
ad_account_id = "5kx2bq9t0a"
pixel_id = "p4x1l"
default_phone_region = "GB"
events = {{ lead = "e1v2t" }}
auth = {{ kind = "pixel_token", token = "CANARY-pixel-token" }}
"#
    )
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub fake: Proc,
    pub gateway: Proc,
    pub fake_url: String,
    pub ingest_url: String,
    pub admin_url: String,
    port: u16,
    admin_port: u16,
    fake_port: u16,
    starts: usize,
}

/// Starts fake-x-api (`fake_config`) with its files in `dir`: the process, its port and its URL.
pub fn start_fake(dir: &Path) -> (Proc, u16, String) {
    start_fake_with(dir, |config| config)
}

/// Like `start_fake`, with `fake_config` as `edit` makes it.
pub fn start_fake_with(dir: &Path, edit: impl FnOnce(String) -> String) -> (Proc, u16, String) {
    let port = free_port();
    let cfg = write(dir, "fake.toml", &edit(fake_config(port)));
    let fake = spawn(
        FAKE,
        &["--config", cfg.to_str().unwrap()],
        &[],
        dir.join("fake.log"),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_http(&format!("{url}/_fake/health"));
    (fake, port, url)
}

/// Starts fake-x-api and the gateway in front of it.
pub fn start_stack() -> Stack {
    start_stack_with("CANARY-consumer-secret", &[])
}

/// Like `start_stack`, with the gateway's consumer secret and extra `GATEWAY_*` variables.
pub fn start_stack_with(consumer_secret: &str, envs: &[(&str, &str)]) -> Stack {
    start_stack_in(tempfile::tempdir().unwrap(), consumer_secret, envs)
}

/// Like `start_stack_with`, in `dir` (whose `spool` the caller may have prepared: a mount, say).
pub fn start_stack_in(
    dir: tempfile::TempDir,
    consumer_secret: &str,
    envs: &[(&str, &str)],
) -> Stack {
    let (port, admin_port) = (free_port(), free_port());
    let (fake, fake_port, fake_url) = start_fake(dir.path());
    let gateway = launch_gateway(
        dir.path(),
        0,
        (port, admin_port, fake_port),
        consumer_secret,
        envs,
    );
    Stack {
        dir,
        fake,
        gateway,
        fake_url,
        ingest_url: format!("http://127.0.0.1:{port}/v1/events"),
        admin_url: format!("http://127.0.0.1:{admin_port}"),
        port,
        admin_port,
        fake_port,
        starts: 1,
    }
}

fn launch_gateway(
    dir: &Path,
    n: usize,
    (port, admin_port, fake_port): (u16, u16, u16),
    consumer_secret: &str,
    envs: &[(&str, &str)],
) -> Proc {
    let cfg = write(
        dir,
        &format!("gateway-{n}.toml"),
        &gateway_config(port, admin_port, fake_port, consumer_secret),
    );
    let spool_dir = dir.join("spool");
    let mut all = vec![("GATEWAY_SPOOL__DIR", spool_dir.to_str().unwrap())];
    all.extend_from_slice(envs);
    let mut proc = spawn(
        GATEWAY,
        &["--config", cfg.to_str().unwrap()],
        &all,
        dir.join(format!("gateway-{n}.log")),
    );
    wait_ready(&mut proc, &format!("http://127.0.0.1:{admin_port}/readyz"));
    proc
}

/// Like `wait_http`, but a process that exits first fails at once, with its log (a port taken by
/// another test between `free_port` and the bind shows as "cannot listen").
pub fn wait_ready(proc: &mut Proc, url: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if get_ok(url) {
            return;
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!(
                "the process exited ({status}) before {url} answered:\n{}",
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{url} did not come up:\n{}", proc.log_text());
}

impl Stack {
    /// Stops the running gateway with `signal` (`KILL`, `TERM`) and waits for it to exit.
    pub fn stop_gateway(&mut self, signal: &str) -> std::process::ExitStatus {
        self.gateway.signal(signal);
        self.gateway
            .wait_exit(Duration::from_secs(30))
            .expect("the gateway exits")
    }

    /// Starts the gateway again on the same ports and spool.
    pub fn restart_gateway(&mut self, consumer_secret: &str, envs: &[(&str, &str)]) {
        let _ = self.gateway.child.kill();
        let _ = self.gateway.child.wait();
        self.gateway = launch_gateway(
            self.dir.path(),
            self.starts,
            (self.port, self.admin_port, self.fake_port),
            consumer_secret,
            envs,
        );
        self.starts += 1;
    }

    /// Every gateway log of this stack, all runs.
    pub fn gateway_logs(&self) -> String {
        (0..self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("gateway-{n}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// The list `/_fake/<name>` answers under the key `<name>`.
async fn fake_list(client: &reqwest::Client, fake_url: &str, name: &str) -> Vec<Value> {
    let v: Value = client
        .get(format!("{fake_url}/_fake/{name}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v[name].as_array().cloned().unwrap_or_default()
}

pub async fn fake_conversions(client: &reqwest::Client, fake_url: &str) -> Vec<Value> {
    fake_list(client, fake_url, "conversions").await
}

pub async fn fake_requests(client: &reqwest::Client, fake_url: &str) -> Vec<Value> {
    fake_list(client, fake_url, "requests").await
}

/// The conversion ids the fake accepted, in arrival order.
pub async fn received_ids(http: &reqwest::Client, fake_url: &str) -> Vec<String> {
    fake_conversions(http, fake_url)
        .await
        .iter()
        .map(|c| {
            c["conversion"]["conversion_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// Waits until the fake accepted every id of `want`; the ids it accepted by then.
pub async fn wait_received(
    http: &reqwest::Client,
    fake_url: &str,
    want: &HashSet<String>,
    limit: Duration,
) -> Vec<String> {
    let got = eventually(limit, async || {
        let got = received_ids(http, fake_url).await;
        let set: HashSet<&String> = got.iter().collect();
        want.iter().all(|id| set.contains(id)).then_some(got)
    })
    .await;
    match got {
        Some(got) => got,
        None => {
            let got: HashSet<String> = received_ids(http, fake_url).await.into_iter().collect();
            let missing = want.iter().filter(|id| !got.contains(*id)).count();
            panic!(
                "{missing} of {} accepted events did not reach X within {limit:?}",
                want.len()
            )
        }
    }
}

/// `method path` on the admin listener at `admin_url` with the admin key; the JSON of a 2xx answer.
pub async fn admin_json(
    http: &reqwest::Client,
    admin_url: &str,
    method: &str,
    path: &str,
) -> Value {
    let url = format!("{admin_url}{path}");
    let req = match method {
        "POST" => http.post(url),
        "DELETE" => http.delete(url),
        _ => http.get(url),
    };
    let resp = req.bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert!(
        resp.status().is_success(),
        "{method} {path}: {}",
        resp.status()
    );
    resp.json().await.unwrap()
}

/// promtool from Debian's prometheus package, installed with apt-get when missing.
pub fn promtool() -> &'static str {
    debian_tool("/usr/bin/promtool", "prometheus")
}

/// `path`, installing Debian's `package` (apt-get, updating the lists once if need be) when it is missing.
pub fn debian_tool(path: &'static str, package: &str) -> &'static str {
    if !Path::new(path).exists() {
        assert!(
            conversion_gateway::apt::install(package),
            "cannot install {path} (apt-get install {package})"
        );
    }
    path
}

/// POSTs `body` to the ingest URL with the test API key.
pub async fn post_events(
    http: &reqwest::Client,
    ingest_url: &str,
    body: &Value,
) -> reqwest::Response {
    http.post(ingest_url)
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped. Needs root (CI runs as root).
/// Options of a disk spool under `dir` for tests: 1 GiB, a small cache, no free-space reserve.
pub fn spool_opts(dir: PathBuf) -> conversion_gateway::spool::DiskSpoolOptions {
    conversion_gateway::spool::DiskSpoolOptions {
        dir,
        max_bytes: 1 << 30,
        max_dead_letters: 1000,
        dedup_window: Duration::from_secs(3600),
        cache_bytes: 1 << 20,
        min_free_bytes: 0,
    }
}

pub struct Tmpfs(pub tempfile::TempDir);

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A spooled record of account `acme` with conversion id `c{i}`, the given click id and description
/// (their lengths set its size).
pub fn sized_record(
    i: usize,
    twclid: String,
    description: String,
) -> conversion_gateway::spool::Record {
    use conversion_gateway::conversion::Conversion;
    let id = format!("c{i}");
    conversion_gateway::spool::Record {
        account: "acme".into(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        event_name: None,
        conversion: Conversion {
            description: Some(description),
            ..Conversion::minimal("2026-11-28T00:00:00.000Z", "o9d2g", &twclid, &id)
        },
    }
}

/// The value of the sample `series` (name and labels as printed) in a text exposition.
/// `GET /metrics` of the admin listener at `admin_url`.
pub async fn metrics_of(http: &reqwest::Client, admin_url: &str) -> String {
    http.get(format!("{admin_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn metric_sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

// The load and the measures the delivery and power-cut tests share.

pub fn events(prefix: &str, range: std::ops::Range<usize>) -> Value {
    let list: Vec<Value> = range
        .map(|i| json!({"account": "acme", "event": "purchase", "twclid": format!("{prefix}-click-{i}"), "conversion_id": format!("{prefix}-{i}")}))
        .collect();
    json!({ "events": list })
}

/// (arrival ms, conversions) of every request the fake accepted, in arrival order.
pub async fn accepted_batches(http: &reqwest::Client, fake_url: &str) -> Vec<(u64, u64)> {
    let mut sent: Vec<(u64, u64)> = fake_requests(http, fake_url)
        .await
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| {
            (
                r["received_at_ms"].as_u64().unwrap(),
                r["conversions"].as_array().unwrap().len() as u64,
            )
        })
        .collect();
    sent.sort();
    sent
}

/// The most conversions in any closed window of `window_ms`, and where that window starts.
pub fn busiest_window(sent: &[(u64, u64)], window_ms: u64) -> (u64, u64) {
    sent.iter()
        .enumerate()
        .map(|(i, (start, _))| {
            (
                sent[i..]
                    .iter()
                    .take_while(|(t, _)| *t <= start + window_ms)
                    .map(|(_, n)| n)
                    .sum(),
                *start,
            )
        })
        .max()
        .unwrap_or((0, 0))
}

/// Posts `total` events in batches of `per_post` from `workers` concurrent clients, each pausing `pace`
/// between posts, retrying a batch until it gets a 202; returns the ids that got one.
pub async fn load(
    ingest_url: String,
    prefix: &'static str,
    total: usize,
    per_post: usize,
    workers: usize,
    pace: Duration,
    deadline: Duration,
) -> HashSet<String> {
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let next = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (accepted, next, url) = (accepted.clone(), next.clone(), ingest_url.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let started = Instant::now();
            loop {
                let start = {
                    let mut n = next.lock().unwrap();
                    let s = *n;
                    *n += per_post;
                    s
                };
                if start >= total {
                    return;
                }
                tokio::time::sleep(pace).await;
                let body = events(prefix, start..(start + per_post).min(total));
                while started.elapsed() < deadline {
                    match http
                        .post(&url)
                        .bearer_auth(API_KEY)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 202 => {
                            let ids = body["events"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|e| e["conversion_id"].as_str().unwrap().to_owned());
                            accepted.lock().unwrap().extend(ids);
                            break;
                        }
                        // Refused, reset or down: a backend retries the same events.
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let set = accepted.lock().unwrap().clone();
    set
}

/// A load of `total` events in posts of 10 from 4 clients pausing 10 ms between posts, so that it lasts
/// long enough for signals to land in it; answers the accepted ids and when the load finished.
pub fn spawn_paced_load(
    url: String,
    prefix: &'static str,
    total: usize,
    deadline: Duration,
) -> tokio::task::JoinHandle<(HashSet<String>, Instant)> {
    tokio::spawn(async move {
        let accepted = load(
            url,
            prefix,
            total,
            10,
            4,
            Duration::from_millis(10),
            deadline,
        )
        .await;
        (accepted, Instant::now())
    })
}

pub fn assert_twins_identical(conversions: &[Value]) {
    let mut seen: HashMap<String, &Value> = HashMap::new();
    for c in conversions {
        let id = c["conversion"]["conversion_id"]
            .as_str()
            .unwrap()
            .to_owned();
        if let Some(twin) = seen.get(&id) {
            assert_eq!(twin["conversion"]["event_id"], c["conversion"]["event_id"]);
            assert_eq!(
                twin["conversion"], c["conversion"],
                "a resend carries the same conversion"
            );
        } else {
            seen.insert(id, c);
        }
    }
}

/// A minimal stored record of `account` with conversion id `id`, received now.
pub fn spool_record(account: &str, id: &str) -> conversion_gateway::spool::Record {
    let now = chrono::Utc::now();
    conversion_gateway::spool::Record {
        account: account.into(),
        conversion: conversion_gateway::conversion::Conversion::minimal(
            &now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            "o9d2g",
            "t",
            id,
        ),
        received_at_ms: now.timestamp_millis(),
        event_name: Some("purchase".into()),
    }
}
