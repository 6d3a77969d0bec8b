//! `bench`: drives the real gateway over HTTP on this machine and prints what it measured.
//!
//! ```sh
//! cargo build --release --bins && ./target/release/bench            # about six minutes (--help for options)
//! ```
//!
//! It starts nginx (answering 202 to the same POSTs, the reference; installed with apt-get when missing),
//! `fake-x-api` and `conversion-gateway` (durable spool in a temporary directory, budget lifted), and
//! measures with its own HTTP/1.1 load generator on the same cores:
//! 1. single-event POSTs, closed loop, nginx and the gateway in turn for `--rounds` rounds (the reference
//!    moves between runs on shared cores): requests/s, p50, p99, each round's ratio and their median;
//! 2. 100-event POSTs, closed loop: events/s;
//! 3. a steady 10,000 single-event POSTs/s (open loop, latency from the scheduled send): p50, p99;
//! 4. RSS of the gateway with 1,000,000 events waiting in the spool (X down meanwhile);
//! 5. the forwarding rate to `fake-x-api` once X is back, budget lifted;
//! 6. the shared mode: a disk-spool gateway and one on the Redis queue (a `redis-server` of its own, AOF
//!    with `appendfsync always`) side by side, single-event and 100-event POSTs to each in turn for
//!    `--rounds` rounds: each round's ratio and their median, both processes' CPU per request; then Redis
//!    script calls per ingest request (counted by Redis itself, with X down so that delivery is idle, the
//!    background calls of an idle stretch subtracted).
//!
//! `bench --mapping` instead counts the instructions per event of the mapping (parse, validate, normalize,
//! hash) for four payload shapes under valgrind's callgrind (`mapping.rs`), repeatable where timings are not.
//!
//! For phases 1–3 it also prints each server's own CPU time per request (user + system, every thread,
//! nginx's workers included, from `/proc`): a rate ratio depends on what the load generator costs on the
//! shared cores, a CPU ratio much less.
#![forbid(unsafe_code)]

mod mapping;

use clap::Parser;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
#[command(
    name = "bench",
    about = "Measures conversion-gateway against nginx on this machine"
)]
struct Args {
    /// Seconds per closed-loop and open-loop phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent connections for the closed-loop phases.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Target rate of the open-loop phase (single-event POSTs per second).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Events to leave waiting for the RSS and forwarding phases.
    #[arg(long, default_value_t = 1_000_000)]
    waiting: u64,
    /// Rounds of single-event POSTs, nginx and the gateway in turn; the ratio reported is their median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip the nginx reference.
    #[arg(long)]
    no_nginx: bool,
    /// Also measure the single-event phase of nginx and the gateway with wrk (apt-get when missing), the
    /// load generator the design's reference numbers were taken with.
    #[arg(long)]
    wrk: bool,
    /// Skip the shared mode on Redis (phase 6).
    #[arg(long)]
    no_redis: bool,
    /// Only the shared mode on Redis (phase 6), with its own disk-spool reference.
    #[arg(long, conflicts_with = "no_redis")]
    redis_only: bool,
    /// Only the mapping micro-benchmark: instructions per event per payload shape, under callgrind
    /// (valgrind, installed with apt-get when missing).
    #[arg(long)]
    mapping: bool,
    /// (The micro-benchmark's child: map `--events` events of this shape and exit.)
    #[arg(long, hide = true, value_name = "SHAPE")]
    map_only: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    events: u64,
}

