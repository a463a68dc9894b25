//! A generated cluster for the Kubernetes scale benchmark: Services with EndpointSlices and GAMMA
//! HTTPRoutes spread over namespaces, written straight into `mesh-apiserver`'s state file
//! (tens of thousands of `kubectl apply`s would take longer than the benchmark itself). The
//! objects look like what the API server stores after a create: uid, resourceVersion,
//! creationTimestamp, generation, and the defaults it fills in (route `parentRefs[].group` and
//! `kind`, path match types).
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

/// How big the generated cluster is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub namespaces: usize,
    pub services: usize,
    pub endpoints: usize,
    pub routes: usize,
}

impl Size {
    /// The figures of issue 9's scale test.
    pub const ISSUE: Size = Size {
        namespaces: 50,
        services: 10_000,
        endpoints: 50_000,
        routes: 2_000,
    };
    /// A twentieth of it, for CI's smoke run of the benchmark.
    pub const SMOKE: Size = Size {
        namespaces: 10,
        services: 500,
        endpoints: 2_500,
        routes: 100,
    };
}

/// The Services and route the benchmark edits, backed by real pods.
pub struct Edited {
    pub namespace: String,
    pub route: String,
    /// The route's parent Service and its ClusterIP: what the client connects to.
    pub parent: String,
    pub vip: Ipv4Addr,
    /// Backend Service names, each with one endpoint: the pods `a` and `b`.
    pub backends: [String; 2],
}

/// What [`generate`] added.
pub struct Generated {
    pub objects: Vec<(&'static str, Value)>,
    pub edited: Edited,
}

const CREATED: &str = "2026-01-01T00:00:00Z";

fn namespace(i: usize) -> String {
    format!("scale-{i:02}")
}

/// Service `i` lives in namespace `i % namespaces`; its ClusterIP is 10.100.0.0 + i + 1 (out of
/// the range the API server allocates from, 10.96.0.0/16 in practice).
fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + i as u32 + 1)
}

/// Endpoint `k` of the synthetic ones: 10.128.0.0 + k, never contacted.
fn endpoint_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + k as u32 + 1)
}

/// Route `j` (in namespace `n = j % namespaces`, the `m = j / namespaces`th there) has parent
/// Service `n + namespaces*3m` and backends the next two Services of that namespace, so every
/// Service is a parent at most once and routes never cross namespaces (no ReferenceGrant).
fn route_services(size: &Size, j: usize) -> [usize; 3] {
    let (n, m) = (j % size.namespaces, j / size.namespaces);
    let parent = n + size.namespaces * 3 * m;
    [
        parent,
        parent + size.namespaces,
        parent + 2 * size.namespaces,
    ]
}

/// Generates the cluster. `pods` are the IPs of the pods `a` and `b` that back route 0, the one
/// the benchmark edits (its weights start at 100/0). Every object is counted in `size`: the two
/// real backends have one endpoint each and the rest are spread evenly over the other Services.
pub fn generate(size: &Size, pods: [Ipv4Addr; 2]) -> Generated {
    assert!(
        route_services(size, size.routes - 1)[2] < size.services,
        "{size:?}: not enough Services for the routes"
    );
    let mut uid = 0u64;
    let mut meta = |ns: &str, name: &str, labels: Value| {
        uid += 1;
        json!({"name": name, "namespace": ns, "uid": format!("00000000-0000-4000-8000-{uid:012x}"),
               "creationTimestamp": CREATED, "generation": 1, "labels": labels})
    };
    let mut objects = Vec::new();
    for n in 0..size.namespaces {
        let ns = namespace(n);
        let mut m = meta("", &ns, json!({"kubernetes.io/metadata.name": ns}));
        m.as_object_mut().map(|o| {
            o.remove("namespace");
            o.remove("generation")
        });
        objects.push((
            "/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": m,
                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        ));
    }
    let [_, real_a, real_b] = route_services(size, 0);
    let synthetic = size.services - 2;
    let (per, extra) = (
        (size.endpoints - 2) / synthetic,
        (size.endpoints - 2) % synthetic,
    );
    let mut next_endpoint = 0;
    let mut nth_synthetic = 0;
    for i in 0..size.services {
        let ns = namespace(i % size.namespaces);
        let name = format!("svc-{i}");
        // Every third Service has a second port, as web Services with TLS do.
        let two = i % 3 == 2;
        let mut ports =
            vec![json!({"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"})];
        let mut slice_ports = vec![json!({"name": "http", "port": 8080, "protocol": "TCP"})];
        if two {
            ports
                .push(json!({"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}));
            slice_ports.push(json!({"name": "https", "port": 8443, "protocol": "TCP"}));
        }
        let ip = service_ip(i);
        objects.push((
            "/services",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(&ns, &name, json!({"app": name})),
                   "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                            "sessionAffinity": "None", "selector": {"app": name}, "ports": ports},
                   "status": {"loadBalancer": {}}}),
        ));
        let addresses: Vec<IpAddr> = if i == real_a || i == real_b {
            vec![IpAddr::V4(pods[usize::from(i == real_b)])]
        } else {
            let count = per + usize::from(nth_synthetic < extra);
            nth_synthetic += 1;
            (0..count)
                .map(|_| {
                    next_endpoint += 1;
                    IpAddr::V4(endpoint_ip(next_endpoint - 1))
                })
                .collect()
        };
        let endpoints: Vec<Value> = addresses
            .iter()
            .enumerate()
            .map(|(k, a)| {
                json!({"addresses": [a.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false},
                       "nodeName": format!("node-{}", k % 7), "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("{name}-{k}")}})
            })
            .collect();
        objects.push((
            "discovery.k8s.io/endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": meta(&ns, &format!("{name}-abcde"),
                                    json!({"kubernetes.io/service-name": name, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"})),
                   "addressType": "IPv4", "ports": slice_ports, "endpoints": endpoints}),
        ));
    }
    for j in 0..size.routes {
        let ns = namespace(j % size.namespaces);
        let [parent, b1, b2] = route_services(size, j);
        let weights = if j == 0 { (100, 0) } else { (90, 10) };
        let mut route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": meta(&ns, &format!("route-{j}"), json!({})),
            "spec": route_spec(&format!("svc-{parent}"), [&format!("svc-{b1}"), &format!("svc-{b2}")], weights)});
        route["metadata"]
            .as_object_mut()
            .map(|m| m.remove("labels"));
        objects.push(("gateway.networking.k8s.io/httproutes", route));
    }
    let [parent, a, b] = route_services(size, 0);
    Generated {
        objects,
        edited: Edited {
            namespace: namespace(0),
            route: "route-0".into(),
            parent: format!("svc-{parent}"),
            vip: service_ip(parent),
            backends: [format!("svc-{a}"), format!("svc-{b}")],
        },
    }
}

/// A GAMMA route spec on `parent`'s port 80: `/api` (prefix), `POST /login` and any request with
/// `x-canary: true` go to the two backends with `weights`; `/healthz` goes to the first alone.
pub fn route_spec(parent: &str, backends: [&str; 2], weights: (u32, u32)) -> Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
        "rules": [
            {"matches": [
                {"path": {"type": "PathPrefix", "value": "/api"}},
                {"path": {"type": "Exact", "value": "/login"}, "method": "POST"},
                {"path": {"type": "PathPrefix", "value": "/"}, "headers": [{"type": "Exact", "name": "x-canary", "value": "true"}]}
             ],
             "backendRefs": [
                {"group": "", "kind": "Service", "name": backends[0], "port": 80, "weight": weights.0},
                {"group": "", "kind": "Service", "name": backends[1], "port": 80, "weight": weights.1}
             ]},
            {"matches": [{"path": {"type": "Exact", "value": "/healthz"}}],
             "backendRefs": [{"group": "", "kind": "Service", "name": backends[0], "port": 80, "weight": 1}]}
        ]
    })
}

