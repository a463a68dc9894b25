//! `cargo xtask bench --only data-path`: the agent against direct, HAProxy and nginx on one
//! topology, in one run.
//!
//! Client pod -> node namespace -> server pod (the harness's [`Topology`]). The server pod runs
//! nginx answering 200 (`bench/peers/backend-nginx.conf`). The agent captures the client pod's
//! traffic transparently: HTTP to two Service VIPs (HTTP/1.1 and h2c/gRPC), each through an
//! HTTPRoute, and two L4 ports. HAProxy and nginx listen in the node namespace as explicit
//! proxies to the same backend (`bench/peers/`). Every proxy adds the same two request headers
//! (`x-request-id` and a W3C `traceparent`; the agent's `x-forwarded-*` is switched off by a
//! MeshPolicy) and has two threads (`MESH_WORKERS=2`, `nbthread 2`, `worker_processes 2`).
//!
//! Each scenario runs every target once per round, rounds interleaved, and the table shows the
//! median and the range over rounds. A scenario that fails marks its cells `failed` with the
//! reason printed; the rest still runs.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Agent, Topology, policy::service};

use super::{
    load::{self, quantile},
    procs::{self, Server, Spec},
    table::{Better, Row, Target, Unit},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const H2_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 81);
const BACKEND_H1: u16 = 8080;
const BACKEND_H2: u16 = 8081;
/// The peers' listeners in the node namespace: HTTP/1.1 and h2c.
const HAPROXY_PORTS: (u16, u16) = (8001, 8011);
const NGINX_PORTS: (u16, u16) = (8002, 8012);
/// HAProxy's TCP listener in the node namespace, to the direct iperf3 port.
const HAPROXY_L4: u16 = 8021;
/// L4 ports on the server pod: the captured one goes through the agent, the other is direct
/// (and is the "untargeted" traffic the programs look at and pass).
const IPERF_CAPTURED: u16 = 5201;
const IPERF_DIRECT: u16 = 5202;
const IDLE_CAPTURED: u16 = 7000;
/// The fd limit (hard) on these machines; the bench raises its soft limit to it.
const IDLE_CONNECTIONS: usize = 8000;
/// The gRPC-shaped request body: a 5-byte gRPC frame header and a 5-byte message.
const GRPC_BODY: &[u8] = b"\x00\x00\x00\x00\x05hello";

/// How long and how often: the full run, or `--quick` (every scenario once, briefly, to check
/// that each completes).
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub rounds: usize,
    pub secs: f64,
    pub new_connections: usize,
    pub idle_connections: usize,
}

impl Plan {
    pub const FULL: Plan = Plan {
        rounds: 3,
        secs: 5.0,
        new_connections: 2000,
        idle_connections: IDLE_CONNECTIONS,
    };
    pub const QUICK: Plan = Plan {
        rounds: 1,
        secs: 1.0,
        new_connections: 100,
        idle_connections: 200,
    };
}

/// The running topology: backend, agent and peers.
struct Lab {
    t: Topology,
    agent: Agent,
    /// Kept for its lifetime (killed on drop).
    _backend: Server,
    haproxy: Result<Server, String>,
    nginx: Result<Server, String>,
    dir: PathBuf,
}

/// What the rounds measured: the table, and latency curves for the plots.
pub struct Results {
    pub rows: Vec<Row>,
    /// Per target, the sorted latencies at 1,000 req/s of the last round.
    pub curves: Vec<(Target, Vec<f64>)>,
    /// Per proxy: RSS idle, at 1,000 req/s, after load (KiB).
    pub rss: Vec<(Target, [Option<f64>; 3])>,
}

