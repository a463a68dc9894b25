//! Writing policy files the way a user would: Services with EndpointSlices, and routes.
use std::{net::IpAddr, path::Path};

/// A ClusterIP Service `name` in namespace `mesh-test` with one port (`port` -> `target`) and an
/// EndpointSlice holding `endpoints`.
pub fn service(name: &str, vip: IpAddr, port: u16, target: u16, endpoints: &[IpAddr]) -> String {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let addrs: String = endpoints
        .iter()
        .map(|e| format!("- addresses: [\"{e}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: mesh-test}}\n\
         spec:\n  clusterIP: {vip}\n  ports:\n  - {{name: main, port: {port}, targetPort: {target}, protocol: TCP}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}-1\n  namespace: mesh-test\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: {family}\nports:\n- {{name: main, port: {target}, protocol: TCP}}\nendpoints:\n{addrs}"
    )
}

/// Writes `text` to `path` atomically (write a temporary file, then rename), as a ConfigMap
/// update or an editor's save does, so a watcher never reads half a file.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write policy");
    std::fs::rename(&tmp, path).expect("rename policy");
}
