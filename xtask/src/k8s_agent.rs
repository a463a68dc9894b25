//! `xtask k8s-agent`: the agent command the conformance runner (`../shared/conformance/run.py`)
//! starts for each case when the agent runs in Kubernetes mode. The runner starts it in the node
//! namespace with the case's policy file and the client pod's node-side veth; this turns them into
//! a cluster the agent watches: `mesh-apiserver` on loopback, the CRDs a Skiff cluster has, the
//! case's Services, EndpointSlices and HTTPRoutes applied with the real `kubectl`, and a Pod
//! object for the client (Running, with the IP behind the veth, in a namespace labelled
//! `skiff.dev/mesh=enabled`). The agent gets no `--policy` and no `--interface`: it learns both
//! from the API, as on a node.
//!
//! Stopping: the runner SIGKILLs every process in the node namespace between cases, which covers
//! the API server too. When only this process is signalled (SIGTERM, SIGINT, SIGHUP), it stops
//! the agent with SIGTERM, then the API server. Both children carry a parent-death signal, so
//! neither outlives this process even when it alone is SIGKILLed.
use std::{
    collections::BTreeSet,
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::kube::{self, ApiServer};

/// The node the agent runs as; the client Pod object is bound to it.
const NODE: &str = "conformance-node";
/// The client Pod object's namespace, enrolled by its label.
const CLIENT_NAMESPACE: &str = "conformance-clients";
/// The label that enrols a namespace's pods (the agent's `k8s::LABEL`).
const ENROL_LABEL: &str = "skiff.dev/mesh";
/// How long the agent may drain after SIGTERM before it is killed (its default drain timeout
/// is 20 s).
const AGENT_STOP: Duration = Duration::from_secs(25);

#[derive(clap::Args)]
pub struct Options {
    /// The case's policy file (Services, EndpointSlices, HTTPRoutes), applied with kubectl.
    #[arg(long)]
    policy: PathBuf,
    /// The client pod's veth in this (node) namespace; the address at its other end becomes
    /// the Pod object's IP.
    #[arg(long)]
    interface: String,
    /// Scratch folder for the kubeconfig, the generated objects and the API server's log.
    #[arg(long)]
    dir: PathBuf,
    /// The `mesh-agent` binary.
    #[arg(long)]
    agent: PathBuf,
    /// The `mesh-apiserver` binary.
    #[arg(long)]
    apiserver: PathBuf,
}

pub fn run(o: &Options) -> anyhow::Result<ExitCode> {
    // One thread: the children's parent-death signal fires when the thread that spawned them
    // ends, so they are all spawned from this one, which lives as long as the process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(supervise(o))
}

async fn supervise(o: &Options) -> anyhow::Result<ExitCode> {
    // Registered first, so a signal during the setup is not lost: it stops the agent after.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let start = Instant::now();

    let policy = std::fs::read_to_string(&o.policy)
        .with_context(|| format!("reading {}", o.policy.display()))?;
    let namespaces = namespaces_of(&policy)
        .with_context(|| format!("reading the objects in {}", o.policy.display()))?;
    let client_ip = peer_ipv4(&o.interface)?;

    let log = File::create(o.dir.join("apiserver.log"))?;
    let api = ApiServer::start(
        &o.apiserver,
        None,
        &o.dir.join("kubeconfig"),
        Stdio::from(log),
    )?;
    let api_up = start.elapsed();
    // The runner sends its first request 2.5 s after starting this, and each kubectl costs
    // 150-300 ms (up to a second on a loaded machine), mostly its own start-up: the set-up
    // around the case goes to the API server directly, in milliseconds, and kubectl applies
    // the case's own policy file, as a user would, while the agent starts.
    let crds = [kube::httproute_crd(), kube::meshpolicy_crd()];
    api.create_all(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        &crds,
    )?;
    // Some may exist already (`default`).
    for ns in &namespaces {
        api.create(
            "/api/v1/namespaces",
            &serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )?;
    }
    let client_ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": CLIENT_NAMESPACE, "labels": {ENROL_LABEL: "enabled"}}});
    api.create("/api/v1/namespaces", &client_ns)?;
    let pod: serde_json::Value = serde_yaml::from_str(&kube::pod_manifest(
        CLIENT_NAMESPACE,
        "client",
        NODE,
        &[("app", "client")],
    ))?;
    let pods = format!("/api/v1/namespaces/{CLIENT_NAMESPACE}/pods");
    api.create(&pods, &pod)?;
    api.request(
        "PATCH",
        &format!("{pods}/client/status"),
        "application/merge-patch+json",
        &kube::running_status(client_ip),
    )?;

    let objects_in = start.elapsed();
    // Started once the CRDs exist: the agent discovers the served route kinds at start.
    let mut agent = tokio::process::Command::new("setpriv")
        .args(["--pdeathsig", "TERM", "--"])
        .arg(&o.agent)
        .args(["run", "--kubernetes", "--node-name", NODE])
        .env("KUBECONFIG", &api.kubeconfig)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", o.agent.display()))?;
    api.kubectl(&["apply", "-f", kube::path_str(&o.policy)?])?;
    eprintln!(
        "k8s-agent: API server up at {} ms; CRDs, namespaces {namespaces:?} and pod {CLIENT_NAMESPACE}/client ({client_ip} on {NODE}) at {} ms; {} applied with kubectl at {} ms",
        api_up.as_millis(),
        objects_in.as_millis(),
        o.policy.display(),
        start.elapsed().as_millis(),
    );

    let signalled = tokio::select! {
        status = agent.wait() => {
            let status = status?;
            eprintln!("k8s-agent: the agent exited ({status}); stopping the API server");
            drop(api);
            return Ok(ExitCode::from(status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1)));
        }
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = hup.recv() => "SIGHUP",
    };
    eprintln!("k8s-agent: {signalled}: stopping the agent, then the API server");
    if let Some(pid) = agent.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(AGENT_STOP, agent.wait())
        .await
        .is_err()
    {
        eprintln!("k8s-agent: the agent did not stop within {AGENT_STOP:?}; killing it");
        agent.kill().await?;
    }
    drop(api);
    Ok(ExitCode::SUCCESS)
}

