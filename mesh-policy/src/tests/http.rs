//! HTTPRoute matching and precedence. Each numbered precedence rule of the Gateway API has its
//! own test (`precedence_N_*`).

use super::*;
use crate::{HttpAction, HttpFilter, PathMatchKind, pick_weighted};

fn get(compiled: &Compiled, path: &str) -> String {
    route(compiled, "GET", "web", path, &[])
}

fn backend_rule(path_type: &str, path: &str, backend: &str) -> String {
    format!(
        "  - matches:\n    - path: {{type: {path_type}, value: \"{path}\"}}\n    backendRefs:\n    - {{name: {backend}, port: 8080}}\n"
    )
}

#[test]
fn no_routes_and_not_found() {
    let compiled = compile(&format!(
        "{}{}",
        base(),
        http_route(
            "r",
            "",
            &format!("  rules:\n{}", backend_rule("Exact", "/only", "v1"))
        )
    ));
    assert_eq!(get(&compiled, "/only"), "v1");
    assert_eq!(get(&compiled, "/other"), "404");
    // v1 has no routes attached, and neither has web's port 8080.
    let request = RequestParts {
        method: "GET",
        host: "v1",
        path: "/",
        headers: &[],
    };
    assert!(matches!(
        compiled.route_http(addr("10.96.0.11:80"), &request),
        HttpOutcome::NoRoutes
    ));
    assert!(matches!(
        compiled.route_http(addr("10.96.0.1:8080"), &request),
        HttpOutcome::NoRoutes
    ));
    assert!(matches!(
        compiled.route_http(addr("192.0.2.1:80"), &request),
        HttpOutcome::NoRoutes
    ));
}

#[test]
fn path_prefix_segment_boundary_trailing_slash_and_query() {
    let compiled = compile(&format!(
        "{}{}",
        base(),
        http_route(
            "r",
            "",
            &format!(
                "  rules:\n{}{}",
                backend_rule("PathPrefix", "/foo/", "v1"),
                backend_rule("PathPrefix", "/", "v2")
            )
        )
    ));
    assert_eq!(get(&compiled, "/foo"), "v1");
    assert_eq!(get(&compiled, "/foo/"), "v1");
    assert_eq!(get(&compiled, "/foo/bar"), "v1");
    assert_eq!(get(&compiled, "/foo?x=/foo"), "v1");
    assert_eq!(get(&compiled, "/foobar"), "v2");
    assert_eq!(get(&compiled, "/fo"), "v2");
    assert_eq!(get(&compiled, "/?q=/foo/bar"), "v2");
}

#[test]
fn exact_path_is_exact() {
    let compiled = compile(&format!(
        "{}{}",
        base(),
        http_route(
            "r",
            "",
            &format!("  rules:\n{}", backend_rule("Exact", "/one", "v1"))
        )
    ));
    assert_eq!(get(&compiled, "/one"), "v1");
    assert_eq!(get(&compiled, "/one?x=1"), "v1");
    assert_eq!(get(&compiled, "/one/"), "404");
    assert_eq!(get(&compiled, "/One"), "404");
    assert_eq!(get(&compiled, "/one/two"), "404");
}

#[test]
fn regular_expression_matches_whole_path() {
    let compiled = compile(&format!(
        "{}{}",
        base(),
        http_route(
            "r",
            "",
            &format!(
                "  rules:\n{}",
                backend_rule("RegularExpression", "/v[0-9]+/.*", "v1")
            )
        )
    ));
    assert_eq!(get(&compiled, "/v12/items"), "v1");
    assert_eq!(get(&compiled, "/x/v12/items"), "404");
    assert_eq!(get(&compiled, "/vx/items"), "404");
}