impl Lab {
    fn start(agent_bin: &Path, agent_env: &[(&str, &str)]) -> anyhow::Result<Lab> {
        // The control pod's veth has no program: the eBPF rows' untargeted baseline.
        let t = Topology::new(&["client", "server", "control"]);
        let dir = std::env::temp_dir().join(format!("{}-bench", t.id));
        std::fs::create_dir_all(&dir)?;
        let (client, server) = (t.pod("client").clone(), t.pod("server").clone());
        let backend_ns = server.ns.clone();
        let backend = Server::start(
            Spec {
                name: "backend nginx",
                template: "backend-nginx.conf",
                vars: vec![
                    ("H1_PORT", BACKEND_H1.to_string()),
                    ("H2_PORT", BACKEND_H2.to_string()),
                ],
                program: "nginx",
                args: &["-c", "@CONF@", "-e", "stderr"],
            },
            &server.ns,
            &dir,
            || listening(&backend_ns, SocketAddr::from((server.ip4, BACKEND_H1))),
        )?;
        let policy = dir.join("policy.yaml");
        std::fs::write(&policy, policy_text(server.ip4, false))?;
        let policy_s = policy.display().to_string();
        let capture = format!("{}/32={IPERF_CAPTURED},{IDLE_CAPTURED}", server.ip4);
        let agent = t.start_agent_bin_env(
            agent_bin,
            &[
                "--interface",
                &client.host_if,
                "--capture",
                &capture,
                "--policy",
                &policy_s,
            ],
            &[
                ("MESH_WORKERS", "2"),
                // No access log lines (per connection or per request), as the peers log none.
                ("MESH_ACCESS_LOG", "false"),
            ]
            .into_iter()
            .chain(agent_env.iter().copied())
            .collect::<Vec<_>>(),
        );
        let node = t.node.clone();
        let backend_addr = |port| format!("{}:{port}", server.ip4);
        let haproxy = Server::start(
            Spec {
                name: "haproxy",
                template: "haproxy.cfg",
                vars: vec![
                    ("LISTEN_H1", format!("{}:{}", client.gw4, HAPROXY_PORTS.0)),
                    ("LISTEN_H2", format!("{}:{}", client.gw4, HAPROXY_PORTS.1)),
                    ("LISTEN_L4", format!("{}:{HAPROXY_L4}", client.gw4)),
                    ("BACKEND_H1", backend_addr(BACKEND_H1)),
                    ("BACKEND_H2", backend_addr(BACKEND_H2)),
                    ("BACKEND_L4", backend_addr(IPERF_DIRECT)),
                ],
                program: "haproxy",
                args: &["-db", "-f", "@CONF@"],
            },
            &t.node,
            &dir,
            || listening(&node, SocketAddr::from((client.gw4, HAPROXY_PORTS.0))),
        )
        .map_err(|e| format!("{e:#}"));
        let nginx = Server::start(
            Spec {
                name: "nginx",
                template: "nginx-proxy.conf",
                vars: vec![
                    ("LISTEN_H1", format!("{}:{}", client.gw4, NGINX_PORTS.0)),
                    ("LISTEN_H2", format!("{}:{}", client.gw4, NGINX_PORTS.1)),
                    ("BACKEND_H1", backend_addr(BACKEND_H1)),
                    ("BACKEND_H2", backend_addr(BACKEND_H2)),
                ],
                program: "nginx",
                args: &["-c", "@CONF@", "-e", "stderr"],
            },
            &t.node,
            &dir,
            || listening(&node, SocketAddr::from((client.gw4, NGINX_PORTS.0))),
        )
        .map_err(|e| format!("{e:#}"));
        for (name, peer) in [("HAProxy", &haproxy), ("nginx", &nginx)] {
            if let Err(e) = peer {
                eprintln!("{name} did not start; its cells will say failed: {e}");
            }
        }
        std::fs::write(dir.join("grpc-body"), GRPC_BODY)?;
        Ok(Lab {
            t,
            agent,
            _backend: backend,
            haproxy,
            nginx,
            dir,
        })
    }

    fn client(&self) -> &mesh_tests::Netns {
        &self.t.pod("client").ns
    }

    fn server_ip(&self) -> Ipv4Addr {
        self.t.pod("server").ip4
    }

