//! A `redis-server` process of the tests' and the benchmark's own: on a free port, in a temporary
//! directory, with an append-only file fsynced on every write (`appendfsync always`) and no eviction,
//! stopped when dropped. Debian's `redis-server` is installed with apt-get when missing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "redis-server";

pub struct RedisServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one with the durable settings (AOF, `appendfsync always`, `noeviction`).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts one with further `redis-server` arguments (e.g. `["--appendfsync", "everysec"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        install();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "cg-redis-{}-{port}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for redis-server");
        let mut server = RedisServer {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self) {
        let dir = self.dir.display().to_string();
        let log = self.dir.join("redis.log").display().to_string();
        let child = Command::new(BINARY)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &dir, "--save", "", "--daemonize", "no"])
            .args(["--logfile", &log])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--maxmemory-policy", "noeviction"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answers(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {} within 20 s; see {log}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `kill -9`: what it had fsynced stays in its directory.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory (replaying its append-only file).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PING over a plain socket (no client library: this runs before any runtime exists).
fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 64];
    // A server with a password answers too, asking for it.
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf).is_ok_and(|n| {
            let reply = buf.get(..n).unwrap_or_default();
            reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH")
        })
}

use crate::ports::free_port;

/// Installs Debian's redis-server when it is not on the PATH.
fn install() {
    if crate::apt::on_path(BINARY).is_some() {
        return;
    }
    assert!(
        crate::apt::install("redis-server"),
        "redis-server is missing and apt-get install redis-server failed"
    );
    // The package starts a system-wide server on 6379; the tests run their own.
    let _ = Command::new("service")
        .args(["redis-server", "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