const API_KEY: &str = "bench-key";

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, String> {
        let path =
            std::env::temp_dir().join(format!("conversion-gateway-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The children running now, stopped by `stop_on_signal` when the bench itself is interrupted (drops do
/// not run then, and the children kept running, skewing the next measurement).
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    RUNNING.lock().unwrap_or_else(|p| p.into_inner())
}

/// On SIGINT or SIGTERM: SIGTERM to every child still running, the scratch directory removed, exit 130.
async fn stop_on_signal(scratch: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    for pid in running().iter() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    let _ = std::fs::remove_dir_all(scratch);
    eprintln!("bench: interrupted; its servers were stopped");
    std::process::exit(130);
}

/// A child process killed on drop.
struct Proc(Child);

impl Proc {
    fn new(child: Child) -> Self {
        running().push(child.id());
        Proc(child)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        running().retain(|p| *p != self.0.id());
    }
}

/// nginx, stopped on drop with SIGTERM so that its master takes its workers down with it (SIGKILL on
/// the master alone left the workers running, holding the port).
struct Nginx(Child);

impl Nginx {
    fn new(child: Child) -> Self {
        running().push(child.id());
        Nginx(child)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        running().retain(|p| *p != self.0.id());
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The middle value (the mean of the two middle ones for an even count); `None` for none.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[n / 2]),
        n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

use conversion_gateway::ports::free_port;

fn wait_port(addr: SocketAddr) -> Result<(), String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("nothing listens on {addr}"))
}

/// One single-event body, about 515 bytes, unique per `n`.
fn event(n: u64) -> String {
    format!(
        concat!(
            r#"{{"event":"purchase","conversion_id":"bench-{:012}","email":"Jane.Doe+{}@Example.com","phone":"+1 (650) 253-{:04}","#,
            r#""value":129.99,"price_currency":"usd","number_items":2,"ip_address":"203.0.113.7","#,
            r#""user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36","#,
            r#""event_source_url":"https://shop.example/checkout?utm_source=x&twclid=23opevjt88psuo13lu8d020qkn","#,
            r#""contents":[{{"content_id":"sku-{}","content_name":"Blanket","content_type":"Pet supplies","content_price":64.99,"num_items":2}}]}}"#
        ),
        n,
        n % 1000,
        n % 10_000,
        n % 97
    )
}

fn batch(first: u64, n: u64) -> String {
    let events: Vec<String> = (first..first + n).map(event).collect();
    format!(r#"{{"events":[{}]}}"#, events.join(","))
}

fn request(addr: SocketAddr, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A minimal HTTP/1.1 keep-alive client: the bench measures the server, not a client library.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads the whole response; returns the status.
    async fn round_trip(&mut self, req: &[u8]) -> std::io::Result<u16> {
        self.stream.write_all(req).await?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
            let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while self.buf.len() < end + 4 + len {
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed",
                    ));
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
    }
}

#[derive(Default)]
struct Run {
    requests: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    elapsed: Duration,
}

impl Run {
    /// Sends one request and counts it, latency measured from `since`; after an error the connection is
    /// opened again. `false` when it cannot be.
    async fn send(
        &mut self,
        conn: &mut Conn,
        addr: SocketAddr,
        req: &[u8],
        since: Instant,
    ) -> bool {
        match conn.round_trip(req).await {
            Ok(202) => {
                self.requests += 1;
                self.latencies_us
                    .push(since.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok(_) => self.errors += 1,
            Err(_) => {
                self.errors += 1;
                match Conn::open(addr).await {
                    Ok(c) => *conn = c,
                    Err(_) => return false,
                }
            }
        }
        true
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// `connections` clients each sending as fast as answers come, for `secs`. `body(n)` makes request n.
async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    secs: u64,
    counter: Arc<AtomicU64>,
    per_request: u64,
    make: fn(u64, u64) -> String,
) -> Run {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut run = Run::default();
            let Ok(mut conn) = Conn::open(addr).await else {
                run.errors += 1;
                return run;
            };
            while Instant::now() < deadline {
                let n = counter.fetch_add(per_request, Ordering::Relaxed);
                let req = request(addr, &make(n, per_request));
                if !run.send(&mut conn, addr, &req, Instant::now()).await {
                    break;
                }
            }
            run
        }));
    }
    merge(tasks, started).await
}

/// `rate` requests per second spread over `connections`, latency measured from the scheduled send time.
async fn open_loop(
    addr: SocketAddr,
    connections: usize,
    rate: u64,
    secs: u64,
    counter: Arc<AtomicU64>,
) -> Run {
    let started = Instant::now();
    let per_conn = Duration::from_secs_f64(connections as f64 / rate as f64);
    let total_per_conn = (rate * secs) / connections as u64;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut run = Run::default();
            let Ok(mut conn) = Conn::open(addr).await else {
                run.errors += 1;
                return run;
            };
            // Spread the connections' schedules over one interval.
            let offset = per_conn.mul_f64(c as f64 / connections as f64);
            let base = tokio::time::Instant::now() + offset;
            for i in 0..total_per_conn {
                let scheduled = base + per_conn.mul_f64(i as f64);
                tokio::time::sleep_until(scheduled).await;
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let req = request(addr, &event(n));
                if !run.send(&mut conn, addr, &req, scheduled.into_std()).await {
                    break;
                }
            }
            run
        }));
    }
    merge(tasks, started).await
}

