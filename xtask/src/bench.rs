//! `cargo xtask bench`: end-to-end figures through the agent against the same traffic direct, in
//! one run, on one topology: bulk throughput (iperf3), connection setup plus one round trip
//! (p50/p99 over many connections), and agent memory idle and with 500 open connections. Then
//! Kubernetes mode at scale ([`kubernetes`]).
mod cluster;
pub mod kubernetes;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{Netns, Topology, policy::service, servers::sa};

use crate::util::build_release;

const ROUND_TRIPS: usize = 2000;

/// The parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Throughput, latency and memory through the agent against direct.
    DataPath,
    /// Kubernetes mode with 10,000 Services: time to ready, memory, route edit latency.
    Kubernetes,
}

/// Runs `only` the given section, or every section.
pub fn run(only: Option<Section>) -> anyhow::Result<()> {
    if !mesh_tests::privileged("bench") {
        anyhow::bail!("the benchmark needs root (BPF, network namespaces)");
    }
    if only.is_none_or(|s| s == Section::DataPath) {
        data_path()?;
    }
    if only.is_none_or(|s| s == Section::Kubernetes) {
        println!();
        kubernetes::run()?;
    }
    Ok(())
}

fn data_path() -> anyhow::Result<()> {
    let (bin, _) = build_release()?;
    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client"), t.pod("server"));
    // Captured ports 7000 (echo) and 5201 (iperf3); 7001 and 5202 are the same servers, direct.
    // HTTP: nginx on the server pod's 8080, reached through the Service VIP 10.96.0.80:80 (the
    // agent's HTTP proxy: routing, header injection) or directly.
    let scratch = std::env::temp_dir().join(format!("{}-bench", t.id));
    std::fs::create_dir_all(&scratch)?;
    let policy = scratch.join("policy.yaml");
    std::fs::write(
        &policy,
        service(
            "web",
            "10.96.0.80".parse()?,
            80,
            8080,
            &[std::net::IpAddr::V4(server.ip4)],
        ),
    )?;
    nginx(&server.ns, &scratch)?;
    let agent = t.start_agent_bin(
        &bin,
        &[
            "--interface",
            &client.host_if,
            "--capture",
            "10.201.2.2/32=5201,7000",
            "--policy",
            &policy.to_string_lossy(),
        ],
    );
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

    let mut http = Vec::new();
    for url in [
        "http://10.96.0.80/".to_string(),
        format!("http://{}:8080/", server.ip4),
    ] {
        let out = client
            .ns
            .cmd("wrk")
            .args(["-t", "1", "-c", "16", "-d", "5s", "--latency", &url])
            .output()?;
        http.push(wrk_figures(&String::from_utf8_lossy(&out.stdout)));
    }
    println!(
        "| HTTP/1.1 requests/s (wrk, 16 connections, 5 s, nginx backend) | {:.0} | {:.0} |",
        http[0].0, http[1].0
    );
    println!("| HTTP/1.1 latency p50 | {} | {} |", http[0].1, http[1].1);
    println!("| HTTP/1.1 latency p99 | {} | {} |", http[0].2, http[1].2);

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

/// Requests/s, p50 and p99 from wrk's `--latency` report.
fn wrk_figures(report: &str) -> (f64, String, String) {
    let rps = report
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let pct = |p: &str| {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(p).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| "?".into())
    };
    (rps, pct("50%"), pct("99%"))
}

/// nginx answering `ok` on 8080 in `ns`, with every file it writes under `dir`.
fn nginx(ns: &Netns, dir: &std::path::Path) -> anyhow::Result<()> {
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             server {{ listen 8080; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
        ),
    )?;
    let mut child = ns
        .cmd("nginx")
        .args(["-c", &conf.to_string_lossy(), "-p", &d.to_string()])
        .spawn()?;
    thread::sleep(Duration::from_millis(500));
    if let Some(status) = child.try_wait()? {
        anyhow::bail!(
            "nginx exited: {status}: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
    }
    // Reaped when the topology's teardown kills it.
    thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
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
