//! HTTP and gRPC through the agent, with real clients (curl, h2load, Python gRPC) and backends,
//! in network namespaces.
use std::{
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    path::PathBuf,
    process::Output,
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent, Topology,
    policy::{service, write_atomically},
    privileged,
    servers::sa,
};
use serde_json::Value;

const VIP: &str = "10.96.1.10";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn scratch(t: &Topology) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// An HTTPRoute attached to Service `parent` port 80.
fn http_route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: mesh-test}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {parent}, port: 80}}]\n  rules:\n{rules}"
    )
}

/// Pods `client` plus the named backends (each runs the echo server on 8080), a Service per
/// backend (VIP 10.96.1.(10+i)), the policy written by `policy`, and the agent.
struct Lab {
    t: Topology,
    agent: Agent,
    policy_file: PathBuf,
    dir: PathBuf,
}

impl Lab {
    fn new(backends: &[&str], policy: impl Fn(&Topology) -> String) -> Lab {
        let mut pods = vec!["client"];
        pods.extend_from_slice(backends);
        let t = Topology::new(&pods);
        let dir = scratch(&t);
        for b in backends {
            let log = dir.join(format!("{b}.log"));
            t.pod(b)
                .ns
                .echo(b, 8080, &["--log", log.to_str().expect("utf8")]);
        }
        let policy_file = dir.join("policy.yaml");
        write_atomically(&policy_file, &policy(&t));
        let agent = t.start_agent(&[
            "--interface",
            &t.pod("client").host_if,
            "--policy",
            policy_file.to_str().expect("utf8"),
        ]);
        Lab {
            t,
            agent,
            policy_file,
            dir,
        }
    }

    /// Runs curl in the client pod.
    fn curl(&self, args: &[&str]) -> Output {
        self.t
            .pod("client")
            .ns
            .cmd("curl")
            .args(["-sS", "--max-time", "15"])
            .args(args)
            .output()
            .expect("curl")
    }

