#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

use super::*;
use crate::testdata::{
    CAPTURES, CURL_SNI, Hello, handshake_message, into_records, push_vec, server_name_ext,
};
use crate::{Detection, detect};

const GREASE_CIPHER: [u8; 2] = [0x0a, 0x0a];
const GREASE_EXT_FIRST: u16 = 0x1a1a;
const GREASE_EXT_LAST: u16 = 0xfafa;

fn parse(record: &[u8]) -> Result<ClientHelloSummary, ParseError> {
    parse_client_hello(record)
}

fn sni_of(hello: &Hello) -> Option<String> {
    parse(&hello.record()).unwrap().sni
}

fn with_sni(entries: &[(u8, &[u8])]) -> Hello {
    let mut hello = Hello::from_capture(CURL_SNI);
    *hello.extension_mut(EXT_SERVER_NAME) = server_name_ext(entries);
    hello
}

#[test]
fn reads_sni_and_alpn_of_every_capture() {
    for capture in CAPTURES {
        let summary = parse(capture.bytes).unwrap_or_else(|e| panic!("{}: {e}", capture.name));
        assert_eq!(summary.sni.as_deref(), capture.sni, "{}", capture.name);
        assert_eq!(summary.alpn, capture.alpn, "{}", capture.name);
        assert_eq!(summary.legacy_version, 0x0303, "{}", capture.name);
        assert_eq!(
            summary.offers_tls13, capture.offers_tls13,
            "{}",
            capture.name
        );
        assert!(!summary.has_ech, "{}", capture.name);
        assert_eq!(summary.total_len, capture.bytes.len(), "{}", capture.name);
        assert_eq!(
            detect(capture.bytes),
            Detection::Tls(summary),
            "{}",
            capture.name
        );
    }
}

#[test]
fn two_reads_split_at_every_byte() {
    for capture in CAPTURES {
        let bytes = capture.bytes;
        let whole = parse(bytes).unwrap();
        for split in 0..bytes.len() {
            // The first read never settles it; the second always gives the same answer.
            assert_eq!(
                detect(&bytes[..split]),
                Detection::NeedMore,
                "{} split at {split}",
                capture.name
            );
            assert_eq!(parse(&bytes[..split]), Err(ParseError::Incomplete));
        }
        assert_eq!(detect(bytes), Detection::Tls(whole));
    }
}

#[test]
fn hello_split_over_many_records() {
    for capture in CAPTURES {
        let expected = parse(capture.bytes).unwrap();
        let message = handshake_message(capture.bytes);
        // 1 to 3 split the 4-byte handshake header itself over records.
        for fragment_len in [1, 2, 3, 4, 5, 7, 16, 100, 255, message.len() - 1] {
            let records = into_records(message, fragment_len);
            let summary = parse(&records)
                .unwrap_or_else(|e| panic!("{} in {fragment_len}-byte records: {e}", capture.name));
            assert_eq!(
                summary,
                ClientHelloSummary {
                    total_len: records.len(),
                    ..expected.clone()
                },
                "{} in {fragment_len}-byte records",
                capture.name
            );
        }
    }
}

#[test]
fn many_records_arriving_in_many_reads() {
    let records = into_records(handshake_message(CURL_SNI), 3);
    for end in 0..records.len() {
        assert_eq!(detect(&records[..end]), Detection::NeedMore, "prefix {end}");
    }
    let summary = parse(&records).unwrap();
    assert_eq!(summary.sni.as_deref(), Some("api.example.com"));
    assert_eq!(summary.total_len, records.len());
}

#[test]
fn bytes_after_the_hello_are_not_part_of_it() {
    // What follows the ClientHello (a second flight, early data) is left for the proxy.
    let mut bytes = CURL_SNI.to_vec();
    bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x02, 0xaa, 0xbb]);
    let summary = parse(&bytes).unwrap();
    assert_eq!(summary.total_len, CURL_SNI.len());
    assert_eq!(summary.sni.as_deref(), Some("api.example.com"));
}

