//! Watches: newline-delimited JSON events from a resourceVersion, resumed from the bounded
//! history, with bookmarks, timeouts and 410 Gone once the requested version was compacted away.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::api::{ListOptions, in_scope, render};
use crate::error::{ApiError, Cause, Subject};
use crate::output::Shape;
use crate::resources::ResourceType;
use crate::store::{Event, EventKind, Message, Store};

/// How an expired resourceVersion is reported to a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpiredAs {
    /// HTTP 200 and one ERROR event carrying the 410 Status, as the real server's watch cache.
    #[default]
    Event,
    /// An HTTP 410 response with the Status as body.
    Http,
}

/// Query parameters of a watch.
#[derive(Debug, Default)]
pub struct WatchOptions {
    pub list: ListOptions,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
    pub send_initial_events: Option<bool>,
    /// Objects, metadata only, or one-row Tables, as the Accept header asked.
    pub shape: Shape,
}

/// Server-wide watch settings.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// When the server ends a watch that asked for no timeout.
    pub default_timeout: Duration,
    pub bookmark_interval: Duration,
    pub expired_as: ExpiredAs,
}

fn line(kind: &str, object: Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn expired_status(requested: u64, compacted: u64) -> ApiError {
    ApiError::Expired(format!(
        "too old resource version: {requested} ({compacted})"
    ))
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
    )
}

/// The line an event becomes for this watch, if any: selector watches see objects entering and
/// leaving the selection as ADDED and DELETED.
fn event_line(rt: &ResourceType, ns: &str, opts: &WatchOptions, e: &Event) -> Option<Bytes> {
    if e.storage != rt.storage() || !in_scope(ns, &e.object) {
        return None;
    }
    let sel = |o: &Value| opts.list.labels.matches(o) && opts.list.fields.matches(o);
    let now = sel(&e.object);
    let kind = match e.kind {
        EventKind::Added if now => EventKind::Added,
        EventKind::Deleted if now => EventKind::Deleted,
        EventKind::Modified => match (e.old.as_ref().is_some_and(sel), now) {
            (true, true) => EventKind::Modified,
            (false, true) => EventKind::Added,
            (true, false) => EventKind::Deleted,
            (false, false) => return None,
        },
        _ => return None,
    };
    Some(line(
        kind.as_str(),
        opts.shape.item(rt, render(rt, &e.object)),
    ))
}

fn ends_with_crd(rt: &ResourceType, e: &Event) -> bool {
    e.kind == EventKind::Deleted
        && e.storage == "apiextensions.k8s.io/customresourcedefinitions"
        && rt.crd.as_deref() == Some(crate::util::str_at(&e.object, "metadata.name"))
}

/// What the handler needs to answer a watch.
pub enum Start {
    /// Stream these bytes.
    Stream(mpsc::Receiver<Bytes>),
    /// Answer with this error instead.
    Error(ApiError),
}

/// Starts a watch. Must be called with the store locked, so that the subscription and the
/// snapshot of history agree.
pub fn start(
    store: &Store,
    rt: ResourceType,
    ns: String,
    opts: WatchOptions,
    settings: &WatchSettings,
) -> Start {
    let requested = opts
        .list
        .resource_version
        .as_deref()
        .filter(|r| !r.is_empty() && *r != "0");
    let send_initial = opts.send_initial_events == Some(true);
    if opts.send_initial_events.is_some() {
        let mut causes = Vec::new();
        if opts.list.resource_version_match.as_deref() != Some("NotOlderThan") {
            causes.push(Cause {
                reason: "FieldValueForbidden",
                message: "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan".into(),
                field: "resourceVersionMatch".into(),
            });
        }
        if !opts.bookmarks && send_initial {
            causes.push(Cause {
                reason: "FieldValueForbidden",
                message:
                    "Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true"
                        .into(),
                field: "allowWatchBookmarks".into(),
            });
        }
        if !causes.is_empty() {
            return Start::Error(ApiError::Invalid {
                subject: Subject {
                    group: "meta.k8s.io".into(),
                    kind: "ListOptions".into(),
                    resource: String::new(),
                    name: String::new(),
                },
                causes,
            });
        }
    }
    let mut initial: Vec<Bytes> = Vec::new();
    let (tx, rx) = mpsc::channel(256);
    let start_rv = store.rv;
    match requested {
        Some(r) if !send_initial => {
            let Ok(r) = r.parse::<u64>() else {
                return Start::Error(ApiError::BadRequest(format!(
                    "invalid resource version {r:?}"
                )));
            };
            if r < store.compacted {
                let err = expired_status(r, store.compacted);
                if settings.expired_as == ExpiredAs::Http {
                    return Start::Error(err);
                }
                // The real watch cache answers 200 and reports expiry as the first event.
                let _ = tx.try_send(line("ERROR", err.status()));
                return Start::Stream(rx);
            }
            initial.extend(
                store
                    .history
                    .iter()
                    .filter(|e| e.rv > r)
                    .filter_map(|e| event_line(&rt, &ns, &opts, e)),
            );
        }
        _ => {
            // No version (or "0"): the current state as ADDED events, then changes.
            if let Some(objs) = store.objects.get(&rt.storage()) {
                initial.extend(
                    objs.values()
                        .filter(|o| {
                            in_scope(&ns, o)
                                && opts.list.labels.matches(o)
                                && opts.list.fields.matches(o)
                        })
                        .map(|o| line("ADDED", opts.shape.item(&rt, render(&rt, o)))),
                );
            }
            if send_initial {
                initial.push(bookmark(&rt, start_rv, true));
            }
        }
    }
    let brx = store.tx.subscribe();
    let timeout = opts.timeout.unwrap_or(settings.default_timeout);
    let interval = settings.bookmark_interval;
    tokio::spawn(run(
        tx,
        brx,
        initial,
        Stream {
            rt,
            ns,
            opts,
            start_rv,
            timeout,
            interval,
        },
    ));
    Start::Stream(rx)
}

struct Stream {
    rt: ResourceType,
    ns: String,
    opts: WatchOptions,
    start_rv: u64,
    timeout: Duration,
    interval: Duration,
}

async fn run(
    tx: mpsc::Sender<Bytes>,
    mut brx: broadcast::Receiver<Message>,
    initial: Vec<Bytes>,
    s: Stream,
) {
    for l in initial {
        if tx.send(l).await.is_err() {
            return;
        }
    }
    let deadline = tokio::time::sleep(s.timeout);
    tokio::pin!(deadline);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + s.interval, s.interval);
    // Every event up to here has been seen (delivered or filtered out), so a bookmark may say so.
    let mut seen = s.start_rv;
    loop {
        let out = tokio::select! {
            _ = &mut deadline => break,
            _ = tx.closed() => break,
            _ = ticker.tick(), if s.opts.bookmarks => Some(bookmark(&s.rt, seen, false)),
            msg = brx.recv() => match msg {
                Ok(Message::Event(e)) => {
                    if e.rv <= seen {
                        continue;
                    }
                    seen = e.rv;
                    if ends_with_crd(&s.rt, &e) {
                        // The real server ends watches of a resource whose CRD is deleted.
                        break;
                    }
                    event_line(&s.rt, &s.ns, &s.opts, &e)
                }
                Ok(Message::Reset) | Err(broadcast::error::RecvError::Closed) => break,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow to keep up: like the real server, end with an error so the client
                    // relists.
                    let _ = tx.send(line("ERROR", expired_status(seen, seen + 1).status())).await;
                    break;
                }
            },
        };
        if let Some(l) = out
            && tx.send(l).await.is_err()
        {
            break;
        }
    }
}
