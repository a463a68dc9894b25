//! The watched kinds: which versions the API server serves (discovery at start), one reflector
//! per kind with the fields the agent never reads stripped before they are stored, and what
//! each watch has been doing (synced, objects, last event, errors) for `/status` and metrics.
use std::{
    collections::BTreeMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Resource,
    core::{ApiResource, DynamicObject, PartialObjectMeta},
    discovery::Discovery,
    runtime::{
        WatchStreamExt as _,
        reflector::store::{Store, Writer},
        utils::{Backoff, ResetTimerBackoff},
        watcher,
    },
};
use serde::Serialize;
use tokio::{
    sync::Notify,
    task::{AbortHandle, JoinSet},
};
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
    /// Unix time in milliseconds of the last object, list or bookmark received.
    pub last_success_unix_ms: Option<u64>,
    /// The last attempt to list or watch failed: the store (and the policy built from it) may
    /// be out of date until the watch is re-established.
    pub stale: bool,
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
            *s = KindStatus {
                synced: true,
                ..KindStatus::default()
            }
        });
    }

    /// Every watched kind has delivered its initial list.
    pub fn all_synced(&self) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        !kinds.is_empty() && kinds.values().all(|k| k.synced)
    }

    /// Some watch is failing: what the agent enforces may be behind the API server.
    pub fn any_stale(&self) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.values().any(|k| k.stale)
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
) -> (Store<K>, AbortHandle)
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let reader = writer.as_reader();
    let store = reader.clone();
    shared.with(kind, |s| {
        *s = KindStatus {
            version: Some(version),
            ..KindStatus::default()
        }
    });
    let handle = tasks.spawn(async move {
        let stream = stream.reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let labels = super::KindLabels { kind: kind.into() };
            match event {
                Ok(e) => {
                    metrics.watch_events.get_or_create(&labels).inc();
                    // `Init` comes before the list request; anything else means the API
                    // server answered.
                    let answered = !matches!(e, watcher::Event::Init);
                    let (wake, synced) = match e {
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => (true, None),
                        watcher::Event::Init => (false, None),
                        watcher::Event::InitApply(_) => (false, None),
                        watcher::Event::InitDone => (true, Some(true)),
                    };
                    let now = now_ms();
                    if answered {
                        metrics.watch_stale.get_or_create(&labels).set(0);
                        metrics
                            .watch_last_success
                            .get_or_create(&labels)
                            .set((now / 1000) as i64);
                    }
                    shared.with(kind, |s| {
                        s.events += 1;
                        s.last_event_unix_ms = Some(now);
                        if answered {
                            if s.stale {
                                info!(kind, "watch re-established");
                            }
                            s.stale = false;
                            s.last_success_unix_ms = Some(now);
                        }
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
                    metrics.watch_stale.get_or_create(&labels).set(1);
                    warn!(kind, error = %e, "watch failed; retrying with backoff (forwarding continues with the last policy)");
                    shared.with(kind, |s| {
                        s.stale = true;
                        s.watch_errors += 1;
                        s.last_event_unix_ms = Some(now_ms());
                        s.last_error = Some(e.to_string());
                    });
                }
            }
        }
    });
    (store, handle)
}

/// Reconnection delays for a failed watch: client-go's reflector schedule (800 ms, doubling, with
/// jitter) up to `max`, starting over after two minutes without errors.
pub fn backoff(max: Duration) -> ResetTimerBackoff<Doubling> {
    ResetTimerBackoff::new(Doubling::new(max), Duration::from_secs(120))
}

/// Doubling delays from 800 ms to a ceiling, each stretched by up to half again at random so
/// that the agents of every node do not reconnect in step.
pub struct Doubling {
    next: Duration,
    max: Duration,
    seed: u64,
}

impl Doubling {
    const INITIAL: Duration = Duration::from_millis(800);

    fn new(max: Duration) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        Doubling {
            next: Self::INITIAL.min(max),
            max,
            seed: seed | 1,
        }
    }
}

impl Iterator for Doubling {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // xorshift64: jitter needs no cryptographic randomness.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = base.mul_f64((self.seed % 1000) as f64 / 2000.0);
        Some((base + jitter).min(self.max))
    }
}