    /// Where the client sends HTTP/1.1 (`h2 = false`) or h2c for `t`.
    fn http_addr(&self, t: Target, h2: bool) -> SocketAddr {
        let gw = self.t.pod("client").gw4;
        let pick = |(a, b): (u16, u16)| if h2 { b } else { a };
        match t {
            Target::Direct => SocketAddr::from((self.server_ip(), pick((BACKEND_H1, BACKEND_H2)))),
            Target::Agent => SocketAddr::from((if h2 { H2_VIP } else { WEB_VIP }, 80)),
            Target::Haproxy => SocketAddr::from((gw, pick(HAPROXY_PORTS))),
            Target::Nginx => SocketAddr::from((gw, pick(NGINX_PORTS))),
        }
    }

    /// The processes whose CPU and memory count for `t`; an error if it is not running.
    fn pids(&mut self, t: Target) -> anyhow::Result<Vec<u32>> {
        let peer = match t {
            Target::Direct => bail!("no proxy"),
            Target::Agent => return Ok(vec![self.agent.pid()]),
            Target::Haproxy => &mut self.haproxy,
            Target::Nginx => &mut self.nginx,
        };
        match peer {
            Ok(s) => {
                s.check_alive()?;
                Ok(s.pids())
            }
            Err(e) => bail!("did not start: {e}"),
        }
    }

    /// Fails if `t` is a peer that is not running.
    fn ready(&mut self, t: Target) -> anyhow::Result<()> {
        if t != Target::Direct {
            self.pids(t)?;
        }
        Ok(())
    }
}

/// Whether something accepts TCP connections at `addr` from `ns`.
/// Whether something accepts connections at `addr` in `ns`.
pub fn listening(ns: &mesh_tests::Netns, addr: SocketAddr) -> bool {
    ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
}

/// Services for the two VIPs, an HTTPRoute on each, and the header settings; `deny` adds an
/// authorization rule, which attaches the authorization program (every packet on the client's
/// link then goes through it, so only the last scenarios have it).
pub fn policy_text(server: Ipv4Addr, deny: bool) -> String {
    let route = |name: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: mesh-test}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {name}, port: 80}}]\n  rules:\n\
             \x20 - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n    backendRefs: [{{name: {name}, port: 80}}]\n"
        )
    };
    service("web", WEB_VIP.into(), 80, BACKEND_H1, &[server.into()])
        + &route("web")
        // appProtocol h2c: the agent then speaks h2 upstream, as HAProxy does (`proto h2`).
        + &service("h2", H2_VIP.into(), 80, BACKEND_H2, &[server.into()]).replace(
            "protocol: TCP}\n---",
            "protocol: TCP, appProtocol: kubernetes.io/h2c}\n---",
        )
        + &route("h2")
        // x-request-id and traceparent, as the peers add; not x-forwarded-*, which they do not.
        + "---\napiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: bench, namespace: mesh-system}\n\
           spec:\n  headers: {requestId: true, traceContext: true, forwarded: false}\n"
        + if deny {
            "\x20 authorization:\n    rules:\n\
             \x20   - {name: bench-deny, action: Deny, to: [10.201.2.0/24], ports: [5432], protocol: TCP}\n"
        } else {
            ""
        }
}

/// Runs every scenario under `plan` with the agent at `agent_bin`.
pub fn run(plan: Plan, agent_bin: &Path) -> anyhow::Result<Results> {
    run_with(plan, agent_bin, &[])
}