async fn merge(tasks: Vec<tokio::task::JoinHandle<Run>>, started: Instant) -> Run {
    let mut all = Run::default();
    for t in tasks {
        if let Ok(r) = t.await {
            all.requests += r.requests;
            all.errors += r.errors;
            all.latencies_us.extend(r.latencies_us);
        }
    }
    all.elapsed = started.elapsed();
    all.latencies_us.sort_unstable();
    all
}

fn single(n: u64, _: u64) -> String {
    event(n)
}

fn hundred(n: u64, per: u64) -> String {
    batch(n, per)
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn start_nginx(dir: &Path, port: u16) -> Result<Nginx, String> {
    if nginx_binary().is_none() {
        eprintln!("bench: nginx is missing; installing it with apt-get (the reference for the ingest rate)");
        if !conversion_gateway::apt::install("nginx-light") {
            return Err("cannot install nginx; run with --no-nginx".into());
        }
    }
    let nginx = nginx_binary().ok_or("nginx not found after installing it")?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\nevents {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             keepalive_requests 1000000; client_max_body_size 2m; client_body_buffer_size 128k;\n\
             server {{ listen 127.0.0.1:{port}; location / {{ default_type application/json; return 202 '{{\"accepted\":1,\"duplicates\":0,\"suppressed\":0,\"rejected\":[]}}'; }} }} }}\n",
            d = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let nginx = Nginx::new(child);
    wait_port(SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok(nginx)
}

/// The Lua script that makes wrk send the same unique-`conversion_id` events as the bench's own generator.
const WRK_SCRIPT: &str = r#"
local counter = 0
local next_id = 0
setup = function(thread) thread:set("tid", next_id); next_id = next_id + 1 end
request = function()
  counter = counter + 1
  local body = string.format('{"event":"purchase","conversion_id":"wrk-RUN-%d-%012d","email":"Jane.Doe+%d@Example.com","phone":"+1 (650) 253-%04d","value":129.99,"price_currency":"usd","number_items":2,"ip_address":"203.0.113.7","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36","event_source_url":"https://shop.example/checkout?utm_source=x&twclid=23opevjt88psuo13lu8d020qkn","contents":[{"content_id":"sku-%d","content_name":"Blanket","content_type":"Pet supplies","content_price":64.99,"num_items":2}]}', tid, counter, counter % 1000, counter % 10000, counter % 97)
  return wrk.format("POST", "/v1/events", {["Authorization"]="Bearer bench-key", ["Content-Type"]="application/json"}, body)
end
"#;

/// Runs wrk against `addr`: (requests/s, p50 ms, p99 ms, non-2xx responses).
fn wrk_run(
    dir: &Path,
    addr: SocketAddr,
    connections: usize,
    secs: u64,
) -> Result<(f64, f64, f64, u64), String> {
    if !Path::new("/usr/bin/wrk").exists() {
        conversion_gateway::apt::install("wrk");
    }
    let script = dir.join("unique.lua");
    // Ids unique across runs: a repeated id is a duplicate, answered without being spooled.
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    std::fs::write(&script, WRK_SCRIPT.replace("RUN", &run.to_string()))
        .map_err(|e| e.to_string())?;
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://{addr}/v1/events"))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |v: &str| -> f64 {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1000.0,
            "s" => n * 1000.0,
            _ => n,
        }
    };
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_owned())
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            format!(
                "wrk printed no rate:
{text}"
            )
        })?;
    let p50 = field("50%").map_or(f64::NAN, |v| ms(&v));
    let p99 = field("99%").map_or(f64::NAN, |v| ms(&v));
    let non2xx = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((rps, p50, p99, non2xx))
}

/// `/proc/{pid}/stat`: the parent's pid and the CPU time used (user + system), in clock ticks.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// /proc reports CPU times in USER_HZ ticks, 100 per second on Linux whatever the kernel's own HZ.
const TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds used so far by `pid` and its live children (nginx's workers), every thread included.
fn cpu_seconds(pid: u32) -> f64 {
    let mut ticks = proc_stat(pid).map_or(0, |(_, t)| t);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((ppid, t)) = proc_stat(child) {
                if ppid == pid {
                    ticks += t;
                }
            }
        }
    }
    ticks as f64 / TICKS_PER_SEC
}

