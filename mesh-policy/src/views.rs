//! Borrowed, kind-independent views of the generated Gateway API route types.
//!
//! `gateway-api` generates a distinct struct for every place a parentRef, backendRef or filter
//! appears (`HttpRouteRulesFilters`, `HttpRouteRulesBackendRefsFilters`, `GrpcRouteRulesFilters`,
//! ...) although they share field names. The macros here map them onto one set of views so that
//! validation and lowering are written once for all four route kinds.

use gateway_api::experimental::grpcroutes::{GrpcRoute, GrpcRouteRulesMatches};
use gateway_api::experimental::httproutes::{HttpRoute, HttpRouteRulesMatches};
use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::experimental::tlsroutes::TlsRoute;
use serde::Serialize;

use crate::model::RouteKind;

/// A parentRef, backendRef or mirror backendRef.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefView<'a> {
    pub group: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub port: Option<i32>,
    pub section_name: Option<&'a str>,
    pub weight: Option<i32>,
}

#[derive(Debug)]
pub(crate) struct ModView<'a> {
    pub set: Vec<(&'a str, &'a str)>,
    pub add: Vec<(&'a str, &'a str)>,
    pub remove: &'a [String],
}

#[derive(Debug)]
pub(crate) struct PathModView<'a> {
    pub ty: String,
    pub full: Option<&'a str>,
    pub prefix: Option<&'a str>,
}

#[derive(Debug)]
pub(crate) struct RedirectView<'a> {
    pub hostname: Option<&'a str>,
    pub path: Option<PathModView<'a>>,
    pub port: Option<i32>,
    pub scheme: Option<String>,
    pub status_code: Option<i64>,
}

#[derive(Debug)]
pub(crate) struct RewriteView<'a> {
    pub hostname: Option<&'a str>,
    pub path: Option<PathModView<'a>>,
}

#[derive(Debug)]
pub(crate) struct MirrorView<'a> {
    pub backend: RefView<'a>,
    pub percent: Option<i32>,
    /// `(numerator, denominator)`.
    pub fraction: Option<(i32, Option<i32>)>,
}

#[derive(Debug)]
pub(crate) struct FilterView<'a> {
    /// The `type` as written (`URLRewrite`, `RequestMirror`, ...).
    pub ty: String,
    pub request_header_modifier: Option<ModView<'a>>,
    pub response_header_modifier: Option<ModView<'a>>,
    pub request_redirect: Option<RedirectView<'a>>,
    pub url_rewrite: Option<RewriteView<'a>>,
    pub request_mirror: Option<MirrorView<'a>>,
    /// Configuration fields set that the engine does not implement (`extensionRef`, `cors`,
    /// `externalAuth`).
    pub other_configs: Vec<&'static str>,
}

#[derive(Debug)]
pub(crate) struct BackendView<'a> {
    pub reference: RefView<'a>,
    pub filters: Vec<FilterView<'a>>,
}

#[derive(Debug)]
pub(crate) struct RuleView<'a> {
    pub name: Option<&'a str>,
    /// `None` when the field is absent (the CRD default applies).
    pub http_matches: Option<&'a [HttpRouteRulesMatches]>,
    pub grpc_matches: Option<&'a [GrpcRouteRulesMatches]>,
    pub filters: Vec<FilterView<'a>>,
    pub backends: Vec<BackendView<'a>>,
    /// `(request, backendRequest)`.
    pub timeouts: Option<(Option<&'a str>, Option<&'a str>)>,
    /// Fields set on the rule that the engine does not implement (`retry`, `sessionPersistence`).
    pub unsupported: Vec<&'static str>,
}

#[derive(Debug)]
pub(crate) struct RouteView<'a> {
    pub kind: RouteKind,
    pub hostnames: &'a [String],
    pub parent_refs: Vec<RefView<'a>>,
    /// `None` when `spec.rules` is absent.
    pub rules: Option<Vec<RuleView<'a>>>,
    /// Fields set on the spec that the engine does not implement.
    pub unsupported: Vec<&'static str>,
}

/// The wire name of a generated enum value (`URLRewrite` for `UrlRewrite`).
pub(crate) fn wire_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

