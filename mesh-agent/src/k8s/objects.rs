//! The policy objects of one reconcile, built from the reflector stores.
//!
//! At 10,000 Services a reconcile runs after every edit, so what it costs is paid per edit:
//! Services and EndpointSlices are shared with the stores (an `Arc` each, no copy), and the
//! routes and MeshPolicies (dynamic objects, parsed through the file loader so that both modes
//! check versions and fields alike) are parsed once per resourceVersion and kept until they
//! change or go away. A reconcile after one route edit parses one route.
use std::collections::{HashMap, HashSet};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service, ServiceSpec},
    discovery::v1::{Endpoint, EndpointConditions, EndpointSlice},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    core::{DynamicObject, PartialObjectMeta},
    runtime::reflector::store::Store,
};
use mesh_policy::{Object, Resource};

use super::kinds::Served;

/// The source every object from the API server carries in errors.
const SOURCE: &str = "kubernetes";

/// What one dynamic object parsed into, for the resourceVersion it had.
struct Parsed {
    uid: Option<String>,
    resource_version: String,
    objects: Vec<Object>,
    errors: Vec<String>,
}

/// Parsed dynamic objects by (kind, namespace, name).
#[derive(Default)]
pub struct Cache {
    parsed: HashMap<(&'static str, String, String), Parsed>,
}

impl Cache {
    /// The policy objects in the stores, in a stable order (by kind, namespace and name), with
    /// the parse errors of the dynamic objects added to `errors`.
    pub fn objects(
        &mut self,
        services: &Store<Service>,
        slices: &Store<EndpointSlice>,
        custom: &[super::Custom],
        errors: &mut HashSet<String>,
    ) -> Vec<Object> {
        let mut objects = Vec::new();
        objects.extend(services.state().into_iter().map(|s| Object {
            source: SOURCE.into(),
            resource: Resource::Service(s),
        }));
        objects.extend(slices.state().into_iter().map(|s| Object {
            source: SOURCE.into(),
            resource: Resource::EndpointSlice(s),
        }));
        let mut seen = HashSet::new();
        for super::Custom { served, store, .. } in custom {
            for o in store.state() {
                let key = (
                    served.kind,
                    o.metadata.namespace.clone().unwrap_or_default(),
                    o.metadata.name.clone().unwrap_or_default(),
                );
                let fresh = |p: &Parsed| {
                    o.metadata.resource_version.as_ref() == Some(&p.resource_version)
                        && p.uid == o.metadata.uid
                };
                let parsed = match self.parsed.get(&key) {
                    Some(p) if fresh(p) => p,
                    _ => {
                        let p = parse(served, &o);
                        self.parsed.entry(key.clone()).insert_entry(p).into_mut()
                    }
                };
                objects.extend(parsed.objects.iter().cloned());
                errors.extend(parsed.errors.iter().cloned());
                seen.insert(key);
            }
        }
        self.parsed.retain(|k, _| seen.contains(k));
        objects.sort_by_cached_key(Object::display_name);
        objects
    }
}

/// The pods and namespaces of the stores as policy objects: the workloads of the mTLS tunnel
/// (pods of every node, their identity and node) and the namespace labels that enrol them.
pub fn workloads(
    pods: &Store<Pod>,
    namespaces: &Store<PartialObjectMeta<Namespace>>,
) -> Vec<Object> {
    let mut out: Vec<Object> = pods
        .state()
        .into_iter()
        .map(|p| Object {
            source: SOURCE.into(),
            resource: Resource::Pod(p),
        })
        .collect();
    out.extend(namespaces.state().into_iter().map(|n| Object {
        source: SOURCE.into(),
        resource: Resource::Namespace(std::sync::Arc::new(Namespace {
            metadata: n.metadata.clone(),
            ..Namespace::default()
        })),
    }));
    out
}

/// Parses a dynamic object with the file loader's parser (JSON is YAML), which checks versions
/// and fields the same way in both modes.
fn parse(served: &Served, o: &DynamicObject) -> Parsed {
    let mut value = serde_json::to_value(o).unwrap_or_default();
    value["apiVersion"] = served.resource.api_version.clone().into();
    value["kind"] = served.resource.kind.clone().into();
    let (objects, found) = mesh_policy::parse_documents_partial(
        &value.to_string(),
        &format!("{SOURCE}:{}", served.kind),
    );
    Parsed {
        uid: o.metadata.uid.clone(),
        // An object without a resourceVersion (never from an API server) is parsed every time.
        resource_version: o.metadata.resource_version.clone().unwrap_or_default(),
        objects,
        errors: found.iter().map(|e| e.to_string()).collect(),
    }
}

/// The metadata the policy and its error messages read: name, namespace, and what identifies
/// a version of the object.
fn policy_meta(meta: &mut ObjectMeta, labels: &[&str]) {
    let labels = meta.labels.take().map(|mut all| {
        all.retain(|k, _| labels.contains(&k.as_str()));
        all
    });
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        creation_timestamp: meta.creation_timestamp.take(),
        labels: labels.filter(|l| !l.is_empty()),
        ..Default::default()
    };
}

/// Keeps what the policy reads of a Service (`mesh_policy`'s Service lowering): its type,
/// virtual IPs, ports and `publishNotReadyAddresses`. Selector, status, labels and annotations
/// are dropped: at 10,000 Services they would be most of the store.
pub fn strip_service(s: &mut Service) {
    policy_meta(&mut s.metadata, &[]);
    s.status = None;
    s.spec = s.spec.take().map(|spec| ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        ports: spec.ports,
        publish_not_ready_addresses: spec.publish_not_ready_addresses,
        ..Default::default()
    });
}

/// Keeps what the policy reads of an EndpointSlice: the owning Service's label, the address
/// type, the ports, and each endpoint's addresses and conditions (not its zone, node, hints or
/// target reference).
pub fn strip_slice(s: &mut EndpointSlice) {
    policy_meta(&mut s.metadata, &[SERVICE_NAME_LABEL]);
    for e in &mut s.endpoints {
        *e = Endpoint {
            addresses: std::mem::take(&mut e.addresses),
            conditions: e.conditions.take().map(|c| EndpointConditions {
                ready: c.ready,
                serving: c.serving,
                terminating: c.terminating,
            }),
            ..Default::default()
        };
    }
}

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
