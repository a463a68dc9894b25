//! Mutual TLS between nodes: the identities of this node's workloads, the tunnel server on the
//! node's port 15008, and the choice, per upstream connection, of tunnel or plaintext.
//!
//! A captured connection goes through the tunnel when both ends are enrolled workloads (Pods of
//! the policy whose namespace or own label puts them in the mesh), the client runs on this node
//! and the destination on another: the client node's agent opens an HTTP/2 CONNECT stream,
//! authenticated with the client workload's certificate, to the destination node's agent, which
//! presents the destination workload's certificate, decides the connection by the policy's
//! authorization rules (with the client's identity) and delivers it to the pod. Anything else
//! goes in plaintext to its destination, as without `mesh:`.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use mesh_identity::{FileCa, Identities, IdentitiesConfig, SpiffeId, TrustDomain};
use mesh_policy::{Compiled, Identity};
use mesh_tunnel::{Decision, Inbound, TunnelClient, TunnelConfig, TunnelServer, TunnelStats};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{config, policy::Store, workers::Workers};

/// How often the identities held are compared with the policy's workloads.
const SYNC_EVERY: Duration = Duration::from_millis(250);

/// Where a tunneled connection goes, and as whom.
#[derive(Debug, Clone)]
pub struct Target {
    pub src_id: SpiffeId,
    pub dst_id: SpiffeId,
    /// The destination node's tunnel address.
    pub peer: SocketAddr,
}

/// Inbound decisions of the tunnel server.
#[derive(Debug, Default)]
pub struct InboundCounts {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// CONNECTs to an address that is no enrolled workload of this node.
    pub not_here: AtomicU64,
    /// Allowed, but the pod did not accept the connection.
    pub unreachable: AtomicU64,
}

/// The running mesh side of the agent.
pub struct Mesh {
    node_ip: IpAddr,
    port: u16,
    trust_domain: TrustDomain,
    identities: Identities,
    client: TunnelClient,
    server_stats: Arc<TunnelStats>,
    pub inbound: Arc<InboundCounts>,
    /// Tells the tunnel server to stop accepting and finish its connections.
    stop: watch::Sender<bool>,
    /// Turns true once the tunnel server has no connection left after `stop`.
    finished: watch::Receiver<bool>,
}