/// [`run`] with `agent_env` added to the agent's environment (`cargo xtask layout` traces the
/// agent this way).
pub fn run_with(
    plan: Plan,
    agent_bin: &Path,
    agent_env: &[(&str, &str)],
) -> anyhow::Result<Results> {
    let wanted = Scenarios::from_env()?;
    let mut lab = Lab::start(agent_bin, agent_env)?;
    let mut results = Results {
        rows: Vec::new(),
        curves: Vec::new(),
        rss: Vec::new(),
    };
    let idle_rss: Vec<(Target, anyhow::Result<f64>)> = Target::PROXIES
        .into_iter()
        .map(|t| (t, lab.pids(t).map(|p| procs::rss_kib(&p) as f64)))
        .collect();
    // What the idle RSS is made of: the heap and stacks, and the pages of the program and its
    // libraries that are mapped in (shared with any other process that maps the same files).
    let mut idle_parts = [
        Row::new(
            "RSS idle, anonymous (heap, stacks)",
            Unit::Kib,
            Better::Lower,
        ),
        Row::new(
            "RSS idle, file-backed (code, libraries)",
            Unit::Kib,
            Better::Lower,
        ),
    ];
    for t in Target::PROXIES {
        for (row, field) in idle_parts.iter_mut().zip(["RssAnon:", "RssFile:"]) {
            row.push(t, lab.pids(t).map(|p| procs::status_kib(&p, field) as f64));
        }
    }

    // Each check proves the target serves and adds both headers before anything is measured.
    let mut check = Row::new(
        "serves 200 with both headers added",
        Unit::Count,
        Better::Higher,
    );
    for t in Target::ALL {
        check.push(t, headers_check(&mut lab, t).map(|()| 1.0));
    }

    if wanted.has("http1") {
        for conns in [50, 16] {
            results.rows.extend(wrk_rows(&mut lab, plan, conns));
        }
    }
    let mut rss_1k = Vec::new();
    if wanted.has("rate") {
        for rate in [1000.0, 10_000.0] {
            let (rows, curves, rss) = rate_rows(&mut lab, plan, rate);
            results.rows.extend(rows);
            if rate == 1000.0 {
                results.curves = curves;
                rss_1k = rss;
            }
        }
    }
    if wanted.has("connect") {
        results.rows.extend(new_connection_rows(&mut lab, plan));
    }
    if wanted.has("h2") {
        results.rows.extend(h2_rows(&mut lab, plan));
    }
    if wanted.has("l4") {
        results.rows.extend(iperf_rows(&mut lab, plan));
    }

    let mut rss_rows = [
        Row::new("RSS idle", Unit::Kib, Better::Lower),
        Row::new("RSS at 1,000 req/s", Unit::Kib, Better::Lower),
        Row::new("RSS after load", Unit::Kib, Better::Lower),
    ];
    for (t, v) in idle_rss {
        rss_rows[0].push(t, v);
    }
    for (t, v) in rss_1k {
        rss_rows[1].push(t, v);
    }
    for t in Target::PROXIES {
        let after = lab.pids(t).map(|p| procs::rss_kib(&p) as f64);
        rss_rows[2].push(t, after);
    }
    for t in Target::PROXIES {
        let v = |i: usize| rss_rows[i].cell(t).median();
        results.rss.push((t, [v(0), v(1), v(2)]));
    }
    results.rows.extend(rss_rows);
    results.rows.extend(idle_parts);
    if wanted.has("idle") {
        results.rows.extend(idle_connection_rows(&mut lab, plan));
    }
    results.rows.push(check);
    if !wanted.has("ebpf") {
        return Ok(results);
    }
    // Last: they add the authorization program, which every packet of the client's link then
    // goes through.
    let policy = lab.dir.join("policy.yaml");
    let with_deny = policy_text(lab.server_ip(), true);
    results.rows.extend(super::ebpf::rows(
        &lab.t,
        &policy,
        &with_deny,
        plan.rounds,
        plan.secs,
        &lab.dir,
    ));
    Ok(results)
}

/// The scenarios `MESH_BENCH_SCENARIOS` names (comma-separated), or all of them: for comparing
/// two agent builds on a few rows without the whole run. The idle RSS rows and the header check
/// always run.
struct Scenarios(Option<Vec<String>>);

impl Scenarios {
    const ALL: [&str; 7] = ["http1", "rate", "connect", "h2", "l4", "idle", "ebpf"];

    fn from_env() -> anyhow::Result<Self> {
        let Ok(list) = std::env::var("MESH_BENCH_SCENARIOS") else {
            return Ok(Scenarios(None));
        };
        let names: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
        if let Some(bad) = names.iter().find(|n| !Self::ALL.contains(&n.as_str())) {
            bail!(
                "MESH_BENCH_SCENARIOS: unknown scenario {bad:?}; known: {}",
                Self::ALL.join(", ")
            );
        }
        Ok(Scenarios(Some(names)))
    }

    fn has(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|n| n.iter().any(|x| x == name))
    }
}

