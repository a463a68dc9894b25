//! Observability as an operator sees it: a real Prometheus scraping the admin server, `promtool`
//! on the exposition, readiness across startup and shutdown, JSON access logs that match the
//! connections made, and the `/config_dump` and `/status` documents.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Netns, Topology, counter, privileged,
    servers::{TIMEOUT, greeter, sa},
};

const ADMIN: &str = "127.0.0.1:15020";
const PROMETHEUS: &str = "127.0.0.1:9090";
/// Families the lead is adding; checked only when the agent exports them.
const OPTIONAL_FAMILIES: [&str; 7] = [
    "mesh_http_requests",
    "mesh_http_request_duration_seconds",
    "mesh_http_retries",
    "mesh_http_timeouts",
    "mesh_http_upstream_errors",
    "mesh_xdp_packets",
    "mesh_xdp_bytes",
];

fn scratch(t: &Topology) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{}-obs", t.id));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// `GET path` over HTTP/1.0 from inside `ns`: status and body.
fn http_get(ns: &Netns, to: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    ns.run(move || get_here(to, &path))
}

/// [`http_get`] for callers already inside the namespace.
fn get_here(to: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_string()))
}

fn get_json(ns: &Netns, to: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = http_get(ns, to, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// A full exchange through the greeter: read the greeting, send `payload` and read its echo,
/// close our side and wait for the close from the other end. Returns the client's local address
/// and the greeting line (with its newline).
fn exchange(to: SocketAddr, payload: &[u8]) -> std::io::Result<(SocketAddr, String)> {
    let mut s = TcpStream::connect_timeout(&to, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let local = s.local_addr()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::other("closed without a greeting"));
    }
    s.write_all(payload)?;
    let mut echo = vec![0u8; payload.len()];
    s.read_exact(&mut echo)?;
    if echo != payload {
        return Err(std::io::Error::other("echo differs from what was sent"));
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok((local, String::from_utf8_lossy(&line).into_owned()))
}

/// Sum of the samples of `name` whose label set contains every `labels` pair, from exposition
/// text; `None` when no sample matches.
fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n != name
            || !labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        *found.get_or_insert(0.0) += v;
    }
    found
}

fn note_optional_families(text: &str) {
    for f in OPTIONAL_FAMILIES {
        if text.contains(&format!("# TYPE {f} ")) {
            println!("{f}: exported");
        } else {
            println!("note: {f} not exported by this agent build yet; not checked");
        }
    }
}

/// Percent-encodes a PromQL expression for a query string.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server in the node namespace scraping the agent every second; killed on drop.
struct Prometheus {
    child: Child,
    ns: Netns,
    log: PathBuf,
}

