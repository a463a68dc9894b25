//! The objects a policy is made of, as parsed: Kubernetes and Gateway API types from their
//! crates, and our own `MeshPolicy`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use gateway_api::experimental::grpcroutes::GrpcRoute;
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::experimental::tlsroutes::TlsRoute;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{self, MeshPolicyStatus};

/// The namespace of an object whose metadata names none, as `kubectl apply` would use.
pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// One parsed policy document and where it came from.
#[derive(Debug, Clone)]
pub struct Object {
    /// `file.yaml#3`: source name and 1-based document index, used in every error about it.
    pub source: String,
    /// The typed object.
    pub resource: Resource,
}

/// The kinds of object the engine understands. Shared, not owned: the Kubernetes source hands
/// over the objects its watch caches hold, and a policy rebuilt after one edit copies none of the
/// others.
#[derive(Debug, Clone)]
pub enum Resource {
    /// `v1/Service`.
    Service(Arc<Service>),
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice(Arc<EndpointSlice>),
    /// `gateway.networking.k8s.io/v1 HTTPRoute` (also accepted as v1beta1).
    HttpRoute(Arc<HttpRoute>),
    /// `gateway.networking.k8s.io/v1 GRPCRoute` (also accepted as v1alpha2).
    GrpcRoute(Arc<GrpcRoute>),
    /// `gateway.networking.k8s.io/v1alpha2|v1alpha3|v1 TLSRoute`.
    TlsRoute(Arc<TlsRoute>),
    /// `gateway.networking.k8s.io/v1alpha2 TCPRoute`.
    TcpRoute(Arc<TcpRoute>),
    /// `skiff.dev/v1alpha1 MeshPolicy`.
    MeshPolicy(Arc<MeshPolicy>),
    /// `v1/Pod`, kept only for what the workload table needs (see [`crate::strip_pod`]):
    /// which pod owns an IP, its ServiceAccount (its identity), its node, whether it is enrolled.
    Pod(Arc<Pod>),
    /// `v1/Namespace`, for its labels (enrolment); cluster-scoped.
    Namespace(Arc<Namespace>),
}

impl Resource {
    /// The Kubernetes kind, e.g. `HTTPRoute`.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Service(_) => "Service",
            Resource::EndpointSlice(_) => "EndpointSlice",
            Resource::HttpRoute(_) => "HTTPRoute",
            Resource::GrpcRoute(_) => "GRPCRoute",
            Resource::TlsRoute(_) => "TLSRoute",
            Resource::TcpRoute(_) => "TCPRoute",
            Resource::MeshPolicy(_) => "MeshPolicy",
            Resource::Pod(_) => "Pod",
            Resource::Namespace(_) => "Namespace",
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Service(o) => &o.metadata,
            Resource::EndpointSlice(o) => &o.metadata,
            Resource::HttpRoute(o) => &o.metadata,
            Resource::GrpcRoute(o) => &o.metadata,
            Resource::TlsRoute(o) => &o.metadata,
            Resource::TcpRoute(o) => &o.metadata,
            Resource::MeshPolicy(o) => &o.metadata,
            Resource::Pod(o) => &o.metadata,
            Resource::Namespace(o) => &o.metadata,
        }
    }

    /// `metadata.namespace`, or `default` when unset; empty for a cluster-scoped object
    /// (`Namespace`), whatever its metadata says, as the apiserver ignores it.
    pub fn namespace(&self) -> &str {
        if matches!(self, Resource::Namespace(_)) {
            return "";
        }
        self.metadata()
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    /// `metadata.name`, empty when unset (which validation reports).
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }
}

impl Object {
    /// `Kind namespace/name` (`Kind name` for a cluster-scoped object), the form used in
    /// [`crate::ValidationError::object`].
    pub fn display_name(&self) -> String {
        let name = self.resource.name();
        let name = if name.is_empty() { "<unnamed>" } else { name };
        if self.resource.namespace().is_empty() {
            return format!("{} {name}", self.resource.kind());
        }
        format!(
            "{} {}/{}",
            self.resource.kind(),
            self.resource.namespace(),
            name
        )
    }
}

/// A Service by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The route kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    /// HTTPRoute.
    #[serde(rename = "HTTPRoute")]
    Http,
    /// GRPCRoute.
    #[serde(rename = "GRPCRoute")]
    Grpc,
    /// TLSRoute.
    #[serde(rename = "TLSRoute")]
    Tls,
    /// TCPRoute.
    #[serde(rename = "TCPRoute")]
    Tcp,
}

impl RouteKind {
    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
            RouteKind::Tls => "TLSRoute",
            RouteKind::Tcp => "TCPRoute",
        }
    }
}

/// Identifies a route in decisions, logs (`route` span field) and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RouteId {
    /// Route kind.
    pub kind: RouteKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for RouteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// Node-wide data-plane settings. Unknown fields are rejected so that typos are not silently
