//! Protocol detection for captured connections: given the first bytes a client sent, tell a TLS
//! ClientHello (with its SNI, ALPN and ECH offer), an HTTP/1.x request line, the HTTP/2
//! prior-knowledge preface, or anything else. Every byte here comes from an untrusted peer, so the
//! parsers never panic, never index out of bounds and never allocate more than a fixed limit,
//! whatever lengths the input declares; when bytes do not parse, the caller gets a verdict it can
//! act on (forward the bytes unchanged) rather than a hang or a crash.
//!
//! The caller peeks at the connection, calls [`detect`] on everything read so far and reads more
//! while it gets [`Detection::NeedMore`]. A buffer of [`MAX_INSPECT_LEN`] bytes always gets a
//! final verdict, so that is the most a caller ever needs to hold back. Protocols where the server
//! speaks first send nothing to inspect: the caller bounds the wait with a timeout and treats the
//! connection as opaque when it expires.

#![forbid(unsafe_code)]
// Machine-checked "never panics on input": no indexing, slicing, unwrap or panic outside tests.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable
    )
)]

mod http;
mod tls;

pub use http::{Http1Version, MAX_METHOD_LEN, MAX_REQUEST_LINE_LEN, RequestLine};
pub use tls::{
    ClientHelloSummary, Field, MAX_ALPN_PROTOCOLS, MAX_CLIENT_HELLO_LEN, MAX_INSPECT_LEN,
    ParseError, parse_client_hello,
};

/// The HTTP/2 connection preface a client sends when it knows the server speaks HTTP/2 in
/// cleartext (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// The bytes so far are consistent with a protocol this crate knows but do not settle it
    /// (this includes an empty buffer): read more and call [`detect`] again.
    NeedMore,
    /// A complete, well-formed TLS ClientHello.
    Tls(ClientHelloSummary),
    /// The connection starts like TLS (a handshake record) but the ClientHello is malformed or
    /// over [`MAX_CLIENT_HELLO_LEN`]. Nothing in it can be trusted: forward the bytes unchanged,
    /// as for [`Detection::Opaque`], and count the error.
    TlsMalformed(ParseError),
    /// A complete HTTP/1.0 or HTTP/1.1 request line.
    Http1(RequestLine),
    /// The HTTP/2 prior-knowledge preface ([`H2_PREFACE`]).
    H2PriorKnowledge,
    /// None of the above: forward the bytes unchanged.
    Opaque,
}

/// Classifies a connection from the bytes its client sent first.
///
/// `buf` holds everything read so far, from the first byte of the connection. The result is
/// final unless it is [`Detection::NeedMore`]; it never is once `buf.len() >= MAX_INSPECT_LEN`.
///
/// ```
/// use mesh_inspect::{Detection, detect};
///
/// assert_eq!(detect(b"GE"), Detection::NeedMore);
/// let Detection::Http1(line) = detect(b"GET /health HTTP/1.1\r\n") else { panic!() };
/// assert_eq!(line.target_in(b"GET /health HTTP/1.1\r\n"), b"/health");
/// assert_eq!(detect(b"SSH-2.0-OpenSSH_9.2\r\n"), Detection::Opaque);
/// ```
#[must_use]
pub fn detect(buf: &[u8]) -> Detection {
    let Some(&first) = buf.first() else {
        return Detection::NeedMore;
    };
    if first == tls::CONTENT_TYPE_HANDSHAKE {
        return detect_tls(buf);
    }
    if buf.starts_with(H2_PREFACE) {
        return Detection::H2PriorKnowledge;
    }
    if H2_PREFACE.starts_with(buf) {
        return Detection::NeedMore;
    }
    match http::parse_request_line(buf) {
        http::Verdict::NeedMore => Detection::NeedMore,
        http::Verdict::Request(line) => Detection::Http1(line),
        http::Verdict::NotHttp => Detection::Opaque,
    }
}

fn detect_tls(buf: &[u8]) -> Detection {
    // Only a plausible record version makes this TLS rather than some binary protocol that happens
    // to start with 0x16.
    let Some(&major) = buf.get(1) else {
        return Detection::NeedMore;
    };
    if !tls::is_plausible_record_version(major, buf.get(2).copied()) {
        return Detection::Opaque;
    }
    match parse_client_hello(buf) {
        Ok(summary) => Detection::Tls(summary),
        Err(ParseError::Incomplete) => Detection::NeedMore,
        Err(error) => Detection::TlsMalformed(error),
    }
}

#[cfg(test)]
mod testdata;
#[cfg(test)]
mod tests;