impl Prometheus {
    fn start(t: &Topology) -> Self {
        let dir = scratch(t).join("prometheus");
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: mesh\n    static_configs:\n      - targets: ['{ADMIN}']\n"
            ),
        )
        .expect("prometheus config");
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("prometheus log");
        let child = t
            .node
            .cmd("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            ns: t.node.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(&p.ns, addr(PROMETHEUS), "/-/ready") {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s:\n{}",
                p.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query's single value, `None` while the result is empty.
    fn query(&self, expr: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let v = get_json(&self.ns, addr(PROMETHEUS), &path);
        assert_eq!(v["status"], "success", "{expr}: {v}");
        let r = v["data"]["result"].as_array()?.first()?;
        r["value"][1].as_str()?.parse().ok()
    }

    /// Polls `expr` until `ok` holds for its value or `within` passes; returns the last value.
    fn wait_for(&self, expr: &str, within: Duration, ok: impl Fn(f64) -> bool) -> Option<f64> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.query(expr);
            if v.is_some_and(&ok) || Instant::now() > deadline {
                return v;
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_connection_and_capture_counters() {
    if !privileged("prometheus_scrapes_connection_and_capture_counters") {
        return;
    }
    const N: usize = 20;
    let t = Topology::new(&["client", "server"]);
    let server = t.pod("server").clone();
    greeter(&server.ns, sa(server.ip4, 8080), "server");
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--capture",
        "10.201.2.0/24=8080",
    ]);
    let prom = Prometheus::start(&t);
    let up = prom.wait_for("up{job=\"mesh\"}", Duration::from_secs(10), |v| v == 1.0);
    assert_eq!(
        up,
        Some(1.0),
        "prometheus scrapes the agent:\n{}",
        prom.log()
    );

    let to = sa(server.ip4, 8080);
    t.pod("client").ns.run(move || {
        for i in 0..N {
            exchange(to, b"ping\n").unwrap_or_else(|e| panic!("connection {i}: {e}"));
        }
    });

    // Scraped every second: allow a few intervals for the last close to be counted and scraped.
    let within = Duration::from_secs(10);
    let closed = prom.wait_for("sum(mesh_tcp_connections_closed_total)", within, |v| {
        v == N as f64
    });
    let opened = prom.wait_for("sum(mesh_tcp_connections_opened_total)", within, |v| {
        v == N as f64
    });
    let active = prom.wait_for("sum(mesh_tcp_connections_active)", within, |v| v == 0.0);
    // Per connection at least the SYN, the handshake's ACK and the data (or FIN) segment of the
    // client reach the agent through the capture program.
    let min_redirected = 3.0 * N as f64;
    let redirected = prom.wait_for(
        "mesh_capture_packets_total{result=\"redirected\"}",
        within,
        |v| v >= min_redirected,
    );
    let sent = prom.query("sum(mesh_tcp_sent_bytes_total)");
    let rss = prom.query("mesh_process_resident_memory_bytes");
    let kernel = counter(&agent.counters(), "redirected");
    println!(
        "prometheus: closed {closed:?} opened {opened:?} active {active:?} redirected {redirected:?} \
         (kernel now {kernel}, lower bound {min_redirected}) sent bytes {sent:?} rss {rss:?}"
    );
    assert_eq!(
        closed,
        Some(N as f64),
        "closed connections:\n{}",
        agent.log()
    );
    assert_eq!(opened, Some(N as f64), "opened connections");
    assert_eq!(active, Some(0.0), "no connection left open");
    let redirected = redirected.expect("redirected series");
    assert!(
        redirected >= min_redirected && redirected <= kernel as f64,
        "redirected {redirected} not within [{min_redirected}, {kernel}]"
    );
    assert_eq!(sent, Some(5.0 * N as f64), "client bytes: 5 per connection");
    assert!(rss.is_some_and(|r| r > 1e6), "agent RSS: {rss:?}");
}

#[test]
fn promtool_accepts_the_metrics_exposition() {
    if !privileged("promtool_accepts_the_metrics_exposition") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let server = t.pod("server").clone();
    greeter(&server.ns, sa(server.ip4, 8080), "server");
    let _agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--capture",
        "10.201.2.0/24=8080-8081",
    ]);
    // Families appear with their first sample: one connection, and one to a port nothing
    // listens on, for the upstream connect error.
    let refused = sa(server.ip4, 8081);
    let _ = t.pod("client").ns.run(move || exchange(refused, b"x"));
    let to = sa(server.ip4, 8080);
    t.pod("client")
        .ns
        .run(move || exchange(to, b"hello\n"))
        .expect("connection through the agent");
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let (status, text) = http_get(&t.node, addr(ADMIN), "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{text}");
        if sample_sum(&text, "mesh_tcp_connections_closed_total", &[]) == Some(2.0)
            || Instant::now() > deadline
        {
            break text;
        }
        thread::sleep(Duration::from_millis(50));
    };
    for (name, labels) in [
        (
            "mesh_tcp_connections_opened_total",
            vec![("service", "none")],
        ),
        ("mesh_tcp_connections_closed_total", vec![]),
        ("mesh_tcp_connections_active", vec![]),
        ("mesh_tcp_sent_bytes_total", vec![]),
        ("mesh_tcp_received_bytes_total", vec![]),
        ("mesh_upstream_connect_duration_seconds_count", vec![]),
        ("mesh_capture_packets_total", vec![("result", "redirected")]),
        ("mesh_capture_packets_total", vec![("result", "seen")]),
        ("mesh_process_resident_memory_bytes", vec![]),
        ("mesh_process_cpu_seconds_total", vec![]),
        ("mesh_process_open_fds", vec![]),
        ("mesh_log_lines_dropped_total", vec![]),
    ] {
        assert!(
            sample_sum(&text, name, &labels).is_some(),
            "{name}{labels:?} missing:\n{text}"
        );
    }
    assert_eq!(
        sample_sum(&text, "mesh_tcp_sent_bytes_total", &[]),
        Some(6.0)
    );
    assert_eq!(
        sample_sum(&text, "mesh_upstream_connect_errors_total", &[]),
        Some(1.0),
        "{text}"
    );
    // Without a policy file nothing reloads, and a family without samples is not exported.
    if !text.contains("# TYPE mesh_policy_reloads counter") {
        println!("note: mesh_policy_reloads has no sample without a reload; not checked here");
    }
    note_optional_families(&text);

    // Served without an Accept header: the classic text format (0.0.4), which promtool reads;
    // every lint must pass (help text, naming, units, `_total`).
    let (code, lint) = promtool(&t.node, &text);
    println!("promtool check metrics: exit {code:?}\n{lint}");
    assert_eq!(code, Some(0), "promtool: {lint}\n{text}");

    // Asked for OpenMetrics (as Prometheus does), the same families come as OpenMetrics.
    let om = t.node.run(move || {
        let mut s =
            TcpStream::connect_timeout(&addr(ADMIN), Duration::from_secs(2)).expect("admin");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n"
        )
        .expect("request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("response");
        raw
    });
    assert!(
        om.contains("content-type: application/openmetrics-text"),
        "{om}"
    );
    assert!(
        om.trim_end().ends_with("# EOF"),
        "OpenMetrics terminator: {om}"
    );
    assert!(
        om.contains("# TYPE mesh_tcp_connections_opened counter"),
        "{om}"
    );
}

