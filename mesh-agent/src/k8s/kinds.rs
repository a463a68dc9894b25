//! The watched kinds: which versions the API server serves (discovery at start), one reflector
//! per kind with the fields the agent never reads stripped before they are stored, and what
//! each watch has been doing (synced, objects, last event, errors) for `/status` and metrics.
use std::{
    collections::BTreeMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Resource,
    core::{ApiResource, DynamicObject},
    discovery::Discovery,
    runtime::{
        WatchStreamExt as _,
        reflector::store::{Store, Writer},
        watcher,
    },
};
use serde::Serialize;
use tokio::{sync::Notify, task::JoinSet};
use tracing::{info, warn};

use super::Metrics;

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub const SKIFF_GROUP: &str = "skiff.dev";

/// The custom kinds and, best first, the versions `mesh_policy` reads.
pub const CUSTOM_KINDS: [(&str, &str, &[&str]); 5] = [
    (GATEWAY_GROUP, "HTTPRoute", &["v1", "v1beta1"]),
    (GATEWAY_GROUP, "GRPCRoute", &["v1", "v1alpha2"]),
    (GATEWAY_GROUP, "TLSRoute", &["v1", "v1alpha3", "v1alpha2"]),
    (GATEWAY_GROUP, "TCPRoute", &["v1alpha2"]),
    (SKIFF_GROUP, "MeshPolicy", &["v1alpha1"]),
];

/// One watch as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindStatus {
    /// `group/version` watched; `None` when the cluster does not serve the kind.
    pub version: Option<String>,
    /// The initial list has been received (after a relist: the new one).
    pub synced: bool,
    pub objects: usize,
    pub events: u64,
    pub watch_errors: u64,
    /// Unix time in milliseconds of the last event or error.
    pub last_event_unix_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// What the watch tasks share with the reconciler and the admin server.
#[derive(Default)]
pub struct Shared {
    pub kinds: Mutex<BTreeMap<&'static str, KindStatus>>,
    /// Woken on every change that may alter the policy or the enrolled pods.
    pub changed: Notify,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shared {
    fn with(&self, kind: &'static str, f: impl FnOnce(&mut KindStatus)) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        f(kinds.entry(kind).or_default());
    }

    /// A kind the cluster does not serve: synced (there is nothing to wait for), no version.
    pub fn absent(&self, kind: &'static str) {
        self.with(kind, |s| {
            s.version = None;
            s.synced = true;
        });
    }

    /// Every watched kind has delivered its initial list.
    pub fn all_synced(&self) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        !kinds.is_empty() && kinds.values().all(|k| k.synced)
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, KindStatus> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Drops what the agent never reads (managedFields, the last-applied annotation) so the stores
/// hold little more than the policy itself.
pub fn strip_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

/// Runs one reflector: `stream` (a watcher with backoff) feeds `writer`; every event updates
/// the kind's status and metrics; changes wake the reconciler.
pub fn spawn<K, S>(
    tasks: &mut JoinSet<()>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    kind: &'static str,
    version: String,
    stream: S,
    writer: Writer<K>,
) -> Store<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let reader = writer.as_reader();
    let store = reader.clone();
    shared.with(kind, |s| s.version = Some(version));
    tasks.spawn(async move {
        let stream = stream.reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let labels = super::KindLabels { kind: kind.into() };
            match event {
                Ok(e) => {
                    metrics.watch_events.get_or_create(&labels).inc();
                    let (wake, synced) = match e {
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => (true, None),
                        watcher::Event::Init => (false, None),
                        watcher::Event::InitApply(_) => (false, None),
                        watcher::Event::InitDone => (true, Some(true)),
                    };
                    shared.with(kind, |s| {
                        s.events += 1;
                        s.last_event_unix_ms = Some(now_ms());
                        s.objects = reader.len();
                        if let Some(v) = synced {
                            if !s.synced {
                                info!(kind, objects = s.objects, "initial list synced");
                            }
                            s.synced = v;
                            s.last_error = None;
                        }
                    });
                    if wake {
                        shared.changed.notify_one();
                    }
                }
                Err(e) => {
                    metrics.watch_errors.get_or_create(&labels).inc();
                    warn!(kind, error = %e, "watch failed; retrying with backoff (forwarding continues with the last policy)");
                    shared.with(kind, |s| {
                        s.watch_errors += 1;
                        s.last_event_unix_ms = Some(now_ms());
                        s.last_error = Some(e.to_string());
                    });
                }
            }
        }
    });
    store
}

/// A custom kind found by discovery.
pub struct Served {
    pub kind: &'static str,
    pub resource: ApiResource,
}

/// Which of [`CUSTOM_KINDS`] the cluster serves, in which version. A kind that is not served is
/// marked absent in `shared` and logged once.
pub fn served(discovery: &Discovery, shared: &Shared) -> Vec<Served> {
    let mut out = Vec::new();
    for (group, kind, versions) in CUSTOM_KINDS {
        let found = discovery.get(group).and_then(|g| {
            versions.iter().find_map(|v| {
                g.versioned_resources(v)
                    .into_iter()
                    .find(|(r, _)| r.kind == kind)
                    .map(|(r, _)| r)
            })
        });
        match found {
            Some(resource) => {
                info!(kind, api_version = %resource.api_version, "watching");
                out.push(Served { kind, resource });
            }
            None => {
                warn!(
                    kind,
                    group,
                    versions = ?versions,
                    "not served by the API server (CRD not installed?); skipped until the agent restarts"
                );
                shared.absent(kind);
            }
        }
    }
    out
}

/// Strips a dynamic object the same way as a typed one.
pub fn strip_dynamic(o: &mut DynamicObject) {
    strip_meta(&mut o.metadata);
    if let Some(m) = o.data.as_object_mut() {
        // What a controller reports is not policy.
        m.remove("status");
    }
}
