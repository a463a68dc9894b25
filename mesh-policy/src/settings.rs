//! Node-wide data-plane settings from `MeshPolicy` objects.
//!
//! Several MeshPolicies may exist (one per team, say). They merge deterministically, field by
//! field: policies are ordered oldest first (`creationTimestamp`; a policy without one counts
//! as newest), ties broken by `namespace/name`, and for each field the first policy that sets it
//! wins. `headers.set` merges per header name (case-insensitive), again oldest first. Fields no
//! policy sets take the defaults below.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use crate::identity::{Identity, SourceMatch};
use crate::model::{AuthzProtocol, FailMode, HeaderPolicy, MeshPolicySpec, MtlsMode};
use crate::net::{InterfaceName, PortRange, Prefix};

/// Fail mode when no MeshPolicy sets one: keep traffic flowing if the agent cannot handle it.
pub const DEFAULT_FAIL_MODE: FailMode = FailMode::Open;
/// How long to wait for a client's first bytes before treating the connection as opaque TCP.
pub const DEFAULT_PROTOCOL_DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// Header injection defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeaderDefaults {
    /// Inject `x-request-id` when absent.
    pub request_id: bool,
    /// Propagate or start W3C trace context.
    pub trace_context: bool,
    /// Add `forwarded` / `x-forwarded-for`.
    pub forwarded: bool,
    /// Headers set on every proxied request, sorted by name.
    pub set: Vec<(String, String)>,
}

impl Default for HeaderDefaults {
    fn default() -> Self {
        Self {
            request_id: true,
            trace_context: true,
            forwarded: true,
            set: Vec::new(),
        }
    }
}

/// The merged settings; see the module docs for the merge order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MeshSettings {
    /// What to do with captured traffic the agent cannot handle.
    pub fail_mode: FailMode,
    /// Header injection defaults.
    pub headers: HeaderDefaults,
    /// Protocol detection timeout.
    pub protocol_detection_timeout: Duration,
    /// The MeshPolicies merged, oldest first (`namespace/name`).
    pub sources: Vec<String>,
    /// L4 authorization for XDP.
    pub authorization: Authorization,
    /// Mutual TLS modes.
    pub mtls: Mtls,
}

/// The merged `spec.mtls` of every MeshPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Mtls {
    /// The mode of namespaces not in `namespaces` (PERMISSIVE when no policy sets one).
    pub default: MtlsMode,
    /// Modes per destination namespace.
    pub namespaces: BTreeMap<String, MtlsMode>,
}

impl Mtls {
    /// The mode of workloads in `namespace`.
    pub fn mode(&self, namespace: &str) -> MtlsMode {
        self.namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.default)
    }
}

/// The merged `spec.authorization` of every MeshPolicy: rules in policy order (oldest first),
/// defaults per interface (oldest wins).
///
/// Rules with source identity conditions are kept apart from the others, in `identity`: only
/// `rules` reaches the kernel plan, so a rule the kernel cannot judge cannot be written there by
/// mistake. [`crate::Compiled::authorize_inbound`] checks both.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Authorization {
    /// One entry per (source, destination, port range) combination of each rule without
    /// `principals` or `namespaces`: what the kernel enforces.
    pub rules: Vec<AuthzRule>,
    /// The entries of rules with `principals` or `namespaces`, checked in userspace only.
    pub identity: Vec<IdentityRule>,
    /// Action for traffic no rule matches, per interface.
    pub defaults: std::collections::BTreeMap<InterfaceName, crate::model::AuthzAction>,
    /// L7 deny rules (every MeshPolicy's, oldest first).
    pub http: Vec<HttpDeny>,
}

/// A validated L7 deny rule (see [`crate::HttpDenySpec`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpDeny {
    /// `namespace/policy/rule`.
    pub name: String,
    /// Path prefixes, without a trailing slash (empty: any path).
    pub paths: Vec<String>,
    /// Methods (empty: any method).
    pub methods: Vec<String>,
    /// Lower-case header names with their required values.
    pub headers: Vec<(String, String)>,
    /// Conditions on the source identity (empty: any source, also a plaintext one).
    pub source: SourceMatch,
}

impl HttpDeny {
    /// Whether a request with this method, path (no query) and headers, from a client whose
    /// identity is unknown (plaintext), is denied: a rule with source conditions never denies
    /// it. See [`HttpDeny::matches_from`].
    pub fn matches(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<String>,
    ) -> bool {
        self.matches_from(None, method, path, header)
    }

    /// Whether a request from `source` (`None`: not authenticated) with this method, path (no
    /// query) and headers is denied.
    pub fn matches_from(
        &self,
        source: Option<&Identity>,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<String>,
    ) -> bool {
        if !self.source.matches(source) {
            return false;
        }
        let path_ok = self.paths.is_empty()
            || self.paths.iter().any(|p| {
                p.is_empty()
                    || path == p
                    || path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            });
        let method_ok = self.methods.is_empty() || self.methods.iter().any(|m| m == method);
        let headers_ok = self
            .headers
            .iter()
            .all(|(n, v)| header(n).as_deref() == Some(v.as_str()));
        path_ok && method_ok && headers_ok
    }
}

