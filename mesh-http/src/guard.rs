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
//! `Transfer-Encoding` other than a single `chunked`, both framing headers at once, and the
//! Host rules of RFC 9112 section 3.2 (exactly one Host in HTTP/1.1, a valid `host[:port]`).
//! Chunked bodies are checked against RFC 9112 section 7.1: hex sizes that fit 64 bits,
//! well-formed extensions, CRLF (never a bare CR or LF) after every size line and every chunk,
//! and valid trailer field lines.
//!
//! A head violation is turned into a parse error hyper cannot miss: the byte at which it was
//! found (always inside the head hyper has not finished parsing) is replaced by NUL, which
//! httparse rejects anywhere in a head. hyper then answers `400` with `connection: close`, and
//! the head never reaches the proxy, let alone a backend. A framing error inside a chunked body
//! (found after the head was routed) fails the stream just before the offending byte: hyper
//! fails the request body, the upstream request is abandoned unfinished, and the proxy answers
//! `400` with `Connection: close` unless a response has already started (then the connection
//! is closed).
//!
//! Once a request asks for `Upgrade` or is a `CONNECT`, the scanner stops: what follows is
//! either a tunnel or, if the backend declines, the proxy closes the connection after the
//! response (see `proxy`).

use crate::rejection::Rejection;

/// Most bytes of chunk extensions in one request body. hyper fails a body past 16 KiB of
/// extensions; refusing earlier keeps the scanner, not hyper, the one that decides (and answers
/// 400). Nothing in HTTP uses chunk extensions for more than a few bytes.
pub(crate) const MAX_CHUNK_EXTENSION_BYTES: usize = 8 * 1024;
/// Longest chunk-size line: the size, whitespace and this body's extensions.
const MAX_CHUNK_LINE: usize = MAX_CHUNK_EXTENSION_BYTES + 64;

/// What a scan of one buffer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    /// Nothing wrong.
    Clean,
    /// A head violates the rules; the byte at `at` must be poisoned.
    Reject { at: usize, why: Rejection },
    /// The body framing of request number `request` (counted from 1 on this connection) is
    /// broken at `at`: the bytes before it may be delivered, then the stream must fail.
    Fail {
        at: usize,
        why: Rejection,
        request: u64,
    },
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
    /// HTTP/1.1 (not 1.0): a Host field is required.
    requires_host: bool,
    hosts: u32,
    content_length: Option<u64>,
    content_lengths: u32,
    transfer_encodings: u32,
    upgrade: bool,
    connect: bool,
}

/// Counters of the chunked body being scanned, reset with each head.
#[derive(Debug, Default)]
struct Chunked {
    extension_bytes: usize,
    trailers: usize,
    trailer_bytes: usize,
}

/// The scanner; one per client connection.
#[derive(Debug)]
pub(crate) struct HeadScanner {
    state: State,
    max_head: usize,
    max_headers: usize,
    line: Vec<u8>,
    pending_cr: bool,
    head_len: usize,
    head: Head,
    chunked: Chunked,
    /// Heads completed so far: the number of the request whose body is being scanned.
    heads: u64,
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

fn skip_bws(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    value
}

/// Splits a field line (RFC 9112 section 5) into name and trimmed value, or says why it is not
/// one.
fn field_line(line: &[u8]) -> Result<(&[u8], &[u8]), Rejection> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(Rejection::ObsFold);
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(Rejection::HeaderWithoutColon);
    };
    let (name, value) = line.split_at(colon);
    let value = trim_ows(value.get(1..).unwrap_or_default());
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Rejection::InvalidHeaderName);
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Rejection::InvalidHeaderValue);
    }
    Ok((name, value))
}

const fn is_unreserved(b: u8) -> bool {
    matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~')
}

const fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

/// `reg-name` or `IPv4address` of RFC 3986 (the second is a case of the first).
fn is_reg_name(name: &[u8]) -> bool {
    let mut rest = name;
    while let [first, tail @ ..] = rest {
        if *first == b'%' {
            let [a, b, tail @ ..] = tail else {
                return false;
            };
            if !a.is_ascii_hexdigit() || !b.is_ascii_hexdigit() {
                return false;
            }
            rest = tail;
        } else if is_unreserved(*first) || is_sub_delim(*first) {
            rest = tail;
        } else {
            return false;
        }
    }
    true
}

