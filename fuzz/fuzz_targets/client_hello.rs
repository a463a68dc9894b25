//! The ClientHello parser past its framing: the fuzzer's bytes are the body of a ClientHello
//! handshake message, wrapped here in a handshake header and TLS records with correct lengths
//! (split into as many records as the first byte says), so mutations go to versions, session
//! ids, cipher suites and extensions (SNI, ALPN, supported_versions, ECH) rather than to
//! length fields. Checks that parsing never panics, that the wrapping does not change the
//! answer (one record or several), and that a summary respects the documented limits. Seed
//! with the handshake bodies of the captures in ../tests/data (bytes 9.. of each file).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_inspect::{MAX_ALPN_PROTOCOLS, ParseError, parse_client_hello};

/// `body` as a ClientHello message in `records` handshake records.
fn wrap(body: &[u8], records: usize) -> Vec<u8> {
    let len = body.len();
    let mut message = vec![1, (len >> 16) as u8, (len >> 8) as u8, len as u8];
    message.extend_from_slice(body);
    let per_record = message.len().div_ceil(records.max(1)).max(1);
    let mut out = Vec::with_capacity(message.len() + 5 * records);
    for fragment in message.chunks(per_record) {
        out.extend_from_slice(&[
            0x16,
            3,
            1,
            (fragment.len() >> 8) as u8,
            fragment.len() as u8,
        ]);
        out.extend_from_slice(fragment);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let whole = wrap(body, 1);
    let one = parse_client_hello(&whole);
    let fragmented = parse_client_hello(&wrap(body, 1 + usize::from(split % 4)));
    match (&one, &fragmented) {
        (Ok(a), Ok(b)) => {
            let mut b = b.clone();
            b.total_len = a.total_len;
            assert_eq!(a, &b);
        }
        // Fragmenting may reach the fragmentation limit first; otherwise both fail alike.
        (_, Err(ParseError::TooFragmented { .. })) => {}
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("one record {one:?}, several {fragmented:?}"),
    }
    if let Ok(summary) = &one {
        assert!(
            summary
                .sni
                .as_ref()
                .is_none_or(|sni| !sni.is_empty() && sni.len() <= 255)
        );
        assert!(summary.alpn.len() <= MAX_ALPN_PROTOCOLS);
        assert_eq!(summary.total_len, whole.len());
    }
    // A complete message never asks for more bytes.
    assert_ne!(one, Err(ParseError::Incomplete));
});
