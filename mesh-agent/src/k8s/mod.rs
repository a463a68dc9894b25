//! Kubernetes mode: the policy and the pods to capture come from the API server instead of a
//! file. One reflector per kind (Services, EndpointSlices, the Gateway API routes the cluster
//! serves, MeshPolicy, namespace metadata, this node's pods) keeps a local store; every change
//! (debounced) rebuilds the policy objects from the stores and runs the same step as a file
//! reload ([`crate::policy::apply`]), with the enrolled pods' veths as the plan's interfaces.
//! While the API server is unreachable the watches retry with backoff and forwarding continues
//! with the last policy.
mod enrol;
mod kinds;
mod objects;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    core::{DynamicObject, PartialObjectMeta},
    discovery::Discovery,
    runtime::{
        WatchStreamExt as _,
        reflector::store::{Store, Writer},
        watcher,
    },
};
use mesh_policy::{Compiled, InterfaceName, Object, PolicyStore};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use serde::Serialize;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

pub use enrol::LABEL;
use kinds::Shared;

use crate::{
    config::Config,
    ebpf::Programs,
    policy::{self, ReloadStats},
    watch::Trigger,
};

/// Changes closer together than this are compiled once.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// After a failed step (a pod whose veth is not there yet, a kernel error) it is tried again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes client configuration (KUBECONFIG or in-cluster): {0}")]
    Client(#[source] kube::Error),
}

/// A kube client from `KUBECONFIG` (or `~/.kube/config`), else the in-cluster service account.
pub async fn client() -> Result<Client, Error> {
    Client::try_default().await.map_err(Error::Client)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// Kubernetes-mode metrics.
#[derive(Debug)]
pub struct Metrics {
    pub watch_events: Family<KindLabels, Counter>,
    pub watch_errors: Family<KindLabels, Counter>,
    pub pod_ready_to_captured: Histogram,
    pub excluded_objects: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Metrics {
            watch_events: Family::default(),
            watch_errors: Family::default(),
            // 1 ms .. ~16 s
            pod_ready_to_captured: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            excluded_objects: Gauge::default(),
        });
        registry.register(
            "kubernetes_watch_events",
            "Watch events received, by kind",
            m.watch_events.clone(),
        );
        registry.register(
            "kubernetes_watch_errors",
            "Watch errors (API server unreachable, 410 Gone, ...), by kind",
            m.watch_errors.clone(),
        );
        registry.register_with_unit(
            "pod_ready_to_captured",
            "Time from an enrolled pod first seen running with an IP to its capture attached",
            Unit::Seconds,
            m.pod_ready_to_captured.clone(),
        );
        registry.register(
            "kubernetes_excluded_objects",
            "Objects left out of the policy because they are invalid",
            m.excluded_objects.clone(),
        );
        m
    }
}

/// An enrolled pod as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PodStatus {
    pub ip: IpAddr,
    pub interface: Option<String>,
    pub captured: bool,
    pub ready_to_captured_ms: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Reconciled {
    pods: BTreeMap<String, PodStatus>,
    excluded: Vec<String>,
    applied: u64,
}

/// The `kubernetes` section of `/status`.
#[derive(Default)]
pub struct Status {
    node: String,
    shared: Arc<Shared>,
    reconciled: Mutex<Reconciled>,
}

impl Status {
    pub fn new(node: &str) -> Arc<Self> {
        Arc::new(Status {
            node: node.to_string(),
            ..Default::default()
        })
    }

    pub fn json(&self) -> serde_json::Value {
        let r = self
            .reconciled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        serde_json::json!({
            "node": self.node,
            "synced": self.shared.all_synced(),
            "kinds": self.shared.snapshot(),
            "pods": r.pods,
            "excluded_objects": r.excluded,
            "policies_applied": r.applied,
        })
    }
}

/// What the reconciler writes to.
pub struct Targets {
    pub cfg: Config,
    pub store: Arc<PolicyStore>,
    pub programs: Arc<Mutex<Programs>>,
    pub reloads: Arc<ReloadStats>,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<Status>,
}

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    custom: Vec<(kinds::Served, Store<DynamicObject>)>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    pods: Store<Pod>,
}