#[test]
fn grease_and_ech_from_a_modified_capture() {
    // No client here sends GREASE or ECH, so they are spliced into curl's capture, the way
    // Chrome places them: a GREASE cipher first, GREASE extensions first (empty) and last
    // (one zero byte), GREASE in supported_versions and ALPN, and an ECH outer extension.
    let mut hello = Hello::from_capture(CURL_SNI);
    hello.cipher_suites.splice(0..0, GREASE_CIPHER);
    let mut ech = vec![0x00, 0x00, 0x01, 0x00, 0x01, 0x2a];
    push_vec(&mut ech, 2, &[0x5a; 32]); // enc
    push_vec(&mut ech, 2, &[0xa5; 144]); // payload
    let extensions = hello.extensions.as_mut().unwrap();
    extensions.insert(0, (GREASE_EXT_FIRST, vec![]));
    extensions.push((EXT_ENCRYPTED_CLIENT_HELLO, ech));
    extensions.push((GREASE_EXT_LAST, vec![0]));
    let alpn = hello.extension_mut(EXT_ALPN);
    *alpn = Vec::new();
    push_vec(alpn, 2, b"\x02\x3a\x3a\x02h2\x08http/1.1");
    let versions = hello.extension_mut(EXT_SUPPORTED_VERSIONS);
    versions.splice(1..1, [0x7a, 0x7a]);
    versions[0] += 2;

    let summary = parse(&hello.record()).unwrap();
    assert_eq!(summary.sni.as_deref(), Some("api.example.com"));
    assert_eq!(summary.alpn, ["h2", "http/1.1"]);
    assert!(summary.offers_tls13);
    assert!(summary.has_ech);
    // The same across records and reads.
    let records = into_records(&hello.message(), 50);
    assert_eq!(parse(&records).unwrap().total_len, records.len());
    assert_eq!(detect(&records[..records.len() / 2]), Detection::NeedMore);
}

#[test]
fn extension_order_does_not_matter() {
    let expected = parse(CURL_SNI).unwrap();
    let mut hello = Hello::from_capture(CURL_SNI);
    hello.extensions.as_mut().unwrap().reverse();
    let record = hello.record();
    assert_eq!(parse(&record).unwrap(), expected);
}

#[test]
fn first_host_name_of_several_wins() {
    let hello = with_sni(&[
        (7, b"unknown-type.example"),
        (0, b"First.Example"),
        (0, b"second.example"),
    ]);
    assert_eq!(sni_of(&hello).as_deref(), Some("first.example"));
}

#[test]
fn server_name_without_host_name_type() {
    assert_eq!(sni_of(&with_sni(&[(1, b"not-a-host-name")])), None);
}

#[test]
fn invalid_host_names_give_no_sni_but_a_valid_hello() {
    let long = "a".repeat(256);
    for name in [
        &b"exa mple.com"[..],
        b"bad_host.example",
        b"example.com.",
        b"10.0.0.1",
        b"::1",
        b"caf\xc3\xa9.example",
        b"evil.example\0.good.example",
        long.as_bytes(),
    ] {
        let summary = parse(&with_sni(&[(0, name)]).record()).unwrap();
        assert_eq!(summary.sni, None, "{}", name.escape_ascii());
        assert_eq!(summary.alpn, ["h2", "http/1.1"]);
    }
}

#[test]
fn zero_length_extensions() {
    // Empty unknown extensions (extended_master_secret, post_handshake_auth, GREASE) are normal.
    let mut hello = Hello::from_capture(CURL_SNI);
    let extensions = hello.extensions.as_mut().unwrap();
    for ext_type in [0x0017, 0x0031, 0x2a2a, 0xff01] {
        extensions.retain(|(t, _)| *t != ext_type);
        extensions.push((ext_type, vec![]));
    }
    assert_eq!(sni_of(&hello).as_deref(), Some("api.example.com"));

    // Empty server_name or ALPN bodies are malformed in a ClientHello.
    for ext_type in [EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS] {
        let mut hello = Hello::from_capture(CURL_SNI);
        hello.extension_mut(ext_type).clear();
        assert!(
            matches!(parse(&hello.record()), Err(ParseError::Truncated { .. })),
            "{ext_type:#x}"
        );
    }
}

