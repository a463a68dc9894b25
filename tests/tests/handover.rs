//! Zero-loss handover (issue 10): a new agent started with the same configuration while one
//! runs takes over its listeners and established connections; the old one exits by itself.
//!
//! Load through the agent during 5 consecutive takeovers and 2 policy reloads: 200 long-lived
//! TCP connections exchanging data every 50 ms (every echoed byte checked), HTTP/1.1 keep-alive
//! requests on a few connections, a gRPC server-streaming call (python3-grpcio) and a 64 MiB
//! transfer whose sha256 the server reports back. Zero errors allowed.
//!
//! There is no earlier release with handover, so "from the previous release" is covered by the
//! protocol's refusal of a peer that speaks another version, tested here both ways.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    Topology,
    policy::{service, write_atomically},
    privileged,
};
use sha2::{Digest, Sha256};

const L4_VIP: &str = "10.96.7.10";
const SHA_VIP: &str = "10.96.7.11";
const WEB_VIP: &str = "10.96.7.12";
const GRPC_VIP: &str = "10.96.7.13";
const L4_CONNS: usize = 200;
const TAKEOVERS: usize = 5;
const TRANSFER: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Echoes every byte back, one thread per connection.
fn echo_server(l: TcpListener) {
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let mut s = s;
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Reads until EOF and answers the sha256 (hex) of what it read.
fn sha_server(l: TcpListener) {
    for s in l.incoming().flatten() {
        thread::spawn(move || {
            let mut s = s;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => h.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let _ = s.write_all(hex(&h.finalize()).as_bytes());
        });
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic bytes; the first is 0 so that protocol detection calls the stream opaque.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    if let Some(b) = v.first_mut() {
        *b = 0;
    }
    v
}

#[derive(Default)]
struct Tally {
    l4_rounds: AtomicU64,
    l4_errors: AtomicU64,
    http_ok: AtomicU64,
    http_failed: AtomicU64,
}

/// One HTTP/1.1 request on a keep-alive connection; the response must be a 200 from the echo
/// backend. A `Connection: close` answer is not a failure, the client reconnects.
fn http_request(s: &mut TcpStream, n: u64) -> Result<bool, String> {
    write!(s, "GET /r{n} HTTP/1.1\r\nHost: web\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => return Err(format!("EOF after {} bytes of head", head.len())),
            Ok(_) => head.push(b[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(format!("status: {}", head.lines().next().unwrap_or("")));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no content-length")?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&body);
    if !body.contains(&format!("\"/r{n}\"")) {
        return Err(format!("wrong body: {body}"));
    }
    Ok(head.contains("connection: close"))
}

#[test]
fn five_takeovers_under_load_drop_nothing() {
    if !privileged("handover") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let sip = server.ip4;
    // Backends in the server pod.
    for (port, f) in [
        (7000u16, echo_server as fn(TcpListener)),
        (7001, sha_server),
    ] {
        let l = server
            .ns
            .run(move || {
                TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
            })
            .expect("bind backend");
        thread::spawn(move || f(l));
    }
    server.ns.echo("web", 8080, &[]);
    let grpc = mesh_tests::support("grpc_server.py")
        .to_string_lossy()
        .to_string();
    server
        .ns
        .serve("/usr/bin/python3", &[grpc, "g".into(), "50051".into()]);

    let dir = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&dir).expect("scratch");
    let pfile = dir.join("policy.yaml");
    let policy = |extra: u8| {
        service("l4", ip(L4_VIP), 7000, 7000, &[IpAddr::V4(sip)])
            + &service("sha", ip(SHA_VIP), 7001, 7001, &[IpAddr::V4(sip)])
            + &service("web", ip(WEB_VIP), 80, 8080, &[IpAddr::V4(sip)])
            + &service("grpc", ip(GRPC_VIP), 50051, 50051, &[IpAddr::V4(sip)])
            // A reload changes something real: one more Service.
            + &service(
                &format!("extra{extra}"),
                ip(&format!("10.96.8.{extra}")),
                80,
                8080,
                &[IpAddr::V4(sip)],
            )
    };
    write_atomically(&pfile, &policy(1));
    let args = [
        "--interface",
        &client.host_if,
        "--policy",
        pfile.to_str().expect("utf8"),
        "--drain-timeout",
        "20s",
    ];
    let mut agent = t.start_agent(&args);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();

    // 200 long-lived L4 connections, 64 bytes each way every 50 ms.
    let l4: Vec<TcpStream> = client.ns.run(|| {
        (0..L4_CONNS)
            .map(|_| {
                TcpStream::connect_timeout(
                    &format!("{L4_VIP}:7000").parse().expect("addr"),
                    Duration::from_secs(5),
                )
                .expect("L4 connect")
            })
            .collect()
    });
    for (i, mut s) in l4.into_iter().enumerate() {
        let (stop, tally) = (stop.clone(), tally.clone());
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        workers.push(thread::spawn(move || {
            let mut round = 0u64;
            let mut back = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let msg = pattern((i as u64) << 32 | round, 64);
                let ok = s.write_all(&msg).is_ok()
                    && s.read_exact(&mut back).is_ok()
                    && back[..] == msg[..];
                if !ok {
                    tally.l4_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("L4 connection {i} failed in round {round}");
                    return;
                }
                tally.l4_rounds.fetch_add(1, Ordering::Relaxed);
                round += 1;
                thread::sleep(Duration::from_millis(50));
            }
        }));
    }

    // HTTP/1.1 keep-alive load on 4 connections.
    for w in 0..4u64 {
        let (stop, tally) = (stop.clone(), tally.clone());
        let ns = client.ns.clone();
        workers.push(ns.spawn(move || {
            let connect = || {
                let s = TcpStream::connect_timeout(
                    &format!("{WEB_VIP}:80").parse().expect("addr"),
                    Duration::from_secs(5),
                );
                if let Ok(s) = &s {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = s.set_nodelay(true);
                }
                s
            };
            let mut s = connect().expect("HTTP connect");
            let mut n = w << 40;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match http_request(&mut s, n) {
                    Ok(false) => tally.http_ok.fetch_add(1, Ordering::Relaxed),
                    Ok(true) => {
                        tally.http_ok.fetch_add(1, Ordering::Relaxed);
                        s = connect().expect("HTTP reconnect");
                        0
                    }
                    Err(e) => {
                        eprintln!("HTTP request {n} failed: {e}");
                        tally.http_failed.fetch_add(1, Ordering::Relaxed);
                        match connect() {
                            Ok(c) => s = c,
                            Err(_) => return,
                        }
                        0
                    }
                };
                thread::sleep(Duration::from_millis(2));
            }
        }));
    }

    // 64 MiB, paced to last about 12 s so that it spans several takeovers.
    let transfer = {
        let ns = client.ns.clone();
        ns.spawn(move || {
            let data = pattern(7, TRANSFER);
            let want = hex(&Sha256::digest(&data));
            let mut s = TcpStream::connect_timeout(
                &format!("{SHA_VIP}:7001").parse().expect("addr"),
                Duration::from_secs(5),
            )
            .expect("sha connect");
            s.set_read_timeout(Some(Duration::from_secs(60)))
                .expect("timeout");
            for c in data.chunks(CHUNK) {
                s.write_all(c).expect("64 MiB transfer write");
                thread::sleep(Duration::from_millis(12));
            }
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut got = String::new();
            s.read_to_string(&mut got).expect("sha answer");
            (want, got)
        })
    };

    // A server-streaming gRPC call of 40 replies, 100 ms apart, started before the first
    // takeover: its HTTP/2 connection gets GOAWAY and the stream finishes in the old agent.
    let grpc_call = {
        let ns = client.ns.clone();
        let script = mesh_tests::support("grpc_client.py");
        thread::spawn(move || {
            ns.cmd("/usr/bin/python3")
                .arg(script)
                .args([&format!("{GRPC_VIP}:50051"), "Ticks", "40:100", "30"])
                .output()
                .expect("grpc client")
        })
    };

    thread::sleep(Duration::from_millis(800));
    let mut figures = Vec::new();
    for n in 1..=TAKEOVERS {
        if n == 2 || n == 4 {
            // Policy reloads under the same load.
            let reloads = agent.log().matches("policy reloaded").count();
            write_atomically(&pfile, &policy(n as u8));
            let deadline = Instant::now() + Duration::from_secs(5);
            while agent.log().matches("policy reloaded").count() == reloads {
                assert!(Instant::now() < deadline, "no reload:\n{}", agent.log());
                thread::sleep(Duration::from_millis(20));
            }
            thread::sleep(Duration::from_millis(300));
        }
        let before = (
            tally.l4_rounds.load(Ordering::Relaxed),
            tally.http_ok.load(Ordering::Relaxed),
        );
        let started = Instant::now();
        let next = t.start_agent(&args);
        let ready = started.elapsed();
        let status = agent.wait_exit(Duration::from_secs(30));
        let took = started.elapsed();
        assert!(
            status.success(),
            "old agent exit {status}:\n{}",
            agent.log()
        );
        let old_log = agent.log();
        assert!(old_log.contains("connections handed over"), "{old_log}");
        // Nothing went wrong on the way out: no warning, nothing detached or removed.
        for bad in ["\"WARN\"", "\"ERROR\"", "programs detached", "removing"] {
            assert!(
                !old_log.contains(bad),
                "{bad} in the old agent's log:\n{old_log}"
            );
        }
        // The new agent replaced the program in place, through the pinned link.
        wait_log(&next, "\"replaced\":true");
        let moved = next_log_field(&next, "takeover complete", "moved_tcp");
        let moved_http = next_log_field(&next, "takeover complete", "moved_http1");
        figures.push(format!(
            "takeover {n}: new agent ready {} ms, old agent exited {} ms after the new one started; moved {moved} L4 + {moved_http} HTTP/1.1 connections",
            ready.as_millis(),
            took.as_millis()
        ));
        agent = next;
        // Traffic goes on through the new agent.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tally.l4_rounds.load(Ordering::Relaxed) < before.0 + L4_CONNS as u64
            || tally.http_ok.load(Ordering::Relaxed) <= before.1
        {
            assert!(
                Instant::now() < deadline,
                "traffic stalled after takeover {n}\n{}",
                agent.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    let (want, got) = transfer.join().expect("transfer thread");
    let grpc_out = grpc_call.join().expect("grpc thread");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let grpc: serde_json::Value = serde_json::from_slice(&grpc_out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&grpc_out.stderr)));
    for f in &figures {
        println!("{f}");
    }
    println!(
        "L4: {} rounds on {L4_CONNS} connections, {} errors; HTTP/1.1: {} requests, {} failed; gRPC stream: {} replies, {}; 64 MiB sha256 {}",
        tally.l4_rounds.load(Ordering::Relaxed),
        tally.l4_errors.load(Ordering::Relaxed),
        tally.http_ok.load(Ordering::Relaxed),
        tally.http_failed.load(Ordering::Relaxed),
        grpc["replies"].as_array().map_or(0, Vec::len),
        grpc["code"],
        if want == got { "intact" } else { "CHANGED" }
    );
    assert_eq!(
        tally.l4_errors.load(Ordering::Relaxed),
        0,
        "{}",
        agent.log()
    );
    assert_eq!(tally.http_failed.load(Ordering::Relaxed), 0);
    assert!(tally.http_ok.load(Ordering::Relaxed) > 100);
    assert_eq!(grpc["code"], "OK", "{grpc}");
    assert_eq!(grpc["replies"].as_array().map_or(0, Vec::len), 40, "{grpc}");
    assert_eq!(want, got, "64 MiB sha256");
    let metrics = t.node.http_get(mesh_tests::ADMIN, "/metrics");
    assert!(
        metrics.contains("mesh_handovers_total{result=\"done\"} 1"),
        "the last agent counted its takeover:\n{metrics}"
    );
}

/// Waits until the agent's log (written by a background thread) contains `text`.
fn wait_log(agent: &mesh_tests::Agent, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A field of the successor's log line with `message` (waits for it a little).
fn next_log_field(agent: &mesh_tests::Agent, message: &str, field: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = agent
            .log_lines()
            .iter()
            .find(|l| l["fields"]["message"] == message || l["message"] == message)
            .and_then(|l| l["fields"][field].as_u64().or(l[field].as_u64()))
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no {message:?} in:\n{}",
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A peer that speaks another protocol version is refused with a message that says so, in both
/// directions, and the running agent keeps serving.
#[test]
fn another_protocol_version_is_refused_clearly() {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, accept, bind, connect, listen, recv,
        send, socket,
    };
    if !privileged("handover") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let client = t.pod("client");
    let agent = t.start_agent(&["--interface", &client.host_if]);
    let path = mesh_agent::config::derived_handover_socket(&t.bpffs_dir, 15001);
    // The agent offers the socket once ready.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no handover socket at {}",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }

    // A successor of a future protocol: refused with the reason.
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    connect(fd.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("connect");
    send(
        fd.as_raw_fd(),
        br#"{"type":"hello","protocol":99,"version":"9.9.9","layout":1}"#,
        MsgFlags::empty(),
    )
    .expect("hello");
    let mut buf = [0u8; 4096];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("answer");
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        answer.contains("refused") && answer.contains("speaks handover protocol 1, the new one 99"),
        "{answer}"
    );
    drop(fd);
    wait_log(&agent, "a successor did not take over; still serving");
    let ready = t.node.http_get(mesh_tests::ADMIN, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 200") || ready.starts_with("HTTP/1.0 200"),
        "{ready}"
    );

    // A predecessor of a future protocol: the new agent stops with a message that says what to
    // do, and touches nothing.
    let dir = std::env::temp_dir().join(format!("{}-files", t.id));
    std::fs::create_dir_all(&dir).expect("scratch");
    let fake = dir.join("old.sock");
    let l = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    bind(l.as_raw_fd(), &UnixAddr::new(&fake).expect("addr")).expect("bind");
    listen(&l, nix::sys::socket::Backlog::new(1).expect("backlog")).expect("listen");
    let old = thread::spawn(move || {
        let c = accept(l.as_raw_fd()).expect("accept");
        let mut buf = [0u8; 4096];
        let _ = recv(c, &mut buf, MsgFlags::empty());
        let _ = send(
            c,
            br#"{"type":"listeners","protocol":99,"version":"9.9.9","layout":1,"v6":false,"admin":false}"#,
            MsgFlags::empty(),
        );
        thread::sleep(Duration::from_millis(500));
        let _ = nix::unistd::close(c);
    });
    let out = t
        .node
        .cmd(mesh_tests::agent_bin().to_str().expect("utf8"))
        .args([
            "run",
            "--interface",
            &client.host_if,
            "--bpffs-dir",
            &format!("{}-other", t.bpffs_dir.display()),
            "--admin-address",
            "127.0.0.1:15021",
            "--listen-port",
            "15002",
            "--handover-socket",
            fake.to_str().expect("utf8"),
        ])
        .output()
        .expect("second agent");
    let _ = old.join();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("speaks handover protocol 99") && err.contains("this agent speaks 1"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(format!("{}-other", t.bpffs_dir.display()));

    // A clean stop removes the socket file: no successor can come through it any more.
    let mut agent = agent;
    assert!(agent.terminate(Duration::from_secs(30)).success());
    assert!(!path.exists(), "{} left behind", path.display());
}

/// A successor that fails after it attached its program (here: on an interface that does not
/// exist) but before it said ready leaves the running agent serving with its own programs again.
#[test]
fn a_failed_successor_leaves_the_running_agent_serving() {
    if !privileged("handover") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let l = server
        .ns
        .run(|| TcpListener::bind("0.0.0.0:7000"))
        .expect("bind");
    thread::spawn(move || echo_server(l));
    let capture = format!("{}/32=7000", server.ip4);
    let agent = t.start_agent(&["--interface", &client.host_if, "--capture", &capture]);
    let dst: SocketAddr = SocketAddr::new(IpAddr::V4(server.ip4), 7000);
    let round_trip = |what: &str| {
        let what = what.to_string();
        client.ns.run(move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let msg = pattern(what.len() as u64, 100);
            s.write_all(&msg).expect("write");
            let mut back = vec![0u8; 100];
            s.read_exact(&mut back).expect("echo");
            assert_eq!(back, msg, "{what}");
        })
    };
    round_trip("before");
    let accepted = |a: &mesh_tests::Agent| a.log().matches("\"connection closed\"").count();
    let out = t
        .node
        .cmd(mesh_tests::agent_bin().to_str().expect("utf8"))
        .args([
            "run",
            "--bpffs-dir",
            t.bpffs_dir.to_str().expect("utf8"),
            "--interface",
            &client.host_if,
            "--interface",
            "nosuchif0",
            "--capture",
            &capture,
        ])
        .output()
        .expect("successor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("nosuchif0"), "{err}");
    wait_log(
        &agent,
        "a successor failed before it was ready; still serving",
    );
    wait_log(&agent, "programs attached again after a failed takeover");
    let before = accepted(&agent);
    round_trip("after");
    // Through the running agent, not around it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while accepted(&agent) == before {
        assert!(Instant::now() < deadline, "not proxied:\n{}", agent.log());
        thread::sleep(Duration::from_millis(20));
    }
}

/// Kubernetes mode, as a DaemonSet rolling update with `maxSurge: 1` runs it: the new pod's
/// agent takes over on the node; connections through a Service survive byte for byte, and the
/// status Lease changes holder at once (released on handover), not after its duration.
#[test]
fn kubernetes_mode_takeover_keeps_connections_and_hands_over_the_lease() {
    use mesh_tests::kube::{ApiServer, start_agent};
    if !privileged("handover") {
        return;
    }
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    let l = server
        .ns
        .run(|| TcpListener::bind("0.0.0.0:7000"))
        .expect("bind");
    thread::spawn(move || echo_server(l));
    let api = ApiServer::start_at(&t, "127.0.0.1:0");
    api.install_crds();
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {skiff.dev/mesh: enabled}}\n",
    );
    api.create_pod("shop", "client", "node-1", client.ip4, "app: client");
    api.apply(&service(
        "l4",
        ip(L4_VIP),
        7000,
        7000,
        &[IpAddr::V4(server.ip4)],
    ));
    // A lease far longer than the test: a holder change can only come from a release.
    let flags = |pod: &'static str| ["--pod-name", pod, "--lease-duration", "120s"];
    let mut old = start_agent(&t, &api, "node-1", &flags("skiff-old"));
    let holder = || {
        api.get("lease", "skiff-system", "skiff-mesh-status")["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder() != "skiff-old" {
        assert!(Instant::now() < deadline, "no lease holder:\n{}", old.log());
        thread::sleep(Duration::from_millis(50));
    }
    let dst: SocketAddr = format!("{L4_VIP}:7000").parse().expect("addr");
    let mut conns: Vec<TcpStream> = client.ns.run(move || {
        (0..20)
            .map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect"))
            .collect()
    });
    let check = |conns: &mut Vec<TcpStream>, round: u64| {
        for (i, s) in conns.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let msg = pattern(round << 8 | i as u64, 256);
            s.write_all(&msg).expect("write");
            let mut back = vec![0u8; 256];
            s.read_exact(&mut back).expect("echo");
            assert_eq!(back, msg, "connection {i} round {round}");
        }
    };
    check(&mut conns, 1);
    let started = Instant::now();
    let new = start_agent(&t, &api, "node-1", &flags("skiff-new"));
    let status = old.wait_exit(Duration::from_secs(30));
    let exited = started.elapsed();
    assert!(status.success(), "{status}:\n{}", old.log());
    check(&mut conns, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder() != "skiff-new" {
        assert!(
            Instant::now() < deadline,
            "lease still held by {:?}:\n{}",
            holder(),
            new.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let moved = next_log_field(&new, "takeover complete", "moved_tcp");
    println!(
        "kubernetes mode: old agent exited {} ms after the new one started, {moved} connections moved, lease holder skiff-new after {} ms",
        exited.as_millis(),
        started.elapsed().as_millis()
    );
    assert_eq!(moved, 20);
    // New connections go through the new agent.
    let mut fresh: Vec<TcpStream> = client.ns.run(move || {
        vec![TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect")]
    });
    check(&mut fresh, 3);
}