fn headers_check(lab: &mut Lab, t: Target) -> anyhow::Result<()> {
    lab.ready(t)?;
    let (status, body) = load::http_get(lab.client(), lab.http_addr(t, false), "/check")?;
    if status != 200 {
        bail!("GET /check: status {status}");
    }
    if t != Target::Direct
        && (body.contains("x-request-id= ") || body.trim_end().ends_with("traceparent="))
    {
        bail!("a header is missing: the backend saw {}", body.trim());
    }
    Ok(())
}

/// The CPU clock of a target's proxy processes, read before a run; `None` inside for direct,
/// which has no proxy (or when its processes could not be listed).
struct CpuMeter(Option<(Vec<u32>, f64)>);

impl CpuMeter {
    fn start(lab: &mut Lab, t: Target) -> Self {
        CpuMeter(lab.pids(t).ok().map(|p| {
            let before = procs::cpu_seconds(&p);
            (p, before)
        }))
    }

    /// The processes measured.
    fn pids(&self) -> Option<&[u32]> {
        self.0.as_ref().map(|(p, _)| p.as_slice())
    }

    /// User + system CPU seconds since `start`.
    fn seconds(&self) -> Option<f64> {
        self.0
            .as_ref()
            .map(|(p, before)| procs::cpu_seconds(p) - before)
    }

    /// User + system CPU microseconds per request since `start`, over `requests` requests.
    fn per_request(&self, requests: u64) -> Option<f64> {
        self.seconds().map(|s| s * 1e6 / requests as f64)
    }
}

