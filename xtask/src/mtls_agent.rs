//! `xtask mtls-agent`: the agent command the conformance runner (`../shared/conformance/run.py`)
//! starts for each case when the requests go through the mTLS tunnel. The runner has one node
//! namespace; this makes it two nodes as far as the mesh can tell: node A (10.255.0.1) is the
//! agent the runner expects, capturing on the client pod's veth, and node B (10.255.0.2) is a
//! second agent in the same namespace with its own ports, mark, routing table and pins, which
//! captures nothing and only serves the tunnel. The case's policy gains the Pod objects of a
//! cluster: the client on node A, every backend (each EndpointSlice address) on node B, all in
//! namespaces enrolled in the mesh. Every request the runner sends is then routed by node A's
//! HTTP proxy and carried to its backend through node B's tunnel port: HTTP/2 CONNECT in TLS 1.3
//! with both sides' SPIFFE certificates from a CA made for the case.
//!
//! Stopping: the runner SIGKILLs every process in the node namespace between cases. When only
//! this process is signalled (SIGTERM, SIGINT, SIGHUP), it stops both agents with SIGTERM. Both
//! carry a parent-death signal, so neither outlives this process.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_identity::{RootCaPem, TrustDomain};
use tokio::{
    process::{Child, Command},
    signal::unix::{SignalKind, signal},
};

use crate::k8s_agent::{namespaces_of, peer_ipv4};

const TRUST_DOMAIN: &str = "cluster.local";
const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);
/// The client Pod object's namespace.
const CLIENT_NAMESPACE: &str = "conformance-clients";
/// How long an agent may drain after SIGTERM before it is killed (its default drain timeout
/// is 20 s).
const AGENT_STOP: Duration = Duration::from_secs(25);

#[derive(clap::Args)]
pub struct Options {
    /// The case's policy file (Services, EndpointSlices, HTTPRoutes).
    #[arg(long)]
    policy: PathBuf,
    /// The client pod's veth in this (node) namespace: node A captures on it.
    #[arg(long)]
    interface: String,
    /// Scratch folder for the CA, the policy with its Pod objects, both configurations and
    /// node B's log.
    #[arg(long)]
    dir: PathBuf,
    /// The `mesh-agent` binary.
    #[arg(long)]
    agent: PathBuf,
}

