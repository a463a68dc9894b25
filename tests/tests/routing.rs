//! Policy-driven routing of captured connections: TLS by SNI without terminating, TCP routes with
//! weighted backends and dead endpoints, and live policy reloads under load.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Topology, agent_bin,
    policy::{service, write_atomically},
    privileged,
    servers::{greeter, greeting, sa},
    tls::Ca,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn scratch(t: &Topology) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

#[test]
fn tls_is_routed_by_sni_and_never_terminated() {
    if !privileged("tls_is_routed_by_sni_and_never_terminated") {
        return;
    }
    let t = Topology::new(&["client", "a", "b", "fallback"]);
    let dir = scratch(&t);
    let ca = Ca::new(&dir.join("ca"));
    let (a_cert, a_key) = ca.leaf("a", &["a.example.com"]);
    let (b_cert, b_key) = ca.leaf("b", &["*.b.example.com"]);
    let (f_cert, f_key) = ca.leaf("fallback", &["*.example.com"]);
    for (pod, cert, key) in [
        ("a", &a_cert, &a_key),
        ("b", &b_cert, &b_key),
        ("fallback", &f_cert, &f_key),
    ] {
        t.pod(pod).ns.echo(
            pod,
            8443,
            &[
                "--tls",
                cert.to_str().expect("utf8"),
                key.to_str().expect("utf8"),
            ],
        );
    }
    let vip = ip("10.96.0.30");
    let ep = |p: &str| IpAddr::V4(t.pod(p).ip4);
    let policy = [
        service("front", vip, 443, 8443, &[ep("fallback")]),
        service("svc-a", ip("10.96.0.31"), 443, 8443, &[ep("a")]),
        service("svc-b", ip("10.96.0.32"), 443, 8443, &[ep("b")]),
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: to-a, namespace: mesh-test}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: front, port: 443}]\n  hostnames: [a.example.com]\n  \
         rules:\n  - backendRefs: [{name: svc-a, port: 443}]\n"
            .to_string(),
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: to-b, namespace: mesh-test}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: front, port: 443}]\n  hostnames: [\"*.b.example.com\"]\n  \
         rules:\n  - backendRefs: [{name: svc-b, port: 443}]\n"
            .to_string(),
    ]
    .concat();
    let pfile = dir.join("policy.yaml");
    write_atomically(&pfile, &policy);
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
    ]);

    for (host, backend) in [
        ("a.example.com", "a"),
        ("x.b.example.com", "b"),
        ("c.example.com", "fallback"),
    ] {
        let out = t
            .pod("client")
            .ns
            .cmd("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                ca.cert.to_str().expect("utf8"),
            ])
            .args([
                "--resolve",
                &format!("{host}:443:{vip}"),
                &format!("https://{host}/hello"),
            ])
            .output()
            .expect("curl");
        // curl verified the certificate chain and the name: the backend's own certificate reached
        // the client, so the agent did not terminate TLS.
        assert!(
            out.status.success(),
            "{host}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(body["backend"], backend, "{host}");
        assert_eq!(body["path"], "/hello");
    }
    thread::sleep(Duration::from_millis(200));
    let lines = agent.log_lines();
    let routed = lines
        .iter()
        .filter(|l| l["message"] == "connection closed")
        .map(|l| {
            (
                l["span"]["sni"].as_str().unwrap_or("").to_string(),
                l["span"]["route"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect::<Vec<_>>();
    assert!(
        routed.contains(&("a.example.com".into(), "TLSRoute mesh-test/to-a".into())),
        "{routed:?}"
    );
    assert!(
        routed.contains(&("c.example.com".into(), String::new())),
        "unknown SNI: no route: {routed:?}"
    );
}

fn tcp_policy(t: &Topology, weights: (u32, u32), dead: Ipv4Addr) -> String {
    let ep = |p: &str| IpAddr::V4(t.pod(p).ip4);
    [
        service("tcp-front", ip("10.96.0.40"), 9000, 9000, &[ep("x")]),
        service("svc-x", ip("10.96.0.41"), 9000, 9000, &[ep("x"), IpAddr::V4(dead)]),
        service("svc-y", ip("10.96.0.42"), 9000, 9000, &[ep("y")]),
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {{name: split, namespace: mesh-test}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: tcp-front, port: 9000}}]\n  \
             rules:\n  - backendRefs:\n    - {{name: svc-x, port: 9000, weight: {}}}\n    - {{name: svc-y, port: 9000, weight: {}}}\n",
            weights.0, weights.1
        ),
    ]
    .concat()
}

/// Which server answered (`x` or `y`), from the greeting.
fn answered(g: &str) -> String {
    g.rsplit("server=").next().unwrap_or_default().to_string()
}