#[test]
fn conditions_and_within_a_match_or_across_matches() {
    let spec = r#"  rules:
  - matches:
    - path: {type: PathPrefix, value: /a}
      method: POST
      headers: [{name: X-Env, value: prod}]
      queryParams: [{name: debug, value: "1"}, {name: Mode, type: RegularExpression, value: "fast|slow"}]
    - path: {type: Exact, value: /b}
    backendRefs: [{name: v1, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    let h = [("x-env", "prod")];
    assert_eq!(
        route(&compiled, "POST", "web", "/a?debug=1&Mode=slow", &h),
        "v1"
    );
    assert_eq!(
        route(&compiled, "GET", "web", "/a?debug=1&Mode=slow", &h),
        "404"
    );
    assert_eq!(
        route(&compiled, "POST", "web", "/a?debug=1&Mode=slow", &[]),
        "404"
    );
    assert_eq!(
        route(&compiled, "POST", "web", "/a?debug=1&mode=slow", &h),
        "404"
    );
    assert_eq!(
        route(&compiled, "POST", "web", "/a?debug=1&Mode=slowish", &h),
        "404"
    );
    assert_eq!(
        route(&compiled, "POST", "web", "/a?debug=2&debug=1&Mode=fast", &h),
        "404",
        "first value of a repeated parameter counts"
    );
    assert_eq!(route(&compiled, "DELETE", "web", "/b", &[]), "v1");
}

#[test]
fn header_regex_and_case_insensitive_names() {
    let spec = r#"  rules:
  - matches:
    - headers: [{name: X-Version, type: RegularExpression, value: "v[12]"}]
    backendRefs: [{name: v1, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    assert_eq!(get_h(&compiled, &[("x-version", "v2")]), "v1");
    assert_eq!(get_h(&compiled, &[("X-VERSION", "v1")]), "v1");
    assert_eq!(get_h(&compiled, &[("x-version", "v3")]), "404");
    assert_eq!(get_h(&compiled, &[("x-version", "xv1")]), "404");
}

fn get_h(compiled: &Compiled, headers: &[(&str, &str)]) -> String {
    route(compiled, "GET", "web", "/", headers)
}

#[test]
fn precedence_1_hostname_exact_then_longer_wildcard_then_none() {
    // The rule that would win on path (Exact) loses to a more specific hostname.
    let routes = [
        http_route(
            "any-host",
            "",
            &format!("  rules:\n{}", backend_rule("Exact", "/p", "v4")),
        ),
        http_route(
            "short-wildcard",
            "",
            &format!(
                "  hostnames: [\"*.com\"]\n  rules:\n{}",
                backend_rule("Exact", "/p", "v3")
            ),
        ),
        http_route(
            "long-wildcard",
            "",
            &format!(
                "  hostnames: [\"*.example.com\"]\n  rules:\n{}",
                backend_rule("PathPrefix", "/", "v2")
            ),
        ),
        http_route(
            "exact",
            "",
            &format!(
                "  hostnames: [a.example.com]\n  rules:\n{}",
                backend_rule("PathPrefix", "/", "v1")
            ),
        ),
    ]
    .concat();
    let compiled = compile(&format!("{}{routes}", base()));
    let at = |host: &str| route(&compiled, "GET", host, "/p", &[]);
    assert_eq!(at("a.example.com"), "v1");
    assert_eq!(at("A.Example.com:8080"), "v1", "case and port are ignored");
    assert_eq!(at("b.example.com"), "v2");
    assert_eq!(at("x.y.example.com"), "v2");
    assert_eq!(
        at("example.com"),
        "v3",
        "*.example.com does not match example.com"
    );
    assert_eq!(at("other.net"), "v4");
    // Falls through to less specific hostnames when the specific ones have no matching rule.
    let compiled = compile(&format!(
        "{}{}{}",
        base(),
        http_route(
            "exact",
            "",
            &format!(
                "  hostnames: [a.example.com]\n  rules:\n{}",
                backend_rule("Exact", "/x", "v1")
            )
        ),
        http_route(
            "wild",
            "",
            &format!(
                "  hostnames: [\"*.example.com\"]\n  rules:\n{}",
                backend_rule("Exact", "/p", "v2")
            )
        )
    ));
    assert_eq!(route(&compiled, "GET", "a.example.com", "/p", &[]), "v2");
    assert_eq!(route(&compiled, "GET", "a.example.com", "/q", &[]), "404");
    assert_eq!(route(&compiled, "GET", "nomatch.org", "/p", &[]), "404");
}

#[test]
fn precedence_2_exact_over_prefix_over_regex() {
    let spec = format!(
        "  rules:\n{}{}{}",
        backend_rule("RegularExpression", "/p.*", "v3"),
        backend_rule("PathPrefix", "/p", "v2"),
        backend_rule("Exact", "/p", "v1")
    );
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", &spec)));
    assert_eq!(get(&compiled, "/p"), "v1");
    assert_eq!(get(&compiled, "/p/x"), "v2");
    assert_eq!(get(&compiled, "/pq"), "v3");
}

#[test]
fn precedence_3_longer_path_first() {
    // Across routes: the younger route has the longer prefix and still wins.
    let compiled = compile(&format!(
        "{}{}{}",
        base(),
        http_route(
            "a-old",
            "  creationTimestamp: \"2020-01-01T00:00:00Z\"\n",
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/match", "v1"))
        ),
        http_route(
            "b-new",
            "  creationTimestamp: \"2024-01-01T00:00:00Z\"\n",
            &format!(
                "  rules:\n{}{}",
                backend_rule("PathPrefix", "/match/prefix/", "v2"),
                backend_rule("RegularExpression", "/match/.*", "v4")
            )
        )
    ));
    assert_eq!(get(&compiled, "/match/prefix/one"), "v2");
    assert_eq!(get(&compiled, "/match/prefix"), "v2");
    assert_eq!(get(&compiled, "/match/other"), "v1");
    // Regular expressions: longer pattern first.
    let spec = format!(
        "  rules:\n{}{}",
        backend_rule("RegularExpression", "/.*", "v1"),
        backend_rule("RegularExpression", "/api/.*", "v2")
    );
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", &spec)));
    assert_eq!(get(&compiled, "/api/x"), "v2");
    assert_eq!(get(&compiled, "/web/x"), "v1");
}

#[test]
fn precedence_4_method_match() {
    let spec = r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /}, method: POST}]
    backendRefs: [{name: v2, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    assert_eq!(route(&compiled, "POST", "web", "/", &[]), "v2");
    assert_eq!(route(&compiled, "GET", "web", "/", &[]), "v1");
}

#[test]
fn precedence_5_more_header_matches() {
    let spec = r#"  rules:
  - matches: [{headers: [{name: version, value: two}]}]
    backendRefs: [{name: v2, port: 8080}]
  - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
    backendRefs: [{name: v1, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    assert_eq!(
        get_h(&compiled, &[("Version", "two"), ("Color", "orange")]),
        "v1"
    );
    assert_eq!(
        get_h(&compiled, &[("Version", "two"), ("Color", "blue")]),
        "v2"
    );
    // Method outranks headers.
    let spec = r#"  rules:
  - matches: [{headers: [{name: a, value: "1"}, {name: b, value: "2"}]}]
    backendRefs: [{name: v1, port: 8080}]
  - matches: [{method: GET}]
    backendRefs: [{name: v2, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    assert_eq!(get_h(&compiled, &[("a", "1"), ("b", "2")]), "v2");
}

#[test]
fn precedence_6_more_query_param_matches() {
    let spec = r#"  rules:
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: whale}, {name: color, value: blue}]}]
    backendRefs: [{name: v2, port: 8080}]
  - matches: [{headers: [{name: version, value: one}]}]
    backendRefs: [{name: v3, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    assert_eq!(get(&compiled, "/?animal=whale&color=blue"), "v2");
    assert_eq!(get(&compiled, "/?animal=whale&color=red"), "v1");
    // Headers outrank query params.
    assert_eq!(
        route(
            &compiled,
            "GET",
            "web",
            "/?animal=whale&color=blue",
            &[("version", "one")]
        ),
        "v3"
    );
}

#[test]
fn precedence_7_oldest_route() {
    // "a-new" sorts first alphabetically but is younger: "z-old" wins.
    let compiled = compile(&format!(
        "{}{}{}",
        base(),
        http_route(
            "a-new",
            "  creationTimestamp: \"2024-06-01T00:00:00Z\"\n",
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/", "v1"))
        ),
        http_route(
            "z-old",
            "  creationTimestamp: \"2023-06-01T00:00:00Z\"\n",
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/", "v2"))
        )
    ));
    assert_eq!(get(&compiled, "/"), "v2");
    // A route without a timestamp counts as newest.
    let compiled = compile(&format!(
        "{}{}{}",
        base(),
        http_route(
            "a-unknown",
            "",
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/", "v1"))
        ),
        http_route(
            "z-dated",
            "  creationTimestamp: \"2023-06-01T00:00:00Z\"\n",
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/", "v2"))
        )
    ));
    assert_eq!(get(&compiled, "/"), "v2");
}

#[test]
fn precedence_8_alphabetical_namespace_name() {
    let ts = "  creationTimestamp: \"2024-01-01T00:00:00Z\"\n";
    let compiled = compile(&format!(
        "{}{}{}",
        base(),
        http_route(
            "route-b",
            ts,
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/", "v2"))
        ),
        http_route(
            "route-a",
            ts,
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/", "v1"))
        )
    ));
    assert_eq!(get(&compiled, "/"), "v1");
}

#[test]
fn precedence_9_rule_order_then_match_order() {
    let spec = r#"  rules:
  - matches:
    - headers: [{name: x, value: "1"}]
    - headers: [{name: y, value: "1"}]
    backendRefs: [{name: v1, port: 8080}]
  - matches:
    - headers: [{name: x, value: "1"}]
    backendRefs: [{name: v2, port: 8080}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    let request = RequestParts {
        method: "GET",
        host: "web",
        path: "/",
        headers: &[("y", "1"), ("x", "1")],
    };
    let HttpOutcome::Matched(decision) = compiled.route_http(web(), &request) else {
        panic!("should match");
    };
    assert_eq!((decision.rule_index, decision.match_index), (0, 0));
    let request = RequestParts {
        headers: &[("y", "1")],
        ..request
    };
    let HttpOutcome::Matched(decision) = compiled.route_http(web(), &request) else {
        panic!("should match");
    };
    assert_eq!((decision.rule_index, decision.match_index), (0, 1));
}

#[test]
fn decision_carries_filters_backends_timeouts() {
    let spec = r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: a}]
        add: [{name: X-Add, value: b}]
        remove: [X-Gone]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Resp, value: c}]}
    - type: URLRewrite
      urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: v3, port: 8080}, fraction: {numerator: 1, denominator: 4}}
    backendRefs:
    - name: v1
      port: 8080
      weight: 3
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: Backend, value: v1}]}
    - {name: v2, port: 80, weight: 1}
    timeouts: {request: 10s, backendRequest: 2s}
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    let request = RequestParts {
        method: "GET",
        host: "web",
        path: "/api/items?x=1",
        headers: &[],
    };
    let HttpOutcome::Matched(d) = compiled.route_http(web(), &request) else {
        panic!("should match");
    };
    assert_eq!(d.route.to_string(), "HTTPRoute shop/r");
    assert_eq!(d.path.kind, PathMatchKind::PathPrefix);
    assert_eq!(&*d.path.value, "/api");
    assert_eq!(d.filters().len(), 4);
    let HttpFilter::UrlRewrite(rewrite) = &d.filters()[2] else {
        panic!("URLRewrite expected");
    };
    assert_eq!(rewrite.hostname.as_deref(), Some("api.internal"));
    let path = rewrite.path.as_ref().map(|p| p.apply(d.path, "/api/items"));
    assert_eq!(path.as_deref(), Some("/v2/items"));
    let HttpFilter::RequestMirror(mirror) = &d.filters()[3] else {
        panic!("RequestMirror expected");
    };
    assert_eq!(mirror.backend.service.name, "v3");
    assert_eq!(
        (mirror.fraction.numerator, mirror.fraction.denominator),
        (1, 4)
    );
    assert_eq!(d.backends().len(), 2);
    assert_eq!(d.backends()[0].weight, 3);
    assert_eq!(d.backends()[0].filters.len(), 1);
    assert_eq!(d.backends()[0].endpoints, vec![addr("10.244.0.11:8080")]);
    assert_eq!(d.backends()[1].port, 80);
    assert_eq!(
        d.timeouts().request,
        Some(std::time::Duration::from_secs(10))
    );
    assert_eq!(
        d.timeouts().backend_request,
        Some(std::time::Duration::from_secs(2))
    );
    assert_eq!(d.action(), HttpAction::Forward);
}