pub fn run(o: &Options) -> anyhow::Result<ExitCode> {
    let policy = std::fs::read_to_string(&o.policy)
        .with_context(|| format!("reading {}", o.policy.display()))?;
    let client_ip = peer_ipv4(&o.interface)?;
    let mut namespaces = namespaces_of(&policy)?;
    namespaces.insert(CLIENT_NAMESPACE.to_string());
    let backends = backends_of(&policy)?;
    for node in [NODE_A, NODE_B] {
        ip(&["addr", "replace", &format!("{node}/32"), "dev", "lo"])?;
    }
    ip(&["link", "set", "lo", "up"])?;

    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let (ca_cert, ca_key) =
        RootCaPem::generate_valid_for(&td, Duration::from_secs(2 * 86_400))?.write_to(&o.dir)?;
    let mut docs = vec![policy];
    for ns in &namespaces {
        docs.push(format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{skiff.dev/mesh: enabled}}}}\n"
        ));
    }
    docs.push(pod(CLIENT_NAMESPACE, "client", client_ip, NODE_A));
    for (i, (ip, ns)) in backends.iter().enumerate() {
        docs.push(pod(ns, &format!("backend-{i}"), *ip, NODE_B));
    }
    let full = o.dir.join("policy-with-pods.yaml");
    std::fs::write(&full, docs.join("\n---\n"))?;

    let mesh = |node: Ipv4Addr| {
        format!(
            "mesh:\n  trust_domain: {TRUST_DOMAIN}\n  ca_cert: {}\n  ca_key: {}\n  node_ip: {node}\n",
            ca_cert.display(),
            ca_key.display()
        )
    };
    let config_a = o.dir.join("node-a.yaml");
    std::fs::write(
        &config_a,
        format!(
            "interfaces: [{}]\npolicy: {}\n{}",
            o.interface,
            full.display(),
            mesh(NODE_A)
        ),
    )?;
    // Node B: nothing captured, and nothing of node A's taken (ports, mark, table, pins).
    let config_b = o.dir.join("node-b.yaml");
    std::fs::write(
        &config_b,
        format!(
            "interfaces: []\npolicy: {}\nlisten_port: 15101\nadmin_address: 127.0.0.1:15121\n\
             mark: 2\nroute_table: 101\nkube_proxy_notrack: false\nbpffs_dir: /sys/fs/bpf/skiff-node-b\n\
             handover_socket: {}\n{}",
            full.display(),
            o.dir.join("node-b-handover.sock").display(),
            mesh(NODE_B)
        ),
    )?;
    eprintln!(
        "mtls-agent: client {client_ip} on node A ({NODE_A}), {} backend(s) on node B ({NODE_B}): {:?}",
        backends.len(),
        backends.keys().collect::<Vec<_>>()
    );
    let log_b = std::fs::File::create(o.dir.join("node-b.log"))?;
    // One thread: the children's parent-death signal fires when the thread that spawned them
    // ends, so both are spawned from this one, which lives as long as the process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut b = spawn(&o.agent, &config_b, Some(log_b))?;
        let mut a = spawn(&o.agent, &config_a, None)?;
        let exited = tokio::select! {
            status = a.wait() => Some(("node A", status?)),
            status = b.wait() => Some(("node B", status?)),
            _ = term.recv() => None,
            _ = int.recv() => None,
            _ = hup.recv() => None,
        };
        if let Some((name, status)) = &exited {
            eprintln!("mtls-agent: the {name} agent exited ({status}); stopping the other");
        } else {
            eprintln!("mtls-agent: signalled: stopping both agents");
        }
        for child in [&mut a, &mut b] {
            stop(child).await;
        }
        Ok(match exited {
            Some((_, status)) => ExitCode::from(
                status
                    .code()
                    .and_then(|c| u8::try_from(c).ok())
                    .unwrap_or(1),
            ),
            None => ExitCode::SUCCESS,
        })
    })
}

/// SIGTERM, then SIGKILL if the agent has not drained within [`AGENT_STOP`].
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(AGENT_STOP, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Starts an agent with `config`; its output goes to `log`, else to this process's.
fn spawn(agent: &Path, config: &Path, log: Option<std::fs::File>) -> anyhow::Result<Child> {
    let mut cmd = Command::new("setpriv");
    if let Some(log) = log {
        cmd.stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
    }
    cmd.args(["--pdeathsig", "TERM", "--"])
        .arg(agent)
        .arg("run")
        .arg("--config")
        .arg(config)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} with {}", agent.display(), config.display()))
}

/// Every endpoint address of the policy's EndpointSlices, with the slice's namespace (the
/// first one when an address is in several).
fn backends_of(policy: &str) -> anyhow::Result<BTreeMap<Ipv4Addr, String>> {
    let mut found = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(policy) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc)?;
        if v["kind"] != "EndpointSlice" {
            continue;
        }
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("default");
        for e in v["endpoints"].as_array().into_iter().flatten() {
            for a in e["addresses"].as_array().into_iter().flatten() {
                let a = a.as_str().context("an endpoint address")?;
                let ip: Ipv4Addr = a
                    .parse()
                    .with_context(|| format!("endpoint address {a:?}"))?;
                found.entry(ip).or_insert_with(|| ns.to_string());
            }
        }
    }
    if found.is_empty() {
        bail!("no EndpointSlice address in the policy: nothing to put on node B");
    }
    Ok(found)
}

fn pod(namespace: &str, name: &str, ip: Ipv4Addr, node: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{serviceAccountName: {name}, nodeName: node-{node}}}\n\
         status: {{phase: Running, podIP: {ip}, hostIP: {node}}}\n"
    )
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