impl Backoff for Doubling {
    fn reset(&mut self) {
        self.next = Self::INITIAL.min(self.max);
    }
}

/// A custom kind found by discovery.
pub struct Served {
    pub kind: &'static str,
    pub resource: ApiResource,
}

/// Which of [`CUSTOM_KINDS`] the cluster serves, in which version. A kind that is not served is
/// marked absent in `shared` and logged once, when it is first found missing.
pub fn served(discovery: &Discovery, shared: &Shared) -> Vec<Served> {
    let mut out = Vec::new();
    for (group, kind, versions) in CUSTOM_KINDS {
        let was_absent = shared
            .kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(kind)
            .is_some_and(|k| k.version.is_none());
        let found = discovery.get(group).and_then(|g| {
            versions.iter().find_map(|v| {
                g.versioned_resources(v)
                    .into_iter()
                    .find(|(r, _)| r.kind == kind)
                    .map(|(r, _)| r)
            })
        });
        match found {
            Some(resource) => out.push(Served { kind, resource }),
            None if was_absent => {}
            None => {
                warn!(
                    kind,
                    group,
                    versions = ?versions,
                    "not served by the API server (CRD not installed?); watched once its CRD is installed"
                );
                shared.absent(kind);
            }
        }
    }
    out
}

/// Names the CustomResourceDefinitions that may change which kinds are served: those of the
/// groups in [`CUSTOM_KINDS`], with their resourceVersions. Discovery runs again when it
/// changes.
pub fn crd_fingerprint(crds: &[Arc<PartialObjectMeta<CustomResourceDefinition>>]) -> Vec<String> {
    let mut names: Vec<String> = crds
        .iter()
        .filter_map(|c| {
            let name = c.metadata.name.as_deref()?;
            let group = name.split_once('.')?.1;
            CUSTOM_KINDS.iter().any(|(g, _, _)| *g == group).then(|| {
                format!(
                    "{name}@{}",
                    c.metadata.resource_version.as_deref().unwrap_or_default()
                )
            })
        })
        .collect();
    names.sort();
    names
}

/// Strips a dynamic object the same way as a typed one.
pub fn strip_dynamic(o: &mut DynamicObject) {
    strip_meta(&mut o.metadata);
    if let Some(m) = o.data.as_object_mut() {
        // What a controller reports is not policy.
        m.remove("status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnection_delays_double_with_jitter_up_to_the_ceiling_and_reset() {
        let mut b = Doubling::new(Duration::from_secs(5));
        let delays: Vec<Duration> = (0..8).map(|_| b.next().expect("endless")).collect();
        // 0.8, 1.6, 3.2 s, each stretched by less than half again; then the ceiling.
        for (d, base) in delays.iter().zip([800u64, 1600, 3200]) {
            let base = Duration::from_millis(base);
            assert!(*d >= base && *d < base + base / 2, "{delays:?}");
        }
        assert!(
            delays[4..].iter().all(|d| *d == Duration::from_secs(5)),
            "{delays:?}"
        );
        b.reset();
        assert!(b.next().expect("endless") < Duration::from_millis(1200));
    }

    #[test]
    fn only_crds_of_the_watched_groups_trigger_discovery() {
        let crd = |name: &str, rv: &str| {
            let mut m = PartialObjectMeta::<CustomResourceDefinition>::default();
            m.metadata.name = Some(name.into());
            m.metadata.resource_version = Some(rv.into());
            Arc::new(m)
        };
        let before = crd_fingerprint(&[
            crd("httproutes.gateway.networking.k8s.io", "5"),
            crd("podmonitors.monitoring.coreos.com", "6"),
        ]);
        assert_eq!(before, vec!["httproutes.gateway.networking.k8s.io@5"]);
        let other_group_changed = crd_fingerprint(&[
            crd("httproutes.gateway.networking.k8s.io", "5"),
            crd("podmonitors.monitoring.coreos.com", "9"),
        ]);
        assert_eq!(before, other_group_changed);
        let added = crd_fingerprint(&[
            crd("grpcroutes.gateway.networking.k8s.io", "7"),
            crd("httproutes.gateway.networking.k8s.io", "5"),
        ]);
        assert_ne!(before, added);
    }
}
