//! Kubernetes mode: the policy and the pods to capture come from the API server instead of a
//! file. One reflector per kind (Services, EndpointSlices, the Gateway API routes the cluster
//! serves, MeshPolicy, namespace metadata, this node's pods) keeps a local store; every change
//! (debounced) rebuilds the policy objects from the stores and runs the same step as a file
//! reload ([`crate::policy::apply`]), with the enrolled pods' veths as the plan's interfaces.
//! While the API server is unreachable the watches retry with backoff and forwarding continues
//! with the last policy. One agent of the cluster, elected by a Lease ([`lease`]), writes route
//! and MeshPolicy status ([`report`]).
mod enrol;
mod kinds;
pub mod lease;
mod objects;
pub mod report;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
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
use mesh_policy::{
    Compiled, InterfaceName, Object, Options, PolicyStore, UnresolvedRef, ValidationError,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use serde::Serialize;
use tokio::{
    sync::watch,
    task::{AbortHandle, JoinSet},
};
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
    pub watch_stale: Family<KindLabels, Gauge>,
    pub watch_last_success: Family<KindLabels, Gauge>,
    pub pod_ready_to_captured: Histogram,
    pub excluded_objects: Gauge,
    /// The status Lease and status writes.
    pub status: Arc<report::Metrics>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Metrics {
            watch_events: Family::default(),
            watch_errors: Family::default(),
            watch_stale: Family::default(),
            watch_last_success: Family::default(),
            // 1 ms .. ~16 s
            pod_ready_to_captured: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            excluded_objects: Gauge::default(),
            status: report::Metrics::register(registry),
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
        registry.register(
            "kubernetes_watch_stale",
            "1 while the watch of a kind is failing: the policy may be behind the API server",
            m.watch_stale.clone(),
        );
        registry.register(
            "kubernetes_watch_last_success_timestamp_seconds",
            "Unix time of the last answer from the API server on the watch of a kind",
            m.watch_last_success.clone(),
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
    /// Objects whose latest edit is invalid, in force at their last good version.
    last_good: Vec<String>,
    applied: u64,
}

/// The `kubernetes` section of `/status`.
#[derive(Default)]
pub struct Status {
    node: String,
    shared: Arc<Shared>,
    reconciled: Mutex<Reconciled>,
    /// Set once the reconciler runs.
    elector: OnceLock<Arc<lease::Elector>>,
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
            "stale": self.shared.any_stale(),
            "kinds": self.shared.snapshot(),
            "pods": r.pods,
            "excluded_objects": r.excluded,
            "kept_at_last_good_version": r.last_good,
            "policies_applied": r.applied,
            "leader": self.elector.get().is_some_and(|e| e.is_leader()),
            "lease": self.elector.get().map(|e| e.view()),
        })
    }

    /// After taking over from an agent that released the Lease: tries for it at once.
    pub fn retry_lease(&self) {
        if let Some(e) = self.elector.get() {
            e.retry_now();
        }
    }

    /// On a clean stop, after the Kubernetes task has stopped: hands the status Lease over.
    pub async fn release(&self) {
        if let Some(e) = self.elector.get() {
            e.release().await;
        }
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

/// A custom kind being watched, in the version discovery found.
struct Custom {
    served: kinds::Served,
    store: Store<DynamicObject>,
    watch: AbortHandle,
}

struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    custom: Vec<Custom>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    pods: Store<Pod>,
    crds: Store<PartialObjectMeta<CustomResourceDefinition>>,
}

