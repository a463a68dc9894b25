//! Transparent capture end to end: pods' connections are taken by the TC program, proxied by the
//! agent to their original destination, and left alone when not targeted or when the agent is
//! gone (per the fail mode).
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Netns, Topology, counter, privileged,
    servers::{TIMEOUT, greeter, greeting, sa},
};
use sha2::{Digest, Sha256};

fn log_has_conn(lines: &[serde_json::Value], dst: &str) -> bool {
    lines
        .iter()
        .any(|l| l["message"] == "connection closed" && l["span"]["dst"].as_str() == Some(dst))
}

#[test]
fn service_vip_reaches_a_pod_through_the_agent() {
    if !privileged("service_vip_reaches_a_pod_through_the_agent") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "server");
    let vip: std::net::Ipv4Addr = "10.96.0.10".parse().expect("ip");
    t.kube_proxy_dnat(vip, 80, server.ip4, 8080);

    // Nothing owns the VIP and the node has no route for it: without the agent it fails.
    assert!(
        greeting(&client.ns, sa(vip, 80)).is_err(),
        "VIP must be unreachable without the agent"
    );

    let agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.96.0.0/16=80",
    ]);
    let g = greeting(&client.ns, sa(vip, 80)).expect("connect through agent");
    // The backend's peer is a node address (the agent), not the client pod.
    let node_addrs: Vec<String> = t
        .pods
        .iter()
        .map(|p| format!("peer={} server=server", p.gw4))
        .collect();
    assert!(
        node_addrs.contains(&g),
        "the agent connected to the backend: {g}"
    );
    thread::sleep(Duration::from_millis(200));
    assert!(
        log_has_conn(&agent.log_lines(), "10.96.0.10:80"),
        "agent saw the VIP as original destination:\n{}",
        agent.log()
    );
}

#[test]
fn targeted_port_goes_through_the_agent_untargeted_port_does_not() {
    if !privileged("targeted_port_goes_through_the_agent_untargeted_port_does_not") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "s8080");
    greeter(&server.ns, sa(server.ip4, 9090), "s9090");
    let agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.0.0/16=8000-8099",
    ]);
    let before = agent.counters();

    let via_agent = greeting(&client.ns, sa(server.ip4, 8080)).expect("8080");
    assert_eq!(via_agent, format!("peer={} server=s8080", server.gw4));
    let direct = greeting(&client.ns, sa(server.ip4, 9090)).expect("9090");
    assert_eq!(direct, format!("peer={} server=s9090", client.ip4));

    thread::sleep(Duration::from_millis(200));
    let after = agent.counters();
    let delta = |n: &str| counter(&after, n) - counter(&before, n);
    // One connection's packets were targeted and redirected: at least SYN, ACK, data, FIN, ACK.
    assert!(delta("targeted") >= 4, "targeted moved: {after}");
    assert!(delta("redirected") >= 4, "redirected moved: {after}");
    assert_eq!(
        delta("targeted"),
        delta("redirected"),
        "every targeted packet redirected: {after}"
    );
    assert!(
        delta("seen") > delta("targeted"),
        "the 9090 flow was seen but not targeted: {after}"
    );
    assert_eq!(delta("no_listener"), 0);
    assert_eq!(delta("errors"), 0);
}

