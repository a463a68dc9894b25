//! Validation of the SNI host name before anything routes on it.
//!
//! RFC 6066 carries the name as ASCII without a trailing dot and forbids IP literals; RFC 1123
//! host names are letters, digits and hyphens in labels of 1 to 63 bytes. Anything else is treated
//! as "no usable SNI" rather than an error: the ClientHello itself is fine, and the server will
//! reject the name or not. Underscores are refused too, so a route table keyed on host names never
//! sees a name that DNS-based service discovery could not have produced.

/// Longest SNI host name accepted, in bytes.
pub(super) const MAX_HOSTNAME_LEN: usize = 255;

const MAX_LABEL_LEN: usize = 63;

/// The host name in lower case, or `None` when it is not a valid DNS host name.
pub(super) fn normalize(name: &[u8]) -> Option<String> {
    if name.is_empty() || name.len() > MAX_HOSTNAME_LEN {
        return None;
    }
    let mut last_label: &[u8] = &[];
    for label in name.split(|&byte| byte == b'.') {
        if !is_ldh_label(label) {
            return None;
        }
        last_label = label;
    }
    // No top-level domain is all digits, so such a name is an IPv4 literal (or a mangled one).
    if last_label.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let name = std::str::from_utf8(name).ok()?;
    Some(name.to_ascii_lowercase())
}

fn is_ldh_label(label: &[u8]) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label.first() != Some(&b'-')
        && label.last() != Some(&b'-')
        && label
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || byte == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_names_and_lowercases_them() {
        for (name, want) in [
            ("example.com", "example.com"),
            ("API.Example.COM", "api.example.com"),
            (
                "reviews.default.svc.cluster.local",
                "reviews.default.svc.cluster.local",
            ),
            ("localhost", "localhost"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a-b.c-d.example", "a-b.c-d.example"),
            ("0.example", "0.example"),
            ("123.example", "123.example"),
        ] {
            assert_eq!(normalize(name.as_bytes()).as_deref(), Some(want), "{name}");
        }
    }

    #[test]
    fn label_and_name_length_limits() {
        let label63 = "a".repeat(63);
        assert!(normalize(format!("{label63}.example").as_bytes()).is_some());
        assert_eq!(
            normalize(format!("{}.example", "a".repeat(64)).as_bytes()),
            None
        );
        // 4 labels of 63 + 3 dots = 255 bytes: the longest accepted.
        let longest = [label63.as_str(); 4].join(".");
        assert_eq!(longest.len(), 255);
        assert!(normalize(longest.as_bytes()).is_some());
        assert_eq!(normalize(format!("a.{longest}").as_bytes()), None);
    }

    #[test]
    fn rejects_what_is_not_a_host_name() {
        for name in [
            &b""[..],
            b"example.com.",
            b".example.com",
            b"a..example",
            b"-lead.example",
            b"trail-.example",
            b"under_score.example",
            b"exa mple.com",
            b"example.com\0evil.test",
            b"example.com/path",
            b"user@example.com",
            "ex\u{e4}mple.com".as_bytes(),
            b"\xff\xfe.example",
            b"10.0.0.1",
            b"127.1",
            b"8",
            b"::1",
            b"[::1]",
            b"fe80::1%eth0",
        ] {
            assert_eq!(normalize(name), None, "{}", name.escape_ascii());
        }
    }
}
