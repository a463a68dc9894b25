//! Every validation error comes with the field path a user needs to fix it.

use super::*;

fn with_route(spec: &str) -> Vec<ValidationError> {
    errors(&format!("{}{}", base(), http_route("bad", "", spec)))
}

fn rule(body: &str) -> Vec<ValidationError> {
    with_route(&format!("  rules:\n{body}"))
}

#[test]
fn valid_base_policy_has_no_errors() {
    assert_eq!(errors(&base()), vec![]);
}

#[test]
fn missing_name() {
    let errs = errors(
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: shop}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
    );
    assert_error(&errs, "metadata.name", "missing name");
    assert_eq!(errs[0].object, "Service shop/<unnamed>");
    assert_eq!(errs[0].source, "test.yaml#1");
}

#[test]
fn service_cluster_ip_not_an_ip() {
    let errs = errors(&service("web", "10.96.0.300"));
    assert_error(&errs, "spec.clusterIP", "not an IP address");
    let errs = errors(&format!(
        "{}{}",
        base(),
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: dual, namespace: shop}\nspec:\n  clusterIP: 10.96.0.50\n  clusterIPs: [10.96.0.50, \"fd00::zz\"]\n  ports: [{port: 80}]\n"
    ));
    assert_error(&errs, "spec.clusterIPs[1]", "not an IP address");
}

#[test]
fn duplicate_names_within_a_namespace() {
    let errs = errors(&format!("{}{}", base(), service("web", "10.96.0.2")));
    assert_error(
        &errs,
        "metadata.name",
        "duplicate Service shop/web: already defined in test.yaml#1",
    );
    let route = http_route("r", "", "");
    let errs = errors(&format!("{}{route}{route}", base()));
    assert_error(&errs, "metadata.name", "duplicate HTTPRoute shop/r");
    // Same name in another namespace or of another kind is fine.
    let other_ns = service("web", "10.96.0.2").replace("namespace: shop", "namespace: other");
    assert_eq!(errors(&format!("{}{other_ns}", base())), vec![]);
}

#[test]
fn vip_port_used_twice() {
    let errs = errors(&format!("{}{}", base(), service("copy", "10.96.0.1")));
    assert_error(
        &errs,
        "spec.clusterIP",
        "10.96.0.1:80 is already used by Service shop/web",
    );
}

#[test]
fn port_out_of_range() {
    let errs = errors(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: a, port: 70000}, {name: b, port: 80, targetPort: 0}]\n",
    );
    assert_error(&errs, "spec.ports[0].port", "out of range 1-65535");
    assert_error(&errs, "spec.ports[1].targetPort", "out of range");
}

#[test]
fn parent_ref_must_be_an_existing_service() {
    let route = |parent: &str| {
        format!(
            "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{parent}]\n",
            base()
        )
    };
    assert_error(
        &errors(&route("{name: gw}")),
        "spec.parentRefs[0].kind",
        "mesh routes must name a Service",
    );
    assert_error(
        &errors(&route("{group: \"\", kind: Service, name: nope}")),
        "spec.parentRefs[0].name",
        "Service shop/nope does not exist",
    );
    assert_error(
        &errors(&route("{group: \"\", kind: Service, name: web, port: 81}")),
        "spec.parentRefs[0].port",
        "has no port 81 (it has 80, 8080)",
    );
    assert_error(
        &errors(&route(
            "{group: \"\", kind: Service, name: web, sectionName: grpc}",
        )),
        "spec.parentRefs[0].sectionName",
        "no port named",
    );
    assert_error(
        &errors(&route(
            "{group: \"\", kind: Service, name: web, namespace: other}",
        )),
        "spec.parentRefs[0].namespace",
        "consumer routes",
    );
    let errs = errors(&format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec: {{}}\n",
        base()
    ));
    assert_error(&errs, "spec.parentRefs", "no parentRefs");
}

