//! A strict scanner over the raw bytes of a client's HTTP/1 stream, run before hyper sees them.
//!
//! hyper (through httparse) is deliberately lenient in places where a proxy must not be, because
//! a lenient proxy in front of a differently lenient backend is how requests get smuggled:
//!
//! * a bare LF ends a line for httparse;
//! * `Content-Length` together with `Transfer-Encoding: chunked` is accepted (the length is
//!   dropped), as is `Transfer-Encoding: identity, chunked`;
//! * identical duplicate `Content-Length` headers are accepted.
//!
//! The scanner follows the message framing itself (request heads, `Content-Length` bodies,
//! chunked bodies and trailers) so that it knows where every head starts, and checks each head
//! for: bare CR or LF, obsolete line folding, invalid header names (including whitespace before
//! the colon), control characters in values, invalid or duplicate `Content-Length`, any
//! `Transfer-Encoding` other than a single `chunked`, and both framing headers at once.
//!
//! A violation is turned into a parse error hyper cannot miss: the byte at which it was found
//! (always inside the head hyper has not finished parsing) is replaced by NUL, which httparse
//! rejects anywhere in a head. hyper then answers 400 and closes the connection, and the head
//! never reaches the proxy, let alone a backend. A framing error inside a chunked body is an I/O
//! error instead: hyper would reject it too, and the connection must not be reused.
//!
//! Once a request asks for `Upgrade` or is a `CONNECT`, the scanner stops: what follows is
//! either a tunnel or, if the backend declines, the proxy closes the connection after the
//! response (see `proxy`).

