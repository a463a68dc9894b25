//! Status: what the agent tells users about their routes and MeshPolicies, written by the one
//! agent holding the status Lease ([`super::lease`]).
//!
//! After every compile the reconciler computes the status the policy calls for ([`desired`]):
//! per GAMMA route, one `status.parents` entry for each Service parentRef (controllerName
//! `skiff.dev/mesh`, conditions `Accepted` and `ResolvedRefs` with the Gateway API reasons), and
//! per MeshPolicy an `Accepted` condition naming every error. The [`Writer`] compares it with
//! what is on the objects and writes only the difference, so one change is one write.
//!
//! Route `status.parents` is `+listType=atomic` in the Gateway API CRDs: server-side apply cannot
//! share it between field managers item by item, whoever applies it owns the whole list. The
//! writer therefore reads the list (from its own watch), keeps every entry of other controllers
//! verbatim, replaces its own, and applies the result on `/status` with field manager
//! `skiff.dev/mesh`, `force` (the list is shared by design), and the resourceVersion it read as
//! a precondition: if anyone wrote in between, the API server answers 409 and the writer reads
//! again. MeshPolicy `status.conditions` is a map list owned by the agents alone.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    core::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher},
};
use mesh_policy::{
    KindConflict, Object, Resource, UnresolvedRef, ValidationError, crd::MeshPolicyStatus,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde_json::{Value, json};
use tokio::{sync::Notify, sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use super::lease::Elector;

/// `status.parents[].controllerName` of the entries this agent writes.
pub const CONTROLLER_NAME: &str = "skiff.dev/mesh";
/// The server-side apply field manager of every status write.
pub const FIELD_MANAGER: &str = "skiff.dev/mesh";
/// GEP-1426 names the reason `RouteReasonConflicted`; the Gateway API spells reason values
/// without the Go constant's `RouteReason` prefix (`RouteReasonAccepted` is `"Accepted"`), so
/// the value is `Conflicted`. (Linkerd writes the constant's name as the value; no release of
/// the API defines it yet.)
pub const REASON_CONFLICTED: &str = "Conflicted";
/// The longest condition message the API server accepts.
const MAX_MESSAGE: usize = 32 * 1024;
/// After a failed write, the next try.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: String,
    /// `ok`, `conflict` (409: read again), `error`.
    pub result: String,
}

/// Status-writer metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub leader: Gauge,
    pub writes: Family<WriteLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Metrics::default());
        registry.register(
            "kubernetes_leader",
            "1 while this agent holds the status Lease and writes route and MeshPolicy status",
            m.leader.clone(),
        );
        registry.register(
            "kubernetes_status_writes",
            "Status writes (server-side apply on /status), by kind and result",
            m.writes.clone(),
        );
        m
    }
}

/// An object by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

/// One condition as the agent means it; `lastTransitionTime` is added when written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// One `status.parents` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Parent {
    /// The parentRef, echoed as written in the spec.
    pub parent_ref: Value,
    pub conditions: Vec<Cond>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    Route {
        generation: Option<i64>,
        parents: Vec<Parent>,
    },
    Policy {
        generation: Option<i64>,
        errors: Vec<ValidationError>,
    },
}

/// The status the policy calls for, by object, and the kinds the reconciler watches (found by
/// discovery, which reruns when CRDs change).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub objects: BTreeMap<Key, Want>,
    pub kinds: Vec<(&'static str, ApiResource)>,
}

/// What one compile said about the objects.
pub struct Outcome<'a> {
    /// Every validation error, also of the objects left out.
    pub errors: &'a [ValidationError],
    /// Display names (`Kind ns/name`) of the objects left out.
    pub excluded: &'a BTreeSet<String>,
    pub conflicts: &'a [KindConflict],
    pub unresolved: &'a [UnresolvedRef],
}