#[test]
fn tcp_route_splits_by_weight_and_skips_a_dead_endpoint() {
    if !privileged("tcp_route_splits_by_weight_and_skips_a_dead_endpoint") {
        return;
    }
    const N: usize = 2000;
    let t = Topology::new(&["client", "x", "y", "dead"]);
    greeter(&t.pod("x").ns, sa(t.pod("x").ip4, 9000), "x");
    greeter(&t.pod("y").ns, sa(t.pod("y").ip4, 9000), "y");
    let dir = scratch(&t);
    let pfile = dir.join("policy.yaml");
    // The "dead" pod exists but nothing listens on 9000: connecting is refused.
    write_atomically(&pfile, &tcp_policy(&t, (90, 10), t.pod("dead").ip4));
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
    ]);
    let vip = sa(ip("10.96.0.40"), 9000);
    let counts = t.pod("client").ns.run(move || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for i in 0..N {
            let g = greeting_here(vip).unwrap_or_else(|e| panic!("connection {i} failed: {e}"));
            *counts.entry(answered(&g)).or_default() += 1;
        }
        counts
    });
    let x = counts.get("x").copied().unwrap_or(0) as f64 / N as f64;
    println!(
        "TCPRoute 90/10 over {N} connections: x {:.3}, y {:.3}",
        x,
        1.0 - x
    );
    assert_eq!(
        counts.values().sum::<usize>(),
        N,
        "every connection answered: {counts:?}"
    );
    assert!(
        (x - 0.9).abs() <= 0.05,
        "x share {x:.3} not within 0.90 +/- 0.05: {counts:?}"
    );
    assert!(
        agent.log().contains("endpoint ejected"),
        "the dead endpoint was ejected"
    );
}

/// `greeting` for callers already inside the namespace.
fn greeting_here(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    s.write_all(b"bye")?;
    if line.is_empty() {
        return Err(std::io::Error::other("closed without a greeting"));
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[test]
fn policy_reloads_under_load_without_failing_a_connection() {
    if !privileged("policy_reloads_under_load_without_failing_a_connection") {
        return;
    }
    let t = Topology::new(&["client", "x", "y", "z"]);
    for p in ["x", "y", "z"] {
        greeter(
            &t.pod(p).ns,
            sa(t.pod(p).ip4, 9000),
            ["x", "y", "z"].into_iter().find(|n| *n == p).expect("name"),
        );
    }
    let dir = scratch(&t);
    let pfile = dir.join("policy.yaml");
    let unused = t.pod("z").ip4;
    write_atomically(&pfile, &tcp_policy(&t, (1, 0), unused));
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
    ]);

    // A load generator opens connections back to back for the whole test.
    let vip = sa(ip("10.96.0.40"), 9000);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let last = Arc::new(std::sync::Mutex::new(String::new()));
    let load = {
        let (stop, ok, failed, last) = (stop.clone(), ok.clone(), failed.clone(), last.clone());
        t.pod("client").ns.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match greeting_here(vip) {
                    Ok(g) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        *last.lock().expect("lock") = answered(&g);
                    }
                    Err(e) => {
                        eprintln!("load generator: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let wait_for = |who: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while *last.lock().expect("lock") != who {
            assert!(
                Instant::now() < deadline,
                "routing did not follow to {who}:\n{}",
                agent.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("x");

    // 1. Valid: everything to y, and a new Service VIP that the kernel must start capturing.
    let new_vip = ip("10.96.0.50");
    let extra = service("late", new_vip, 9100, 9000, &[IpAddr::V4(t.pod("z").ip4)]);
    write_atomically(&pfile, &(tcp_policy(&t, (0, 1), unused) + &extra));
    wait_for("y");
    let g =
        greeting(&t.pod("client").ns, sa(new_vip, 9100)).expect("new VIP captured after reload");
    assert!(g.ends_with("server=z"), "{g}");

    // 2. Invalid: a backendRef to a port the Service does not have. Rejected, y stays.
    let bad = tcp_policy(&t, (1, 0), unused)
        .replace("name: svc-x, port: 9000", "name: svc-x, port: 9999")
        + &extra;
    write_atomically(&pfile, &bad);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("policy rejected") {
        assert!(
            Instant::now() < deadline,
            "invalid policy not reported:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        *last.lock().expect("lock"),
        "y",
        "the last good policy stays in force"
    );
    let check = std::process::Command::new(agent_bin())
        .args(["check", "--policy", pfile.to_str().expect("utf8")])
        .output()
        .expect("check");
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    assert!(
        err.contains("TCPRoute mesh-test/split")
            && err.contains("backendRefs[0]")
            && err.contains("9999"),
        "{err}"
    );

    // 3. Valid again: back to x.
    write_atomically(&pfile, &(tcp_policy(&t, (1, 0), unused) + &extra));
    wait_for("x");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load generator");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "reload under load: {ok} connections succeeded, {failed} failed, across 3 policy changes"
    );
    assert_eq!(failed, 0, "no connection may fail across reloads");
    assert!(ok > 50, "the load generator ran: {ok}");
    let log = agent.log();
    assert_eq!(
        log.matches("policy reloaded").count(),
        2,
        "two valid reloads:\n{log}"
    );
    let mut agent = agent;
    let status = agent.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "clean exit with a policy watcher running: {status}\n{}",
        agent.log()
    );
}
