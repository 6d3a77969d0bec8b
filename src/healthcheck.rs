//! `conversion-gateway healthcheck`: asks the running gateway's admin listener whether it is ready (or
//! live), for container health checks in images that have no curl. Plain HTTP/1.1 over a socket with
//! timeouts: no runtime, nothing to install.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// The address to reach a listener bound to `listen` from the same host (a wildcard becomes loopback).
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `Ok(())` when `GET path` on `addr` answers 200 within `timeout`; else what went wrong.
pub fn check(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    // One write: `write!` would send the request in pieces, and a peer that answers after its first
    // read and closes would see the rest arrive on a closed socket (EPIPE here).
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send to {addr}: {e}"))?;
    let mut answer = Vec::new();
    // A short answer: read until the peer closes or the limit is reached.
    let _ = stream.take(64 * 1024).read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| format!("no HTTP answer from {addr}{path}"))?;
    if status == "200" {
        Ok(())
    } else {
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        Err(format!("{addr}{path} answered {status}: {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(answer.as_bytes());
        });
        addr
    }

    #[test]
    fn ready_unready_and_nobody_listening() {
        let t = Duration::from_secs(5);
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n");
        assert_eq!(check(ok, "/readyz", t), Ok(()));
        let full = serve_once(
            "HTTP/1.1 503 Service Unavailable\r\n\r\n{\"detail\":\"the spool is full\"}",
        );
        let e = check(full, "/readyz", t).unwrap_err();
        assert!(e.contains("503") && e.contains("spool is full"), "{e}");
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(check(closed, "/readyz", t)
            .unwrap_err()
            .contains("cannot connect"));
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        let a = local_address("0.0.0.0:9090".parse().unwrap());
        assert_eq!(a, "127.0.0.1:9090".parse().unwrap());
        let a = local_address("[::]:9090".parse().unwrap());
        assert_eq!(a, "[::1]:9090".parse().unwrap());
        let a = local_address("10.1.2.3:9090".parse().unwrap());
        assert_eq!(a, "10.1.2.3:9090".parse().unwrap());
    }
}
