//! The compiled policy: an immutable index from Service `VIP:port` to that port's route tables.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::backend::{Backend, Split};
use crate::error::{LoadError, ValidationError};
use crate::grpc::{GrpcCandidate, GrpcDecision, GrpcOutcome, GrpcRequest, GrpcTable};
use crate::http::{HttpCandidate, HttpDecision, HttpOutcome, HttpTable, RequestParts};
use crate::l4::{Decision, TlsTable};
use crate::load::{load_path_partial, parse_documents_partial};
use crate::lower::{Lowered, lower, lower_with};
use crate::model::{Object, RouteKind, ServiceRef};
use crate::net::{PortRange, Prefix, merge_ranges};
use crate::settings::MeshSettings;
use crate::status::{KindConflict, Options, UnresolvedRef, precedence};
use crate::workload::Workload;

/// One Service port as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePort {
    /// The Service.
    pub service: ServiceRef,
    /// The Service port (what clients connect to on the VIP).
    pub port: u16,
    /// The port's name, if any.
    pub name: Option<String>,
    /// The port's `appProtocol` (`http`, `kubernetes.io/h2c`, ...), a protocol hint.
    pub app_protocol: Option<String>,
    /// The Service's virtual IPs (IPv4 and/or IPv6).
    pub vips: Vec<IpAddr>,
    /// Ready endpoints for this port.
    pub endpoints: Vec<SocketAddr>,
}

impl ServicePort {
    /// The Service itself as a single backend, for traffic no route claims.
    pub fn as_backend(&self) -> Backend {
        Backend {
            service: self.service.clone(),
            port: self.port,
            endpoints: self.endpoints.clone(),
            weight: 1,
            filters: Vec::new(),
            unresolved: false,
        }
    }

    /// `appProtocol` says HTTP/2 in cleartext (`h2c`, `grpc`, `kubernetes.io/h2c`).
    pub fn declares_http2(&self) -> bool {
        self.app_protocol.as_deref().is_some_and(|p| {
            matches!(
                p.to_ascii_lowercase().as_str(),
                "h2c" | "http2" | "grpc" | "kubernetes.io/h2c"
            )
        })
    }

    /// `appProtocol` names a protocol whose client speaks first (HTTP, HTTP/2, gRPC, TLS,
    /// WebSockets): its first bytes are worth waiting for.
    pub fn declares_client_first(&self) -> bool {
        self.app_protocol.is_some() && !self.declares_opaque()
    }

    /// `appProtocol` names a protocol that is neither HTTP nor TLS (`tcp`, `mysql`, ...): its
    /// first bytes need not be inspected.
    pub fn declares_opaque(&self) -> bool {
        self.app_protocol.as_deref().is_some_and(|p| {
            !self.declares_http2()
                && !matches!(
                    p.to_ascii_lowercase().as_str(),
                    "http" | "https" | "tls" | "kubernetes.io/ws" | "kubernetes.io/wss"
                )
        })
    }
}

/// Destinations to capture: a prefix and port ranges on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureRule {
    /// The destination prefix (a /32 or /128 for a single address).
    pub prefix: Prefix,
    /// Port ranges; in [`Compiled::capture`] and the kernel plan sorted and merged.
    pub ports: Vec<PortRange>,
}

/// Counts for logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Services with at least one virtual IP.
    pub services: usize,
    /// Routable Service ports.
    pub service_ports: usize,
    /// Endpoints over all Service ports.
    pub endpoints: usize,
    /// HTTPRoutes.
    pub http_routes: usize,
    /// GRPCRoutes.
    pub grpc_routes: usize,
    /// TLSRoutes.
    pub tls_routes: usize,
    /// TCPRoutes.
    pub tcp_routes: usize,
    /// MeshPolicies merged.
    pub mesh_policies: usize,
    /// Entries of [`Compiled::capture`].
    pub capture_rules: usize,
    /// Pods in the workload table (see [`Compiled::workload`]).
    pub workloads: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "services={} service_ports={} endpoints={} http_routes={} grpc_routes={} \
             tls_routes={} tcp_routes={} mesh_policies={} capture_rules={} workloads={}",
            self.services,
            self.service_ports,
            self.endpoints,
            self.http_routes,
            self.grpc_routes,
            self.tls_routes,
            self.tcp_routes,
            self.mesh_policies,
            self.capture_rules,
            self.workloads
        )
    }
}

