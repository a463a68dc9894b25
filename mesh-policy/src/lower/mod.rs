//! Validation and lowering in one pass.
//!
//! Every check a user can trip is made here, with the field path of the offending value, and
//! every error is collected: a policy with ten mistakes reports ten errors. What survives is
//! lowered into the intermediate form the route tables are built from ([`Lowered`]): Services
//! with resolved endpoints, routes with compiled matchers and resolved backends, merged
//! settings. The checks follow the Gateway API CRD schema (maxItems, patterns, CEL rules) and
//! the GAMMA rules for Service parents; where the engine does not implement an optional feature
//! (consumer routes, cross-namespace backendRefs, retries, ...) the route is rejected with a
//! reason rather than half-applied.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gateway_api::experimental::grpcroutes::GrpcRouteRulesMatches;
use gateway_api::experimental::httproutes::HttpRouteRulesMatches;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

use crate::backend::{Backend, Split};
use crate::compiled::CaptureRule;
use crate::error::ValidationError;
use crate::filter::{
    Fraction, HeaderModifier, HttpFilter, Mirror, PathModifier, Redirect, UrlRewrite,
};
use crate::grpc::GrpcMatcher;
use crate::http::{
    HttpMatcher, HttpRule, MatchedPath, PathMatch, PathMatchKind, Timeouts, ValueMatch,
};
use crate::model::{CaptureSpec, MeshPolicySpec, Object, Resource, RouteId, RouteKind, ServiceRef};
use crate::names;
use crate::settings::{MeshSettings, PolicyInput};
use crate::status::{Options, RefProblem, UnresolvedRef};
use crate::views::{self, FilterView, ModView, PathModView, RefView, RouteView, wire_name};

mod filter;
mod policy;
mod route;
mod service;
mod workload;

use self::filter::*;
use self::policy::*;
use self::route::*;
use self::service::*;
use self::workload::*;

/// Label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

// Gateway API CRD limits (maxItems).
const MAX_HOSTNAMES: usize = 16;
const MAX_PARENT_REFS: usize = 32;
const MAX_RULES: usize = 16;
const MAX_MATCHES_PER_RULE: usize = 64;
const MAX_GRPC_MATCHES_PER_RULE: usize = 8;
const MAX_MATCHES_PER_ROUTE: usize = 128;
const MAX_HEADER_MATCHES: usize = 16;
const MAX_QUERY_MATCHES: usize = 16;
const MAX_FILTERS: usize = 16;
const MAX_BACKEND_REFS: usize = 16;
const MAX_HEADER_EDITS: usize = 16;
const MAX_WEIGHT: i32 = 1_000_000;
const MAX_PATH_LEN: usize = 1024;
/// Longest header value (one constant with the CRD schema's limit).
const MAX_VALUE_LEN: usize = crate::crd::MAX_HEADER_VALUE;
const REDIRECT_STATUS_CODES: [u16; 5] = [301, 302, 303, 307, 308];

/// Policy ready to index.
#[derive(Debug)]
pub(crate) struct Lowered {
    pub services: Vec<ServiceIr>,
    /// Sorted oldest first; `rank` is the position.
    pub routes: Vec<RouteIr>,
    pub settings: MeshSettings,
    /// MeshPolicy capture entries.
    pub capture: Vec<CaptureRule>,
    pub mesh_policies: usize,
    /// backendRefs left unresolved under [`Options::unresolved_backends`].
    pub unresolved: Vec<UnresolvedRef>,
    /// Pods that own their IPs, by IP.
    pub workloads: HashMap<IpAddr, Arc<crate::workload::Workload>>,
}

#[derive(Debug)]
pub(crate) struct ServiceIr {
    pub id: ServiceRef,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortIr>,
}

#[derive(Debug)]
pub(crate) struct PortIr {
    pub port: u16,
    pub name: Option<String>,
    pub app_protocol: Option<String>,
    target: Target,
    /// Only TCP ports are captured and routed.
    pub tcp: bool,
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
enum Target {
    Number(u16),
    /// A named container port: only slices naming the Service port resolve it.
    Named,
}

#[derive(Debug)]
pub(crate) struct RouteIr {
    pub id: Arc<RouteId>,
    pub rank: u32,
    /// Deduplicated; empty: any host.
    pub hostnames: Vec<String>,
    /// Service index and port (`None`: every port of the Service).
    pub parents: Vec<(usize, Option<u16>)>,
    pub rules: Vec<RuleIr>,
    age: (bool, Option<Timestamp>),
}

#[derive(Debug)]
pub(crate) struct RuleIr {
    /// HTTPRoute matches (at least one).
    pub http: Vec<HttpMatcher>,
    /// GRPCRoute matches (at least one).
    pub grpc: Vec<GrpcMatcher>,
    pub rule: Arc<HttpRule>,
}

/// Validates objects on their own and against each other. Returns every problem found; an
/// empty list means [`crate::Compiled::compile`] will succeed.
pub fn validate(objects: &[Object]) -> Vec<ValidationError> {
    match lower(objects) {
        Ok(_) => Vec::new(),
        Err(errors) => errors,
    }
}

/// Where errors are reported.
struct At<'a> {
    /// Named only when an error is reported: formatting the name of each of 60,000 valid
    /// objects was a fifth of a large compile.
    object: &'a Object,
}

