#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

use super::*;
use crate::testdata::{CAPTURES, XorShift, into_records};

const GET: &[u8] = b"GET /reviews/1?x=y HTTP/1.1\r\nHost: reviews\r\n\r\n";

fn http1(buf: &[u8]) -> RequestLine {
    match detect(buf) {
        Detection::Http1(line) => line,
        other => panic!("{}: {other:?}", buf.escape_ascii()),
    }
}

#[test]
fn empty_buffer_needs_more() {
    assert_eq!(detect(b""), Detection::NeedMore);
}

#[test]
fn h2_preface_and_its_prefixes() {
    for len in 1..H2_PREFACE.len() {
        assert_eq!(detect(&H2_PREFACE[..len]), Detection::NeedMore, "{len}");
    }
    assert_eq!(detect(H2_PREFACE), Detection::H2PriorKnowledge);
    // The preface followed by the client's SETTINGS frame.
    let mut with_settings = H2_PREFACE.to_vec();
    with_settings.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    assert_eq!(detect(&with_settings), Detection::H2PriorKnowledge);
    // Diverging from the preface: "PRI" parses as a method, but HTTP/2.0 is no HTTP/1 version.
    assert_eq!(
        detect(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
        Detection::Opaque
    );
    assert_eq!(detect(b"PRI * HTTP/2.0\r\nHost: x\r\n"), Detection::Opaque);
}

#[test]
fn http1_request_line() {
    let line = http1(GET);
    assert_eq!(line.method_in(GET), b"GET");
    assert_eq!(line.method_len, 3);
    assert_eq!(line.target_in(GET), b"/reviews/1?x=y");
    assert_eq!(line.version, Http1Version::Http11);
    assert_eq!(line.line_len, "GET /reviews/1?x=y HTTP/1.1\r\n".len());
    // Settled by the request line alone; headers need not have arrived.
    assert_eq!(detect(&GET[..line.line_len]), Detection::Http1(line));
}

#[test]
fn http1_prefixes_need_more() {
    for len in 1..29 {
        assert_eq!(detect(&GET[..len]), Detection::NeedMore, "{len}");
    }
    assert!(matches!(detect(&GET[..29]), Detection::Http1(_)));
}

#[test]
fn http1_methods_versions_and_targets() {
    for method in [
        "GET",
        "POST",
        "PUT",
        "DELETE",
        "HEAD",
        "OPTIONS",
        "PATCH",
        "CONNECT",
        "TRACE",
        "PROPFIND",
        "M-SEARCH",
        "BASELINE-CONTROL",
    ] {
        let request = format!("{method} / HTTP/1.1\r\n");
        let line = http1(request.as_bytes());
        assert_eq!(line.method_in(request.as_bytes()), method.as_bytes());
        // Every known method is a prefix of a request line until its space arrives.
        assert_eq!(
            detect(&request.as_bytes()[..method.len()]),
            Detection::NeedMore
        );
    }
    let cases: &[(&[u8], &[u8], Http1Version)] = &[
        (b"GET / HTTP/1.0\r\n", b"/", Http1Version::Http10),
        (b"GET / HTTP/1.1\n", b"/", Http1Version::Http11),
        (b"OPTIONS * HTTP/1.1\r\n", b"*", Http1Version::Http11),
        (
            b"CONNECT reviews.default:9080 HTTP/1.1\r\n",
            b"reviews.default:9080",
            Http1Version::Http11,
        ),
        (
            b"GET http://reviews/r?q=%20 HTTP/1.1\r\n",
            b"http://reviews/r?q=%20",
            Http1Version::Http11,
        ),
        (
            "GET /caf\u{e9} HTTP/1.1\r\n".as_bytes(),
            "/caf\u{e9}".as_bytes(),
            Http1Version::Http11,
        ),
    ];
    for (request, target, version) in cases {
        let line = http1(request);
        assert_eq!(line.target_in(request), *target);
        assert_eq!(line.version, *version);
        assert_eq!(line.line_len, request.len());
    }
}

#[test]
fn lower_case_first_bytes_are_settled_at_once() {
    // A client-speaks-first protocol that sends one byte must not wait for more.
    assert_eq!(detect(b"x"), Detection::Opaque);
    assert_eq!(detect(b"get / HTTP/1.1\r\n"), Detection::Opaque);
    assert_eq!(detect(b"ping"), Detection::Opaque);
}

#[test]
fn almost_http1_is_opaque() {
    for request in [
        &b"GET /\r\n"[..], // HTTP/0.9
        b"GET / HTTP/2.0\r\n",
        b"GET / HTTP/1.2\r\n",
        b"GET / http/1.1\r\n",
        b"GET  / HTTP/1.1\r\n",
        b"GET / HTTP/1.1 \r\n",
        b"GET / HTTP/1.1\rX",
        b"GET /a\tb HTTP/1.1\r\n",
        b" GET / HTTP/1.1\r\n",
        b"\r\nGET / HTTP/1.1\r\n",
        b"GET\t/ HTTP/1.1\r\n",
        b"G(T / HTTP/1.1\r\n",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n",
    ] {
        assert_eq!(
            detect(request),
            Detection::Opaque,
            "{}",
            request.escape_ascii()
        );
    }
}

#[test]
fn request_line_length_limit() {
    let mut long = b"GET /".to_vec();
    long.resize(MAX_REQUEST_LINE_LEN - 1, b'a');
    assert_eq!(detect(&long), Detection::NeedMore);
    long.push(b'a');
    assert_eq!(detect(&long), Detection::Opaque);

    let mut longest = b"GET /".to_vec();
    longest.resize(MAX_REQUEST_LINE_LEN - " HTTP/1.1\r\n".len(), b'a');
    longest.extend_from_slice(b" HTTP/1.1\r\n");
    assert_eq!(http1(&longest).line_len, MAX_REQUEST_LINE_LEN);
}

#[test]
fn other_protocols_are_opaque() {
    let postgres_startup: &[u8] =
        b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00app\x00\x00";
    let postgres_ssl_request: &[u8] = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
    let mysql_ssl: &[u8] = b"\x20\x00\x00\x01\x05\xae\x0f\x00";
    for (name, bytes) in [
        ("ssh", &b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"[..]),
        ("ssh short", b"SSH-2.0-Go\r\n"),
        ("postgres startup", postgres_startup),
        ("postgres SSLRequest", postgres_ssl_request),
        ("mysql", mysql_ssl),
        ("redis", b"*1\r\n$4\r\nPING\r\n"),
        ("smtp client", b"EHLO client.example\r\n"),
        ("sslv2 hello", b"\x80\x2e\x01\x00\x02"),
        ("tls application data", b"\x17\x03\x03\x00\x10"),
        ("0x16 not tls", b"\x16\x00\x00\x00"),
    ] {
        assert_eq!(detect(bytes), Detection::Opaque, "{name}");
    }

    let mut rng = XorShift::new(0x5eed);
    for _ in 0..200 {
        let len = 64 + rng.below(64);
        let bytes: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        if bytes[0] == 0x16 {
            continue;
        }
        assert_eq!(
            detect(&bytes),
            Detection::Opaque,
            "{}",
            bytes.escape_ascii()
        );
    }
}

#[test]
fn max_inspect_len_always_settles() {
    let mut rng = XorShift::new(7);
    let fills: [&dyn Fn(&mut XorShift) -> u8; 3] = [&|_| b'a', &|_| 0x16, &|r| r.byte()];
    for fill in fills {
        let buf: Vec<u8> = (0..MAX_INSPECT_LEN).map(|_| fill(&mut rng)).collect();
        assert_ne!(detect(&buf), Detection::NeedMore);
    }
    let mut token_then_target = b"GET /".to_vec();
    token_then_target.resize(MAX_INSPECT_LEN, b'a');
    assert_eq!(detect(&token_then_target), Detection::Opaque);
}

/// Mutates `input` in one of several ways an attacker (or a broken middlebox) might.
fn mutate(rng: &mut XorShift, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        if out.is_empty() {
            out.push(rng.byte());
        }
        let at = rng.below(out.len());
        match rng.below(7) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = rng.byte(),
            // Length fields at their extremes.
            2 => out[at] = [0x00, 0x01, 0x7f, 0x80, 0xff][rng.below(5)],
            3 => out.truncate(at),
            4 => {
                let len = rng.below(8).min(out.len() - at);
                out.drain(at..at + len);
            }
            5 => {
                let byte = rng.byte();
                out.splice(at..at, std::iter::repeat_n(byte, 1 + rng.below(8)));
            }
            _ => {
                let (from, len) = (rng.below(out.len()), rng.below(32));
                let chunk: Vec<u8> = out.iter().skip(from).take(len).copied().collect();
                out.splice(at..at, chunk);
            }
        }
    }
    out
}

