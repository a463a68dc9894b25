//! What a status writer reads: unresolved backendRefs under `Options::unresolved_backends`, and
//! GEP-1426 conflicts between route kinds on one Service port.

use super::*;
use crate::{HttpAction, Options, RefProblem, RouteKind, parse_documents};

fn lenient(
    yaml: &str,
) -> (
    Result<Compiled, Vec<ValidationError>>,
    Vec<crate::UnresolvedRef>,
) {
    let objects = parse_documents(yaml, "test.yaml").expect("parse");
    Compiled::compile_with(
        &objects,
        Options {
            unresolved_backends: true,
        },
    )
}

const MIXED: &str = "  rules:\n  - backendRefs:\n    - {name: v1, port: 80}\n    - {name: gone, port: 80}\n    - {group: example.com, kind: Bucket, name: b}\n    - {name: v2, namespace: other, port: 80}\n";

#[test]
fn unresolved_backends_are_errors_by_default() {
    let errors = errors(&[base(), http_route("r", "", MIXED)].concat());
    assert_error(
        &errors,
        "spec.rules[0].backendRefs[1].name",
        "Service shop/gone does not exist",
    );
    assert_error(
        &errors,
        "spec.rules[0].backendRefs[2].kind",
        "only core Services",
    );
    assert_error(
        &errors,
        "spec.rules[0].backendRefs[3].namespace",
        "ReferenceGrant",
    );
}

#[test]
fn unresolved_backends_compile_into_a_500_share_and_are_listed() {
    let (compiled, unresolved) = lenient(&[base(), http_route("r", "", MIXED)].concat());
    let compiled = compiled.expect("compiles with unresolved backends");
    let problems: Vec<(&str, RefProblem)> = unresolved
        .iter()
        .map(|u| (u.field.as_str(), u.problem))
        .collect();
    assert_eq!(
        problems,
        [
            (
                "spec.rules[0].backendRefs[1].name",
                RefProblem::BackendNotFound
            ),
            ("spec.rules[0].backendRefs[2].kind", RefProblem::InvalidKind),
            (
                "spec.rules[0].backendRefs[3].namespace",
                RefProblem::RefNotPermitted
            ),
        ]
    );
    assert!(unresolved.iter().all(|u| u.object == "HTTPRoute shop/r"));
    assert_eq!(compiled.unresolved_refs(), unresolved.as_slice());
    let request = RequestParts {
        method: "GET",
        host: "web",
        path: "/",
        headers: &[],
    };
    let HttpOutcome::Matched(d) = compiled.route_http(web(), &request) else {
        panic!("the route is in force");
    };
    // v1 keeps its share; the other three are unresolved (the proxy answers 500 for them).
    assert_eq!(d.rule.action(), HttpAction::Forward);
    let flags: Vec<bool> = d.backends().iter().map(|b| b.unresolved).collect();
    assert_eq!(flags, [false, true, true, true]);
    assert!(d.backends()[0].is_routable() && !d.backends()[1].is_routable());
    // Every backend unresolved: no backend can take the request, which is a 500 too.
    let (compiled, _) = lenient(
        &[
            base(),
            http_route(
                "r",
                "",
                "  rules:\n  - backendRefs: [{name: gone, port: 80}]\n",
            ),
        ]
        .concat(),
    );
    let compiled = compiled.expect("compiles");
    let HttpOutcome::Matched(d) = compiled.route_http(web(), &request) else {
        panic!("the route is in force");
    };
    assert_eq!(d.rule.action(), HttpAction::NoBackends);
}

#[test]
fn unresolved_refs_are_reported_also_when_the_route_is_invalid() {
    let spec = "  rules:\n  - matches: [{path: {type: PathPrefix, value: nope}}]\n    backendRefs: [{name: gone, port: 80}]\n";
    let (compiled, unresolved) = lenient(&[base(), http_route("r", "", spec)].concat());
    let errors = compiled.expect_err("the path is invalid");
    assert_error(
        &errors,
        "spec.rules[0].matches[0].path.value",
        "start with '/'",
    );
    assert_eq!(unresolved.len(), 1);
    assert_eq!(unresolved[0].problem.reason(), "BackendNotFound");
}

fn kind_route(kind: &str, version: &str, name: &str, port: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/{version}\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web{port}}}]\n  rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]\n"
    )
}

#[test]
fn route_kinds_on_one_port_follow_gep_1426_precedence() {
    let compiled = compile(
        &[
            base(),
            kind_route("TCPRoute", "v1alpha2", "tcp", ", port: 80"),
            kind_route("TLSRoute", "v1alpha2", "tls", ", port: 80"),
            kind_route("HTTPRoute", "v1", "http", ""),
            kind_route("GRPCRoute", "v1", "grpc", ", port: 80"),
        ]
        .concat(),
    );
    let lost: Vec<(String, u16, RouteKind)> = compiled
        .conflicts()
        .iter()
        .map(|c| (c.route.to_string(), c.port, c.winner))
        .collect();
    // On port 80 GRPCRoute wins over the three others; on 8080 the HTTPRoute (attached to every
    // port) is alone and applies.
    assert_eq!(
        lost,
        [
            ("HTTPRoute shop/http".to_string(), 80, RouteKind::Grpc),
            ("TLSRoute shop/tls".to_string(), 80, RouteKind::Grpc),
            ("TCPRoute shop/tcp".to_string(), 80, RouteKind::Grpc),
        ]
    );
    // Traffic agrees: no TCP or TLS route on 80, no HTTPRoute there either.
    assert!(compiled.route_tcp(web()).is_none());
    assert!(compiled.route_tls(web(), Some("x")).is_none());
    assert_eq!(route(&compiled, "GET", "web", "/", &[]), "none");
    assert_eq!(
        route_at(&compiled, addr("10.96.0.1:8080")),
        "v1",
        "the HTTPRoute still applies on 8080"
    );
    assert!(
        compiled.to_json()["conflicts"][0]
            .as_str()
            .is_some_and(|m| m.contains("GRPCRoute also attaches to Service shop/web port 80"))
    );

    // Without the GRPCRoute the HTTPRoute wins port 80 over TLS and TCP.
    let compiled = compile(
        &[
            base(),
            kind_route("TCPRoute", "v1alpha2", "tcp", ", port: 80"),
            kind_route("HTTPRoute", "v1", "http", ""),
        ]
        .concat(),
    );
    assert_eq!(compiled.conflicts().len(), 1);
    assert!(compiled.route_tcp(web()).is_none());
    assert_eq!(route(&compiled, "GET", "web", "/", &[]), "v1");
}

fn route_at(compiled: &Compiled, dst: SocketAddr) -> String {
    let request = RequestParts {
        method: "GET",
        host: "web",
        path: "/",
        headers: &[],
    };
    outcome(compiled.route_http(dst, &request)).1
}