#[test]
fn backend_ref_to_missing_service_or_port() {
    let errs =
        rule("  - backendRefs: [{name: nope, port: 80}, {name: v1, port: 9090}, {name: v1}]\n");
    assert_error(
        &errs,
        "spec.rules[0].backendRefs[0].name",
        "Service shop/nope does not exist",
    );
    assert_error(
        &errs,
        "spec.rules[0].backendRefs[1].port",
        "has no TCP port 9090",
    );
    assert_error(
        &errs,
        "spec.rules[0].backendRefs[2].port",
        "port is required",
    );
    let errs = rule(
        "  - backendRefs: [{name: v1, port: 80, namespace: other}, {name: v1, port: 80, kind: Pod}]\n",
    );
    assert_error(
        &errs,
        "spec.rules[0].backendRefs[0].namespace",
        "ReferenceGrant",
    );
    assert_error(
        &errs,
        "spec.rules[0].backendRefs[1].kind",
        "only core Services",
    );
}

#[test]
fn weights_out_of_range() {
    let errs = rule(
        "  - backendRefs: [{name: v1, port: 80, weight: -1}, {name: v2, port: 80, weight: 1000001}]\n",
    );
    assert_error(
        &errs,
        "spec.rules[0].backendRefs[0].weight",
        "weight -1 is out of range 0-1000000",
    );
    assert_error(&errs, "spec.rules[0].backendRefs[1].weight", "out of range");
    assert!(rule("  - backendRefs: [{name: v1, port: 80, weight: 1000000}]\n").is_empty());
}

#[test]
fn path_values() {
    let errs = rule(
        r#"  - matches:
    - path: {type: PathPrefix, value: /ok}
    - path: {type: Exact, value: "no-slash"}
    - path: {type: PathPrefix, value: "/a//b"}
    - path: {type: Exact, value: "/a/../b"}
    - path: {type: PathPrefix, value: "/a b"}
    - path: {type: PathPrefix, value: "/%zz"}
    - path: {type: RegularExpression, value: "/(unclosed"}
"#,
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[1].path.value",
        "must start with '/'",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[2].path.value",
        "must not contain \"//\"",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[3].path.value",
        "must not contain \"/../\"",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[4].path.value",
        "not allowed in a path",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[5].path.value",
        "two hex digits",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[6].path.value",
        "invalid regular expression",
    );
    assert_eq!(errs.len(), 6, "{errs:#?}");
}

#[test]
fn regex_size_is_limited() {
    let errs =
        rule("  - matches: [{path: {type: RegularExpression, value: \"(a{1000}){1000}\"}}]\n");
    assert_error(
        &errs,
        "spec.rules[0].matches[0].path.value",
        "invalid regular expression",
    );
}

#[test]
fn header_and_query_matches() {
    let errs = rule(
        r#"  - matches:
    - headers: [{name: "bad header", value: x}, {name: ok, type: RegularExpression, value: "(["}]
      queryParams: [{name: "q:x", value: y}]
"#,
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[0].headers[0].name",
        "token characters",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[0].headers[1].value",
        "invalid regular expression",
    );
    assert_error(
        &errs,
        "spec.rules[0].matches[0].queryParams[0].name",
        "token characters",
    );
}

#[test]
fn hostnames() {
    let errs = with_route(
        "  hostnames: [ok.example.com, \"foo.*.com\", \"*.ok.com\", Upper.com, 10.1.2.3, \"-a.com\"]\n",
    );
    assert_error(&errs, "spec.hostnames[1]", "leftmost label");
    assert_error(&errs, "spec.hostnames[3]", "RFC 1123");
    assert_error(&errs, "spec.hostnames[4]", "IP address");
    assert_error(&errs, "spec.hostnames[5]", "RFC 1123");
    assert_eq!(errs.len(), 4, "{errs:#?}");
}