/// The namespaces the policy's objects live in: they must exist before kubectl can create
/// anything in them (the runner's policy files hold no Namespace objects).
pub(crate) fn namespaces_of(policy: &str) -> anyhow::Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(policy) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc)?;
        if let Some(ns) = v["metadata"]["namespace"].as_str() {
            found.insert(ns.to_string());
        }
    }
    Ok(found)
}

/// The IPv4 address at the other end of the veth `interface`: `ip` names the peer's network
/// namespace (by its nsid) and the peer's ifindex.
pub(crate) fn peer_ipv4(interface: &str) -> anyhow::Result<Ipv4Addr> {
    let link = ip_json(&["link", "show", "dev", interface])?;
    let link = &link[0];
    let (Some(nsid), Some(peer)) = (link["link_netnsid"].as_i64(), link["link_index"].as_i64())
    else {
        bail!("{interface} is not a veth whose peer is in another network namespace: {link}");
    };
    let ids = ip_json(&["netns", "list-id"])?;
    let Some(ns) = ids
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["nsid"].as_i64() == Some(nsid))
        .and_then(|e| e["name"].as_str())
    else {
        bail!("the peer of {interface} is in network namespace id {nsid}, which has no name");
    };
    let addrs = ip_json(&["-n", ns, "-4", "addr", "show"])?;
    addrs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["ifindex"].as_i64() == Some(peer))
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .find_map(|a| a["local"].as_str()?.parse().ok())
        .with_context(|| {
            format!("the peer of {interface} (ifindex {peer} in {ns}) has no IPv4 address")
        })
}

fn ip_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip -j {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
