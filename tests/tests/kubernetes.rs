//! Kubernetes mode end to end: the test API server (`mesh-apiserver`) runs in the node
//! namespace, the agent watches it (`--kubernetes`), and the real `kubectl` changes objects.
//! What is checked is what a user sees: which backend answers, which peer address the server
//! sees (the node's when captured, the pod's own when not), which links are pinned.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use mesh_tests::{
    ADMIN, Agent, Topology,
    policy::service,
    privileged,
    servers::{greeter, greeting, sa},
};

const NODE: &str = "node-1";

/// The API server binary: `MESH_APISERVER_BIN`, or the workspace's debug build.
fn apiserver_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_APISERVER_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/mesh-apiserver");
    assert!(
        p.exists(),
        "{} not found: build it (`cargo build -p mesh-apiserver`) or set MESH_APISERVER_BIN",
        p.display()
    );
    p
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// `mesh-apiserver` in the node namespace on 127.0.0.1; killed on drop.
struct ApiServer {
    child: Child,
    /// The bound address (a restart listens on the same one, so the kubeconfig stays valid).
    addr: String,
    kubeconfig: PathBuf,
    topo_node: String,
}

impl ApiServer {
    fn start(t: &Topology, state: &Path) -> ApiServer {
        let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", t.id));
        Self::start_at(t, state, &kubeconfig, "127.0.0.1:0")
    }

    fn start_at(t: &Topology, state: &Path, kubeconfig: &Path, listen: &str) -> ApiServer {
        let mut child = t
            .node
            .cmd(apiserver_bin().to_str().expect("utf8"))
            .args(["--listen", listen, "--kubeconfig"])
            .arg(kubeconfig)
            .arg("--state")
            .arg(state)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mesh-apiserver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("apiserver address");
        assert!(!line.trim().is_empty(), "mesh-apiserver printed no address");
        ApiServer {
            child,
            addr: line.trim().to_string(),
            kubeconfig: kubeconfig.to_path_buf(),
            topo_node: t.node.name.clone(),
        }
    }

    /// `kubectl --kubeconfig ... ARGS` in the node namespace, with `stdin` piped in; panics on
    /// failure.
    fn kubectl(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl_output(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl_output(&self, args: &[&str], stdin: &str) -> std::process::Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.topo_node, "kubectl", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("kubectl")
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], yaml);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod object on `node` with `ip`, Running and Ready (status set through `/status`, as a
/// kubelet does).
fn create_pod(api: &ApiServer, ns: &str, name: &str, node: &str, ip: Ipv4Addr, labels: &str) {
    api.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec:\n  nodeName: {node}\n  containers: [{{name: app, image: app}}]\n"
    ));
    api.kubectl(
        &[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(
                "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{ip}\",\"podIPs\":[{{\"ip\":\"{ip}\"}}],\
                 \"conditions\":[{{\"type\":\"Ready\",\"status\":\"True\"}}]}}}}"
            ),
        ],
        "",
    );
}

fn start_agent(t: &Topology, api: &ApiServer, extra: &[&str]) -> Agent {
    let mut args = vec!["--kubernetes", "--node-name", NODE];
    args.extend_from_slice(extra);
    let agent = t.start_agent_env(
        &args,
        &[("KUBECONFIG", api.kubeconfig.to_str().expect("utf8"))],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.node.http_get(ADMIN, "/readyz").contains(" 200 ") {
        assert!(
            Instant::now() < deadline,
            "agent not ready after 20 s: {}\n{}",
            status(t),
            agent.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    agent
}

fn status(t: &Topology) -> serde_json::Value {
    let raw = t.node.http_get(ADMIN, "/status");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_default()
}

/// Polls `f` until it returns true; the time it took, or a panic after `within`.
fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Which echo backend answered `GET /` on `addr` from the client pod.
fn backend(t: &Topology, addr: SocketAddr) -> String {
    let raw = t.pod("client").ns.http_get(addr, "/");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not an echo answer ({e}): {raw}"));
    v["backend"].as_str().unwrap_or_default().to_string()
}

fn route(weights: (u32, u32)) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: split, namespace: mesh-test}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: front, port: 80}}]\n  \
         rules:\n  - backendRefs:\n    - {{name: svc-a, port: 80, weight: {}}}\n    - {{name: svc-b, port: 80, weight: {}}}\n",
        weights.0, weights.1
    )
}