#[derive(Debug)]
struct PortEntry {
    info: ServicePort,
    http: Option<HttpTable>,
    grpc: Option<GrpcTable>,
    tls: Option<TlsTable>,
    tcp: Option<Decision>,
}

/// The compiled, immutable policy. Cheap to share behind an `Arc`, `Send + Sync`, never locked:
/// built once per reload and swapped whole (see [`crate::PolicyStore`]).
#[derive(Debug)]
pub struct Compiled {
    ports: HashMap<SocketAddr, Arc<PortEntry>>,
    /// Unique entries in Service order, for dumps.
    entries: Vec<Arc<PortEntry>>,
    capture: Vec<CaptureRule>,
    settings: MeshSettings,
    summary: Summary,
    unresolved: Vec<UnresolvedRef>,
    conflicts: Vec<KindConflict>,
    /// Pods by IP (canonical: IPv4, never IPv4-mapped IPv6).
    workloads: HashMap<IpAddr, Arc<Workload>>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Compiled>();
};

impl Compiled {
    /// A policy with nothing in it: nothing captured, every lookup misses.
    pub fn empty() -> Self {
        Self {
            ports: HashMap::new(),
            entries: Vec::new(),
            capture: Vec::new(),
            settings: MeshSettings::default(),
            summary: Summary::default(),
            unresolved: Vec::new(),
            conflicts: Vec::new(),
            workloads: HashMap::new(),
        }
    }

    /// Validates and compiles objects; on failure every problem found is returned.
    pub fn compile(objects: &[Object]) -> Result<Self, Vec<ValidationError>> {
        Ok(Self::build(lower(objects)?))
    }

    /// [`Compiled::compile`] with options. The backendRefs left unresolved are returned also
    /// when the objects are invalid, so that a route left out for another reason can still
    /// report them.
    pub fn compile_with(
        objects: &[Object],
        options: Options,
    ) -> (Result<Self, Vec<ValidationError>>, Vec<UnresolvedRef>) {
        let (lowered, unresolved) = lower_with(objects, options);
        (lowered.map(Self::build), unresolved)
    }

    /// Parses, validates and compiles YAML text. When some documents do not parse, the others
    /// are still validated, so that every error is reported at once (an object that failed to
    /// parse may then also show up as a missing reference).
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Self, Vec<ValidationError>> {
        let (objects, errors) = parse_documents_partial(text, source_name);
        Self::compile_checked(&objects, errors)
    }

