//! HTTP/1.x request-line detection (RFC 9112 section 3): `method SP request-target SP
//! HTTP-version CRLF`. Only the first line is read, and only to decide the protocol; headers are
//! the proxy's HTTP stack's business.

use std::ops::Range;

/// Longest method token accepted. The longest registered methods (RFC 3253's
/// `BASELINE-CONTROL`, `UPDATEREDIRECTREF`) are 16 and 17 bytes.
pub const MAX_METHOD_LEN: usize = 20;

/// Longest request line accepted, line ending included: RFC 9112 section 3 asks for at least
/// 8000 octets, and common servers stop at 8 KiB. A longer line is treated as not HTTP.
pub const MAX_REQUEST_LINE_LEN: usize = 8 * 1024;

/// What every HTTP/1.x version starts with; the minor digit follows.
const VERSION_PREFIX: &[u8] = b"HTTP/1.";

/// The version on an HTTP/1 request line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Http1Version {
    Http10,
    Http11,
}

/// Where the parts of a complete request line sit in the inspected buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLine {
    /// Length of the method token, which starts the buffer.
    pub method_len: usize,
    /// Byte range of the request-target.
    pub target: Range<usize>,
    pub version: Http1Version,
    /// Length of the request line, its CRLF or LF included.
    pub line_len: usize,
}

impl RequestLine {
    /// The method, from the buffer this line was detected in.
    #[must_use]
    pub fn method_in<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(..self.method_len).unwrap_or_default()
    }

    /// The request-target, from the buffer this line was detected in.
    #[must_use]
    pub fn target_in<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.target.clone()).unwrap_or_default()
    }
}

pub(crate) enum Verdict {
    NeedMore,
    Request(RequestLine),
    NotHttp,
}

/// Decides whether `buf` starts with an HTTP/1.0 or HTTP/1.1 request line.
pub(crate) fn parse_request_line(buf: &[u8]) -> Verdict {
    let window = buf.get(..MAX_REQUEST_LINE_LEN).unwrap_or(buf);
    match parse_window(window) {
        // The line did not end within the limit.
        Verdict::NeedMore if buf.len() >= MAX_REQUEST_LINE_LEN => Verdict::NotHttp,
        verdict => verdict,
    }
}

fn parse_window(buf: &[u8]) -> Verdict {
    // An unknown method is accepted (RFC 9110 section 9.1 lets servers define their own), so a
    // short run of method characters may still become a request line. Methods are taken to be
    // upper case, as every registered one is: a protocol whose first bytes are lower case or
    // binary is settled on its first byte, instead of waiting for more bytes a client-speaks-
    // first protocol may never send (a one-byte ping would otherwise wait for the timeout).
    let Some(method_len) = buf
        .iter()
        .take(MAX_METHOD_LEN + 1)
        .position(|&byte| !is_method_char(byte))
    else {
        return if buf.len() <= MAX_METHOD_LEN {
            Verdict::NeedMore
        } else {
            Verdict::NotHttp
        };
    };
    if method_len == 0 || buf.get(method_len) != Some(&b' ') {
        return Verdict::NotHttp;
    }

    let target_start = method_len + 1;
    let rest = buf.get(target_start..).unwrap_or_default();
    let Some(target_len) = rest.iter().position(|&byte| !is_target_byte(byte)) else {
        return Verdict::NeedMore;
    };
    if target_len == 0 || rest.get(target_len) != Some(&b' ') {
        return Verdict::NotHttp;
    }

    let version_start = target_start + target_len + 1;
    let rest = buf.get(version_start..).unwrap_or_default();
    let Some((prefix, after_prefix)) = rest.split_at_checked(VERSION_PREFIX.len()) else {
        return if VERSION_PREFIX.starts_with(rest) {
            Verdict::NeedMore
        } else {
            Verdict::NotHttp
        };
    };
    if prefix != VERSION_PREFIX {
        return Verdict::NotHttp;
    }
    let version = match after_prefix.first() {
        None => return Verdict::NeedMore,
        Some(b'0') => Http1Version::Http10,
        Some(b'1') => Http1Version::Http11,
        Some(_) => return Verdict::NotHttp,
    };
    // RFC 9112 section 2.2 lets a recipient accept a bare LF as the line ending.
    let ending_len = match after_prefix.get(1..) {
        Some([b'\r', b'\n', ..]) => 2,
        Some([b'\n', ..]) => 1,
        Some([] | [b'\r']) | None => return Verdict::NeedMore,
        Some(_) => return Verdict::NotHttp,
    };
    Verdict::Request(RequestLine {
        method_len,
        target: target_start..target_start + target_len,
        version,
        line_len: version_start + VERSION_PREFIX.len() + 1 + ending_len,
    })
}

/// The characters of a method as used in practice: RFC 9110 `tchar` restricted to upper-case
/// letters, `-` and `_` (every method in the IANA registry fits).
fn is_method_char(byte: u8) -> bool {
    byte.is_ascii_uppercase() || byte == b'-' || byte == b'_'
}

/// Bytes allowed in a request-target: any visible character. The exact grammar
/// (RFC 9112 section 3.2) is the HTTP stack's to enforce; raw non-ASCII is let through because
/// some clients send unencoded UTF-8 paths.
fn is_target_byte(byte: u8) -> bool {
    byte > b' ' && byte != 0x7f
}
