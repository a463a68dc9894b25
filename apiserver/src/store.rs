//! The in-memory store: objects by resource, one global resourceVersion counter, the bounded
//! event history that watches resume from, and the optional state file.
//!
//! Everything sits behind one mutex so that a write, its resourceVersion, its event and its
//! broadcast to open watches happen as one step: a watch that subscribes under the same lock can
//! never miss or double an event.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::resources::Registry;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the history and sent to watches.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub kind: EventKind,
    /// `group/plural`, the storage key.
    pub storage: String,
    /// The object after the change (before it, for a deletion).
    pub object: Value,
    /// The object before a modification, so that selector watches can turn a change that leaves
    /// the selection into DELETED as the real server does.
    pub old: Option<Value>,
}

/// What watches receive.
#[derive(Debug, Clone)]
pub enum Message {
    Event(Arc<Event>),
    /// History was compacted on request: open watches end so that clients reconnect and learn
    /// that their resourceVersion expired.
    Reset,
}

/// Objects of one resource by (namespace, name); "" is the namespace of cluster-scoped ones.
pub type Objects = BTreeMap<(String, String), Value>;

/// The whole mutable state of the server.
#[derive(Debug)]
pub struct Store {
    /// The last resourceVersion handed out.
    pub rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone: the events after it are gone.
    pub compacted: u64,
    pub objects: BTreeMap<String, Objects>,
    pub history: VecDeque<Arc<Event>>,
    pub window: usize,
    pub registry: Registry,
    pub state_file: Option<PathBuf>,
    pub tx: broadcast::Sender<Message>,
    /// The next ClusterIP to hand out (offset in 10.96.0.0/12).
    pub next_cluster_ip: u32,
}

/// Failures loading or saving the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing state file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Namespaces every cluster has.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

impl Store {
    /// A store with the initial namespaces, or with the objects of `state_file` if it exists.
    /// A loaded store starts its history anew one version past the saved one, so every
    /// resourceVersion a client kept from before the restart is expired.
    pub fn new(window: usize, state_file: Option<PathBuf>) -> Result<Self, StateError> {
        let (tx, _) = broadcast::channel(4096);
        let mut store = Store {
            rv: 0,
            compacted: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            window: window.max(1),
            registry: Registry::builtins(),
            state_file,
            tx,
            next_cluster_ip: 1,
        };
        let loaded = match &store.state_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|source| StateError::Read {
                    path: path.clone(),
                    source,
                })?;
                let saved: Value =
                    serde_json::from_str(&text).map_err(|source| StateError::Parse {
                        path: path.clone(),
                        source,
                    })?;
                store.load(&saved);
                true
            }
            _ => false,
        };
        if !loaded {
            let now = crate::util::rfc3339(crate::util::now_secs());
            for ns in INITIAL_NAMESPACES {
                store.rv += 1;
                let obj = json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "uid": crate::util::uid(), "resourceVersion": store.rv.to_string(),
                                 "creationTimestamp": now,
                                 "labels": {"kubernetes.io/metadata.name": ns}},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"}
                });
                store
                    .objects
                    .entry("/namespaces".into())
                    .or_default()
                    .insert((String::new(), ns.to_string()), obj);
            }
            store.compacted = store.rv;
        }
        Ok(store)
    }

    fn load(&mut self, saved: &Value) {
        let rv = saved["resourceVersion"].as_u64().unwrap_or(0);
        self.next_cluster_ip = saved["nextClusterIP"].as_u64().unwrap_or(1) as u32;
        for entry in saved["objects"].as_array().into_iter().flatten() {
            let storage = entry["storage"].as_str().unwrap_or_default().to_string();
            let obj = entry["object"].clone();
            let ns = crate::util::str_at(&obj, "metadata.namespace").to_string();
            let name = crate::util::str_at(&obj, "metadata.name").to_string();
            if storage == "apiextensions.k8s.io/customresourcedefinitions" {
                // A CRD that no longer parses stays stored but serves nothing, as before.
                let _ = self.registry.add_crd(&obj);
            }
            self.objects
                .entry(storage)
                .or_default()
                .insert((ns, name), obj);
        }
        self.rv = rv + 1;
        self.compacted = self.rv;
    }

    /// Writes every object to the state file (write and rename, so a crash leaves the old one).
    pub fn save(&self) -> Result<(), StateError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        // Serialized from borrows: a copy of every object per write would make each write of a
        // large state (the scale benchmark's 60,000 objects) cost seconds.
        #[derive(serde::Serialize)]
        struct Entry<'a> {
            storage: &'a str,
            object: &'a Value,
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Doc<'a> {
            resource_version: u64,
            #[serde(rename = "nextClusterIP")]
            next_cluster_ip: u32,
            objects: Vec<Entry<'a>>,
        }
        let doc = Doc {
            resource_version: self.rv,
            next_cluster_ip: self.next_cluster_ip,
            objects: self
                .objects
                .iter()
                .flat_map(|(storage, objs)| {
                    objs.values().map(move |object| Entry { storage, object })
                })
                .collect(),
        };
        let tmp = path.with_extension("tmp");
        let write = |p: &PathBuf, bytes: &[u8]| std::fs::write(p, bytes);
        let bytes = serde_json::to_vec(&doc).map_err(|source| StateError::Write {
            path: path.clone(),
            source: source.into(),
        })?;
        write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })
    }

    pub fn get(&self, storage: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(storage)
            .and_then(|o| o.get(&(ns.to_string(), name.to_string())))
    }

    /// Stores `obj` under the next resourceVersion and records the event.
    pub fn put(&mut self, storage: &str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let ns = crate::util::str_at(&obj, "metadata.namespace").to_string();
        let name = crate::util::str_at(&obj, "metadata.name").to_string();
        let old = self
            .objects
            .entry(storage.to_string())
            .or_default()
            .insert((ns, name), obj.clone());
        let kind = if old.is_some() {
            EventKind::Modified
        } else {
            EventKind::Added
        };
        self.record(kind, storage, obj.clone(), old);
        obj
    }

    /// Removes an object under the next resourceVersion and records the event.
    pub fn remove(&mut self, storage: &str, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .get_mut(storage)?
            .remove(&(ns.to_string(), name.to_string()))?;
        self.rv += 1;
        // The real server reports a deletion at the resourceVersion of the delete.
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(EventKind::Deleted, storage, obj.clone(), None);
        Some(obj)
    }

    fn record(&mut self, kind: EventKind, storage: &str, object: Value, old: Option<Value>) {
        let event = Arc::new(Event {
            rv: self.rv,
            kind,
            storage: storage.to_string(),
            object,
            old,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.window {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
        // No receiver is not an error: nobody is watching.
        let _ = self.tx.send(Message::Event(event));
    }

    /// Forgets all history: every resourceVersion handed out so far expires, and open watches
    /// end. Returns the new resourceVersion.
    pub fn compact(&mut self) -> u64 {
        self.rv += 1;
        self.compacted = self.rv;
        self.history.clear();
        let _ = self.tx.send(Message::Reset);
        self.rv
    }
}
