//! Test fixtures: ClientHellos captured on loopback (see `tests/data/README.md`) and helpers to
//! take them apart, rebuild them and cut them up differently.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

/// A captured ClientHello and what a correct parser reads from it (checked against the capture
/// with `openssl` and by eye, not with this crate).
pub(crate) struct Capture {
    pub name: &'static str,
    pub bytes: &'static [u8],
    pub sni: Option<&'static str>,
    pub alpn: &'static [&'static str],
    pub offers_tls13: bool,
}

pub(crate) const CURL_SNI: &[u8] = include_bytes!("../tests/data/curl_sni.bin");

pub(crate) const CAPTURES: &[Capture] = &[
    Capture {
        name: "curl_sni",
        bytes: CURL_SNI,
        sni: Some("api.example.com"),
        alpn: &["h2", "http/1.1"],
        offers_tls13: true,
    },
    Capture {
        name: "curl_tls12",
        bytes: include_bytes!("../tests/data/curl_tls12.bin"),
        sni: Some("legacy.example.org"),
        alpn: &["h2", "http/1.1"],
        offers_tls13: false,
    },
    Capture {
        name: "openssl_sni_alpn",
        bytes: include_bytes!("../tests/data/openssl_sni_alpn.bin"),
        sni: Some("example.com"),
        alpn: &["h2", "http/1.1"],
        offers_tls13: true,
    },
    Capture {
        name: "openssl_no_sni",
        bytes: include_bytes!("../tests/data/openssl_no_sni.bin"),
        sni: None,
        alpn: &["http/1.1"],
        offers_tls13: true,
    },
    Capture {
        name: "python_ssl",
        bytes: include_bytes!("../tests/data/python_ssl.bin"),
        // Sent as "Reviews.Default.svc.cluster.local": the parser lower-cases it.
        sni: Some("reviews.default.svc.cluster.local"),
        alpn: &["h2"],
        offers_tls13: true,
    },
];

/// The handshake message of a capture that sits in a single record.
pub(crate) fn handshake_message(record: &[u8]) -> &[u8] {
    let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
    assert_eq!(record.len(), 5 + len, "fixture is not exactly one record");
    &record[5..]
}

/// `message` cut into handshake records of at most `fragment_len` bytes each.
pub(crate) fn into_records(message: &[u8], fragment_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for fragment in message.chunks(fragment_len) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&u16::try_from(fragment.len()).unwrap().to_be_bytes());
        out.extend_from_slice(fragment);
    }
    out
}

/// A ClientHello taken apart into its fields, to be changed and put back together with every
/// length recomputed.
#[derive(Clone)]
pub(crate) struct Hello {
    pub version: [u8; 2],
    pub random: Vec<u8>,
    pub session_id: Vec<u8>,
    pub cipher_suites: Vec<u8>,
    pub compression: Vec<u8>,
    /// `None`: no extensions block at all.
    pub extensions: Option<Vec<(u16, Vec<u8>)>>,
}

impl Hello {
    /// Parses a handshake message with plain indexing: fixtures are trusted.
    pub(crate) fn from_message(message: &[u8]) -> Self {
        fn vec<'a>(bytes: &mut &'a [u8], prefix: usize) -> &'a [u8] {
            let len = bytes[..prefix]
                .iter()
                .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
            let (value, rest) = bytes[prefix..].split_at(len);
            *bytes = rest;
            value
        }
        assert_eq!(message[0], 1);
        let mut rest = &message[4..];
        let version = [rest[0], rest[1]];
        let random = rest[2..34].to_vec();
        rest = &rest[34..];
        let session_id = vec(&mut rest, 1).to_vec();
        let cipher_suites = vec(&mut rest, 2).to_vec();
        let compression = vec(&mut rest, 1).to_vec();
        let mut block = vec(&mut rest, 2);
        assert!(rest.is_empty());
        let mut extensions = Vec::new();
        while !block.is_empty() {
            let ext_type = u16::from_be_bytes([block[0], block[1]]);
            block = &block[2..];
            extensions.push((ext_type, vec(&mut block, 2).to_vec()));
        }
        Self {
            version,
            random,
            session_id,
            cipher_suites,
            compression,
            extensions: Some(extensions),
        }
    }

    pub(crate) fn from_capture(record: &[u8]) -> Self {
        Self::from_message(handshake_message(record))
    }

    pub(crate) fn message(&self) -> Vec<u8> {
        let mut body = self.version.to_vec();
        body.extend_from_slice(&self.random);
        push_vec(&mut body, 1, &self.session_id);
        push_vec(&mut body, 2, &self.cipher_suites);
        push_vec(&mut body, 1, &self.compression);
        if let Some(extensions) = &self.extensions {
            let mut block = Vec::new();
            for (ext_type, data) in extensions {
                block.extend_from_slice(&ext_type.to_be_bytes());
                push_vec(&mut block, 2, data);
            }
            push_vec(&mut body, 2, &block);
        }
        let mut message = vec![1];
        push_vec(&mut message, 3, &body);
        message
    }

    /// The message in one record.
    pub(crate) fn record(&self) -> Vec<u8> {
        into_records(&self.message(), usize::MAX)
    }

    pub(crate) fn extension_mut(&mut self, ext_type: u16) -> &mut Vec<u8> {
        let extensions = self.extensions.as_mut().unwrap();
        &mut extensions
            .iter_mut()
            .find(|(t, _)| *t == ext_type)
            .unwrap()
            .1
    }
}

/// Appends `data` with a big-endian length prefix of `prefix` bytes.
pub(crate) fn push_vec(out: &mut Vec<u8>, prefix: usize, data: &[u8]) {
    let len = data.len().to_be_bytes();
    out.extend_from_slice(&len[len.len() - prefix..]);
    out.extend_from_slice(data);
}

/// A server_name extension body listing `(name_type, name)` entries.
pub(crate) fn server_name_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (name_type, name) in entries {
        list.push(*name_type);
        push_vec(&mut list, 2, name);
    }
    let mut ext = Vec::new();
    push_vec(&mut ext, 2, &list);
    ext
}

/// xorshift64: reproducible pseudo-random numbers without a dependency.
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..bound` (`bound` > 0).
    pub(crate) fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    pub(crate) fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }
}