/// ignored. Several MeshPolicies may exist; they are merged field by field, the oldest
/// (creationTimestamp, then namespace/name) winning each field.
//
// The derive generates `MeshPolicy` (`metadata`, `spec`, `status`) and its
// CustomResourceDefinition (`cargo xtask crds` writes it to `manifests/crds/`); the `///` docs
// here become its descriptions (`kubectl explain meshpolicy.spec`). The schema checks what one
// field can tell (see `crd.rs`); `crate::validate` checks everything, in both modes.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "skiff.dev",
    version = "v1alpha1",
    kind = "MeshPolicy",
    namespaced,
    status = "MeshPolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    category = "skiff",
    shortname = "meshpol",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "Skiff's node-wide data-plane settings: extra capture ranges, fail mode, protocol detection, header injection, L4 and L7 authorization (by address and by workload identity), mutual TLS modes."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshPolicySpec {
    /// Extra destinations to capture even when no Service or route names them.
    #[serde(default)]
    #[schemars(length(max = crd::MAX_CAPTURE))]
    pub capture: Vec<CaptureSpec>,
    /// What the agent does with captured traffic it cannot handle (`open` passes it through
    /// untouched, `closed` refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crd::fail_mode_schema")]
    pub fail_mode: Option<FailMode>,
    /// Header injection defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeaderPolicy>,
    /// How long to wait for the first client bytes before treating a connection as opaque TCP,
    /// as a Gateway API duration (`100ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crd::DURATION_PATTERN))]
    pub protocol_detection_timeout: Option<String>,
    /// L4 authorization that XDP enforces on the pods' veths (their egress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationSpec>,
    /// Mutual TLS: whether enrolled workloads accept plaintext connections from clients outside
    /// the mesh, node-wide (`mode`) and per destination namespace (`namespaces`). A MeshPolicy
    /// applies node-wide whatever namespace it lives in, so the namespaces are named here: a
    /// workload's namespace takes its entry in `namespaces`, else `mode`, else PERMISSIVE. Across
    /// policies the oldest that sets `mode`, or a given namespace, wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
}

/// `spec.mtls`. MeshPolicies are node-wide settings (merged, oldest first, whatever namespace
/// they live in), so the namespaces a mode applies to are named here rather than taken from the
/// policy's own namespace: a platform team can keep one policy in its namespace and make
/// `payments` STRICT. A namespace takes its entry in `namespaces`, else `mode`, else PERMISSIVE;
/// between policies the oldest that sets `mode`, or a namespace's entry, wins.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtlsSpec {
    /// The mode of every namespace not listed in `namespaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
    /// Modes of destination namespaces, by namespace name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = crd::MAX_MTLS_NAMESPACES,
        "x-kubernetes-validations" = [{
            "rule": crd::NAMESPACE_KEYS_RULE,
            "message": "keys must be namespace names of 1 to 63 characters",
        }],
    ))]
    pub namespaces: BTreeMap<String, MtlsMode>,
}

/// `STRICT`: only connections through the mesh's mutual TLS tunnel are accepted, plaintext from
/// clients outside the mesh is refused. `PERMISSIVE` (the default): both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only connections through the tunnel, from a peer with a certificate of the mesh's trust
    /// domain; plaintext from clients outside the mesh is refused.
    Strict,
    /// Both tunneled and plaintext connections (the default, for migrating into the mesh).
    #[default]
    Permissive,
}

/// `spec.authorization`: modelled on Istio's AuthorizationPolicy (ALLOW/DENY rules with from/to)
/// and Kubernetes NetworkPolicy at L4. Any matching `Deny` rule drops; else any matching `Allow`
/// passes; else the interface's default (`Allow` when none is given).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationSpec {
    /// Action for traffic no rule matches, per host-side interface name.
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = crd::MAX_INTERFACES,
        "x-kubernetes-validations" = [{
            "rule": crd::INTERFACE_KEYS_RULE,
            "message": "keys must be interface names of 1 to 15 characters",
        }],
    ))]
    pub defaults: BTreeMap<String, AuthzAction>,
    /// The rules.
    #[serde(default)]
    #[schemars(
        length(max = crd::MAX_AUTHZ_RULES),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub rules: Vec<AuthzRuleSpec>,
    /// L7 deny rules, checked by the HTTP proxy on every request (answered `403`).
    #[serde(default)]
    #[schemars(
        length(max = crd::MAX_HTTP_DENY_RULES),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub http: Vec<HttpDenySpec>,
}