/// Adds `objects` to a saved state (`{"resourceVersion", "nextClusterIP", "objects": [{storage,
/// object}]}`, see `apiserver/src/store.rs`), each under its own resourceVersion past the saved
/// one.
pub fn add_to_state(state: &mut Value, objects: Vec<(&'static str, Value)>) {
    let mut rv = state["resourceVersion"].as_u64().unwrap_or(0);
    let list = state["objects"]
        .as_array_mut()
        .expect("a state file has an objects list");
    for (storage, mut object) in objects {
        rv += 1;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        list.push(json!({"storage": storage, "object": object}));
    }
    state["resourceVersion"] = json!(rv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_the_size_and_route_zero_uses_the_pods() {
        let pods = [Ipv4Addr::new(10, 201, 2, 2), Ipv4Addr::new(10, 201, 3, 2)];
        let g = generate(&Size::ISSUE, pods);
        let count = |storage: &str| g.objects.iter().filter(|(s, _)| *s == storage).count();
        assert_eq!(count("/namespaces"), 50);
        assert_eq!(count("/services"), 10_000);
        assert_eq!(count("discovery.k8s.io/endpointslices"), 10_000);
        assert_eq!(count("gateway.networking.k8s.io/httproutes"), 2_000);
        let endpoints: usize = g
            .objects
            .iter()
            .filter(|(s, _)| *s == "discovery.k8s.io/endpointslices")
            .map(|(_, o)| o["endpoints"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(endpoints, 50_000);
        let slice_of = |name: &str| {
            g.objects
                .iter()
                .find(|(_, o)| o["metadata"]["labels"]["kubernetes.io/service-name"] == name)
                .map(|(_, o)| o["endpoints"][0]["addresses"][0].clone())
        };
        assert_eq!(slice_of(&g.edited.backends[0]), Some(json!("10.201.2.2")));
        assert_eq!(slice_of(&g.edited.backends[1]), Some(json!("10.201.3.2")));
        let vips: std::collections::HashSet<&Value> = g
            .objects
            .iter()
            .filter(|(s, _)| *s == "/services")
            .map(|(_, o)| &o["spec"]["clusterIP"])
            .collect();
        assert_eq!(vips.len(), 10_000, "ClusterIPs are unique");
    }

    #[test]
    fn the_generated_cluster_compiles() {
        // A smaller cluster through the same policy compiler the agent uses.
        let size = Size {
            namespaces: 5,
            services: 100,
            endpoints: 500,
            routes: 20,
        };
        let g = generate(
            &size,
            [Ipv4Addr::new(10, 201, 2, 2), Ipv4Addr::new(10, 201, 3, 2)],
        );
        let text: String = g
            .objects
            .iter()
            .map(|(_, o)| format!("---\n{o}\n"))
            .collect();
        let compiled = mesh_policy::Compiled::from_yaml(&text, "generated")
            .unwrap_or_else(|e| panic!("{e:?}"));
        let s = compiled.summary();
        assert_eq!((s.services, s.http_routes), (100, 20));
        // Endpoints are counted per Service port, and every third Service has two.
        assert!(s.endpoints > 500, "{s:?}");
    }
}
