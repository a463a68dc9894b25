//! `cargo xtask bench --only mtls`: what the mTLS tunnel costs, on two node namespaces joined by
//! an underlay veth (`mesh_tests::mtls::TwoNodes`, as in `tests/tests/mtls.rs`), each with its agent (the release build).
//!
//! Three paths from the client pod of node A to node B:
//! - **direct**: a port no agent captures;
//! - **plaintext through the agents**: a captured port of a pod that is not in the mesh (its
//!   namespace is not enrolled), so node A's agent forwards it without the tunnel;
//! - **tunnel**: a captured port of an enrolled pod: HTTP/2 CONNECT in mutual TLS 1.3 to node B's
//!   agent, which delivers it.
//!
//! Rows: iperf3 (one stream), the agents' CPU per GB moved, a new connection and its first
//! response (with a pooled tunnel connection, and right after node A's agent restarted, so with
//! a new TLS handshake), and latency at 1,000 requests/s over 10 kept-alive connections.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use mesh_tests::{
    Agent, Topology,
    mtls::{TwoNodes, pod},
};

use super::{
    data_path::listening,
    load::{self, quantile},
    procs::{self, Server, Spec},
};

/// HTTP (nginx, captured) and iperf3 (captured) on both server pods; the direct ports are not.
const HTTP: u16 = 7000;
const IPERF: u16 = 5201;
const HTTP_DIRECT: u16 = 7001;
const IPERF_DIRECT: u16 = 5202;
/// The backends' h2c ports are their HTTP port plus this.
const H2C_OFFSET: u16 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path3 {
    Direct,
    Plain,
    Tunnel,
}

impl Path3 {
    const ALL: [Path3; 3] = [Path3::Direct, Path3::Plain, Path3::Tunnel];
}

struct Lab {
    a: Topology,
    b: Topology,
    agents: Vec<Agent>,
    /// Killed on drop.
    _backends: Vec<Server>,
    bin: PathBuf,
    config_a: PathBuf,
    dir: PathBuf,
}