#[test]
fn hello_without_extensions() {
    let mut hello = Hello::from_capture(CURL_SNI);
    hello.extensions = None;
    let summary = parse(&hello.record()).unwrap();
    assert_eq!(summary.sni, None);
    assert!(summary.alpn.is_empty());
    assert!(!summary.offers_tls13);
}

#[test]
fn alpn_bounded_and_filtered() {
    let mut hello = Hello::from_capture(CURL_SNI);
    let mut list = Vec::new();
    for i in 0..40 {
        push_vec(&mut list, 1, format!("proto-{i}").as_bytes());
    }
    push_vec(&mut list, 1, b"\xff\xfe");
    let alpn = hello.extension_mut(EXT_ALPN);
    alpn.clear();
    push_vec(alpn, 2, &list);
    let summary = parse(&hello.record()).unwrap();
    assert_eq!(summary.alpn.len(), MAX_ALPN_PROTOCOLS);
    assert_eq!(summary.alpn[15], "proto-15");

    let mut hello = Hello::from_capture(CURL_SNI);
    let alpn = hello.extension_mut(EXT_ALPN);
    alpn.clear();
    push_vec(alpn, 2, b"\x02\xc3\x28\x02h2\x00");
    assert_eq!(
        parse(&hello.record()),
        Err(ParseError::BadLength {
            field: Field::Alpn,
            len: 0
        })
    );
}

#[test]
fn duplicate_extensions_are_rejected() {
    for ext_type in [EXT_SERVER_NAME, EXT_ALPN, EXT_ENCRYPTED_CLIENT_HELLO] {
        let mut hello = with_sni(&[(0, b"a.example")]);
        let extensions = hello.extensions.as_mut().unwrap();
        let data = extensions
            .iter()
            .find(|(t, _)| *t == ext_type)
            .map_or_else(Vec::new, |(_, data)| data.clone());
        if ext_type == EXT_ENCRYPTED_CLIENT_HELLO {
            extensions.push((ext_type, vec![]));
        }
        extensions.push((ext_type, data));
        assert_eq!(
            parse(&hello.record()),
            Err(ParseError::DuplicateExtension { ext_type })
        );
    }
}

#[test]
fn truncated_at_every_length() {
    for capture in CAPTURES {
        let message = handshake_message(capture.bytes);
        for len in 0..message.len() {
            // Cut short, with every outer length (record, handshake) fixed up to match: the
            // declared structure is complete, so inner length fields overflow it.
            let mut cut = message[..len].to_vec();
            if len >= 4 {
                let body_len = u32::try_from(len - 4).unwrap().to_be_bytes();
                cut[1..4].copy_from_slice(&body_len[1..]);
            }
            if cut.is_empty() {
                continue;
            }
            let result = parse(&into_records(&cut, usize::MAX));
            assert!(
                matches!(
                    result,
                    Err(ParseError::Incomplete
                        | ParseError::Truncated { .. }
                        | ParseError::BadLength { .. }
                        | ParseError::TrailingBytes { .. })
                ) || result.is_ok(),
                "{} cut to {len}: {result:?}",
                capture.name
            );
        }
    }
}

