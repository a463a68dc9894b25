//! What a status writer needs to know about a compiled policy beyond its route tables: the
//! backendRefs that name nothing the data plane can send to, and the routes that lost their
//! Service port to a route of another kind.

use std::fmt;

use serde::Serialize;

use crate::model::{RouteId, RouteKind, ServiceRef};

/// How [`crate::Compiled::compile_with`] treats references it cannot resolve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// A `backendRef` to a Service that does not exist, to a kind other than Service, or to
    /// another namespace (no ReferenceGrant support) becomes an unresolved backend: the route
    /// stays in force, requests that pick that backend get HTTP 500 (a TCP or TLS connection
    /// is closed), and the reference is listed in [`crate::Compiled::unresolved_refs`]. This is
    /// what the Gateway API asks of a controller (`ResolvedRefs=False`); Kubernetes mode uses
    /// it, so that a route does not vanish while the Service it names is being created.
    /// Off (the default, file mode): such a route is an error, as `mesh-agent check` reports.
    pub unresolved_backends: bool,
}

/// Why a `backendRef` could not be resolved; the variants are the Gateway API's
/// `ResolvedRefs=False` reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RefProblem {
    /// The Service does not exist.
    BackendNotFound,
    /// The reference is not a core Service.
    InvalidKind,
    /// The reference crosses namespaces; ReferenceGrants are not supported.
    RefNotPermitted,
}

impl RefProblem {
    /// The Gateway API condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            RefProblem::BackendNotFound => "BackendNotFound",
            RefProblem::InvalidKind => "InvalidKind",
            RefProblem::RefNotPermitted => "RefNotPermitted",
        }
    }
}

/// One `backendRef` left unresolved (see [`Options::unresolved_backends`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnresolvedRef {
    /// `Kind namespace/name` of the route, as in [`crate::ValidationError::object`].
    pub object: String,
    /// The field, e.g. `spec.rules[0].backendRefs[1].name`.
    pub field: String,
    /// Which Gateway API reason applies.
    pub problem: RefProblem,
    /// What is wrong, in one line.
    pub message: String,
}

impl fmt::Display for UnresolvedRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A route that attaches to a Service port where a route of another kind takes precedence.
///
/// GEP-1426 (GAMMA, "Route types"): "If multiple routes with different types both bind to the
/// same Service and Port pair, only a single route type should be applied. The rejected routes
/// should be ignored and have the `RouteConditionAccepted` status set to the (new) reason
/// `RouteReasonConflicted`", with the precedence GRPCRoute, HTTPRoute, TLSRoute, TCPRoute (first
/// one wins). Routes of the same kind do not conflict: they merge by their own rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KindConflict {
    /// The route that is not applied on this port.
    pub route: RouteId,
    /// The Service.
    pub service: ServiceRef,
    /// The Service port.
    pub port: u16,
    /// The kind that is applied there instead.
    pub winner: RouteKind,
}

impl fmt::Display for KindConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {} also attaches to Service {} port {}, and takes precedence over {} (GEP-1426: GRPCRoute, HTTPRoute, TLSRoute, TCPRoute)",
            self.winner.as_str(),
            self.service,
            self.port,
            self.route.kind.as_str()
        )
    }
}

/// GEP-1426 precedence of route kinds on one Service port: lower wins.
pub(crate) fn precedence(kind: RouteKind) -> u8 {
    match kind {
        RouteKind::Grpc => 0,
        RouteKind::Http => 1,
        RouteKind::Tls => 2,
        RouteKind::Tcp => 3,
    }
}