#[test]
fn crd_list_limits() {
    let rules: String = (0..17)
        .map(|i| format!("  - matches: [{{path: {{value: /r{i}}}}}]\n"))
        .collect();
    assert_error(&rule(&rules), "spec.rules", "at most 16 rules");
    let matches: String = (0..65)
        .map(|i| format!("    - path: {{value: /m{i}}}\n"))
        .collect();
    assert_error(
        &rule(&format!("  - matches:\n{matches}")),
        "spec.rules[0].matches",
        "at most 64 matches",
    );
    let three_rules: String = (0..3)
        .map(|r| {
            let m: String = (0..50)
                .map(|i| format!("    - path: {{value: /r{r}m{i}}}\n"))
                .collect();
            format!("  - matches:\n{m}")
        })
        .collect();
    assert_error(&rule(&three_rules), "spec.rules", "at most 128");
    let headers: String = (0..17)
        .map(|i| format!("{{name: h{i}, value: v}},"))
        .collect();
    assert_error(
        &rule(&format!("  - matches: [{{headers: [{headers}]}}]\n")),
        "spec.rules[0].matches[0].headers",
        "at most 16",
    );
    let hostnames: String = (0..17).map(|i| format!("h{i}.example.com,")).collect();
    assert_error(
        &with_route(&format!("  hostnames: [{hostnames}]\n")),
        "spec.hostnames",
        "at most 16",
    );
    let backends: String = (0..17).map(|_| "{name: v1, port: 80},").collect();
    assert_error(
        &rule(&format!("  - backendRefs: [{backends}]\n")),
        "spec.rules[0].backendRefs",
        "at most 16",
    );
}

#[test]
fn filter_type_and_config_must_agree() {
    let errs = rule(
        r#"  - filters:
    - type: RequestHeaderModifier
    - type: ResponseHeaderModifier
      urlRewrite: {hostname: a.com}
      responseHeaderModifier: {set: [{name: a, value: b}]}
    - type: ExtensionRef
      extensionRef: {group: x, kind: y, name: z}
"#,
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[0].requestHeaderModifier",
        "required when type is RequestHeaderModifier",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[1].urlRewrite",
        "must not be set when type is ResponseHeaderModifier",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[2].extensionRef",
        "not supported",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[2].type",
        "filter type ExtensionRef is not supported",
    );
}

#[test]
fn filter_combinations() {
    let errs = rule(
        r#"  - filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}]}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: a, value: b}, {name: A, value: c}]}}
    - {type: RequestRedirect, requestRedirect: {hostname: a.com}}
    - {type: URLRewrite, urlRewrite: {hostname: b.com}}
    backendRefs: [{name: v1, port: 80}]
"#,
    );
    assert_error(&errs, "spec.rules[0].filters[1].type", "cannot be repeated");
    assert_error(
        &errs,
        "spec.rules[0].filters[1].requestHeaderModifier.add[1].name",
        "duplicate header",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters",
        "either RequestRedirect or URLRewrite",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[2]",
        "must not be used together with backendRefs",
    );
}

#[test]
fn redirect_status_code_and_port() {
    let errs = rule(
        "  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304, port: 0, hostname: \"*.a.com\"}}]\n",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[0].requestRedirect.statusCode",
        "304 is not one of 301, 302, 303, 307, 308",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[0].requestRedirect.port",
        "out of range",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[0].requestRedirect.hostname",
        "wildcard is not allowed",
    );
    for code in [301, 302, 303, 307, 308] {
        assert!(rule(&format!("  - filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: {code}}}}}]\n")).is_empty());
    }
}

#[test]
fn replace_prefix_match_needs_a_single_path_prefix_match() {
    let errs = rule(
        r#"  - matches: [{path: {type: Exact, value: /a}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]
    backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /a}}, {path: {type: PathPrefix, value: /c}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]
  - matches: [{path: {type: Exact, value: /d}}]
    backendRefs:
    - name: v1
      port: 80
      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]
  - matches: [{path: {type: PathPrefix, value: /ok}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]
    backendRefs: [{name: v1, port: 80}]
"#,
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[0].urlRewrite.path",
        "exactly one match, of type PathPrefix",
    );
    assert_error(
        &errs,
        "spec.rules[1].filters[0].requestRedirect.path",
        "exactly one match",
    );
    assert_error(
        &errs,
        "spec.rules[2].backendRefs[0].filters[0].urlRewrite.path",
        "exactly one match",
    );
    assert_eq!(errs.len(), 3, "{errs:#?}");
}