#[test]
fn lengths_that_overflow_their_container() {
    let hello = Hello::from_capture(CURL_SNI);
    let session_id_len_at = 5 + 4 + 2 + 32;
    let suites_len_at = session_id_len_at + 1 + hello.session_id.len();
    let compression_len_at = suites_len_at + 2 + hello.cipher_suites.len();
    let extensions_len_at = compression_len_at + 1 + hello.compression.len();
    let first_ext_len_at = extensions_len_at + 2 + 2;

    let cases: &[(usize, &[u8], ParseError)] = &[
        (
            session_id_len_at,
            &[33],
            ParseError::BadLength {
                field: Field::SessionId,
                len: 33,
            },
        ),
        (
            session_id_len_at,
            &[0xff],
            ParseError::BadLength {
                field: Field::SessionId,
                len: 0xff,
            },
        ),
        (
            suites_len_at,
            &[0xff, 0xff],
            ParseError::Truncated {
                field: Field::CipherSuites,
            },
        ),
        (
            suites_len_at,
            &[0x00, 0x03],
            ParseError::BadLength {
                field: Field::CipherSuites,
                len: 3,
            },
        ),
        (
            suites_len_at,
            &[0x00, 0x00],
            ParseError::BadLength {
                field: Field::CipherSuites,
                len: 0,
            },
        ),
        (
            compression_len_at,
            &[0x00],
            ParseError::BadLength {
                field: Field::CompressionMethods,
                len: 0,
            },
        ),
        (
            extensions_len_at,
            &[0xff, 0xff],
            ParseError::Truncated {
                field: Field::Extensions,
            },
        ),
        (
            first_ext_len_at,
            &[0xff, 0xff],
            ParseError::Truncated {
                field: Field::Extension,
            },
        ),
    ];
    for (at, patch, want) in cases {
        let mut record = CURL_SNI.to_vec();
        record[*at..at + patch.len()].copy_from_slice(patch);
        assert_eq!(parse(&record).as_ref(), Err(want), "patch at {at}");
        assert_eq!(detect(&record), Detection::TlsMalformed(want.clone()));
    }

    // Without extensions, a compression list running past the end of the message.
    let mut hello = Hello::from_capture(CURL_SNI);
    hello.extensions = None;
    let mut record = hello.record();
    record[compression_len_at] = 2;
    assert_eq!(
        parse(&record),
        Err(ParseError::Truncated {
            field: Field::CompressionMethods
        })
    );

    // A shorter extensions length leaves bytes over inside the handshake message.
    let mut record = CURL_SNI.to_vec();
    let declared = u16::from_be_bytes([record[extensions_len_at], record[extensions_len_at + 1]]);
    record[extensions_len_at..extensions_len_at + 2].copy_from_slice(&(declared - 4).to_be_bytes());
    assert_eq!(
        parse(&record),
        Err(ParseError::TrailingBytes {
            field: Field::Extensions,
            len: 4
        })
    );

    // An SNI list length that disagrees with its extension length.
    let mut hello = with_sni(&[(0, b"a.example")]);
    let sni = hello.extension_mut(EXT_SERVER_NAME);
    sni[1] += 1;
    assert_eq!(
        parse(&hello.record()),
        Err(ParseError::Truncated {
            field: Field::ServerName
        })
    );
    let mut hello = with_sni(&[(0, b"a.example")]);
    hello.extension_mut(EXT_SERVER_NAME)[1] -= 1;
    assert!(matches!(
        parse(&hello.record()),
        Err(ParseError::TrailingBytes {
            field: Field::ServerName,
            ..
        } | ParseError::Truncated {
            field: Field::ServerName
        })
    ));
}

#[test]
fn huge_declared_lengths_fail_without_waiting() {
    // A handshake length of 16 MiB is refused from the first 9 bytes, before any of it arrives.
    let header = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
    let want = ParseError::TooLarge {
        len: 4 + 0xff_ffff,
        limit: MAX_CLIENT_HELLO_LEN,
    };
    assert_eq!(parse(&header), Err(want.clone()));
    assert_eq!(detect(&header), Detection::TlsMalformed(want));

    // Just over the limit, and exactly at it.
    let over = (MAX_CLIENT_HELLO_LEN - 4 + 1).to_be_bytes();
    let mut header = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0, 0, 0];
    header[6..].copy_from_slice(&over[over.len() - 3..]);
    assert!(matches!(parse(&header), Err(ParseError::TooLarge { .. })));
    let exact = (MAX_CLIENT_HELLO_LEN - 4).to_be_bytes();
    header[6..].copy_from_slice(&exact[exact.len() - 3..]);
    assert_eq!(parse(&header), Err(ParseError::Incomplete));

    // A record longer than TLS allows.
    assert_eq!(
        parse(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x01]),
        Err(ParseError::RecordTooLong { len: 0xffff })
    );
}

