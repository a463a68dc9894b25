//! `cargo xtask bench --only kubernetes`: Kubernetes mode at issue 9's scale (10,000 Services,
//! 50,000 endpoints, 2,000 HTTPRoutes over 50 namespaces). The test API server and the agent run
//! in a node namespace of their own, with a client pod (enrolled) and two echo backends. Printed,
//! not asserted: time from agent start to `/readyz` 200, agent and API server memory, and how
//! long one route edit (weights flipped, so the other backend answers) takes to be applied and
//! to be followed by traffic.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{ADMIN, Netns, Topology};
use serde_json::{Value, json};

use super::cluster::{self, Size};
use crate::util::{build_release, root};

const NODE: &str = "node-1";
/// Route edits measured by the benchmark, and by the CI smoke run.
const EDITS: usize = 10;
const SMOKE_EDITS: usize = 3;
/// The enrolment label (`mesh_agent::k8s::LABEL`; xtask does not link the agent).
const MESH_LABEL: &str = "skiff.dev/mesh";
/// Longer than any goal by far: past it something is broken, not slow.
const READY_WITHIN: Duration = Duration::from_secs(120);
const EDIT_WITHIN: Duration = Duration::from_secs(10);

/// The benchmark: release builds at issue 9's scale.
pub fn run() -> anyhow::Result<()> {
    let (agent_bin, api_bin) = build_release()?;
    measure(&Size::ISSUE, EDITS, &agent_bin, &api_bin)
}

/// The same steps at a twentieth of the scale with the binaries `cargo xtask test` built (debug):
/// CI runs it so that the benchmark keeps working. Its figures are printed but say little about
/// the goals, which are for release builds at full scale.
pub fn smoke(agent_bin: &Path, api_bin: &Path) -> anyhow::Result<()> {
    println!("Kubernetes scale benchmark, smoke run (debug build, 1/20 of the scale):");
    measure(&Size::SMOKE, SMOKE_EDITS, agent_bin, api_bin)
}

