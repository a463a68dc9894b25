//! Hostile input to a running agent: policy files of tens of MiB, deep nesting and YAML alias
//! bombs are refused on reload within a second or two, with an error naming the file and the
//! reason, without the agent's memory growing, while the last good policy stays in force; and
//! the admin server refuses oversized heads and answers 503 past its connection limit.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use mesh_tests::{
    ADMIN, Topology,
    policy::{service, write_atomically},
    privileged,
};

const VIP: &str = "10.96.8.10";

fn scratch(t: &Topology) -> PathBuf {
    let d = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// `GET /` through the VIP from the client pod: the status code.
fn status_through_vip(t: &Topology) -> u16 {
    let vip: IpAddr = VIP.parse().expect("vip");
    t.pod("client").ns.run(move || {
        let addr = SocketAddr::new(vip, 80);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
    })
}

fn metric(t: &Topology, series: &str) -> u64 {
    t.node
        .http_get(ADMIN, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Replaces the policy file with `len` bytes made by `fill` (a sparse file when `fill` is
/// `None`), atomically.
fn replace_policy(path: &Path, text: Option<&str>, len: u64) {
    let tmp = path.with_extension("tmp");
    match text {
        Some(text) => std::fs::write(&tmp, text).expect("write"),
        None => std::fs::File::create(&tmp)
            .and_then(|f| f.set_len(len))
            .expect("sparse file"),
    }
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn hostile_policy_files_are_refused_and_the_last_good_policy_stays() {
    if !privileged("hostile_policy_files_are_refused_and_the_last_good_policy_stays") {
        return;
    }
    let t = Topology::new(&["client", "web"]);
    let dir = scratch(&t);
    t.pod("web").ns.echo("web", 8080, &[]);
    let policy = dir.join("policy.yaml");
    let good = service(
        "web",
        VIP.parse().expect("vip"),
        80,
        8080,
        &[IpAddr::V4(t.pod("web").ip4)],
    );
    write_atomically(&policy, &good);
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        policy.to_str().expect("utf8"),
    ]);
    assert_eq!(status_through_vip(&t), 200);
    let rss_before = agent.rss_kib();

    let mut laughs = good.clone();
    laughs.push_str("---\na0: &a0 [\"lol\"]\n");
    for level in 1..10 {
        let refs = vec![format!("*a{}", level - 1); 10].join(", ");
        laughs.push_str(&format!("a{level}: &a{level} [{refs}]\n"));
    }
    // Just under the size limit: nesting only.
    let deep = "[".repeat(4 * 1024 * 1024 - 64);
    let rejected = "mesh_policy_reloads_total{result=\"rejected\"}";
    let cases: [(&str, Option<&str>, u64, &str); 3] = [
        ("alias bomb", Some(&laughs), 0, "once aliases are expanded"),
        ("deep nesting", Some(&deep), 0, "flow collection"),
        ("40 MiB", None, 40 << 20, "too large"),
    ];
    for (name, text, len, reason) in cases {
        let before = metric(&t, rejected);
        let started = Instant::now();
        replace_policy(&policy, text, len);
        while metric(&t, rejected) == before {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{name}: no rejection within 10 s\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{name}: refused {:?} after the write", started.elapsed());
        let log = agent.log();
        assert!(
            log.lines()
                .any(|l| l.contains("policy.yaml") && l.contains(reason)),
            "{name}: the error names the file and the reason:\n{log}"
        );
        assert_eq!(
            status_through_vip(&t),
            200,
            "{name}: the last good policy serves"
        );
    }
    let rss_after = agent.rss_kib();
    eprintln!("agent RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 128 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // A good policy still loads afterwards.
    write_atomically(&policy, &good);
    let applied = "mesh_policy_reloads_total{result=\"applied\"}";
    let started = Instant::now();
    while metric(&t, applied) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn admin_server_bounds_heads_and_connections() {
    if !privileged("admin_server_bounds_heads_and_connections") {
        return;
    }
    let t = Topology::new(&["client"]);
    let dir = scratch(&t);
    let policy = dir.join("policy.yaml");
    write_atomically(&policy, "");
    let agent = t.start_agent(&[
        "--interface",
        &t.pod("client").host_if,
        "--policy",
        policy.to_str().expect("utf8"),
    ]);
    let answers = t.node.run(|| {
        let send = |s: &mut TcpStream, bytes: &[u8]| {
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let _ = s.write_all(bytes);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        };
        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let mut s = TcpStream::connect(ADMIN).expect("connect");
        let large = send(&mut s, big.as_bytes());
        // Hold many idle connections: past the limit, new ones are answered 503 at once.
        let held: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(ADMIN).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut s = TcpStream::connect(ADMIN).expect("connect");
        let busy = send(&mut s, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n");
        drop(held);
        std::thread::sleep(Duration::from_millis(300));
        let mut s = TcpStream::connect(ADMIN).expect("connect");
        let ok = send(
            &mut s,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        );
        (large, busy, ok)
    });
    let (large, busy, ok) = answers;
    assert!(large.starts_with("HTTP/1.1 431"), "{large}");
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}\n{}", agent.log());
}
