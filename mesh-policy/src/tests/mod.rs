//! Crate-level tests: validation field paths, precedence, lookups, and the shared conformance
//! cases.

mod conformance;
mod grpc;
mod http;
mod l4;
mod loading;
mod mtls;
mod services;
mod status;
mod validation;

use std::net::SocketAddr;

use crate::{
    Compiled, HttpOutcome, RequestParts, ValidationError, parse_documents_partial, validate,
};

/// Namespace used by the fixtures.
pub(crate) const NS: &str = "shop";

/// A Service with ports `http` (80 -> 8080) and `http-alt` (8080 -> 8080), and its EndpointSlice
/// with one ready endpoint: the VIP with `10.96.` replaced by `10.244.`.
pub(crate) fn service(name: &str, vip: &str) -> String {
    let endpoint = vip.replacen("10.96.", "10.244.", 1);
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NS}
spec:
  clusterIP: {vip}
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - name: http-alt
    port: 8080
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {NS}
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  port: 8080
- name: http-alt
  port: 8080
endpoints:
- addresses: ["{endpoint}"]
  conditions:
    ready: true
"#
    )
}

/// The standard fixture: Services `web` (parent, 10.96.0.1) and `v1`..`v4` (backends).
pub(crate) fn base() -> String {
    [
        service("web", "10.96.0.1"),
        service("v1", "10.96.0.11"),
        service("v2", "10.96.0.12"),
        service("v3", "10.96.0.13"),
        service("v4", "10.96.0.14"),
    ]
    .concat()
}

/// An HTTPRoute on `web:80` with the given extra metadata lines and spec body (indented two
/// spaces, after `parentRefs`).
pub(crate) fn http_route(name: &str, metadata: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: {NS}\n{metadata}spec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: web, port: 80}}\n{spec}"
    )
}

pub(crate) fn compile(yaml: &str) -> Compiled {
    match Compiled::from_yaml(yaml, "test.yaml") {
        Ok(compiled) => compiled,
        Err(errors) => panic!(
            "policy should compile:\n{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// All errors of a policy, from parsing or validation.
pub(crate) fn errors(yaml: &str) -> Vec<ValidationError> {
    let (objects, mut errors) = parse_documents_partial(yaml, "test.yaml");
    errors.extend(validate(&objects));
    errors
}

/// Asserts that some error has exactly this field and a reason containing `reason`.
#[track_caller]
pub(crate) fn assert_error(errors: &[ValidationError], field: &str, reason: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.reason.contains(reason)),
        "expected an error at {field:?} containing {reason:?}, got:\n{}",
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

pub(crate) fn web() -> SocketAddr {
    addr("10.96.0.1:80")
}

/// `(route name, first backend service)` of an HTTP outcome; `("404", "")` for NotFound and
/// `("none", "")` for NoRoutes.
pub(crate) fn outcome(o: HttpOutcome<'_>) -> (String, String) {
    match o {
        HttpOutcome::NoRoutes => ("none".into(), String::new()),
        HttpOutcome::NotFound => ("404".into(), String::new()),
        HttpOutcome::Matched(d) => (
            d.route.name.clone(),
            d.backends()
                .first()
                .map(|b| b.service.name.clone())
                .unwrap_or_default(),
        ),
    }
}

/// Backend service name chosen for a GET with the given host, path and headers.
pub(crate) fn route(
    compiled: &Compiled,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    let request = RequestParts {
        method,
        host,
        path,
        headers,
    };
    let (route, backend) = outcome(compiled.route_http(web(), &request));
    if backend.is_empty() { route } else { backend }
}