/// An L7 deny rule: a request matching every condition given is answered `403` before routing.
/// Within a list any value matches (OR); the lists combine with AND.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": crd::HTTP_DENY_NOT_EMPTY_RULE,
    "message": "denies every request: give at least one of paths, methods, headers, principals, namespaces",
}]))]
pub struct HttpDenySpec {
    /// Unique within the policy; logged with the refusal.
    #[schemars(length(min = 1, max = 63), regex(pattern = crd::DNS_LABEL_PATTERN))]
    pub name: String,
    /// Path prefixes, matched segment by segment like a `PathPrefix` (`/admin` matches `/admin`
    /// and `/admin/x`, not `/administrator`).
    #[serde(default)]
    #[schemars(inner(regex(pattern = crd::DENY_PATH_PATTERN)))]
    pub paths: Vec<String>,
    /// Methods (`DELETE`).
    #[serde(default)]
    #[schemars(inner(regex(pattern = crd::METHOD_PATTERN)))]
    pub methods: Vec<String>,
    /// Headers that must all be present with exactly these values (names case-insensitive).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Source SPIFFE IDs, as for an authorization rule's `principals`: the rule then applies
    /// only to requests whose connection came through the mTLS tunnel from one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = crd::MAX_PRINCIPALS),
        inner(length(min = 1, max = crd::MAX_PRINCIPAL_LEN), regex(pattern = crd::PRINCIPAL_PATTERN))
    )]
    pub principals: Vec<String>,
    /// Source namespaces, as for an authorization rule's `namespaces`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = crd::MAX_PRINCIPALS),
        inner(length(min = 1, max = 63), regex(pattern = crd::DNS_LABEL_PATTERN))
    )]
    pub namespaces: Vec<String>,
}

/// One authorization rule. Every field left out matches anything.
///
/// `principals` and `namespaces` are conditions on the source's identity, which only the
/// receiving agent knows, and only for connections that came through the mTLS tunnel. A rule
/// with either is therefore never written to the kernel: the agent checks it per connection
/// (with every other rule, in the same order: any matching Deny refuses, else any matching Allow
/// passes, else the default), and it never matches a plaintext connection. A Deny rule by
/// principal thus refuses that principal's tunneled connections and nothing else; it is not
/// turned into a drop of every packet from the rule's `from` CIDRs, nor dropped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRuleSpec {
    /// Unique within the policy; names the rule in metrics.
    #[schemars(length(min = 1, max = 63), regex(pattern = crd::DNS_LABEL_PATTERN))]
    pub name: String,
    /// `Allow` or `Deny`.
    pub action: AuthzAction,
    /// Host-side interfaces the rule applies to; empty means every captured interface.
    #[serde(default)]
    #[schemars(
        length(max = crd::MAX_INTERFACES),
        inner(length(min = 1, max = 15), regex(pattern = crd::INTERFACE_PATTERN))
    )]
    pub interfaces: Vec<String>,
    /// Source CIDRs.
    #[serde(default)]
    #[schemars(
        length(max = crd::MAX_AUTHZ_ENTRIES),
        inner(regex(pattern = crd::CIDR_PATTERN))
    )]
    pub from: Vec<String>,
    /// Destination CIDRs.
    #[serde(default)]
    #[schemars(
        length(max = crd::MAX_AUTHZ_ENTRIES),
        inner(regex(pattern = crd::CIDR_PATTERN))
    )]
    pub to: Vec<String>,
    /// Destination ports or ranges.
    #[serde(default)]
    #[schemars(length(max = crd::MAX_AUTHZ_ENTRIES))]
    pub ports: Vec<PortSpec>,
    /// `TCP` or `UDP`; absent means both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<AuthzProtocol>,
    /// Source SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`). A `*`
    /// stands for whole leading or trailing path segments: `spiffe://cluster.local/ns/shop/*`,
    /// `*/sa/admin`, or `*` for any authenticated source. Matched byte for byte.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = crd::MAX_PRINCIPALS),
        inner(length(min = 1, max = crd::MAX_PRINCIPAL_LEN), regex(pattern = crd::PRINCIPAL_PATTERN))
    )]
    pub principals: Vec<String>,
    /// Source namespaces (of the authenticated identity, not of the source IP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = crd::MAX_PRINCIPALS),
        inner(length(min = 1, max = 63), regex(pattern = crd::DNS_LABEL_PATTERN))
    )]
    pub namespaces: Vec<String>,
}

/// What an authorization rule does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AuthzAction {
    /// Let the packet through.
    #[default]
    Allow,
    /// Drop it.
    Deny,
}

/// The transport an authorization rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One `spec.capture[]` entry: `{cidr: "10.96.0.0/16", ports: [80, "8000-8100", "*"]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaptureSpec {
    /// An IPv4 or IPv6 CIDR; host bits are ignored.
    #[schemars(regex(pattern = crd::CIDR_PATTERN))]
    pub cidr: String,
    /// Ports or ranges; empty means every port.
    #[serde(default)]
    #[schemars(length(max = crd::MAX_CAPTURE_PORTS))]
    pub ports: Vec<PortSpec>,
}

/// A port in a [`CaptureSpec`]: a number, a `"low-high"` range, or `"*"` for every port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    /// A single port.
    Number(i64),
    /// `"8000-8100"`, `"8080"` or `"*"`.
    Text(String),
}

/// What to do with captured traffic that the agent cannot handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Let the connection through to its original destination.
    Open,
    /// Refuse the connection.
    Closed,
}

/// `spec.headers` of a [`MeshPolicy`]; unset fields fall through to older policies and then to
/// the defaults (all `true`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderPolicy {
    /// Inject `x-request-id` when absent (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<bool>,
    /// Propagate or start W3C `traceparent` (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<bool>,
    /// Add `forwarded` / `x-forwarded-for` (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded: Option<bool>,
    /// Headers set on every proxied request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crd::header_values_schema")]
    pub set: BTreeMap<String, String>,
}