/// The inside of an RFC 3986 `IP-literal`: an IPv6 address or `IPvFuture`.
fn is_ip_literal(inner: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = inner {
        let Some(dot) = rest.iter().position(|&b| b == b'.') else {
            return false;
        };
        let (version, tail) = rest.split_at(dot);
        let tail = tail.get(1..).unwrap_or_default();
        return !version.is_empty()
            && version.iter().all(u8::is_ascii_hexdigit)
            && !tail.is_empty()
            && tail
                .iter()
                .all(|&b| is_unreserved(b) || is_sub_delim(b) || b == b':');
    }
    std::str::from_utf8(inner)
        .ok()
        .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
        .is_some()
}

/// A Host field value: `uri-host [ ":" port ]` (RFC 9110 section 7.2, RFC 3986 section 3.2.2).
/// The port must also be a TCP port (at most 65535), which RFC 3986's `*DIGIT` does not say but
/// no peer can mean anything else.
pub(crate) fn is_valid_host(value: &[u8]) -> bool {
    let (host_ok, port) = if let [b'[', rest @ ..] = value {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let (inner, after) = rest.split_at(end);
        let after = after.get(1..).unwrap_or_default();
        let port = match after {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return false,
        };
        (is_ip_literal(inner), port)
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(colon) => {
                let (host, port) = value.split_at(colon);
                (is_reg_name(host), Some(port.get(1..).unwrap_or_default()))
            }
            None => (is_reg_name(value), None),
        }
    };
    let port_ok = port.is_none_or(|port| {
        port.iter().all(u8::is_ascii_digit)
            && port.iter().fold(0u32, |n, d| {
                n.saturating_mul(10).saturating_add(u32::from(d - b'0'))
            }) <= 65535
    });
    host_ok && port_ok
}

/// A chunk extension's value: a token or a quoted-string.
fn take_ext_value(rest: &[u8]) -> Option<&[u8]> {
    if let [b'"', after_quote @ ..] = rest {
        let mut tail = after_quote;
        loop {
            match tail {
                [b'"', after @ ..] => return Some(after),
                [b'\\', quoted, after @ ..] => {
                    if (*quoted < 0x20 && *quoted != b'\t') || *quoted == 0x7f {
                        return None;
                    }
                    tail = after;
                }
                [b, after @ ..] if (*b >= 0x20 || *b == b'\t') && *b != 0x7f => tail = after,
                _ => return None,
            }
        }
    }
    let len = rest.iter().take_while(|&&b| is_tchar(b)).count();
    (len > 0).then(|| rest.get(len..).unwrap_or_default())
}

/// `*( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )` (RFC 9112 section 7.1.1).
fn is_chunk_ext(mut rest: &[u8]) -> bool {
    loop {
        rest = skip_bws(rest);
        let [b';', tail @ ..] = rest else {
            return rest.is_empty();
        };
        let tail = skip_bws(tail);
        let name = tail.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return false;
        }
        rest = tail.get(name..).unwrap_or_default();
        let after_name = skip_bws(rest);
        if let [b'=', value @ ..] = after_name {
            match take_ext_value(skip_bws(value)) {
                Some(after) => rest = after,
                None => return false,
            }
        }
    }
}

impl HeadScanner {
    /// A scanner for heads of at most `max_head` bytes (longer heads are left to hyper's own
    /// limit: 431) and bodies whose trailers stay within half of `max_head` and `max_headers`
    /// (hyper fails a body at the full limits; the scanner must decide first).
    pub(crate) fn new(max_head: usize, max_headers: usize) -> Self {
        Self {
            state: State::Head,
            max_head,
            max_headers,
            line: Vec::with_capacity(128),
            pending_cr: false,
            head_len: 0,
            head: Head::default(),
            chunked: Chunked::default(),
            heads: 0,
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
        while let Some(&byte) = buf.get(i) {
            let (at, request) = (i, self.heads);
            let fail = |why| Scan::Fail { at, why, request };
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
                State::ChunkDataCr | State::ChunkDataLf => {
                    let (want, next) = if self.state == State::ChunkDataCr {
                        (b'\r', State::ChunkDataLf)
                    } else {
                        (b'\n', State::ChunkSize)
                    };
                    if byte != want {
                        self.state = State::Off;
                        return fail(Rejection::ChunkDataWithoutCrlf);
                    }
                    self.state = next;
                    i += 1;
                }
                State::Head => {
                    if let Some(why) = self.head_byte(byte) {
                        self.state = State::Off;
                        self.in_head = false;
                        return Scan::Reject { at: i, why };
                    }
                    i += 1;
                }
                State::ChunkSize | State::Trailer => {
                    if let Some(why) = self.body_line_byte(byte) {
                        self.state = State::Off;
                        return fail(why);
                    }
                    i += 1;
                }
            }
        }
        Scan::Clean
    }

