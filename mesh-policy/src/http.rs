//! HTTPRoute matching: request view, decisions, compiled matchers and the per-parent route table.
//!
//! # Precedence
//!
//! Across all rules of all HTTPRoutes attached to a Service port, the first match in this order
//! wins (Gateway API `HTTPRouteRule.matches` and `HTTPRouteSpec.hostnames`):
//!
//! 1. hostname: a route naming the Host exactly, then routes whose wildcard matches it (longer
//!    suffix first), then routes without hostnames;
//! 2. Exact path, then PathPrefix, then RegularExpression;
//! 3. longer path value first (PathPrefix values compare without their trailing `/`;
//!    RegularExpressions by pattern length);
//! 4. a method match;
//! 5. more header matches;
//! 6. more query-param matches;
//! 7. the oldest route (`creationTimestamp`; routes without one count as newest);
//! 8. route `namespace/name` alphabetically;
//! 9. rule order within the route, then match order within the rule.
//!
//! # Index
//!
//! Rather than one flat sorted list per hostname, each hostname tier holds a [`PathIndex`]:
//! Exact paths in a hash map, PathPrefix values in a hash map keyed by the value without its
//! trailing `/` (the request path is walked segment by segment, longest first), and the
//! RegularExpression matches in a list. Within each bucket candidates are sorted by criteria
//! 4–9. Since criteria 1–3 are exactly the tier/bucket order, walking tiers and buckets in order
//! visits candidates in full precedence order, and a lookup costs a few hash probes plus the
//! candidates that share the request's host and path, whatever the number of routes.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use serde::Serialize;

use crate::backend::{Backend, Split};
use crate::filter::{HttpFilter, Redirect};
use crate::hosts::{HostIndex, HostKey};
use crate::model::RouteId;
use crate::names::normalize_host;

/// What the route table needs to know about an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Request method, e.g. `GET` (case-sensitive).
    pub method: &'a str,
    /// The Host header or `:authority`; a port in it is ignored. Empty if absent.
    pub host: &'a str,
    /// The request target in origin form; may include `?query` (a `#fragment` is ignored).
    pub path: &'a str,
    /// Request headers in arrival order; names compare case-insensitively.
    pub headers: &'a [(&'a str, &'a str)],
}

/// The kind of path match that selected a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PathMatchKind {
    /// `Exact`.
    Exact,
    /// `PathPrefix` (segment-wise).
    PathPrefix,
    /// `RegularExpression` (whole path, RE2-like syntax of the `regex` crate).
    RegularExpression,
}

/// The path match that selected a rule, needed to apply `ReplacePrefixMatch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatchedPath {
    /// Match type.
    pub kind: PathMatchKind,
    /// The value as written in the route.
    pub value: Arc<str>,
}

/// Rule timeouts. `None`: not set (the agent's default applies); `Some(ZERO)`: explicitly
/// disabled (`0s`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// Whole request-response deadline.
    pub request: Option<Duration>,
    /// Deadline per request to a backend.
    pub backend_request: Option<Duration>,
}

/// What a matched rule does: shared by every match of the rule and every parent it applies to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpRule {
    /// `rules[].name`, if any.
    pub name: Option<String>,
    /// Rule-level filters in route order.
    pub filters: Vec<HttpFilter>,
    /// Weighted backends, with their backend-level filters.
    pub backends: Vec<Backend>,
    /// Timeouts (HTTPRoute only).
    pub timeouts: Timeouts,
    /// Where the rule is in its weighted split of `backends`.
    #[serde(skip)]
    pub split: Split,
}

impl HttpRule {
    /// The next backend in the rule's weighted split ([`Split`]).
    pub fn pick(&self) -> Option<&Backend> {
        self.split.pick(&self.backends)
    }

    /// The rule's redirect filter, if it has one.
    pub fn redirect(&self) -> Option<&Redirect> {
        self.filters.iter().find_map(|f| match f {
            HttpFilter::RequestRedirect(r) => Some(r),
            _ => None,
        })
    }

