//! In-process tests of [`mesh_http::Proxy`] over loopback: routing, filters, injected headers,
//! resilience, request smuggling defences, limits, gRPC and upgrades. Each test uses its own
//! `127.<n>.0.0/16` so that tests run in parallel.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::collections::HashMap;
use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_http::{Config, Resilience};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NS: &str = "shop";

fn vip() -> SocketAddr {
    "10.96.0.1:80".parse().unwrap()
}

/// Parent Service `web` (10.96.0.1, endpoint `web_ep`) and backends `v<i>` (10.96.0.1<i>).
fn services(web_ep: SocketAddr, backends: &[(&str, &[SocketAddr])]) -> String {
    let mut out = service("web", NS, "10.96.0.1", &[web_ep]);
    for (i, (name, eps)) in backends.iter().enumerate() {
        out.push_str(&service(name, NS, &format!("10.96.0.{}", 11 + i), eps));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_precedence_and_outcomes() {
    let web = echo("web", lo(1, 0, 1)).await;
    let v1 = echo("v1", lo(1, 0, 11)).await;
    let v2 = echo("v2", lo(1, 0, 12)).await;
    let v3 = echo("v3", lo(1, 0, 13)).await;
    let yaml = services(
        web.addr,
        &[
            ("v1", &[v1.addr]),
            ("v2", &[v2.addr]),
            ("v3", &[v3.addr]),
            ("empty", &[]),
        ],
    ) + &http_route(
        "r",
        NS,
        "web",
        r#"  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
    backendRefs: [{name: v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: version, value: two}]
    backendRefs: [{name: v2, port: 8080}]
  - matches:
    - path: {type: Exact, value: /api/exact}
    backendRefs: [{name: v3, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /q}
      queryParams: [{name: animal, value: whale}]
    backendRefs: [{name: v2, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /q}
    backendRefs: [{name: v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /m}
      method: POST
    backendRefs: [{name: v3, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /m}
    backendRefs: [{name: v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /nobackend}
    backendRefs: [{name: v1, port: 8080, weight: 0}]
  - matches:
    - path: {type: PathPrefix, value: /empty}
    backendRefs: [{name: empty, port: 8080}]
"#,
    );
    let h = harness(&yaml, vip(), false).await;
    let mut c = H1::connect(h.listen).await;
    /// Method, path, headers, expected status and backend.
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        u16,
        Option<&'a str>,
    );
    let cases: &[Case<'_>] = &[
        ("GET", "/api/x", &[], 200, Some("v1")),
        ("GET", "/api/x", &[("Version", "two")], 200, Some("v2")),
        ("GET", "/api/exact", &[("version", "two")], 200, Some("v3")),
        ("GET", "/apix", &[], 404, None),
        ("GET", "/q?animal=whale", &[], 200, Some("v2")),
        ("GET", "/q?animal=dolphin", &[], 200, Some("v1")),
        ("POST", "/m", &[], 200, Some("v3")),
        ("GET", "/m", &[], 200, Some("v1")),
        ("GET", "/nobackend", &[], 500, None),
        ("GET", "/empty", &[], 500, None),
    ];
    for (method, path, headers, status, backend) in cases {
        let a = c
            .send(request(method, "web", path, headers, Bytes::new()))
            .await;
        assert_eq!(a.status, *status, "{method} {path} {headers:?}: {a:?}");
        assert_eq!(a.backend().as_deref(), *backend, "{method} {path}");
        if backend.is_some() {
            assert_eq!(a.json()["path"], *path);
            assert_eq!(a.json()["method"], *method);
        }
    }
    assert!(
        web.requests().is_empty(),
        "the parent's own endpoint is bypassed"
    );

    // A policy reload applies to the next request on the same connection.
    h.policy.replace(compile(&services(web.addr, &[])));
    let a = c.get("web", "/api/x", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.backend().as_deref(),
        Some("web"),
        "no route: the Service itself"
    );

    // A destination that is no Service goes to the destination itself.
    let h2 = harness(&services(web.addr, &[]), v2.addr, false).await;
    let mut c = H1::connect(h2.listen).await;
    assert_eq!(
        c.get("pod", "/", &[]).await.backend().as_deref(),
        Some("v2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_headers_redirects_rewrites_mirrors() {
    let web = echo("web", lo(2, 0, 1)).await;
    let v1 = echo("v1", lo(2, 0, 11)).await;
    let v2 = echo("v2", lo(2, 0, 12)).await;
    let yaml = services(web.addr, &[("v1", &[v1.addr]), ("v2", &[v2.addr])])
        + &http_route(
            "r",
            NS,
            "web",
            r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /hdr}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: set-value}]
        add: [{name: X-Add, value: added}]
        remove: [X-Remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Resp-Set, value: resp}]
        add: [{name: X-Resp-Add, value: more}]
        remove: [X-Backend]
    backendRefs: [{name: v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.org, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-Redirected, value: "yes"}]}
  - matches: [{path: {type: PathPrefix, value: /scheme}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https}
  - matches: [{path: {type: PathPrefix, value: /rewrite}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}
    backendRefs: [{name: v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: v2, port: 8080}}
    backendRefs: [{name: v1, port: 8080}]
"#,
        );
    let h = harness(&yaml, vip(), false).await;
    let mut c = H1::connect(h.listen).await;

    let a = c
        .get(
            "web",
            "/hdr",
            &[
                ("x-set", "old"),
                ("X-Add", "first"),
                ("x-remove", "gone"),
                ("X-Echo-Set-Header", "X-Resp-Add:from-backend"),
            ],
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.seen_header("x-set").as_deref(), Some("set-value"));
    assert_eq!(a.seen_header("x-add").as_deref(), Some("first,added"));
    assert_eq!(a.seen_header("x-remove"), None);
    assert_eq!(a.header("x-resp-set").as_deref(), Some("resp"));
    assert_eq!(a.header("x-resp-add").as_deref(), Some("from-backend,more"));
    assert_eq!(a.header("x-backend"), None);

    let a = c.get("web:80", "/redirect/x?q=1", &[]).await;
    assert_eq!(a.status, 301);
    assert_eq!(
        a.header("location").as_deref(),
        Some("http://example.org/new/x?q=1")
    );
    assert_eq!(a.header("x-redirected").as_deref(), Some("yes"));
    let a = c.get("web", "/scheme", &[]).await;
    assert_eq!(a.status, 302);
    assert_eq!(a.header("location").as_deref(), Some("https://web/scheme"));

    let a = c.get("web", "/rewrite/two?x=y", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["path"], "/one/two?x=y");
    assert_eq!(a.seen_header("host").as_deref(), Some("rewritten.example"));

    let a = c.get("web", "/mirror?id=1", &[]).await;
    assert_eq!(a.backend().as_deref(), Some("v1"));
    // A POST with a small body is mirrored with its body.
    let a = c
        .send(request(
            "POST",
            "web",
            "/mirror?id=2",
            &[],
            Bytes::from_static(b"payload"),
        ))
        .await;
    assert_eq!(a.json()["body_len"], 7);
    let deadline = Instant::now() + Duration::from_secs(3);
    while v2.count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mirrored = v2.requests();
    assert_eq!(mirrored.len(), 2, "{mirrored:?}");
    assert!(mirrored.iter().any(|s| s.path == "/mirror?id=1"));
    assert!(
        mirrored
            .iter()
            .any(|s| s.path == "/mirror?id=2" && &s.body[..] == b"payload")
    );
    assert_eq!(h.proxy.stats().snapshot().mirrors, 2);
}

fn check_traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_headers_per_request_h1_and_h2() {
    let web = echo("web", lo(3, 0, 1)).await;
    let yaml = services(web.addr, &[]);
    for h2 in [false, true] {
        let h = harness(&yaml, vip(), h2).await;
        let mut h1c = if h2 {
            None
        } else {
            Some(H1::connect(h.listen).await)
        };
        let mut h2c = if h2 {
            Some(H2::connect(h.listen).await)
        } else {
            None
        };
        let mut ids = HashSet::new();
        let mut traces = HashSet::new();
        for i in 0..50 {
            let mut headers = vec![("tracestate", "vendor=1")];
            let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            if i % 2 == 0 {
                headers.push(("traceparent", incoming));
            }
            if i % 5 == 0 {
                headers.push(("x-request-id", "client-id"));
            }
            let uri = if h2 { "http://web/x" } else { "/x" };
            let req = request(
                "GET",
                if h2 { "" } else { "web" },
                uri,
                &headers,
                Bytes::new(),
            );
            let a = match (&mut h1c, &mut h2c) {
                (Some(c), _) => c.send(req).await,
                (_, Some(c)) => c.send(req).await,
                _ => unreachable!(),
            };
            assert_eq!(a.status, 200, "{a:?}");
            let id = a.seen_header("x-request-id").unwrap();
            if i % 5 == 0 {
                assert_eq!(id, "client-id");
            } else {
                assert_eq!(id.len(), 36, "{id}");
                assert!(ids.insert(id), "request ids are unique");
            }
            let (trace, span, flags) = check_traceparent(&a.seen_header("traceparent").unwrap());
            if i % 2 == 0 {
                assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
                assert_ne!(span, "00f067aa0ba902b7");
                assert_eq!(flags, "01");
            } else {
                assert!(traces.insert(trace), "new traces are new");
                assert_eq!(flags, "01");
            }
            assert_eq!(a.seen_header("tracestate").as_deref(), Some("vendor=1"));
            assert_eq!(
                a.seen_header("x-forwarded-for").as_deref(),
                Some("127.0.0.1")
            );
            assert_eq!(a.seen_header("x-forwarded-proto").as_deref(), Some("http"));
        }
        let requests = web.requests().len();
        assert!(requests >= 50);
        web.seen.lock().unwrap().clear();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_policy_header_settings() {
    let web = echo("web", lo(4, 0, 1)).await;
    let yaml = services(web.addr, &[])
        + "---\napiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: mesh, namespace: skiff}\nspec:\n  headers: {requestId: false, traceContext: false, forwarded: false, set: {X-Mesh: skiff}}\n";
    let h = harness(&yaml, vip(), false).await;
    let mut c = H1::connect(h.listen).await;
    let a = c.get("web", "/", &[("x-mesh", "client")]).await;
    assert_eq!(a.seen_header("x-mesh").as_deref(), Some("skiff"));
    for absent in [
        "x-request-id",
        "traceparent",
        "x-forwarded-for",
        "x-forwarded-proto",
    ] {
        assert_eq!(a.seen_header(absent), None, "{absent}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_within_five_percent() {
    let web = echo("web", lo(5, 0, 1)).await;
    let v1 = echo("v1", lo(5, 0, 11)).await;
    let v2 = echo("v2", lo(5, 0, 12)).await;
    let v3 = echo("v3", lo(5, 0, 13)).await;
    let yaml = services(
        web.addr,
        &[("v1", &[v1.addr]), ("v2", &[v2.addr]), ("v3", &[v3.addr])],
    ) + &http_route(
        "r",
        NS,
        "web",
        "  rules:\n  - backendRefs:\n    - {name: v1, port: 8080, weight: 70}\n    - {name: v2, port: 8080, weight: 30}\n    - {name: v3, port: 8080, weight: 0}\n",
    );
    let h = harness(&yaml, vip(), false).await;
    let mut c = H1::connect(h.listen).await;
    let mut counts: HashMap<String, u32> = HashMap::new();
    let n = 2000;
    for _ in 0..n {
        let a = c.get("web", "/", &[]).await;
        *counts.entry(a.backend().unwrap()).or_default() += 1;
    }
    let share = |b: &str| f64::from(counts.get(b).copied().unwrap_or(0)) / f64::from(n);
    assert!((share("v1") - 0.7).abs() < 0.05, "{counts:?}");
    assert!((share("v2") - 0.3).abs() < 0.05, "{counts:?}");
    assert_eq!(share("v3"), 0.0);
}

/// An address on which nothing listens.
async fn dead_addr(ip: [u8; 4]) -> SocketAddr {
    let l = TcpListener::bind(SocketAddr::from((ip, 8080)))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_dead_endpoint_within_budget() {
    let web = echo("web", lo(6, 0, 1)).await;
    let good = echo("good", lo(6, 0, 2)).await;
    let dead = dead_addr([127, 6, 0, 3]).await;
    let yaml = service("web", NS, "10.96.0.1", &[dead, good.addr]);
    let _ = web;
    let resilience = Resilience {
        consecutive_failures: u32::MAX,
        ..Resilience::default()
    };
    let h = harness_with(&yaml, vip(), false, Config::default(), resilience).await;
    let mut c = H1::connect(h.listen).await;
    for _ in 0..40 {
        let a = c.get("web", "/", &[]).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.backend().as_deref(), Some("good"));
    }
    let stats = h.proxy.stats().snapshot();
    assert!(stats.retries > 0, "{stats:?}");
    assert_eq!(stats.retries, stats.upstream_errors, "{stats:?}");
    // 40 requests: at most max(20% of 40, 3/s over 10 s) = 30 retries.
    assert!(stats.retries <= 30, "{stats:?}");

    // Only a dead endpoint: every request fails, and retries stop at the budget.
    let yaml = service("web", NS, "10.96.0.1", &[dead]);
    let h = harness(&yaml, vip(), false).await;
    let mut c = H1::connect(h.listen).await;
    for _ in 0..100 {
        assert_eq!(c.get("web", "/", &[]).await.status, 503);
    }
    let stats = h.proxy.stats().snapshot();
    assert!(stats.retries <= 30, "{stats:?}");
    assert!(stats.retries_over_budget > 0, "{stats:?}");
    assert_eq!(stats.ejections, 0, "the last endpoint is never ejected");

    // A POST with a body that was not buffered is not retried on a reset, but a connect
    // failure retries bodiless requests of any method.
    let yaml = service("web", NS, "10.96.0.1", &[dead, good.addr]);
    let h = harness_with(
        &yaml,
        vip(),
        false,
        Config::default(),
        Resilience {
            consecutive_failures: u32::MAX,
            ..Resilience::default()
        },
    )
    .await;
    let mut c = H1::connect(h.listen).await;
    for _ in 0..10 {
        let a = c.send(request("POST", "web", "/", &[], Bytes::new())).await;
        assert_eq!(a.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_status_when_configured() {
    let bad = echo("bad", lo(7, 0, 1)).await;
    let good = echo("good", lo(7, 0, 2)).await;
    bad.fail_with.store(503, Ordering::Relaxed);
    let yaml = service("web", NS, "10.96.0.1", &[bad.addr, good.addr]);
    let resilience = Resilience {
        retry_on_status: vec![502, 503, 504],
        consecutive_failures: u32::MAX,
        ..Resilience::default()
    };
    let h = harness_with(&yaml, vip(), false, Config::default(), resilience).await;
    let mut c = H1::connect(h.listen).await;
    for _ in 0..20 {
        assert_eq!(c.get("web", "/", &[]).await.status, 200);
    }
    // POST is not idempotent: a 503 is passed through.
    let mut saw_503 = false;
    for _ in 0..20 {
        let a = c.send(request("POST", "web", "/", &[], Bytes::new())).await;
        saw_503 |= a.status == 503;
    }
    assert!(saw_503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_backend_timeouts_answer_504() {
    let web = echo("web", lo(8, 0, 1)).await;
    let v1 = echo("v1", lo(8, 0, 11)).await;
    let yaml = services(web.addr, &[("v1", &[v1.addr])])
        + &http_route(
            "r",
            NS,
            "web",
            r#"  rules:
  - matches: [{path: {type: PathPrefix, value: /request}}]
    backendRefs: [{name: v1, port: 8080}]
    timeouts: {request: 200ms}
  - matches: [{path: {type: PathPrefix, value: /backend}}]
    backendRefs: [{name: v1, port: 8080}]
    timeouts: {backendRequest: 200ms}
  - matches: [{path: {type: PathPrefix, value: /off}}]
    backendRefs: [{name: v1, port: 8080}]
    timeouts: {request: 0s}
"#,
        );
    let h = harness(&yaml, vip(), false).await;
    let mut c = H1::connect(h.listen).await;
    for path in ["/request?delay=2s", "/backend?delay=2s"] {
        let start = Instant::now();
        let a = c.get("web", path, &[]).await;
        let took = start.elapsed();
        assert_eq!(a.status, 504, "{path}");
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }
    assert_eq!(c.get("web", "/request?delay=10ms", &[]).await.status, 200);
    assert_eq!(c.get("web", "/off?delay=400ms", &[]).await.status, 200);
    assert_eq!(h.proxy.stats().snapshot().timeouts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejected_endpoint_returns_after_backoff() {
    let a_ep = echo("a", lo(9, 0, 1)).await;
    let b_ep = echo("b", lo(9, 0, 2)).await;
    a_ep.fail_with.store(500, Ordering::Relaxed);
    let yaml = service("web", NS, "10.96.0.1", &[a_ep.addr, b_ep.addr]);
    let resilience = Resilience {
        base_ejection: Duration::from_millis(300),
        max_ejection: Duration::from_secs(2),
        ..Resilience::default()
    };
    let h = harness_with(&yaml, vip(), false, Config::default(), resilience).await;
    let mut c = H1::connect(h.listen).await;
    let mut failures = 0;
    for _ in 0..60 {
        if c.get("web", "/", &[]).await.status == 500 {
            failures += 1;
        }
    }
    assert_eq!(failures, 5, "five failures eject the endpoint");
    assert_eq!(h.proxy.stats().snapshot().ejections, 1);
    let a_before = a_ep.count();
    a_ep.fail_with.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(350)).await;
    for _ in 0..40 {
        assert_eq!(c.get("web", "/", &[]).await.status, 200);
    }
    assert!(
        a_ep.count() > a_before,
        "the endpoint is back after the backoff"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_is_refused_before_any_backend() {
    let web = echo("web", lo(10, 0, 1)).await;
    let yaml = services(web.addr, &[]);
    let h = harness(&yaml, vip(), false).await;
    let corpus: &[&[u8]] = &[
        // CL.TE and TE.CL
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        // TE.TE obfuscations
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding:\tchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding\r\n: chunked\r\n\r\n0\r\n\r\n",
        // Content-Length games
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4, 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 0x10\r\n\r\n",
        // obs-fold, bare LF, bare CR, invalid names and values
        b"GET / HTTP/1.1\r\nHost: web\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\nHost: web\n\n",
        b"GET / HTTP/1.1\r\nHost: web\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\rX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nBad Name: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\nX: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: web\r\n\x7fX: y\r\n\r\n",
    ];
    for raw in corpus {
        let answer = raw_exchange(h.listen, raw).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{:?} -> {answer:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // A smuggled request after a legitimate one on the same connection.
    let answer = raw_exchange(
        h.listen,
        b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\nPOST / HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    // After an Upgrade head the scanner stops; a declined upgrade closes the connection so
    // that an unchecked head can never follow.
    let answer = raw_exchange(
        h.listen,
        b"GET /ok HTTP/1.1\r\nHost: web\r\nUpgrade: foo\r\n\r\nGET /second HTTP/1.1\r\nHost: web\nX: y\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    let seen = web.requests();
    assert_eq!(
        seen.len(),
        2,
        "only the legitimate requests arrived: {seen:?}"
    );
    assert!(seen.iter().all(|s| s.path == "/ok"));
    assert!(h.proxy.stats().snapshot().rejected_requests >= corpus.len() as u64);
    let results = h.results.lock().unwrap().clone();
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(e) if e.contains("sent a malformed request")))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_framing_pipelining_and_expect_continue() {
    let web = echo("web", lo(11, 0, 1)).await;
    let yaml = services(web.addr, &[]);
    let h = harness(&yaml, vip(), false).await;
    // Pipelined: a chunked POST (with a LF inside the data), a CL POST, a GET.
    let answer = raw_exchange(
        h.listen,
        b"POST /a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\na\nb\r\n0\r\n\r\n\
          POST /b HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\nhi\
          GET /c HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 3, "{answer}");
    let seen = web.requests();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/a", "/b", "/c"]);
    assert_eq!(&seen[0].body[..], b"a\nb");
    assert_eq!(&seen[1].body[..], b"hi");
    assert!(
        !seen[2].headers.iter().any(|(n, _)| n == "connection"),
        "hop-by-hop headers are removed"
    );

    // Expect: 100-continue gets its interim answer before the body is sent.
    let mut s = TcpStream::connect(h.listen).await.unwrap();
    s.write_all(
        b"POST /e HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"));
    s.write_all(b"body").await.unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("\"body_len\":4") {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_answer_431() {
    let web = echo("web", lo(12, 0, 1)).await;
    let yaml = services(web.addr, &[]);
    let h = harness(&yaml, vip(), false).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let answer = raw_exchange(h.listen, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let mut many = String::from("GET / HTTP/1.1\r\nHost: web\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(h.listen, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(web.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_and_idle_timeouts_close() {
    let web = echo("web", lo(13, 0, 1)).await;
    let yaml = services(web.addr, &[]);
    let config = Config {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..Config::default()
    };
    let h = harness_with(&yaml, vip(), false, config, Resilience::default()).await;
    // A head that never finishes: closed without a response.
    let start = Instant::now();
    let answer = raw_exchange(h.listen, b"GET / HTTP/1.1\r\nHost: web\r\n").await;
    assert_eq!(answer, "");
    assert!(start.elapsed() < Duration::from_millis(1500));
    // An idle keep-alive connection lives past the header timeout, then closes.
    let mut c = H1::connect(h.listen).await;
    assert_eq!(c.get("web", "/", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.get("web", "/", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(c.is_closed(), "idle connection closed");
    assert_eq!(h.proxy.stats().snapshot().header_timeouts, 1);
}

async fn grpc_backend(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let te = req.headers().get("te").cloned();
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        trailers.insert("grpc-message", "ok".parse().unwrap());
                        let reply = format!("{path}|{authority}|{}|{:?}", body.len(), te);
                        let body = Full::new(Bytes::from(reply))
                            .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) });
                        let mut response = http::Response::new(body);
                        response
                            .headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        Ok::<_, Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2_passes_trailers_and_routes() {
    let grpc_ep = lo(14, 0, 1);
    grpc_backend(grpc_ep).await;
    let other = lo(14, 0, 2);
    grpc_backend(other).await;
    let yaml = service("greeter", NS, "10.96.0.1", &[grpc_ep])
        + &service("other", NS, "10.96.0.2", &[other])
        + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: greeter, port: 80}]\n  rules:\n  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]\n    backendRefs: [{name: other, port: 8080}]\n";
    let h = harness(&yaml, vip(), true).await;
    let mut c = H2::connect(h.listen).await;
    for (path, status) in [
        ("/helloworld.Greeter/SayHello", Some("0")),
        ("/helloworld.Greeter/Unknown", Some("12")),
    ] {
        let req = request(
            "POST",
            "",
            &format!("http://greeter.shop:80{path}"),
            &[("content-type", "application/grpc"), ("te", "trailers")],
            Bytes::from_static(b"\0\0\0\0\x05hello"),
        );
        let a = c.send(req).await;
        assert_eq!(a.status, 200);
        let grpc_status = a
            .trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| a.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(grpc_status.as_deref(), status, "{path}: {a:?}");
        if status == Some("0") {
            let body = String::from_utf8_lossy(&a.body).into_owned();
            assert_eq!(
                body,
                format!("{path}|greeter.shop:80|10|Some(\"trailers\")")
            );
        }
    }
}

/// A raw HTTP/1 backend that answers the first request head with `answer` when the head
/// starts with `expect`, then echoes bytes upper-cased.
async fn upgrade_backend(addr: SocketAddr) {
    tunnel_backend(
        addr,
        "get /chat",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
}

async fn tunnel_backend(addr: SocketAddr, expect: &'static str, answer: &'static [u8]) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with(expect), "{head}");
        s.write_all(answer).await.unwrap();
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            let upper = buf[..n].to_ascii_uppercase();
            s.write_all(&upper).await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_bytes_both_ways() {
    let ep = lo(15, 0, 1);
    upgrade_backend(ep).await;
    let yaml = service("ws", NS, "10.96.0.1", &[ep]);
    let h = harness(&yaml, vip(), false).await;
    let s = TcpStream::connect(h.listen).await.unwrap();
    tunnel_roundtrip(
        s,
        b"GET /chat HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        "http/1.1 101",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_pass_through() {
    let ep = lo(16, 0, 1);
    tunnel_backend(
        ep,
        "connect example.com:443 http/1.1",
        b"HTTP/1.1 200 Connection Established\r\n\r\n",
    )
    .await;
    let yaml = service("proxy", NS, "10.96.0.1", &[ep]);
    let h = harness(&yaml, vip(), false).await;
    let s = TcpStream::connect(h.listen).await.unwrap();
    tunnel_roundtrip(
        s,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "http/1.1 200",
    )
    .await;
}

/// Sends `head`, expects an answer starting with `want`, then checks that bytes go both ways.
async fn tunnel_roundtrip(mut s: TcpStream, request: &[u8], want: &str) {
    s.write_all(request).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with(want), "{head}");
    if want.contains("101") {
        assert!(head.contains("upgrade: websocket"), "{head}");
    }
    for word in [&b"hello"[..], b"\r\n\x00raw bytes\n"] {
        s.write_all(word).await.unwrap();
        let mut got = vec![0u8; word.len()];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, word.to_ascii_uppercase());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_header_list_limit_answers_431() {
    let web = echo("web", lo(17, 0, 1)).await;
    let yaml = services(web.addr, &[]);
    let h = harness(&yaml, vip(), true).await;
    let mut c = H2::connect(h.listen).await;
    let big = "a".repeat(70 * 1024);
    let a = c
        .send(request(
            "GET",
            "",
            "http://web/",
            &[("x-big", &big)],
            Bytes::new(),
        ))
        .await;
    assert_eq!(a.status, 431);
    // The connection survives: the next stream works.
    let a = c
        .send(request("GET", "", "http://web/", &[], Bytes::new()))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(web.count(), 1);
}

/// A backend that answers by path, in the framings a real server may choose, and can close
/// a kept-alive connection without saying so (as servers do with idle connections).
async fn framings_backend(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let line = head.lines().next().unwrap_or_default().to_owned();
                    let (answer, then_close): (&[u8], bool) = match line.as_str() {
                        "get /chunked http/1.1" => (
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                              5;x=y\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
                            false,
                        ),
                        "head /len http/1.1" => {
                            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", false)
                        }
                        "get /once http/1.1" => {
                            (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce", true)
                        }
                        "get /close http/1.1" => (b"HTTP/1.1 200 OK\r\n\r\nuntil-close", true),
                        "get /chat http/1.1" => {
                            s.write_all(
                                b"HTTP/1.1 101 Switching Protocols\r\n\
                                  Connection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                            )
                            .await
                            .unwrap();
                            let mut buf = [0u8; 64];
                            while let Ok(n) = s.read(&mut buf).await
                                && n > 0
                            {
                                s.write_all(&buf[..n].to_ascii_uppercase()).await.unwrap();
                            }
                            return;
                        }
                        _ => (
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                            false,
                        ),
                    };
                    if s.write_all(answer).await.is_err() || then_close {
                        return;
                    }
                }
            });
        }
    });
}

/// Reads from `s` until `text` has arrived; returns all that was read.
async fn read_until(s: &mut TcpStream, text: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(text) {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "waiting for {text:?}, got {:?}",
                    String::from_utf8_lossy(&out)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "closed before {text:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One kept-alive client connection through the HTTP/1 fast path: a chunked response passes
/// with its trailers, a HEAD answer has no body, an upstream connection the backend closed
/// while pooled is replaced without an error, and an upgrade on the same connection (left to
/// hyper) still works; a close-delimited response closes the client connection after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_framings_stale_connections_and_handoff() {
    let ep = lo(41, 0, 1);
    framings_backend(ep).await;
    let yaml = service("fr", NS, "10.96.0.1", &[ep]);
    let h = harness(&yaml, vip(), false).await;
    let mut s = TcpStream::connect(h.listen).await.unwrap();

    s.write_all(b"GET /chunked HTTP/1.1\r\nHost: fr\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut s, "0\r\nx-t: 1\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("transfer-encoding: chunked\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\n\r\n5;x=y\r\nhello\r\n"), "{answer}");

    s.write_all(b"HEAD /len HTTP/1.1\r\nHost: fr\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until(&mut s, "\r\n\r\n").await;
    assert!(answer.contains("content-length: 10\r\n"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n"),
        "no body after a HEAD answer: {answer}"
    );

    for round in 0..3 {
        s.write_all(b"GET /once HTTP/1.1\r\nHost: fr\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(&mut s, "once").await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer}"
        );
        // Give the backend's FIN time to arrive, as with a server's idle timeout.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: fr\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = read_until(&mut s, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    s.write_all(b"after upgrade").await.unwrap();
    read_until(&mut s, "AFTER UPGRADE").await;

    let answer = raw_exchange(h.listen, b"GET /close HTTP/1.1\r\nHost: fr\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nuntil-close"), "{answer}");
    assert_eq!(h.proxy.stats().snapshot().upstream_errors, 0);
}
