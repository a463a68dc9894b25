//! Feeds arbitrary bytes to `detect` and `parse_client_hello`, checking that they never panic and
//! that their answers agree with each other and with the documented limits. Seeds
//! (`seeds/detect`): the ClientHello captures of ../tests/data, HTTP/1 requests and the HTTP/2
//! preface.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_inspect::{
    Detection, MAX_ALPN_PROTOCOLS, MAX_INSPECT_LEN, ParseError, detect, parse_client_hello,
};

fuzz_target!(|data: &[u8]| {
    let detection = detect(data);
    let parsed = parse_client_hello(data);
    if data.len() >= MAX_INSPECT_LEN {
        assert_ne!(detection, Detection::NeedMore);
    }
    match &detection {
        Detection::Tls(summary) => {
            assert_eq!(parsed.as_ref(), Ok(summary));
            assert!(summary.sni.as_ref().is_none_or(|sni| sni.len() <= 255));
            assert!(summary.alpn.len() <= MAX_ALPN_PROTOCOLS);
            assert!(summary.total_len <= data.len());
        }
        Detection::TlsMalformed(error) => assert_eq!(parsed.as_ref(), Err(error)),
        _ => {}
    }
    if detection == Detection::NeedMore && data.first() == Some(&0x16) {
        assert_eq!(parsed, Err(ParseError::Incomplete));
    }
});