/// The programs' own debug logs reach the agent's log (as `tracing` events of target
/// `mesh_ebpf`) when `--ebpf-log` is on, and are absent when it is off (the default).
#[test]
fn program_debug_logs_reach_the_agent_log_only_when_switched_on() {
    if !privileged("program_debug_logs_reach_the_agent_log_only_when_switched_on") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "s8080");
    let line = "targeted SYN to port 8080 assigned to the agent's listener";
    let args = [
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.0.0/16=8080",
    ];
    let filter = "info,mesh_ebpf=debug";

    let quiet = t.start_agent_logging(&args, filter);
    greeting(&client.ns, sa(server.ip4, 8080)).expect("through the agent, logs off");
    thread::sleep(Duration::from_millis(300));
    assert!(
        !quiet.log().contains(line),
        "logs are off by default:\n{}",
        quiet.log()
    );
    drop(quiet);

    let mut with_logs = args.to_vec();
    with_logs.extend(["--ebpf-log", "true"]);
    let loud = t.start_agent_logging(&with_logs, filter);
    greeting(&client.ns, sa(server.ip4, 8080)).expect("through the agent, logs on");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !loud.log().contains(line) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let log = loud.log();
    let record = log
        .lines()
        .find(|l| l.contains(line))
        .unwrap_or_else(|| panic!("the program's log line is in the agent's log:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(record).expect("a JSON log line");
    assert_eq!(v["level"], "DEBUG", "{record}");
}

#[test]
fn ipv6_destination_is_captured() {
    if !privileged("ipv6_destination_is_captured") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip6, 8080), "v6");
    let agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "fd00:201::/32=8080",
    ]);
    let g = greeting(&client.ns, sa(server.ip6, 8080)).expect("v6 through agent");
    assert_eq!(g, format!("peer={} server=v6", server.gw6));
    thread::sleep(Duration::from_millis(200));
    assert!(
        log_has_conn(&agent.log_lines(), &format!("[{}]:8080", server.ip6)),
        "{}",
        agent.log()
    );
}

/// Sends `size` bytes of a seeded stream on `s` while reading everything the peer sends; returns
/// (sha256 sent, sha256 received, seconds).
fn exchange(mut s: TcpStream, size: usize, seed: u8) -> ([u8; 32], [u8; 32], f64) {
    let start = Instant::now();
    let mut w = s.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut left = size;
        let mut x = seed as u32;
        while left > 0 {
            let n = left.min(chunk.len());
            for b in &mut chunk[..n] {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (x >> 24) as u8;
            }
            w.write_all(&chunk[..n]).expect("write");
            h.update(&chunk[..n]);
            left -= n;
        }
        w.shutdown(Shutdown::Write).expect("shutdown");
        <[u8; 32]>::from(h.finalize())
    });
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let sent = writer.join().expect("writer");
    (sent, h.finalize().into(), start.elapsed().as_secs_f64())
}

#[test]
fn sixty_four_mib_each_way_arrive_intact() {
    if !privileged("sixty_four_mib_each_way_arrive_intact") {
        return;
    }
    const SIZE: usize = 64 << 20;
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let _agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.2.2/32=7000",
    ]);
    let mut results = Vec::new();
    // 7000 is captured, 7001 is the same transfer direct, in the same run.
    for port in [7000u16, 7001] {
        let addr = sa(server.ip4, port);
        let l = server
            .ns
            .run(move || TcpListener::bind(addr).expect("bind"));
        let srv = thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            exchange(s, SIZE, 2)
        });
        let c = client
            .ns
            .run(move || TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect"));
        let (c_sent, c_got, secs) = exchange(c, SIZE, 1);
        let (s_sent, s_got, _) = srv.join().expect("server");
        assert_eq!(
            c_sent, s_got,
            "client->server bytes identical (port {port})"
        );
        assert_eq!(
            s_sent, c_got,
            "server->client bytes identical (port {port})"
        );
        results.push(secs);
    }
    let mib = |secs: f64| 2.0 * 64.0 / secs;
    println!(
        "64 MiB each way: through agent {:.2} s ({:.0} MiB/s both directions), direct {:.2} s ({:.0} MiB/s)",
        results[0],
        mib(results[0]),
        results[1],
        mib(results[1])
    );
}

