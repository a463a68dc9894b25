//! Per-request cost of the HTTP layer (`mesh-http`). Route matching itself is measured in
//! `routes.rs`; this covers what the proxy adds around it:
//!
//! * `inject/*`: header injection (`x-request-id`, `traceparent`, `x-forwarded-*`, fixed
//!   headers) on a typical browser/service request header map, with and without incoming
//!   request id and trace context;
//! * `proxy/h1_get`: one full HTTP/1.1 GET through [`mesh_http::Proxy`] on a keep-alive
//!   loopback connection (routing with an HTTPRoute, a header modifier, injection, endpoint
//!   pick, pooled upstream connection, access log) to a loopback hyper backend, against
//!   `proxy/direct_get`, the same GET straight to the backend.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mesh_http::{Config, Proxy, headers};
use mesh_policy::{Compiled, HeaderDefaults, PolicyStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

fn typical_headers(with_context: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    let pairs = [
        ("host", "web.shop.svc.cluster.local"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        ("content-type", "application/json"),
        (
            "authorization",
            "Bearer eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG_HACGpVUMN_a9IV7pAx_Zmeo",
        ),
        ("cookie", "session=3f9a1c; theme=dark"),
        ("x-forwarded-for", "203.0.113.7"),
    ];
    for (k, v) in pairs {
        h.append(k, HeaderValue::from_static(v));
    }
    if with_context {
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
        h.insert(
            "x-request-id",
            HeaderValue::from_static("0f8fad5b-d9cb-469f-a165-70867728950e"),
        );
    }
    h
}

fn injection(c: &mut Criterion) {
    let mut group = c.benchmark_group("inject");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let defaults = HeaderDefaults {
        set: vec![("x-mesh".into(), "skiff".into())],
        ..HeaderDefaults::default()
    };
    let client = IpAddr::from([10, 244, 1, 17]);
    for (name, with_context) in [("new_context", false), ("propagate", true)] {
        let headers = typical_headers(with_context);
        group.bench_function(name, |b| {
            b.iter_batched(
                || headers.clone(),
                |mut h| {
                    black_box(headers::inject(&mut h, &defaults, client));
                    h
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn policy(endpoint: SocketAddr) -> Compiled {
    let yaml = format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 10.96.0.1
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints: [{{addresses: ["{ip}"]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: x-route, value: api}}]}}
    backendRefs: [{{name: web, port: 80}}]
"#,
        port = endpoint.port(),
        ip = endpoint.ip()
    );
    match Compiled::from_yaml(&yaml, "bench.yaml") {
        Ok(compiled) => compiled,
        Err(errors) => panic!("bench policy: {errors:?}"),
    }
}

async fn client(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>) {
    let request = Request::builder()
        .uri("/api/items?page=2")
        .header("host", "web.shop")
        .header("accept", "application/json")
        .body(Empty::new())
        .expect("request");
    sender.ready().await.expect("ready");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200, "{response:?}");
    let body = response.into_body().collect().await.expect("body");
    black_box(body.to_bytes());
}

fn full_request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut direct, mut proxied) = rt.block_on(setup());
    let mut group = c.benchmark_group("proxy");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("direct_get", |b| {
        b.iter(|| rt.block_on(get(&mut direct)));
    });
    group.bench_function("h1_get", |b| {
        b.iter(|| rt.block_on(get(&mut proxied)));
    });
    group.finish();
    drop_runtime(rt);
}

async fn setup() -> (SendRequest<Empty<Bytes>>, SendRequest<Empty<Bytes>>) {
    let backend = backend().await;
    let store = Arc::new(PolicyStore::new(policy(backend)));
    let proxy = Proxy::new(Config::default(), store);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let listen = listener.local_addr().expect("proxy address");
    let dst: SocketAddr = "10.96.0.1:80".parse().expect("vip");
    tokio::spawn(async move {
        while let Ok((stream, src)) = listener.accept().await {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let _ = proxy.serve(stream, Vec::new(), src, dst, false).await;
            });
        }
    });
    (client(backend).await, client(listen).await)
}

fn drop_runtime(rt: Runtime) {
    rt.shutdown_timeout(Duration::from_millis(100));
}

criterion_group!(benches, injection, full_request);
criterion_main!(benches);
