//! Two nodes for the mTLS tests and benchmark: node namespaces A and B, each with its pods,
//! joined by an underlay veth (`kube::join_underlay`), with routes between their pod ranges over
//! it, a scratch folder and a CA of the trust domain [`TRUST_DOMAIN`] for the agents.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_identity::{RootCaPem, TrustDomain};

use crate::{Topology, kube::join_underlay};

/// The trust domain of every lab.
pub const TRUST_DOMAIN: &str = "cluster.local";

pub struct TwoNodes {
    pub a: Topology,
    pub b: Topology,
    /// Node A's and node B's addresses on the underlay: their `node_ip`.
    pub node_a: Ipv4Addr,
    pub node_b: Ipv4Addr,
    /// Scratch folder (configurations, policy, CA, captures).
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
}

impl TwoNodes {
    /// Node A with `pods_a` on 10.`net_a`.0.0/16, node B with `pods_b` on 10.`net_b`.0.0/16.
    pub fn new(pods_a: &[&str], net_a: u8, pods_b: &[&str], net_b: u8) -> TwoNodes {
        let a = Topology::with_net(pods_a, net_a);
        let b = Topology::with_net(pods_b, net_b);
        let (node_a, node_b) = join_underlay(&a, &b);
        for (t, net, via) in [(&a, net_b, node_b), (&b, net_a, node_a)] {
            t.node.sh(&[
                "ip",
                "route",
                "add",
                &format!("10.{net}.0.0/16"),
                "via",
                &via.to_string(),
            ]);
        }
        let dir = std::env::temp_dir().join(format!("{}-mtls", a.id));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let (ca_cert, ca_key) = ca(&dir, "ca");
        TwoNodes {
            a,
            b,
            node_a,
            node_b,
            dir,
            ca_cert,
            ca_key,
        }
    }

    /// Writes `<name>.yaml` in the scratch folder: an agent configuration capturing on
    /// `interfaces`, with `policy` if given, the mesh on with this lab's CA and `node_ip` (when
    /// given; else `--node-ip` must say it), and `extra` lines (`  key: value` lines land in
    /// `mesh:`).
    pub fn config(
        &self,
        name: &str,
        node_ip: Option<Ipv4Addr>,
        interfaces: &[&str],
        policy: Option<&Path>,
        extra: &str,
    ) -> PathBuf {
        let path = self.dir.join(format!("{name}.yaml"));
        let policy = policy.map_or(String::new(), |p| format!("policy: {}\n", p.display()));
        let node_ip = node_ip.map_or(String::new(), |ip| format!("  node_ip: {ip}\n"));
        std::fs::write(
            &path,
            format!(
                "interfaces: [{}]\n{policy}mesh:\n  trust_domain: {TRUST_DOMAIN}\n  ca_cert: {}\n  ca_key: {}\n{node_ip}{extra}",
                interfaces.join(", "),
                self.ca_cert.display(),
                self.ca_key.display(),
            ),
        )
        .expect("agent configuration");
        path
    }
}

/// A new CA of [`TRUST_DOMAIN`], valid two days, written under `dir/name`; (cert, key) paths.
pub fn ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let td = TrustDomain::new(TRUST_DOMAIN).expect("trust domain");
    let root = RootCaPem::generate_valid_for(&td, Duration::from_secs(2 * 86_400)).expect("CA");
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).expect("dir");
    root.write_to(&sub).expect("write CA")
}

/// A Running Pod object of the node at `host`, as a kubelet reports it: what the agent's
/// policy files take as a workload.
pub fn pod(name: &str, namespace: &str, sa: &str, ip: Ipv4Addr, host: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{serviceAccountName: {sa}, nodeName: node-{host}}}\n\
         status: {{phase: Running, podIP: {ip}, hostIP: {host}}}\n"
    )
}