impl<'a> At<'a> {
    fn of(object: &'a Object) -> Self {
        At { object }
    }
}

#[derive(Default)]
struct Cx {
    errors: Vec<ValidationError>,
    options: Options,
    unresolved: Vec<UnresolvedRef>,
}

impl Cx {
    /// A backendRef that cannot be resolved: an error, or with
    /// [`Options::unresolved_backends`] a note for the route's status (`true`: go on with an
    /// unresolved backend).
    fn unresolved(
        &mut self,
        at: &At<'_>,
        field: String,
        problem: RefProblem,
        message: String,
    ) -> bool {
        if self.options.unresolved_backends {
            self.unresolved.push(UnresolvedRef {
                object: at.object.display_name(),
                field,
                problem,
                message,
            });
            true
        } else {
            self.error(at, field, message);
            false
        }
    }

    fn error(&mut self, at: &At<'_>, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ValidationError::new(
            at.object.display_name(),
            &at.object.source,
            field,
            reason,
        ));
    }
}

/// Services by namespace/name.
struct Services<'a> {
    list: &'a [ServiceIr],
    index: &'a HashMap<(String, String), usize>,
}

impl Services<'_> {
    fn get(&self, namespace: &str, name: &str) -> Option<(usize, &ServiceIr)> {
        let index = *self.index.get(&(namespace.to_owned(), name.to_owned()))?;
        Some((index, &self.list[index]))
    }
}

fn port_list(service: &ServiceIr) -> String {
    let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
    if ports.is_empty() {
        "none".to_owned()
    } else {
        ports.join(", ")
    }
}

pub(crate) fn lower(objects: &[Object]) -> Result<Lowered, Vec<ValidationError>> {
    lower_with(objects, Options::default()).0
}