#[test]
fn redirect_and_internal_error_actions() {
    let spec = r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: PathPrefix, value: /zero}}]
    backendRefs: [{name: v1, port: 8080, weight: 0}, {name: v2, port: 8080, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /none}}]
"#;
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    let decide = |path: &'static str| {
        let request = RequestParts {
            method: "GET",
            host: "web:80",
            path,
            headers: &[],
        };
        match compiled.route_http(web(), &request) {
            HttpOutcome::Matched(d) => d,
            other => panic!("{path}: {other:?}"),
        }
    };
    let d = decide("/old/page?x=1");
    let HttpAction::Redirect(redirect) = d.action() else {
        panic!("redirect expected");
    };
    assert_eq!(redirect.status_code, 301);
    assert_eq!(
        redirect.location("http", "web:80", 80, "/old/page?x=1", d.path),
        "https://web/new/page?x=1"
    );
    let d = decide("/zero");
    assert_eq!(d.action(), HttpAction::NoBackends);
    assert!(pick_weighted(d.backends(), 12345).is_none());
    assert_eq!(decide("/none").action(), HttpAction::NoBackends);
}

#[test]
fn backend_without_endpoints_is_not_routable() {
    let lonely = r#"---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: shop}
spec:
  clusterIP: 10.96.0.99
  ports: [{name: http, port: 80}]
"#;
    let spec = "  rules:\n  - backendRefs: [{name: lonely, port: 80}]\n";
    let compiled = compile(&format!("{}{lonely}{}", base(), http_route("r", "", spec)));
    let request = RequestParts {
        method: "GET",
        host: "web",
        path: "/",
        headers: &[],
    };
    let HttpOutcome::Matched(d) = compiled.route_http(web(), &request) else {
        panic!("should match");
    };
    assert!(d.backends()[0].endpoints.is_empty());
    assert_eq!(d.action(), HttpAction::NoBackends);
}