impl Lab {
    fn new(bin: &Path) -> anyhow::Result<Lab> {
        let nodes = TwoNodes::new(&["client"], 221, &["server", "plain"], 222);
        let (a, b, node_a, node_b) = (&nodes.a, &nodes.b, nodes.node_a, nodes.node_b);
        // The data-path bench's nginx backend (one worker, 200 "ok"): a Python echo server here
        // stalled for 0.2-0.5 s now and then, which made every path's p99 meaningless.
        let mut backends = Vec::new();
        for pod in ["server", "plain"] {
            let p = b.pod(pod);
            for port in [HTTP, HTTP_DIRECT] {
                let dir = nodes.dir.join(format!("nginx-{pod}-{port}"));
                std::fs::create_dir_all(&dir)?;
                let (ns, addr) = (p.ns.clone(), SocketAddr::from((p.ip4, port)));
                backends.push(Server::start(
                    Spec {
                        name: "backend nginx",
                        template: "backend-nginx.conf",
                        vars: vec![
                            ("H1_PORT", port.to_string()),
                            // h2c, unused here, on a port nothing captures.
                            ("H2_PORT", (port + H2C_OFFSET).to_string()),
                        ],
                        program: "nginx",
                        args: &["-c", "@CONF@", "-e", "stderr"],
                    },
                    &p.ns,
                    &dir,
                    || listening(&ns, addr),
                )?);
            }
        }
        let policy = [
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {skiff.dev/mesh: enabled}}\n"
                .to_string(),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}\n".to_string(),
            pod("client", "demo", "client", a.pod("client").ip4, node_a),
            pod("server", "demo", "server", b.pod("server").ip4, node_b),
            pod("plain", "plain", "plain", b.pod("plain").ip4, node_b),
            format!(
                "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: mesh, namespace: demo}}\n\
                 spec:\n  capture: [{{cidr: 10.222.0.0/16, ports: [{HTTP}, {IPERF}]}}]\n"
            ),
        ]
        .join("---\n");
        let policy_path = nodes.dir.join("policy.yaml");
        std::fs::write(&policy_path, policy)?;
        let config = |name: &str, node_ip: Ipv4Addr, ifaces: &[&str]| {
            nodes.config(
                name,
                Some(node_ip),
                ifaces,
                Some(&policy_path),
                "access_log: false\n",
            )
        };
        let config_a = config("a", node_a, &[&a.pod("client").host_if]);
        let config_b = config(
            "b",
            node_b,
            &[&b.pod("server").host_if, &b.pod("plain").host_if],
        );
        let agent_a = a.start_agent_bin(bin, &["--config", config_a.to_str().context("utf8")?]);
        let agent_b = b.start_agent_bin(bin, &["--config", config_b.to_str().context("utf8")?]);
        let TwoNodes { a, b, dir, .. } = nodes;
        Ok(Lab {
            a,
            b,
            agents: vec![agent_a, agent_b],
            _backends: backends,
            bin: bin.to_path_buf(),
            config_a,
            dir,
        })
    }

    fn addr(&self, p: Path3, http: bool) -> (Ipv4Addr, u16) {
        let server = self.b.pod("server").ip4;
        match (p, http) {
            (Path3::Direct, true) => (server, HTTP_DIRECT),
            (Path3::Direct, false) => (server, IPERF_DIRECT),
            (Path3::Plain, true) => (self.b.pod("plain").ip4, HTTP),
            (Path3::Plain, false) => (self.b.pod("plain").ip4, IPERF),
            (Path3::Tunnel, true) => (server, HTTP),
            (Path3::Tunnel, false) => (server, IPERF),
        }
    }

    fn server_ns(&self, p: Path3) -> &mesh_tests::Netns {
        match p {
            Path3::Plain => &self.b.pod("plain").ns,
            _ => &self.b.pod("server").ns,
        }
    }

    fn agent_cpu(&self) -> f64 {
        let pids: Vec<u32> = self
            .agents
            .iter()
            .flat_map(|a| procs::with_children(a.pid()))
            .collect();
        procs::cpu_seconds(&pids)
    }

    /// Stops node A's agent and starts a new one: its tunnel pool starts empty.
    fn restart_a(&mut self) -> anyhow::Result<()> {
        let mut old = self.agents.remove(0);
        old.terminate(Duration::from_secs(10));
        let config = self.config_a.to_str().context("utf8")?.to_string();
        let fresh = self.a.start_agent_bin(&self.bin, &["--config", &config]);
        self.agents.insert(0, fresh);
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    quantile(&v, 0.5)
}

