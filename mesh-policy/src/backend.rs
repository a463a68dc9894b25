//! Weighted backends and the weighted pick.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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
/// (the crate has no RNG: the caller owns randomness, which also keeps tests deterministic);
/// rules feed it from their [`Split`], which makes the shares exact rather than random.
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

/// Where a rule is in its weighted split. Each pick takes the next point of a low-discrepancy
/// sequence (n times the golden ratio, modulo 1, in 32-bit fixed point) instead of a random
/// number, so every run of consecutive requests is split in the configured ratio: of any N
/// requests of a 70/30 rule, the first backend gets 0.7 N give or take a few requests, where
/// random picks miss by about 1.5 / sqrt(N) (4 % at 500 requests). Consecutive points are
/// far apart, so the backends still take turns rather than runs. One relaxed atomic add per
/// pick, shared by the agent's threads and by every clone (lookups hand out clones of L4
/// decisions); a reloaded policy starts again at 0.
#[derive(Clone, Default)]
pub struct Split(Arc<AtomicU32>);

/// 2^32 / golden ratio: the Weyl step with the most evenly spread multiples.
const GOLDEN_STEP: u32 = 0x9E37_79B9;

impl Split {
    /// The next point in `[0, 2^32)` for [`pick_weighted`].
    pub fn next_point(&self) -> u32 {
        self.0
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(GOLDEN_STEP)
    }

    /// The next backend of `backends` in their weighted split. A single backend needs no
    /// position: the shared counter is left alone, so the common one-backend rule costs the
    /// agent's threads no contended atomic per request.
    pub fn pick<'b>(&self, backends: &'b [Backend]) -> Option<&'b Backend> {
        let point = if backends.len() > 1 {
            self.next_point()
        } else {
            0
        };
        pick_weighted(backends, point)
    }
}

impl PartialEq for Split {
    /// Runtime state, not configuration: two rules that differ only here are the same rule.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Split")
            .field(&self.0.load(Ordering::Relaxed))
            .finish()
    }
}
