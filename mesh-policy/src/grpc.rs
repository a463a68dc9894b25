//! GRPCRoute matching.
//!
//! Precedence follows the GRPCRoute spec: across all rules of all GRPCRoutes attached to a
//! Service port, the rule with the largest number of
//!
//! 1. characters in a matching non-wildcard hostname, then characters in a matching hostname
//!    (exact names, then wildcards by suffix length, then routes without hostnames),
//! 2. characters in a matching service (Exact service matches; a RegularExpression counts 0),
//! 3. characters in a matching method (likewise),
//! 4. header matches,
//!
//! then the oldest route, then `namespace/name`, then rule and match order. A rule without
//! matches matches every request. GRPCRoutes and HTTPRoutes are never merged.

use std::cmp::Reverse;
use std::sync::Arc;

use crate::hosts::{HostIndex, HostKey};
use crate::http::{HttpRule, ValueMatch, header_matches};
use crate::model::RouteId;
use crate::names::normalize_host;

/// What the route table needs to know about a gRPC call.
#[derive(Debug, Clone, Copy)]
pub struct GrpcRequest<'a> {
    /// `:authority` (or Host); a port in it is ignored. Empty if absent.
    pub authority: &'a str,
    /// Fully qualified service, e.g. `helloworld.Greeter`.
    pub service: &'a str,
    /// Method, e.g. `SayHello`.
    pub method: &'a str,
    /// Request metadata in arrival order; names compare case-insensitively.
    pub headers: &'a [(&'a str, &'a str)],
}

/// Splits a gRPC request path `/package.Service/Method` into service and method.
pub fn split_grpc_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some((service, method))
}

/// A matched gRPC call. Borrows from the [`crate::Compiled`] it came from.
#[derive(Debug, Clone, Copy)]
pub struct GrpcDecision<'a> {
    /// The route that matched.
    pub route: &'a RouteId,
    /// Index of the rule in the route's `rules`.
    pub rule_index: usize,
    /// Index of the match in the rule's `matches` (0 for a rule without matches).
    pub match_index: usize,
    /// Filters and backends of the rule (timeouts are always unset).
    pub rule: &'a Arc<HttpRule>,
}

/// Result of [`crate::Compiled::route_grpc`].
#[derive(Debug, Clone, Copy)]
pub enum GrpcOutcome<'a> {
    /// No GRPCRoute is attached to the destination: forward to the Service itself.
    NoRoutes,
    /// Routes are attached but none matches: answer with gRPC status UNIMPLEMENTED.
    NotFound,
    /// A rule matched.
    Matched(GrpcDecision<'a>),
}

/// One compiled `GRPCRouteMatch`.
#[derive(Debug, Clone, Default)]
pub(crate) struct GrpcMatcher {
    pub service: Option<ValueMatch>,
    pub method: Option<ValueMatch>,
    /// Lower-cased names, duplicates dropped.
    pub headers: Vec<(Box<str>, ValueMatch)>,
}

impl GrpcMatcher {
    fn matches(&self, request: &GrpcRequest<'_>) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| s.matches(request.service))
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(request.method))
            && self
                .headers
                .iter()
                .all(|(name, value)| header_matches(request.headers, name, value))
    }

    fn exact_chars(value: &Option<ValueMatch>) -> usize {
        match value {
            Some(ValueMatch::Exact(s)) => s.len(),
            _ => 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct GrpcCandidate {
    pub route: Arc<RouteId>,
    pub route_rank: u32,
    pub rule_index: u32,
    pub match_index: u32,
    pub matcher: GrpcMatcher,
    pub rule: Arc<HttpRule>,
}

impl GrpcCandidate {
    fn precedence(
        &self,
    ) -> (
        Reverse<usize>,
        Reverse<usize>,
        Reverse<usize>,
        u32,
        u32,
        u32,
    ) {
        (
            Reverse(GrpcMatcher::exact_chars(&self.matcher.service)),
            Reverse(GrpcMatcher::exact_chars(&self.matcher.method)),
            Reverse(self.matcher.headers.len()),
            self.route_rank,
            self.rule_index,
            self.match_index,
        )
    }
}

/// All GRPCRoute candidates attached to one Service port, per hostname tier in precedence
/// order.
#[derive(Debug, Default)]
pub(crate) struct GrpcTable {
    candidates: Vec<GrpcCandidate>,
    hosts: HostIndex<Vec<u32>>,
}

impl GrpcTable {
    pub(crate) fn add(&mut self, hostnames: &[String], candidate: GrpcCandidate) {
        let index = u32::try_from(self.candidates.len()).unwrap_or(u32::MAX);
        if hostnames.is_empty() {
            self.hosts.entry(HostKey::Any).push(index);
        }
        for hostname in hostnames {
            self.hosts.entry(HostKey::of(Some(hostname))).push(index);
        }
        self.candidates.push(candidate);
    }

    pub(crate) fn finish(&mut self) {
        let candidates = &self.candidates;
        self.hosts.for_each_mut(|list| {
            list.sort_by_key(|i| candidates[*i as usize].precedence());
            list.dedup();
        });
    }

    pub(crate) fn lookup(&self, request: &GrpcRequest<'_>) -> Option<&GrpcCandidate> {
        let host = normalize_host(request.authority);
        self.hosts.matching(&host).find_map(|(_, list)| {
            list.iter()
                .map(|i| &self.candidates[*i as usize])
                .find(|c| c.matcher.matches(request))
        })
    }

    pub(crate) fn route_count(&self) -> usize {
        let mut routes: Vec<&RouteId> = self.candidates.iter().map(|c| &*c.route).collect();
        routes.sort();
        routes.dedup();
        routes.len()
    }

    pub(crate) fn dump(&self) -> serde_json::Value {
        let mut tiers: Vec<_> = self.hosts.iter().collect();
        tiers.sort_by_key(|(key, _)| *key);
        let mut out = serde_json::Map::new();
        for (key, list) in tiers {
            let entries = list
                .iter()
                .map(|i| {
                    let c = &self.candidates[*i as usize];
                    serde_json::json!({
                        "route": c.route.to_string(),
                        "rule": c.rule_index,
                        "match": c.match_index,
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
    fn grpc_path_split() {
        assert_eq!(
            split_grpc_path("/helloworld.Greeter/SayHello"),
            Some(("helloworld.Greeter", "SayHello"))
        );
        assert_eq!(split_grpc_path("/nomethod"), None);
        assert_eq!(split_grpc_path("/a/b/c"), None);
        assert_eq!(split_grpc_path("a/b"), None);
    }
}