    /// One byte of a head; `Some(reason)` on a violation.
    fn head_byte(&mut self, b: u8) -> Option<Rejection> {
        if self.pending_cr {
            self.pending_cr = false;
            if b != b'\n' {
                return Some(Rejection::BareCr);
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
            b'\n' => return Some(Rejection::BareLf),
            _ => self.line.push(b),
        }
        None
    }

    fn end_head_line(&mut self) -> Option<Rejection> {
        let result = self.head_line();
        self.line.clear();
        result
    }

    fn head_line(&mut self) -> Option<Rejection> {
        let line = self.line.as_slice();
        if !self.head.request_line_seen {
            if line.is_empty() {
                // Empty lines before the request line are ignored (RFC 9112 section 2.2).
                return None;
            }
            self.head.request_line_seen = true;
            self.head.connect = line.starts_with(b"CONNECT ");
            // HTTP/1.0 predates Host; anything that is not HTTP/1.x hyper refuses itself.
            self.head.requires_host = line.ends_with(b" HTTP/1.1");
            return None;
        }
        if line.is_empty() {
            return self.end_of_head();
        }
        let (name, value) = match field_line(line) {
            Ok(field) => field,
            Err(why) => return Some(why),
        };
        if name.eq_ignore_ascii_case(b"content-length") {
            self.head.content_lengths += 1;
            if self.head.content_lengths > 1 {
                return Some(Rejection::DuplicateContentLength);
            }
            if value.contains(&b',') {
                return Some(Rejection::DuplicateContentLength);
            }
            if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                return Some(Rejection::InvalidContentLength);
            }
            let length = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            self.head.content_length = Some(length);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encodings += 1;
            if self.head.transfer_encodings > 1 {
                return Some(Rejection::DuplicateTransferEncoding);
            }
            if !value.eq_ignore_ascii_case(b"chunked") {
                return Some(Rejection::UnsupportedTransferEncoding);
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            self.head.hosts += 1;
            if self.head.hosts > 1 {
                return Some(Rejection::DuplicateHost);
            }
            if !is_valid_host(value) {
                return Some(Rejection::InvalidHost);
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            self.head.upgrade = true;
        }
        None
    }

    fn end_of_head(&mut self) -> Option<Rejection> {
        let head = std::mem::take(&mut self.head);
        self.head_len = 0;
        self.in_head = false;
        self.heads += 1;
        self.chunked = Chunked::default();
        if head.transfer_encodings > 0 && head.content_lengths > 0 {
            return Some(Rejection::ContentLengthWithTransferEncoding);
        }
        if head.requires_host && head.hosts == 0 {
            return Some(Rejection::MissingHost);
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
    fn body_line_byte(&mut self, b: u8) -> Option<Rejection> {
        if self.pending_cr {
            self.pending_cr = false;
            if b != b'\n' {
                return Some(Rejection::BareLineEndInChunk);
            }
            let result = self.body_line();
            self.line.clear();
            return result;
        }
        let trailer = self.state == State::Trailer;
        if trailer {
            self.chunked.trailer_bytes += 1;
            if self.chunked.trailer_bytes > self.max_head / 2 {
                return Some(Rejection::InvalidTrailer);
            }
        }
        match b {
            b'\r' => self.pending_cr = true,
            b'\n' => return Some(Rejection::BareLineEndInChunk),
            _ if !trailer && self.line.len() >= MAX_CHUNK_LINE => {
                return Some(Rejection::ChunkLineTooLong);
            }
            _ => self.line.push(b),
        }
        None
    }

    fn body_line(&mut self) -> Option<Rejection> {
        if self.state == State::Trailer {
            if self.line.is_empty() {
                self.state = State::Head;
                return None;
            }
            self.chunked.trailers += 1;
            if self.chunked.trailers > self.max_headers / 2 || field_line(&self.line).is_err() {
                return Some(Rejection::InvalidTrailer);
            }
            return None;
        }
        let digits = self
            .line
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if digits == 0 {
            return Some(Rejection::InvalidChunkSize);
        }
        let (size_digits, rest) = self.line.split_at(digits);
        let mut size = 0u64;
        for &d in size_digits {
            let value = (d as char).to_digit(16).map_or(0, u64::from);
            match size.checked_mul(16).and_then(|n| n.checked_add(value)) {
                Some(n) => size = n,
                None => return Some(Rejection::ChunkSizeOverflow),
            }
        }
        let rest = skip_bws(rest);
        if !rest.is_empty() {
            if rest.first() != Some(&b';') {
                return Some(Rejection::InvalidChunkSize);
            }
            self.chunked.extension_bytes += rest.len();
            if self.chunked.extension_bytes > MAX_CHUNK_EXTENSION_BYTES || !is_chunk_ext(rest) {
                return Some(Rejection::InvalidChunkExtension);
            }
        }
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

    fn scanner() -> HeadScanner {
        HeadScanner::new(64 * 1024, 100)
    }

    fn scan_all(input: &[u8]) -> Scan {
        scanner().scan(input)
    }

    /// The same input fed one byte at a time, offsets made absolute.
    fn scan_bytewise(input: &[u8]) -> Scan {
        let mut s = scanner();
        for (i, b) in input.iter().enumerate() {
            match s.scan(std::slice::from_ref(b)) {
                Scan::Clean => {}
                Scan::Reject { why, .. } => return Scan::Reject { at: i, why },
                Scan::Fail { why, request, .. } => {
                    return Scan::Fail {
                        at: i,
                        why,
                        request,
                    };
                }
            }
        }
        Scan::Clean
    }

    fn rejection(input: &[u8]) -> Option<Rejection> {
        let whole = scan_all(input);
        assert_eq!(
            whole,
            scan_bytewise(input),
            "{:?}",
            String::from_utf8_lossy(input)
        );
        match whole {
            Scan::Clean => None,
            Scan::Reject { at, why } | Scan::Fail { at, why, .. } => {
                assert!(at < input.len());
                Some(why)
            }
        }
    }

    #[test]
    fn clean_requests_pipeline() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
            POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel\nl\
            POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
            3;ext=1\r\na\nb\r\n0\r\nX-Trailer: v\r\n\r\n\
            POST /y HTTP/1.1\r\nHost: a:80\r\nTransfer-Encoding: chunked\r\n\r\n\
            000000000000000000003 ; a = \"q\\\"x\" ;b\r\nabc\r\n0\r\n\r\n\
            GET /z HTTP/1.1\r\nHost: [::1]:8080\r\nX: a\tb\r\n\r\n\
            GET /old HTTP/1.0\r\n\r\n";
        assert_eq!(rejection(input), None);
    }

    #[test]
    fn smuggling_heads_are_rejected_where_found() {
        use Rejection::*;
        let cases: &[(&[u8], Rejection)] = &[
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                ContentLengthWithTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
                UnsupportedTransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
                InvalidHeaderName,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                DuplicateContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
                DuplicateContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
                InvalidContentLength,
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", ObsFold),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", BareLf),
            (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", BareCr),
            (b"GET / HTTP/1.1\r\nHost: a\r\nNo colon\r\n\r\n", HeaderWithoutColon),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", InvalidHeaderValue),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                DuplicateTransferEncoding,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                rejection(input),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn host_rules_of_rfc_9112() {
        use Rejection::*;
        let cases: &[(&[u8], Option<Rejection>)] = &[
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                Some(DuplicateHost),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nhOST: a\r\n\r\n",
                Some(DuplicateHost),
            ),
            (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", Some(MissingHost)),
            (b"GET / HTTP/1.0\r\nX: y\r\n\r\n", None),
            (b"GET / HTTP/1.0\r\nHost: a b\r\n\r\n", Some(InvalidHost)),
            (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                rejection(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        for host in [
            "web",
            "web.shop.svc.cluster.local:8080",
            "10.96.0.1",
            "10.96.0.1:80",
            "[::1]",
            "[fd00::1]:443",
            "[v7.fe:80]",
            "caf%C3%A9",
            "a-b_c~d!$&'()*+,;=",
            "web:",
            "web:00080",
        ] {
            assert!(is_valid_host(host.as_bytes()), "{host}");
        }
        for host in [
            "a b",
            "web/x",
            "a@web",
            "web:8o",
            "web:65536",
            "web:123456",
            "web:99999999999999999999",
            "web:80:80",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "::1",
            "caf%C",
            "caf%ZZ",
            "web?x",
            "web#x",
            "[v.x]",
            "\"web\"",
        ] {
            assert!(!is_valid_host(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn broken_chunked_bodies_fail_at_the_offending_byte() {
        use Rejection::*;
        let head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let cases: &[(&str, Rejection)] = &[
            ("FFFFFFFFFFFFFFFFF\r\n", ChunkSizeOverflow),
            ("10000000000000000\r\n", ChunkSizeOverflow),
            ("5\nhello\r\n", BareLineEndInChunk),
            ("5;a=b\nhello\r\n", BareLineEndInChunk),
            ("5\rhello\r\n", BareLineEndInChunk),
            ("zz\r\n", InvalidChunkSize),
            ("\r\n", InvalidChunkSize),
            ("5x\r\n", InvalidChunkSize),
            ("-5\r\n", InvalidChunkSize),
            ("5\r\nhelloX0\r\n\r\n", ChunkDataWithoutCrlf),
            ("5\r\nhello\rX", ChunkDataWithoutCrlf),
            ("5;\r\n", InvalidChunkExtension),
            ("5;a=\x01\r\n", InvalidChunkExtension),
            ("5;a=\"open\r\n", InvalidChunkExtension),
            ("5;a b\r\n", InvalidChunkExtension),
            ("5;=b\r\n", InvalidChunkExtension),
            ("0\r\nNo colon\r\n\r\n", InvalidTrailer),
            ("0\r\nX: a\r\n folded\r\n\r\n", InvalidTrailer),
            ("0\r\nX: a\nY: b\r\n\r\n", BareLineEndInChunk),
        ];
        for (body, want) in cases {
            let input = format!("{head}{body}");
            let whole = scan_all(input.as_bytes());
            assert_eq!(whole, scan_bytewise(input.as_bytes()), "{body:?}");
            let Scan::Fail { at, why, request } = whole else {
                panic!("{whole:?} for {body:?}");
            };
            assert_eq!((why, request), (*want, 1), "{body:?}");
            assert!(at >= head.len() && at < input.len(), "{at} for {body:?}");
        }
        let long_ext = format!("{head}1;{}\r\n", "a".repeat(MAX_CHUNK_EXTENSION_BYTES + 8));
        assert!(matches!(
            scan_all(long_ext.as_bytes()),
            Scan::Fail {
                why: ChunkLineTooLong | InvalidChunkExtension,
                ..
            }
        ));
        let mut many = String::from(head);
        for _ in 0..3 {
            many.push_str(&format!("1;{}\r\nx\r\n", "a".repeat(3000)));
        }
        assert!(matches!(
            scan_all(many.as_bytes()),
            Scan::Fail {
                why: InvalidChunkExtension,
                ..
            }
        ));
    }

    #[test]
    fn a_failure_names_the_request_it_belongs_to() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
            POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(scan_all(input), Scan::Fail { request: 2, .. }));
    }

    #[test]
    fn second_pipelined_head_is_checked() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
            GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(scan_all(input), Scan::Reject { .. }));
    }

    #[test]
    fn upgrade_stops_scanning() {
        let input =
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\n\r\x00";
        assert_eq!(scan_all(input), Scan::Clean);
    }

    #[test]
    fn in_head_tracks_progress() {
        let mut s = HeadScanner::new(1024, 100);
        assert!(!s.in_head());
        assert_eq!(s.scan(b"GET / HT"), Scan::Clean);
        assert!(s.in_head());
        assert_eq!(s.scan(b"TP/1.1\r\nHost: a\r\n\r\n"), Scan::Clean);
        assert!(!s.in_head());
    }
}