#[test]
fn one_byte_records_run_out_of_budget() {
    // A large hello in 1-byte records costs 6 input bytes per message byte: the parser stops at
    // MAX_INSPECT_LEN, so a caller never buffers more than that.
    let mut hello = Hello::from_capture(CURL_SNI);
    hello
        .extensions
        .as_mut()
        .unwrap()
        .push((0x0015, vec![0; 8000]));
    let records = into_records(&hello.message(), 1);
    assert!(records.len() > MAX_INSPECT_LEN);
    let want = ParseError::TooFragmented {
        limit: MAX_INSPECT_LEN,
    };
    assert_eq!(parse(&records), Err(want.clone()));
    assert_eq!(
        detect(&records[..MAX_INSPECT_LEN]),
        Detection::TlsMalformed(want)
    );
    assert_eq!(detect(&records[..MAX_INSPECT_LEN - 1]), Detection::NeedMore);
    // The same hello in normal records is fine.
    assert!(parse(&hello.record()).is_ok());
}

#[test]
fn record_layer_errors() {
    // Application data, alert, change_cipher_spec: not a handshake.
    for content_type in [23, 21, 20] {
        let mut record = CURL_SNI.to_vec();
        record[0] = content_type;
        assert_eq!(
            parse(&record),
            Err(ParseError::NotHandshake { content_type })
        );
        assert_eq!(detect(&record), Detection::Opaque);
    }
    // An alert record in the middle of a fragmented hello.
    let mut records = into_records(handshake_message(CURL_SNI), 100);
    records[105] = 21;
    assert_eq!(
        parse(&records[..106]),
        Err(ParseError::NotHandshake { content_type: 21 })
    );
    // A version that is not TLS, in the first record and in a later one.
    assert_eq!(
        parse(&[0x16, 0x03, 0x05]),
        Err(ParseError::BadRecordVersion { major: 3, minor: 5 })
    );
    assert_eq!(detect(&[0x16, 0x03, 0x05]), Detection::Opaque);
    assert_eq!(detect(&[0x16, 0x02]), Detection::Opaque);
    let mut records = into_records(handshake_message(CURL_SNI), 100);
    records[106] = 0x09;
    assert_eq!(
        parse(&records),
        Err(ParseError::BadRecordVersion { major: 9, minor: 1 })
    );
    // An empty handshake record.
    assert_eq!(
        parse(&[0x16, 0x03, 0x01, 0x00, 0x00, 0x16]),
        Err(ParseError::EmptyRecord)
    );
}

#[test]
fn server_hello_is_not_a_client_hello() {
    let mut record = CURL_SNI.to_vec();
    record[5] = 2;
    let want = ParseError::NotClientHello { msg_type: 2 };
    // Known from the first handshake byte.
    assert_eq!(parse(&record[..6]), Err(want.clone()));
    assert_eq!(detect(&record), Detection::TlsMalformed(want));
}

#[test]
fn errors_read_well() {
    assert_eq!(
        ParseError::NotClientHello { msg_type: 2 }.to_string(),
        "handshake message type 2 is not ClientHello (1)"
    );
    assert_eq!(
        ParseError::Truncated {
            field: Field::CipherSuites
        }
        .to_string(),
        "cipher_suites runs past the end of its enclosing structure"
    );
    assert_eq!(
        ParseError::DuplicateExtension { ext_type: 0 }.to_string(),
        "extension 0x0000 occurs more than once"
    );
    assert_eq!(
        ParseError::TooLarge {
            len: 20000,
            limit: MAX_CLIENT_HELLO_LEN
        }
        .to_string(),
        "ClientHello of 20000 bytes exceeds the 16384-byte limit"
    );
}