#[test]
fn route_without_rules_matches_everything_without_backends() {
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", "")));
    let request = RequestParts {
        method: "GET",
        host: "web",
        path: "/anything",
        headers: &[],
    };
    let HttpOutcome::Matched(d) = compiled.route_http(web(), &request) else {
        panic!("should match");
    };
    assert_eq!(d.action(), HttpAction::NoBackends);
}

#[test]
fn parent_port_scopes_attachment() {
    // One route on port 80 only, one on every port of web.
    let all_ports = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /all}}]
    backendRefs: [{name: v2, port: 8080}]
"#;
    let by_section = r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: alt, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, sectionName: http-alt}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /alt}}]
    backendRefs: [{name: v3, port: 8080}]
"#;
    let compiled = compile(&format!(
        "{}{}{all_ports}{by_section}",
        base(),
        http_route(
            "p80",
            "",
            &format!("  rules:\n{}", backend_rule("PathPrefix", "/80", "v1"))
        )
    ));
    let at = |port: u16, path: &'static str| {
        let request = RequestParts {
            method: "GET",
            host: "web",
            path,
            headers: &[],
        };
        outcome(compiled.route_http(addr(&format!("10.96.0.1:{port}")), &request)).1
    };
    assert_eq!(at(80, "/80"), "v1");
    assert_eq!(at(8080, "/80"), "");
    assert_eq!(at(80, "/all"), "v2");
    assert_eq!(at(8080, "/all"), "v2");
    assert_eq!(at(8080, "/alt"), "v3");
    assert_eq!(at(80, "/alt"), "");
}