fn policies_applied(t: &Topology) -> u64 {
    status(t)["kubernetes"]["policies_applied"]
        .as_u64()
        .unwrap_or(0)
}

/// A GRPCRoute CRD that accepts any spec: what matters here is that the kind becomes served.
const GRPCROUTE_CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
metadata: {name: grpcroutes.gateway.networking.k8s.io}\n\
spec:\n  group: gateway.networking.k8s.io\n  scope: Namespaced\n  \
names: {kind: GRPCRoute, listKind: GRPCRouteList, plural: grpcroutes, singular: grpcroute}\n  \
versions:\n  - name: v1\n    served: true\n    storage: true\n    subresources: {status: {}}\n    \
schema:\n      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}\n";

/// CRDs (Gateway API fixtures and our MeshPolicy) and the test namespace.
fn install_crds(api: &ApiServer) {
    for f in [
        fixture("fixtures/gateway-api-crds.yaml"),
        fixture("../manifests/crds/meshpolicy.yaml"),
    ] {
        api.kubectl(&["apply", "-f", f.to_str().expect("utf8")], "");
    }
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh-test}\n");
}

#[test]
fn routes_from_the_api_server_steer_traffic_and_follow_edits() {
    if !privileged("routes_from_the_api_server_steer_traffic_and_follow_edits") {
        return;
    }
    let t = Topology::new(&["client", "a", "b", "fallback"]);
    for pod in ["a", "b", "fallback"] {
        t.pod(pod).ns.echo(pod, 8080, &[]);
    }
    let state = std::env::temp_dir().join(format!("{}-state.json", t.id));
    let api = ApiServer::start(&t, &state);
    install_crds(&api);
    let ep = |p: &str| IpAddr::V4(t.pod(p).ip4);
    let vip: IpAddr = "10.96.0.50".parse().expect("ip");
    let services = [
        service("front", vip, 80, 8080, &[ep("fallback")]),
        service(
            "svc-a",
            "10.96.0.51".parse().expect("ip"),
            80,
            8080,
            &[ep("a")],
        ),
        service(
            "svc-b",
            "10.96.0.52".parse().expect("ip"),
            80,
            8080,
            &[ep("b")],
        ),
    ]
    .concat();
    api.apply(&services);
    create_pod(
        &api,
        "mesh-test",
        "client",
        NODE,
        t.pod("client").ip4,
        "skiff.dev/mesh: enabled",
    );
    let agent = start_agent(&t, &api, &[]);
    let front = SocketAddr::new(vip, 80);
    assert_eq!(backend(&t, front), "fallback", "{}", agent.log());

    // 90/10: the first answer from a or b shows the route is in force.
    api.apply(&route((90, 10)));
    let took = until(Duration::from_secs(1), "HTTPRoute 90/10 in force", || {
        backend(&t, front) != "fallback"
    });
    eprintln!("route created -> traffic follows: {took:?}");
    let count = |n: usize| {
        let mut a = 0;
        let mut b = 0;
        for _ in 0..n {
            match backend(&t, front).as_str() {
                "a" => a += 1,
                "b" => b += 1,
                other => panic!("answer from {other} with the route in force"),
            }
        }
        (a, b)
    };
    let (a, b) = count(200);
    assert!(a >= 160 && b >= 4, "90/10 split: a={a} b={b}");

    // 50/50: the edit is in force (the agent applied a new policy) within 1 s.
    let before = policies_applied(&t);
    api.apply(&route((50, 50)));
    let took = until(Duration::from_secs(1), "HTTPRoute edit applied", || {
        policies_applied(&t) > before
    });
    eprintln!("route edited -> policy in force: {took:?}");
    let (a, b) = count(200);
    assert!((60..=140).contains(&a), "50/50 split: a={a} b={b}");

    // Deleting the route returns the Service to its own endpoints.
    api.kubectl(&["delete", "httproute", "split", "-n", "mesh-test"], "");
    let took = until(Duration::from_secs(1), "route deletion in force", || {
        backend(&t, front) == "fallback"
    });
    eprintln!("route deleted -> traffic follows: {took:?}");
    for _ in 0..20 {
        assert_eq!(backend(&t, front), "fallback");
    }

    let s = status(&t);
    let k = &s["kubernetes"];
    assert_eq!(k["kinds"]["HTTPRoute"]["synced"], true, "{s}");
    assert_eq!(
        k["kinds"]["HTTPRoute"]["version"], "gateway.networking.k8s.io/v1",
        "{s}"
    );
    // Not installed: skipped, with one warning, not a crash loop.
    assert!(k["kinds"]["GRPCRoute"]["version"].is_null(), "{s}");
    let warnings = agent
        .log_lines()
        .iter()
        .filter(|l| l["kind"] == "GRPCRoute" && l["level"] == "WARN")
        .count();
    assert_eq!(warnings, 1, "{}", agent.log());

    // Installing the missing CRD later needs no restart: the agent sees the new
    // CustomResourceDefinition, runs discovery again and watches the kind.
    api.apply(GRPCROUTE_CRD);
    let took = until(
        Duration::from_secs(2),
        "GRPCRoute watched once its CRD exists",
        || {
            let s = status(&t);
            s["kubernetes"]["kinds"]["GRPCRoute"]["version"] == "gateway.networking.k8s.io/v1"
                && s["kubernetes"]["kinds"]["GRPCRoute"]["synced"] == true
        },
    );
    eprintln!("GRPCRoute CRD installed -> watched: {took:?}");
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: rpc, namespace: mesh-test}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: svc-a, port: 80}]\n  \
         rules: [{backendRefs: [{name: svc-b, port: 80}]}]\n",
    );
    until(
        Duration::from_secs(1),
        "GRPCRoute object in the store",
        || status(&t)["kubernetes"]["kinds"]["GRPCRoute"]["objects"] == 1,
    );
    api.kubectl(&["delete", "grpcroute", "rpc", "-n", "mesh-test"], "");
    until(Duration::from_secs(1), "GRPCRoute deletion seen", || {
        status(&t)["kubernetes"]["kinds"]["GRPCRoute"]["objects"] == 0
    });
    // Past the debounce, so that the deletion's own policy rebuild is counted.
    thread::sleep(Duration::from_millis(300));
    let metrics = t.node.http_get(ADMIN, "/metrics");
    assert!(
        metrics.contains("mesh_kubernetes_watch_events_total{kind=\"HTTPRoute\"}"),
        "{metrics}"
    );

    // A MeshPolicy the CRD schema refuses never reaches the agent: kubectl reports the API
    // server's 422 naming the field, and nothing changes.
    let before = policies_applied(&t);
    let out = api.kubectl_output(
        &["apply", "-f", "-"],
        "apiVersion: skiff.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: bad, namespace: mesh-test}\n\
         spec: {failMode: sometimes}\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "invalid MeshPolicy accepted");
    assert!(
        stderr.contains("is invalid") && stderr.contains("spec.failMode"),
        "{stderr}"
    );
    let none = api.kubectl_output(&["get", "meshpolicy", "bad", "-n", "mesh-test"], "");
    assert!(!none.status.success(), "the refused MeshPolicy was stored");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        policies_applied(&t),
        before,
        "a refused object changed the policy"
    );
    assert_eq!(backend(&t, front), "fallback");
}