/// wrk at `conns` connections: requests/s, p99, and (at 16) CPU per request.
fn wrk_rows(lab: &mut Lab, plan: Plan, conns: u32) -> Vec<Row> {
    let mut rps = Row::new(
        format!("HTTP/1.1 req/s, {conns} conns"),
        Unit::PerSecond,
        Better::Higher,
    );
    let mut p99 = Row::new(
        format!("p99 at saturation, {conns} conns"),
        Unit::Micros,
        Better::Lower,
    );
    let mut cpu = Row::new(
        format!("CPU per request at saturation, {conns} conns"),
        Unit::Micros,
        Better::Lower,
    );
    for _ in 0..plan.rounds {
        for t in Target::ALL {
            let run = |lab: &mut Lab| -> anyhow::Result<(load::Wrk, Option<f64>)> {
                lab.ready(t)?;
                let meter = CpuMeter::start(lab, t);
                let url = format!("http://{}/", lab.http_addr(t, false));
                let w = load::wrk(lab.client(), &url, conns, plan.secs)?;
                let per_req = meter.per_request(w.requests);
                Ok((w, per_req))
            };
            match run(lab) {
                Ok((w, per_req)) => {
                    rps.push(t, Ok(w.rps));
                    p99.push(t, Ok(w.p99_us));
                    if let Some(c) = per_req {
                        cpu.push(t, Ok(c));
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    rps.push(t, Err(anyhow::anyhow!("{why}")));
                    p99.push(t, Err(anyhow::anyhow!("{why}")));
                    if t != Target::Direct {
                        cpu.push(t, Err(e));
                    }
                }
            }
        }
    }
    vec![rps, p99, cpu]
}

/// The constant-rate client at `rate`: p99 (and, at 1,000, p50, CPU per request and RSS).
#[allow(clippy::type_complexity)]
fn rate_rows(
    lab: &mut Lab,
    plan: Plan,
    rate: f64,
) -> (
    Vec<Row>,
    Vec<(Target, Vec<f64>)>,
    Vec<(Target, anyhow::Result<f64>)>,
) {
    let label = if rate >= 10_000.0 { "10,000" } else { "1,000" };
    // Enough connections that a request is rarely due while its connection is still busy.
    let conns = if rate >= 10_000.0 { 32 } else { 8 };
    let mut p50 = Row::new(format!("p50 at {label} req/s"), Unit::Micros, Better::Lower);
    let mut p99 = Row::new(format!("p99 at {label} req/s"), Unit::Micros, Better::Lower);
    let mut cpu = Row::new(
        format!("CPU per request at {label} req/s"),
        Unit::Micros,
        Better::Lower,
    );
    let mut curves = Vec::new();
    let mut rss = Vec::new();
    for round in 0..plan.rounds {
        for t in Target::ALL {
            let last = round + 1 == plan.rounds;
            let run = |lab: &mut Lab| -> anyhow::Result<(load::Rated, Option<(f64, u64)>)> {
                lab.ready(t)?;
                let meter = CpuMeter::start(lab, t);
                let addr = lab.http_addr(t, false);
                let ns = lab.client().clone();
                let secs = plan.secs;
                // RSS sampled halfway through, while the load runs.
                let sampler = meter.pids().map(<[u32]>::to_vec).map(|p| {
                    thread::spawn(move || {
                        thread::sleep(Duration::from_secs_f64(0.3 + secs / 2.0));
                        procs::rss_kib(&p)
                    })
                });
                let r = load::constant_rate(
                    &ns,
                    addr,
                    rate,
                    conns,
                    Duration::from_secs_f64(plan.secs),
                )?;
                let rss = sampler.and_then(|s| s.join().ok());
                let used = meter.per_request(r.latencies_us.len() as u64);
                Ok((r, used.zip(rss)))
            };
            match run(lab) {
                Ok((r, proc_figures)) => {
                    p50.push(t, Ok(quantile(&r.latencies_us, 0.50)));
                    p99.push(t, Ok(quantile(&r.latencies_us, 0.99)));
                    if let Some((c, kib)) = proc_figures {
                        cpu.push(t, Ok(c));
                        if last {
                            rss.push((t, Ok(kib as f64)));
                        }
                    }
                    if last {
                        curves.push((t, r.latencies_us));
                    }
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    p50.push(t, Err(anyhow::anyhow!("{why}")));
                    p99.push(t, Err(anyhow::anyhow!("{why}")));
                    if t != Target::Direct {
                        cpu.push(t, Err(anyhow::anyhow!("{why}")));
                        if last {
                            rss.push((t, Err(e)));
                        }
                    }
                }
            }
        }
    }
    let mut rows = vec![p50, p99];
    if rate < 10_000.0 {
        rows.push(cpu);
    }
    (rows, curves, rss)
}

/// A new connection per request: connect, GET, whole response; p50 and p99.
fn new_connection_rows(lab: &mut Lab, plan: Plan) -> Vec<Row> {
    let mut p50 = Row::new(
        "new connection + first response, p50",
        Unit::Micros,
        Better::Lower,
    );
    let mut p99 = Row::new(
        "new connection + first response, p99",
        Unit::Micros,
        Better::Lower,
    );
    for _ in 0..plan.rounds {
        for t in Target::ALL {
            let run = |lab: &mut Lab| -> anyhow::Result<Vec<f64>> {
                lab.ready(t)?;
                let mut v = load::new_connections(
                    lab.client(),
                    lab.http_addr(t, false),
                    plan.new_connections,
                )?;
                v.sort_by(f64::total_cmp);
                Ok(v)
            };
            match run(lab) {
                Ok(v) => {
                    p50.push(t, Ok(quantile(&v, 0.5)));
                    p99.push(t, Ok(quantile(&v, 0.99)));
                }
                Err(e) => {
                    p50.push(t, Err(anyhow::anyhow!("{e:#}")));
                    p99.push(t, Err(e));
                }
            }
        }
    }
    vec![p50, p99]
}

/// h2load: h2c GETs and gRPC-shaped unary POSTs, with the proxy's CPU per request for each.
fn h2_rows(lab: &mut Lab, plan: Plan) -> Vec<Row> {
    let rps_row = |what: &str| {
        Row::new(
            format!("{what} req/s (h2load, 16 conns x 10 streams)"),
            Unit::PerSecond,
            Better::Higher,
        )
    };
    let cpu_row = |what: &str| {
        Row::new(
            format!("CPU per request, {what} (h2load, 16 conns x 10 streams)"),
            Unit::Micros,
            Better::Lower,
        )
    };
    let (mut h2c, mut h2c_cpu) = (rps_row("h2c"), cpu_row("h2c"));
    let (mut grpc, mut grpc_cpu) = (rps_row("gRPC unary"), cpu_row("gRPC unary"));
    let body = lab.dir.join("grpc-body");
    for _ in 0..plan.rounds {
        for t in Target::ALL {
            let base = format!("http://{}/", lab.http_addr(t, true));
            let runs = [
                (base.clone(), None, &mut h2c, &mut h2c_cpu),
                (
                    format!("{base}bench.Bench/Unary"),
                    Some(body.as_path()),
                    &mut grpc,
                    &mut grpc_cpu,
                ),
            ];
            for (url, post, rps, cpu) in runs {
                let run = |lab: &mut Lab| -> anyhow::Result<(load::H2load, Option<f64>)> {
                    lab.ready(t)?;
                    let meter = CpuMeter::start(lab, t);
                    let r = load::h2load(lab.client(), &url, 16, 10, plan.secs, post)?;
                    let per_req = meter.per_request(r.requests);
                    Ok((r, per_req))
                };
                match run(lab) {
                    Ok((r, per_req)) => {
                        rps.push(t, Ok(r.rps));
                        if let Some(c) = per_req {
                            cpu.push(t, Ok(c));
                        }
                    }
                    Err(e) => {
                        if t != Target::Direct {
                            cpu.push(t, Err(anyhow::anyhow!("{e:#}")));
                        }
                        rps.push(t, Err(e));
                    }
                }
            }
        }
    }
    vec![h2c, h2c_cpu, grpc, grpc_cpu]
}

/// iperf3 direct, through the agent (captured port) and through HAProxy in TCP mode, one stream
/// and eight; the proxy's CPU per GB moved, and the whole machine's.
fn iperf_rows(lab: &mut Lab, plan: Plan) -> Vec<Row> {
    let mut rows = Vec::new();
    for streams in [1u32, 8] {
        let s = if streams > 1 { "s" } else { "" };
        let mut rate = Row::new(
            format!("iperf3, {streams} stream{s}"),
            Unit::Gbits,
            Better::Higher,
        );
        let mut cpu = Row::new(
            format!("proxy CPU per GB moved, iperf3 {streams} stream{s}"),
            Unit::Millis,
            Better::Lower,
        );
        let mut machine = Row::new(
            format!("machine CPU per GB moved, iperf3 {streams} stream{s}"),
            Unit::Millis,
            Better::Lower,
        );
        for _ in 0..plan.rounds {
            for t in [Target::Direct, Target::Agent, Target::Haproxy] {
                let run = |lab: &mut Lab| -> anyhow::Result<(f64, Option<f64>, f64)> {
                    lab.ready(t)?;
                    let (connect, listen) = match t {
                        Target::Agent => ((lab.server_ip(), IPERF_CAPTURED), IPERF_CAPTURED),
                        Target::Haproxy => ((lab.t.pod("client").gw4, HAPROXY_L4), IPERF_DIRECT),
                        _ => ((lab.server_ip(), IPERF_DIRECT), IPERF_DIRECT),
                    };
                    let meter = CpuMeter::start(lab, t);
                    let busy = procs::machine_busy_seconds();
                    let server = lab.t.pod("server").ns.clone();
                    let r = load::iperf3(
                        lab.client(),
                        &server,
                        SocketAddr::from(connect),
                        listen,
                        streams,
                        plan.secs,
                    )?;
                    let busy = procs::machine_busy_seconds() - busy;
                    // Milliseconds of CPU per GB.
                    Ok((
                        r.gbits,
                        meter.seconds().map(|c| c * 1e3 / r.gb),
                        busy * 1e3 / r.gb,
                    ))
                };
                match run(lab) {
                    Ok((gbits, per_gb, busy_per_gb)) => {
                        rate.push(t, Ok(gbits));
                        if let Some(c) = per_gb {
                            cpu.push(t, Ok(c));
                        }
                        machine.push(t, Ok(busy_per_gb));
                    }
                    Err(e) => {
                        if t != Target::Direct {
                            cpu.push(t, Err(anyhow::anyhow!("{e:#}")));
                        }
                        machine.push(t, Err(anyhow::anyhow!("{e:#}")));
                        rate.push(t, Err(e));
                    }
                }
            }
        }
        rows.extend([rate, cpu, machine]);
    }
    rows
}

/// As many idle L4 connections through the agent as the fd limit allows: its RSS and fds per
/// connection.
fn idle_connection_rows(lab: &mut Lab, plan: Plan) -> Vec<Row> {
    let mut count = Row::new("idle L4 connections proxied", Unit::Count, Better::Higher);
    let mut kb = Row::new(
        "agent RSS per idle L4 connection",
        Unit::KbEach,
        Better::Lower,
    );
    let mut fds = Row::new(
        "agent fds per idle L4 connection",
        Unit::Count,
        Better::Lower,
    );
    let r = idle_connections(lab, plan.idle_connections);
    match r {
        Ok((n, kib_each, fds_each)) => {
            count.push(Target::Agent, Ok(n as f64));
            kb.push(Target::Agent, Ok(kib_each * 1.024));
            fds.push(Target::Agent, Ok(fds_each));
        }
        Err(e) => {
            let why = format!("{e:#}");
            count.push(Target::Agent, Err(anyhow::anyhow!("{why}")));
            kb.push(Target::Agent, Err(anyhow::anyhow!("{why}")));
            fds.push(Target::Agent, Err(e));
        }
    }
    vec![count, kb, fds]
}

/// Opens up to `want` connections to the captured idle port (each sends one byte, so the agent
/// has decided what it is and connected upstream), waits for the server to have accepted
/// them, and measures the agent. Returns (connections, KiB each, fds each).
fn idle_connections(lab: &mut Lab, want: usize) -> anyhow::Result<(usize, f64, f64)> {
    raise_fd_limit()?;
    let pid = lab.agent.pid();
    let server = lab.t.pod("server");
    let addr = SocketAddr::from((server.ip4, IDLE_CAPTURED));
    let listener = server.ns.run(move || TcpListener::bind(addr))?;
    // The server holds what it accepts (the bench process holds both ends: hence the limit).
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    let holder = thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).ok();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => {
                    held.push(s);
                    acc.store(held.len(), std::sync::atomic::Ordering::Relaxed);
                }
                Err(_) if held.len() >= want => break,
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
        held
    });
    thread::sleep(Duration::from_millis(500));
    let (rss0, fds0) = (procs::rss_kib(&[pid]), procs::fd_count(pid));
    let clients: Vec<TcpStream> = lab.client().run(move || {
        let mut v = Vec::new();
        for _ in 0..want {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                Ok(mut s) => {
                    let _ = std::io::Write::write_all(&mut s, b"x");
                    v.push(s);
                }
                Err(e) => {
                    eprintln!("  idle connections: stopped at {}: {e}", v.len());
                    break;
                }
            }
        }
        v
    });
    let n = clients.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.load(std::sync::atomic::Ordering::Relaxed) < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let upstream = accepted.load(std::sync::atomic::Ordering::Relaxed);
    // Past the protocol detection timeout, so each connection is in its steady idle state.
    thread::sleep(Duration::from_millis(1500));
    let (rss1, fds1) = (procs::rss_kib(&[pid]), procs::fd_count(pid));
    drop(clients);
    let _ = holder.join();
    if upstream == 0 {
        bail!("{n} connections opened, none reached the server");
    }
    if upstream < n {
        // Not a failure of the bench: the agent's own limit (EMFILE at its fd limit) is the
        // figure. The rest wait in its accept queue and do not count.
        eprintln!("  idle connections: {n} opened, {upstream} proxied to the server");
    }
    Ok((
        upstream,
        (rss1.saturating_sub(rss0)) as f64 / upstream as f64,
        fds1.saturating_sub(fds0) as f64 / upstream as f64,
    ))
}

/// Raises this process's soft open-file limit to the hard one: the idle-connection scenario
/// holds both ends of every connection.
fn raise_fd_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit")?;
    Ok(())
}
