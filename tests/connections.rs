//! The gateway as a raw TCP client sees it: hyper's parse-error answers carry problem bodies, headers
//! must arrive within `server.header_timeout` and a body within `server.body_timeout`, idle keep-alive
//! connections are closed after `server.idle_timeout`, and a stop refuses new connections and is never
//! held up by a client trickling headers.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn ingest_addr(stack: &Stack) -> SocketAddr {
    stack
        .ingest_url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .parse()
        .unwrap()
}

/// Writes `request` on a fresh connection and reads until the server closes it.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code, the head and the JSON body of an answer that must be a problem.
fn problem(answer: &str) -> (u16, String, serde_json::Value) {
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {answer:?}"));
    let code = head.get(9..12).unwrap().parse().unwrap();
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert!(
        lower.contains(&format!("content-length: {}", body.len())),
        "{head}"
    );
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (code, head.to_owned(), json)
}

#[test]
fn requests_hyper_cannot_parse_get_problem_bodies() {
    let stack = start_stack();
    let addr = ingest_addr(&stack);
    let post = "POST /v1/events HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n";

    let two_lengths = format!("{post}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}");
    let (code, _, body) = problem(&exchange(addr, two_lengths.as_bytes()));
    assert_eq!(code, 400);
    assert_eq!(body["type"], "urn:conversion-gateway:problem:bad-request");
    assert!(body["detail"].as_str().unwrap().contains("Content-Length"));

    let nul = format!("{post}X-Note: a\0b\r\nContent-Length: 2\r\n\r\n{{}}");
    let (code, _, _) = problem(&exchange(addr, nul.as_bytes()));
    assert_eq!(code, 400);

    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let too_many = format!("{post}{many}Content-Length: 2\r\n\r\n{{}}");
    let (code, _, body) = problem(&exchange(addr, too_many.as_bytes()));
    assert_eq!(code, 431);
    assert_eq!(
        body["type"],
        "urn:conversion-gateway:problem:headers-too-large"
    );

    // The handlers' own errors are unchanged: still one problem each, on a connection kept open.
    let unknown = exchange(
        addr,
        b"GET /nowhere HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n",
    );
    let (code, _, body) = problem(&unknown);
    assert_eq!(code, 404);
    assert_eq!(body["type"], "urn:conversion-gateway:problem:not-found");
    // And the gateway still serves after all of them.
    assert!(get_ok(&format!("{}/readyz", stack.admin_url)));
}

/// Opens a connection that sends a request's first line and then one header byte every 100 ms, until
/// the server closes it; returns when it did.
fn trickle(addr: SocketAddr) -> std::thread::JoinHandle<Duration> {
    let mut tcp = TcpStream::connect(addr).unwrap();
    std::thread::spawn(move || {
        let start = Instant::now();
        let _ = tcp.write_all(b"POST /v1/events HTTP/1.1\r\nHost: gateway\r\nX-Slow: ");
        while start.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(100));
            if tcp.write_all(b"a").is_err() {
                break;
            }
            // A closed connection shows as EOF on a read that does not block.
            tcp.set_nonblocking(true).unwrap();
            let mut one = [0u8; 1];
            let closed = matches!(tcp.read(&mut one), Ok(0));
            tcp.set_nonblocking(false).unwrap();
            if closed {
                break;
            }
        }
        start.elapsed()
    })
}

#[test]
fn headers_must_arrive_within_the_header_timeout() {
    let stack = start_stack_with(
        "CANARY-consumer-secret",
        &[("GATEWAY_SERVER__HEADER_TIMEOUT", "1s")],
    );
    let slow = trickle(ingest_addr(&stack));
    let held = slow.join().unwrap();
    // Cut off by the timeout, not by the test's own two-minute limit.
    assert!(held < Duration::from_secs(60), "held for {held:?}");
    assert!(get_ok(&format!("{}/readyz", stack.admin_url)));
}

#[test]
fn a_stop_refuses_new_connections_and_is_not_held_by_trickling_headers() {
    let mut stack = start_stack_with(
        "CANARY-consumer-secret",
        &[
            ("GATEWAY_SERVER__HEADER_TIMEOUT", "5m"),
            ("GATEWAY_SERVER__SHUTDOWN_TIMEOUT", "5m"),
        ],
    );
    let addr = ingest_addr(&stack);
    let slow = trickle(addr);
    // An idle keep-alive connection, too.
    let idle = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stack.gateway.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    let refused = TcpStream::connect(addr).is_err();
    let alive = stack.gateway.child.try_wait().unwrap().is_none();
    assert!(
        refused && alive,
        "while stopping, new connections are refused (refused {refused}, still running {alive})"
    );
    let exited = stack.gateway.wait_exit(Duration::from_secs(120));
    let status = exited.expect("the gateway did not exit");
    assert!(status.success(), "{status:?}\n{}", stack.gateway.log_text());
    let held = slow.join().unwrap();
    // Five minutes of header timeout and of shutdown timeout: a prompt exit means the stop cut it off.
    assert!(
        held < Duration::from_secs(60),
        "the trickler held on for {held:?}"
    );
    drop(idle);
}