/// Runs the section and returns its markdown table.
pub fn run(bin: &Path, rounds: usize, secs: f64) -> anyhow::Result<String> {
    let mut lab = Lab::new(bin)?;
    let client = lab.a.pod("client").ns.clone();
    let mut out = String::from(
        "| | direct | plaintext through the agents | mTLS tunnel | tunnel/direct | tunnel/plaintext |\n|---|---|---|---|---|---|\n",
    );
    let mut line = |name: &str, unit: &str, v: [f64; 3]| {
        let show = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else if unit == "Gbit/s" {
                format!("{x:.2} {unit}")
            } else {
                format!("{x:.0} {unit}")
            }
        };
        let ratio = |x: f64, y: f64| {
            if x.is_nan() || y.is_nan() || y == 0.0 {
                "-".to_string()
            } else {
                format!("{:.2}x", x / y)
            }
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            show(v[0]),
            show(v[1]),
            show(v[2]),
            ratio(v[2], v[0]),
            ratio(v[2], v[1])
        ));
    };

    // iperf3, one stream, and the agents' CPU per GB moved.
    let mut gbits = [Vec::new(), Vec::new(), Vec::new()];
    let mut cpu_per_gb = [Vec::new(), Vec::new(), Vec::new()];
    let mut machine_per_gb = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, p) in Path3::ALL.into_iter().enumerate() {
            let (ip, port) = lab.addr(p, false);
            let before = lab.agent_cpu();
            let machine_before = procs::machine_busy_seconds();
            let r = load::iperf3(&client, lab.server_ns(p), (ip, port).into(), port, 1, secs)
                .with_context(|| format!("iperf3 {p:?}"))?;
            let machine = procs::machine_busy_seconds() - machine_before;
            let cpu = lab.agent_cpu() - before;
            gbits[i].push(r.gbits);
            let gb = r.gb;
            cpu_per_gb[i].push(if p == Path3::Direct {
                f64::NAN
            } else {
                cpu / gb
            });
            machine_per_gb[i].push(machine / gb);
        }
    }
    let gbits = gbits.map(median);
    line("iperf3, 1 stream", "Gbit/s", gbits);
    line(
        "agents' CPU per GB (both nodes)",
        "ms",
        cpu_per_gb.map(|v| median(v) * 1000.0),
    );
    // Client, server, agents and kernel share the cores: at equal use of the machine, a path's
    // throughput goes as the inverse of this.
    let machine = machine_per_gb.map(|v| median(v) * 1000.0);
    line("whole machine's CPU per GB (iperf3 run)", "ms", machine);

    // New connection and first response, the tunnel connection pooled.
    let mut p50 = [f64::NAN; 3];
    let mut p99 = [f64::NAN; 3];
    for (i, p) in Path3::ALL.into_iter().enumerate() {
        let (ip, port) = lab.addr(p, true);
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
        // Warm-up: the tunnel connection is opened and pooled.
        load::new_connections(&client, addr, 5)?;
        let mut v = load::new_connections(&client, addr, 200 * rounds)
            .with_context(|| format!("new connections {p:?}"))?;
        v.sort_by(f64::total_cmp);
        p50[i] = quantile(&v, 0.5);
        p99[i] = quantile(&v, 0.99);
    }
    line("new connection + first response, p50", "us", p50);
    line("new connection + first response, p99", "us", p99);

    // 1,000 requests/s over 10 kept-alive connections.
    let mut r50 = [f64::NAN; 3];
    let mut r99 = [f64::NAN; 3];
    for (i, p) in Path3::ALL.into_iter().enumerate() {
        let (ip, port) = lab.addr(p, true);
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
        let r = load::constant_rate(
            &client,
            addr,
            1000.0,
            10,
            Duration::from_secs_f64(secs * rounds as f64),
        )
        .with_context(|| format!("1,000 req/s {p:?}"))?;
        r50[i] = quantile(&r.latencies_us, 0.5);
        r99[i] = quantile(&r.latencies_us, 0.99);
    }
    line("p50 at 1,000 req/s", "us", r50);
    line("p99 at 1,000 req/s", "us", r99);
    // The first connection after node A's agent restarted: a new TLS connection to node B.
    let mut cold = Vec::new();
    let (ip, port) = lab.addr(Path3::Tunnel, true);
    let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
    for _ in 0..rounds.max(3) {
        lab.restart_a()?;
        cold.extend(load::new_connections(&client, addr, 1)?);
    }
    line(
        "new connection + first response, new tunnel (agent restarted), median",
        "us",
        [f64::NAN, f64::NAN, median(cold)],
    );

    out.push_str(&format!(
        "\nAdded p99 at 1,000 req/s over direct: plaintext through the agents {:+.0} us, tunnel {:+.0} us.\n",
        r99[1] - r99[0],
        r99[2] - r99[0]
    ));
    // What 60 % of direct would take: the whole machine's CPU per GB at that rate, with every
    // core busy, is the most the path may cost.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let goal_gbit = 0.6 * gbits[0];
    out.push_str(&format!(
        "60 % of direct ({goal_gbit:.2} Gbit/s) on this machine's {cores} cores allows at most {:.0} ms \
         of CPU per GB for everything on the path, with every core busy; the tunnel took {:.0} ms, \
         the plaintext path through the agents {:.0} ms, direct {:.0} ms.\n",
        cores * 1000.0 / (goal_gbit / 8.0),
        machine[2],
        machine[1],
        machine[0]
    ));
    let _ = std::fs::remove_dir_all(&lab.dir);
    Ok(out)
}
