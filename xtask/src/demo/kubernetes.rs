//! The Kubernetes part of `cargo xtask demo`: the test API server in a node namespace, the
//! manifests applied with `kubectl apply -k manifests/`, the agent run as the DaemonSet would run
//! it, a namespace label that enrols a pod, and an HTTPRoute whose edits the traffic follows, each
//! step timed.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{ADMIN, Netns, Topology};

use crate::{
    kube::{self, ApiServer},
    util::root,
};

const NODE: &str = "node-1";
/// The Service the client calls, and its own endpoint's pod.
const SHOP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

pub fn run(apiserver: &Path) -> anyhow::Result<()> {
    println!("\n==== Kubernetes mode ====");
    println!(
        "== topology: a new node namespace with the API server and the agent; pods client, shop-v1, shop-v2"
    );
    let t = Topology::new(&["client", "shop-v1", "shop-v2"]);
    for p in &t.pods {
        println!("   {:<7} {}  (node side {})", p.name, p.ip4, p.host_if);
    }
    for pod in ["shop-v1", "shop-v2"] {
        t.pod(pod).ns.echo(pod, 8080, &[]);
    }
    let scratch = std::env::temp_dir().join(format!("{}-k8s", t.id));
    std::fs::create_dir_all(&scratch)?;
    let api = ApiServer::start(
        apiserver,
        Some(&t.node.name),
        &scratch.join("kubeconfig"),
        Stdio::inherit(),
    )?;
    println!(
        "== mesh-apiserver (an in-memory Kubernetes API server for tests) on 127.0.0.1 in the node namespace; KUBECONFIG={}",
        api.kubeconfig.display()
    );

    println!(
        "== prerequisite: the Gateway API CRDs (kubectl apply --server-side -f tests/fixtures/gateway-api-v1.6.1-httproutes.yaml)"
    );
    api.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        kube::path_str(&kube::httproute_crd())?,
    ])?;
    println!("== kubectl apply -k manifests/");
    let out = api.kubectl(&["apply", "-k", kube::path_str(&root().join("manifests"))?])?;
    println!("{}", indent(&out));
    println!("== kubectl get daemonset -n skiff-system");
    println!(
        "{}",
        indent(&api.kubectl(&["get", "daemonset", "-n", "skiff-system"])?)
    );
    let Container { args, env } = daemonset_command(&api)?;
    println!(
        "   There is no kubelet here, so the DaemonSet's pod never starts (0 scheduled). The demo\n   \
         runs the agent directly in the node namespace, as the DaemonSet would, with the\n   \
         container's args and env read back from the applied DaemonSet (fieldRefs filled in:\n   \
         spec.nodeName={NODE}; metadata.name=skiff-agent-{NODE}; status.hostIP=127.0.0.1, as\n   \
         this node namespace has no address of its own) and KUBECONFIG instead of the service account's in-cluster config:"
    );
    let mut env = env;
    env.push((
        "KUBECONFIG".into(),
        kube::path_str(&api.kubeconfig)?.to_string(),
    ));
    let shown: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("   {} mesh-agent {}", shown.join(" "), args.join(" "));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    // Agent::start adds `run` and this topology's `--bpffs-dir` (the DaemonSet uses the node's
    // /sys/fs/bpf).
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    let start = Instant::now();
    let mut agent = t.start_agent_env(&rest, &env_ref);
    wait(Duration::from_secs(20), "the agent's /readyz", || {
        t.node.http_get(ADMIN, "/readyz").contains(" 200 ")
    })?;
    println!(
        "   /readyz 200 after {} ms (caches synced, programs attached, policy loaded)",
        start.elapsed().as_millis()
    );

    println!(
        "== kubectl apply: namespace shop (not enrolled); Services shop {SHOP} (its own endpoint: shop-v1),\n   \
         shop-v1, shop-v2 with their EndpointSlices; Pod shop/client on {NODE}"
    );
    api.apply(&objects(&t))?;
    api.apply(&kube::pod_manifest(
        "shop",
        "client",
        NODE,
        &[("app", "client")],
    ))?;
    kube::set_pod_running(&api, "shop", "client", t.pod("client").ip4)?;
    println!(
        "   the pod's status (Running, Ready, podIP {}) set through /status, as a kubelet does",
        t.pod("client").ip4
    );
    let shop = SocketAddr::from((SHOP, 80));
    let client = &t.pod("client").ns;
    println!(
        "== client -> http://{shop}/ before enrolment: {}",
        match backend(client, shop) {
            Ok(b) => format!("answered by {b} (unexpected: the pod is not enrolled)"),
            Err(e) => format!("{e} (not captured, and no kube-proxy here: nothing owns the VIP)"),
        }
    );

    // Each change below runs kubectl on another thread while this one watches from the moment
    // kubectl starts; times are from that moment (kubectl's own start-up included).
    println!("== kubectl label namespace shop skiff.dev/mesh=enabled");
    let (mut captured, mut answered) = (None, None);
    let (kubectl, ()) = change(
        || api.kubectl(&["label", "namespace", "shop", "skiff.dev/mesh=enabled"]),
        "the pod captured and answering",
        |at| {
            // No requests before the capture: the node answers them with ICMP unreachable, which
            // it rate-limits, and a SYN it then drops silently would stall the probe for the
            // client's 1 s SYN retransmission.
            if captured.is_none() {
                captured = (pod_status(&t)["captured"] == true).then_some(at);
            } else if backend(client, shop).is_ok() {
                answered = Some(at);
            }
            answered.map(|_| ())
        },
    )?;
    println!(
        "   kubectl took {}; captured (/status) at {}; first answer through the VIP at {}",
        ms(kubectl),
        ms(captured.unwrap_or_default()),
        ms(answered.unwrap_or_default())
    );
    println!("   /status pods.shop/client: {}", pod_status(&t));
    println!("   10 requests: {}", split(client, shop, 10));

    println!(
        "== kubectl apply: HTTPRoute shop/canary on Service shop: shop-v1 weight 90, shop-v2 weight 10"
    );
    let before = policies_applied(&t);
    let (mut in_force, mut first_v2) = (None, None);
    let (kubectl, ()) = change(
        || api.apply(&route(90, 10)),
        "the route in force",
        |at| {
            if in_force.is_none() && policies_applied(&t) > before {
                in_force = Some(at);
            }
            if first_v2.is_none() && backend(client, shop).is_ok_and(|b| b == "shop-v2") {
                first_v2 = Some(at);
            }
            (in_force.is_some() && first_v2.is_some()).then_some(())
        },
    )?;
    println!(
        "   kubectl took {}; the agent applied the new policy (/status) at {}; first answer from shop-v2 (only the route sends there) at {}",
        ms(kubectl),
        ms(in_force.unwrap_or_default()),
        ms(first_v2.unwrap_or_default())
    );
    println!("   200 requests: {}", split(client, shop, 200));

    println!("== the route edited (kubectl apply of the same route with weights 0 and 100)");
    // Under 90/10, 30 shop-v2 answers in a row have odds of 1e-30: such a run starts where the
    // edit took effect.
    // A request that gets no answer says nothing about the policy: it neither extends nor
    // breaks the run.
    let mut run: Option<(Duration, usize)> = None;
    let mut seen = BTreeMap::new();
    let probed = change(
        || api.apply(&route(0, 100)),
        "30 answers in a row from shop-v2",
        |at| {
            let answer = backend(client, shop).unwrap_or_else(|e| format!("error: {e}"));
            *seen.entry(answer.clone()).or_insert(0usize) += 1;
            if answer == "shop-v2" {
                let (since, n) = run.get_or_insert((at, 0));
                *n += 1;
                if *n == 30 {
                    return Some(*since);
                }
            } else if !answer.starts_with("error") {
                run = None;
            }
            None
        },
    );
    let (kubectl, follows) = probed.with_context(|| format!("answers seen: {seen:?}"))?;
    println!(
        "   kubectl took {}; every answer from shop-v2 from {} on (the start of a run of 30)",
        ms(kubectl),
        ms(follows)
    );
    println!("   200 requests: {}", split(client, shop, 200));

    println!("== kubectl delete namespace shop: the pod goes away, the agent releases its veth");
    let (kubectl, released) = change(
        || api.kubectl(&["delete", "namespace", "shop"]),
        "the pod released",
        |at| {
            let s = status(&t);
            (!s.is_null() && s["kubernetes"]["pods"]["shop/client"].is_null()).then_some(at)
        },
    )?;
    println!(
        "   kubectl took {}; released at {}; capture pins left for {}: {}",
        ms(kubectl),
        ms(released),
        t.pod("client").host_if,
        pins(&t).join(", ")
    );
    println!("== SIGTERM to the agent, then the API server stops and the namespaces are removed");
    println!(
        "   agent exited: {}",
        agent.terminate(Duration::from_secs(30))
    );
    drop(api);
    drop(t);
    Ok(())
}

