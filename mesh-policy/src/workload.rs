//! Workloads: the pods behind the IPs the data plane sees, with what the mTLS tunnel needs to
//! know about them (their identity, their node, whether they are in the mesh).
//!
//! Pods come from the same place as the rest of the policy: `v1/Pod` documents in the policy
//! files, or the agent's Pod watch in Kubernetes mode. Only running pods in their own network
//! namespace own their IPs: a `hostNetwork` pod shares its node's IP, and a pod that has
//! finished (`Succeeded`, `Failed`) keeps its `podIP` in its status after the IP has gone back
//! to the pool.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

/// The label that enrols a namespace, or overrides its namespace for one pod: `enabled` or
/// `disabled`.
pub const MESH_LABEL: &str = "skiff.dev/mesh";
/// The ServiceAccount of a pod that names none, as the apiserver assigns it.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A pod as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its ServiceAccount (`default` when the pod names none): with the namespace, its
    /// identity.
    pub service_account: String,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// The node's primary IP (`status.hostIP`, else the first of `status.hostIPs`): where the
    /// tunnel to this pod goes.
    pub node_ip: Option<IpAddr>,
    /// Every node IP the status lists, the primary first (one per family on dual-stack nodes).
    pub node_ips: Vec<IpAddr>,
    /// The pod's IPs, the primary first.
    pub ips: Vec<IpAddr>,
    /// Whether the pod is in the mesh (see [`enrolled`]).
    pub enrolled: bool,
}

impl Workload {
    /// The pod's SPIFFE ID in `trust_domain`:
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
    pub fn principal(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// Whether a pod is in the mesh: its own [`MESH_LABEL`] decides when it is `enabled` or
/// `disabled`; otherwise its namespace's label, when `enabled`. One rule for file and Kubernetes
/// mode (the agent's enrolment uses it too).
pub fn enrolled(
    pod_labels: Option<&BTreeMap<String, String>>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    match label(pod_labels) {
        Some("enabled") => true,
        Some("disabled") => false,
        _ => label(namespace_labels) == Some("enabled"),
    }
}

fn label(labels: Option<&BTreeMap<String, String>>) -> Option<&str> {
    labels.and_then(|l| l.get(MESH_LABEL)).map(String::as_str)
}

/// Drops everything from a Pod that neither the workload table nor the agent's enrolment reads,
/// so that a node's watch cache holds little per pod: metadata name, namespace, labels, uid,
/// generation and creation time; `spec.serviceAccountName`, `nodeName`, `hostNetwork`;
/// `status.phase`, pod and host IPs, conditions.
pub fn strip_pod(pod: Pod) -> Pod {
    let spec = pod.spec.unwrap_or_default();
    Pod {
        metadata: strip_meta(pod.metadata),
        spec: Some(PodSpec {
            service_account_name: spec.service_account_name,
            node_name: spec.node_name,
            host_network: spec.host_network,
            ..PodSpec::default()
        }),
        status: pod.status.map(|status| PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            host_ip: status.host_ip,
            host_ips: status.host_ips,
            conditions: status.conditions,
            ..PodStatus::default()
        }),
    }
}

/// Keeps a Namespace's name and labels.
pub fn strip_namespace(namespace: Namespace) -> Namespace {
    Namespace {
        metadata: strip_meta(namespace.metadata),
        ..Namespace::default()
    }
}

fn strip_meta(meta: ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels: meta.labels,
        uid: meta.uid,
        generation: meta.generation,
        creation_timestamp: meta.creation_timestamp,
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: Option<&str>) -> Option<BTreeMap<String, String>> {
        v.map(|v| BTreeMap::from([(MESH_LABEL.to_string(), v.to_string())]))
    }

    #[test]
    fn pod_label_overrides_namespace_label() {
        let on = labels(Some("enabled"));
        let off = labels(None);
        let pod = |v| labels(v);
        assert!(enrolled(pod(None).as_ref(), on.as_ref()));
        assert!(!enrolled(pod(None).as_ref(), off.as_ref()));
        assert!(!enrolled(pod(Some("disabled")).as_ref(), on.as_ref()));
        assert!(enrolled(pod(Some("enabled")).as_ref(), off.as_ref()));
        assert!(!enrolled(pod(None).as_ref(), None));
        // Any other value leaves the decision to the namespace.
        assert!(enrolled(pod(Some("yes")).as_ref(), on.as_ref()));
    }
}
