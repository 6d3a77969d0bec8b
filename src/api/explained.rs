//! hyper's own error answers, explained: a request hyper cannot parse (a malformed request line or
//! header, two `Content-Length`s, a NUL in a header, headers too large) is answered by hyper itself with
//! `400`, `414` or `431` and an empty body, before any handler runs. hyper has no hook for that answer,
//! so this I/O wrapper recognises it on its way out and writes an `application/problem+json` answer in
//! its place, like every other error of the gateway.
//!
//! # How it is recognised
//! A write that begins with `HTTP/1.x 400 `, `414 ` or `431 `, whose head is complete in that write, says
//! `content-length: 0` and has no `content-type`. Every answer of the gateway's handlers has a
//! `content-type` and a body, so only hyper's automatic answers match. hyper closes the connection after
//! one, so the replacement says `connection: close`.
//!
//! # Invariants
//! The bytes hyper asked to write are reported written only once the replacement is queued; the
//! replacement is written in full before anything else, and before a flush or shutdown completes.
//! Vectored writes are turned off so that a head always arrives in one buffer. On the way in, the request
//! bytes are followed (`framing`) and a head naming both `Content-Length` and `Transfer-Encoding` has its last
//! byte spoiled, so that hyper refuses it; its 400 is then explained as request smuggling.

use super::framing::Framing;
use super::Problem;
use axum::http::StatusCode;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    /// A connection whose parse-error answers carry a problem body.
    pub struct Explained<I> {
        #[pin]
        io: I,
        // The replacement answer and how much of it is written.
        pending: Option<(Vec<u8>, usize)>,
        // The request bytes, followed for a head with both Content-Length and Transfer-Encoding.
        framing: Framing,
        // Such a head was spoiled, so hyper's 400 is about it.
        smuggled: bool,
    }
}

impl<I> Explained<I> {
    pub fn new(io: I) -> Self {
        Explained {
            io,
            pending: None,
            framing: Framing::default(),
            smuggled: false,
        }
    }
}

/// The problem answer for a hyper parse-error head, or `None` when `buf` is not one; `smuggled` when the
/// request it answers named both Content-Length and Transfer-Encoding.
fn replacement(buf: &[u8], smuggled: bool) -> Option<Vec<u8>> {
    // Most writes are the handlers' answers: only a 4xx status line is looked at further.
    if !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.0 4")) {
        return None;
    }
    let head_end = find(buf, b"\r\n\r\n")?;
    let head = std::str::from_utf8(buf.get(..head_end)?).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let rest = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?;
    let code: u16 = rest.get(..3)?.parse().ok()?;
    let problem = match code {
        400 if smuggled => Problem::bad_request(
            "the request has both Content-Length and Transfer-Encoding, which frame its body two ways (request smuggling): send one of them; nothing of it was read",
        ),
        _ => problem_for(code)?,
    };
    let mut kept = Vec::new();
    let mut empty = false;
    for line in lines {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("content-type") {
            return None;
        }
        if name.eq_ignore_ascii_case("content-length") {
            empty = line.split(':').nth(1).map(str::trim) == Some("0");
        } else if !name.eq_ignore_ascii_case("connection") {
            kept.push(line);
        }
    }
    if !empty || buf.len() != head_end + 4 {
        return None;
    }
    let body = serde_json::to_vec(&problem).ok()?;
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n",
        problem.title,
        body.len()
    );
    for line in kept {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

fn problem_for(code: u16) -> Option<Problem> {
    let problem = match code {
        400 => Problem::bad_request(
            "the request is not valid HTTP/1.1 (a malformed request line or header, conflicting \
             Content-Length headers, or a character not allowed in a header): fix the request; nothing of it was read",
        ),
        414 => Problem::new(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "URI too long",
            "the request's target is longer than the gateway reads: events go in the body of POST /v1/events",
        ),
        431 => Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request header fields too large",
            "the request's headers are too large or too many (at most 100 headers and about 400 KiB): send fewer or shorter headers",
        ),
        _ => return None,
    };
    Some(problem)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl<I: AsyncWrite> Explained<I> {
    /// Writes what is left of a replacement; `Ready(Ok)` once nothing is.
    fn poll_pending(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        while let Some((bytes, written)) = this.pending.as_mut() {
            let rest = bytes.get(*written..).unwrap_or(&[]);
            if rest.is_empty() {
                *this.pending = None;
                break;
            }
            let n = ready!(this.io.as_mut().poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead> AsyncRead for Explained<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        ready!(this.io.poll_read(cx, buf))?;
        let read = buf.filled_mut().get_mut(before..).unwrap_or_default();
        for at in this.framing.feed(read) {
            // The head's last byte, spoiled before hyper reads it: hyper refuses the head with 400.
            if let Some(b) = read.get_mut(at) {
                *b = 0x01;
                *this.smuggled = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite> AsyncWrite for Explained<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.as_mut().poll_pending(cx))?;
        let smuggled = self.smuggled;
        if let Some(answer) = replacement(buf, smuggled) {
            *self.as_mut().project().pending = Some((answer, 0));
            // Written or not yet, it is queued: the next write, flush or shutdown finishes it.
            if let Poll::Ready(Err(e)) = self.as_mut().poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_pending(cx))?;
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_pending(cx))?;
        self.project().io.poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn hyper_parse_error_heads_get_a_problem_body() {
        for (code, slug) in [
            (400, "bad-request"),
            (414, "uri-too-long"),
            (431, "headers-too-large"),
        ] {
            let head = format!(
                "HTTP/1.1 {code} Whatever\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 12:00:00 GMT\r\n\r\n"
            );
            let out = text(&replacement(head.as_bytes(), false).unwrap());
            let (head, body) = out.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {code} ")), "{head}");
            assert!(head.contains("content-type: application/problem+json"));
            assert!(head.contains(&format!("content-length: {}", body.len())));
            assert!(head.contains("connection: close"));
            assert!(head.contains("date: Tue, 01 Dec 2026"));
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["status"], code);
            assert_eq!(v["type"], format!("urn:conversion-gateway:problem:{slug}"));
        }
    }

    #[test]
    fn answers_of_the_handlers_pass_unchanged() {
        for buf in [
            // A handler's 400: it has a content type and a body.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 2\r\n\r\n{}"[..],
            // A handler's empty 400 with a content type.
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n",
            // Other statuses, a head split over writes, body bytes.
            b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n",
            b"{\"accepted\":1}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\ntrailing",
        ] {
            assert_eq!(replacement(buf, false), None, "{}", text(buf));
        }
    }

    #[tokio::test]
    async fn a_replacement_is_written_whole_through_a_slow_writer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A duplex pipe of 7 bytes: every write is partial.
        let (a, mut b) = tokio::io::duplex(7);
        let mut io = Explained::new(a);
        let writer = tokio::spawn(async move {
            let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
            io.write_all(head).await.unwrap();
            io.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let got = text(&got);
        assert!(got.starts_with("HTTP/1.1 431 "), "{got}");
        let (_, body) = got.split_once("\r\n\r\n").unwrap();
        assert!(body.contains("headers-too-large"), "{body}");
    }
}