    /// Requests the last URL of `args` and returns (status, response headers lower-cased, body).
    fn get(&self, args: &[&str]) -> (u16, Vec<(String, String)>, Value) {
        let mut all = vec!["-D", "/dev/stderr", "-o", "-"];
        all.extend_from_slice(args);
        let out = self.curl(&all);
        let head = String::from_utf8_lossy(&out.stderr).to_string();
        let mut status = 0;
        let mut headers = Vec::new();
        for line in head.lines() {
            if let Some(rest) = line.strip_prefix("HTTP/") {
                status = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                headers.clear();
            } else if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_lowercase(), v.trim().to_string()));
            }
        }
        assert!(status != 0, "no response: {head}\n{}", self.agent.log());
        let body = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (status, headers, body)
    }

    fn log_of(&self, backend: &str) -> Vec<Value> {
        std::fs::read_to_string(self.dir.join(format!("{backend}.log")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Every JSON object in a stream of concatenated bodies.
fn bodies(out: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(out)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .filter(Value::is_object)
        .collect()
}

fn services(t: &Topology, names: &[&str]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            service(
                n,
                ip(&format!("10.96.1.{}", 10 + i)),
                80,
                8080,
                &[IpAddr::V4(t.pod(n).ip4)],
            )
        })
        .collect()
}

#[test]
fn http_routes_by_host_and_path_with_filters() {
    if !privileged("http_routes_by_host_and_path_with_filters") {
        return;
    }
    let lab = Lab::new(&["web", "v2", "mirror"], |t| {
        services(t, &["web", "v2", "mirror"])
            + &http_route(
                "web",
                "web",
                "  - matches: [{path: {type: PathPrefix, value: /v2}}]\n\
                 \x20   filters:\n\
                 \x20   - type: RequestHeaderModifier\n\
                 \x20     requestHeaderModifier: {set: [{name: x-env, value: canary}], add: [{name: x-added, value: a}], remove: [x-drop]}\n\
                 \x20   - type: ResponseHeaderModifier\n\
                 \x20     responseHeaderModifier: {add: [{name: x-served, value: v2}]}\n\
                 \x20   backendRefs: [{name: v2, port: 80}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /old}}]\n\
                 \x20   filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /api}}]\n\
                 \x20   filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /internal}}}]\n\
                 \x20   backendRefs: [{name: v2, port: 80}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /mirrored}}]\n\
                 \x20   filters: [{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}}}]\n\
                 \x20   backendRefs: [{name: web, port: 80}]\n\
                 \x20 - backendRefs: [{name: web, port: 80}]\n",
            )
    });
    let url = |p: &str| format!("http://{VIP}{p}");

    let (s, _, b) = lab.get(&[&url("/")]);
    assert_eq!((s, b["backend"].as_str()), (200, Some("web")));

    let (s, h, b) = lab.get(&["-H", "x-drop: 1", "-H", "x-added: first", &url("/v2/x")]);
    assert_eq!((s, b["backend"].as_str()), (200, Some("v2")));
    assert_eq!(b["headers"]["x-env"], "canary");
    assert_eq!(b["headers"]["x-added"], "first,a");
    assert!(b["headers"].get("x-drop").is_none(), "removed: {b}");
    assert_eq!(
        header(&h, "x-served"),
        Some("v2"),
        "response header added: {h:?}"
    );

    let (s, h, _) = lab.get(&[&url("/old/page?q=1")]);
    assert_eq!(s, 301);
    let loc = header(&h, "location").expect("location");
    assert!(
        loc.ends_with("/new/page?q=1") || loc.ends_with("/new/page"),
        "{loc}"
    );

    let (s, _, b) = lab.get(&[&url("/api/items")]);
    assert_eq!((s, b["backend"].as_str()), (200, Some("v2")));
    assert_eq!(b["path"], "/internal/items");

    let (s, _, b) = lab.get(&[&url("/mirrored/1")]);
    assert_eq!((s, b["backend"].as_str()), (200, Some("web")));

    // Per-route request metrics: two 200s on the last rules, one redirect, seen by route.
    let metrics = lab.t.node.http_get(mesh_tests::ADMIN, "/metrics");
    let count = |labels: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("mesh_http_requests_total{{{labels}}} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        count("route=\"HTTPRoute mesh-test/web\",method=\"GET\",status_class=\"2xx\"") >= 4.0,
        "{metrics}"
    );
    assert_eq!(
        count("route=\"HTTPRoute mesh-test/web\",method=\"GET\",status_class=\"3xx\""),
        1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("mesh_http_request_duration_seconds_bucket{route=\"HTTPRoute mesh-test/web\",method=\"GET\""),
        "{metrics}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab
        .log_of("mirror")
        .iter()
        .any(|r| r["path"] == "/mirrored/1")
    {
        assert!(Instant::now() < deadline, "the mirror got no copy");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn request_id_and_traceparent_on_every_request_of_one_connection() {
    if !privileged("request_id_and_traceparent_on_every_request_of_one_connection") {
        return;
    }
    let lab = Lab::new(&["web"], |t| services(t, &["web"]));
    // HTTP/1.1: curl's URL range reuses one keep-alive connection. HTTP/2: nghttp sends all 20
    // as streams of one connection (curl 7.88 cannot reuse a prior-knowledge connection: it fails
    // the second request with "Error in the HTTP2 framing layer" against any server).
    let fetch = |h2: bool, headers: &[&str]| -> Output {
        let mut c = lab
            .t
            .pod("client")
            .ns
            .cmd(if h2 { "nghttp" } else { "curl" });
        if h2 {
            for h in headers {
                c.args(["-H", h]);
            }
            c.args((1..=20).map(|i| format!("http://{VIP}/r{i}")));
        } else {
            c.args(["-sS", "--http1.1"]);
            for h in headers {
                c.args(["-H", h]);
            }
            c.arg(format!("http://{VIP}/r[1-20]"));
        }
        c.output().expect("client")
    };
    for (mode, h2) in [("HTTP/1.1 keep-alive", false), ("HTTP/2", true)] {
        let out = fetch(h2, &[]);
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = bodies(&out.stdout);
        assert_eq!(seen.len(), 20, "{mode}: 20 answers");
        let mut ids = std::collections::HashSet::new();
        let mut traces = std::collections::HashSet::new();
        for b in &seen {
            let rid = b["headers"]["x-request-id"]
                .as_str()
                .expect("x-request-id injected");
            assert!(rid.len() >= 16, "{rid}");
            ids.insert(rid.to_string());
            let tp = b["headers"]["traceparent"]
                .as_str()
                .expect("traceparent started");
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts.len(), 4, "{tp}");
            assert_eq!(
                (parts[0], parts[1].len(), parts[2].len()),
                ("00", 32, 16),
                "{tp}"
            );
            traces.insert(parts[1].to_string());
            assert_eq!(
                b["headers"]["x-forwarded-for"],
                lab.t.pod("client").ip4.to_string()
            );
        }
        assert_eq!(ids.len(), 20, "{mode}: a new x-request-id per request");
        assert_eq!(
            traces.len(),
            20,
            "{mode}: a new trace per request without one"
        );

        // Present ones are kept (request id) and propagated (same trace, new parent span).
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let tp_header = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
        let out = fetch(
            h2,
            &[
                "x-request-id: keep-me-123",
                &tp_header,
                "tracestate: vendor=1",
            ],
        );
        let seen = bodies(&out.stdout);
        assert_eq!(seen.len(), 20, "{mode}: 20 answers");
        for b in seen {
            assert_eq!(b["headers"]["x-request-id"], "keep-me-123");
            let tp = b["headers"]["traceparent"].as_str().expect("traceparent");
            assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
            assert!(
                !tp.contains("00f067aa0ba902b7"),
                "a new parent span id for this hop: {tp}"
            );
            assert_eq!(b["headers"]["tracestate"], "vendor=1");
        }
    }
    thread::sleep(Duration::from_millis(300));
    let conns = lab
        .agent
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "connection closed" && l["span"]["dst"] == format!("{VIP}:80"))
        .count();
    assert_eq!(
        conns,
        4,
        "each curl run used one connection to the VIP:\n{}",
        lab.agent.log()
    );
}

#[test]
fn grpc_is_routed_by_method_with_status_and_trailers_intact() {
    if !privileged("grpc_is_routed_by_method_with_status_and_trailers_intact") {
        return;
    }
    let t = Topology::new(&["client", "g1", "g2"]);
    let script = mesh_tests::support;
    for g in ["g1", "g2"] {
        let server = script("grpc_server.py").to_string_lossy().to_string();
        t.pod(g).ns.serve(
            "/usr/bin/python3",
            &[server, g.to_string(), "50051".to_string()],
        );
    }
    let dir = scratch(&t);
    let pfile = dir.join("policy.yaml");
    let svc = |n: &str, pod: &str, i: u8| {
        service(
            n,
            ip(&format!("10.96.2.{i}")),
            50051,
            50051,
            &[IpAddr::V4(t.pod(pod).ip4)],
        )
    };
    let policy = svc("grpc-front", "g1", 10)
        + &svc("g1", "g1", 11)
        + &svc("g2", "g2", 12)
        + "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: by-method, namespace: mesh-test}\n\
           spec:\n  parentRefs: [{group: \"\", kind: Service, name: grpc-front, port: 50051}]\n  rules:\n\
           \x20 - matches: [{method: {service: mesh.Test, method: Count}}]\n    backendRefs: [{name: g2, port: 50051}]\n\
           \x20 - backendRefs: [{name: g1, port: 50051}]\n";
    write_atomically(&pfile, &policy);
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
    ]);
    let call = |method: &str, payload: &str| -> Value {
        let out = t
            .pod("client")
            .ns
            .cmd("/usr/bin/python3")
            .arg(script("grpc_client.py"))
            .args(["10.96.2.10:50051", method, payload])
            .output()
            .expect("grpc client");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                agent.log()
            )
        })
    };
    let echo = call("Echo", "hello");
    assert_eq!(echo["code"], "OK", "{echo}");
    let reply = echo["replies"][0].as_str().expect("reply");
    assert!(
        reply.starts_with("g1:hello:rid="),
        "unary routed to g1: {reply}"
    );
    assert!(
        reply.len() > "g1:hello:rid=".len(),
        "x-request-id injected on the gRPC stream: {reply}"
    );
    assert_eq!(echo["trailers"]["x-served-by"], "g1");

    let count = call("Count", "4");
    assert_eq!(count["code"], "OK", "{count}");
    assert_eq!(
        count["replies"],
        serde_json::json!(["g2:0", "g2:1", "g2:2", "g2:3"]),
        "streamed from g2"
    );
    assert_eq!(count["trailers"]["x-served-by"], "g2");

    let fail = call("Fail", "x");
    assert_eq!(fail["code"], "FAILED_PRECONDITION", "{fail}");
    assert_eq!(fail["details"], "g1 says no");
}