    /// What the proxy does with a request that matched this rule.
    pub fn action(&self) -> HttpAction<'_> {
        if let Some(redirect) = self.redirect() {
            HttpAction::Redirect(redirect)
        } else if self.backends.iter().any(Backend::is_routable) {
            HttpAction::Forward
        } else {
            HttpAction::NoBackends
        }
    }
}

/// What to do with a matched request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HttpAction<'a> {
    /// Answer with this redirect (its `status_code`).
    Redirect(&'a Redirect),
    /// Pick a backend with [`HttpRule::pick`] and forward.
    Forward,
    /// No backend can take traffic: every backend has weight 0 or no ready endpoints, or the
    /// rule has none. The caller answers 500, as the Gateway API requires.
    NoBackends,
}

/// A matched HTTP request: which route, rule and match, and what to do. Borrows from the
/// [`crate::Compiled`] it came from.
#[derive(Debug, Clone, Copy)]
pub struct HttpDecision<'a> {
    /// The route that matched.
    pub route: &'a RouteId,
    /// Index of the rule in the route's `rules`.
    pub rule_index: usize,
    /// Index of the match in the rule's `matches` (0 for a rule without matches).
    pub match_index: usize,
    /// The path match that selected the rule.
    pub path: &'a MatchedPath,
    /// Filters, backends and timeouts of the rule.
    pub rule: &'a Arc<HttpRule>,
}

impl<'a> HttpDecision<'a> {
    /// Rule-level filters in route order.
    pub fn filters(&self) -> &'a [HttpFilter] {
        &self.rule.filters
    }

    /// Weighted backends.
    pub fn backends(&self) -> &'a [Backend] {
        &self.rule.backends
    }

    /// Rule timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.rule.timeouts
    }

    /// Redirect, forward, or answer 500.
    pub fn action(&self) -> HttpAction<'a> {
        self.rule.action()
    }
}

/// Result of [`crate::Compiled::route_http`].
#[derive(Debug, Clone, Copy)]
pub enum HttpOutcome<'a> {
    /// No HTTPRoute is attached to the destination: forward to the Service itself.
    NoRoutes,
    /// Routes are attached but none matches: answer 404.
    NotFound,
    /// A rule matched.
    Matched(HttpDecision<'a>),
}

/// Exact or regular-expression comparison of a header, query or gRPC value.
#[derive(Debug, Clone)]
pub(crate) enum ValueMatch {
    Exact(Box<str>),
    Regex(Regex),
}