/// The rule a `GET web/` request matches in a route `r` with `spec`.
fn only_rule(spec: &str) -> std::sync::Arc<crate::HttpRule> {
    let compiled = compile(&format!("{}{}", base(), http_route("r", "", spec)));
    let request = RequestParts {
        method: "GET",
        host: "web",
        path: "/",
        headers: &[],
    };
    let HttpOutcome::Matched(d) = compiled.route_http(web(), &request) else {
        panic!("should match");
    };
    d.rule.clone()
}

#[test]
fn weighted_pick_distribution() {
    let spec = r#"  rules:
  - backendRefs:
    - {name: v1, port: 8080, weight: 1}
    - {name: v2, port: 8080, weight: 0}
    - {name: v3, port: 8080, weight: 3}
"#;
    let rule = only_rule(spec);
    // An evenly spread deterministic sequence over the u32 range.
    let n = 4000u64;
    let mut counts = std::collections::HashMap::new();
    for i in 0..n {
        let random = u32::try_from((i << 32) / n).expect("below 2^32");
        let backend = pick_weighted(&rule.backends, random).expect("a backend");
        *counts.entry(backend.service.name.as_str()).or_insert(0u32) += 1;
    }
    assert_eq!(counts.get("v2"), None, "weight 0 is never chosen");
    assert_eq!(counts.get("v1"), Some(&1000));
    assert_eq!(counts.get("v3"), Some(&3000));
    assert_eq!(
        pick_weighted(&rule.backends, 0).map(|b| b.service.name.as_str()),
        Some("v1")
    );
    assert_eq!(
        pick_weighted(&rule.backends, u32::MAX).map(|b| b.service.name.as_str()),
        Some("v3")
    );
    assert!(pick_weighted(&[], 7).is_none());
}