#[test]
fn weighted_split_retries_timeouts_and_ejection() {
    if !privileged("weighted_split_retries_timeouts_and_ejection") {
        return;
    }
    let lab = Lab::new(&["web", "a", "b", "slow"], |t| {
        services(t, &["web", "a", "b", "slow"])
            + &http_route(
                "split",
                "web",
                "  - matches: [{path: {type: PathPrefix, value: /split}}]\n\
                 \x20   backendRefs: [{name: a, port: 80, weight: 90}, {name: b, port: 80, weight: 10}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /slow}}]\n\
                 \x20   timeouts: {request: 500ms}\n\
                 \x20   backendRefs: [{name: slow, port: 80}]\n\
                 \x20 - backendRefs: [{name: web, port: 80}]\n",
            )
    });
    let out = lab.curl(&[&format!("http://{VIP}/split/[1-2000]")]);
    let seen = bodies(&out.stdout);
    assert_eq!(seen.len(), 2000, "{}", String::from_utf8_lossy(&out.stderr));
    let a = seen.iter().filter(|b| b["backend"] == "a").count() as f64 / 2000.0;
    println!(
        "HTTPRoute 90/10 over 2000 requests: a {a:.3}, b {:.3}",
        1.0 - a
    );
    assert!((a - 0.9).abs() <= 0.05, "a share {a:.3}");

    let start = Instant::now();
    let (s, _, _) = lab.get(&[&format!("http://{VIP}/slow?delay=3s")]);
    let took = start.elapsed();
    assert_eq!(s, 504, "route timeout answers 504");
    assert!(
        took < Duration::from_secs(2),
        "answered at the route timeout, not the backend's pace: {took:?}"
    );
}

