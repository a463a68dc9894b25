//! Header work done on every proxied request: hop-by-hop removal, the injected headers
//! (`x-request-id`, W3C `traceparent`, `x-forwarded-for` / `x-forwarded-proto`, fixed headers
//! from the MeshPolicy), and Gateway API header modifiers.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use mesh_policy::{HeaderDefaults, HeaderModifier};

/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `traceparent` (W3C Trace Context).
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `x-forwarded-for`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(crate::io::now_ms());
    hasher.finish() | 1
}

/// A fast, non-cryptographic random `u64` (wyrand, one state per thread). Good enough for
/// weighted picks, sampling and identifiers that only need to be unique.
pub fn random_u64() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A random `u32`.
pub fn random_u32() -> u32 {
    (random_u64() >> 32) as u32
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut Vec<u8>, value: u64, digits: usize) {
    for i in (0..digits).rev() {
        out.push(HEX[((value >> (i * 4)) & 0xf) as usize]);
    }
}

/// A random UUIDv4 (`xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`).
pub fn new_request_id() -> HeaderValue {
    let hi = (random_u64() & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (random_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let mut out = Vec::with_capacity(36);
    push_hex(&mut out, hi >> 32, 8);
    out.push(b'-');
    push_hex(&mut out, (hi >> 16) & 0xffff, 4);
    out.push(b'-');
    push_hex(&mut out, hi & 0xffff, 4);
    out.push(b'-');
    push_hex(&mut out, lo >> 48, 4);
    out.push(b'-');
    push_hex(&mut out, lo & 0xffff_ffff_ffff, 12);
    header_value(out)
}

fn nonzero_random() -> u64 {
    loop {
        let v = random_u64();
        if v != 0 {
            return v;
        }
    }
}

fn is_lower_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Trace id and flags of a valid `traceparent` (W3C Trace Context level 1: version `00` with
/// exactly four fields, or a later version, whose first four fields are read the same way).
fn parse_traceparent(value: &[u8]) -> Option<(&[u8], &[u8])> {
    if value.len() < 55 {
        return None;
    }
    let (version, trace, parent, flags) =
        (&value[0..2], &value[3..35], &value[36..52], &value[53..55]);
    let dashes = value[2] == b'-' && value[35] == b'-' && value[52] == b'-';
    let ok = dashes
        && is_lower_hex(version)
        && version != b"ff"
        && is_lower_hex(trace)
        && trace.iter().any(|b| *b != b'0')
        && is_lower_hex(parent)
        && parent.iter().any(|b| *b != b'0')
        && is_lower_hex(flags)
        && if version == b"00" {
            value.len() == 55
        } else {
            value.len() == 55 || value[55] == b'-'
        };
    ok.then_some((trace, flags))
}

/// The `traceparent` for the next hop: same trace id and flags with a new parent (span) id when
/// `incoming` is valid, a new sampled trace otherwise.
pub fn next_traceparent(incoming: Option<&[u8]>) -> HeaderValue {
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(b"00-");
    match incoming.and_then(parse_traceparent) {
        Some((trace, flags)) => {
            out.extend_from_slice(trace);
            out.push(b'-');
            push_hex(&mut out, nonzero_random(), 16);
            out.push(b'-');
            out.extend_from_slice(flags);
        }
        None => {
            push_hex(&mut out, nonzero_random(), 16);
            push_hex(&mut out, random_u64(), 16);
            out.push(b'-');
            push_hex(&mut out, nonzero_random(), 16);
            out.extend_from_slice(b"-01");
        }
    }
    header_value(out)
}

/// A header value from bytes this module built (hex, dashes, addresses), without a copy.
fn header_value(bytes: Vec<u8>) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(bytes)).unwrap_or(HeaderValue::from_static("-"))
}

/// Adds the injected headers to a request about to be forwarded, as `defaults` ask. Returns
/// the request id (the client's, or the generated one) for the access log.
///
/// * `x-request-id`: kept when present, else a random UUIDv4;
/// * `traceparent`: a valid one is propagated with a new parent id for this hop; a missing,
///   repeated or invalid one is replaced by a new trace; `tracestate` is left alone;
/// * `x-forwarded-for`: the client address appended (existing values are folded into one
///   line); `x-forwarded-proto: http` when absent;
/// * the MeshPolicy's fixed headers, replacing any value the client sent.
pub fn inject(headers: &mut HeaderMap, defaults: &HeaderDefaults, client: IpAddr) -> HeaderValue {
    let request_id = match headers.get(X_REQUEST_ID) {
        Some(id) if !id.is_empty() => id.clone(),
        _ if defaults.request_id => {
            let id = new_request_id();
            headers.insert(X_REQUEST_ID, id.clone());
            id
        }
        _ => HeaderValue::from_static("-"),
    };
    if defaults.trace_context {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let first = values.next();
        let single = if values.next().is_none() { first } else { None };
        let next = next_traceparent(single.map(HeaderValue::as_bytes));
        headers.insert(TRACEPARENT, next);
    }
    if defaults.forwarded {
        let mut joined = Vec::with_capacity(48);
        for value in headers.get_all(X_FORWARDED_FOR) {
            joined.extend_from_slice(value.as_bytes());
            joined.extend_from_slice(b", ");
        }
        let _ = write!(joined, "{}", client.to_canonical());
        headers.insert(X_FORWARDED_FOR, header_value(joined));
        if !headers.contains_key(X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
    }
    for (name, value) in &defaults.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    request_id
}

/// Whether a `Connection` header lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `TE` unless it is exactly `trailers`, and `Upgrade`
/// with `Connection: upgrade` unless `upgrading`, in which case exactly those two are kept.
/// `Host` survives even if `Connection` names it.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| *n != header::HOST && *n != header::TE && *n != header::UPGRADE)
            .collect();
        for name in listed {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    let te_trailers = {
        let mut values = headers.get_all(header::TE).iter();
        matches!((values.next(), values.next()), (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    };
    if !te_trailers {
        headers.remove(header::TE);
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Applies a Gateway API header modifier (set, then add, then remove; names compare
/// case-insensitively). Names or values that are not valid HTTP are skipped; validation
/// should have refused them already.
pub(crate) fn apply_modifier(modifier: &HeaderModifier, headers: &mut HeaderMap) {
    for (name, value) in &modifier.set {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    for (name, value) in &modifier.add {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    for name in &modifier.remove {
        if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> HeaderDefaults {
        HeaderDefaults::default()
    }

    #[test]
    fn request_id_is_uuid_v4_and_kept() {
        let id = new_request_id();
        let s = id.to_str().unwrap_or_default();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        let mut h = HeaderMap::new();
        let got = inject(
            &mut h,
            &defaults(),
            "10.0.0.1".parse().unwrap_or(IpAddr::from([0; 4])),
        );
        assert_eq!(h.get(X_REQUEST_ID), Some(&got));
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("mine"));
        let got = inject(&mut h, &defaults(), IpAddr::from([10, 0, 0, 1]));
        assert_eq!(got, "mine");
        assert_eq!(
            h.get(X_REQUEST_ID).map(|v| v.as_bytes()),
            Some(&b"mine"[..])
        );
    }

    #[test]
    fn traceparent_propagates_or_restarts() {
        let incoming = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let next = next_traceparent(Some(incoming));
        let next = next.to_str().unwrap_or_default();
        assert_eq!(next.len(), 55);
        assert_eq!(&next[..36], "00-4bf92f3577b34da6a3ce929d0e0e4736-");
        assert_ne!(&next[36..52], "00f067aa0ba902b7");
        assert_eq!(&next[52..], "-00");
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"garbage",
        ] {
            let next = next_traceparent(Some(bad));
            let next = next.to_str().unwrap_or_default();
            assert!(parse_traceparent(next.as_bytes()).is_some(), "{next}");
            assert_ne!(&next[3..35], "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(next.ends_with("-01"));
        }
        // A later version with extra fields is understood.
        let v1 = b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        let next = next_traceparent(Some(v1));
        assert!(
            next.to_str()
                .unwrap_or_default()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn forwarded_and_fixed_headers() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        h.insert("x-team", HeaderValue::from_static("client"));
        let mut d = defaults();
        d.set = vec![("X-Team".into(), "mesh".into())];
        inject(&mut h, &d, IpAddr::from([10, 0, 0, 7]));
        assert_eq!(
            h.get(X_FORWARDED_FOR).map(|v| v.as_bytes()),
            Some(&b"1.1.1.1, 2.2.2.2, 10.0.0.7"[..])
        );
        assert_eq!(
            h.get(X_FORWARDED_PROTO).map(|v| v.as_bytes()),
            Some(&b"http"[..])
        );
        assert_eq!(h.get("x-team").map(|v| v.as_bytes()), Some(&b"mesh"[..]));
        let mut off = HeaderMap::new();
        let d = HeaderDefaults {
            request_id: false,
            trace_context: false,
            forwarded: false,
            set: Vec::new(),
        };
        inject(&mut off, &d, IpAddr::from([10, 0, 0, 7]));
        assert!(off.is_empty());
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(PROXY_CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "te", "x-keep"]);
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(header::TE));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert!(connection_has(&h, "upgrade"));
    }

    #[test]
    fn modifier_order_matches_gateway_api() {
        let m = HeaderModifier {
            set: vec![("X-Set".into(), "new".into())],
            add: vec![("X-Add".into(), "more".into())],
            remove: vec!["x-gone".into()],
        };
        let mut h = HeaderMap::new();
        h.append("x-set", HeaderValue::from_static("old1"));
        h.append("x-set", HeaderValue::from_static("old2"));
        h.insert("x-add", HeaderValue::from_static("first"));
        h.insert("x-gone", HeaderValue::from_static("v"));
        apply_modifier(&m, &mut h);
        let all = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("x-set"), ["new"]);
        assert_eq!(all("x-add"), ["first", "more"]);
        assert!(all("x-gone").is_empty());
    }
}