/// The tunnel's listening socket: the one a predecessor handed over when it listens on this
/// configuration's address (both agents then accept on it until the predecessor stops), else a
/// new one.
pub fn tunnel_listener(
    cfg: &config::Mesh,
    handed_over: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<std::net::TcpListener> {
    let addr = SocketAddr::new(cfg.node_ip, cfg.tunnel_port);
    if let Some(fd) = handed_over {
        let listener = std::net::TcpListener::from(fd);
        match listener.local_addr() {
            Ok(have) if have == addr => {
                listener.set_nonblocking(true)?;
                info!(%addr, "mTLS tunnel listener taken over from the running agent");
                return Ok(listener);
            }
            have => {
                warn!(?have, want = %addr, "the running agent's tunnel listener is on another address; binding anew")
            }
        }
    }
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("mesh.node_ip / mesh.tunnel_port: cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("node_ip", &self.node_ip)
            .field("port", &self.port)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Loads the CA, starts the tunnel server on `listener` (see [`tunnel_listener`]) on every
    /// worker, as the data plane's other listeners (each worker accepts from a duplicate of the
    /// socket, and a tunnel connection and its streams stay on the worker that accepted it), and
    /// keeps the identities of this node's enrolled workloads in step with `policy`.
    /// `http` serves tunneled HTTP whose requests the policy's HTTP deny rules may refuse by
    /// the source's identity; `idle` is the idle timeout of connections.
    pub async fn start(
        cfg: &config::Mesh,
        listener: std::net::TcpListener,
        workers: &Workers,
        policy: Store,
        connect_timeout: Duration,
        http: mesh_http::Proxy,
        idle: Duration,
    ) -> anyhow::Result<Arc<Mesh>> {
        let trust_domain = TrustDomain::new(&cfg.trust_domain)
            .map_err(|e| anyhow::anyhow!("mesh.trust_domain: {e}"))?;
        let ca = FileCa::load(trust_domain.clone(), &cfg.ca_cert, &cfg.ca_key)
            .with_context(|| "mesh.ca_cert / mesh.ca_key".to_string())?;
        let bundle = ca.bundle();
        let identities = Identities::new(
            Arc::new(ca),
            IdentitiesConfig {
                lifetime: cfg.certificate_lifetime,
                ..IdentitiesConfig::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("mesh.certificate_lifetime: {e}"))?;
        let tunnel = TunnelConfig {
            connect_timeout,
            ..TunnelConfig::default()
        };
        let client = TunnelClient::new(identities.clone(), bundle.clone(), tunnel.clone())
            .map_err(|e| anyhow::anyhow!("tunnel client: {e}"))?;
        let inbound = Arc::new(InboundCounts::default());
        let handler = Handler {
            policy: policy.clone(),
            node_ip: cfg.node_ip,
            trust_domain: trust_domain.clone(),
            counts: inbound.clone(),
            connect_timeout,
            http,
            idle,
        };
        let server = TunnelServer::new(identities.clone(), &bundle, tunnel, handler)
            .map_err(|e| anyhow::anyhow!("tunnel server: {e}"))?;
        let server_stats = server.stats().clone();
        let addr = SocketAddr::new(cfg.node_ip, cfg.tunnel_port);
        let sockets = (1..workers.len())
            .map(|_| listener.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .with_context(|| format!("mTLS tunnel listener on {addr}"))?;
        let mut sockets = std::iter::once(listener).chain(sockets);
        info!(%addr, trust_domain = %trust_domain, "mTLS tunnel listening");
        let (stop, stopped) = watch::channel(false);
        let (finish, finished) = watch::channel(false);
        let serving = workers.spawn_each(|_| {
            let (socket, server, stopped) = (sockets.next(), server.clone(), stopped.clone());
            async move {
                let Some(socket) = socket else { return };
                match TcpListener::from_std(socket) {
                    Ok(listener) => server.serve_until(listener, stopped).await,
                    Err(e) => error!(%addr, error = %e, "registering the mTLS tunnel listener with a worker"),
                }
            }
        });
        tokio::spawn(async move {
            for worker in serving {
                let _ = worker.await;
            }
            let _ = finish.send(true);
        });
        let mesh = Arc::new(Mesh {
            node_ip: cfg.node_ip,
            port: cfg.tunnel_port,
            trust_domain,
            identities,
            client,
            server_stats,
            inbound,
            stop,
            finished,
        });
        // The first certificates before the agent says it is ready.
        mesh.sync(&policy.current()).await;
        let m = mesh.clone();
        tokio::spawn(async move {
            let mut seen = policy.current();
            loop {
                tokio::time::sleep(SYNC_EVERY).await;
                let now = policy.current();
                if !Arc::ptr_eq(&now, &seen) {
                    m.sync(&now).await;
                    seen = now;
                }
            }
        });
        Ok(mesh)
    }

    /// Stops accepting tunnel connections (a successor holding the same socket takes the new
    /// ones) and tells the open ones to finish (GOAWAY: their streams in progress go on, new
    /// streams go to a new connection). Returns once none is left or after `grace`, with the
    /// number of streams still open then.
    pub async fn stop_serving(&self, grace: Duration) -> u64 {
        let _ = self.stop.send(true);
        let mut finished = self.finished.clone();
        let _ = tokio::time::timeout(grace, finished.wait_for(|f| *f)).await;
        let left = self.server_stats.snapshot().streams_open;
        if left > 0 {
            warn!(
                streams = left,
                ?grace,
                "tunnel streams still open at the end of the drain period"
            );
        } else {
            info!("tunnel server finished: no connection left");
        }
        left
    }

    /// The identity of an enrolled workload at `ip`, if it runs on this node (`local`) or on
    /// another one (`!local`), with its node's IP.
    fn workload_id(
        &self,
        policy: &Compiled,
        ip: IpAddr,
        local: bool,
    ) -> Option<(SpiffeId, Option<IpAddr>)> {
        let w = policy.workload(ip)?;
        if !w.enrolled || (w.node_ip == Some(self.node_ip)) != local {
            return None;
        }
        let id = SpiffeId::new(self.trust_domain.clone(), &w.namespace, &w.service_account).ok()?;
        Some((id, w.node_ip))
    }

    /// Holds a certificate for every enrolled workload identity of this node, and none other.
    async fn sync(&self, policy: &Compiled) {
        let wanted: BTreeSet<SpiffeId> = policy
            .workloads()
            .filter_map(|w| self.workload_id(policy, *w.ips.first()?, true))
            .map(|(id, _)| id)
            .collect();
        for id in &wanted {
            if self.identities.current(id).is_none()
                && let Err(e) = self.identities.add(id.clone()).await
            {
                warn!(%id, error = %e, "no certificate for this workload identity");
            }
        }
        for (id, _) in self.identities.expiries() {
            if !wanted.contains(&id) {
                self.identities.remove(&id);
                info!(%id, "identity no longer on this node: certificate dropped");
            }
        }
    }

    /// The tunnel for a connection from `src` (a client pod of this node) to endpoint `ep`,
    /// when both are enrolled and `ep` runs on another node; `None`: plaintext.
    pub fn target(&self, policy: &Compiled, src: IpAddr, ep: SocketAddr) -> Option<Target> {
        let (dst_id, node) = self.workload_id(policy, ep.ip(), false)?;
        let (src_id, _) = self.workload_id(policy, src, true)?;
        Some(Target {
            src_id,
            dst_id,
            peer: SocketAddr::new(node?, self.port),
        })
    }

    /// Opens a tunnel stream to `ep`.
    pub async fn connect(
        &self,
        t: &Target,
        ep: SocketAddr,
    ) -> io::Result<mesh_tunnel::TunnelStream> {
        self.client
            .connect(&t.src_id, &t.dst_id, t.peer, ep)
            .await
            .map_err(|e| {
                let kind = match &e {
                    mesh_tunnel::TunnelError::Refused { status: 403, .. } => {
                        io::ErrorKind::PermissionDenied
                    }
                    mesh_tunnel::TunnelError::Refused { .. } => io::ErrorKind::ConnectionRefused,
                    mesh_tunnel::TunnelError::ConnectTimeout { .. }
                    | mesh_tunnel::TunnelError::OpenTimeout { .. } => io::ErrorKind::TimedOut,
                    _ => io::ErrorKind::Other,
                };
                io::Error::new(kind, format!("tunnel to {} via {}: {e}", ep, t.peer))
            })
    }

    /// The client side's counters (connections this node opened).
    pub fn client_stats(&self) -> &Arc<TunnelStats> {
        self.client.stats()
    }

    /// The server side's counters (connections other nodes opened to this one).
    pub fn server_stats(&self) -> &Arc<TunnelStats> {
        &self.server_stats
    }

    /// `(identity, seconds until its certificate expires)` for each identity held.
    pub fn expiries(&self) -> Vec<(SpiffeId, f64)> {
        let now = std::time::SystemTime::now();
        self.identities
            .expiries()
            .into_iter()
            .map(|(id, at)| {
                let left = at.duration_since(now).map_or(0.0, |d| d.as_secs_f64());
                (id, left)
            })
            .collect()
    }
}

/// Decides each CONNECT that reaches this node's tunnel server.
struct Handler {
    policy: Store,
    node_ip: IpAddr,
    trust_domain: TrustDomain,
    counts: Arc<InboundCounts>,
    connect_timeout: Duration,
    http: mesh_http::Proxy,
    idle: Duration,
}

/// The in-memory pipe between the tunnel stream and the HTTP check of a gated connection.
const GATE_PIPE: usize = 256 * 1024;

impl mesh_tunnel::InboundHandler for Handler {
    type Upstream = tokio::io::DuplexStream;

    fn handle(
        &self,
        inbound: Inbound,
    ) -> impl std::future::Future<Output = Decision<tokio::io::DuplexStream>> + Send {
        let policy = self.policy.current();
        let counts = self.counts.clone();
        let timeout = self.connect_timeout;
        let http = self.http.clone();
        let idle = self.idle;
        let here = policy
            .workload(inbound.dst.ip())
            .filter(|w| w.enrolled && w.node_ip == Some(self.node_ip))
            .map(|w| w.principal(self.trust_domain.as_str()));
        async move {
            let src = inbound.peer.to_string();
            let Some(dst_principal) = here else {
                counts.not_here.fetch_add(1, Ordering::Relaxed);
                warn!(src_principal = %src, dst = %inbound.dst, "tunnel CONNECT to no enrolled workload of this node; refused");
                return Decision::Refuse {
                    status: 404,
                    reason: format!("{} is no enrolled workload of this node", inbound.dst),
                };
            };
            let identity = Identity::from_spiffe(&src);
            let decision = policy.authorize_inbound(
                identity.as_ref(),
                inbound.src_addr.ip(),
                inbound.dst,
                None,
            );
            if !decision.allowed {
                counts.denied.fetch_add(1, Ordering::Relaxed);
                let rule = decision.rule.unwrap_or("default");
                info!(
                    target: "mesh_agent::access",
                    src_principal = %src,
                    dst_principal = %dst_principal,
                    dst = %inbound.dst,
                    rule,
                    "tunneled connection denied"
                );
                return Decision::Refuse {
                    status: 403,
                    reason: format!("denied by {rule}"),
                };
            }
            match tokio::time::timeout(timeout, TcpStream::connect(inbound.dst)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    counts.allowed.fetch_add(1, Ordering::Relaxed);
                    info!(
                        target: "mesh_agent::access",
                        src_principal = %src,
                        dst_principal = %dst_principal,
                        dst = %inbound.dst,
                        rule = decision.rule.unwrap_or("default"),
                        "tunneled connection accepted"
                    );
                    // HTTP deny rules that name sources are decided here, per request, with
                    // the identity only this end knows: such a policy puts the connection
                    // through the HTTP check. Without one, bytes go straight to the pod.
                    let by_identity = policy
                        .settings()
                        .authorization
                        .http
                        .iter()
                        .any(|rule| !rule.source.is_empty());
                    if !by_identity {
                        return Decision::Deliver(stream);
                    }
                    let (near, far) = tokio::io::duplex(GATE_PIPE);
                    tokio::spawn(crate::tunnel::deliver_gated(
                        far,
                        stream,
                        http,
                        identity,
                        inbound.src_addr,
                        inbound.dst,
                        idle,
                    ));
                    Decision::Accept(near)
                }
                Ok(Err(e)) => {
                    counts.unreachable.fetch_add(1, Ordering::Relaxed);
                    Decision::Refuse {
                        status: 503,
                        reason: format!("{}: {e}", inbound.dst),
                    }
                }
                Err(_) => {
                    counts.unreachable.fetch_add(1, Ordering::Relaxed);
                    Decision::Refuse {
                        status: 504,
                        reason: format!("{}: connect timed out", inbound.dst),
                    }
                }
            }
        }
    }
}