impl ValueMatch {
    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(expected) => **expected == *value,
            ValueMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// A compiled path condition.
#[derive(Debug, Clone)]
pub(crate) enum PathMatch {
    Exact(Box<str>),
    /// The prefix without trailing `/`; empty for `/`.
    Prefix(Box<str>),
    Regex(Regex),
}

/// One compiled `HTTPRouteMatch`. The path is matched by the [`PathIndex`]; the rest here.
#[derive(Debug, Clone)]
pub(crate) struct HttpMatcher {
    pub path: PathMatch,
    pub matched: MatchedPath,
    pub method: Option<Box<str>>,
    /// Header names lower-cased; later entries with a name already present were dropped, as
    /// the spec requires.
    pub headers: Vec<(Box<str>, ValueMatch)>,
    /// Query parameter names as written (case-sensitive), duplicates dropped.
    pub query: Vec<(Box<str>, ValueMatch)>,
}

impl HttpMatcher {
    /// The default match of a rule without matches: PathPrefix `/`.
    pub(crate) fn catch_all() -> Self {
        HttpMatcher {
            path: PathMatch::Prefix("".into()),
            matched: MatchedPath {
                kind: PathMatchKind::PathPrefix,
                value: "/".into(),
            },
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    /// Method, headers and query (the path was already matched).
    fn matches_rest(&self, request: &RequestParts<'_>, query: &str) -> bool {
        if let Some(method) = &self.method
            && **method != *request.method
        {
            return false;
        }
        self.headers
            .iter()
            .all(|(name, value)| header_matches(request.headers, name, value))
            && self
                .query
                .iter()
                .all(|(name, value)| query_matches(query, name, value))
    }

    fn path_len(&self) -> usize {
        match &self.path {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p.len(),
            PathMatch::Regex(_) => self.matched.value.len(),
        }
    }
}

/// Whether the first header called `name` has a matching value (absent: no match).
pub(crate) fn header_matches(headers: &[(&str, &str)], name: &str, value: &ValueMatch) -> bool {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .is_some_and(|(_, v)| value.matches(v))
}

/// Whether the first query parameter called `name` (after percent-decoding) has a matching
/// value.
fn query_matches(query: &str, name: &str, value: &ValueMatch) -> bool {
    for pair in query.split('&') {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(n) == name {
            return value.matches(&percent_decode(v));
        }
    }
    false
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One match of one rule of one route, as attached to one parent.
#[derive(Debug)]
pub(crate) struct HttpCandidate {
    pub route: Arc<RouteId>,
    /// Position of the route in (creationTimestamp, namespace/name) order.
    pub route_rank: u32,
    pub rule_index: u32,
    pub match_index: u32,
    pub matcher: HttpMatcher,
    pub rule: Arc<HttpRule>,
}

impl HttpCandidate {
    /// Criteria 4–9 of the module docs.
    fn tie_break(&self) -> (Reverse<bool>, Reverse<usize>, Reverse<usize>, u32, u32, u32) {
        (
            Reverse(self.matcher.method.is_some()),
            Reverse(self.matcher.headers.len()),
            Reverse(self.matcher.query.len()),
            self.route_rank,
            self.rule_index,
            self.match_index,
        )
    }
}

/// Candidates of one hostname tier, indexed by path. Values are indices into
/// [`HttpTable::candidates`], sorted by precedence.
#[derive(Debug, Default)]
pub(crate) struct PathIndex {
    exact: HashMap<Box<str>, Vec<u32>>,
    prefix: HashMap<Box<str>, Vec<u32>>,
    regex: Vec<u32>,
}

impl PathIndex {
    fn insert(&mut self, index: u32, path: &PathMatch) {
        match path {
            PathMatch::Exact(p) => self.exact.entry(p.clone()).or_default().push(index),
            PathMatch::Prefix(p) => self.prefix.entry(p.clone()).or_default().push(index),
            PathMatch::Regex(_) => self.regex.push(index),
        }
    }

    fn sort(&mut self, candidates: &[HttpCandidate]) {
        let key = |i: &u32| candidates[*i as usize].tie_break();
        for list in self.exact.values_mut().chain(self.prefix.values_mut()) {
            list.sort_by_key(key);
            list.dedup();
        }
        self.regex.sort_by_key(|i| {
            let c = &candidates[*i as usize];
            (Reverse(c.matcher.path_len()), c.tie_break())
        });
        self.regex.dedup();
    }

    fn find<'a>(
        &self,
        candidates: &'a [HttpCandidate],
        request: &RequestParts<'_>,
        path: &str,
        query: &str,
    ) -> Option<&'a HttpCandidate> {
        let first = |list: &[u32]| {
            list.iter()
                .map(|i| &candidates[*i as usize])
                .find(|c| c.matcher.matches_rest(request, query))
        };
        if let Some(list) = self.exact.get(path)
            && let Some(found) = first(list)
        {
            return Some(found);
        }
        if !self.prefix.is_empty() {
            // Segment prefixes of the path, longest first: /a/b, /a, "" (for `/`).
            let mut key = path.trim_end_matches('/');
            loop {
                if let Some(list) = self.prefix.get(key)
                    && let Some(found) = first(list)
                {
                    return Some(found);
                }
                match key.rfind('/') {
                    Some(slash) => key = &key[..slash],
                    None => break,
                }
            }
        }
        self.regex
            .iter()
            .map(|i| &candidates[*i as usize])
            .find(|c| match &c.matcher.path {
                PathMatch::Regex(re) => re.is_match(path) && c.matcher.matches_rest(request, query),
                _ => false,
            })
    }

    /// Candidate indices in precedence order, for dumps.
    fn ordered(&self) -> Vec<u32> {
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        let mut prefix: Vec<_> = self.prefix.iter().collect();
        prefix.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        exact
            .into_iter()
            .chain(prefix)
            .flat_map(|(_, list)| list.iter().copied())
            .chain(self.regex.iter().copied())
            .collect()
    }
}

/// All HTTPRoute candidates attached to one Service port.
#[derive(Debug, Default)]
pub(crate) struct HttpTable {
    candidates: Vec<HttpCandidate>,
    hosts: HostIndex<PathIndex>,
}

impl HttpTable {
    /// Adds one match of one rule, for every hostname tier of its route (`hostnames` already
    /// deduplicated; empty for routes without hostnames).
    pub(crate) fn add(&mut self, hostnames: &[String], candidate: HttpCandidate) {
        let index = u32::try_from(self.candidates.len()).unwrap_or(u32::MAX);
        if hostnames.is_empty() {
            self.hosts
                .entry(HostKey::Any)
                .insert(index, &candidate.matcher.path);
        }
        for hostname in hostnames {
            self.hosts
                .entry(HostKey::of(Some(hostname)))
                .insert(index, &candidate.matcher.path);
        }
        self.candidates.push(candidate);
    }