/// Finds which custom kinds the API server serves, retrying until it answers.
async fn discover(client: &Client) -> Discovery {
    loop {
        match Discovery::new(client.clone())
            .filter(&[kinds::GATEWAY_GROUP, kinds::SKIFF_GROUP])
            .run()
            .await
        {
            Ok(d) => return d,
            Err(e) => {
                warn!(error = %e, "API discovery failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// The watch tasks and what they need to start more.
struct Watches {
    client: Client,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    backoff_max: Duration,
}

impl Watches {
    fn config() -> watcher::Config {
        watcher::Config::default()
    }

    /// Starts watching a custom kind.
    fn custom(&mut self, served: kinds::Served) -> Custom {
        info!(kind = served.kind, api_version = %served.resource.api_version, "watching");
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &served.resource);
        let (store, watch) = kinds::spawn(
            &mut self.tasks,
            self.shared.clone(),
            self.metrics.clone(),
            served.kind,
            served.resource.api_version.clone(),
            watcher(api, Self::config())
                .backoff(kinds::backoff(self.backoff_max))
                .modify(kinds::strip_dynamic),
            Writer::new(served.resource.clone()),
        );
        Custom {
            served,
            store,
            watch,
        }
    }

    /// Brings the custom watches in line with what discovery found: kinds that appeared are
    /// watched, kinds whose CRD went away are dropped, a changed preferred version is rewatched.
    fn rediscover(&mut self, discovery: &Discovery, custom: &mut Vec<Custom>) -> bool {
        let mut served = kinds::served(discovery, &self.shared);
        let mut changed = false;
        custom.retain(|c| {
            let keep = served.iter().any(|s| {
                s.kind == c.served.kind && s.resource.api_version == c.served.resource.api_version
            });
            if !keep {
                c.watch.abort();
                changed = true;
                if !served.iter().any(|s| s.kind == c.served.kind) {
                    self.shared.absent(c.served.kind);
                }
            }
            keep
        });
        served.retain(|s| !custom.iter().any(|c| c.served.kind == s.kind));
        for s in served {
            changed = true;
            let c = self.custom(s);
            custom.push(c);
        }
        changed
    }
}

/// Runs Kubernetes mode until dropped: discovery (retried until the API server answers), the
/// reflectors, then the reconcile loop. Discovery runs again whenever a CustomResourceDefinition
/// of a watched group changes, so installing the Gateway API CRDs after the agent needs no
/// restart.
pub async fn run(client: Client, node: String, backoff_max: Duration, t: Targets) {
    let shared = t.status.shared.clone();
    let discovery = discover(&client).await;
    let mut w = Watches {
        client: client.clone(),
        tasks: JoinSet::new(),
        shared: shared.clone(),
        metrics: t.metrics.clone(),
        backoff_max,
    };
    let m = &t.metrics;
    let cfg = Watches::config;
    let backoff = || kinds::backoff(backoff_max);
    let (services, _) = kinds::spawn(
        &mut w.tasks,
        shared.clone(),
        m.clone(),
        "Service",
        "v1".into(),
        watcher(Api::<Service>::all(client.clone()), cfg())
            .backoff(backoff())
            .modify(objects::strip_service),
        Writer::new(()),
    );
    let (slices, _) = kinds::spawn(
        &mut w.tasks,
        shared.clone(),
        m.clone(),
        "EndpointSlice",
        "discovery.k8s.io/v1".into(),
        watcher(Api::<EndpointSlice>::all(client.clone()), cfg())
            .backoff(backoff())
            .modify(objects::strip_slice),
        Writer::new(()),
    );
    let (namespaces, _) = kinds::spawn(
        &mut w.tasks,
        shared.clone(),
        m.clone(),
        "Namespace",
        "v1".into(),
        watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            cfg(),
        )
        .backoff(backoff())
        .modify(|o: &mut PartialObjectMeta<Namespace>| {
            kinds::strip_meta(&mut o.metadata);
            o.metadata.annotations = None;
        }),
        Writer::new(()),
    );
    let (pods, _) = kinds::spawn(
        &mut w.tasks,
        shared.clone(),
        m.clone(),
        "Pod",
        "v1".into(),
        watcher(
            Api::<Pod>::all(client.clone()),
            // With mTLS, every pod: the tunnel needs the node and identity of each destination.
            // Without, only this node's pods, the ones to capture.
            if t.cfg.mesh.is_some() {
                cfg()
            } else {
                cfg().fields(&format!("spec.nodeName={node}"))
            },
        )
        .backoff(backoff())
        .modify(enrol::strip_pod),
        Writer::new(()),
    );
    let (crds, _) = kinds::spawn(
        &mut w.tasks,
        shared.clone(),
        m.clone(),
        "CustomResourceDefinition",
        "apiextensions.k8s.io/v1".into(),
        watcher(
            Api::<PartialObjectMeta<CustomResourceDefinition>>::all(client.clone()),
            cfg(),
        )
        .backoff(backoff())
        .modify(|o: &mut PartialObjectMeta<CustomResourceDefinition>| {
            kinds::strip_meta(&mut o.metadata);
            o.metadata.annotations = None;
            o.metadata.labels = None;
        }),
        Writer::new(()),
    );
    let mut custom = Vec::new();
    w.rediscover(&discovery, &mut custom);
    // Status: the Lease decides which agent writes; the writer follows the reconciler's view.
    let (report, desired) = watch::channel(Arc::new(report::Desired::default()));
    if let Some(k) = &t.cfg.kubernetes {
        let elector = lease::Elector::new(client.clone(), k.lease.clone(), m.status.leader.clone());
        let _ = t.status.elector.set(elector.clone());
        w.tasks.spawn(elector.clone().run());
        let writer = report::Writer {
            client: client.clone(),
            elector,
            metrics: m.status.clone(),
            desired,
        };
        w.tasks.spawn(writer.run());
    }
    let stores = Stores {
        services,
        slices,
        custom,
        namespaces,
        pods,
        crds,
    };
    let mut r = Reconciler {
        node,
        stores,
        t,
        logged: HashSet::new(),
        parsed: objects::Cache::default(),
        seen: HashMap::new(),
        captured: BTreeSet::new(),
        report,
        last_good: HashMap::new(),
    };
    let mut crd_fingerprint = None;
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
        let fingerprint = kinds::crd_fingerprint(&r.stores.crds.state());
        if crd_fingerprint.as_ref() != Some(&fingerprint) {
            // The first time round this confirms the start-up discovery; after that a CRD of a
            // watched group was added, changed or removed.
            if crd_fingerprint.is_some() {
                let discovery = discover(&client).await;
                if w.rediscover(&discovery, &mut r.stores.custom) {
                    // New watches must sync before the policy is rebuilt.
                    crd_fingerprint = Some(fingerprint);
                    shared.changed.notify_one();
                    continue;
                }
            }
            crd_fingerprint = Some(fingerprint);
        }
        // Compiling and writing maps is synchronous work: let this worker's other tasks (the
        // proxy's accepts among them) move to another thread meanwhile.
        retry = !tokio::task::block_in_place(|| r.reconcile());
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
    /// The status the policy calls for, to the status writer.
    report: watch::Sender<Arc<report::Desired>>,
    /// Every object of the policy in force, by display name: an edit that breaks one is
    /// replaced by this version (the last good one stays in force).
    last_good: HashMap<String, Object>,
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
        let mut objects = objects;
        if self.t.cfg.mesh.is_some() {
            // The workloads of the mTLS tunnel, from the same stores enrolment reads.
            objects.extend(objects::workloads(&s.pods, &s.namespaces));
        }
        let outcome = compile_keeping_last_good(&objects, &self.last_good, &mut errors_now);
        let desired = report::desired(
            &objects,
            &report::Outcome {
                errors: &outcome.errors,
                excluded: &outcome.excluded,
                conflicts: outcome.compiled.conflicts(),
                unresolved: &outcome.unresolved,
            },
        );
        let desired = report::Desired {
            objects: desired,
            kinds: self
                .stores
                .custom
                .iter()
                .map(|c| (c.served.kind, c.served.resource.clone()))
                .collect(),
        };
        self.report.send_if_modified(|d| {
            let changed = **d != desired;
            if changed {
                *d = Arc::new(desired);
            }
            changed
        });
        let (interfaces, mut pods) = self.enrolled(&mut errors_now);
        ok &= pods.values().all(|p| p.error.is_none());
        for e in &errors_now {
            if self.logged.contains(e) {
                continue;
            }
            if outcome.unresolved_lines.contains(e) {
                warn!(error = %e, "backendRef unresolved; the route stays in force");
            } else if outcome
                .stand_ins
                .iter()
                .any(|name| e.starts_with(name.as_str()))
            {
                error!(error = %e, "invalid edit refused; the object's last valid version stays in force");
            } else {
                error!(error = %e, "Kubernetes object left out");
            }
        }
        self.logged = errors_now;
        let compiled = outcome.compiled;
        let in_force = outcome.in_force;
        let stand_ins: Vec<String> = outcome.stand_ins.into_iter().collect();
        let excluded: Vec<String> = outcome.excluded.into_iter().collect();
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
        status.last_good = stand_ins;
        if applied.is_err() {
            ok = false;
        } else {
            status.applied += 1;
            self.last_good = in_force
                .into_iter()
                .map(|o| (o.display_name(), o))
                .collect();
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

/// What [`compile_valid`] made of the objects.
struct Compile {
    compiled: Compiled,
    /// The objects compiled (what `compiled` was made from).
    in_force: Vec<Object>,
    /// Objects whose current version is invalid, compiled at their last good version instead.
    stand_ins: BTreeSet<String>,
    /// Display names of the objects left out.
    excluded: BTreeSet<String>,
    /// Every validation error found on the way.
    errors: Vec<ValidationError>,
    /// backendRefs compiled as a 500 share (Gateway API `ResolvedRefs=False`), also of the
    /// routes left out for another reason.
    unresolved: Vec<UnresolvedRef>,
    /// How they are logged (each once while it lasts, as the errors).
    unresolved_lines: HashSet<String>,
}

/// Compiles the objects, leaving out every object a validation error names (and logging the
/// error once): one bad object never blocks the others. A backendRef that names no Service of
/// the route's namespace does not leave the route out: it becomes a backend that answers 500,
/// as the Gateway API asks, and the route's status says so.
fn compile_valid(objects: &[Object], errors: &mut HashSet<String>) -> Compile {
    let options = Options {
        unresolved_backends: true,
    };
    // Names are compared on every pass; built once.
    let names: Vec<String> = objects.iter().map(Object::display_name).collect();
    let mut excluded: BTreeSet<String> = BTreeSet::new();
    let mut found_all: Vec<ValidationError> = Vec::new();
    let mut unresolved: BTreeMap<String, Vec<UnresolvedRef>> = BTreeMap::new();
    loop {
        // The first pass (all that is needed when every object is valid) copies nothing.
        let copy: Vec<Object>;
        let kept = if excluded.is_empty() {
            objects
        } else {
            copy = objects
                .iter()
                .zip(&names)
                .filter(|(_, n)| !excluded.contains(*n))
                .map(|(o, _)| o.clone())
                .collect();
            &copy
        };
        let (result, refs) = Compiled::compile_with(kept, options);
        // The latest compile that still held a route says what it refers to.
        for n in names.iter().filter(|n| !excluded.contains(*n)) {
            unresolved.remove(n);
        }
        for r in refs {
            unresolved.entry(r.object.clone()).or_default().push(r);
        }
        match result {
            Ok(compiled) => {
                let unresolved: Vec<UnresolvedRef> = unresolved.into_values().flatten().collect();
                let unresolved_lines: HashSet<String> = unresolved
                    .iter()
                    .map(|u| {
                        format!(
                            "{} {u}: requests to this backend get 500 (ResolvedRefs=False, {})",
                            u.object,
                            u.problem.reason()
                        )
                    })
                    .collect();
                errors.extend(unresolved_lines.iter().cloned());
                return Compile {
                    compiled,
                    in_force: kept.to_vec(),
                    stand_ins: BTreeSet::new(),
                    excluded,
                    errors: found_all,
                    unresolved,
                    unresolved_lines,
                };
            }
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
                    found_all.push(e);
                }
                if excluded.len() == before {
                    // An error that names no object we hold: nothing left to leave out.
                    errors.insert("policy could not be compiled; using an empty policy".into());
                    return Compile {
                        compiled: Compiled::empty(),
                        in_force: Vec::new(),
                        stand_ins: BTreeSet::new(),
                        excluded: names.into_iter().collect(),
                        errors: found_all,
                        unresolved: unresolved.into_values().flatten().collect(),
                        unresolved_lines: HashSet::new(),
                    };
                }
            }
        }
    }
}

/// [`compile_valid`], then once more with every object that was left out but has a last good
/// version put back at that version: as in file mode, an invalid edit is refused and what was in
/// force stays. Its errors (and the object's status, `Accepted=False` for the new generation)
/// still say what is wrong with the edit.
fn compile_keeping_last_good(
    objects: &[Object],
    last_good: &HashMap<String, Object>,
    errors: &mut HashSet<String>,
) -> Compile {
    let first = compile_valid(objects, errors);
    let stand_ins: BTreeSet<String> = first
        .excluded
        .iter()
        .filter(|name| last_good.contains_key(*name))
        .cloned()
        .collect();
    if stand_ins.is_empty() {
        return first;
    }
    let mut with: Vec<Object> = objects
        .iter()
        .filter(|o| !stand_ins.contains(&o.display_name()))
        .cloned()
        .chain(stand_ins.iter().filter_map(|n| last_good.get(n).cloned()))
        .collect();
    with.sort_by_key(|o| o.display_name());
    let mut second = compile_valid(&with, errors);
    // A last good version that no longer fits (say its Service is gone) is left out for good.
    second.stand_ins = stand_ins
        .into_iter()
        .filter(|n| !second.excluded.contains(n))
        .collect();
    let still_out = first
        .excluded
        .into_iter()
        .filter(|n| !second.stand_ins.contains(n));
    second.excluded.extend(still_out);
    let mut errs = first.errors;
    errs.extend(second.errors);
    second.errors = errs;
    second
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_edit_leaves_the_last_good_version_in_force() {
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                       spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n";
        let route = |path: &str| {
            format!(
                "{service}apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {{name: r, namespace: shop}}\n\
                 spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  \
                 rules: [{{matches: [{{path: {{value: {path}}}}}], backendRefs: [{{name: web, port: 80}}]}}]\n"
            )
        };
        let good = mesh_policy::parse_documents(&route("/v1"), "t").expect("parse");
        let first = compile_keeping_last_good(&good, &HashMap::new(), &mut HashSet::new());
        assert!(first.excluded.is_empty());
        let last_good: HashMap<String, Object> = first
            .in_force
            .into_iter()
            .map(|o| (o.display_name(), o))
            .collect();

        // The edit breaks the route: it is refused, the /v1 version stays.
        let bad = mesh_policy::parse_documents(&route("no-slash"), "t").expect("parse");
        let mut errors = HashSet::new();
        let out = compile_keeping_last_good(&bad, &last_good, &mut errors);
        assert!(out.excluded.is_empty(), "{:?}", out.excluded);
        assert_eq!(
            out.stand_ins.iter().collect::<Vec<_>>(),
            ["HTTPRoute shop/r"]
        );
        assert_eq!(out.compiled.summary().http_routes, 1);
        assert!(
            out.errors.iter().any(|e| e.object == "HTTPRoute shop/r"),
            "the edit's error is still reported: {:?}",
            out.errors
        );
        assert!(errors.iter().any(|e| e.contains("path")), "{errors:?}");

        // A new object that is invalid from the start has no last good version: left out.
        let fresh = compile_keeping_last_good(&bad, &HashMap::new(), &mut HashSet::new());
        assert_eq!(
            fresh.excluded.iter().collect::<Vec<_>>(),
            ["HTTPRoute shop/r"]
        );
        assert_eq!(fresh.compiled.summary().http_routes, 0);
    }

    #[test]
    fn an_invalid_route_is_left_out_and_a_missing_backend_is_not() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                    metadata: {name: bad, namespace: shop}\n\
                    spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
                    rules: [{backendRefs: [{name: missing, port: 80}]}]\n";
        let objects = mesh_policy::parse_documents(text, "t").expect("parse");
        let mut errors = HashSet::new();
        let outcome = compile_valid(&objects, &mut errors);
        assert!(outcome.excluded.is_empty(), "{:?}", outcome.excluded);
        assert_eq!(
            outcome.unresolved.len(),
            1,
            "a missing backend is a 500 share"
        );
        assert!(
            errors.iter().any(|e| e.contains("get 500")),
            "logged: {errors:?}"
        );
        assert_eq!(outcome.compiled.summary().http_routes, 1);
        assert_eq!(outcome.compiled.summary().services, 1);

        let text = text.replace(
            "rules: [{backendRefs",
            "rules: [{matches: [{path: {value: x}}], backendRefs",
        );
        let objects = mesh_policy::parse_documents(&text, "t").expect("parse");
        let mut errors = HashSet::new();
        let outcome = compile_valid(&objects, &mut errors);
        assert_eq!(
            outcome.excluded.into_iter().collect::<Vec<_>>(),
            ["HTTPRoute shop/bad"]
        );
        assert!(!errors.is_empty());
        assert_eq!(outcome.compiled.summary().services, 1);
    }
}