#[test]
fn path_modifier_type_and_value() {
    let errs = rule(
        r#"  - filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /x}}
    backendRefs: [{name: v1, port: 80}]
  - filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath}}
    backendRefs: [{name: v1, port: 80}]
"#,
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
        "must not be set when type is ReplaceFullPath",
    );
    assert_error(
        &errs,
        "spec.rules[1].filters[0].urlRewrite.path.replaceFullPath",
        "required when type is ReplaceFullPath",
    );
}

#[test]
fn mirror_fraction_and_backend() {
    let errs = rule(
        r#"  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: nope, port: 80}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 80}, percent: 101}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 80}, fraction: {numerator: 3, denominator: 2}}}
    backendRefs: [{name: v1, port: 80}]
"#,
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[0].requestMirror.backendRef.name",
        "does not exist",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[1].requestMirror.percent",
        "101 is out of range 0-100",
    );
    assert_error(
        &errs,
        "spec.rules[0].filters[2].requestMirror.fraction",
        "at most the denominator",
    );
}

#[test]
fn timeouts() {
    let errs = rule(
        r#"  - timeouts: {request: 1.5s}
    backendRefs: [{name: v1, port: 80}]
  - timeouts: {request: 1s, backendRequest: 2s}
    backendRefs: [{name: v1, port: 80}]
  - timeouts: {request: 0s, backendRequest: 2s}
    backendRefs: [{name: v1, port: 80}]
  - timeouts: {request: 1h2m, backendRequest: 500ms}
    backendRefs: [{name: v1, port: 80}]
"#,
    );
    assert_error(
        &errs,
        "spec.rules[0].timeouts.request",
        "not a Gateway API duration",
    );
    assert_error(
        &errs,
        "spec.rules[1].timeouts.backendRequest",
        "cannot be longer than request timeout",
    );
    assert_eq!(
        errs.len(),
        2,
        "a 0s request timeout is disabled, so any backendRequest is fine: {errs:#?}"
    );
}

#[test]
fn unsupported_features_are_rejected_not_ignored() {
    let errs = rule("  - retry: {attempts: 3}\n    backendRefs: [{name: v1, port: 80}]\n");
    assert_error(&errs, "spec.rules[0].retry", "not supported");
}

#[test]
fn mesh_policy_capture_and_settings() {
    let errs = errors(
        r#"apiVersion: skiff.dev/v1alpha1
kind: MeshPolicy
metadata: {name: mesh, namespace: skiff-system}
spec:
  capture:
  - {cidr: 10.96.0.0/33, ports: [80]}
  - {cidr: "10.96.0.0/16", ports: [80, "9000-8000", "*", 0, "http"]}
  headers:
    set: {"bad name": x}
  protocolDetectionTimeout: 100us
"#,
    );
    assert_error(&errs, "spec.capture[0].cidr", "prefix length must be 0-32");
    assert_error(&errs, "spec.capture[1].ports[1]", "the range is empty");
    assert_error(&errs, "spec.capture[1].ports[3]", "port 0 is out of range");
    assert_error(&errs, "spec.capture[1].ports[4]", "is not a port");
    assert_error(&errs, "spec.headers.set[\"bad name\"]", "token characters");
    assert_error(
        &errs,
        "spec.protocolDetectionTimeout",
        "not a Gateway API duration",
    );
    assert_eq!(errs.len(), 6, "{errs:#?}");
}