fn cut(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

fn field_reason(e: &ValidationError) -> String {
    match e.field.as_str() {
        "" => e.reason.clone(),
        f => format!("{f}: {}", e.reason),
    }
}

/// The Service ports a Service parentRef covers: its `port`, the port its `sectionName` names,
/// or every TCP port of the Service.
fn covered_ports(parent: &Value, service: Option<&Object>) -> Vec<u16> {
    if let Some(p) = parent["port"].as_u64().and_then(|p| u16::try_from(p).ok()) {
        return vec![p];
    }
    let Some(Resource::Service(svc)) = service.map(|o| &o.resource) else {
        return Vec::new();
    };
    let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter(|p| {
            parent["sectionName"]
                .as_str()
                .is_none_or(|s| p.name.as_deref() == Some(s))
        })
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect()
}

/// The status every route and MeshPolicy among `objects` should have after `outcome`.
pub fn desired(objects: &[Object], outcome: &Outcome<'_>) -> BTreeMap<Key, Want> {
    let mut errors: HashMap<&str, Vec<&ValidationError>> = HashMap::new();
    for e in outcome.errors {
        let list = errors.entry(e.object.as_str()).or_default();
        if !list.contains(&e) {
            list.push(e);
        }
    }
    let services: HashMap<(&str, &str), &Object> = objects
        .iter()
        .filter(|o| matches!(o.resource, Resource::Service(_)))
        .map(|o| ((o.resource.namespace(), o.resource.name()), o))
        .collect();
    let mut out = BTreeMap::new();
    for object in objects {
        let r = &object.resource;
        let key = Key {
            kind: r.kind(),
            namespace: r.namespace().to_string(),
            name: r.name().to_string(),
        };
        let generation = r.metadata().generation;
        let name = object.display_name();
        let mine = errors.get(name.as_str()).map_or(&[][..], Vec::as_slice);
        let spec = match r {
            Resource::MeshPolicy(_) => {
                let errors = mine.iter().map(|e| (*e).clone()).collect();
                out.insert(key, Want::Policy { generation, errors });
                continue;
            }
            Resource::HttpRoute(o) => serde_json::to_value(&o.spec),
            Resource::GrpcRoute(o) => serde_json::to_value(&o.spec),
            Resource::TlsRoute(o) => serde_json::to_value(&o.spec),
            Resource::TcpRoute(o) => serde_json::to_value(&o.spec),
            Resource::Service(_)
            | Resource::EndpointSlice(_)
            | Resource::Pod(_)
            | Resource::Namespace(_) => continue,
        };
        let spec = spec.unwrap_or_default();
        let unresolved: Vec<&UnresolvedRef> = outcome
            .unresolved
            .iter()
            .filter(|u| u.object == name)
            .collect();
        let resolved = match unresolved.first() {
            None => Cond {
                type_: "ResolvedRefs",
                status: true,
                reason: "ResolvedRefs".into(),
                message: "every backendRef names a Service of this namespace".into(),
            },
            Some(first) => Cond {
                type_: "ResolvedRefs",
                status: false,
                reason: first.problem.reason().into(),
                message: cut(unresolved
                    .iter()
                    .map(|u| {
                        format!("{u} (requests to it get 500, TCP and TLS connections are closed)")
                    })
                    .collect::<Vec<_>>()
                    .join("; ")),
            },
        };
        let excluded = outcome.excluded.contains(&name);
        let mut parents = Vec::new();
        for (i, parent) in spec["parentRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let group = parent["group"]
                .as_str()
                .unwrap_or("gateway.networking.k8s.io");
            let kind = parent["kind"].as_str().unwrap_or("Gateway");
            if !matches!(group, "" | "core") || kind != "Service" {
                // Another controller's parent: its status is not ours to write.
                continue;
            }
            let accepted = if excluded {
                let prefix = format!("spec.parentRefs[{i}]");
                let on_parent = |e: &&&ValidationError| {
                    e.field == prefix || e.field.starts_with(&format!("{prefix}."))
                };
                let (first, rest): (Vec<&&ValidationError>, Vec<&&ValidationError>) =
                    mine.iter().partition(on_parent);
                let reason = if first.is_empty() {
                    "UnsupportedValue"
                } else {
                    "NoMatchingParent"
                };
                let list: Vec<String> = first
                    .into_iter()
                    .chain(rest)
                    .map(|e| field_reason(e))
                    .collect();
                Cond {
                    type_: "Accepted",
                    status: false,
                    reason: reason.into(),
                    message: cut(format!("route left out: {}", list.join("; "))),
                }
            } else {
                let svc_ns = parent["namespace"].as_str().unwrap_or(r.namespace());
                let svc_name = parent["name"].as_str().unwrap_or("");
                let ports = covered_ports(parent, services.get(&(svc_ns, svc_name)).copied());
                let lost: Vec<&KindConflict> = outcome
                    .conflicts
                    .iter()
                    .filter(|c| {
                        c.route.kind.as_str() == r.kind()
                            && c.route.namespace == key.namespace
                            && c.route.name == key.name
                            && c.service.namespace == svc_ns
                            && c.service.name == svc_name
                            && ports.contains(&c.port)
                    })
                    .collect();
                let text = || {
                    lost.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                if !lost.is_empty() && lost.len() >= ports.len() {
                    Cond {
                        type_: "Accepted",
                        status: false,
                        reason: REASON_CONFLICTED.into(),
                        message: cut(text()),
                    }
                } else if !lost.is_empty() {
                    Cond {
                        type_: "Accepted",
                        status: true,
                        reason: "Accepted".into(),
                        message: cut(format!("in force on the other ports; {}", text())),
                    }
                } else {
                    Cond {
                        type_: "Accepted",
                        status: true,
                        reason: "Accepted".into(),
                        message: "the route is in force".into(),
                    }
                }
            };
            parents.push(Parent {
                parent_ref: parent.clone(),
                conditions: vec![accepted, resolved.clone()],
            });
        }
        out.insert(
            key,
            Want::Route {
                generation,
                parents,
            },
        );
    }
    out
}

/// A condition as stored, in the shape compared with what the agent means.
fn same_condition(have: &Value, want: &Cond, generation: Option<i64>) -> bool {
    have["type"] == want.type_
        && have["status"] == if want.status { "True" } else { "False" }
        && have["reason"] == want.reason.as_str()
        && have["message"] == want.message.as_str()
        && have["observedGeneration"].as_i64() == generation
}

/// `lastTransitionTime` of `want`: kept from the stored condition of the same type when its
/// status did not change, else now.
fn transition_time(have: Option<&Value>, want: &Cond, now: &str) -> Value {
    match have {
        Some(h) if h["status"] == if want.status { "True" } else { "False" } => h
            .get("lastTransitionTime")
            .cloned()
            .unwrap_or_else(|| now.into()),
        _ => now.into(),
    }
}

fn condition_json(want: &Cond, generation: Option<i64>, ltt: Value) -> Value {
    let mut c = json!({
        "type": want.type_,
        "status": if want.status { "True" } else { "False" },
        "reason": want.reason,
        "message": want.message,
        "lastTransitionTime": ltt,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = g.into();
    }
    c
}

fn now() -> String {
    serde_json::to_value(Time(Timestamp::now()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The new `status.parents` if it differs from `have`: other controllers' entries as they
/// are, then this agent's.
fn route_parents(have: &Value, generation: Option<i64>, want: &[Parent]) -> Option<Value> {
    let have_list = have["parents"].as_array().cloned().unwrap_or_default();
    let (ours, others): (Vec<Value>, Vec<Value>) = have_list
        .into_iter()
        .partition(|p| p["controllerName"] == CONTROLLER_NAME);
    let unchanged = ours.len() == want.len()
        && ours.iter().zip(want).all(|(h, w)| {
            h["parentRef"] == w.parent_ref
                && h["conditions"].as_array().is_some_and(|cs| {
                    cs.len() == w.conditions.len()
                        && w.conditions
                            .iter()
                            .all(|wc| cs.iter().any(|hc| same_condition(hc, wc, generation)))
                })
        });
    if unchanged {
        return None;
    }
    let now = now();
    let mut parents = others;
    for w in want {
        let before = ours.iter().find(|h| h["parentRef"] == w.parent_ref);
        let conditions: Vec<Value> = w
            .conditions
            .iter()
            .map(|c| {
                let have = before.and_then(|b| {
                    b["conditions"]
                        .as_array()
                        .and_then(|cs| cs.iter().find(|hc| hc["type"] == c.type_))
                });
                condition_json(c, generation, transition_time(have, c, &now))
            })
            .collect();
        parents.push(json!({
            "parentRef": w.parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    Some(Value::Array(parents))
}

/// The new MeshPolicy status if it differs from `have`.
fn policy_status(
    have: &Value,
    generation: Option<i64>,
    errors: &[ValidationError],
) -> Option<Value> {
    let status = MeshPolicyStatus::validated(generation, errors, Time(Timestamp::now()));
    let c = status.conditions.first()?;
    let want = Cond {
        type_: "Accepted",
        status: c.status == "True",
        reason: c.reason.clone(),
        message: c.message.clone(),
    };
    let before = have["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|hc| hc["type"] == "Accepted"));
    if have["observedGeneration"].as_i64() == generation
        && before.is_some_and(|b| same_condition(b, &want, generation))
    {
        return None;
    }
    let mut out = json!({
        "conditions": [condition_json(&want, generation, transition_time(before, &want, &now()))],
    });
    if let Some(g) = generation {
        out["observedGeneration"] = g.into();
    }
    Some(out)
}

/// The status of one object as this agent last saw it.
#[derive(Clone, Debug)]
struct Seen {
    resource_version: Option<String>,
    status: Value,
}

/// Whether `incoming` is not older than `current` (resourceVersions are opaque, but every API
/// server hands out increasing integers; anything else is taken as newer).
fn not_older(incoming: Option<&str>, current: Option<&str>) -> bool {
    match (
        incoming.and_then(|v| v.parse::<u64>().ok()),
        current.and_then(|v| v.parse::<u64>().ok()),
    ) {
        (Some(i), Some(c)) => i >= c,
        _ => true,
    }
}

/// The status of every watched object, fed by one watch per kind (run only while leader).
#[derive(Default)]
struct Views {
    seen: Mutex<HashMap<Key, Seen>>,
    synced: Mutex<BTreeMap<&'static str, bool>>,
    changed: Notify,
}

impl Views {
    fn put(&self, key: Key, seen: Seen) {
        let mut m = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let newer = m.get(&key).is_none_or(|old| {
            not_older(
                seen.resource_version.as_deref(),
                old.resource_version.as_deref(),
            )
        });
        if newer {
            m.insert(key, seen);
        }
    }

    fn get(&self, key: &Key) -> Option<Seen> {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn all_synced(&self) -> bool {
        let s = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        s.values().all(|v| *v)
    }
}

fn key_of(kind: &'static str, o: &DynamicObject) -> Option<Key> {
    Some(Key {
        kind,
        namespace: o.metadata.namespace.clone()?,
        name: o.metadata.name.clone()?,
    })
}

fn seen_of(o: &DynamicObject) -> Seen {
    Seen {
        resource_version: o.metadata.resource_version.clone(),
        status: o.data.get("status").cloned().unwrap_or(Value::Null),
    }
}

/// Watches `kind`'s objects, keeping only their resourceVersion and status.
async fn watch_status(api: Api<DynamicObject>, kind: &'static str, views: Arc<Views>) {
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut DynamicObject| {
            o.metadata.managed_fields = None;
            o.metadata.annotations = None;
            o.metadata.labels = None;
            if let Some(m) = o.data.as_object_mut() {
                m.retain(|k, _| k == "status");
            }
        });
    futures::pin_mut!(stream);
    let mut initial: Option<HashMap<Key, Seen>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => initial = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(o)) => {
                if let (Some(m), Some(k)) = (initial.as_mut(), key_of(kind, &o)) {
                    m.insert(k, seen_of(&o));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = initial.take().unwrap_or_default();
                {
                    let mut m = views.seen.lock().unwrap_or_else(|e| e.into_inner());
                    m.retain(|k, _| k.kind != kind);
                    m.extend(fresh);
                }
                views
                    .synced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(kind, true);
                views.changed.notify_one();
            }
            Ok(watcher::Event::Apply(o)) => {
                if let Some(k) = key_of(kind, &o) {
                    views.put(k, seen_of(&o));
                    views.changed.notify_one();
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                if let Some(k) = key_of(kind, &o) {
                    views
                        .seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&k);
                }
            }
            Err(e) => warn!(kind, error = %e, "status watch failed; retrying with backoff"),
        }
    }
}

/// Writes status while this agent leads.
pub struct Writer {
    pub client: Client,
    pub elector: Arc<Elector>,
    pub metrics: Arc<Metrics>,
    pub desired: watch::Receiver<Arc<Desired>>,
}

impl Writer {
    /// Runs until dropped: waits for leadership, then keeps status in line with the desired
    /// status until leadership is lost.
    pub async fn run(mut self) {
        let mut leading = self.elector.subscribe();
        loop {
            if !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
                continue;
            }
            // The status of the kinds the reconciler watches now; a change of kinds restarts
            // this round.
            let kinds = self.desired.borrow().kinds.clone();
            let views = Arc::new(Views::default());
            let mut watches = JoinSet::new();
            for (kind, ar) in &kinds {
                views
                    .synced
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(kind, false);
                let api = Api::<DynamicObject>::all_with(self.client.clone(), ar);
                watches.spawn(watch_status(api, kind, views.clone()));
            }
            let mut retry = false;
            loop {
                tokio::select! {
                    r = leading.changed() => {
                        if r.is_err() || !*leading.borrow_and_update() { break; }
                    }
                    r = self.desired.changed() => if r.is_err() { return; },
                    _ = views.changed.notified() => {}
                    _ = tokio::time::sleep(RETRY), if retry => {}
                }
                if !views.all_synced() {
                    continue;
                }
                let desired = self.desired.borrow_and_update().clone();
                if desired.kinds != kinds {
                    break;
                }
                retry = !self.sync(&desired, &views).await;
            }
            // Not leading any more: the status watches stop with the set.
            watches.shutdown().await;
        }
    }

    /// Writes every object whose status differs; `false` if a write should be tried again.
    async fn sync(&self, desired: &Desired, views: &Views) -> bool {
        let mut ok = true;
        for (key, want) in &desired.objects {
            let Some(ar) = desired
                .kinds
                .iter()
                .find(|(k, _)| *k == key.kind)
                .map(|(_, ar)| ar)
            else {
                continue;
            };
            // Not (yet) in the status view: its watch event follows and wakes this loop.
            let Some(seen) = views.get(key) else { continue };
            let status = match want {
                Want::Route {
                    generation,
                    parents,
                } => {
                    route_parents(&seen.status, *generation, parents).map(|p| json!({"parents": p}))
                }
                Want::Policy { generation, errors } => {
                    policy_status(&seen.status, *generation, errors)
                }
            };
            let Some(status) = status else { continue };
            // Checked before each write: a lapsed leader writes nothing.
            if !self.elector.is_leader() {
                return true;
            }
            let api =
                Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.namespace, ar);
            let mut body = json!({
                "apiVersion": ar.api_version,
                "kind": ar.kind,
                "metadata": {"name": key.name, "namespace": key.namespace},
                "status": status,
            });
            if let Some(rv) = &seen.resource_version {
                body["metadata"]["resourceVersion"] = rv.as_str().into();
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let result = api
                .patch_status(&key.name, &params, &Patch::Apply(&body))
                .await;
            let label = |result: &str| WriteLabels {
                kind: key.kind.to_string(),
                result: result.into(),
            };
            match result {
                Ok(written) => {
                    self.metrics.writes.get_or_create(&label("ok")).inc();
                    info!(object = %format!("{} {}/{}", key.kind, key.namespace, key.name), "status written");
                    views.put(key.clone(), seen_of(&written));
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    // Someone wrote since the view was read: its watch event brings the new
                    // version, then this loop tries again.
                    self.metrics.writes.get_or_create(&label("conflict")).inc();
                    debug!(object = %key.name, "status write conflict; reading again");
                    ok = false;
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => {
                    self.metrics.writes.get_or_create(&label("error")).inc();
                    warn!(object = %format!("{} {}/{}", key.kind, key.namespace, key.name), error = %e, "status write failed; retrying");
                    ok = false;
                }
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(port: u16) -> Value {
        json!({"group": "", "kind": "Service", "name": "web", "port": port})
    }

    fn accepted(status: bool, reason: &str) -> Cond {
        Cond {
            type_: "Accepted",
            status,
            reason: reason.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn other_controllers_entries_are_kept_and_an_unchanged_status_is_not_written() {
        let want = vec![Parent {
            parent_ref: parent(80),
            conditions: vec![accepted(true, "Accepted")],
        }];
        let theirs = json!({"parentRef": {"name": "gw"}, "controllerName": "example.com/gw",
                            "conditions": [{"type": "Accepted", "status": "True"}]});
        let have = json!({"parents": [theirs]});
        let written = route_parents(&have, Some(2), &want).expect("differs");
        let list = written.as_array().expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!(list[0], theirs);
        assert_eq!(list[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(list[1]["conditions"][0]["observedGeneration"], 2);
        let have = json!({"parents": written});
        assert!(route_parents(&have, Some(2), &want).is_none());
        // A new generation with the same conditions is a change (observedGeneration).
        assert!(route_parents(&have, Some(3), &want).is_some());
    }

    #[test]
    fn last_transition_time_moves_only_when_the_status_does() {
        let want = vec![Parent {
            parent_ref: parent(80),
            conditions: vec![accepted(true, "Accepted")],
        }];
        let old = "2020-01-01T00:00:00Z";
        let have = json!({"parents": [{"parentRef": parent(80), "controllerName": CONTROLLER_NAME,
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "old",
                            "lastTransitionTime": old, "observedGeneration": 1}]}]});
        let new = route_parents(&have, Some(1), &want).expect("message changed");
        assert_eq!(new[0]["conditions"][0]["lastTransitionTime"], old);
        let flipped = vec![Parent {
            parent_ref: parent(80),
            conditions: vec![accepted(false, "Conflicted")],
        }];
        let new = route_parents(&have, Some(1), &flipped).expect("status changed");
        assert_ne!(new[0]["conditions"][0]["lastTransitionTime"], old);
    }

    #[test]
    fn conditions_name_the_field_missing_backends_and_conflicts() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                    spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                    metadata: {name: r, namespace: shop, generation: 4}\n\
                    spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  \
                    rules: [{backendRefs: [{name: missing, port: 80}]}]\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\n\
                    metadata: {name: t, namespace: shop}\n\
                    spec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n  \
                    rules: [{backendRefs: [{name: web, port: 80}]}]\n---\n\
                    apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                    metadata: {name: bad, namespace: shop}\n\
                    spec:\n  parentRefs: [{group: \"\", kind: Service, name: nope}]\n";
        let objects = mesh_policy::parse_documents(yaml, "t").expect("parse");
        let kept: Vec<Object> = objects
            .iter()
            .filter(|o| o.resource.name() != "bad")
            .cloned()
            .collect();
        let (compiled, unresolved) = mesh_policy::Compiled::compile_with(
            &kept,
            mesh_policy::Options {
                unresolved_backends: true,
            },
        );
        let compiled = compiled.expect("compiles");
        let errors = mesh_policy::validate(&objects);
        let excluded = BTreeSet::from(["HTTPRoute shop/bad".to_string()]);
        let d = desired(
            &objects,
            &Outcome {
                errors: &errors,
                excluded: &excluded,
                conflicts: compiled.conflicts(),
                unresolved: &unresolved,
            },
        );
        let route = |kind: &'static str, name: &str| match &d[&Key {
            kind,
            namespace: "shop".into(),
            name: name.into(),
        }] {
            Want::Route {
                generation,
                parents,
            } => (*generation, parents.clone()),
            Want::Policy { .. } => panic!("a route"),
        };
        let (generation, parents) = route("HTTPRoute", "r");
        assert_eq!(generation, Some(4));
        assert_eq!(parents.len(), 1);
        let [acc, res] = &parents[0].conditions[..] else {
            panic!("two conditions")
        };
        assert!(acc.status && acc.reason == "Accepted", "{acc:?}");
        assert!(!res.status && res.reason == "BackendNotFound", "{res:?}");
        assert!(
            res.message
                .contains("spec.rules[0].backendRefs[0].name: Service shop/missing does not exist"),
            "{res:?}"
        );
        let (_, parents) = route("TCPRoute", "t");
        let acc = &parents[0].conditions[0];
        assert!(!acc.status && acc.reason == REASON_CONFLICTED, "{acc:?}");
        assert!(acc.message.contains("HTTPRoute also attaches"), "{acc:?}");
        let (_, parents) = route("HTTPRoute", "bad");
        let acc = &parents[0].conditions[0];
        assert!(!acc.status && acc.reason == "NoMatchingParent", "{acc:?}");
        assert!(
            acc.message
                .contains("spec.parentRefs[0].name: Service shop/nope does not exist"),
            "{acc:?}"
        );
    }
}