    /// Loads, validates and compiles a file or a directory of YAML files, reporting every
    /// error like [`Compiled::from_yaml`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let (objects, errors) = load_path_partial(path.as_ref())?;
        Self::compile_checked(&objects, errors).map_err(LoadError::Invalid)
    }

    fn compile_checked(
        objects: &[Object],
        mut errors: Vec<ValidationError>,
    ) -> Result<Self, Vec<ValidationError>> {
        match lower(objects) {
            Ok(lowered) if errors.is_empty() => Ok(Self::build(lowered)),
            Ok(_) => Err(errors),
            Err(found) => {
                errors.extend(found);
                Err(errors)
            }
        }
    }

    fn build(lowered: Lowered) -> Self {
        let Lowered {
            services,
            routes,
            settings,
            capture: policy_capture,
            mesh_policies,
            unresolved,
            workloads,
        } = lowered;

        // Routes per (Service, port), in precedence (rank) order.
        let mut attached: HashMap<(usize, u16), Vec<usize>> = HashMap::new();
        for (route_index, route) in routes.iter().enumerate() {
            for (service, port) in &route.parents {
                let ports: Vec<u16> = match port {
                    Some(p) => vec![*p],
                    None => services[*service]
                        .ports
                        .iter()
                        .filter(|p| p.tcp)
                        .map(|p| p.port)
                        .collect(),
                };
                for port in ports {
                    let list = attached.entry((*service, port)).or_default();
                    if list.last() != Some(&route_index) {
                        list.push(route_index);
                    }
                }
            }
        }

        // GEP-1426: one route kind per Service port; the others are not applied there.
        let mut conflicts = Vec::new();
        for ((service, port), list) in &mut attached {
            let Some(best) = list.iter().map(|&r| precedence(routes[r].id.kind)).min() else {
                continue;
            };
            let winner = routes[list[0]].id.kind;
            let winner = list
                .iter()
                .map(|&r| routes[r].id.kind)
                .find(|&k| precedence(k) == best)
                .unwrap_or(winner);
            list.retain(|&r| {
                let keep = routes[r].id.kind == winner;
                if !keep {
                    conflicts.push(KindConflict {
                        route: (*routes[r].id).clone(),
                        service: services[*service].id.clone(),
                        port: *port,
                        winner,
                    });
                }
                keep
            });
        }
        conflicts
            .sort_by(|a, b| (&a.route, &a.service, a.port).cmp(&(&b.route, &b.service, b.port)));

        let mut summary = Summary {
            mesh_policies,
            ..Summary::default()
        };
        for route in &routes {
            match route.id.kind {
                RouteKind::Http => summary.http_routes += 1,
                RouteKind::Grpc => summary.grpc_routes += 1,
                RouteKind::Tls => summary.tls_routes += 1,
                RouteKind::Tcp => summary.tcp_routes += 1,
            }
        }

        let mut ports = HashMap::new();
        let mut entries = Vec::new();
        let mut capture: BTreeMap<Prefix, Vec<PortRange>> = BTreeMap::new();
        for (service_index, service) in services.iter().enumerate() {
            if !service.vips.is_empty() {
                summary.services += 1;
            }
            for port in service.ports.iter().filter(|p| p.tcp) {
                let mut entry = PortEntry {
                    info: ServicePort {
                        service: service.id.clone(),
                        port: port.port,
                        name: port.name.clone(),
                        app_protocol: port.app_protocol.clone(),
                        vips: service.vips.clone(),
                        endpoints: port.endpoints.clone(),
                    },
                    http: None,
                    grpc: None,
                    tls: None,
                    tcp: None,
                };
                for &route_index in attached
                    .get(&(service_index, port.port))
                    .map_or(&[][..], Vec::as_slice)
                {
                    let route = &routes[route_index];
                    match route.id.kind {
                        RouteKind::Http => {
                            let table = entry.http.get_or_insert_with(HttpTable::default);
                            for (rule_index, rule) in route.rules.iter().enumerate() {
                                for (match_index, matcher) in rule.http.iter().enumerate() {
                                    table.add(
                                        &route.hostnames,
                                        HttpCandidate {
                                            route: route.id.clone(),
                                            route_rank: route.rank,
                                            rule_index: index_u32(rule_index),
                                            match_index: index_u32(match_index),
                                            matcher: matcher.clone(),
                                            rule: rule.rule.clone(),
                                        },
                                    );
                                }
                            }
                        }
                        RouteKind::Grpc => {
                            let table = entry.grpc.get_or_insert_with(GrpcTable::default);
                            for (rule_index, rule) in route.rules.iter().enumerate() {
                                for (match_index, matcher) in rule.grpc.iter().enumerate() {
                                    table.add(
                                        &route.hostnames,
                                        GrpcCandidate {
                                            route: route.id.clone(),
                                            route_rank: route.rank,
                                            rule_index: index_u32(rule_index),
                                            match_index: index_u32(match_index),
                                            matcher: matcher.clone(),
                                            rule: rule.rule.clone(),
                                        },
                                    );
                                }
                            }
                        }
                        RouteKind::Tls => {
                            if let Some(rule) = route.rules.first() {
                                let decision = Decision {
                                    route: route.id.clone(),
                                    backends: rule.rule.backends.clone().into(),
                                    split: Split::default(),
                                };
                                entry.tls.get_or_insert_with(TlsTable::default).add(
                                    route.rank,
                                    &route.hostnames,
                                    &decision,
                                );
                            }
                        }
                        RouteKind::Tcp => {
                            // Attached in rank order: the first (oldest) route wins.
                            if entry.tcp.is_none()
                                && let Some(rule) = route.rules.first()
                            {
                                entry.tcp = Some(Decision {
                                    route: route.id.clone(),
                                    backends: rule.rule.backends.clone().into(),
                                    split: Split::default(),
                                });
                            }
                        }
                    }
                }
                if let Some(table) = &mut entry.http {
                    table.finish();
                }
                if let Some(table) = &mut entry.grpc {
                    table.finish();
                }
                summary.service_ports += 1;
                summary.endpoints += entry.info.endpoints.len();
                let entry = Arc::new(entry);
                for vip in &service.vips {
                    ports.insert(SocketAddr::new(*vip, port.port), entry.clone());
                    capture
                        .entry(Prefix::host(*vip))
                        .or_default()
                        .extend(PortRange::single(port.port));
                }
                entries.push(entry);
            }
        }
        for rule in policy_capture {
            capture.entry(rule.prefix).or_default().extend(rule.ports);
        }
        let capture: Vec<CaptureRule> = capture
            .into_iter()
            .map(|(prefix, ranges)| CaptureRule {
                prefix,
                ports: merge_ranges(ranges),
            })
            .collect();
        summary.capture_rules = capture.len();
        let mut pods: Vec<&Arc<Workload>> = workloads.values().collect();
        pods.sort_by_key(|w| Arc::as_ptr(w));
        pods.dedup_by_key(|w| Arc::as_ptr(w));
        summary.workloads = pods.len();

        Self {
            ports,
            entries,
            capture,
            settings,
            summary,
            unresolved,
            conflicts,
            workloads,
        }
    }

    /// backendRefs compiled as unresolved backends (see [`Options::unresolved_backends`]).
    pub fn unresolved_refs(&self) -> &[UnresolvedRef] {
        &self.unresolved
    }

    /// Routes not applied on a Service port because a route of another kind is (GEP-1426).
    pub fn conflicts(&self) -> &[KindConflict] {
        &self.conflicts
    }

    fn entry(&self, dst: SocketAddr) -> Option<&PortEntry> {
        // Accept IPv4-mapped IPv6 destinations from dual-stack sockets.
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.ports.get(&dst).map(|entry| &**entry)
    }

    /// The Service port behind a virtual `IP:port`, if any.
    pub fn service_port(&self, dst: SocketAddr) -> Option<&ServicePort> {
        self.entry(dst).map(|e| &e.info)
    }

    /// Routes an HTTP request sent to `dst` (a Service `VIP:port`).
    ///
    /// Across all rules of all HTTPRoutes attached to that port, the first match in this order
    /// wins: (1) route hostname: exact Host, then wildcards by suffix length, then routes
    /// without hostnames; (2) Exact path, then PathPrefix, then RegularExpression; (3) longer
    /// path value; (4) a method match; (5) more header matches; (6) more query-param matches;
    /// (7) the oldest route; (8) route `namespace/name`; (9) rule order, then match order.
    /// The Host's port is ignored, and the query string is not part of the path.
    ///
    /// [`HttpOutcome::NoRoutes`]: no HTTPRoute is attached (forward to the Service itself);
    /// [`HttpOutcome::NotFound`]: routes are attached but none matches (answer 404).
    pub fn route_http<'a>(
        &'a self,
        dst: SocketAddr,
        request: &RequestParts<'_>,
    ) -> HttpOutcome<'a> {
        let Some(table) = self.entry(dst).and_then(|e| e.http.as_ref()) else {
            return HttpOutcome::NoRoutes;
        };
        match table.lookup(request) {
            Some(c) => HttpOutcome::Matched(HttpDecision {
                route: &c.route,
                rule_index: c.rule_index as usize,
                match_index: c.match_index as usize,
                path: &c.matcher.matched,
                rule: &c.rule,
            }),
            None => HttpOutcome::NotFound,
        }
    }

    /// Routes a gRPC call sent to `dst`.
    pub fn route_grpc<'a>(&'a self, dst: SocketAddr, request: &GrpcRequest<'_>) -> GrpcOutcome<'a> {
        let Some(table) = self.entry(dst).and_then(|e| e.grpc.as_ref()) else {
            return GrpcOutcome::NoRoutes;
        };
        match table.lookup(request) {
            Some(c) => GrpcOutcome::Matched(GrpcDecision {
                route: &c.route,
                rule_index: c.rule_index as usize,
                match_index: c.match_index as usize,
                rule: &c.rule,
            }),
            None => GrpcOutcome::NotFound,
        }
    }

    /// Routes a TLS connection to `dst` by its SNI. `None` when no TLSRoute is attached or none
    /// claims the SNI: the caller passes the connection through to the Service.
    pub fn route_tls(&self, dst: SocketAddr, sni: Option<&str>) -> Option<Decision> {
        self.entry(dst)?.tls.as_ref()?.lookup(sni).cloned()
    }

    /// Routes a TCP connection to `dst`: the oldest TCPRoute attached to that Service port.
    pub fn route_tcp(&self, dst: SocketAddr) -> Option<Decision> {
        self.entry(dst)?.tcp.clone()
    }

    /// Whether any HTTPRoute, GRPCRoute, TLSRoute or TCPRoute is attached to `dst`.
    pub fn has_routes(&self, dst: SocketAddr) -> bool {
        self.entry(dst).is_some_and(|e| {
            e.http.is_some() || e.grpc.is_some() || e.tls.is_some() || e.tcp.is_some()
        })
    }

    /// What the policy captures: every Service `VIP:port` as a /32 or /128, plus every
    /// MeshPolicy capture entry, one rule per prefix with sorted, merged port ranges.
    pub fn capture(&self) -> &[CaptureRule] {
        &self.capture
    }

    /// The pod that owns `ip`: a pod of the policy (or, in Kubernetes mode, of the cluster)
    /// that runs, or is about to, in its own network namespace. IPv4-mapped IPv6 addresses are
    /// looked up as IPv4.
    pub fn workload(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.get(&ip.to_canonical()).map(|w| &**w)
    }

    /// Every workload, once per IP it owns (a dual-stack pod shows twice).
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.values().map(|w| &**w)
    }

    /// The mTLS mode of workloads in `namespace` (see [`crate::MtlsSpec`]).
    pub fn mtls_mode(&self, namespace: &str) -> crate::MtlsMode {
        self.settings.mtls.mode(namespace)
    }

    /// Merged MeshPolicy settings.
    pub fn settings(&self) -> &MeshSettings {
        &self.settings
    }

    /// Counts for logs; `Display` gives `key=value` pairs.
    pub fn summary(&self) -> Summary {
        self.summary.clone()
    }

    /// Everything the engine derived, for a `/config_dump` endpoint: settings, capture rules,
    /// and per Service port its endpoints and route tables in precedence order.
    pub fn to_json(&self) -> serde_json::Value {
        let services: Vec<serde_json::Value> = self
            .entries
            .iter()
            .map(|entry| {
                let mut value = serde_json::json!({
                    "service": entry.info.service.to_string(),
                    "port": entry.info.port,
                    "name": entry.info.name,
                    "appProtocol": entry.info.app_protocol,
                    "vips": entry.info.vips,
                    "endpoints": entry.info.endpoints,
                });
                if let Some(object) = value.as_object_mut() {
                    if let Some(http) = &entry.http {
                        object.insert("httpRoutes".into(), http.dump());
                        object.insert("httpRouteCount".into(), http.route_count().into());
                    }
                    if let Some(grpc) = &entry.grpc {
                        object.insert("grpcRoutes".into(), grpc.dump());
                        object.insert("grpcRouteCount".into(), grpc.route_count().into());
                    }
                    if let Some(tls) = &entry.tls {
                        object.insert("tlsRoutes".into(), tls.dump());
                        object.insert("tlsRouteCount".into(), tls.route_count().into());
                    }
                    if let Some(tcp) = &entry.tcp {
                        object.insert("tcpRoute".into(), tcp.route.to_string().into());
                    }
                }
                value
            })
            .collect();
        serde_json::json!({
            "summary": self.summary,
            "settings": self.settings,
            "capture": self.capture,
            "services": services,
            "conflicts": self.conflicts.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "unresolvedRefs": self.unresolved,
        })
    }
}

fn index_u32(index: usize) -> u32 {
    u32::try_from(index).unwrap_or(u32::MAX)
}