fn captured(t: &Topology, server: &str) -> bool {
    let (client, server) = (t.pod("client"), t.pod(server));
    let g = greeting(&client.ns, sa(server.ip4, 8080)).expect("greeting");
    if g == format!("peer={} server=s", server.gw4) {
        true
    } else {
        assert_eq!(g, format!("peer={} server=s", client.ip4));
        false
    }
}

#[test]
fn namespace_label_enrols_this_nodes_pods_and_deletion_detaches() {
    if !privileged("namespace_label_enrols_this_nodes_pods_and_deletion_detaches") {
        return;
    }
    let t = Topology::new(&["client", "server", "elsewhere", "spare"]);
    greeter(&t.pod("server").ns, sa(t.pod("server").ip4, 8080), "s");
    let state = std::env::temp_dir().join(format!("{}-state.json", t.id));
    let api = ApiServer::start(&t, &state);
    install_crds(&api);
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    create_pod(
        &api,
        "shop",
        "client",
        NODE,
        t.pod("client").ip4,
        "app: client",
    );
    // Another node's pod, enrolled by its own label: never attached here, even though its IP
    // routes through a veth of this node namespace.
    create_pod(
        &api,
        "shop",
        "elsewhere",
        "node-2",
        t.pod("elsewhere").ip4,
        "skiff.dev/mesh: enabled",
    );
    let agent = start_agent(&t, &api, &["--capture", "10.201.0.0/16=8080"]);
    assert!(!captured(&t, "server"), "{}", agent.log());

    api.kubectl(
        &["label", "namespace", "shop", "skiff.dev/mesh=enabled"],
        "",
    );
    let took = until(
        Duration::from_secs(1),
        "labelled namespace enrols the pod",
        || captured(&t, "server"),
    );
    eprintln!("namespace labelled -> pod captured: {took:?}");
    let s = status(&t);
    let pod = &s["kubernetes"]["pods"]["shop/client"];
    assert_eq!(pod["interface"], t.pod("client").host_if.as_str(), "{s}");
    assert!(pod["ready_to_captured_ms"].is_u64(), "{s}");
    assert!(s["kubernetes"]["pods"]["shop/elsewhere"].is_null(), "{s}");
    let pin = |pod: &str| t.bpffs_dir.join(format!("capture-{}", t.pod(pod).host_if));
    assert!(pin("client").exists());
    assert!(!pin("elsewhere").exists(), "another node's pod is attached");

    api.kubectl(&["label", "namespace", "shop", "skiff.dev/mesh-"], "");
    let took = until(
        Duration::from_secs(1),
        "unlabelled namespace releases the pod",
        || !captured(&t, "server"),
    );
    eprintln!("label removed -> pod released: {took:?}");
    assert!(!pin("client").exists(), "released pod still pinned");

    // The pod's own label enrols it; deleting the pod detaches its veth, no pins left.
    api.kubectl(
        &[
            "label",
            "pod",
            "client",
            "-n",
            "shop",
            "skiff.dev/mesh=enabled",
        ],
        "",
    );
    until(Duration::from_secs(1), "pod label enrols the pod", || {
        captured(&t, "server")
    });
    api.kubectl(&["delete", "pod", "client", "-n", "shop"], "");
    until(Duration::from_secs(1), "deleted pod released", || {
        !captured(&t, "server")
    });
    let left: Vec<String> = std::fs::read_dir(&t.bpffs_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(&t.pod("client").host_if))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "leftover pins: {left:?}");
    assert!(!pin("elsewhere").exists());

    // The CNI hands the deleted pod's IP to a new pod behind another veth: the new pod is
    // attached to its own veth, the old one stays detached.
    let ip = t.pod("client").ip4;
    let spare = t.pod("spare");
    spare
        .ns
        .sh(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    t.node.sh(&[
        "ip",
        "route",
        "add",
        &format!("{ip}/32"),
        "dev",
        &spare.host_if,
    ]);
    create_pod(
        &api,
        "shop",
        "client-2",
        NODE,
        ip,
        "skiff.dev/mesh: enabled",
    );
    let took = until(
        Duration::from_secs(1),
        "a new pod with a recycled IP captured",
        || status(&t)["kubernetes"]["pods"]["shop/client-2"]["captured"] == true,
    );
    eprintln!("new pod with a recycled IP -> captured: {took:?}");
    let s = status(&t);
    assert_eq!(
        s["kubernetes"]["pods"]["shop/client-2"]["interface"],
        spare.host_if.as_str(),
        "{s}"
    );
    assert!(pin("spare").exists(), "the new veth is not attached");
    assert!(!pin("client").exists(), "the old veth is attached again");
    let server = t.pod("server");
    let g = greeting(&spare.ns, sa(server.ip4, 8080)).expect("greeting");
    assert_eq!(g, format!("peer={} server=s", server.gw4), "not captured");
    drop(agent);
}

