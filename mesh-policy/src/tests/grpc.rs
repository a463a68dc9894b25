//! GRPCRoute method matching and precedence.

use super::*;
use crate::{GrpcOutcome, GrpcRequest};

fn grpc_route(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: {name}\n  namespace: {NS}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 8080}}]\n{spec}"
    )
}

fn call(
    compiled: &Compiled,
    authority: &str,
    service: &str,
    method: &str,
    headers: &[(&str, &str)],
) -> String {
    let request = GrpcRequest {
        authority,
        service,
        method,
        headers,
    };
    match compiled.route_grpc(addr("10.96.0.1:8080"), &request) {
        GrpcOutcome::NoRoutes => "none".into(),
        GrpcOutcome::NotFound => "unimplemented".into(),
        GrpcOutcome::Matched(d) => d.rule.backends[0].service.name.clone(),
    }
}

#[test]
fn method_matching_exact_and_regex() {
    let spec = r#"  rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: v1, port: 8080}]
  - matches: [{method: {service: helloworld.Greeter}}]
    backendRefs: [{name: v2, port: 8080}]
  - matches: [{method: {type: RegularExpression, service: "store\\..*", method: "Get.*"}}]
    backendRefs: [{name: v3, port: 8080}]
  - matches: [{method: {method: Check}}]
    backendRefs: [{name: v4, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), grpc_route("g", spec)));
    assert_eq!(
        call(&compiled, "web", "helloworld.Greeter", "SayHello", &[]),
        "v1"
    );
    assert_eq!(
        call(&compiled, "web", "helloworld.Greeter", "SayBye", &[]),
        "v2"
    );
    assert_eq!(call(&compiled, "web", "store.Items", "GetItem", &[]), "v3");
    assert_eq!(
        call(&compiled, "web", "store.Items", "PutItem", &[]),
        "unimplemented"
    );
    assert_eq!(
        call(&compiled, "web", "grpc.health.v1.Health", "Check", &[]),
        "v4"
    );
    assert_eq!(
        call(&compiled, "web", "helloworld.greeter", "SayHello", &[]),
        "unimplemented",
        "case-sensitive"
    );
    let request = GrpcRequest {
        authority: "web",
        service: "helloworld.Greeter",
        method: "SayHello",
        headers: &[],
    };
    assert!(matches!(
        compiled.route_grpc(web(), &request),
        GrpcOutcome::NoRoutes
    ));
}

#[test]
fn precedence_service_then_method_chars_then_headers_then_age() {
    let spec = r#"  rules:
  - matches: [{method: {method: SayHello}}]
    backendRefs: [{name: v1, port: 8080}]
  - matches: [{method: {service: helloworld.Greeter}}]
    backendRefs: [{name: v2, port: 8080}]
  - matches: [{method: {service: helloworld.Greeter}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: v3, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), grpc_route("g", spec)));
    // Service characters outrank method characters.
    assert_eq!(
        call(&compiled, "web", "helloworld.Greeter", "SayHello", &[]),
        "v2"
    );
    // Headers break the tie between equal service matches.
    assert_eq!(
        call(
            &compiled,
            "web",
            "helloworld.Greeter",
            "SayHello",
            &[("X-Canary", "1")]
        ),
        "v3"
    );
    assert_eq!(call(&compiled, "web", "other.Svc", "SayHello", &[]), "v1");

    // Longer service name wins across routes; then the older route.
    let compiled = compile(&format!(
        "{}{}{}",
        base(),
        grpc_route(
            "a",
            "  rules:\n  - matches: [{method: {service: pkg.Svc}}]\n    backendRefs: [{name: v1, port: 8080}]\n"
        ),
        grpc_route(
            "b",
            "  rules:\n  - matches: [{method: {service: pkg.Svc, method: Do}}]\n    backendRefs: [{name: v2, port: 8080}]\n"
        )
    ));
    assert_eq!(call(&compiled, "web", "pkg.Svc", "Do", &[]), "v2");
    assert_eq!(call(&compiled, "web", "pkg.Svc", "Other", &[]), "v1");
}

#[test]
fn hostnames_and_catch_all_rules() {
    let compiled = compile(&format!(
        "{}{}{}",
        base(),
        grpc_route(
            "specific",
            "  hostnames: [grpc.example.com]\n  rules:\n  - backendRefs: [{name: v1, port: 8080}]\n"
        ),
        grpc_route(
            "wild",
            "  hostnames: [\"*.example.com\"]\n  rules:\n  - matches: [{method: {service: pkg.Svc, method: Do}}]\n    backendRefs: [{name: v2, port: 8080}]\n"
        )
    ));
    assert_eq!(
        call(&compiled, "grpc.example.com:443", "pkg.Svc", "Do", &[]),
        "v1"
    );
    assert_eq!(
        call(&compiled, "other.example.com", "pkg.Svc", "Do", &[]),
        "v2"
    );
    assert_eq!(
        call(&compiled, "other.example.com", "pkg.Svc", "Nope", &[]),
        "unimplemented"
    );
    assert_eq!(
        call(&compiled, "example.net", "pkg.Svc", "Do", &[]),
        "unimplemented"
    );
}

#[test]
fn grpc_validation() {
    let errs = errors(&format!(
        "{}{}",
        base(),
        grpc_route(
            "g",
            r#"  rules:
  - matches:
    - method: {type: Exact}
    - method: {service: "bad service"}
    - method: {method: "Bad.Method"}
    - method: {type: RegularExpression, service: "("}
    - headers: [{name: ":authority", value: x}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}]}}
    backendRefs: [{name: v1, port: 8080}]
"#
        )
    ));
    assert_error(
        &errs,
        "spec.rules[0].matches[0].method",
        "at least one of service and method",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[1].method.service",
        "not a valid gRPC service name",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[2].method.method",
        "not a valid gRPC method name",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[3].method.service",
        "invalid regular expression",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[4].headers[0].name",
        "token characters",
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
}

#[test]
fn grpc_match_limit_is_8_per_rule() {
    let matches: String = (0..9)
        .map(|i| format!("    - method: {{service: pkg.S{i}}}\n"))
        .collect();
    let errs = errors(&format!(
        "{}{}",
        base(),
        grpc_route(
            "g",
            &format!(
                "  rules:\n  - matches:\n{matches}    backendRefs: [{{name: v1, port: 8080}}]\n"
            )
        )
    ));
    assert_error(&errs, "spec.rules[0].matches", "at most 8 matches");
}