#[test]
fn serde_errors_name_document_and_field() {
    let errs = errors(&format!(
        "{}{}",
        base(),
        http_route("r", "", "  rules:\n  - matches: [{method: FETCH}]\n")
    ));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].field, "spec.rules[0].matches[0].method");
    assert_eq!(errs[0].object, "HTTPRoute shop/r");
    assert_eq!(errs[0].source, "test.yaml#11");
    assert!(
        errs[0].reason.contains("unknown variant `FETCH`"),
        "{}",
        errs[0].reason
    );

    let errs = errors(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n",
    );
    assert_eq!(errs[0].field, "spec.ports[0].port");
    assert_eq!(errs[0].object, "Service default/web");

    let errs = errors(
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: m}\nspec: {failMode: open, captrue: []}\n",
    );
    assert!(
        errs[0].reason.contains("unknown field `captrue`"),
        "{errs:#?}"
    );
    assert_eq!(errs[0].field, "spec.captrue");

    let errs = errors(
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: m}\nspec: {failMode: sideways}\n",
    );
    assert_eq!(errs[0].field, "spec.failMode");
}

#[test]
fn unknown_kind_and_bad_documents() {
    let errs = errors(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n- a list\n---\nkind: Service\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: TCPRoute\nmetadata: {name: t}\n",
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert_eq!(errs[0].source, "test.yaml#1");
    assert_eq!(errs[0].object, "ConfigMap default/c");
    assert!(errs[0].reason.contains("unknown kind ConfigMap"));
    assert_eq!(errs[1].source, "test.yaml#2");
    assert!(errs[1].reason.contains("must be a mapping"));
    assert_error(&errs, "apiVersion", "missing");
    assert_error(
        &errs,
        "apiVersion",
        "is not a supported version of TCPRoute",
    );
}

#[test]
fn endpoint_slice_addresses() {
    let slice = service("web", "10.96.0.1").replace("10.244.0.1", "${BACKEND_web}");
    let errs = errors(&slice);
    assert_error(
        &errs,
        "endpoints[0].addresses[0]",
        "\"${BACKEND_web}\" is not an IPv4 address",
    );
}

#[test]
fn all_errors_are_collected() {
    let errs = errors(&format!(
        "{}{}{}",
        service("web", "not-an-ip"),
        http_route(
            "r",
            "",
            "  hostnames: [\"a.*.com\"]\n  rules:\n  - matches: [{path: {type: Exact, value: x}}]\n    backendRefs: [{name: nope, port: 80, weight: -5}]\n"
        ),
        "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"
    ));
    for field in [
        "spec.clusterIP",
        "spec.hostnames[0]",
        "spec.rules[0].matches[0].path.value",
        "spec.rules[0].backendRefs[0].weight",
        "kind",
    ] {
        assert!(
            errs.iter().any(|e| e.field == field),
            "missing {field}: {errs:#?}"
        );
    }
}

#[test]
fn error_display_is_one_line() {
    let errs = rule("  - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n");
    let line = errs[0].to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.starts_with("HTTPRoute shop/bad (test.yaml#11) spec.rules[0].matches[0].path.value: invalid regular expression"),
        "{line}"
    );
}

#[test]
fn tls_and_tcp_route_rules() {
    let tls = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {{name: t, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 443}}]\n  hostnames: [\"*.*.com\"]\n  rules: []\n",
        base()
    );
    let errs = errors(&tls);
    assert_error(&errs, "spec.parentRefs[0].port", "no port 443");
    assert_error(&errs, "spec.hostnames[0]", "leftmost");
    assert_error(&errs, "spec.rules", "exactly 1 rule");
    let tcp = format!(
        "{}---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {{name: t, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules: [{{backendRefs: []}}]\n",
        base()
    );
    assert_error(
        &errors(&tcp),
        "spec.rules[0].backendRefs",
        "at least 1 backendRef",
    );
}