/// `/metrics` from the agent.
fn metric(t: &Topology, series: &str) -> Option<f64> {
    let text = t.node.http_get(ADMIN, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn api_server_outage_restart_and_compaction_keep_forwarding_and_resync() {
    if !privileged("api_server_outage_restart_and_compaction_keep_forwarding_and_resync") {
        return;
    }
    let t = Topology::new(&["client", "a", "b", "fallback"]);
    for pod in ["a", "b", "fallback"] {
        t.pod(pod).ns.echo(pod, 8080, &[]);
    }
    let state = std::env::temp_dir().join(format!("{}-state.json", t.id));
    let api = ApiServer::start(&t, &state);
    install_crds(&api);
    let ep = |p: &str| IpAddr::V4(t.pod(p).ip4);
    let vip: IpAddr = "10.96.0.50".parse().expect("ip");
    api.apply(
        &[
            service("front", vip, 80, 8080, &[ep("fallback")]),
            service(
                "svc-a",
                "10.96.0.51".parse().expect("ip"),
                80,
                8080,
                &[ep("a")],
            ),
            service(
                "svc-b",
                "10.96.0.52".parse().expect("ip"),
                80,
                8080,
                &[ep("b")],
            ),
        ]
        .concat(),
    );
    create_pod(
        &api,
        "mesh-test",
        "client",
        NODE,
        t.pod("client").ip4,
        "skiff.dev/mesh: enabled",
    );
    api.apply(&route((100, 0)));
    // A short backoff ceiling so that the test waits seconds, not the default 30 s, for the
    // watches to come back.
    let agent = start_agent(&t, &api, &["--kube-backoff-max", "2s"]);
    let front = SocketAddr::new(vip, 80);
    until(Duration::from_secs(1), "route in force", || {
        backend(&t, front) == "a"
    });
    let synced_objects = status(&t)["kubernetes"]["kinds"].clone();
    let stale_series = "mesh_kubernetes_watch_stale{kind=\"HTTPRoute\"}";
    assert_eq!(metric(&t, stale_series), Some(0.0));

    // Down for 30 s: forwarding goes on with the policy the agent has; `/status` and the
    // metrics say the watches are stale.
    let addr = api.addr.clone();
    let kubeconfig = api.kubeconfig.clone();
    drop(api);
    let down = Instant::now();
    until(
        Duration::from_secs(10),
        "/status shows the watches stale",
        || status(&t)["kubernetes"]["stale"] == true,
    );
    assert_eq!(metric(&t, stale_series), Some(1.0), "{}", agent.log());
    let mut answers = 0;
    while down.elapsed() < Duration::from_secs(30) {
        assert_eq!(backend(&t, front), "a", "while the API server is down");
        answers += 1;
        thread::sleep(Duration::from_millis(250));
    }
    assert!(answers > 50);
    let s = status(&t);
    assert_eq!(s["kubernetes"]["kinds"]["HTTPRoute"]["stale"], true, "{s}");
    assert!(
        s["kubernetes"]["kinds"]["HTTPRoute"]["last_error"].is_string(),
        "{s}"
    );

    // Back, from the same state: its history starts anew, so every version the agent holds is
    // expired (410) and the agent relists; it ends where it was.
    let api = ApiServer::start_at(&t, &state, &kubeconfig, &addr);
    let took = until(Duration::from_secs(10), "watches re-established", || {
        status(&t)["kubernetes"]["stale"] == false
    });
    eprintln!("API server back -> watches re-established: {took:?}");
    assert_eq!(metric(&t, stale_series), Some(0.0));
    let s = status(&t);
    for (kind, before) in synced_objects.as_object().expect("kinds") {
        assert_eq!(
            s["kubernetes"]["kinds"][kind]["objects"], before["objects"],
            "{kind} after the restart: {s}"
        );
    }
    assert_eq!(backend(&t, front), "a");
    let edit = Instant::now();
    api.apply(&route((0, 100)));
    until(Duration::from_secs(1), "edit after the restart", || {
        backend(&t, front) == "b"
    });
    eprintln!(
        "edit after the restart -> traffic follows: {:?}",
        edit.elapsed()
    );

    // Compaction: open watches are closed and their versions expire. A deletion made right
    // after is seen through the relist.
    let errors = |t: &Topology| {
        status(t)["kubernetes"]["kinds"]["HTTPRoute"]["watch_errors"]
            .as_u64()
            .unwrap_or(0)
    };
    let errors_before = errors(&t);
    let out = t.node.sh(&[
        "curl",
        "-sf",
        "-X",
        "POST",
        &format!("http://{addr}/_test/compact"),
    ]);
    assert!(out.status.success(), "compaction request failed");
    api.kubectl(&["delete", "httproute", "split", "-n", "mesh-test"], "");
    let took = until(
        Duration::from_secs(10),
        "deletion seen after compaction",
        || backend(&t, front) == "fallback",
    );
    eprintln!("compaction + delete -> traffic follows: {took:?}");
    until(
        Duration::from_secs(10),
        "watches fresh after compaction",
        || status(&t)["kubernetes"]["stale"] == false,
    );
    assert!(
        errors(&t) > errors_before || agent.log().contains("410"),
        "no sign of an expired watch after compaction: {}",
        agent.log()
    );
    assert_eq!(status(&t)["kubernetes"]["kinds"]["HTTPRoute"]["objects"], 0);
    drop(agent);
}
