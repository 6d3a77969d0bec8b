//! Request smuggling: a request that carries both `Content-Length` and `Transfer-Encoding` is refused.
//!
//! hyper follows RFC 9112 §6.3 for such a request: it frames the body by `Transfer-Encoding`, drops the
//! `Content-Length` before a handler can see it, and closes the connection after the answer. A proxy in
//! front of the gateway may have framed the same bytes by `Content-Length`, which is how smuggling works; the
//! RFC lets a server reject the request instead, and the gateway does: `400`, nothing of it read.
//!
//! # How
//! `Framing` follows the bytes a connection reads, message by message (head, then a body of
//! `Content-Length` bytes or chunks), and says so at the last byte of a head that names both. The caller
//! (`explained`) then spoils that byte before hyper reads it, so that hyper refuses the head with its own
//! `400`, which `explained` answers with a problem naming the two headers. hyper never parses the request,
//! so no handler runs and no event is taken.
//!
//! # Invariants
//! Pure: no I/O, bounded memory (a head is kept until `MAX_HEAD` bytes, then the connection is no longer
//! followed: hyper answers such a head with `431` itself). Bytes it cannot follow (a malformed chunk size,
//! an upgrade) end the following for the connection; hyper refuses what is malformed, and still closes
//! after a request with both headers.

/// A head longer than this is hyper's to refuse (`431`); it is not followed further.
pub const MAX_HEAD: usize = 512 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading a head (its bytes so far).
    Head(Vec<u8>),
    /// `n` body bytes left.
    Body(u64),
    /// A chunk-size line (its bytes so far).
    ChunkSize(Vec<u8>),
    /// `n` chunk bytes left, then CRLF.
    ChunkData(u64),
    /// The CRLF after a chunk's data: how many of its bytes were seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, until an empty one (the current line so far).
    Trailers(Vec<u8>),
    /// No longer followed.
    Lost,
}

/// Follows one connection's request bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framing {
    state: State,
}

impl Default for Framing {
    fn default() -> Self {
        Framing {
            state: State::Head(Vec::new()),
        }
    }
}

/// What the last head named.
#[derive(Default)]
struct Head {
    content_length: Option<u64>,
    has_length: bool,
    chunked: bool,
    has_te: bool,
    upgrade: bool,
}

/// Reads the framing headers of a head, byte by byte: this runs for every request, so it allocates nothing.
fn parse_head(head: &[u8]) -> Head {
    let mut h = Head::default();
    for line in head.split(|b| *b == b'\n').skip(1) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, rest) = line.split_at(colon);
        let (name, value) = (
            name.trim_ascii(),
            rest.get(1..).unwrap_or_default().trim_ascii(),
        );
        if name.eq_ignore_ascii_case(b"content-length") {
            h.has_length = true;
            h.content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            h.has_te = true;
            h.chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            h.upgrade = true;
        }
    }
    h
}