/// `promtool check metrics` on `text`: exit code and output.
fn promtool(ns: &Netns, text: &str) -> (Option<i32>, String) {
    let mut child = ns
        .cmd("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool");
    let lint = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), lint)
}

#[test]
fn readiness_follows_startup_and_shutdown() {
    if !privileged("readiness_follows_startup_and_shutdown") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let server = t.pod("server").clone();
    greeter(&server.ns, sa(server.ip4, 8080), "server");

    // Watches /readyz from before the agent starts, as a kubelet probe would, until it is 200.
    let watcher = t.node.spawn(move || {
        let mut seen: Vec<(String, usize)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let s = match get_here(addr(ADMIN), "/readyz") {
                Ok((code, _)) => code.to_string(),
                Err(_) => "no answer".to_string(),
            };
            match seen.last_mut() {
                Some((last, n)) if *last == s => *n += 1,
                _ => seen.push((s.clone(), 1)),
            }
            if s == "200" {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        seen
    });
    let mut agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--capture",
        "10.201.2.0/24=8080",
        "--drain-timeout",
        "10s",
    ]);
    let seen = watcher.join().expect("watcher");
    println!("/readyz during startup: {seen:?}");
    // Not ready (no answer or 503) until ready, then ready: never ready too early.
    assert_eq!(
        seen.last().map(|(s, _)| s.as_str()),
        Some("200"),
        "{seen:?}\n{}",
        agent.log()
    );
    assert!(
        seen.len() >= 2,
        "a not-ready phase was observed first: {seen:?}"
    );
    // The admin server answers before the programs are attached: 503 until they are.
    assert!(
        seen.iter().any(|(s, _)| s == "503"),
        "/readyz answered 503 before attach: {seen:?}"
    );
    let (code, body) = http_get(&t.node, addr(ADMIN), "/healthz").expect("healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // A connection held open keeps the agent draining after SIGTERM: it must say not ready
    // while it drains, so no new traffic is sent its way.
    let to = sa(server.ip4, 8080);
    let mut held = t.pod("client").ns.run(move || {
        let s = TcpStream::connect_timeout(&to, TIMEOUT).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        s
    });
    held.write_all(b"x").expect("write");
    let mut greeting = [0u8; 1];
    held.read_exact(&mut greeting)
        .expect("greeting through the agent");
    mesh_tests::sh(&["kill", "-TERM", &agent.pid().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let draining = loop {
        match http_get(&t.node, addr(ADMIN), "/readyz") {
            Ok((503, _)) => break "503",
            Err(_) => break "no answer",
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "still ready 5 s after SIGTERM:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(10));
    };
    println!("/readyz while draining: {draining}");
    assert_eq!(draining, "503", "the admin server answers while draining");
    let (code, _) = http_get(&t.node, addr(ADMIN), "/healthz").expect("healthz while draining");
    assert_eq!(code, 200, "alive while draining");
    held.shutdown(Shutdown::Write).expect("close");
    let mut rest = Vec::new();
    let _ = held.read_to_end(&mut rest);
    drop(held);
    let status = agent.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}\n{}", agent.log());
    assert!(
        http_get(&t.node, addr(ADMIN), "/readyz").is_err(),
        "admin server gone after exit"
    );
}

#[test]
fn access_log_lines_match_the_connections() {
    if !privileged("access_log_lines_match_the_connections") {
        return;
    }
    const K: usize = 5;
    let t = Topology::new(&["client", "server"]);
    let server = t.pod("server").clone();
    greeter(&server.ns, sa(server.ip4, 8080), "server");
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--capture",
        "10.201.2.0/24=8080",
    ]);
    let to = sa(server.ip4, 8080);
    // Connection i sends 1000 * (i + 1) bytes: each is recognisable by its size.
    let made = t.pod("client").ns.run(move || {
        (0..K)
            .map(|i| {
                let payload = vec![b'a' + i as u8; 1000 * (i + 1)];
                let (local, greeting) =
                    exchange(to, &payload).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                (local, payload.len() as u64, greeting.len() as u64)
            })
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        let closed: Vec<serde_json::Value> = agent
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "connection closed")
            .collect();
        if closed.len() >= K || Instant::now() > deadline {
            break closed;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(closed.len(), K, "one line per connection:\n{}", agent.log());
    for (local, sent, greeting) in &made {
        let line = closed
            .iter()
            .find(|l| l["span"]["src"].as_str() == Some(&local.to_string()))
            .unwrap_or_else(|| panic!("no line for {local}: {closed:?}"));
        let span = &line["span"];
        println!(
            "src {} dst {} proto {} upstream {} sent {} received {} duration_ms {}",
            span["src"],
            span["dst"],
            span["proto"],
            span["upstream"],
            line["bytes_sent"],
            line["bytes_received"],
            line["duration_ms"]
        );
        assert_eq!(span["dst"], to.to_string(), "{line}");
        assert_eq!(span["upstream"], to.to_string(), "{line}");
        assert!(
            span["proto"].as_str().is_some_and(|p| !p.is_empty()),
            "{line}"
        );
        assert_eq!(line["bytes_sent"].as_u64(), Some(*sent), "{line}");
        assert_eq!(
            line["bytes_received"].as_u64(),
            Some(greeting + sent),
            "greeting plus echo: {line}"
        );
        assert!(line["duration_ms"].as_u64().is_some(), "{line}");
    }
}

#[test]
fn config_dump_and_status_describe_the_agent() {
    if !privileged("config_dump_and_status_describe_the_agent") {
        return;
    }
    let t = Topology::new(&["client"]);
    let host_if = t.pod("client").host_if.clone();
    let _agent = t.start_agent(&["--interface", &host_if, "--capture", "10.201.2.0/24=8080"]);

    let dump = get_json(&t.node, addr(ADMIN), "/config_dump");
    println!(
        "config_dump: {}",
        serde_json::to_string(&dump).unwrap_or_default()
    );
    assert_eq!(dump["config"]["interfaces"], serde_json::json!([host_if]));
    assert_eq!(
        dump["config"]["capture"][0]["prefix"], "10.201.2.0/24",
        "{dump}"
    );
    assert_eq!(dump["config"]["admin_address"], ADMIN, "{dump}");
    assert!(dump.get("policy").is_some_and(|p| !p.is_null()), "{dump}");

    let status = get_json(&t.node, addr(ADMIN), "/status");
    println!(
        "status: {}",
        serde_json::to_string(&status).unwrap_or_default()
    );
    let names: Vec<&str> = status["capture"]["interfaces"]
        .as_array()
        .unwrap_or_else(|| panic!("capture.interfaces in {status}"))
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names, [host_if.as_str()], "{status}");
    assert_eq!(status["ready"], true, "{status}");
}

#[test]
fn access_log_can_be_switched_off() {
    if !privileged("access_log_can_be_switched_off") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let server = t.pod("server").clone();
    greeter(&server.ns, sa(server.ip4, 8080), "server");
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--capture",
        "10.201.2.0/24=8080",
        "--access-log",
        "false",
    ]);
    let to = sa(server.ip4, 8080);
    for _ in 0..3 {
        t.pod("client")
            .ns
            .run(move || exchange(to, b"hello\n"))
            .expect("proxied");
    }
    thread::sleep(Duration::from_millis(300));
    let lines = agent.log_lines();
    assert!(
        lines.iter().any(|l| l["message"] == "agent ready"),
        "other logs still flow"
    );
    assert!(
        !lines.iter().any(|l| l["message"] == "connection closed"),
        "no access log lines: {}",
        agent.log()
    );
    let (_, text) = http_get(&t.node, addr(ADMIN), "/metrics").expect("metrics");
    assert_eq!(
        sample_sum(&text, "mesh_tcp_connections_closed_total", &[]),
        Some(3.0),
        "the connections were proxied"
    );
}