fn measure(size: &Size, edits: usize, agent_bin: &Path, api_bin: &Path) -> anyhow::Result<()> {
    let t = Topology::new(&["client", "a", "b"]);
    for pod in ["a", "b"] {
        t.pod(pod).ns.echo(pod, 8080, &[]);
    }
    // Under the topology's id: removed with it.
    let scratch = std::env::temp_dir().join(format!("{}-k8s-bench", t.id));
    std::fs::create_dir_all(&scratch)?;
    let state = scratch.join("state.json");
    let kubeconfig = scratch.join("kubeconfig");

    // The CRDs go in the way a user installs them, so the API server registers their APIs and
    // schemas itself; the bulk objects are then written into its state file.
    {
        let api = ApiServer::start(&t.node, api_bin, &state, &kubeconfig)?;
        for f in [
            "tests/fixtures/gateway-api-crds.yaml",
            "manifests/crds/meshpolicy.yaml",
        ] {
            api.kubectl(&["apply", "-f", &root().join(f).to_string_lossy()])?;
        }
    }
    let generated = cluster::generate(size, [t.pod("a").ip4, t.pod("b").ip4]);
    let edited = generated.edited;
    let mut objects = generated.objects;
    objects.extend(client_pod(t.pod("client").ip4));
    let mut saved: Value = serde_json::from_slice(&std::fs::read(&state)?)?;
    cluster::add_to_state(&mut saved, objects);
    std::fs::write(&state, saved.to_string())?;
    let started = Instant::now();
    let api = ApiServer::start(&t.node, api_bin, &state, &kubeconfig)?;
    let api_load = started.elapsed();
    eprintln!("API server loaded the generated cluster in {api_load:?}");

    let started = Instant::now();
    let agent = t.start_agent_bin_env(
        agent_bin,
        &["--kubernetes", "--node-name", NODE],
        &[("KUBECONFIG", &kubeconfig.to_string_lossy())],
    );
    loop {
        if get(&t.node, ADMIN, "/readyz").is_ok_and(|(code, _)| code == 200) {
            break;
        }
        if started.elapsed() > READY_WITHIN {
            bail!(
                "agent not ready within {READY_WITHIN:?}: {}\n{}",
                status(&t.node).unwrap_or_default(),
                agent.log()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    let ready = started.elapsed();
    let mem_ready = memory(agent.pid())?;
    eprintln!("agent ready after {ready:?}, RSS/HWM {mem_ready:?} KiB");

    let front = SocketAddr::new(IpAddr::V4(edited.vip), 80);
    let first = backend(&t, front).with_context(|| agent.log())?;
    if first != "a" {
        bail!("before any edit route-0 sends everything to a, but {first} answered");
    }
    let path = format!(
        "/apis/gateway.networking.k8s.io/v1/namespaces/{}/httproutes/{}",
        edited.namespace, edited.route
    );
    let (mut applied, mut followed) = (Vec::new(), Vec::new());
    let (mut round_trips, mut delivered, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..edits {
        let (weights, want) = if k % 2 == 0 {
            ((0, 100), "b")
        } else {
            ((100, 0), "a")
        };
        let backends = [edited.backends[0].as_str(), edited.backends[1].as_str()];
        let body =
            json!({"spec": cluster::route_spec(&edited.parent, backends, weights)}).to_string();
        let before = policies_applied(&t.node)?;
        // From just before the request is sent: the API server's own write is included.
        let sent = Instant::now();
        let sent_unix_ms = unix_ms();
        let cpu_before = cpu_time(agent.pid())?;
        let (code, answer) = request(
            &t.node,
            api.addr,
            "PATCH",
            &path,
            "application/merge-patch+json",
            &body,
        )?;
        if code != 200 {
            bail!("PATCH {path}: {code} {answer}");
        }
        round_trips.push(sent.elapsed());
        let (mut a, mut f) = (None, None);
        while a.is_none() || f.is_none() {
            if sent.elapsed() > EDIT_WITHIN {
                bail!(
                    "edit {k} not in force within {EDIT_WITHIN:?} (applied {a:?}, traffic {f:?})\n{}",
                    agent.log()
                );
            }
            if a.is_none() && policies_applied(&t.node)? > before {
                a = Some(sent.elapsed());
            }
            if f.is_none() && backend(&t, front)? == want {
                f = Some(sent.elapsed());
            }
        }
        // On a shared machine the wall times above include waiting for a core; the agent's
        // own CPU time does not.
        cpu.push(cpu_time(agent.pid())?.saturating_sub(cpu_before));
        // When the agent's HTTPRoute watch saw the edit: the rest is the agent's own work.
        let seen = status(&t.node)?["kubernetes"]["kinds"]["HTTPRoute"]["last_event_unix_ms"]
            .as_u64()
            .unwrap_or_default();
        delivered.push(Duration::from_millis(seen.saturating_sub(sent_unix_ms)));
        eprintln!(
            "edit {k}: PATCH returned after {:?}, watch event after {:?}, applied after {a:?}, traffic followed after {f:?}, agent CPU {:?}",
            round_trips[k], delivered[k], cpu[k]
        );
        applied.extend(a);
        followed.extend(f);
        // Settle between edits, so that each is measured alone.
        thread::sleep(Duration::from_millis(300));
    }
    let mem_edited = memory(agent.pid())?;
    let api_mem = memory(api.child.id())?;

    println!(
        "Kubernetes mode at scale: {} Services, {} endpoints, {} HTTPRoutes in {} namespaces \
         (API server loaded them in {:.1} s)",
        size.services,
        size.endpoints,
        size.routes,
        size.namespaces,
        api_load.as_secs_f64()
    );
    println!();
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| agent start to `/readyz` 200 | {:.2} s | < 5 s |",
        ready.as_secs_f64()
    );
    println!(
        "| agent RSS when ready (VmRSS / VmHWM) | {} / {} MiB | < 100 MB |",
        mem_ready.0 / 1024,
        mem_ready.1 / 1024
    );
    println!(
        "| agent RSS after {edits} edits (VmRSS / VmHWM) | {} / {} MiB | < 100 MB |",
        mem_edited.0 / 1024,
        mem_edited.1 / 1024
    );
    for (what, v) in [
        (
            "route edit: PATCH round trip (API server write)",
            &round_trips,
        ),
        ("route edit to the agent's watch event", &delivered),
        ("route edit to `policies_applied` +1", &applied),
        ("route edit to traffic following it", &followed),
        ("agent CPU time (user + system) per edit", &cpu),
    ] {
        println!(
            "| {what}, median / max of {edits} | {:.0} / {:.0} ms | {} |",
            median(v).as_secs_f64() * 1e3,
            v.iter().max().copied().unwrap_or_default().as_secs_f64() * 1e3,
            if what.contains("applied") || what.contains("traffic") {
                "< 100 ms"
            } else {
                "-"
            }
        );
    }
    println!(
        "| API server RSS, for reference (VmRSS / VmHWM) | {} / {} MiB | - |",
        api_mem.0 / 1024,
        api_mem.1 / 1024
    );
    Ok(())
}

/// The client's namespace (enrolled by label) and the client pod on this node, Running with its
/// IP, as a kubelet reports it.
fn client_pod(ip: std::net::Ipv4Addr) -> Vec<(&'static str, Value)> {
    let meta = |name: &str, uid: u32| {
        json!({"name": name, "uid": format!("00000000-0000-4000-9000-{uid:012x}"),
               "creationTimestamp": "2026-01-01T00:00:00Z"})
    };
    let mut ns = meta("bench-client", 1);
    ns["labels"] = json!({"kubernetes.io/metadata.name": "bench-client", MESH_LABEL: "enabled"});
    let mut pod = meta("client", 2);
    pod["namespace"] = json!("bench-client");
    vec![
        (
            "/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": ns, "spec": {"finalizers": ["kubernetes"]},
                   "status": {"phase": "Active"}}),
        ),
        (
            "/pods",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": pod,
                   "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app"}]},
                   "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                              "conditions": [{"type": "Ready", "status": "True"}]}}),
        ),
    ]
}