impl Framing {
    /// Feeds the bytes just read; answers the offset (in `bytes`) of the last byte of each head that names
    /// both `Content-Length` and `Transfer-Encoding`.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<usize> {
        let mut found = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::Lost => break,
                State::Head(head) => {
                    let b = bytes[i];
                    // Empty lines before a request line are allowed and skipped.
                    if head.is_empty() && (b == b'\r' || b == b'\n') {
                        i += 1;
                        continue;
                    }
                    head.push(b);
                    i += 1;
                    if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
                        let h = parse_head(head);
                        if h.has_length && h.has_te {
                            found.push(i - 1);
                            // hyper refuses it and closes the connection: nothing after it is read.
                            self.state = State::Lost;
                        } else if h.upgrade {
                            self.state = State::Lost;
                        } else if h.has_te {
                            self.state = if h.chunked {
                                State::ChunkSize(Vec::new())
                            } else {
                                State::Lost
                            };
                        } else {
                            self.state = match (h.has_length, h.content_length) {
                                (true, None) => State::Lost,
                                (_, Some(n)) if n > 0 => State::Body(n),
                                _ => State::Head(Vec::new()),
                            };
                        }
                    } else if head.len() > MAX_HEAD {
                        self.state = State::Lost;
                    }
                }
                State::Body(n) => {
                    let take = (*n).min((bytes.len() - i) as u64);
                    *n -= take;
                    i += take as usize;
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => {
                    let b = bytes[i];
                    i += 1;
                    if b != b'\n' {
                        line.push(b);
                        if line.len() > 1024 {
                            self.state = State::Lost;
                        }
                        continue;
                    }
                    let text = String::from_utf8_lossy(line);
                    let size = text.split(';').next().unwrap_or("").trim();
                    self.state = match u64::from_str_radix(size, 16) {
                        Ok(0) => State::Trailers(Vec::new()),
                        Ok(n) => State::ChunkData(n),
                        Err(_) => State::Lost,
                    };
                }
                State::ChunkData(n) => {
                    let take = (*n).min((bytes.len() - i) as u64);
                    *n -= take;
                    i += take as usize;
                    if *n == 0 {
                        self.state = State::ChunkEnd(0);
                    }
                }
                State::ChunkEnd(seen) => {
                    let b = bytes[i];
                    i += 1;
                    self.state = match (*seen, b) {
                        (0, b'\r') => State::ChunkEnd(1),
                        (_, b'\n') => State::ChunkSize(Vec::new()),
                        _ => State::Lost,
                    };
                }
                State::Trailers(line) => {
                    let b = bytes[i];
                    i += 1;
                    if b != b'\n' {
                        line.push(b);
                        if line.len() > MAX_HEAD {
                            self.state = State::Lost;
                        }
                        continue;
                    }
                    if line.is_empty() || line.as_slice() == b"\r" {
                        self.state = State::Head(Vec::new());
                    } else {
                        line.clear();
                    }
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SMUGGLED: &[u8] = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    fn ends_of_heads(stream: &[u8], splits: &[usize]) -> Vec<usize> {
        let mut f = Framing::default();
        let mut at = 0;
        let mut found = Vec::new();
        let mut cuts: Vec<usize> = splits.iter().map(|s| s % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort();
        for cut in cuts {
            found.extend(f.feed(&stream[at..cut]).into_iter().map(|o| o + at));
            at = cut;
        }
        found
    }

    #[test]
    fn both_headers_are_found_at_the_last_byte_of_the_head_in_either_order() {
        let head_end = SMUGGLED.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
        assert_eq!(ends_of_heads(SMUGGLED, &[]), [head_end]);
        let reversed =
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(ends_of_heads(reversed, &[]), [reversed.len() - 1]);
    }

    #[test]
    fn it_is_found_behind_requests_of_every_framing_on_one_connection() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.extend_from_slice(b"POST /v1/events HTTP/1.1\r\nContent-Length: 30\r\n\r\n");
        // A body that looks like a smuggled head is a body.
        stream.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        stream.extend_from_slice(b"POST /v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        stream.extend_from_slice(
            b"1a;ext=1\r\nContent-Length: 5\r\n\r\nabcde\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        let before = stream.len();
        stream.extend_from_slice(SMUGGLED);
        let head_end = before + SMUGGLED.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
        assert_eq!(ends_of_heads(&stream, &[]), [head_end]);
    }

    #[test]
    fn ordinary_requests_are_never_flagged() {
        for stream in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"\r\nGET / HTTP/1.1\n\n",
        ] {
            assert!(ends_of_heads(stream, &[]).is_empty());
        }
    }

    proptest! {
        /// However the bytes arrive, the same head is found, at the same byte.
        #[test]
        fn reads_of_any_size_find_the_same(splits in prop::collection::vec(any::<usize>(), 0..8), prefix in 0usize..3) {
            let mut stream = Vec::new();
            for _ in 0..prefix {
                stream.extend_from_slice(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
            }
            let at = stream.len();
            stream.extend_from_slice(SMUGGLED);
            let want = at + SMUGGLED.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
            prop_assert_eq!(ends_of_heads(&stream, &splits), vec![want]);
        }

        #[test]
        fn any_bytes_never_panic_and_offsets_are_inside(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let mut f = Framing::default();
            for o in f.feed(&bytes) {
                prop_assert!(o < bytes.len());
            }
        }
    }
}
