//! Route lookup cost against policy size: 10, 1,000 and 10,000 HTTPRoutes and TLSRoutes on one
//! Service, generated as YAML and compiled once per size.
//!
//! * `route_http/hit_last`: a request matching the route generated last (the end of the list).
//! * `route_http/miss`: a request no route matches (404).
//! * `route_tls/exact` and `route_tls/wildcard`: SNI lookups claimed by the last route.
//! * `compile/1000`: validating and compiling 1,000 + 1,000 routes.
//!
//! Lookups should stay flat as the policy grows: hostnames and Exact/PathPrefix paths are hash
//! lookups.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_policy::{Compiled, HttpOutcome, Object, RequestParts, parse_documents};

const SIZES: [usize; 3] = [10, 1_000, 10_000];

fn service(yaml: &mut String, name: &str, vip: &str, endpoint: &str) {
    let _ = write!(
        yaml,
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: bench}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: tls, port: 443, targetPort: 8443}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: bench
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: tls, port: 8443}}]
endpoints: [{{addresses: ["{endpoint}"]}}]
"#
    );
}

/// `n` HTTPRoutes and `n` TLSRoutes on Service `web`.
fn objects(n: usize) -> Vec<Object> {
    let mut yaml = String::new();
    service(&mut yaml, "web", "10.96.0.1", "10.244.0.1");
    service(&mut yaml, "backend", "10.96.0.2", "10.244.0.2");
    for i in 0..n {
        let _ = write!(
            yaml,
            r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: http-{i:05}, namespace: bench}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
  - matches:
    - path: {{type: PathPrefix, value: /svc-{i}/api}}
      headers: [{{name: x-tenant, value: t{i}}}]
    - path: {{type: Exact, value: /svc-{i}/health}}
    backendRefs: [{{name: backend, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {{name: tls-{i:05}, namespace: bench}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 443}}]
  hostnames: [host-{i}.example.com, "*.w{i}.example.com"]
  rules: [{{backendRefs: [{{name: backend, port: 443}}]}}]
"#
        );
    }
    match parse_documents(&yaml, "bench.yaml") {
        Ok(objects) => objects,
        Err(errors) => panic!("bench policy does not parse: {errors:?}"),
    }
}

fn compiled(n: usize) -> Compiled {
    match Compiled::compile(&objects(n)) {
        Ok(compiled) => compiled,
        Err(errors) => panic!("bench policy does not compile: {errors:?}"),
    }
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
}

fn lookups(c: &mut Criterion) {
    let http_dst: SocketAddr = "10.96.0.1:80".parse().expect("address");
    let tls_dst: SocketAddr = "10.96.0.1:443".parse().expect("address");
    let policies: Vec<(usize, Compiled)> = SIZES.iter().map(|&n| (n, compiled(n))).collect();

    let mut group = c.benchmark_group("route_http");
    configure(&mut group);
    for (n, policy) in &policies {
        let last = n - 1;
        let path = format!("/svc-{last}/api/items?page=2");
        let tenant = format!("t{last}");
        let headers = [
            ("accept", "application/json"),
            ("x-tenant", tenant.as_str()),
        ];
        let hit = RequestParts {
            method: "GET",
            host: "web.bench.svc.cluster.local:80",
            path: &path,
            headers: &headers,
        };
        assert!(matches!(
            policy.route_http(http_dst, &hit),
            HttpOutcome::Matched(_)
        ));
        group.bench_with_input(BenchmarkId::new("hit_last", n), &hit, |b, request| {
            b.iter(|| black_box(policy.route_http(black_box(http_dst), black_box(request))));
        });
        let miss = RequestParts {
            path: "/nothing/here",
            ..hit
        };
        assert!(matches!(
            policy.route_http(http_dst, &miss),
            HttpOutcome::NotFound
        ));
        group.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, request| {
            b.iter(|| black_box(policy.route_http(black_box(http_dst), black_box(request))));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("route_tls");
    configure(&mut group);
    for (n, policy) in &policies {
        let last = n - 1;
        let exact = format!("host-{last}.example.com");
        let wildcard = format!("api.eu.w{last}.example.com");
        assert!(policy.route_tls(tls_dst, Some(&exact)).is_some());
        assert!(policy.route_tls(tls_dst, Some(&wildcard)).is_some());
        group.bench_with_input(BenchmarkId::new("exact", n), &exact, |b, sni| {
            b.iter(|| black_box(policy.route_tls(black_box(tls_dst), Some(black_box(sni)))));
        });
        group.bench_with_input(BenchmarkId::new("wildcard", n), &wildcard, |b, sni| {
            b.iter(|| black_box(policy.route_tls(black_box(tls_dst), Some(black_box(sni)))));
        });
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let objects = objects(1_000);
    let mut group = c.benchmark_group("compile");
    configure(&mut group);
    group.sample_size(10);
    group.bench_function("1000", |b| {
        b.iter(|| black_box(Compiled::compile(black_box(&objects)).is_ok()));
    });
    group.finish();
}

criterion_group!(benches, lookups, compile);
criterion_main!(benches);