/// `mesh-apiserver` in the node namespace on 127.0.0.1; killed on drop.
struct ApiServer {
    child: Child,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    node: Netns,
}

impl ApiServer {
    fn start(node: &Netns, bin: &Path, state: &Path, kubeconfig: &Path) -> anyhow::Result<Self> {
        let mut child = node
            .cmd(&bin.to_string_lossy())
            .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(kubeconfig)
            .arg("--state")
            .arg(state)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting mesh-apiserver")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let api = ApiServer {
            addr: line
                .trim()
                .parse()
                .with_context(|| format!("mesh-apiserver printed {line:?}, not its address"))?,
            child,
            kubeconfig: kubeconfig.to_path_buf(),
            node: node.clone(),
        };
        Ok(api)
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .node
            .cmd("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request from inside `ns`; the status code and body.
fn request(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let body = body.to_string();
    let raw = ns
        .run(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(head.as_bytes())?;
            s.write_all(body.as_bytes())?;
            let mut out = Vec::new();
            let mut buf = [0u8; 65536];
            // Until the peer closes, or the body its Content-Length announces is in.
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                if complete(&out) {
                    break;
                }
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        })
        .with_context(|| format!("{method} {path} on {addr}"))?;
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status from {addr}: {raw:?}"))?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, dechunk(body)))
}

/// Whether `raw` holds a whole response with a `Content-Length`.
fn complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .is_some_and(|len| raw.len() >= end + 4 + len)
}

/// The body of a `Transfer-Encoding: chunked` answer, or `body` as it is when it is not one.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    if out.is_empty() {
        body.to_string()
    } else {
        out
    }
}

fn get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    request(ns, addr, "GET", path, "text/plain", "")
}

fn status(ns: &Netns) -> anyhow::Result<Value> {
    let (_, body) = get(ns, ADMIN, "/status")?;
    Ok(serde_json::from_str(&body)?)
}

fn policies_applied(ns: &Netns) -> anyhow::Result<u64> {
    let s = status(ns)?;
    s["kubernetes"]["policies_applied"]
        .as_u64()
        .with_context(|| format!("no kubernetes.policies_applied in /status: {s}"))
}

/// Which echo backend answers `GET /api/bench` on `addr` from the client pod.
fn backend(t: &Topology, addr: SocketAddr) -> anyhow::Result<String> {
    let (code, body) = get(&t.pod("client").ns, addr, "/api/bench")?;
    let v: Value = serde_json::from_str(&body)
        .with_context(|| format!("not an echo answer ({code}): {body:?}"))?;
    Ok(v["backend"].as_str().unwrap_or_default().to_string())
}

/// User plus system CPU time of a process so far.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name and state.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/PID/stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    Ok(Duration::from_millis(ticks * 10))
}

/// VmRSS and VmHWM of a process, in KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}