#[test]
fn retries_turn_a_failing_endpoint_into_successes() {
    if !privileged("retries_turn_a_failing_endpoint_into_successes") {
        return;
    }
    // Service `web` has three endpoints: `good` answers, `bad` answers every request with 503,
    // `gone` has nothing listening (connect refused). Retries move each request to `good`;
    // outlier detection soon stops sending anything to the other two, so retries stay well
    // inside the budget.
    let t = Topology::new(&["client", "good", "bad", "gone"]);
    let dir = scratch(&t);
    t.pod("good").ns.echo("good", 8080, &[]);
    let bad_log = dir.join("bad.log");
    t.pod("bad").ns.echo(
        "bad",
        8080,
        &["--status", "503", "--log", bad_log.to_str().expect("utf8")],
    );
    let pfile = dir.join("policy.yaml");
    let eps: Vec<IpAddr> = ["good", "bad", "gone"]
        .iter()
        .map(|p| IpAddr::V4(t.pod(p).ip4))
        .collect();
    write_atomically(&pfile, &service("web", ip(VIP), 80, 8080, &eps));
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
    ]);
    const N: usize = 300;
    let out = t
        .pod("client")
        .ns
        .cmd("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            "-w",
            "%{http_code}\n",
            &format!("http://{VIP}/r/[1-{N}]"),
        ])
        .output()
        .expect("curl");
    let seen = bodies(&out.stdout);
    assert_eq!(
        seen.len(),
        N,
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(
        seen.iter().all(|b| b["backend"] == "good"),
        "every answer came from the good endpoint"
    );
    let codes = String::from_utf8_lossy(&out.stdout)
        .matches("}200\n")
        .count();
    assert_eq!(codes, N, "every request got 200");
    let bad_hits = std::fs::read_to_string(&bad_log)
        .unwrap_or_default()
        .lines()
        .count();
    assert!(
        bad_hits >= 1,
        "the 503 endpoint was tried (and its 503s retried)"
    );

    let metrics = t.node.http_get(mesh_tests::ADMIN, "/metrics");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let retries = value("mesh_http_retries_total");
    println!(
        "{N} requests, 503 endpoint hit {bad_hits} times, {retries} retries, {} over budget",
        value("mesh_http_retries_over_budget_total")
    );
    assert!(
        retries >= bad_hits as f64,
        "each 503 was retried: {retries} < {bad_hits}"
    );
    // The budget: retries add at most 20% of requests over 10 s, and at least 3/s are allowed.
    assert!(
        retries <= (N as f64 * 0.2).max(30.0),
        "retries within the budget: {retries}"
    );
    assert_eq!(
        value("mesh_http_retries_over_budget_total"),
        0.0,
        "{metrics}"
    );
}

