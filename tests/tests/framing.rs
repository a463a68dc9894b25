//! RFC 9112 framing on the captured path: malformed requests sent with raw TCP from a client pod
//! to a Service VIP get `400 Bad Request` with `Connection: close` from the agent, never reach
//! the backend, are counted by reason in `mesh_http_rejected_requests_total` and logged with the
//! reason, and the agent keeps serving well-formed requests on new connections.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_tests::{
    ADMIN, Topology,
    policy::{service, write_atomically},
    privileged,
};

const VIP: &str = "10.96.7.10";

/// Sends `request` in one write from the client pod to the VIP and reads until the agent closes
/// (or 10 s pass). Returns what came back and whether the connection was closed.
fn exchange(t: &Topology, request: &'static [u8]) -> (String, bool) {
    let vip: IpAddr = VIP.parse().expect("vip");
    t.pod("client").ns.run(move || {
        let addr = SocketAddr::new(vip, 80);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request).expect("send");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // A reset after the answer also ends the connection.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        (String::from_utf8_lossy(&out).into_owned(), closed)
    })
}

/// `name{labels} value` from the admin server's metrics, 0 when absent.
fn metric(t: &Topology, series: &str) -> u64 {
    let text = t.node.http_get(ADMIN, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

fn scratch(t: &Topology) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

#[test]
fn malformed_requests_get_400_and_the_agent_keeps_serving() {
    if !privileged("malformed_requests_get_400_and_the_agent_keeps_serving") {
        return;
    }
    let t = Topology::new(&["client", "web"]);
    let dir = scratch(&t);
    let backend_log = dir.join("web.log");
    t.pod("web")
        .ns
        .echo("web", 8080, &["--log", backend_log.to_str().expect("utf8")]);
    let policy = dir.join("policy.yaml");
    write_atomically(
        &policy,
        &service(
            "web",
            VIP.parse().expect("vip"),
            80,
            8080,
            &[IpAddr::V4(t.pod("web").ip4)],
        ),
    );
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        policy.to_str().expect("utf8"),
    ]);
    let good: &[u8] = b"GET /good HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
    let (answer, _) = exchange(&t, good);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{answer}\n{}",
        agent.log()
    );

    // (request, the reason label it is counted under)
    let cases: &[(&[u8], &str)] = &[
        (
            b"GET /bad-two-hosts HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n",
            "duplicate_host",
        ),
        (
            b"GET /bad-host-userinfo HTTP/1.1\r\nHost: a@web\r\n\r\n",
            "invalid_host",
        ),
        (
            b"GET /bad-host-path HTTP/1.1\r\nHost: web/x\r\n\r\n",
            "invalid_host",
        ),
        (b"GET /bad-no-host HTTP/1.1\r\nX: y\r\n\r\n", "missing_host"),
        (
            b"POST /bad-overflow HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n\
              FFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
            "chunk_size_overflow",
        ),
        (
            b"POST /bad-lf-size HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\nhello\r\n0\r\n\r\n",
            "bare_line_end_in_chunk",
        ),
        (
            b"POST /bad-lf-ext HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;a=b\nhello\r\n0\r\n\r\n",
            "bare_line_end_in_chunk",
        ),
        (
            b"POST /bad-hex HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n\
              zz\r\nhello\r\n0\r\n\r\n",
            "invalid_chunk_size",
        ),
        (
            b"POST /bad-crlf HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhelloX0\r\n\r\n",
            "chunk_data_without_crlf",
        ),
        (
            b"POST /bad-cl-te HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            "content_length_with_transfer_encoding",
        ),
        (
            b"POST /bad-cl-cl HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
            "duplicate_content_length",
        ),
        (
            b"GET /bad-fold HTTP/1.1\r\nHost: web\r\nX-Folded: a\r\n b\r\n\r\n",
            "obs_fold",
        ),
    ];
    for (request, reason) in cases {
        let series = format!("mesh_http_rejected_requests_total{{reason=\"{reason}\"}}");
        let before = metric(&t, &series);
        let started = Instant::now();
        let (answer, closed) = exchange(&t, request);
        let shown = String::from_utf8_lossy(request);
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{shown:?} -> {answer:?}\n{}",
            agent.log()
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{shown:?} -> {answer:?}"
        );
        assert!(closed, "{shown:?}: the agent closes the connection");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{shown:?}: answered in {:?}",
            started.elapsed()
        );
        assert_eq!(metric(&t, &series), before + 1, "{series}");
        // The agent keeps serving.
        let (answer, _) = exchange(&t, good);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "after {shown:?}: {answer}"
        );
    }

    let seen = std::fs::read_to_string(&backend_log).unwrap_or_default();
    assert!(
        !seen.contains("/bad-"),
        "no malformed request reached the backend:\n{seen}"
    );
    assert_eq!(seen.matches("/good").count(), cases.len() + 1, "{seen}");
    // Logged once per connection with the reason, at info level.
    let logged: Vec<String> = agent
        .log_lines()
        .iter()
        .filter_map(|l| l["error"].as_str().map(str::to_owned))
        .filter(|e| e.contains("sent a malformed request"))
        .collect();
    assert_eq!(logged.len(), cases.len(), "{logged:#?}");
    for reason in ["more than one Host field", "chunk size overflows 64 bits"] {
        assert!(
            logged.iter().any(|l| l.contains(reason)),
            "{reason}: {logged:#?}"
        );
    }
}
