//! TLSRoute (by SNI) and TCPRoute lookup.
//!
//! TLS: an exact hostname beats a wildcard, a longer wildcard beats a shorter one, and a route
//! without hostnames takes what is left. Among routes claiming the same hostname the Gateway API
//! tie-break applies: the oldest `creationTimestamp`, then `namespace/name` alphabetically. The
//! winner per hostname is decided at compile time, so a lookup is one hash probe for the exact
//! name plus one per label for wildcards.

use std::sync::Arc;

use serde::Serialize;

use crate::backend::{Backend, Split};
use crate::hosts::{HostIndex, HostKey};
use crate::model::RouteId;
use crate::names::normalize_host;

/// Where a TLS or TCP connection goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The route that matched.
    pub route: Arc<RouteId>,
    /// Weighted backends of its rule.
    pub backends: Arc<[Backend]>,
    /// Where the rule is in its weighted split of `backends`.
    #[serde(skip)]
    pub split: Split,
}

impl Decision {
    /// Whether any backend can take the connection. When not, the caller closes the
    /// connection (there is no status code to send at L4).
    pub fn is_routable(&self) -> bool {
        self.backends.iter().any(Backend::is_routable)
    }

    /// The next backend in the rule's weighted split ([`Split`]).
    pub fn pick(&self) -> Option<&Backend> {
        self.split.pick(&self.backends)
    }
}

/// TLSRoutes attached to one Service port: the winning route per hostname tier.
#[derive(Debug, Default)]
pub(crate) struct TlsTable {
    hosts: HostIndex<Option<(u32, Decision)>>,
}

impl TlsTable {
    /// Offers a route for its hostnames; the lowest `route_rank` keeps each hostname.
    pub(crate) fn add(&mut self, route_rank: u32, hostnames: &[String], decision: &Decision) {
        let keys: Vec<HostKey<'_>> = if hostnames.is_empty() {
            vec![HostKey::Any]
        } else {
            hostnames.iter().map(|h| HostKey::of(Some(h))).collect()
        };
        for key in keys {
            let slot = self.hosts.entry(key);
            if slot.as_ref().is_none_or(|(rank, _)| route_rank < *rank) {
                *slot = Some((route_rank, decision.clone()));
            }
        }
    }

    pub(crate) fn lookup(&self, sni: Option<&str>) -> Option<&Decision> {
        let host = normalize_host(sni.unwrap_or(""));
        self.hosts
            .matching(&host)
            .find_map(|(_, slot)| slot.as_ref().map(|(_, d)| d))
    }

    pub(crate) fn route_count(&self) -> usize {
        let mut routes: Vec<&RouteId> = self
            .hosts
            .iter()
            .filter_map(|(_, slot)| slot.as_ref().map(|(_, d)| &*d.route))
            .collect();
        routes.sort();
        routes.dedup();
        routes.len()
    }

    pub(crate) fn dump(&self) -> serde_json::Value {
        let mut tiers: Vec<_> = self.hosts.iter().collect();
        tiers.sort_by_key(|(key, _)| *key);
        let mut out = serde_json::Map::new();
        for (key, slot) in tiers {
            if let Some((_, decision)) = slot {
                out.insert(
                    key.display(),
                    serde_json::Value::String(decision.route.to_string()),
                );
            }
        }
        serde_json::Value::Object(out)
    }
}
