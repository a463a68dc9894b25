//! Syntax rules shared by validation and lookup: DNS names, Gateway API hostnames, HTTP header
//! names, Gateway API durations, and Host header normalization.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use regex::{Regex, RegexBuilder};

/// Compiled-program size cap for user regular expressions, so a hostile pattern cannot make the
/// agent allocate without bound.
const REGEX_SIZE_LIMIT: usize = 1 << 18;
/// Lazy-DFA cache cap per regular expression.
const REGEX_DFA_SIZE_LIMIT: usize = 1 << 18;

/// RFC 1123 label: lower-case alphanumerics and `-`, starting and ending alphanumeric, at most
/// 63 characters.
pub(crate) fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("label {s:?} is longer than 63 characters"));
    }
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.iter().all(|&b| alnum(b) || b == b'-') {
        return Err(format!(
            "{s:?} must consist of lower-case alphanumeric characters or '-'"
        ));
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(format!(
            "{s:?} must start and end with an alphanumeric character"
        ));
    }
    Ok(())
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub(crate) fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err("must be at most 253 characters".into());
    }
    for label in s.split('.') {
        dns_label(label).map_err(|e| format!("{s:?} is not a valid DNS name: {e}"))?;
    }
    Ok(())
}

/// A Gateway API `Hostname`: an RFC 1123 name, not an IP address, optionally with `*.` as the
/// whole leftmost label.
pub(crate) fn route_hostname(s: &str, allow_wildcard: bool) -> Result<(), String> {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("{s:?} is an IP address; hostnames must be names"));
    }
    let name = match s.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => return Err(format!("{s:?}: a wildcard is not allowed here")),
        None => s,
    };
    if name.contains('*') {
        return Err(format!(
            "{s:?}: a wildcard may only appear as the whole leftmost label ('*.')"
        ));
    }
    if s.len() > 253 {
        return Err(format!("{s:?} is longer than 253 characters"));
    }
    dns_subdomain(name).map_err(|_| {
        format!("{s:?} is not a valid hostname (RFC 1123: lower-case labels of a-z, 0-9 and '-')")
    })
}

/// An HTTP header name as the Gateway API `HeaderName` type allows: an RFC 7230 token of at
/// most 256 characters.
pub(crate) fn header_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("header name must not be empty".into());
    }
    if s.len() > 256 {
        return Err("header name is longer than 256 characters".into());
    }
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if let Some(bad) = s.chars().find(|&c| !token(c)) {
        return Err(format!(
            "header name {s:?} contains {bad:?}; only RFC 7230 token characters are allowed"
        ));
    }
    Ok(())
}

/// Parses a Gateway API (GEP-2257) duration: `1s`, `500ms`, `1h2m`; at most four components of
/// at most five digits, units h, m, s and ms.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let parsed = gateway_api::Duration::from_str(s)
        .map_err(|e| format!("{s:?} is not a Gateway API duration (like 1s, 500ms, 1h2m): {e}"))?;
    Ok(Duration::new(parsed.as_secs(), parsed.subsec_nanos()))
}

/// Compiles a user regular expression, anchored to match the whole value, with size limits.
pub(crate) fn user_regex(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_DFA_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            let msg = e.to_string();
            // The regex crate's syntax errors span several lines with a caret diagram.
            let last = msg
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid");
            format!("invalid regular expression {pattern:?}: {}", last.trim())
        })
}

/// The host part of a `Host` header or SNI, ready for hostname matching: without a port,
/// without a trailing dot, lower case. Allocates only when it has to lower-case.
pub(crate) fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = host.trim();
    let host = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: "[::1]:80" -> "::1"; never matches a route hostname, but be tidy.
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames() {
        assert!(route_hostname("example.com", true).is_ok());
        assert!(route_hostname("*.example.com", true).is_ok());
        assert!(route_hostname("*.example.com", false).is_err());
        assert!(route_hostname("foo.*.com", true).is_err());
        assert!(route_hostname("*example.com", true).is_err());
        assert!(route_hostname("Example.com", true).is_err());
        assert!(route_hostname("10.0.0.1", true).is_err());
        assert!(route_hostname("-bad.com", true).is_err());
        assert!(route_hostname("a..b", true).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("1h2m"), Ok(Duration::from_secs(3720)));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        assert!(duration("1.5s").is_err());
        assert!(duration("-1s").is_err());
        assert!(duration("10us").is_err());
        assert!(duration("1d").is_err());
    }

    #[test]
    fn host_normalization() {
        assert_eq!(
            normalize_host("Very.Specific.com:1234"),
            "very.specific.com"
        );
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert!(matches!(normalize_host("plain"), Cow::Borrowed("plain")));
    }

    #[test]
    fn header_names() {
        assert!(header_name("X-Header_1").is_ok());
        assert!(header_name(":method").is_err());
        assert!(header_name("bad header").is_err());
        assert!(header_name("").is_err());
    }

    #[test]
    fn regex_is_anchored_and_limited() {
        let re = user_regex("/v[0-9]+").expect("valid pattern");
        assert!(re.is_match("/v12"));
        assert!(!re.is_match("/v12/x"));
        assert!(user_regex("(unclosed").is_err());
        assert!(user_regex("a{1000}{1000}").is_err());
    }
}
