//! Route filters as plain data, with the small pure helpers the proxy needs to apply them
//! (header edits, path replacement, redirect `Location`).

use serde::Serialize;

use crate::backend::Backend;
use crate::http::{MatchedPath, PathMatchKind};

/// One HTTPRoute / GRPCRoute filter, in the order the route lists them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum HttpFilter {
    /// Edit request headers before forwarding.
    RequestHeaderModifier(HeaderModifier),
    /// Edit response headers before returning them.
    ResponseHeaderModifier(HeaderModifier),
    /// Answer with a redirect instead of forwarding.
    RequestRedirect(Redirect),
    /// Rewrite host and/or path before forwarding.
    #[serde(rename = "URLRewrite")]
    UrlRewrite(UrlRewrite),
    /// Send a copy of (a fraction of) the requests to another backend, ignoring its response.
    RequestMirror(Mirror),
}

/// `set`, `add` and `remove` of a header modifier. Names are kept as written; they compare
/// case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    /// Replace any existing value(s).
    pub set: Vec<(String, String)>,
    /// Append a value, keeping existing ones.
    pub add: Vec<(String, String)>,
    /// Remove every value.
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Applies the edits to a header list, in the Gateway API order: set, add, remove.
    pub fn apply(&self, headers: &mut Vec<(String, String)>) {
        for (name, value) in &self.set {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            headers.push((name.clone(), value.clone()));
        }
        for (name, value) in &self.add {
            headers.push((name.clone(), value.clone()));
        }
        for name in &self.remove {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        }
    }
}

/// How a redirect or rewrite changes the path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    /// Replace the whole path.
    ReplaceFullPath(String),
    /// Replace the part of the path that the rule's PathPrefix matched.
    ReplacePrefixMatch(String),
}

impl PathModifier {
    /// The new path (without query) for `request_path` (without query), given what matched.
    ///
    /// `ReplacePrefixMatch` replaces the matched prefix on a segment boundary:
    /// prefix `/foo` with `/bar` turns `/foo/x` into `/bar/x`, and with `/` turns `/foo` into `/`.
    /// Validation only allows it on rules with a single PathPrefix match; if it is applied to
    /// anything else the path is left as is.
    pub fn apply(&self, matched: &MatchedPath, request_path: &str) -> String {
        match self {
            PathModifier::ReplaceFullPath(path) => path.clone(),
            PathModifier::ReplacePrefixMatch(replacement) => {
                if matched.kind != PathMatchKind::PathPrefix {
                    return request_path.to_owned();
                }
                let prefix = matched.value.trim_end_matches('/');
                let Some(rest) = request_path.strip_prefix(prefix) else {
                    return request_path.to_owned();
                };
                let mut path = format!("{}{rest}", replacement.trim_end_matches('/'));
                if path.is_empty() {
                    path.push('/');
                }
                path
            }
        }
    }
}

/// A `RequestRedirect` filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Redirect {
    /// `http` or `https`; unset keeps the request's scheme.
    pub scheme: Option<String>,
    /// Unset keeps the request's host.
    pub hostname: Option<String>,
    /// Unset keeps the request's path.
    pub path: Option<PathModifier>,
    /// Unset: the well-known port of `scheme` when set, else the port the client connected to.
    pub port: Option<u16>,
    /// 301, 302 (default), 303, 307 or 308.
    pub status_code: u16,
}

impl Redirect {
    /// The `Location` for a request, following the Gateway API rules: the port is derived from
    /// the scheme (80/443) or the listener (`service_port`) when unset, and left out when it is
    /// the scheme's well-known port. The query string is kept.
    ///
    /// `request_host` is the Host header (any port in it is dropped); `request_path` may include
    /// the query.
    pub fn location(
        &self,
        request_scheme: &str,
        request_host: &str,
        service_port: u16,
        request_path: &str,
        matched: &MatchedPath,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(request_scheme);
        let host = match &self.hostname {
            Some(host) => host.as_str(),
            None => strip_port(request_host),
        };
        let port = match (self.port, &self.scheme) {
            (Some(port), _) => Some(port),
            (None, Some(scheme)) => well_known_port(scheme),
            (None, None) => Some(service_port),
        };
        let (path, query) = match request_path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (request_path, None),
        };
        let path = match &self.path {
            Some(modifier) => modifier.apply(matched, path),
            None => path.to_owned(),
        };
        let mut location = format!("{scheme}://{host}");
        if let Some(port) = port
            && Some(port) != well_known_port(scheme)
        {
            location.push_str(&format!(":{port}"));
        }
        location.push_str(&path);
        if let Some(query) = query {
            location.push('?');
            location.push_str(query);
        }
        location
    }
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.rfind(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// A `URLRewrite` filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UrlRewrite {
    /// New Host header.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
}

