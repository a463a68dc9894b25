//! Pods and Namespaces: the workload table, by pod IP.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::*;
use crate::workload::{DEFAULT_SERVICE_ACCOUNT, Workload, enrolled};

/// `status.phase` values a Pod may have.
const PHASES: [&str; 5] = ["Pending", "Running", "Succeeded", "Failed", "Unknown"];

/// Validates the Pods among `objects` and indexes those that own their IPs (see
/// [`crate::workload`]) by IP. Two such pods with one IP: the later is reported, naming the
/// earlier, and left out.
pub(super) fn lower_workloads<'a>(
    cx: &mut Cx,
    objects: impl Iterator<Item = &'a Object> + Clone,
) -> HashMap<IpAddr, Arc<Workload>> {
    let namespace_labels: HashMap<&str, &BTreeMap<String, String>> = objects
        .clone()
        .filter_map(|o| match &o.resource {
            Resource::Namespace(ns) => Some((o.resource.name(), ns.metadata.labels.as_ref()?)),
            _ => None,
        })
        .collect();
    let mut by_ip: HashMap<IpAddr, Arc<Workload>> = HashMap::new();
    let mut owner: HashMap<IpAddr, &Object> = HashMap::new();
    for object in objects {
        let Resource::Pod(pod) = &object.resource else {
            continue;
        };
        let at = At::of(object);
        let Some(workload) = lower_pod(cx, &at, pod, &object.resource, &namespace_labels) else {
            continue;
        };
        let clash = workload
            .ips
            .iter()
            .find_map(|ip| owner.get(ip).map(|o| (ip, o)));
        if let Some((ip, first)) = clash {
            cx.error(
                &at,
                "status.podIP",
                format!(
                    "{ip} is also the IP of {} ({}); a pod IP belongs to one running pod",
                    first.display_name(),
                    first.source
                ),
            );
            continue;
        }
        let workload = Arc::new(workload);
        for ip in &workload.ips {
            owner.insert(*ip, object);
            by_ip.insert(*ip, workload.clone());
        }
    }
    by_ip
}

/// Validates one Pod; `None` when it is invalid or does not own its IPs.
fn lower_pod(
    cx: &mut Cx,
    at: &At<'_>,
    pod: &Pod,
    resource: &Resource,
    namespace_labels: &HashMap<&str, &BTreeMap<String, String>>,
) -> Option<Workload> {
    let errors = cx.errors.len();
    let spec = pod.spec.as_ref();
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    if let Err(reason) = names::dns_subdomain(service_account) {
        cx.error(at, "spec.serviceAccountName", reason);
    }
    let node_name = spec.and_then(|s| s.node_name.clone());
    if let Some(node) = &node_name
        && let Err(reason) = names::dns_subdomain(node)
    {
        cx.error(at, "spec.nodeName", reason);
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    if let Some(phase) = phase
        && !PHASES.contains(&phase)
    {
        cx.error(
            at,
            "status.phase",
            format!("{phase:?} is not one of {}", PHASES.join(", ")),
        );
    }
    let mut ip = |field: String, text: &str| match text.parse::<IpAddr>() {
        Ok(ip) => Some(ip.to_canonical()),
        Err(_) => {
            cx.error(at, field, format!("{text:?} is not an IP address"));
            None
        }
    };
    let mut ips = Vec::new();
    let mut node_ips = Vec::new();
    if let Some(status) = status {
        let primary = status.pod_ip.as_deref().map(|t| ("status.podIP".into(), t));
        let listed = status.pod_ips.iter().flatten().enumerate();
        let listed = listed.map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.as_str()));
        for (field, text) in primary.into_iter().chain(listed) {
            if let Some(ip) = ip(field, text)
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        let primary = status
            .host_ip
            .as_deref()
            .map(|t| ("status.hostIP".into(), t));
        let listed = status.host_ips.iter().flatten().enumerate();
        let listed = listed.map(|(i, p)| (format!("status.hostIPs[{i}].ip"), p.ip.as_str()));
        for (field, text) in primary.into_iter().chain(listed) {
            if let Some(ip) = ip(field, text)
                && !node_ips.contains(&ip)
            {
                node_ips.push(ip);
            }
        }
    }
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    let finished = matches!(phase, Some("Succeeded" | "Failed"));
    if cx.errors.len() > errors || host_network || finished || ips.is_empty() {
        return None;
    }
    let namespace = resource.namespace();
    Some(Workload {
        namespace: namespace.to_owned(),
        name: resource.name().to_owned(),
        service_account: service_account.to_owned(),
        node_name,
        node_ip: node_ips.first().copied(),
        node_ips,
        ips,
        enrolled: enrolled(
            pod.metadata.labels.as_ref(),
            namespace_labels.get(namespace).copied(),
        ),
    })
}