/// [`lower`] with options; the unresolved backendRefs are returned whether or not the objects
/// are valid, so that a route left out for another reason still reports them.
pub(crate) fn lower_with(
    objects: &[Object],
    options: Options,
) -> (Result<Lowered, Vec<ValidationError>>, Vec<UnresolvedRef>) {
    let mut cx = Cx {
        options,
        ..Cx::default()
    };

    // Metadata and duplicates. Later duplicates are reported and then ignored, so that one
    // mistake does not cascade into reference errors.
    let mut seen: HashMap<(&str, &str, &str), &str> = HashMap::new();
    let mut skip = vec![false; objects.len()];
    for (i, object) in objects.iter().enumerate() {
        let at = At::of(object);
        check_metadata(&mut cx, &at, &object.resource);
        let key = (
            object.resource.kind(),
            object.resource.namespace(),
            object.resource.name(),
        );
        if key.2.is_empty() {
            skip[i] = true;
            continue;
        }
        if let Some(first) = seen.get(&key) {
            cx.error(
                &at,
                "metadata.name",
                format!(
                    "duplicate {} {}/{}: already defined in {first}",
                    key.0, key.1, key.2
                ),
            );
            skip[i] = true;
        } else {
            seen.insert(key, &object.source);
        }
    }
    let live = || {
        objects
            .iter()
            .zip(&skip)
            .filter(|(_, skip)| !**skip)
            .map(|(o, _)| o)
    };

    // Services.
    let mut services = Vec::new();
    let mut service_index = HashMap::new();
    let mut service_objects = Vec::new();
    for object in live() {
        if let Resource::Service(service) = &object.resource {
            let at = At::of(object);
            let ir = lower_service(&mut cx, &at, service, &object.resource);
            service_index.insert(
                (ir.id.namespace.clone(), ir.id.name.clone()),
                services.len(),
            );
            services.push(ir);
            service_objects.push((
                object,
                service
                    .spec
                    .as_ref()
                    .is_some_and(|s| s.publish_not_ready_addresses == Some(true)),
            ));
        }
    }
    let mut vip_owner: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, service) in services.iter().enumerate() {
        for vip in &service.vips {
            for port in service.ports.iter().filter(|p| p.tcp) {
                let addr = SocketAddr::new(*vip, port.port);
                let owner = *vip_owner.entry(addr).or_insert(i);
                if owner != i {
                    let at = At::of(service_objects[i].0);
                    cx.error(
                        &at,
                        "spec.clusterIP",
                        format!("{addr} is already used by Service {}", services[owner].id),
                    );
                }
            }
        }
    }

    // EndpointSlices, then endpoint resolution per Service port.
    let mut slices_by_service: Vec<Vec<SliceIr>> = services.iter().map(|_| Vec::new()).collect();
    for object in live() {
        if let Resource::EndpointSlice(slice) = &object.resource {
            let at = At::of(object);
            let owner = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .and_then(|name| {
                    service_index.get(&(object.resource.namespace().to_owned(), name.clone()))
                });
            let publish_not_ready = owner.is_some_and(|i| service_objects[*i].1);
            let ir = lower_slice(&mut cx, &at, slice, publish_not_ready);
            if let Some(owner) = owner {
                slices_by_service[*owner].push(ir);
            }
        }
    }
    for (service, slices) in services.iter_mut().zip(&slices_by_service) {
        for port in &mut service.ports {
            port.endpoints = resolve_endpoints(port, slices);
        }
    }

    // Routes.
    let table = Services {
        list: &services,
        index: &service_index,
    };
    let mut routes = Vec::new();
    for object in live() {
        let view = match &object.resource {
            Resource::HttpRoute(r) => views::http_route(r),
            Resource::GrpcRoute(r) => views::grpc_route(r),
            Resource::TlsRoute(r) => views::tls_route(r),
            Resource::TcpRoute(r) => views::tcp_route(r),
            _ => continue,
        };
        let at = At::of(object);
        routes.push(lower_route(&mut cx, &at, &object.resource, &view, &table));
    }
    routes.sort_by(|a, b| a.age.cmp(&b.age).then_with(|| a.id.cmp(&b.id)));
    for (rank, route) in routes.iter_mut().enumerate() {
        route.rank = u32::try_from(rank).unwrap_or(u32::MAX);
    }

    let workloads = lower_workloads(&mut cx, live());

    // MeshPolicies.
    let mut policies = Vec::new();
    let mut capture = Vec::new();
    for object in live() {
        if let Resource::MeshPolicy(policy) = &object.resource {
            let at = At::of(object);
            let detection_timeout = lower_mesh_policy(&mut cx, &at, &policy.spec, &mut capture);
            let name = format!("{}/{}", object.resource.namespace(), object.resource.name());
            let authz = lower_authorization(&mut cx, &at, &name, &policy.spec);
            lower_mtls(&mut cx, &at, &policy.spec);
            let http_deny = lower_http_deny(&mut cx, &at, &name, &policy.spec);
            policies.push((
                age(&policy.metadata),
                format!("{}/{}", object.resource.namespace(), object.resource.name()),
                PolicyInput {
                    name: format!("{}/{}", object.resource.namespace(), object.resource.name()),
                    spec: &policy.spec,
                    detection_timeout,
                    authz: authz.rules,
                    identity_authz: authz.identity,
                    authz_defaults: authz.defaults,
                    http_deny,
                },
            ));
        }
    }
    policies.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    let inputs: Vec<PolicyInput<'_>> = policies.into_iter().map(|(_, _, p)| p).collect();
    let settings = MeshSettings::merge(&inputs);

    if !cx.errors.is_empty() {
        return (Err(cx.errors), cx.unresolved);
    }
    let unresolved = cx.unresolved.clone();
    (
        Ok(Lowered {
            services,
            routes,
            settings,
            capture,
            mesh_policies: inputs.len(),
            unresolved: cx.unresolved,
            workloads,
        }),
        unresolved,
    )
}

/// Sort key for "oldest first": objects without a timestamp count as newest.
fn age(metadata: &ObjectMeta) -> (bool, Option<Timestamp>) {
    let ts = metadata.creation_timestamp.as_ref().map(|t| t.0);
    (ts.is_none(), ts)
}

fn check_metadata(cx: &mut Cx, at: &At<'_>, resource: &Resource) {
    let metadata = resource.metadata();
    match metadata.name.as_deref() {
        None | Some("") => cx.error(at, "metadata.name", "missing name"),
        Some(name) => {
            let result = if matches!(resource, Resource::Service(_)) {
                // Service names are RFC 1035 labels: they must start with a letter.
                names::dns_label(name).and_then(|()| {
                    if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                        Ok(())
                    } else {
                        Err(format!("{name:?} must start with a lower-case letter"))
                    }
                })
            } else {
                names::dns_subdomain(name)
            };
            if let Err(reason) = result {
                cx.error(at, "metadata.name", reason);
            }
        }
    }
    if let Some(namespace) = metadata.namespace.as_deref().filter(|n| !n.is_empty())
        && let Err(reason) = names::dns_label(namespace)
    {
        cx.error(at, "metadata.namespace", reason);
    }
}
