//! Service indexing: endpoint resolution, dual-stack VIPs, capture rules.

use super::*;

const MULTI: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.1.1
  clusterIPs: [10.96.1.1, "fd00:10:96::1"]
  ports:
  - {name: http, port: 80, targetPort: web, appProtocol: http}
  - {name: metrics, port: 9090, targetPort: 9100}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-a
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: metrics, port: 9100}
endpoints:
- addresses: [10.244.1.1]
  conditions: {ready: true}
- addresses: [10.244.1.2]
  conditions: {ready: false}
- addresses: [10.244.1.3]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-b
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports:
- {name: http, port: 8081}
endpoints:
- addresses: [10.244.2.1]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-v6
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv6
ports:
- {name: http, port: 8080}
endpoints:
- addresses: ["fd00:244::1"]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: someone-else
  namespace: shop
  labels: {kubernetes.io/service-name: other}
addressType: IPv4
endpoints:
- addresses: [10.244.9.9]
"#;

#[test]
fn endpoints_resolve_by_port_name_and_readiness() {
    let compiled = compile(MULTI);
    let http = compiled.service_port(addr("10.96.1.1:80")).expect("api:80");
    assert_eq!(http.service.to_string(), "shop/api");
    assert_eq!(http.name.as_deref(), Some("http"));
    assert_eq!(http.app_protocol.as_deref(), Some("http"));
    assert_eq!(
        http.endpoints,
        vec![
            addr("10.244.1.1:8080"),
            addr("10.244.1.3:8080"),
            addr("10.244.2.1:8081"),
            addr("[fd00:244::1]:8080"),
        ],
        "ready != false, port by name per slice"
    );
    let metrics = compiled
        .service_port(addr("10.96.1.1:9090"))
        .expect("api:9090");
    assert_eq!(
        metrics.endpoints,
        vec![addr("10.244.1.1:9100"), addr("10.244.1.3:9100")],
        "slice api-b has no metrics port"
    );
    assert!(
        compiled.service_port(addr("10.96.1.1:53")).is_none(),
        "UDP is not routed"
    );
    // Dual stack: the IPv6 VIP and an IPv4-mapped destination find the same port.
    let v6 = compiled
        .service_port(addr("[fd00:10:96::1]:80"))
        .expect("v6 VIP");
    assert_eq!(v6, http);
    assert_eq!(
        compiled.service_port(addr("[::ffff:10.96.1.1]:80")),
        Some(http)
    );
}

#[test]
fn target_port_number_fallback_without_port_names() {
    let text = r#"---
apiVersion: v1
kind: Service
metadata: {name: solo, namespace: shop}
spec:
  clusterIP: 10.96.2.1
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: solo-1, namespace: shop, labels: {kubernetes.io/service-name: solo}}
addressType: IPv4
endpoints:
- addresses: [10.244.3.1]
---
apiVersion: v1
kind: Service
metadata: {name: unnamed, namespace: shop}
spec:
  clusterIP: 10.96.2.2
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: unnamed-1, namespace: shop, labels: {kubernetes.io/service-name: unnamed}}
addressType: IPv4
ports: [{port: 9999}]
endpoints:
- addresses: [10.244.3.2]
---
apiVersion: v1
kind: Service
metadata: {name: notready, namespace: shop}
spec:
  clusterIP: 10.96.2.3
  publishNotReadyAddresses: true
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: notready-1, namespace: shop, labels: {kubernetes.io/service-name: notready}}
addressType: IPv4
endpoints:
- addresses: [10.244.3.3]
  conditions: {ready: false}
"#;
    let compiled = compile(text);
    let endpoints = |a: &str| {
        compiled
            .service_port(addr(a))
            .map(|p| p.endpoints.clone())
            .unwrap_or_default()
    };
    assert_eq!(endpoints("10.96.2.1:80"), vec![addr("10.244.3.1:8080")]);
    assert_eq!(
        endpoints("10.96.2.2:80"),
        vec![addr("10.244.3.2:9999")],
        "an unnamed slice port matches an unnamed Service port"
    );
    assert_eq!(endpoints("10.96.2.3:80"), vec![addr("10.244.3.3:80")]);
}

#[test]
fn capture_rules_cover_every_vip_port_and_mesh_policy_entries() {
    let policy = r#"---
apiVersion: skiff.dev/v1alpha1
kind: MeshPolicy
metadata: {name: mesh, namespace: skiff}
spec:
  capture:
  - {cidr: 10.100.7.9/16, ports: [80, "8000-8100", 8050]}
  - {cidr: "fd00:abcd::/64", ports: ["*"]}
  - {cidr: 10.96.1.1, ports: [443]}
  - {cidr: 192.168.0.0/24}
"#;
    let compiled = compile(&format!("{MULTI}{policy}"));
    let rules: Vec<String> = compiled
        .capture()
        .iter()
        .map(|r| {
            let ports: Vec<String> = r.ports.iter().map(|p| p.to_string()).collect();
            format!("{} {}", r.prefix, ports.join(","))
        })
        .collect();
    assert_eq!(
        rules,
        [
            "10.96.1.1/32 80,443,9090",
            "10.100.0.0/16 80,8000-8100",
            "192.168.0.0/24 1-65535",
            "fd00:10:96::1/128 80,9090",
            "fd00:abcd::/64 1-65535",
        ]
    );
    assert_eq!(compiled.summary().capture_rules, 5);
}

#[test]
fn headless_and_external_name_services_are_not_captured() {
    let text = r#"---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {type: ExternalName, externalName: example.com}
"#;
    let compiled = compile(text);
    assert!(compiled.capture().is_empty());
    assert_eq!(compiled.summary().services, 0);
}