    /// Sorts every bucket; call once after the last `add`.
    pub(crate) fn finish(&mut self) {
        let candidates = &self.candidates;
        self.hosts.for_each_mut(|index| index.sort(candidates));
    }

    pub(crate) fn lookup(&self, request: &RequestParts<'_>) -> Option<&HttpCandidate> {
        let host = normalize_host(request.host);
        let target = request.path.split('#').next().unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        self.hosts
            .matching(&host)
            .find_map(|(_, index)| index.find(&self.candidates, request, path, query))
    }

    pub(crate) fn route_count(&self) -> usize {
        let mut routes: Vec<&RouteId> = self.candidates.iter().map(|c| &*c.route).collect();
        routes.sort();
        routes.dedup();
        routes.len()
    }

    /// `{hostname: [ "HTTPRoute ns/name rule N match M (Kind value)", ...] }` in precedence
    /// order.
    pub(crate) fn dump(&self) -> serde_json::Value {
        let mut tiers: Vec<_> = self.hosts.iter().collect();
        tiers.sort_by_key(|(key, _)| *key);
        let mut out = serde_json::Map::new();
        for (key, index) in tiers {
            let entries = index
                .ordered()
                .into_iter()
                .map(|i| {
                    let c = &self.candidates[i as usize];
                    serde_json::json!({
                        "route": c.route.to_string(),
                        "rule": c.rule_index,
                        "match": c.match_index,
                        "path": c.matcher.matched,
                        "method": c.matcher.method.as_deref(),
                        "headers": c.matcher.headers.len(),
                        "queryParams": c.matcher.query.len(),
                    })
                })
                .collect();
            out.insert(key.display(), serde_json::Value::Array(entries));
        }
        serde_json::Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_param_first_value_and_decoding() {
        let exact = ValueMatch::Exact("whale".into());
        assert!(query_matches("animal=whale&x=1", "animal", &exact));
        assert!(!query_matches(
            "animal=dolphin&animal=whale",
            "animal",
            &exact
        ));
        assert!(query_matches("an%69mal=wh%61le", "animal", &exact));
        assert!(!query_matches("ANIMAL=whale", "animal", &exact));
        assert!(!query_matches("", "animal", &exact));
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn header_names_are_case_insensitive_first_value_wins() {
        let exact = ValueMatch::Exact("one".into());
        assert!(header_matches(&[("Version", "one")], "version", &exact));
        assert!(!header_matches(
            &[("version", "two"), ("version", "one")],
            "version",
            &exact
        ));
        assert!(!header_matches(&[("Version", "ONE")], "version", &exact));
    }
}
