//! TLSRoute and TCPRoute lookup.

use super::*;

fn tls_route(name: &str, ts: Option<&str>, hostnames: &str, backend: &str) -> String {
    let ts = ts
        .map(|t| format!("  creationTimestamp: \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata:\n  name: {name}\n  namespace: shop\n{ts}spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 8080}}]\n  hostnames: {hostnames}\n  rules: [{{backendRefs: [{{name: {backend}, port: 8080}}]}}]\n"
    )
}

fn tcp_route(name: &str, ts: Option<&str>, backend: &str) -> String {
    let ts = ts
        .map(|t| format!("  creationTimestamp: \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: {name}\n  namespace: shop\n{ts}spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 8080}}]\n  rules: [{{backendRefs: [{{name: {backend}, port: 8080, weight: 2}}]}}]\n"
    )
}

fn tls_backend(compiled: &Compiled, sni: Option<&str>) -> String {
    compiled
        .route_tls(addr("10.96.0.1:8080"), sni)
        .map(|d| d.backends[0].service.name.clone())
        .unwrap_or_else(|| "none".into())
}

#[test]
fn tls_exact_beats_wildcard_and_longer_wildcard_beats_shorter() {
    let compiled = compile(
        &[
            base(),
            tls_route("exact", None, "[a.example.com]", "v1"),
            tls_route("long", None, "[\"*.example.com\"]", "v2"),
            tls_route("short", None, "[\"*.com\"]", "v3"),
            tls_route("catch-all", None, "[]", "v4"),
        ]
        .concat(),
    );
    assert_eq!(tls_backend(&compiled, Some("a.example.com")), "v1");
    assert_eq!(tls_backend(&compiled, Some("A.EXAMPLE.COM")), "v1");
    assert_eq!(tls_backend(&compiled, Some("b.example.com")), "v2");
    assert_eq!(tls_backend(&compiled, Some("c.b.example.com")), "v2");
    assert_eq!(tls_backend(&compiled, Some("example.com")), "v3");
    assert_eq!(tls_backend(&compiled, Some("example.org")), "v4");
    assert_eq!(tls_backend(&compiled, None), "v4");
    // No TLSRoute on port 80.
    assert!(compiled.route_tls(web(), Some("a.example.com")).is_none());
}

#[test]
fn tls_wildcard_does_not_match_apex_and_misses_are_none() {
    let compiled = compile(&format!(
        "{}{}",
        base(),
        tls_route("w", None, "[\"*.example.com\"]", "v1")
    ));
    assert_eq!(tls_backend(&compiled, Some("example.com")), "none");
    assert_eq!(tls_backend(&compiled, Some("x.example.com")), "v1");
    assert_eq!(tls_backend(&compiled, Some("x.example.net")), "none");
    assert_eq!(tls_backend(&compiled, None), "none");
}

#[test]
fn tls_tie_break_oldest_then_alphabetical() {
    let compiled = compile(
        &[
            base(),
            tls_route(
                "a-young",
                Some("2024-01-01T00:00:00Z"),
                "[a.example.com]",
                "v1",
            ),
            tls_route(
                "z-old",
                Some("2020-01-01T00:00:00Z"),
                "[a.example.com]",
                "v2",
            ),
            tls_route(
                "b",
                Some("2022-01-01T00:00:00Z"),
                "[\"*.example.com\"]",
                "v3",
            ),
            tls_route(
                "a",
                Some("2022-01-01T00:00:00Z"),
                "[\"*.example.com\"]",
                "v4",
            ),
        ]
        .concat(),
    );
    assert_eq!(tls_backend(&compiled, Some("a.example.com")), "v2");
    assert_eq!(tls_backend(&compiled, Some("b.example.com")), "v4");
    let decision = compiled
        .route_tls(addr("10.96.0.1:8080"), Some("a.example.com"))
        .expect("decision");
    assert_eq!(decision.route.to_string(), "TLSRoute shop/z-old");
    assert!(decision.is_routable());
}

/// Every lookup hands out a clone of the decision, and the clones share the rule's split: over
/// many connections (each its own lookup) the weights are met, not stuck on the first backend.
#[test]
fn tcp_route_weights_hold_across_lookups() {
    let route = tcp_route("split", None, "v1").replace(
        "backendRefs: [{name: v1, port: 8080, weight: 2}]",
        "backendRefs: [{name: v1, port: 8080, weight: 9}, {name: v2, port: 8080, weight: 1}]",
    );
    let compiled = compile(&[base(), route].concat());
    let mut v1 = 0;
    for _ in 0..1000 {
        let decision = compiled
            .route_tcp(addr("10.96.0.1:8080"))
            .expect("tcp route");
        if decision.pick().expect("a backend").service.name == "v1" {
            v1 += 1;
        }
    }
    assert!((896..=904).contains(&v1), "v1 got {v1} of 1000, want 900");
}

#[test]
fn tcp_route_lookup_and_tie_break() {
    let compiled = compile(
        &[
            base(),
            tcp_route("a-young", Some("2024-01-01T00:00:00Z"), "v1"),
            tcp_route("z-old", Some("2020-01-01T00:00:00Z"), "v2"),
        ]
        .concat(),
    );
    let decision = compiled
        .route_tcp(addr("10.96.0.1:8080"))
        .expect("tcp route");
    assert_eq!(decision.route.name, "z-old");
    assert_eq!(decision.backends[0].weight, 2);
    assert_eq!(
        decision.pick().map(|b| b.endpoints.clone()),
        Some(vec![addr("10.244.0.12:8080")])
    );
    assert!(compiled.route_tcp(web()).is_none());
    assert!(compiled.has_routes(addr("10.96.0.1:8080")));
    assert!(!compiled.has_routes(web()));

    let compiled = compile(
        &[
            base(),
            tcp_route("b", Some("2024-01-01T00:00:00Z"), "v1"),
            tcp_route("a", Some("2024-01-01T00:00:00Z"), "v2"),
        ]
        .concat(),
    );
    assert_eq!(
        compiled
            .route_tcp(addr("10.96.0.1:8080"))
            .map(|d| d.route.name.clone()),
        Some("a".to_string())
    );
}
