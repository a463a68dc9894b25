//! `cargo xtask bench`: end-to-end figures through the agent against the same traffic direct, in
//! one run, on one topology: bulk throughput (iperf3), connection setup plus one round trip
//! (p50/p99 over many connections), and agent memory idle and with 500 open connections.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{Netns, Topology, servers::sa};

use crate::util::build_agent;

const ROUND_TRIPS: usize = 2000;

pub fn run() -> anyhow::Result<()> {
    if !mesh_tests::privileged("bench") {
        anyhow::bail!("the benchmark needs root (BPF, network namespaces)");
    }
    let bin = build_agent(true)?;
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    // Captured ports 7000 (echo) and 5201 (iperf3); 7001 and 5202 are the same servers, direct.
    let agent = {
        let _guard = EnvBin::set(&bin);
        t.start_agent(&[
            "--interface",
            &client.host_if,
            "--capture",
            "10.201.2.2/32=5201,7000",
        ])
    };
    let idle_rss = agent.rss_kib();
    for port in [7000u16, 7001] {
        echo_server(&server.ns, sa(server.ip4, port));
    }

    println!("| measure | through agent | direct |");
    println!("|---|---|---|");
    let mut iperf = Vec::new();
    for port in ["5201", "5202"] {
        let mut srv = server.ns.cmd("iperf3");
        srv.args(["-s", "-1", "-p", port]);
        let mut srv = srv.spawn()?;
        thread::sleep(Duration::from_millis(300));
        let out = client
            .ns
            .cmd("iperf3")
            .args(["-c", &server.ip4.to_string(), "-p", port, "-t", "5", "-J"])
            .output()?;
        let _ = srv.wait();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        iperf.push(
            v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0)
                / 1e9,
        );
    }
    println!(
        "| iperf3 TCP, 5 s, one stream | {:.2} Gbit/s | {:.2} Gbit/s |",
        iperf[0], iperf[1]
    );

    let mut lat = Vec::new();
    for port in [7000u16, 7001] {
        lat.push(connect_round_trips(&client.ns, sa(server.ip4, port)));
    }
    for (label, q) in [("p50", 0.50), ("p99", 0.99)] {
        println!(
            "| connect + 1 round trip {label} ({ROUND_TRIPS} connections) | {:.0} µs | {:.0} µs |",
            quantile(&lat[0], q),
            quantile(&lat[1], q)
        );
    }

    let addr = sa(server.ip4, 7000);
    let conns: Vec<TcpStream> = client.ns.run(move || {
        (0..500)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
            .collect()
    });
    thread::sleep(Duration::from_millis(500));
    let busy_rss = agent.rss_kib();
    println!("| agent RSS idle | {} KiB | - |", idle_rss);
    println!(
        "| agent RSS with {} open connections | {} KiB | - |",
        conns.len(),
        busy_rss
    );
    drop(conns);
    Ok(())
}

/// Sets MESH_AGENT_BIN for the harness while alive (the bench runs the release build).
struct EnvBin;
impl EnvBin {
    fn set(bin: &std::path::Path) -> Self {
        // SAFETY: single-threaded at this point; the harness reads it when spawning the agent.
        unsafe { std::env::set_var("MESH_AGENT_BIN", bin) };
        EnvBin
    }
}
impl Drop for EnvBin {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { std::env::remove_var("MESH_AGENT_BIN") };
    }
}

fn echo_server(ns: &Netns, addr: SocketAddr) {
    let l = ns.run(move || TcpListener::bind(addr).expect("bind"));
    thread::spawn(move || {
        for c in l.incoming().flatten() {
            thread::spawn(move || {
                let mut c = c;
                let mut b = [0u8; 64];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Microseconds for connect + write 1 byte + read it back, per connection.
fn connect_round_trips(ns: &Netns, addr: SocketAddr) -> Vec<f64> {
    ns.run(move || {
        let mut v = Vec::with_capacity(ROUND_TRIPS);
        for _ in 0..ROUND_TRIPS {
            let start = Instant::now();
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s.write_all(b"x").expect("write");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("read");
            v.push(start.elapsed().as_secs_f64() * 1e6);
        }
        v
    })
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() as f64 - 1.0) * q) as usize]
}
