//! Kubernetes-mode test glue: the test API server (`mesh-apiserver`) in a node namespace, the
//! real `kubectl` against it, agents in `--kubernetes` mode, and an underlay joining the node
//! namespaces of two topologies (two nodes of one cluster).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{ADMIN, Agent, Topology, sh};

/// The API server binary: `MESH_APISERVER_BIN`, or the workspace's debug build.
pub fn apiserver_bin() -> PathBuf {
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

/// A file of the tests crate, e.g. `fixtures/gateway-api-crds.yaml`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// `mesh-apiserver` in a node namespace; killed on drop, its files removed.
pub struct ApiServer {
    child: Child,
    pub kubeconfig: PathBuf,
    state: PathBuf,
    node: String,
}

impl ApiServer {
    /// Listens on `listen` (`127.0.0.1:0`, or an underlay address other nodes reach) in `t`'s
    /// node namespace; the kubeconfig it writes names the bound address.
    pub fn start_at(t: &Topology, listen: &str) -> ApiServer {
        let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", t.id));
        let state = std::env::temp_dir().join(format!("{}-state.json", t.id));
        let mut child = t
            .node
            .cmd(apiserver_bin().to_str().expect("utf8"))
            .args(["--listen", listen, "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--state")
            .arg(&state)
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
            kubeconfig,
            state,
            node: t.node.name.clone(),
        }
    }

    /// `kubectl ARGS` in the API server's node namespace with `stdin` piped in; panics on
    /// failure.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> String {
        let (ok, out) = self.try_kubectl(args, stdin);
        assert!(ok, "kubectl {args:?} failed:\n{out}");
        out
    }

    /// `kubectl ARGS`: whether it succeeded, and its stdout (with stderr when it failed).
    pub fn try_kubectl(&self, args: &[&str], stdin: &str) -> (bool, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node, "kubectl", "--kubeconfig"])
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("kubectl");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            text.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        (out.status.success(), text)
    }

    pub fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], yaml);
    }

    /// `kubectl get KIND NAME -n NS -o json`, parsed; `Null` if it does not exist.
    pub fn get(&self, kind: &str, ns: &str, name: &str) -> serde_json::Value {
        let (ok, out) = self.try_kubectl(&["get", kind, name, "-n", ns, "-o", "json"], "");
        if !ok {
            return serde_json::Value::Null;
        }
        serde_json::from_str(&out).unwrap_or_default()
    }

    /// The Gateway API CRD fixtures, the MeshPolicy CRD, namespaces `mesh-test` and
    /// `skiff-system` (where the agents' status Lease lives).
    pub fn install_crds(&self) {
        for f in [
            fixture("fixtures/gateway-api-crds.yaml"),
            fixture("../manifests/crds/meshpolicy.yaml"),
        ] {
            self.kubectl(&["apply", "-f", f.to_str().expect("utf8")], "");
        }
        self.apply(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh-test}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {name: skiff-system}\n",
        );
    }

    /// A pod object on `node` with `ip`, Running and Ready (status set through `/status`, as a
    /// kubelet does).
    pub fn create_pod(&self, ns: &str, name: &str, node: &str, ip: Ipv4Addr, labels: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
             spec:\n  nodeName: {node}\n  containers: [{{name: app, image: app}}]\n"
        ));
        self.kubectl(
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
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.kubeconfig);
        let _ = std::fs::remove_file(&self.state);
    }
}

/// An agent in `--kubernetes` mode on `t`'s node as `node`, with `extra` flags; returns once
/// `/readyz` answers 200.
pub fn start_agent(t: &Topology, api: &ApiServer, node: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--kubernetes", "--node-name", node];
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

/// The agent's `/status` on `t`'s node.
pub fn status(t: &Topology) -> serde_json::Value {
    let raw = t.node.http_get(ADMIN, "/status");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_default()
}

/// The value of one sample of the agent's `/metrics` on `t`'s node (`name{labels}`), 0 if absent.
pub fn metric(t: &Topology, sample: &str) -> f64 {
    t.node
        .http_get(ADMIN, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `f` until it returns true; the time it took, or a panic after `within`.
pub fn until(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Joins the node namespaces of `a` and `b` with a veth pair on 10.250.0.0/30 (the underlay of
/// two nodes); returns `(a's address, b's address)`. Only the two node namespaces take part;
/// the links go when the namespaces are deleted.
pub fn join_underlay(a: &Topology, b: &Topology) -> (Ipv4Addr, Ipv4Addr) {
    for pa in &a.pods {
        for pb in &b.pods {
            assert_ne!(
                pa.ip4, pb.ip4,
                "the two nodes' pods must not share addresses"
            );
        }
    }
    let (ia, ib) = (Ipv4Addr::new(10, 250, 0, 1), Ipv4Addr::new(10, 250, 0, 2));
    sh(&[
        "ip",
        "-n",
        &a.node.name,
        "link",
        "add",
        "underlay",
        "type",
        "veth",
        "peer",
        "name",
        "underlay",
        "netns",
        &b.node.name,
    ]);
    for (t, addr) in [(a, ia), (b, ib)] {
        sh(&[
            "ip",
            "-n",
            &t.node.name,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            "underlay",
        ]);
        sh(&["ip", "-n", &t.node.name, "link", "set", "underlay", "up"]);
    }
    (ia, ib)
}