/// A container's command line: args, and env in order.
struct Container {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// The agent container's args and env from the DaemonSet the API server holds, with the
/// downward-API fields a kubelet would fill in, and `$(VAR)` references expanded as a kubelet
/// expands them.
fn daemonset_command(api: &ApiServer) -> anyhow::Result<Container> {
    let ds: serde_json::Value = serde_json::from_str(&api.kubectl(&[
        "get",
        "daemonset",
        "skiff-agent",
        "-n",
        "skiff-system",
        "-o",
        "json",
    ])?)?;
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some(a.as_str()?.to_string()))
        .collect();
    if args.first().map(String::as_str) != Some("run") {
        bail!("the DaemonSet's agent args do not start with `run`: {args:?}");
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env entry without a name")?;
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            v
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => NODE.to_string(),
                Some("status.hostIP") => "127.0.0.1".to_string(),
                // The name a kubelet would give the node's agent pod (the status Lease holder).
                Some("metadata.name") => format!("skiff-agent-{NODE}"),
                Some("metadata.namespace") => "skiff-system".to_string(),
                other => bail!("env {name}: the demo cannot fill in {other:?}"),
            }
        };
        env.push((name.to_string(), value));
    }
    Ok(Container { args, env })
}

/// Services and EndpointSlices of the demo's namespace.
fn objects(t: &Topology) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n");
    for (name, ip, pod) in [
        ("shop", SHOP, "shop-v1"),
        ("shop-v1", Ipv4Addr::new(10, 96, 0, 51), "shop-v1"),
        ("shop-v2", Ipv4Addr::new(10, 96, 0, 52), "shop-v2"),
    ] {
        out += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]\n",
            t.pod(pod).ip4
        );
    }
    out
}