/// A `RequestMirror` filter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mirror {
    /// Where copies go (weight is irrelevant).
    pub backend: Backend,
    /// Share of requests to mirror; 100/100 when the route sets neither `percent` nor `fraction`.
    pub fraction: Fraction,
}

/// `numerator / denominator` of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fraction {
    /// Mirrored part.
    pub numerator: u32,
    /// Whole; never 0.
    pub denominator: u32,
}

impl Fraction {
    /// Everything.
    pub const ALL: Fraction = Fraction {
        numerator: 100,
        denominator: 100,
    };

    /// Whether to mirror a request, given a uniformly distributed `random` from the caller.
    pub fn sample(&self, random: u32) -> bool {
        if self.numerator >= self.denominator {
            return true;
        }
        (u64::from(random) * u64::from(self.denominator)) >> 32 < u64::from(self.numerator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(value: &str) -> MatchedPath {
        MatchedPath {
            kind: PathMatchKind::PathPrefix,
            value: value.into(),
        }
    }

    #[test]
    fn replace_prefix_match() {
        let m = PathModifier::ReplacePrefixMatch("/one".into());
        assert_eq!(
            m.apply(&prefix("/prefix/one"), "/prefix/one/two"),
            "/one/two"
        );
        let strip = PathModifier::ReplacePrefixMatch("/".into());
        assert_eq!(
            strip.apply(&prefix("/strip-prefix"), "/strip-prefix/three"),
            "/three"
        );
        assert_eq!(strip.apply(&prefix("/strip-prefix"), "/strip-prefix"), "/");
        let m = PathModifier::ReplacePrefixMatch("/prefix".into());
        assert_eq!(
            m.apply(&prefix("/full/rewrite"), "/full/rewrite/one"),
            "/prefix/one"
        );
        let m = PathModifier::ReplacePrefixMatch("/new".into());
        assert_eq!(m.apply(&prefix("/old/"), "/old/x"), "/new/x");
        assert_eq!(m.apply(&prefix("/old"), "/old"), "/new");
        assert_eq!(m.apply(&prefix("/"), "/a/b"), "/new/a/b");
    }

    #[test]
    fn redirect_location_ports() {
        let matched = prefix("/");
        let mut r = Redirect {
            scheme: None,
            hostname: Some("example.org".into()),
            path: None,
            port: None,
            status_code: 302,
        };
        assert_eq!(
            r.location("http", "echo:80", 80, "/a?x=1", &matched),
            "http://example.org/a?x=1"
        );
        r.port = Some(8080);
        assert_eq!(
            r.location("http", "echo", 80, "/a", &matched),
            "http://example.org:8080/a"
        );
        r.port = None;
        r.scheme = Some("https".into());
        assert_eq!(
            r.location("http", "echo", 80, "/a", &matched),
            "https://example.org/a"
        );
        r.hostname = None;
        r.scheme = None;
        assert_eq!(
            r.location("http", "echo:1234", 8080, "/a", &matched),
            "http://echo:8080/a"
        );
    }

    #[test]
    fn header_modifier_order() {
        let m = HeaderModifier {
            set: vec![("X-Set".into(), "new".into())],
            add: vec![("X-Add".into(), "more".into())],
            remove: vec!["x-gone".into()],
        };
        let mut h = vec![
            ("x-set".to_string(), "old".to_string()),
            ("X-Add".to_string(), "first".to_string()),
            ("X-Gone".to_string(), "v".to_string()),
        ];
        m.apply(&mut h);
        assert_eq!(
            h,
            vec![
                ("X-Add".to_string(), "first".to_string()),
                ("X-Set".to_string(), "new".to_string()),
                ("X-Add".to_string(), "more".to_string()),
            ]
        );
    }

    #[test]
    fn fraction_sampling() {
        let f = Fraction {
            numerator: 1,
            denominator: 4,
        };
        let hits = (0..1000u32)
            .filter(|i| f.sample(i.wrapping_mul(4_294_967)))
            .count();
        assert!((240..=260).contains(&hits), "{hits}");
        assert!(Fraction::ALL.sample(u32::MAX));
    }
}