#[test]
fn smuggling_attempts_get_400_and_never_reach_the_backend() {
    if !privileged("smuggling_attempts_get_400_and_never_reach_the_backend") {
        return;
    }
    let lab = Lab::new(&["web"], |t| services(t, &["web"]));
    let corpus: &[(&str, &str)] = &[
        (
            "CL.TE",
            "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
        ),
        (
            "TE.CL",
            "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        ),
        (
            "TE.TE space",
            "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "TE.TE obfuscated value",
            "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "TE.TE list",
            "POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "duplicate CL",
            "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        ),
        (
            "invalid CL",
            "POST / HTTP/1.1\r\nHost: web\r\nContent-Length: +4\r\n\r\nabcd",
        ),
        (
            "obs-fold",
            "GET / HTTP/1.1\r\nHost: web\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "bare LF in header",
            "GET / HTTP/1.1\r\nHost: web\r\nX-A: 1\nX-B: 2\r\n\r\n",
        ),
        (
            "bare CR in header",
            "GET / HTTP/1.1\r\nHost: web\r\nX-A: 1\rX-B: 2\r\n\r\n",
        ),
    ];
    let vip = sa(ip(VIP), 80);
    for (name, raw) in corpus {
        let raw = raw.to_string();
        let answer = lab.t.pod("client").ns.run(move || {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s.write_all(raw.as_bytes()).expect("write");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            String::from_utf8_lossy(&buf[..n]).to_string()
        });
        assert!(answer.starts_with("HTTP/1.1 400"), "{name}: got {answer:?}");
    }
    thread::sleep(Duration::from_millis(300));
    assert!(
        lab.log_of("web").is_empty(),
        "the backend saw nothing: {:?}",
        lab.log_of("web")
    );

    let big = "a".repeat(80 * 1024);
    let (s, _, _) = lab.get(&["-H", &format!("x-big: {big}"), &format!("http://{VIP}/")]);
    assert_eq!(s, 431, "oversized headers");
    assert!(lab.log_of("web").is_empty());
    let (s, _, _) = lab.get(&[&format!("http://{VIP}/fine")]);
    assert_eq!(s, 200, "normal requests still work");
}

#[test]
fn reload_under_h2load_fails_no_request() {
    if !privileged("reload_under_h2load_fails_no_request") {
        return;
    }
    let route_to = |backend: &str| {
        http_route(
            "main",
            "web",
            &format!("  - backendRefs: [{{name: {backend}, port: 80}}]\n"),
        )
    };
    let lab = Lab::new(&["web", "a", "b"], |t| {
        services(t, &["web", "a", "b"]) + &route_to("a")
    });
    let base = std::fs::read_to_string(&lab.policy_file).expect("policy");
    let load = {
        let ns = lab.t.pod("client").ns.clone();
        thread::spawn(move || {
            ns.cmd("h2load")
                .args([
                    "-D",
                    "6",
                    "-c",
                    "4",
                    "-m",
                    "8",
                    &format!("http://{VIP}/load"),
                ])
                .output()
                .expect("h2load")
        })
    };
    let svcs_only = base
        .split("---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute")
        .next()
        .expect("services")
        .to_string();
    for (i, text) in [
        svcs_only.clone() + &route_to("b"),
        svcs_only.clone() + &route_to("b").replace("port: 80}", "port: 81}"),
        svcs_only.clone() + &route_to("a"),
    ]
    .iter()
    .enumerate()
    {
        thread::sleep(Duration::from_millis(1500));
        write_atomically(&lab.policy_file, text);
        let _ = i;
    }
    let out = load.join().expect("h2load");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    println!(
        "{}",
        report
            .lines()
            .filter(|l| l.starts_with("requests:") || l.starts_with("status codes:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let requests = report
        .lines()
        .find(|l| l.starts_with("requests:"))
        .expect("h2load summary");
    assert!(
        requests.contains(" 0 failed, 0 errored, 0 timeout"),
        "{report}"
    );
    let codes = report
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .expect("codes");
    assert!(codes.contains(" 0 3xx, 0 4xx, 0 5xx"), "{report}");
    assert_eq!(lab.agent.log().matches("policy reloaded").count(), 2);
    assert!(lab.agent.log().contains("policy rejected"));
    let a = lab.log_of("a").len();
    let b = lab.log_of("b").len();
    assert!(a > 0 && b > 0, "routing followed the reloads: a {a}, b {b}");
}

#[test]
fn l7_deny_rules_answer_403_before_any_backend() {
    if !privileged("l7_deny_rules_answer_403_before_any_backend") {
        return;
    }
    let lab = Lab::new(&["web"], |t| {
        services(t, &["web"])
            + "---\napiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: l7, namespace: mesh-system}\n\
               spec:\n  authorization:\n    http:\n\
               \x20   - {name: no-admin, paths: [/admin]}\n\
               \x20   - {name: no-guest-delete, methods: [DELETE], headers: {x-user: guest}}\n"
    });
    let url = |p: &str| format!("http://{VIP}{p}");
    for (args, want) in [
        (vec![url("/admin")], 403),
        (vec![url("/admin/users?id=1")], 403),
        (vec![url("/administrator")], 200),
        (
            vec![
                "-X".into(),
                "DELETE".into(),
                "-H".into(),
                "x-user: guest".into(),
                url("/item"),
            ],
            403,
        ),
        (
            vec![
                "-X".into(),
                "DELETE".into(),
                "-H".into(),
                "x-user: root".into(),
                url("/item"),
            ],
            200,
        ),
        (vec![url("/item")], 200),
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, _, _) = lab.get(&a);
        assert_eq!(status, want, "{args:?}");
    }
    thread::sleep(Duration::from_millis(200));
    let seen: Vec<String> = lab
        .log_of("web")
        .iter()
        .map(|r| format!("{} {}", r["method"], r["path"]))
        .collect();
    assert!(
        !seen
            .iter()
            .any(|r| r.contains("/admin/") || r.ends_with("/admin\"")),
        "denied requests never reached the backend: {seen:?}"
    );
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// A client that connects and waits before sending its request (a slow or busy client) still
/// meets the route: the connection is not taken for opaque TCP after the short protocol
/// detection timeout and sent to the Service's own endpoint past the route (and its L7 rules).
#[test]
fn a_slow_client_still_meets_the_route() {
    if !privileged("a_slow_client_still_meets_the_route") {
        return;
    }
    let lab = Lab::new(&["web", "v2"], |t| {
        services(t, &["web", "v2"])
            + &http_route("web", "web", "  - backendRefs: [{name: v2, port: 80}]\n")
    });
    let answer = lab.t.pod("client").ns.run(|| {
        let mut s =
            TcpStream::connect_timeout(&sa(ip(VIP), 80), Duration::from_secs(5)).expect("connect");
        // Well past the 100 ms detection timeout.
        thread::sleep(Duration::from_millis(400));
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .expect("request");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("response");
        String::from_utf8_lossy(&out).into_owned()
    });
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert_eq!(
        v["backend"], "v2",
        "the route sends everything to v2: {answer}"
    );
}
