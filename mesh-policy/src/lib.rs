//! The Skiff policy engine: what the per-node agent consults to decide where a captured TCP
//! connection to a Service virtual IP goes.
//!
//! Users write policy exactly as they would `kubectl apply` it: Kubernetes `Service` and
//! `EndpointSlice` objects (and `Pod` and `Namespace` objects for the workload table), Gateway API routes in their GAMMA (mesh) form — `HTTPRoute`,
//! `GRPCRoute`, `TLSRoute` and `TCPRoute` whose `parentRefs` name a Service — and our own
//! `skiff.dev/v1alpha1 MeshPolicy` for capture ranges and data-plane defaults.
//!
//! The life of a policy:
//!
//! 1. [`parse_documents`] / [`load_path`] turn YAML into typed [`Object`]s; every document that
//!    does not parse becomes a [`ValidationError`] naming the document and, where serde knows it,
//!    the field. Hostile text is refused before it is deserialized: more than
//!    [`MAX_POLICY_BYTES`], nesting deeper than [`MAX_YAML_DEPTH`], aliases that expand past
//!    [`MAX_YAML_NODES`] nodes or [`MAX_YAML_SCALAR_BYTES`] of scalars.
//! 2. [`validate`] checks the objects against each other and against the Gateway API rules (CRD
//!    limits, CEL rules, reference resolution), collecting every error rather than stopping at
//!    the first.
//! 3. [`Compiled::compile`] lowers valid objects into an immutable, indexed route table. It is
//!    `Send + Sync`, never locked, built once per reload and swapped atomically by the agent
//!    (see [`PolicyStore`]).
//! 4. [`Compiled::kernel_plan`] adds the node's own settings and yields the [`KernelPlan`]:
//!    everything the eBPF programs enforce (capture prefixes and ports, fail mode, interfaces,
//!    authorization entries), checked against the kernel map limits.
//! 5. Per connection or request the agent calls [`Compiled::route_http`],
//!    [`Compiled::route_grpc`], [`Compiled::route_tls`] or [`Compiled::route_tcp`], and picks a
//!    backend with the matched rule's `pick`: the next point of the rule's [`Split`], so the
//!    weights are met exactly rather than on average.
//! 6. For the mTLS tunnel: [`Compiled::workload`] says which pod owns an IP (its identity, its
//!    node, whether it is enrolled), [`Compiled::mtls_mode`] whether its namespace accepts
//!    plaintext, and [`Compiled::authorize_inbound`] / [`Compiled::http_denied_by`] decide a
//!    connection or request by its source identity, which the kernel cannot see.
//!
//! Lookups are built so that their cost does not grow with the number of routes: hostnames are
//! resolved through hash maps (exact names, then wildcard suffixes label by label), and inside a
//! hostname bucket Exact paths and PathPrefix segments are hash lookups too; only
//! RegularExpression paths are scanned.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod authorize;
mod backend;
mod bounds;
mod compiled;
pub mod crd;
mod error;
mod filter;
mod grpc;
mod hosts;
mod http;
mod identity;
mod l4;
mod load;
mod lower;
mod model;
mod names;
mod net;
mod plan;
mod settings;
mod status;
mod store;
mod views;
mod workload;

pub use authorize::AuthzDecision;
pub use backend::{Backend, Split, pick_weighted};
pub use bounds::{
    MAX_FLOW_COLLECTION_BYTES, MAX_POLICY_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES,
    MAX_YAML_SCALAR_BYTES,
};
pub use compiled::{CaptureRule, Compiled, ServicePort, Summary};
pub use error::{LoadError, ValidationError};
pub use filter::{
    Fraction, HeaderModifier, HttpFilter, Mirror, PathModifier, Redirect, UrlRewrite,
};
pub use grpc::{GrpcDecision, GrpcOutcome, GrpcRequest, split_grpc_path};
pub use http::{
    HttpAction, HttpDecision, HttpOutcome, HttpRule, MatchedPath, PathMatchKind, RequestParts,
    Timeouts,
};
pub use identity::{Identity, PrincipalPattern, SourceMatch};
pub use l4::Decision;
pub use load::{load_path, parse_documents, parse_documents_partial};
pub use lower::validate;
pub use model::{
    AuthorizationSpec, AuthzAction, AuthzProtocol, AuthzRuleSpec, CaptureSpec, FailMode,
    HeaderPolicy, HttpDenySpec, MeshPolicy, MeshPolicySpec, MtlsMode, MtlsSpec, Object, PortSpec,
    Resource, RouteId, RouteKind, ServiceRef,
};
pub use net::{InterfaceName, PortRange, Prefix, merge_ranges};
pub use plan::{AuthzEntry, AuthzPlan, Family, KernelPlan, NodeSettings, PlanError};
pub use settings::{
    Authorization, AuthzRule, DEFAULT_FAIL_MODE, DEFAULT_PROTOCOL_DETECTION_TIMEOUT,
    HeaderDefaults, HttpDeny, IdentityRule, MeshSettings, Mtls,
};
pub use status::{KindConflict, Options, RefProblem, UnresolvedRef};
pub use store::PolicyStore;
pub use workload::{
    DEFAULT_SERVICE_ACCOUNT, MESH_LABEL, Workload, enrolled, strip_namespace, strip_pod,
};

#[cfg(test)]
mod tests;