macro_rules! parent_ref {
    ($r:expr) => {
        RefView {
            group: $r.group.as_deref(),
            kind: $r.kind.as_deref(),
            name: &$r.name,
            namespace: $r.namespace.as_deref(),
            port: $r.port,
            section_name: $r.section_name.as_deref(),
            weight: None,
        }
    };
}

macro_rules! backend_ref {
    ($r:expr) => {
        RefView {
            group: $r.group.as_deref(),
            kind: $r.kind.as_deref(),
            name: &$r.name,
            namespace: $r.namespace.as_deref(),
            port: $r.port,
            section_name: None,
            weight: $r.weight,
        }
    };
}

macro_rules! object_ref {
    ($r:expr) => {
        RefView {
            group: $r.group.as_deref(),
            kind: $r.kind.as_deref(),
            name: &$r.name,
            namespace: $r.namespace.as_deref(),
            port: $r.port,
            section_name: None,
            weight: None,
        }
    };
}

macro_rules! header_mod {
    ($m:expr) => {
        ModView {
            set: $m
                .set
                .iter()
                .flatten()
                .map(|h| (h.name.as_str(), h.value.as_str()))
                .collect(),
            add: $m
                .add
                .iter()
                .flatten()
                .map(|h| (h.name.as_str(), h.value.as_str()))
                .collect(),
            remove: $m.remove.as_deref().unwrap_or(&[]),
        }
    };
}