/// A body sent a byte at a time is cut off at `server.body_timeout` with a 408 that says so; nothing
/// of it is kept.
#[test]
fn a_body_sent_a_byte_at_a_time_is_cut_off_at_the_body_timeout() {
    let stack = start_stack_with(
        "CANARY-consumer-secret",
        &[("GATEWAY_SERVER__BODY_TIMEOUT", "2s")],
    );
    let body = br#"{"event": "purchase", "twclid": "t", "conversion_id": "slow-1"}"#;
    let mut tcp = TcpStream::connect(ingest_addr(&stack)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).unwrap();
    let start = Instant::now();
    let mut answer = Vec::new();
    for byte in body {
        if tcp.write_all(&[*byte]).is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {} // nothing yet
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    let cut = start.elapsed();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    answer.extend_from_slice(&rest);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (code, _, json) = problem(&answer);
    assert_eq!(code, 408, "{answer}");
    assert!(
        json["detail"]
            .as_str()
            .unwrap()
            .contains("server.body_timeout"),
        "{json}"
    );
    assert!(
        cut >= Duration::from_secs(2) && cut < Duration::from_secs(15),
        "{cut:?}"
    );
    assert!(
        (cut.as_millis() as usize) < body.len() * 400,
        "cut off before the body was whole"
    );
}

/// A keep-alive connection with nothing to do is closed after `server.idle_timeout`; one in use is not.
#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    let stack = start_stack_with(
        "CANARY-consumer-secret",
        &[
            ("GATEWAY_SERVER__IDLE_TIMEOUT", "1s"),
            ("GATEWAY_SERVER__HEADER_TIMEOUT", "30s"),
        ],
    );
    let mut tcp = TcpStream::connect(ingest_addr(&stack)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    // Busy for longer than the idle timeout: a request every 300 ms keeps it open.
    let mut buf = [0u8; 4096];
    for _ in 0..6 {
        tcp.write_all(request.as_bytes()).unwrap();
        let n = tcp.read(&mut buf).unwrap();
        assert!(
            n > 0 && buf.starts_with(b"HTTP/1.1 "),
            "closed while in use"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let idle_from = Instant::now();
    let n = tcp.read(&mut buf).unwrap_or(0);
    let closed_after = idle_from.elapsed();
    assert_eq!(n, 0, "the server closes the idle connection");
    assert!(
        closed_after >= Duration::from_millis(500) && closed_after < Duration::from_secs(10),
        "{closed_after:?}"
    );
}

/// Beyond `server.max_connections` a new ingest connection is closed at once (counted), not queued;
/// the admin listener has its own room and keeps answering; closing some makes room again.
#[test]
fn beyond_max_connections_new_ones_are_closed_at_once_and_the_admin_side_answers() {
    let stack = start_stack_with(
        "CANARY-consumer-secret",
        &[
            ("GATEWAY_SERVER__MAX_CONNECTIONS", "20"),
            ("GATEWAY_SERVER__HEADER_TIMEOUT", "60s"),
        ],
    );
    let addr = ingest_addr(&stack);
    let mut held: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed_at_once = |addr| {
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let start = Instant::now();
        let mut one = [0u8; 1];
        let n = extra.read(&mut one).unwrap_or(1);
        (n == 0, start.elapsed())
    };
    let (closed, after) = closed_at_once(addr);
    assert!(
        closed && after < Duration::from_secs(2),
        "{closed} after {after:?}"
    );
    assert!(get_ok(&format!("{}/livez", stack.admin_url)));
    let admin: SocketAddr = stack
        .admin_url
        .strip_prefix("http://")
        .unwrap()
        .parse()
        .unwrap();
    let metrics = exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n",
    );
    let refused = metric_sample(
        &metrics,
        "conversion_gateway_connections_refused_total{listener=\"ingest\"}",
    );
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    // Room again once some close.
    held.truncate(10);
    std::thread::sleep(Duration::from_millis(500));
    let answer = exchange(
        addr,
        b"GET /v1/events HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

/// A body with a bad chunk, or a request framed both by Content-Length and Transfer-Encoding, gets 400 and is
/// not taken: nothing of it reaches X.
#[test]
fn a_bad_chunk_gets_400_and_nothing_is_taken() {
    let stack = start_stack();
    let addr = ingest_addr(&stack);
    let event =
        r#"{"account": "acme", "event": "purchase", "twclid": "t", "conversion_id": "sent-once"}"#;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
    );
    let bad_chunk = format!("{head}Transfer-Encoding: chunked\r\n\r\nzz\r\n{event}\r\n0\r\n\r\n");
    let (code, _, _) = problem(&exchange(addr, bad_chunk.as_bytes()));
    assert_eq!(code, 400);
    // Both framings at once (request smuggling), in either order, also behind an ordinary request on
    // the same connection: 400 naming the two headers, the event not taken.
    let chunked = format!("{:x}\r\n{event}\r\n0\r\n\r\n", event.len());
    let smuggled = [
        format!("{head}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}", chunked.len()),
        format!("{head}Transfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{chunked}", event.len()),
        format!("GET /livez HTTP/1.1\r\nHost: gateway\r\n\r\n{head}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"),
    ];
    for request in smuggled {
        let answer = exchange(addr, request.as_bytes());
        let last = answer.rfind("HTTP/1.1 ").unwrap();
        let (code, _, body) = problem(&answer[last..]);
        assert_eq!(code, 400, "{answer}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("both Content-Length and Transfer-Encoding"),
            "{detail}"
        );
    }
    // The same event sent properly goes through: the one above was refused, not lost in transit.
    let proper = format!(
        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{event}",
        event.len()
    );
    assert!(exchange(addr, proper.as_bytes()).starts_with("HTTP/1.1 202"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let got = rt.block_on(async {
        eventually(Duration::from_secs(10), async || {
            let ids = received_ids(&http, &stack.fake_url).await;
            (!ids.is_empty()).then_some(ids)
        })
        .await
    });
    assert_eq!(
        got.unwrap(),
        ["sent-once"],
        "delivered once, from the proper request only"
    );
}