#[test]
fn five_hundred_concurrent_connections_complete() {
    if !privileged("five_hundred_concurrent_connections_complete") {
        return;
    }
    const N: usize = 500;
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let addr = sa(server.ip4, 8080);
    let seen = greeter(&server.ns, addr, "many");
    let agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.2.0/24=8080",
    ]);
    let idle_rss = agent.rss_kib();
    // Open all N before using any, so all are open through the agent at once.
    let conns: Vec<TcpStream> = client.ns.run(move || {
        (0..N)
            .map(|i| {
                TcpStream::connect_timeout(&addr, TIMEOUT)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"))
            })
            .collect()
    });
    let mut conns: Vec<(usize, TcpStream)> = conns.into_iter().enumerate().collect();
    for (i, c) in &mut conns {
        c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        c.write_all(format!("hello {i}\n").as_bytes())
            .expect("write");
    }
    let deadline = Instant::now() + TIMEOUT;
    while seen.lock().expect("lock").len() < N && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let busy_rss = agent.rss_kib();
    for (i, c) in &mut conns {
        let want = format!("peer={} server=many\nhello {i}\n", server.gw4);
        let mut got = vec![0u8; want.len()];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(String::from_utf8_lossy(&got), want);
        c.shutdown(Shutdown::Write).expect("shutdown");
    }
    assert_eq!(seen.lock().expect("lock").len(), N);
    println!("agent RSS: idle {idle_rss} KiB, with {N} open connections {busy_rss} KiB");
}

fn refused_or_connected(ns: &Netns, addr: SocketAddr) -> (std::io::Result<String>, Duration) {
    let start = Instant::now();
    let r = greeting(ns, addr);
    (r, start.elapsed())
}

#[test]
fn killed_agent_fail_open_passes_traffic_directly() {
    if !privileged("killed_agent_fail_open_passes_traffic_directly") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "s");
    let mut agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.2.0/24=8080",
        "--fail-mode",
        "open",
    ]);
    assert_eq!(
        greeting(&client.ns, sa(server.ip4, 8080)).expect("via agent"),
        format!("peer={} server=s", server.gw4)
    );
    agent.kill();
    let (r, _) = refused_or_connected(&client.ns, sa(server.ip4, 8080));
    assert_eq!(
        r.expect("direct while agent is down"),
        format!("peer={} server=s", client.ip4)
    );
    let c = mesh_tests::read_counters(&t.bpffs_dir);
    assert!(
        counter(&c, "no_listener") >= 1 && counter(&c, "fail_open") >= 1,
        "{c}"
    );
}

#[test]
fn killed_agent_fail_closed_refuses_at_once() {
    if !privileged("killed_agent_fail_closed_refuses_at_once") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "s");
    greeter(&server.ns, sa(server.ip6, 8080), "s6");
    let capture = [
        "--capture",
        "10.201.2.0/24=8080",
        "--capture",
        "fd00:201:2::/64=8080",
    ];
    let mut agent = t.start_agent(
        &[
            &["--interface", &client.host_if, "--fail-mode", "closed"][..],
            &capture,
        ]
        .concat(),
    );
    assert!(greeting(&client.ns, sa(server.ip4, 8080)).is_ok());
    agent.kill();
    for dst in [sa(server.ip4, 8080), sa(server.ip6, 8080)] {
        let (r, took) = refused_or_connected(&client.ns, dst);
        let e = r.expect_err("fail-closed must refuse");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{dst}: {e}");
        assert!(
            took < Duration::from_secs(1),
            "{dst}: refused at once, not a timeout: {took:?}"
        );
    }
    let c = mesh_tests::read_counters(&t.bpffs_dir);
    assert!(counter(&c, "fail_closed") >= 2, "{c}");

    // A new agent takes over the pinned program in place, and traffic flows through it again.
    let _again = t.start_agent(
        &[
            &["--interface", &client.host_if, "--fail-mode", "closed"][..],
            &capture,
        ]
        .concat(),
    );
    assert_eq!(
        greeting(&client.ns, sa(server.ip4, 8080)).expect("after restart"),
        format!("peer={} server=s", server.gw4)
    );
}