macro_rules! path_mod {
    ($p:expr) => {
        PathModView {
            ty: wire_name(&$p.r#type),
            full: $p.replace_full_path.as_deref(),
            prefix: $p.replace_prefix_match.as_deref(),
        }
    };
}

macro_rules! mirror {
    ($m:expr) => {
        MirrorView {
            backend: object_ref!($m.backend_ref),
            percent: $m.percent,
            fraction: $m.fraction.as_ref().map(|f| (f.numerator, f.denominator)),
        }
    };
}

macro_rules! http_filter {
    ($f:expr) => {{
        let f = $f;
        let mut other_configs = Vec::new();
        if f.extension_ref.is_some() {
            other_configs.push("extensionRef");
        }
        if f.cors.is_some() {
            other_configs.push("cors");
        }
        if f.external_auth.is_some() {
            other_configs.push("externalAuth");
        }
        FilterView {
            ty: wire_name(&f.r#type),
            request_header_modifier: f.request_header_modifier.as_ref().map(|m| header_mod!(m)),
            response_header_modifier: f.response_header_modifier.as_ref().map(|m| header_mod!(m)),
            request_redirect: f.request_redirect.as_ref().map(|r| RedirectView {
                hostname: r.hostname.as_deref(),
                path: r.path.as_ref().map(|p| path_mod!(p)),
                port: r.port,
                scheme: r.scheme.as_ref().map(wire_name),
                status_code: r.status_code,
            }),
            url_rewrite: f.url_rewrite.as_ref().map(|u| RewriteView {
                hostname: u.hostname.as_deref(),
                path: u.path.as_ref().map(|p| path_mod!(p)),
            }),
            request_mirror: f.request_mirror.as_ref().map(|m| mirror!(m)),
            other_configs,
        }
    }};
}

macro_rules! grpc_filter {
    ($f:expr) => {{
        let f = $f;
        let mut other_configs = Vec::new();
        if f.extension_ref.is_some() {
            other_configs.push("extensionRef");
        }
        FilterView {
            ty: wire_name(&f.r#type),
            request_header_modifier: f.request_header_modifier.as_ref().map(|m| header_mod!(m)),
            response_header_modifier: f.response_header_modifier.as_ref().map(|m| header_mod!(m)),
            request_redirect: None,
            url_rewrite: None,
            request_mirror: f.request_mirror.as_ref().map(|m| mirror!(m)),
            other_configs,
        }
    }};
}

pub(crate) fn http_route(route: &HttpRoute) -> RouteView<'_> {
    let spec = &route.spec;
    let rules = spec.rules.as_ref().map(|rules| {
        rules
            .iter()
            .map(|rule| {
                let mut unsupported = Vec::new();
                if rule.retry.is_some() {
                    unsupported.push("retry");
                }
                if rule.session_persistence.is_some() {
                    unsupported.push("sessionPersistence");
                }
                RuleView {
                    name: rule.name.as_deref(),
                    http_matches: rule.matches.as_deref(),
                    grpc_matches: None,
                    filters: rule
                        .filters
                        .iter()
                        .flatten()
                        .map(|f| http_filter!(f))
                        .collect(),
                    backends: rule
                        .backend_refs
                        .iter()
                        .flatten()
                        .map(|b| BackendView {
                            reference: backend_ref!(b),
                            filters: b
                                .filters
                                .iter()
                                .flatten()
                                .map(|f| http_filter!(f))
                                .collect(),
                        })
                        .collect(),
                    timeouts: rule
                        .timeouts
                        .as_ref()
                        .map(|t| (t.request.as_deref(), t.backend_request.as_deref())),
                    unsupported,
                }
            })
            .collect()
    });
    RouteView {
        kind: RouteKind::Http,
        hostnames: spec.hostnames.as_deref().unwrap_or(&[]),
        parent_refs: spec
            .parent_refs
            .iter()
            .flatten()
            .map(|p| parent_ref!(p))
            .collect(),
        rules,
        unsupported: spec
            .use_default_gateways
            .as_ref()
            .map(|_| vec!["useDefaultGateways"])
            .unwrap_or_default(),
    }
}

pub(crate) fn grpc_route(route: &GrpcRoute) -> RouteView<'_> {
    let spec = &route.spec;
    let rules = spec.rules.as_ref().map(|rules| {
        rules
            .iter()
            .map(|rule| RuleView {
                name: rule.name.as_deref(),
                http_matches: None,
                grpc_matches: Some(rule.matches.as_deref().unwrap_or(&[])),
                filters: rule
                    .filters
                    .iter()
                    .flatten()
                    .map(|f| grpc_filter!(f))
                    .collect(),
                backends: rule
                    .backend_refs
                    .iter()
                    .flatten()
                    .map(|b| BackendView {
                        reference: backend_ref!(b),
                        filters: b
                            .filters
                            .iter()
                            .flatten()
                            .map(|f| grpc_filter!(f))
                            .collect(),
                    })
                    .collect(),
                timeouts: None,
                unsupported: rule
                    .session_persistence
                    .as_ref()
                    .map(|_| vec!["sessionPersistence"])
                    .unwrap_or_default(),
            })
            .collect()
    });
    RouteView {
        kind: RouteKind::Grpc,
        hostnames: spec.hostnames.as_deref().unwrap_or(&[]),
        parent_refs: spec
            .parent_refs
            .iter()
            .flatten()
            .map(|p| parent_ref!(p))
            .collect(),
        rules,
        unsupported: spec
            .use_default_gateways
            .as_ref()
            .map(|_| vec!["useDefaultGateways"])
            .unwrap_or_default(),
    }
}

macro_rules! l4_route {
    ($route:expr, $kind:expr, $hostnames:expr) => {{
        let spec = &$route.spec;
        RouteView {
            kind: $kind,
            hostnames: $hostnames,
            parent_refs: spec
                .parent_refs
                .iter()
                .flatten()
                .map(|p| parent_ref!(p))
                .collect(),
            rules: Some(
                spec.rules
                    .iter()
                    .map(|rule| RuleView {
                        name: rule.name.as_deref(),
                        http_matches: None,
                        grpc_matches: None,
                        filters: Vec::new(),
                        backends: rule
                            .backend_refs
                            .iter()
                            .map(|b| BackendView {
                                reference: backend_ref!(b),
                                filters: Vec::new(),
                            })
                            .collect(),
                        timeouts: None,
                        unsupported: Vec::new(),
                    })
                    .collect(),
            ),
            unsupported: spec
                .use_default_gateways
                .as_ref()
                .map(|_| vec!["useDefaultGateways"])
                .unwrap_or_default(),
        }
    }};
}

pub(crate) fn tls_route(route: &TlsRoute) -> RouteView<'_> {
    l4_route!(route, RouteKind::Tls, &route.spec.hostnames)
}

pub(crate) fn tcp_route(route: &TcpRoute) -> RouteView<'_> {
    l4_route!(route, RouteKind::Tcp, &[])
}