#[test]
fn authorization_rules_are_validated_and_expanded() {
    let policy = r#"apiVersion: skiff.dev/v1alpha1
kind: MeshPolicy
metadata: {name: authz, namespace: mesh-system}
spec:
  authorization:
    defaults: {h1: Deny, "bad/name": Allow}
    rules:
    - {name: db, action: Deny, to: [10.96.5.0/24, "fd00::/64"], from: [10.201.1.0/24], ports: [5432, "6000-6010"], protocol: TCP}
    - {name: db, action: Allow, to: [10.0.0.0/33], ports: [0]}
    - {name: v6only, action: Allow, from: ["fd00::1"], to: [10.1.0.0/16]}
"#;
    let errs = errors(policy);
    assert_error(
        &errs,
        "spec.authorization.defaults[\"bad/name\"]",
        "interface name",
    );
    assert_error(
        &errs,
        "spec.authorization.rules[1].name",
        "used by another rule",
    );
    assert_error(&errs, "spec.authorization.rules[1].to[0]", "");
    assert_error(&errs, "spec.authorization.rules[1].ports[0]", "");
    assert_error(&errs, "spec.authorization.rules[2].to", "address family");
    assert_eq!(errs.len(), 5, "{errs:#?}");

    let ok = r#"apiVersion: skiff.dev/v1alpha1
kind: MeshPolicy
metadata: {name: authz, namespace: mesh-system}
spec:
  authorization:
    defaults: {h1: Deny}
    rules:
    - {name: db, action: Deny, to: [10.96.5.0/24, "fd00::/64"], from: [10.201.1.0/24], ports: [5432, "6000-6010"], protocol: TCP}
    - {name: web, action: Allow, ports: [80]}
"#;
    let compiled = crate::Compiled::from_yaml(ok, "ok.yaml").expect("valid");
    let a = &compiled.settings().authorization;
    // db: one IPv4 source x the IPv4 destination (the IPv6 one has no IPv4 source) x 2 port
    // ranges; web: one entry.
    assert_eq!(a.rules.len(), 3, "{a:#?}");
    assert_eq!(a.rules[0].key, "mesh-system/authz/db#0");
    assert_eq!(a.rules[0].ports, crate::PortRange::single(5432));
    assert_eq!(a.rules[1].ports, crate::PortRange::new(6000, 6010));
    assert_eq!(a.rules[2].key, "mesh-system/authz/web");
    let h1: crate::InterfaceName = "h1".parse().expect("name");
    assert_eq!(a.defaults.get(&h1), Some(&crate::AuthzAction::Deny));
}

#[test]
fn http_deny_rules_are_validated_and_match_segment_wise() {
    let bad = r#"apiVersion: skiff.dev/v1alpha1
kind: MeshPolicy
metadata: {name: l7, namespace: mesh-system}
spec:
  authorization:
    http:
    - {name: a, paths: [admin]}
    - {name: a, methods: [delete]}
    - {name: everything}
"#;
    let errs = errors(bad);
    assert_error(
        &errs,
        "spec.authorization.http[0].paths[0]",
        "must start with '/'",
    );
    assert_error(
        &errs,
        "spec.authorization.http[1].name",
        "used by another HTTP rule",
    );
    assert_error(&errs, "spec.authorization.http[1].methods[0]", "upper-case");
    assert_error(&errs, "spec.authorization.http[2]", "denies every request");

    let ok = r#"apiVersion: skiff.dev/v1alpha1
kind: MeshPolicy
metadata: {name: l7, namespace: mesh-system}
spec:
  authorization:
    http:
    - {name: no-admin, paths: [/admin/]}
    - {name: no-guest-delete, methods: [DELETE], headers: {X-User: guest}}
"#;
    let compiled = crate::Compiled::from_yaml(ok, "ok.yaml").expect("valid");
    let rules = &compiled.settings().authorization.http;
    let none = |_: &str| None;
    assert!(rules[0].matches("GET", "/admin", none));
    assert!(rules[0].matches("GET", "/admin/x", none));
    assert!(!rules[0].matches("GET", "/administrator", none));
    let guest = |n: &str| (n == "x-user").then(|| "guest".to_string());
    assert!(rules[1].matches("DELETE", "/x", guest));
    assert!(!rules[1].matches("GET", "/x", guest));
    assert!(!rules[1].matches("DELETE", "/x", none));
}
