//! Enrolment: which pods of this node are captured, and on which host-side interface.
//!
//! A namespace labelled `skiff.dev/mesh=enabled` enrols its pods; a pod's own
//! `skiff.dev/mesh=enabled|disabled` label overrides its namespace. An enrolled pod is captured
//! once it runs and has an IP: the kernel's route to that IP names the host-side veth (the
//! device the programs attach to). CNIs that put pods behind a bridge (the `bridge` plugin,
//! kubenet) route pod IPs via the bridge, not a per-pod veth: such pods are reported, not
//! captured, because attaching to the bridge would capture every pod behind it.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus};
use kube::core::PartialObjectMeta;
use mesh_policy::InterfaceName;

use crate::ebpf::netlink;

/// The label that enrols a namespace, or overrides it for one pod.
pub const LABEL: &str = mesh_policy::MESH_LABEL;

/// Keeps what enrolment and the mTLS tunnel's workloads read: labels, ServiceAccount, node,
/// host network, phase, pod and node IPs, conditions.
pub fn strip_pod(pod: &mut Pod) {
    super::kinds::strip_meta(&mut pod.metadata);
    pod.metadata.annotations = None;
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        service_account_name: spec.service_account_name,
        node_name: spec.node_name,
        host_network: spec.host_network,
        ..Default::default()
    });
    if let Some(status) = pod.status.take() {
        pod.status = Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            host_ips: status.host_ips,
            conditions: status.conditions,
            ..Default::default()
        });
    }
}

/// Whether the pod's or its namespace's labels enrol it (the rule the policy's workloads use).
pub fn enrolled(pod: &Pod, namespaces: &BTreeMap<String, &PartialObjectMeta<Namespace>>) -> bool {
    let namespace = pod
        .metadata
        .namespace
        .as_ref()
        .and_then(|ns| namespaces.get(ns));
    mesh_policy::enrolled(
        pod.metadata.labels.as_ref(),
        namespace.and_then(|ns| ns.metadata.labels.as_ref()),
    )
}

/// `namespace/name`.
pub fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The pod's IP if it runs on `node`, in its own network namespace, and has one.
pub fn running_ip(pod: &Pod, node: &str) -> Option<IpAddr> {
    let spec = pod.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(node) || spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// Why a pod that should be captured is not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no route to the pod IP {ip}: {reason}")]
    Route { ip: IpAddr, reason: String },
    #[error(
        "the pod IP {ip} is routed via the bridge {bridge}, not a per-pod veth: bridge-based CNIs (the bridge plugin, kubenet) are not supported, the pod is not captured"
    )]
    Bridge { ip: IpAddr, bridge: String },
    #[error(
        "the pod IP {ip} is routed via {device} (kind {kind}), not a host-side veth; the pod is not captured"
    )]
    NotVeth {
        ip: IpAddr,
        device: String,
        kind: String,
    },
}

/// The host-side interface of the pod with `ip`, from the kernel's route lookup.
pub fn host_interface(ip: IpAddr) -> Result<InterfaceName, Error> {
    let dev = netlink::route_device(ip).map_err(|e| Error::Route {
        ip,
        reason: e.to_string(),
    })?;
    match dev.kind.as_deref() {
        Some("veth") => dev
            .name
            .parse()
            .map_err(|reason: String| Error::Route { ip, reason }),
        Some("bridge") => Err(Error::Bridge {
            ip,
            bridge: dev.name,
        }),
        other => Err(Error::NotVeth {
            ip,
            device: dev.name,
            kind: other.unwrap_or("none").to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn labels(v: Option<&str>) -> Option<BTreeMap<String, String>> {
        v.map(|v| BTreeMap::from([(LABEL.to_string(), v.to_string())]))
    }

    fn pod(label: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("shop".into()),
                labels: labels(label),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn pod_label_overrides_namespace_label() {
        let ns = |v: Option<&str>| PartialObjectMeta::<Namespace> {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                labels: labels(v),
                ..Default::default()
            },
            ..Default::default()
        };
        let on = ns(Some("enabled"));
        let off = ns(None);
        let with = |n| BTreeMap::from([("shop".to_string(), n)]);
        assert!(enrolled(&pod(None), &with(&on)));
        assert!(!enrolled(&pod(None), &with(&off)));
        assert!(!enrolled(&pod(Some("disabled")), &with(&on)));
        assert!(enrolled(&pod(Some("enabled")), &with(&off)));
        assert!(!enrolled(&pod(None), &BTreeMap::new()));
    }

    #[test]
    fn only_running_pods_of_this_node_with_an_ip() {
        let mut p = pod(None);
        p.spec = Some(PodSpec {
            node_name: Some("n1".into()),
            ..Default::default()
        });
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.2".into()),
            ..Default::default()
        });
        assert_eq!(running_ip(&p, "n1"), Some("10.0.0.2".parse().expect("ip")));
        assert_eq!(running_ip(&p, "n2"), None);
        strip_pod(&mut p);
        assert_eq!(running_ip(&p, "n1"), Some("10.0.0.2".parse().expect("ip")));
        if let Some(s) = p.status.as_mut() {
            s.phase = Some("Pending".into());
        }
        assert_eq!(running_ip(&p, "n1"), None);
    }
}