fn route(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: canary, namespace: shop}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: shop, port: 80}}]\n  \
         rules:\n  - backendRefs:\n    - {{name: shop-v1, port: 80, weight: {v1}}}\n    - {{name: shop-v2, port: 80, weight: {v2}}}\n"
    )
}

/// Which echo backend answered `GET /` on `addr` from `ns`.
fn backend(ns: &Netns, addr: SocketAddr) -> anyhow::Result<String> {
    let raw = ns.run(move || -> anyhow::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: shop\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("not an echo answer: {raw:?}"))?;
    Ok(v["backend"].as_str().unwrap_or("?").to_string())
}

/// `n` requests; how many each backend answered.
fn split(ns: &Netns, addr: SocketAddr, n: usize) -> String {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let who = backend(ns, addr).unwrap_or_else(|e| format!("error: {e}"));
        *counts.entry(who).or_insert(0usize) += 1;
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The agent's `/status`, or `null` if it did not answer within 200 ms. Short timeouts: a
/// probe that polls it must not stall for a SYN retransmission (1 s) when one connection is lost.
fn status(t: &Topology) -> serde_json::Value {
    let raw = t.node.run(|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&ADMIN, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.write_all(b"GET /status HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    let raw = raw.unwrap_or_default();
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_default()
}

fn pod_status(t: &Topology) -> serde_json::Value {
    status(t)["kubernetes"]["pods"]["shop/client"].clone()
}

fn policies_applied(t: &Topology) -> u64 {
    status(t)["kubernetes"]["policies_applied"]
        .as_u64()
        .unwrap_or(0)
}

/// The client veth's entries under the agent's bpffs folder.
fn pins(t: &Topology) -> Vec<String> {
    let iface = &t.pod("client").host_if;
    let left: Vec<String> = std::fs::read_dir(&t.bpffs_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(&format!("-{iface}")))
                .collect()
        })
        .unwrap_or_default();
    if left.is_empty() {
        vec!["none".into()]
    } else {
        left
    }
}

/// Polls `f` every 5 ms until it holds; how long that took, or an error after `within`.
fn wait(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `kubectl` (one change) on another thread and polls `probe` with the time since it
/// started, from that moment until it returns `Some` (at most 5 s). Returns how long kubectl
/// took and what the probe found.
fn change<T>(
    kubectl: impl FnOnce() -> anyhow::Result<String> + Send,
    what: &str,
    mut probe: impl FnMut(Duration) -> Option<T>,
) -> anyhow::Result<(Duration, T)> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let done = s.spawn(move || kubectl().map(|_| start.elapsed()));
        let found = loop {
            let at = start.elapsed();
            if let Some(found) = probe(at) {
                break Some(found);
            }
            if at > Duration::from_secs(5) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = done
            .join()
            .map_err(|_| anyhow::anyhow!("the kubectl thread panicked"))?;
        match (took, found) {
            (Ok(took), Some(found)) => Ok((took, found)),
            (Err(e), _) => Err(e),
            (Ok(took), None) => bail!("{what}: not within 5 s (kubectl succeeded in {})", ms(took)),
        }
    })
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn indent(s: &str) -> String {
    s.trim_end()
        .lines()
        .map(|l| format!("   | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