#[test]
fn mutated_captures_never_panic() {
    let mut rng = XorShift::new(0x6d65_7368);
    let mut inputs: Vec<Vec<u8>> = CAPTURES.iter().map(|c| c.bytes.to_vec()).collect();
    // Fragmented versions put the mutations on record boundaries too.
    inputs.extend(
        CAPTURES
            .iter()
            .map(|c| into_records(crate::testdata::handshake_message(c.bytes), 40)),
    );
    inputs.push(GET.to_vec());
    inputs.push(H2_PREFACE.to_vec());
    let mut outcomes = [0usize; 6];
    for i in 0..6000 {
        let input = &inputs[i % inputs.len()];
        let mutated = mutate(&mut rng, input);
        let detection = detect(&mutated);
        let parsed = parse_client_hello(&mutated);
        match &detection {
            Detection::Tls(summary) => {
                assert_eq!(parsed.as_ref(), Ok(summary));
                assert!(summary.sni.as_ref().is_none_or(|sni| sni.len() <= 255));
                assert!(summary.alpn.len() <= MAX_ALPN_PROTOCOLS);
                assert!(summary.total_len <= mutated.len());
            }
            Detection::TlsMalformed(error) => assert_eq!(parsed.as_ref(), Err(error)),
            Detection::NeedMore if mutated.first() == Some(&0x16) => {
                assert_eq!(parsed, Err(ParseError::Incomplete));
            }
            _ => {}
        }
        // Every prefix of a mutation is handled as well.
        let cut = rng.below(mutated.len() + 1);
        let _ = detect(&mutated[..cut]);
        outcomes[match detection {
            Detection::NeedMore => 0,
            Detection::Tls(_) => 1,
            Detection::TlsMalformed(_) => 2,
            Detection::Http1(_) => 3,
            Detection::H2PriorKnowledge => 4,
            Detection::Opaque => 5,
        }] += 1;
    }
    // The mutations reach every verdict, so every path ran.
    assert!(outcomes.iter().all(|&n| n > 0), "{outcomes:?}");
}