#[test]
fn sigterm_drains_then_removes_everything_it_installed() {
    if !privileged("sigterm_drains_then_removes_everything_it_installed") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    greeter(&server.ns, sa(server.ip4, 8080), "s");
    let rules_before = t.node.sh(&["ip", "rule", "show"]).stdout;
    let mut agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.2.0/24=8080",
        "--drain-timeout",
        "15s",
    ]);
    assert_ne!(
        t.node.sh(&["ip", "rule", "show"]).stdout,
        rules_before,
        "capture rule installed"
    );

    // A connection open across SIGTERM keeps working during the drain.
    let addr = sa(server.ip4, 8080);
    let mut c = client
        .ns
        .run(move || TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect"));
    c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut greet = vec![0u8; format!("peer={} server=s\n", server.gw4).len()];
    c.read_exact(&mut greet).expect("greeting");
    let pid = agent.pid();
    let closer = thread::spawn(move || {
        thread::sleep(Duration::from_millis(500));
        c.write_all(b"still here\n").expect("write during drain");
        let mut back = [0u8; 11];
        c.read_exact(&mut back).expect("echo during drain");
        assert_eq!(&back, b"still here\n");
        c.shutdown(Shutdown::Write).expect("close");
    });
    let start = Instant::now();
    let status = agent.terminate(Duration::from_secs(20));
    closer.join().expect("drained connection worked");
    assert!(status.success(), "exit status {status}");
    assert!(
        // Well before the 15 s drain timeout; loose enough for an emulated CPU (xtask kernels).
        start.elapsed() < Duration::from_secs(10),
        "exited when the last connection closed, not at the drain timeout ({:?}):\n{}",
        start.elapsed(),
        agent.log()
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(
        t.node.sh(&["ip", "rule", "show"]).stdout,
        rules_before,
        "rules removed exactly"
    );
    let table = t.node.sh(&["ip", "route", "show", "table", "100"]).stdout;
    assert!(
        table.is_empty(),
        "local route removed: {}",
        String::from_utf8_lossy(&table)
    );
    assert!(!t.bpffs_dir.join("capture-h1").exists(), "link unpinned");
    // Detached: the targeted port now goes direct.
    assert_eq!(
        greeting(&client.ns, addr).expect("direct"),
        format!("peer={} server=s", client.ip4)
    );
}

/// A client that opens a connection from the same source port right after the agent ended the
/// previous one there (the agent closed first, so its side of that 4-tuple is in TIME_WAIT for
/// 60 s) connects at once, as it would without the mesh. Before `steer`, the SYN's new request
/// socket clashed with the TIME_WAIT socket and was dropped on every retransmission: the
/// connection timed out. A client under load reuses ports like this all the time.
#[test]
fn a_source_port_reused_within_time_wait_connects_at_once() {
    if !privileged("a_source_port_reused_within_time_wait_connects_at_once") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let addr = sa(server.ip4, 8080);
    // Answers a line and closes first, so that the agent ends the client's connection first.
    let listener = server
        .ns
        .run(move || TcpListener::bind(addr).expect("bind server"));
    thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(b"bye\n");
        }
    });
    let agent = t.start_agent(&[
        "--interface",
        &client.host_if,
        "--capture",
        "10.201.0.0/16=8080",
    ]);
    let before = agent.counters();
    for round in 0..3 {
        let started = Instant::now();
        let answer = client
            .ns
            .run(move || -> std::io::Result<String> {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&sa(Ipv4Addr::UNSPECIFIED, 40123).into())?;
                s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
                let mut s: TcpStream = s.into();
                s.set_read_timeout(Some(TIMEOUT))?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
            .unwrap_or_else(|e| panic!("round {round}: {e} after {:?}", started.elapsed()));
        let took = started.elapsed();
        assert_eq!(answer, "bye\n", "round {round}");
        // A dropped SYN is sent again after 1 s: anything near that is a drop, not a delay.
        assert!(
            took < Duration::from_millis(900),
            "round {round} took {took:?}:\n{}",
            agent.log()
        );
        eprintln!("round {round}: connected and answered in {took:?}");
        // The client's own side of the last connection must be gone before the port is reused.
        thread::sleep(Duration::from_millis(100));
    }
    let after = agent.counters();
    assert!(
        counter(&after, "syn_to_existing") >= counter(&before, "syn_to_existing") + 2,
        "the SYNs of rounds 1 and 2 met the TIME_WAIT socket: {after}"
    );
}