/// Runs Kubernetes mode until dropped: discovery (retried until the API server answers), the
/// reflectors, then the reconcile loop.
pub async fn run(client: Client, node: String, t: Targets) {
    let shared = t.status.shared.clone();
    let discovery = loop {
        match Discovery::new(client.clone())
            .filter(&[kinds::GATEWAY_GROUP, kinds::SKIFF_GROUP])
            .run()
            .await
        {
            Ok(d) => break d,
            Err(e) => {
                warn!(error = %e, "API discovery failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    let mut tasks = JoinSet::new();
    let m = &t.metrics;
    let cfg = || watcher::Config::default();
    let services = kinds::spawn(
        &mut tasks,
        shared.clone(),
        m.clone(),
        "Service",
        "v1".into(),
        watcher(Api::<Service>::all(client.clone()), cfg())
            .default_backoff()
            .modify(objects::strip_service),
        Writer::new(()),
    );
    let slices = kinds::spawn(
        &mut tasks,
        shared.clone(),
        m.clone(),
        "EndpointSlice",
        "discovery.k8s.io/v1".into(),
        watcher(Api::<EndpointSlice>::all(client.clone()), cfg())
            .default_backoff()
            .modify(objects::strip_slice),
        Writer::new(()),
    );
    let namespaces = kinds::spawn(
        &mut tasks,
        shared.clone(),
        m.clone(),
        "Namespace",
        "v1".into(),
        watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            cfg(),
        )
        .default_backoff()
        .modify(|o: &mut PartialObjectMeta<Namespace>| {
            kinds::strip_meta(&mut o.metadata);
            o.metadata.annotations = None;
        }),
        Writer::new(()),
    );
    let pods = kinds::spawn(
        &mut tasks,
        shared.clone(),
        m.clone(),
        "Pod",
        "v1".into(),
        watcher(
            Api::<Pod>::all(client.clone()),
            cfg().fields(&format!("spec.nodeName={node}")),
        )
        .default_backoff()
        .modify(enrol::strip_pod),
        Writer::new(()),
    );
    let mut custom = Vec::new();
    for served in kinds::served(&discovery, &shared) {
        let api = Api::<DynamicObject>::all_with(client.clone(), &served.resource);
        let store = kinds::spawn(
            &mut tasks,
            shared.clone(),
            m.clone(),
            served.kind,
            served.resource.api_version.clone(),
            watcher(api, cfg())
                .default_backoff()
                .modify(kinds::strip_dynamic),
            Writer::new(served.resource.clone()),
        );
        custom.push((served, store));
    }
    let stores = Stores {
        services,
        slices,
        custom,
        namespaces,
        pods,
    };
    let mut r = Reconciler {
        node,
        stores,
        t,
        logged: HashSet::new(),
        parsed: objects::Cache::default(),
        seen: HashMap::new(),
        captured: BTreeSet::new(),
    };
    let mut retry = false;
    loop {
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = tokio::time::sleep(RETRY), if retry => {}
        }
        tokio::time::sleep(DEBOUNCE).await;
        if !shared.all_synced() {
            continue;
        }
        retry = !r.reconcile();
    }
}

struct Reconciler {
    node: String,
    stores: Stores,
    t: Targets,
    /// Errors already logged (each is logged once while it lasts).
    logged: HashSet<String>,
    /// The routes and MeshPolicies parsed so far, by resourceVersion.
    parsed: objects::Cache,
    /// When each enrolled pod was first seen running with an IP.
    seen: HashMap<String, Instant>,
    /// Pods whose capture is attached.
    captured: BTreeSet<String>,
}

impl Reconciler {
    /// One compile-and-apply step; `false` if something should be tried again.
    fn reconcile(&mut self) -> bool {
        let mut errors_now = HashSet::new();
        let mut ok = true;
        let s = &self.stores;
        let objects = self
            .parsed
            .objects(&s.services, &s.slices, &s.custom, &mut errors_now);
        let (compiled, excluded) = compile_valid(objects, &mut errors_now);
        let (interfaces, mut pods) = self.enrolled(&mut errors_now);
        ok &= pods.values().all(|p| p.error.is_none());
        for e in &errors_now {
            if !self.logged.contains(e) {
                error!(error = %e, "Kubernetes object left out");
            }
        }
        self.logged = errors_now;
        self.t.metrics.excluded_objects.set(excluded.len() as i64);

        let mut node = self.t.cfg.node_settings();
        node.interfaces.extend(interfaces.values().cloned());
        let applied = policy::apply(
            compiled,
            &node,
            Trigger::Kubernetes,
            &self.t.store,
            &self.t.programs,
            &self.t.reloads,
        );
        let mut status = self
            .t
            .status
            .reconciled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        status.excluded = excluded;
        if applied.is_err() {
            ok = false;
        } else {
            status.applied += 1;
            let previous = std::mem::take(&mut self.captured);
            for (key, iface) in &interfaces {
                let Some(p) = pods.get_mut(key) else { continue };
                p.captured = true;
                if previous.contains(key) {
                    p.ready_to_captured_ms = status
                        .pods
                        .get(key)
                        .and_then(|old| old.ready_to_captured_ms);
                } else {
                    let elapsed = self.seen.get(key).map(Instant::elapsed).unwrap_or_default();
                    self.t
                        .metrics
                        .pod_ready_to_captured
                        .observe(elapsed.as_secs_f64());
                    p.ready_to_captured_ms = Some(elapsed.as_millis() as u64);
                    info!(pod = %key, interface = %iface, ready_to_captured_ms = elapsed.as_millis() as u64, "pod captured");
                }
                self.captured.insert(key.clone());
            }
            for gone in previous.difference(&self.captured) {
                info!(pod = %gone, "pod released");
            }
            if !self.t.ready.swap(true, Ordering::AcqRel) {
                info!("Kubernetes policy loaded: ready");
            }
        }
        status.pods = pods;
        ok
    }

    /// Enrolled, running pods of this node: their interfaces, and each pod's status.
    fn enrolled(
        &mut self,
        errors: &mut HashSet<String>,
    ) -> (BTreeMap<String, InterfaceName>, BTreeMap<String, PodStatus>) {
        let namespaces = self.stores.namespaces.state();
        let by_name: BTreeMap<String, &PartialObjectMeta<Namespace>> = namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, &**n)))
            .collect();
        let mut interfaces = BTreeMap::new();
        let mut pods = BTreeMap::new();
        let mut still = HashMap::new();
        for pod in self.stores.pods.state() {
            if !enrol::enrolled(&pod, &by_name) {
                continue;
            }
            let Some(ip) = enrol::running_ip(&pod, &self.node) else {
                continue;
            };
            let key = enrol::key(&pod);
            let seen = self.seen.get(&key).copied().unwrap_or_else(Instant::now);
            still.insert(key.clone(), seen);
            let mut st = PodStatus {
                ip,
                interface: None,
                captured: false,
                ready_to_captured_ms: None,
                error: None,
            };
            match enrol::host_interface(ip) {
                Ok(iface) => {
                    st.interface = Some(iface.to_string());
                    interfaces.insert(key.clone(), iface);
                }
                Err(e) => {
                    errors.insert(format!("pod {key}: {e}"));
                    st.error = Some(e.to_string());
                }
            }
            pods.insert(key, st);
        }
        self.seen = still;
        (interfaces, pods)
    }
}