/// Runs a phase and answers it with the server's own CPU time per request in it (µs), from /proc.
fn with_cpu(pid: u32, phase: impl FnOnce() -> Run) -> (Run, f64) {
    let before = cpu_seconds(pid);
    let run = phase();
    let used = cpu_seconds(pid) - before;
    let per_request = 1e6 * used / (run.requests.max(1) as f64);
    (run, per_request)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let url = format!("http://{addr}{path}");
    match reqwest::get(url).await {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

async fn post_json(addr: SocketAddr, path: &str, body: serde_json::Value, delete: bool) {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    let req = if delete {
        client.delete(url)
    } else {
        client.post(url).json(&body)
    };
    let _ = req.send().await;
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    if let Some(shape) = &args.map_only {
        return mapping::run_child(shape, args.events);
    }
    if args.mapping {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = TempDir::new()?;
        println!("bench --mapping: instructions per event (callgrind; parse + events_of + map_event, one event per body)");
        for (shape, per_event) in mapping::measure(&exe, dir.path())? {
            println!("  {shape:<15} {per_event:>10.0}");
        }
        println!("full event: {}", event(0));
        return Ok(());
    }
    let bins = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .parent()
        .map(Path::to_path_buf)
        .ok_or("no binary directory")?;
    let (gateway_bin, fake_bin) = (bins.join("conversion-gateway"), bins.join("fake-x-api"));
    if !gateway_bin.exists() || !fake_bin.exists() {
        return Err(format!(
            "build the binaries first: cargo build --release --bins (looked in {})",
            bins.display()
        ));
    }
    let dir = TempDir::new()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.spawn(stop_on_signal(dir.path().to_path_buf()));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "bench: {cores} cores, {}s per phase, {} connections, payload {} bytes",
        args.seconds,
        args.connections,
        event(0).len()
    );
    println!("payload: {}", event(0));

    let counter = Arc::new(AtomicU64::new(0));
    let nginx = if args.no_nginx {
        None
    } else {
        let port = free_port();
        Some((start_nginx(dir.path(), port)?, port))
    };
    let nginx_addr = nginx
        .as_ref()
        .map(|(_, port)| SocketAddr::from(([127, 0, 0, 1], *port)));
    let nginx_pid = nginx.as_ref().map_or(0, |(n, _)| n.0.id());

    // fake-x-api: no recording (counts only), no rate limit in the way.
    let fake_port = free_port();
    let fake_addr = SocketAddr::from(([127, 0, 0, 1], fake_port));
    let fake_cfg = dir.path().join("fake.toml");
    std::fs::write(
        &fake_cfg,
        format!(
            "listen = \"127.0.0.1:{fake_port}\"\nrecord = false\n[[accounts]]\nid = \"18ce552mlaq\"\npixels = [\"o9d7n\"]\nevents = [\"o9d2g\"]\n\
             rate_limit = {{ events = 1000000000, window_secs = 900 }}\npixel_token = \"bench-token\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let _fake = Proc::new(
        Command::new(&fake_bin)
            .arg("--config")
            .arg(&fake_cfg)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_port(fake_addr)?;

    let (port, admin_port) = (free_port(), free_port());
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // With `redis`, the shared mode on that Redis: its queue and its budget. `other` ports: a second
    // gateway beside the first.
    let start_gateway_on = |spool: &str,
                            redis: Option<&str>,
                            other: bool|
     -> Result<(Proc, SocketAddr), String> {
        let (port, admin_port) = if other {
            (free_port(), free_port())
        } else {
            (port, admin_port)
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let gw_cfg = dir.path().join(format!("{spool}.toml"));
        let (backend, shared) = match redis {
            Some(url) => (
                "redis",
                format!("[limiter]\nbackend = \"redis\"\n[redis]\nurl = \"{url}\"\nconsumer = \"bench\"\n"),
            ),
            None => ("disk", String::new()),
        };
        std::fs::write(
            &gw_cfg,
            format!(
                "{shared}[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\napi_keys = [\"{API_KEY}\"]\nmax_body_bytes = 2097152\n\
                 [spool]\nbackend = \"{backend}\"\ndir = \"{spool}\"\nmax_bytes = \"4GiB\"\n[upstream]\nbase_url = \"http://127.0.0.1:{fake_port}\"\n\
                 [delivery]\nlinger = \"100ms\"\nretry_cap = \"1s\"\n[log]\nlevel = \"warn\"\n\
                 [accounts.acme]\nad_account_id = \"18ce552mlaq\"\npixel_id = \"o9d7n\"\nevents = {{ purchase = \"o9d2g\" }}\n\
                 rate_limit = {{ events = 1000000000, window = \"15m\" }}\nauth = {{ kind = \"pixel_token\", token = \"bench-token\" }}\n",
                spool = dir.path().join(spool).display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.path().join(format!("{spool}.log")))
            .map_err(|e| e.to_string())?;
        let proc = Proc::new(
            Command::new(&gateway_bin)
                .arg("--config")
                .arg(&gw_cfg)
                .stdout(log)
                .spawn()
                .map_err(|e| e.to_string())?,
        );
        wait_port(addr)?;
        Ok((proc, addr))
    };
    let start_gateway = |spool: &str, redis: Option<&str>| -> Result<Proc, String> {
        start_gateway_on(spool, redis, false).map(|(proc, _)| proc)
    };
    let shared = Shared {
        rt: &rt,
        args: &args,
        fake_addr,
        counter: &counter,
    };
    if args.redis_only {
        return shared.run(|name, redis| start_gateway_on(name, redis, true));
    }
    let gateway = start_gateway("spool", None)?;
    let pid = gateway.0.id();
    let show_rss = |phase: &str| {
        let (rss, hwm) = rss_kib(pid);
        println!(
            "  gateway RSS after {phase}: {:.1} MiB (peak {:.1} MiB)",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    };
    show_rss("start");

    // Each phase starts once what the previous one spooled has been forwarded: a steady state, not a
    // backlog drain competing for the same two cores.
    let settle = |counter: &Arc<AtomicU64>| rt.block_on(settled(fake_addr, counter));
    // Single-event POSTs, nginx and the gateway in turn, so that both see the same machine: the reference
    // moves by a quarter between runs on these shared cores. Each round's ratio, then their median.
    let mut ratios = Vec::new();
    let mut wrk_ratios = Vec::new();
    let mut gateway_rps = Vec::new();
    let (mut gateway_cpu, mut nginx_cpu, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        settle(&counter);
        let reference = nginx_addr.map(|a| {
            with_cpu(nginx_pid, || {
                rt.block_on(closed_loop(
                    a,
                    args.connections,
                    args.seconds,
                    Arc::new(AtomicU64::new(0)),
                    1,
                    single,
                ))
            })
        });
        if let Some((n, cpu)) = &reference {
            println!("round {round}: nginx `return 202`, single-event POSTs:  {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  server CPU {cpu:.1} µs/req", n.rps(), n.pct(0.5), n.pct(0.99), n.errors);
            nginx_cpu.push(*cpu);
        }
        let (run, cpu) = with_cpu(pid, || {
            rt.block_on(closed_loop(
                addr,
                args.connections,
                args.seconds,
                counter.clone(),
                1,
                single,
            ))
        });
        let ratio = reference.as_ref().map(|(n, _)| 100.0 * run.rps() / n.rps());
        let cpu_ratio = reference.as_ref().map(|(_, n)| cpu / n);
        println!("round {round}: gateway, durable single-event POSTs: {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  server CPU {cpu:.1} µs/req{}{}", run.rps(), run.pct(0.5), run.pct(0.99), run.errors, ratio.map(|r| format!("  = {r:.0}% of nginx's rate")).unwrap_or_default(), cpu_ratio.map(|r| format!(", {r:.2}x nginx's CPU")).unwrap_or_default());
        ratios.extend(ratio);
        cpu_ratios.extend(cpu_ratio);
        gateway_cpu.push(cpu);
        gateway_rps.push(run.rps());
        if !args.wrk {
            continue;
        }
        settle(&counter);
        let reference = match nginx_addr {
            Some(a) => {
                let (rps, p50, p99, bad) = wrk_run(dir.path(), a, args.connections, args.seconds)?;
                println!("  with wrk: nginx                              {rps:>9.0} req/s  p50 {p50:.2} ms  p99 {p99:.2} ms  non-2xx {bad}");
                Some(rps)
            }
            None => None,
        };
        settle(&counter);
        let before = rt.block_on(get_json(fake_addr, "/_fake/stats"))["accepted_conversions"]
            .as_u64()
            .unwrap_or(0);
        let (rps, p50, p99, bad) = wrk_run(dir.path(), addr, args.connections, args.seconds)?;
        let ratio = reference.map(|n| 100.0 * rps / n);
        println!("  with wrk: gateway                            {rps:>9.0} req/s  p50 {p50:.2} ms  p99 {p99:.2} ms  non-2xx {bad}{}", ratio.map(|r| format!("  = {r:.0}% of nginx with wrk")).unwrap_or_default());
        wrk_ratios.extend(ratio);
        // wrk's events count for the settling that follows.
        let sent = (rps * args.seconds as f64) as u64;
        let after = rt.block_on(get_json(fake_addr, "/_fake/stats"))["accepted_conversions"]
            .as_u64()
            .unwrap_or(0);
        counter.fetch_add(
            sent.min(after.saturating_sub(before) + sent),
            Ordering::Relaxed,
        );
    }
    println!(
        "gateway, durable single-event POSTs, median of {} rounds: {:>9.0} req/s{}{}",
        args.rounds,
        median(&mut gateway_rps).unwrap_or(0.0),
        median(&mut ratios)
            .map(|r| format!("  = {r:.0}% of nginx"))
            .unwrap_or_default(),
        median(&mut wrk_ratios)
            .map(|r| format!("  ({r:.0}% with wrk)"))
            .unwrap_or_default(),
    );
    println!(
        "server CPU per single-event POST, median of {} rounds: gateway {:.1} µs, nginx {:.1} µs{}",
        args.rounds,
        median(&mut gateway_cpu).unwrap_or(0.0),
        median(&mut nginx_cpu).unwrap_or(0.0),
        median(&mut cpu_ratios)
            .map(|r| format!("  = {r:.2}x nginx's"))
            .unwrap_or_default(),
    );
    show_rss("single-event POSTs");
    settle(&counter);
    let (run, cpu) = with_cpu(pid, || {
        rt.block_on(closed_loop(
            addr,
            args.connections.min(16),
            args.seconds,
            counter.clone(),
            100,
            hundred,
        ))
    });
    println!("gateway, durable 100-event POSTs:     {:>9.0} events/s ({:.0} req/s)  p50 {:.2} ms  p99 {:.2} ms  errors {}  server CPU {:.2} µs/event", run.rps() * 100.0, run.rps(), run.pct(0.5), run.pct(0.99), run.errors, cpu / 100.0);

    show_rss("100-event POSTs");
    settle(&counter);
    let (run, cpu) = with_cpu(pid, || {
        rt.block_on(open_loop(
            addr,
            args.connections,
            args.rate,
            args.seconds,
            counter.clone(),
        ))
    });
    println!(
        "gateway, steady {} single POSTs/s:  {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  server CPU {cpu:.1} µs/req",
        args.rate,
        run.rps(),
        run.pct(0.5),
        run.pct(0.99),
        run.errors
    );

    // A fresh gateway and spool for the backlog phases, so that what they measure is "1,000,000 events
    // waiting" rather than that plus the dedup entries of the phases above. Then X goes down and the spool fills.
    settle(&counter);
    drop(gateway);
    let gateway = start_gateway("spool-backlog", None)?;
    let pid = gateway.0.id();
    rt.block_on(post_json(
        fake_addr,
        "/_fake/faults",
        serde_json::json!({"status": 503, "for_secs": 3600}),
        false,
    ));
    let base = rt.block_on(get_json(fake_addr, "/_fake/stats"))["accepted_conversions"]
        .as_u64()
        .unwrap_or(0);
    let fill_started = Instant::now();
    let target = counter.load(Ordering::Relaxed) + args.waiting;
    while counter.load(Ordering::Relaxed) < target {
        let run = rt.block_on(closed_loop(addr, 8, 2, counter.clone(), 100, hundred));
        if run.requests == 0 {
            return Err("the gateway stopped accepting while filling the spool".into());
        }
    }
    let waiting = counter.load(Ordering::Relaxed) - base;
    std::thread::sleep(Duration::from_secs(2));
    let (rss, hwm) = rss_kib(pid);
    let spool_bytes: u64 = std::fs::read_dir(dir.path().join("spool-backlog"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "gateway RSS with {waiting} events waiting: {:.1} MiB (peak {:.1} MiB); spool file {:.0} MiB; filled in {:.1} s",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        spool_bytes as f64 / 1048576.0,
        fill_started.elapsed().as_secs_f64()
    );

    // X is back: how fast does the backlog go out?
    let drain = rt.block_on(async {
        post_json(fake_addr, "/_fake/faults", serde_json::Value::Null, true).await;
        let started = Instant::now();
        let want = base + waiting;
        loop {
            let got = get_json(fake_addr, "/_fake/stats").await["accepted_conversions"]
                .as_u64()
                .unwrap_or(0);
            if got >= want || started.elapsed() > Duration::from_secs(300) {
                return (got.saturating_sub(base), started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    println!(
        "forwarding to fake-x-api, budget lifted: {:>9.0} events/s ({} events in {:.1} s)",
        drain.0 as f64 / drain.1.as_secs_f64(),
        drain.0,
        drain.1.as_secs_f64()
    );
    drop(gateway);
    if !args.no_redis {
        settle(&counter);
        shared.run(|name, redis| start_gateway_on(name, redis, true))?;
    }
    Ok(())
}

/// Phase 6: the shared mode, against the disk spool's rates measured earlier in the run.
struct Shared<'a> {
    rt: &'a tokio::runtime::Runtime,
    args: &'a Args,
    fake_addr: SocketAddr,
    counter: &'a Arc<AtomicU64>,
}

impl Shared<'_> {
    /// The disk spool and the Redis queue side by side, measured in turn for `--rounds` rounds (the
    /// machine moves between runs, as for nginx): single-event and 100-event POSTs, each round's ratio
    /// and their median; then Redis script calls per ingest request.
    fn run(
        &self,
        start_gateway: impl Fn(&str, Option<&str>) -> Result<(Proc, SocketAddr), String>,
    ) -> Result<(), String> {
        let redis = conversion_gateway::redis_store::server::RedisServer::start();
        let redis_pid = redis.pid().ok_or("redis-server is not running")?;
        let (disk, disk_addr) = start_gateway("spool-reference", None)?;
        let (shared, shared_addr) = start_gateway("spool-shared", Some(&redis.url()))?;
        let (secs, conns) = (self.args.seconds, self.args.connections);
        let settle = || self.rt.block_on(settled(self.fake_addr, self.counter));
        // One phase against `addr`: the run, the gateway's CPU and Redis's per request (µs).
        let measure = |addr, pid, connections: usize, per: u64, body: fn(u64, u64) -> String| {
            settle();
            let redis_before = cpu_seconds(redis_pid);
            let (run, cpu) = with_cpu(pid, || {
                self.rt.block_on(closed_loop(
                    addr,
                    connections,
                    secs,
                    self.counter.clone(),
                    per,
                    body,
                ))
            });
            let redis_cpu =
                1e6 * (cpu_seconds(redis_pid) - redis_before) / run.requests.max(1) as f64;
            (run, cpu, redis_cpu)
        };
        let (mut single_ratios, mut hundred_ratios) = (Vec::new(), Vec::new());
        // The disk spool's CPU per event over the Redis queue's (its gateway's and Redis's): what the
        // rates' ratio would be if CPU were all that limited both, less moved by other tenants.
        let (mut single_cpu, mut hundred_cpu) = (Vec::new(), Vec::new());
        for round in 1..=self.args.rounds {
            let (d, dcpu, _) = measure(disk_addr, disk.0.id(), conns, 1, single);
            let (r, rcpu, redis_cpu) = measure(shared_addr, shared.0.id(), conns, 1, single);
            let ratio = 100.0 * r.rps() / d.rps().max(1.0);
            single_ratios.push(ratio);
            single_cpu.push(100.0 * dcpu / (rcpu + redis_cpu).max(f64::EPSILON));
            println!("round {round}: single-event POSTs, disk spool {:>7.0} req/s (p99 {:.2} ms, {dcpu:.1} µs CPU/req); Redis queue {:>7.0} req/s (p99 {:.2} ms, {rcpu:.1} µs/req gateway + {redis_cpu:.1} µs/req Redis) = {ratio:.0}%", d.rps(), d.pct(0.99), r.rps(), r.pct(0.99));
            let c = conns.min(16);
            let (d, dcpu, _) = measure(disk_addr, disk.0.id(), c, 100, hundred);
            let (r, rcpu, redis_cpu) = measure(shared_addr, shared.0.id(), c, 100, hundred);
            let ratio = 100.0 * r.rps() / d.rps().max(1.0);
            hundred_ratios.push(ratio);
            hundred_cpu.push(100.0 * dcpu / (rcpu + redis_cpu).max(f64::EPSILON));
            println!("round {round}: 100-event POSTs, disk spool {:>7.0} events/s (p99 {:.2} ms, {:.2} µs CPU/event); Redis queue {:>7.0} events/s (p99 {:.2} ms, {:.2} µs/event gateway + {:.2} µs/event Redis) = {ratio:.0}%", d.rps() * 100.0, d.pct(0.99), dcpu / 100.0, r.rps() * 100.0, r.pct(0.99), rcpu / 100.0, redis_cpu / 100.0);
        }
        println!(
            "Redis queue against the disk spool, median of {} rounds: single-event POSTs {:.0}% of its req/s, 100-event POSTs {:.0}% of its events/s",
            self.args.rounds,
            median(&mut single_ratios).unwrap_or(0.0),
            median(&mut hundred_ratios).unwrap_or(0.0)
        );
        println!(
            "CPU per event, disk spool over Redis queue (gateway + Redis), median of {} rounds: single-event POSTs {:.0}%, 100-event POSTs {:.0}%",
            self.args.rounds,
            median(&mut single_cpu).unwrap_or(0.0),
            median(&mut hundred_cpu).unwrap_or(0.0)
        );
        drop(disk);
        // Script calls per ingest request, counted by Redis: X down (each batch is retried once a second
        // at most), the background calls of an idle stretch as long subtracted.
        settle();
        self.rt.block_on(post_json(
            self.fake_addr,
            "/_fake/faults",
            serde_json::json!({"status": 503, "for_secs": 3600}),
            false,
        ));
        let calls = || self.rt.block_on(script_calls(&redis.url()));
        std::thread::sleep(Duration::from_secs(2));
        let idle_from = calls()?;
        std::thread::sleep(Duration::from_secs(3));
        let background = calls()?.saturating_sub(idle_from);
        let before = calls()?;
        let run = self.rt.block_on(closed_loop(
            shared_addr,
            conns,
            3,
            self.counter.clone(),
            1,
            single,
        ));
        let during = calls()?.saturating_sub(before);
        println!(
            "Redis script calls per ingest request: {:.3} ({during} calls for {} requests in 3 s, less {background} in an idle 3 s: polls, claim refreshes, budget reads, delivery retries)",
            during.saturating_sub(background) as f64 / run.requests.max(1) as f64,
            run.requests,
        );
        self.rt.block_on(post_json(
            self.fake_addr,
            "/_fake/faults",
            serde_json::Value::Null,
            true,
        ));
        let busiest = self.rt.block_on(command_times(&redis.url()))?;
        let total: u64 = busiest.iter().map(|(_, _, us)| us).sum();
        let top: Vec<String> = busiest
            .iter()
            .take(6)
            .map(|(name, calls, us)| {
                format!(
                    "{name} {:.0}% ({calls} calls)",
                    100.0 * *us as f64 / total.max(1) as f64
                )
            })
            .collect();
        println!(
            "Redis's time in commands, by command (scripts include the commands they run): {}",
            top.join(", ")
        );
        drop(shared);
        Ok(())
    }
}

/// Waits (at most two minutes) until the fake has accepted every event `counter` says was sent: each
/// phase starts from a steady state, not a backlog drain competing for the same two cores.
async fn settled(fake_addr: SocketAddr, counter: &AtomicU64) {
    let before = Instant::now();
    while before.elapsed() < Duration::from_secs(120) {
        let stats = get_json(fake_addr, "/_fake/stats").await;
        if stats["accepted_conversions"].as_u64().unwrap_or(0) >= counter.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every command Redis ran, from `INFO commandstats`: (name, calls, microseconds), busiest first.
async fn command_times(url: &str) -> Result<Vec<(String, u64, u64)>, String> {
    let info = commandstats(url).await?;
    let mut out: Vec<(String, u64, u64)> = info
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| -> Option<u64> {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.parse().ok())
            };
            Some((name.to_owned(), field("calls=")?, field("usec=")?))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.2));
    Ok(out)
}

async fn commandstats(url: &str) -> Result<String, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

/// Lua script calls (EVALSHA, EVAL) Redis has run, from `INFO commandstats`.
async fn script_calls(url: &str) -> Result<u64, String> {
    Ok(command_times(url)
        .await?
        .iter()
        .filter(|(name, _, _)| name == "evalsha" || name == "eval")
        .map(|(_, calls, _)| calls)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::{median, proc_stat};

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [27.0]), Some(27.0));
        assert_eq!(median(&mut [30.0, 22.0, 26.0]), Some(26.0));
        assert_eq!(median(&mut [30.0, 22.0, 26.0, 24.0]), Some(25.0));
    }

    #[test]
    fn reads_its_own_parent_and_cpu_time() {
        // Burn some CPU so that at least one tick is counted.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let (ppid, ticks) = proc_stat(std::process::id()).expect("this process's stat");
        assert_eq!(ppid, std::os::unix::process::parent_id());
        assert!(ticks >= 1, "{ticks}");
    }
}
