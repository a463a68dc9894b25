//! Leader election: exactly one agent of the cluster writes route and MeshPolicy status, the one
//! holding a `coordination.k8s.io/v1` Lease in the agent's namespace.
//!
//! The algorithm is client-go's (`tools/leaderelection`): the holder renews `renewTime` every
//! `duration / 5`; another agent takes the Lease only when it is free (`holderIdentity` unset,
//! as a leader leaves it on a clean stop) or when it has seen no change to it for a whole
//! `leaseDurationSeconds`, measured on its own clock from when it saw the last change, so that
//! clock skew between nodes does not matter. Every write carries the resourceVersion it read: of
//! two agents trying at once one gets 409 Conflict and stays a follower. A leader that cannot
//! renew stops writing `2/3 * duration` after its last successful renewal, before any other
//! agent can consider the Lease expired.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config;

/// How long a release may take on shutdown before the agent exits anyway.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/status` shows about the election.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub leader: bool,
    /// `holderIdentity` as last read; `None` when free or not read yet.
    pub holder: Option<String>,
    pub identity: String,
    pub lease: String,
    pub last_error: Option<String>,
}

struct State {
    view: View,
    /// While leader: when the leadership lapses unless renewed.
    valid_until: Option<Instant>,
}

/// One agent's side of the election. [`Elector::run`] keeps it going; [`Elector::is_leader`]
/// is checked before every status write.
pub struct Elector {
    api: Api<Lease>,
    cfg: config::Lease,
    state: Mutex<State>,
    gauge: Gauge,
    /// `true` while leader; the status writer waits on it.
    leading: watch::Sender<bool>,
    /// Wakes [`Elector::run`] before its period: the holder released the Lease (handover).
    retry: tokio::sync::Notify,
}

/// The Lease as this agent last saw it change.
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

impl Elector {
    pub fn new(client: Client, cfg: config::Lease, gauge: Gauge) -> Arc<Self> {
        let view = View {
            identity: cfg.identity.clone(),
            lease: format!("{}/{}", cfg.namespace, cfg.name),
            ..View::default()
        };
        Arc::new(Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            state: Mutex::new(State {
                view,
                valid_until: None,
            }),
            gauge,
            leading: watch::channel(false).0,
            retry: tokio::sync::Notify::new(),
        })
    }

    fn period(&self) -> Duration {
        (self.cfg.duration / 5).max(Duration::from_millis(200))
    }

    /// Leader, and the last renewal recent enough that no other agent can have taken over.
    pub fn is_leader(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.view.leader && s.valid_until.is_some_and(|t| Instant::now() < t)
    }

    /// Changes to leadership, for the status writer.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    pub fn view(&self) -> View {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = s.view.clone();
        v.leader = v.leader && s.valid_until.is_some_and(|t| Instant::now() < t);
        v
    }

    fn set(&self, leader: bool, holder: Option<String>, valid_until: Option<Instant>) {
        let was = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let was = s.view.leader;
            s.view.leader = leader;
            s.view.holder = holder.clone();
            s.view.last_error = None;
            s.valid_until = valid_until;
            was
        };
        if was != leader {
            if leader {
                info!(lease = %self.view().lease, identity = %self.cfg.identity, "status Lease acquired: this agent writes status");
            } else {
                info!(lease = %self.view().lease, holder = ?holder, "status Lease not held: another agent writes status");
            }
        }
        self.gauge.set(i64::from(leader));
        self.leading.send_replace(leader);
    }

    /// Tries again now rather than at the next period: after a handover the predecessor has
    /// just released the Lease, so the status writer changes at once.
    pub fn retry_now(&self) {
        self.retry.notify_one();
    }

    /// Tries to acquire or renew the Lease every `duration / 5`, until dropped.
    pub async fn run(self: Arc<Self>) {
        let renew_deadline = self.cfg.duration * 2 / 3;
        let mut observed: Option<Observed> = None;
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew(&mut observed).await {
                Ok((true, holder)) => self.set(true, holder, Some(started + renew_deadline)),
                Ok((false, holder)) => self.set(false, holder, None),
                Err(e) => {
                    warn!(error = %e, lease = %self.view().lease, "status Lease: request failed");
                    let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    s.view.last_error = Some(e.to_string());
                    let lapsed = s.valid_until.is_none_or(|t| Instant::now() >= t);
                    drop(s);
                    if lapsed {
                        let holder = self.view().holder;
                        self.set(false, holder, None);
                    }
                }
            }
            let wait = self.period();
            tokio::select! {
                () = tokio::time::sleep(wait.saturating_sub(started.elapsed())) => {}
                () = self.retry.notified() => {}
            }
        }
    }

    /// One step; `(leader, holder)`.
    async fn try_acquire_or_renew(
        &self,
        observed: &mut Option<Observed>,
    ) -> Result<(bool, Option<String>), kube::Error> {
        let me = self.cfg.identity.as_str();
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.cfg.duration.as_secs()).unwrap_or(i32::MAX);
        let lease = match self.api.get_opt(&self.cfg.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.to_string()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(created) => {
                        *observed = Some(Observed {
                            resource_version: created.metadata.resource_version,
                            at: Instant::now(),
                        });
                        Ok((true, Some(me.to_string())))
                    }
                    // Another agent created it first: a follower until it expires.
                    Err(kube::Error::Api(s)) if s.is_already_exists() => Ok((false, None)),
                    Err(e) => Err(e),
                };
            }
            Some(lease) => lease,
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let rv = lease.metadata.resource_version.clone();
        if observed.as_ref().is_none_or(|o| o.resource_version != rv) {
            *observed = Some(Observed {
                resource_version: rv,
                at: Instant::now(),
            });
        }
        let held_for = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.cfg.duration, Duration::from_secs);
        let mine = holder.as_deref() == Some(me);
        let expired = observed
            .as_ref()
            .is_some_and(|o| o.at.elapsed() >= held_for);
        if !mine && holder.is_some() && !expired {
            return Ok((false, holder));
        }
        let mut next = lease;
        let mut spec = spec;
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(me.to_string());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        next.spec = Some(spec);
        // The resourceVersion read above makes this conditional: 409 if anyone wrote since.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                *observed = Some(Observed {
                    resource_version: written.metadata.resource_version,
                    at: Instant::now(),
                });
                Ok((true, Some(me.to_string())))
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok((false, holder)),
            Err(e) => Err(e),
        }
    }

    /// On a clean stop: frees the Lease if this agent holds it, so that another agent takes
    /// over at its next try instead of waiting for the Lease to expire. Call after status
    /// writing has stopped.
    pub async fn release(&self) {
        let was_leader = self.is_leader();
        self.set(false, None, None);
        if !was_leader {
            return;
        }
        let me = self.cfg.identity.clone();
        let step = async {
            let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
                return Ok::<_, kube::Error>(false);
            };
            let Some(spec) = lease.spec.as_mut() else {
                return Ok(false);
            };
            if spec.holder_identity.as_deref() != Some(me.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &lease)
                .await?;
            Ok(true)
        };
        match tokio::time::timeout(RELEASE_TIMEOUT, step).await {
            Ok(Ok(true)) => info!(lease = %self.view().lease, "status Lease released"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "status Lease not released; it expires after its duration")
            }
            Err(_) => warn!("status Lease not released in time; it expires after its duration"),
        }
    }
}