/// What a scan of one buffer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// Nothing wrong.
    Clean,
    /// A head violates the rules; the byte at `at` must be poisoned.
    Reject { at: usize, reason: &'static str },
    /// The body framing is broken; the connection must fail.
    Fail(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    Trailer,
    /// Tunnel, oversized head (hyper answers 431) or after a rejection: no more scanning.
    Off,
}

/// Facts gathered from the head being scanned.
#[derive(Debug, Default)]
struct Head {
    request_line_seen: bool,
    content_length: Option<u64>,
    content_lengths: u32,
    transfer_encodings: u32,
    upgrade: bool,
    connect: bool,
}

/// The scanner; one per client connection.
#[derive(Debug)]
pub(crate) struct HeadScanner {
    state: State,
    max_head: usize,
    line: Vec<u8>,
    pending_cr: bool,
    head_len: usize,
    head: Head,
    /// Bytes of a head seen and the head not finished yet.
    in_head: bool,
}

const fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`'
        | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

impl HeadScanner {
    /// A scanner for heads of at most `max_head` bytes; longer heads are left to hyper's own
    /// limit (431).
    pub(crate) fn new(max_head: usize) -> Self {
        Self {
            state: State::Head,
            max_head,
            line: Vec::with_capacity(128),
            pending_cr: false,
            head_len: 0,
            head: Head::default(),
            in_head: false,
        }
    }

    /// Whether a request head has started but not finished.
    pub(crate) fn in_head(&self) -> bool {
        self.in_head
    }

    /// Scans the next bytes of the stream.
    pub(crate) fn scan(&mut self, buf: &[u8]) -> Scan {
        let mut i = 0;
        while i < buf.len() {
            match self.state {
                State::Off => return Scan::Clean,
                State::Body(remaining) => {
                    let take = remaining.min((buf.len() - i) as u64);
                    i += take as usize;
                    let left = remaining - take;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::ChunkData(remaining) => {
                    let take = remaining.min((buf.len() - i) as u64);
                    i += take as usize;
                    let left = remaining - take;
                    self.state = if left == 0 {
                        State::ChunkDataCr
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkDataCr => {
                    if buf[i] != b'\r' {
                        return Scan::Fail("chunk data not followed by CRLF");
                    }
                    self.state = State::ChunkDataLf;
                    i += 1;
                }
                State::ChunkDataLf => {
                    if buf[i] != b'\n' {
                        return Scan::Fail("chunk data not followed by CRLF");
                    }
                    self.state = State::ChunkSize;
                    i += 1;
                }
                State::Head => {
                    if let Some(reason) = self.head_byte(buf[i]) {
                        self.state = State::Off;
                        self.in_head = false;
                        return Scan::Reject { at: i, reason };
                    }
                    i += 1;
                }
                State::ChunkSize | State::Trailer => {
                    if let Some(reason) = self.body_line_byte(buf[i]) {
                        self.state = State::Off;
                        return Scan::Fail(reason);
                    }
                    i += 1;
                }
            }
        }
        Scan::Clean
    }

    /// One byte of a head; `Some(reason)` on a violation.
    fn head_byte(&mut self, b: u8) -> Option<&'static str> {
        if self.pending_cr {
            self.pending_cr = false;
            if b != b'\n' {
                return Some("bare CR in request head");
            }
            return self.end_head_line();
        }
        self.in_head = true;
        self.head_len += 1;
        if self.head_len > self.max_head {
            // hyper's own limit answers 431.
            self.state = State::Off;
            self.in_head = false;
            return None;
        }
        match b {
            b'\r' => self.pending_cr = true,
            b'\n' => return Some("bare LF in request head"),
            _ => self.line.push(b),
        }
        None
    }

    fn end_head_line(&mut self) -> Option<&'static str> {
        let result = self.head_line();
        self.line.clear();
        result
    }

    fn head_line(&mut self) -> Option<&'static str> {
        let line = self.line.as_slice();
        if !self.head.request_line_seen {
            if line.is_empty() {
                // Empty lines before the request line are ignored (RFC 9112 section 2.2).
                return None;
            }
            self.head.request_line_seen = true;
            self.head.connect = line.starts_with(b"CONNECT ");
            return None;
        }
        if line.is_empty() {
            return self.end_of_head();
        }
        if matches!(line[0], b' ' | b'\t') {
            return Some("obsolete line folding");
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Some("header line without colon");
        };
        let (name, value) = (&line[..colon], trim_ows(&line[colon + 1..]));
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Some("invalid header name");
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Some("control character in header value");
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            self.head.content_lengths += 1;
            if self.head.content_lengths > 1 {
                return Some("duplicate Content-Length");
            }
            if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                return Some("invalid Content-Length");
            }
            let length = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            self.head.content_length = Some(length);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encodings += 1;
            if self.head.transfer_encodings > 1 {
                return Some("duplicate Transfer-Encoding");
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Some("Transfer-Encoding other than chunked");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.head.upgrade = true;
        }
        None
    }

    fn end_of_head(&mut self) -> Option<&'static str> {
        let head = std::mem::take(&mut self.head);
        self.head_len = 0;
        self.in_head = false;
        if head.transfer_encodings > 0 && head.content_lengths > 0 {
            return Some("both Content-Length and Transfer-Encoding");
        }
        self.state = if head.connect || head.upgrade {
            State::Off
        } else if head.transfer_encodings > 0 {
            State::ChunkSize
        } else {
            match head.content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        };
        None
    }

    /// One byte of a chunk-size line or a trailer line; `Some(reason)` on a framing error.
    fn body_line_byte(&mut self, b: u8) -> Option<&'static str> {
        if self.pending_cr {
            self.pending_cr = false;
            if b != b'\n' {
                return Some("bare CR in chunked framing");
            }
            let result = self.body_line();
            self.line.clear();
            return result;
        }
        match b {
            b'\r' => self.pending_cr = true,
            b'\n' => return Some("bare LF in chunked framing"),
            _ if self.line.len() >= self.max_head => return Some("chunk line too long"),
            _ => self.line.push(b),
        }
        None
    }

    fn body_line(&mut self) -> Option<&'static str> {
        if self.state == State::Trailer {
            if self.line.is_empty() {
                self.state = State::Head;
            }
            return None;
        }
        let digits = self
            .line
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if digits == 0 || digits > 16 {
            return Some("invalid chunk size");
        }
        let rest = &self.line[digits..];
        let rest = trim_ows(rest);
        if !rest.is_empty() && rest[0] != b';' {
            return Some("invalid chunk size");
        }
        let size = self.line[..digits].iter().fold(0u64, |n, &d| {
            let v = (d as char).to_digit(16).unwrap_or(0);
            (n << 4) | u64::from(v)
        });
        self.state = if size == 0 {
            State::Trailer
        } else {
            State::ChunkData(size)
        };
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Scan {
        let mut s = HeadScanner::new(64 * 1024);
        s.scan(input)
    }

    fn scan_bytewise(input: &[u8]) -> Scan {
        let mut s = HeadScanner::new(64 * 1024);
        for (i, b) in input.iter().enumerate() {
            match s.scan(std::slice::from_ref(b)) {
                Scan::Clean => {}
                Scan::Reject { reason, .. } => return Scan::Reject { at: i, reason },
                other => return other,
            }
        }
        Scan::Clean
    }

    #[test]
    fn clean_requests_pipeline() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel\nl\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            3;ext=1\r\na\nb\r\n0\r\nX-Trailer: v\r\n\r\n\
            GET /z HTTP/1.1\r\nHost: a\r\nX: a\tb\r\n\r\n";
        assert_eq!(scan_all(input), Scan::Clean);
        assert_eq!(scan_bytewise(input), Scan::Clean);
    }

    #[test]
    fn smuggling_heads_are_rejected_where_found() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                "other than chunked",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
                "header name",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "duplicate Content-Length",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                "folding",
            ),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF"),
            (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", "bare CR"),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "duplicate Transfer-Encoding",
            ),
        ];
        for (input, want) in cases {
            for result in [scan_all(input), scan_bytewise(input)] {
                match result {
                    Scan::Reject { at, reason } => {
                        assert!(reason.contains(want), "{reason} for {input:?}");
                        assert!(at < input.len());
                    }
                    other => panic!("{other:?} for {:?}", String::from_utf8_lossy(input)),
                }
            }
        }
    }

    #[test]
    fn second_pipelined_head_is_checked() {
        let input = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
            GET / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(scan_all(input), Scan::Reject { .. }));
    }

    #[test]
    fn broken_chunks_fail() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n";
        assert!(matches!(scan_all(input), Scan::Fail(_)));
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(scan_all(input), Scan::Fail(_)));
    }

    #[test]
    fn upgrade_stops_scanning() {
        let input = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\n\r\x00";
        assert_eq!(scan_all(input), Scan::Clean);
    }

    #[test]
    fn in_head_tracks_progress() {
        let mut s = HeadScanner::new(1024);
        assert!(!s.in_head());
        assert_eq!(s.scan(b"GET / HT"), Scan::Clean);
        assert!(s.in_head());
        assert_eq!(s.scan(b"TP/1.1\r\n\r\n"), Scan::Clean);
        assert!(!s.in_head());
    }
}
