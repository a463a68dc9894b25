//! Weighted backends and the weighted pick.

use std::net::SocketAddr;

use serde::Serialize;

use crate::filter::HttpFilter;
use crate::model::ServiceRef;

/// Where a route sends traffic: one `backendRef`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backend {
    /// The Service named by the backendRef.
    pub service: ServiceRef,
    /// The Service port named by the backendRef.
    pub port: u16,
    /// Ready endpoints of that Service port (pod address and target port), in EndpointSlice
    /// order. Empty when the Service has no ready endpoints: the caller answers 503 for
    /// requests that land here.
    pub endpoints: Vec<SocketAddr>,
    /// Relative weight; 0 means never chosen.
    pub weight: u32,
    /// Filters that apply only when this backend is chosen (HTTPRoute/GRPCRoute
    /// `backendRefs[].filters`).
    pub filters: Vec<HttpFilter>,
    /// The backendRef names nothing the data plane can send to (see
    /// [`crate::Options::unresolved_backends`]): requests that pick it get 500, as the Gateway
    /// API requires, while the rule's other backends keep their share.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unresolved: bool,
}

impl Backend {
    /// Whether traffic can actually be delivered here: non-zero weight, resolved, and at least
    /// one ready endpoint.
    pub fn is_routable(&self) -> bool {
        self.weight > 0 && !self.unresolved && !self.endpoints.is_empty()
    }
}

/// Picks a backend in proportion to its weight. `random` is any uniformly distributed `u32`
/// (the crate has no RNG: the caller owns randomness, which also keeps tests deterministic).
///
/// Weight-0 backends are never chosen; `None` when every weight is 0. A chosen backend may have
/// no endpoints: per the Gateway API that share of requests fails (503) rather than being moved
/// to other backends.
pub fn pick_weighted(backends: &[Backend], random: u32) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    // Scale into [0, total) without modulo bias beyond 2^-32.
    let mut point = (u64::from(random) * total) >> 32;
    for backend in backends {
        let weight = u64::from(backend.weight);
        if point < weight {
            return Some(backend);
        }
        point -= weight;
    }
    None
}
