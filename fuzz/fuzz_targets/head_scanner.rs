//! Feeds arbitrary bytes to the HTTP/1 scanner that runs before hyper, whole and cut into the
//! pieces the first bytes choose, checking that it never panics, that where and why it refuses
//! do not depend on how the stream was cut (reads deliver arbitrary pieces), and that an offset
//! it reports lies inside the input. Host values are checked against a slow reading of the
//! RFC 3986 grammar.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_http::fuzzing::{Found, is_valid_host, scan};

/// RFC 3986 `host [":" port]` as the grammar reads, written differently from the scanner's.
fn host_by_grammar(value: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return false;
        };
        let literal_ok = if let Some(future) = inner.strip_prefix(['v', 'V']) {
            future.split_once('.').is_some_and(|(version, tail)| {
                !version.is_empty()
                    && version.chars().all(|c| c.is_ascii_hexdigit())
                    && !tail.is_empty()
                    && tail
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:".contains(c))
            })
        } else {
            inner.parse::<std::net::Ipv6Addr>().is_ok()
        };
        if !literal_ok {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let mut chars = host.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let (Some(a), Some(b)) = (chars.next(), chars.next()) else {
                return false;
            };
            if !a.is_ascii_hexdigit() || !b.is_ascii_hexdigit() {
                return false;
            }
        } else if !(c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=".contains(c)) {
            return false;
        }
    }
    port.is_none_or(|p| {
        p.chars().all(|c| c.is_ascii_digit())
            && (p.is_empty() || p.parse::<u32>().is_ok_and(|n| n <= 65535))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    // The first byte says how many cut points follow (two bytes each).
    let n = usize::from(n % 8);
    let (cut_bytes, input) = rest.split_at((n * 2).min(rest.len()));
    let cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .collect();
    // Small limits reach the limit paths too.
    let (max_head, max_headers) = (1024, 16);
    let whole = scan(input, &[], max_head, max_headers);
    let pieces = scan(input, &cuts, max_head, max_headers);
    assert_eq!(whole, pieces, "cut at {cuts:?}");
    let bytewise: Vec<usize> = (1..input.len()).collect();
    if input.len() <= 4096 {
        assert_eq!(whole, scan(input, &bytewise, max_head, max_headers));
    }
    match whole {
        Found::Clean => {}
        Found::Head { at, .. } | Found::Body { at, .. } => assert!(at < input.len()),
    }
    if input.len() <= 300 && !input.contains(&b'\n') {
        assert_eq!(
            is_valid_host(input),
            host_by_grammar(input),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
});