/// A rule's own picks meet its weights in every window of consecutive requests, not only on
/// average (the conformance suite checks 500 requests within 0.05 of each weight), and the
/// backends take turns instead of running in blocks.
#[test]
fn a_rules_picks_meet_the_weights_in_every_window() {
    let spec = r#"  rules:
  - backendRefs:
    - {name: v1, port: 8080, weight: 70}
    - {name: v2, port: 8080, weight: 0}
    - {name: v3, port: 8080, weight: 20}
    - {name: v4, port: 8080, weight: 10}
"#;
    let rule = only_rule(spec);
    let picks: Vec<&str> = (0..20_000)
        .map(|_| rule.pick().expect("a backend").service.name.as_str())
        .collect();
    assert!(!picks.contains(&"v2"), "weight 0 is never chosen");
    for window in [10usize, 100, 500, 5000] {
        for start in (0..picks.len() - window).step_by(37) {
            let slice = &picks[start..start + window];
            for (name, weight) in [("v1", 0.7), ("v3", 0.2), ("v4", 0.1)] {
                let got = slice.iter().filter(|p| **p == name).count() as f64;
                let want = weight * window as f64;
                assert!(
                    (got - want).abs() <= 3.0,
                    "{name}: {got} of {window} from request {start}, want {want}"
                );
            }
        }
    }
    let longest_run = picks
        .chunk_by(|a, b| a == b)
        .map(|run| (run[0], run.len()))
        .fold(std::collections::HashMap::new(), |mut m, (name, len)| {
            let e = m.entry(name).or_insert(0);
            *e = (*e).max(len);
            m
        });
    assert!(longest_run["v1"] <= 4, "v1 runs: {longest_run:?}");
    assert_eq!(longest_run["v3"], 1, "{longest_run:?}");
    assert_eq!(longest_run["v4"], 1, "{longest_run:?}");
}