/// Compiles the objects, leaving out every object a validation error names (and logging the
/// error once): one bad object never blocks the others.
fn compile_valid(objects: Vec<Object>, errors: &mut HashSet<String>) -> (Compiled, Vec<String>) {
    // Names are compared on every pass; built once.
    let names: Vec<String> = objects.iter().map(Object::display_name).collect();
    let mut excluded: BTreeSet<String> = BTreeSet::new();
    loop {
        // The first pass (all that is needed when every object is valid) copies nothing.
        let kept: Vec<Object>;
        let kept = if excluded.is_empty() {
            &objects
        } else {
            kept = objects
                .iter()
                .zip(&names)
                .filter(|(_, n)| !excluded.contains(*n))
                .map(|(o, _)| o.clone())
                .collect();
            &kept
        };
        match Compiled::compile(kept) {
            Ok(c) => return (c, excluded.into_iter().collect()),
            Err(found) => {
                let before = excluded.len();
                let held: HashSet<&str> = names
                    .iter()
                    .filter(|n| !excluded.contains(*n))
                    .map(String::as_str)
                    .collect();
                for e in found {
                    errors.insert(e.to_string());
                    if held.contains(e.object.as_str()) {
                        excluded.insert(e.object.clone());
                    }
                }
                if excluded.len() == before {
                    // An error that names no object we hold: nothing left to leave out.
                    errors.insert("policy could not be compiled; using an empty policy".into());
                    return (Compiled::empty(), names);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_route_is_left_out_and_the_rest_compiles() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                    metadata: {name: bad, namespace: shop}\n\
                    spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
                    rules: [{backendRefs: [{name: missing, port: 80}]}]\n";
        let objects = mesh_policy::parse_documents(text, "t").expect("parse");
        let mut errors = HashSet::new();
        let (compiled, excluded) = compile_valid(objects, &mut errors);
        assert_eq!(excluded, vec!["HTTPRoute shop/bad".to_string()]);
        assert!(!errors.is_empty());
        assert_eq!(compiled.summary().services, 1);
    }
}
