//! One endpoint registry for the TCP and HTTP paths (issue 11): an endpoint the HTTP proxy
//! ejected after failed answers gets no TCP connection, and an endpoint that refused TCP
//! connects gets no HTTP request, for the same Service port.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use mesh_tests::{
    ADMIN, Netns, Topology,
    policy::{service, write_atomically},
    privileged,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// One HTTP/1.1 request with `Connection: close`: the status and the body.
fn http(ns: &Netns, addr: SocketAddr) -> (u16, String) {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        s.write_all(b"GET /x HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let out = String::from_utf8_lossy(&out).into_owned();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    })
}

/// One opaque TCP connection (its first byte is not printable, so it is never taken for HTTP):
/// sends a few bytes and reads until the backend closes.
fn opaque(ns: &Netns, addr: SocketAddr) {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        s.write_all(b"\x01opaque\r\n\r\n").expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
    })
}

fn metric(t: &Topology, series: &str) -> u64 {
    let text = t.node.http_get(ADMIN, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The upstreams of the agent's closed L4 connections to `dst`, from its access log.
fn l4_upstreams(lines: &[serde_json::Value], dst: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| {
            l["message"] == "connection closed" || l["message"] == "connection ended with an error"
        })
        .filter(|l| l["span"]["dst"].as_str() == Some(dst))
        .filter(|l| l["span"]["proto"].as_str() == Some("tcp"))
        .filter_map(|l| l["span"]["upstream"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn an_endpoint_ejected_on_one_path_is_skipped_on_the_other() {
    if !privileged("an_endpoint_ejected_on_one_path_is_skipped_on_the_other") {
        return;
    }
    let t = Topology::new(&["client", "failing", "good", "dead"]);
    let (failing, good, dead) = (t.pod("failing"), t.pod("good"), t.pod("dead"));
    failing.ns.echo("failing", 8080, &["--status", "500"]);
    good.ns.echo("good", 8080, &[]);
    // Nothing listens in "dead": connecting to it is refused.
    let dir = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&dir).expect("scratch");
    let pfile = dir.join("policy.yaml");
    write_atomically(
        &pfile,
        &(service(
            "answers-500",
            ip("10.96.9.1"),
            80,
            8080,
            &[IpAddr::V4(failing.ip4), IpAddr::V4(good.ip4)],
        ) + &service(
            "refuses",
            ip("10.96.9.2"),
            80,
            8080,
            &[IpAddr::V4(dead.ip4), IpAddr::V4(good.ip4)],
        )),
    );
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
    ]);
    let client = &t.pod("client").ns;

    // HTTP -> TCP: requests answered 500 by one endpoint eject it.
    let vip1 = SocketAddr::new(ip("10.96.9.1"), 80);
    let mut failed = 0;
    while metric(&t, "mesh_http_ejections_total") == 0 {
        let (status, _) = http(client, vip1);
        failed += usize::from(status == 500);
        assert!(failed < 50, "no ejection after {failed} 500s");
    }
    for _ in 0..20 {
        opaque(client, vip1);
    }
    std::thread::sleep(Duration::from_millis(300));
    let upstreams = l4_upstreams(&agent.log_lines(), &vip1.to_string());
    println!(
        "after HTTP ejected {}: TCP connections went to {upstreams:?}",
        failing.ip4
    );
    assert_eq!(upstreams.len(), 20, "{}", agent.log());
    let failing_ep = format!("{}:8080", failing.ip4);
    assert!(
        upstreams.iter().all(|u| *u != failing_ep),
        "a TCP connection went to the endpoint HTTP ejected: {upstreams:?}"
    );

    // TCP -> HTTP: connects refused by one endpoint eject it; HTTP requests then never go there
    // (one that did would fail to connect and count an upstream error).
    let vip2 = SocketAddr::new(ip("10.96.9.2"), 80);
    for _ in 0..30 {
        opaque(client, vip2);
    }
    let dead_ep = format!("{}:8080", dead.ip4);
    assert!(
        agent.log_lines().iter().any(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("endpoint ejected"))
                && l["endpoint"].as_str() == Some(dead_ep.as_str())
        }),
        "TCP connects did not eject {dead_ep}:\n{}",
        agent.log()
    );
    let errors = metric(&t, "mesh_http_upstream_errors_total");
    for i in 0..40 {
        let (status, body) = http(client, vip2);
        assert_eq!(status, 200, "request {i}: {body}");
        assert!(body.contains("good"), "request {i}: {body}");
    }
    assert_eq!(
        metric(&t, "mesh_http_upstream_errors_total"),
        errors,
        "an HTTP request tried the endpoint TCP ejected"
    );
}