/// One authorization entry, ready for the kernel maps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthzRule {
    /// Unique key: `namespace/policy/rule`, with `#k` for the k-th combination of a rule that
    /// lists several sources, destinations or port ranges.
    pub key: String,
    /// The rule's own name (for metrics).
    pub rule: String,
    /// Allow or deny.
    pub action: crate::model::AuthzAction,
    /// `None`: every interface.
    pub interfaces: Option<Vec<InterfaceName>>,
    /// Source prefix; `None`: any source.
    pub src: Option<Prefix>,
    /// Destination prefix; `None`: any destination.
    pub dst: Option<Prefix>,
    /// Destination port range; `None`: any port, and packets without ports.
    pub ports: Option<PortRange>,
    /// `None`: TCP and UDP.
    pub protocol: Option<crate::model::AuthzProtocol>,
}

impl AuthzRule {
    /// The rule's `namespace/policy/rule` name (the key without its `#k` combination suffix).
    pub fn name(&self) -> &str {
        self.key.split('#').next().unwrap_or(&self.key)
    }

    /// Whether this entry matches a TCP connection from `src` to `dst` that entered the node on
    /// `interface` (`None`: on none of the host-side interfaces, e.g. through the tunnel; an
    /// entry that names interfaces then does not match).
    pub fn matches_tcp(&self, src: IpAddr, dst: SocketAddr, interface: Option<&str>) -> bool {
        let src = src.to_canonical();
        let dst_ip = dst.ip().to_canonical();
        let interface_ok = match &self.interfaces {
            None => true,
            Some(list) => interface.is_some_and(|i| list.iter().any(|n| n.as_str() == i)),
        };
        interface_ok
            && self.protocol != Some(AuthzProtocol::Udp)
            && self.src.is_none_or(|p| p.contains(src))
            && self.dst.is_none_or(|p| p.contains(dst_ip))
            && self.ports.is_none_or(|r| r.contains(dst.port()))
    }
}

/// An entry of a rule with source identity conditions: the address part, as the kernel would
/// match it, and the source conditions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentityRule {
    /// The address, port, protocol and interface conditions (and the key, name and action).
    pub l4: AuthzRule,
    /// `principals` and `namespaces` (never both empty).
    pub source: SourceMatch,
}

impl IdentityRule {
    /// Whether this entry matches a TCP connection from `source` (`None`: not authenticated)
    /// at `src` to `dst`, entered on `interface`.
    pub fn matches_tcp(
        &self,
        source: Option<&Identity>,
        src: IpAddr,
        dst: SocketAddr,
        interface: Option<&str>,
    ) -> bool {
        self.source.matches(source) && self.l4.matches_tcp(src, dst, interface)
    }
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            fail_mode: DEFAULT_FAIL_MODE,
            headers: HeaderDefaults::default(),
            protocol_detection_timeout: DEFAULT_PROTOCOL_DETECTION_TIMEOUT,
            sources: Vec::new(),
            authorization: Authorization::default(),
            mtls: Mtls::default(),
        }
    }
}

/// One validated policy, ready to merge.
pub(crate) struct PolicyInput<'a> {
    pub name: String,
    pub spec: &'a MeshPolicySpec,
    pub detection_timeout: Option<Duration>,
    pub authz: Vec<AuthzRule>,
    pub identity_authz: Vec<IdentityRule>,
    pub authz_defaults: Vec<(InterfaceName, crate::model::AuthzAction)>,
    pub http_deny: Vec<HttpDeny>,
}

impl MeshSettings {
    /// Merges policies given oldest first.
    pub(crate) fn merge(policies: &[PolicyInput<'_>]) -> Self {
        let mut settings = MeshSettings::default();
        if let Some(mode) = policies.iter().find_map(|p| p.spec.fail_mode) {
            settings.fail_mode = mode;
        }
        if let Some(timeout) = policies.iter().find_map(|p| p.detection_timeout) {
            settings.protocol_detection_timeout = timeout;
        }
        let header = |get: fn(&HeaderPolicy) -> Option<bool>| {
            policies
                .iter()
                .find_map(|p| p.spec.headers.as_ref().and_then(get))
        };
        if let Some(v) = header(|h| h.request_id) {
            settings.headers.request_id = v;
        }
        if let Some(v) = header(|h| h.trace_context) {
            settings.headers.trace_context = v;
        }
        if let Some(v) = header(|h| h.forwarded) {
            settings.headers.forwarded = v;
        }
        let mut set: Vec<(String, String)> = Vec::new();
        for policy in policies {
            for (name, value) in policy.spec.headers.iter().flat_map(|h| h.set.iter()) {
                if !set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    set.push((name.clone(), value.clone()));
                }
            }
        }
        set.sort();
        settings.headers.set = set;
        settings.sources = policies.iter().map(|p| p.name.clone()).collect();
        for policy in policies {
            settings
                .authorization
                .rules
                .extend(policy.authz.iter().cloned());
            settings
                .authorization
                .identity
                .extend(policy.identity_authz.iter().cloned());
            settings
                .authorization
                .http
                .extend(policy.http_deny.iter().cloned());
            for (iface, action) in &policy.authz_defaults {
                settings
                    .authorization
                    .defaults
                    .entry(iface.clone())
                    .or_insert(*action);
            }
        }
        let mtls = || policies.iter().filter_map(|p| p.spec.mtls.as_ref());
        if let Some(mode) = mtls().find_map(|m| m.mode) {
            settings.mtls.default = mode;
        }
        for spec in mtls() {
            for (namespace, mode) in &spec.namespaces {
                settings
                    .mtls
                    .namespaces
                    .entry(namespace.clone())
                    .or_insert(*mode);
            }
        }
        settings
    }
}
