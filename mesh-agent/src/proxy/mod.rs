//! Accepting captured connections and forwarding them to their original destination.
//!
//! The capture program assigns a pod's SYN to one of the transparent listeners opened here. The
//! kernel then builds the accepted socket with the pod's real tuple, so `local_addr()` of that
//! socket is the destination the pod asked for ([`OrigDst`]).
pub mod balance;
pub mod forward;

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_inspect::{Detection, MAX_INSPECT_LEN, detect};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};
use tracing::{Instrument, Span, debug, field::Empty, info, info_span, warn};

use crate::{
    metrics::{TcpLabels, TcpMetrics},
    policy::Store,
};
use balance::{Balancer, random_u32};

/// The destination the client connected to, before capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst(pub SocketAddr);

/// The client's address as the agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the {family} transparent listener on port {port}: {source}")]
    Listen {
        family: &'static str,
        port: u16,
        source: std::io::Error,
    },
}

/// Log target of the per-connection access log lines (`access_log: false` turns it off).
pub const ACCESS: &str = "mesh_agent::access";

/// Listen backlog; SYN bursts from many pods land here.
const BACKLOG: i32 = 4096;

/// The IPv4 and IPv6 transparent listeners.
pub struct Listeners {
    pub v4: TcpListener,
    pub v6: Option<TcpListener>,
}

impl Listeners {
    /// Binds on loopback: the capture program hands connections over with `bpf_sk_assign`, so the
    /// listeners need not be reachable from any other address.
    pub fn bind(port: u16) -> Result<Self, Error> {
        let v4 = transparent_listener(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
            .map_err(|source| Error::Listen {
                family: "IPv4",
                port,
                source,
            })?;
        let v6 = match transparent_listener(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::LOCALHOST,
            port,
            0,
            0,
        ))) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "no IPv6 listener (is IPv6 disabled?); IPv6 capture follows the fail mode");
                None
            }
        };
        Ok(Listeners { v4, v6 })
    }
}

fn transparent_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
        sock.set_ip_transparent_v6(true)?;
    } else {
        sock.set_ip_transparent_v4(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    TcpListener::from_std(sock.into())
}

/// Proxy settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub splice: bool,
    /// The listeners' own port: a connection whose original destination is a listener itself
    /// was not captured and is refused (it would loop).
    pub listen_port: u16,
    /// Different endpoints tried before a connection is given up.
    pub connect_attempts: usize,
    pub policy: Store,
    pub balancer: Arc<Balancer>,
    pub metrics: Arc<TcpMetrics>,
    /// Serves connections detected as HTTP/1 or HTTP/2 prior knowledge.
    pub http: mesh_http::Proxy,
}

/// Connection counts shared by all accept loops.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub active: AtomicUsize,
    pub upstream_failures: AtomicU64,
    drained: Notify,
}

impl Stats {
    /// Waits until no connection is open, or `grace` has passed; returns how many are still open.
    pub async fn drain(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.drained.notified();
            let n = self.active.load(Ordering::Acquire);
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active.load(Ordering::Acquire);
            }
        }
    }
}

/// Accepts until `stop` flips, spawning one task per connection.
pub async fn serve(
    listener: TcpListener,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    stats.active.fetch_add(1, Ordering::AcqRel);
                    let (settings, stats) = (settings.clone(), stats.clone());
                    tokio::spawn(async move {
                        handle(stream, ClientAddr(peer), &settings, &stats).await;
                        if stats.active.fetch_sub(1, Ordering::AcqRel) == 1 {
                            stats.drained.notify_waiters();
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// What the first bytes said, and the bytes themselves (sent upstream unchanged before forwarding).
struct Inspected {
    detection: Detection,
    prefix: Vec<u8>,
}

/// Reads the client's first bytes until `detect` settles, the inspection limit is reached, the
/// client closes its side, or `timeout` passes (a server-speaks-first protocol): then it is opaque.
async fn inspect(client: &TcpStream, timeout: Duration) -> std::io::Result<Inspected> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut prefix = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match detect(&prefix) {
            Detection::NeedMore if prefix.len() < MAX_INSPECT_LEN => {}
            Detection::NeedMore => {
                return Ok(Inspected {
                    detection: Detection::Opaque,
                    prefix,
                });
            }
            detection => return Ok(Inspected { detection, prefix }),
        }
        if tokio::time::timeout_at(deadline, client.readable())
            .await
            .is_err()
        {
            return Ok(Inspected {
                detection: Detection::Opaque,
                prefix,
            });
        }
        let room = (MAX_INSPECT_LEN - prefix.len()).min(chunk.len());
        match client.try_read(&mut chunk[..room]) {
            Ok(0) => {
                return Ok(Inspected {
                    detection: Detection::Opaque,
                    prefix,
                });
            }
            Ok(n) => prefix.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

fn protocol_name(d: &Detection) -> &'static str {
    match d {
        Detection::Tls(_) => "tls",
        Detection::TlsMalformed(_) => "tls-malformed",
        Detection::Http1(_) => "http1",
        Detection::H2PriorKnowledge => "h2c",
        Detection::Opaque | Detection::NeedMore => "tcp",
    }
}

/// Metric labels of a connection: its Service (or `none`) and detected protocol.
fn labels(service: Option<&mesh_policy::ServicePort>, detection: &Detection) -> TcpLabels {
    TcpLabels {
        service: service.map_or_else(|| "none".to_string(), |sp| sp.service.to_string()),
        protocol: protocol_name(detection).to_string(),
    }
}

/// Hands an HTTP connection to the HTTP proxy; logs and counts it like any connection.
async fn serve_http(
    client: TcpStream,
    inspected: Inspected,
    src: ClientAddr,
    dst: OrigDst,
    settings: &Settings,
    service: Option<&mesh_policy::ServicePort>,
) {
    let started = Instant::now();
    let h2 = matches!(inspected.detection, Detection::H2PriorKnowledge);
    let labels = labels(service, &inspected.detection);
    let m = &settings.metrics;
    m.opened.get_or_create(&labels).inc();
    m.active.get_or_create(&labels).inc();
    let r = settings
        .http
        .serve(client, inspected.prefix, src.0, dst.0, h2)
        .await;
    m.active.get_or_create(&labels).dec();
    m.closed.get_or_create(&labels).inc();
    let ms = started.elapsed().as_millis() as u64;
    match r {
        Ok(s) => {
            info!(target: ACCESS, requests = s.requests, duration_ms = ms, "connection closed")
        }
        Err(e) => {
            info!(target: ACCESS, error = %e, duration_ms = ms, "connection ended with an error")
        }
    }
}

/// Resets the client when it is closed (it was armed at accept; this says why it is closed).
fn reset(client: &TcpStream) {
    forward::arm_reset(client);
}

async fn handle(client: TcpStream, src: ClientAddr, settings: &Settings, stats: &Stats) {
    let dst = match client.local_addr() {
        Ok(a) => OrigDst(a),
        Err(e) => {
            warn!(%src, error = %e, "no original destination");
            return;
        }
    };
    // The policy this connection keeps for its whole life, even across reloads.
    let policy = settings.policy.current();
    let span =
        info_span!("conn", %src, %dst, proto = Empty, sni = Empty, route = Empty, upstream = Empty);
    async move {
        if dst.0.port() == settings.listen_port && dst.0.ip().is_loopback() {
            warn!("connection to the listener itself, not a captured one; closing");
            return;
        }
        let started = Instant::now();
        let _ = client.set_nodelay(true);
        // Until the connection ends cleanly, the agent dying resets it (forward.rs). It is
        // disarmed before the HTTP proxy takes it: that closes connections on purpose
        // (keep-alive limits, `Connection: close`) and a reset would drop the queued response.
        forward::arm_reset(&client);

        // The first bytes are read unless a TCPRoute decides without them (its protocol may be
        // server-speaks-first) or the Service port declares a protocol that is neither HTTP nor
        // TLS: HTTP needs them even without routes, for header injection.
        let service = policy.service_port(dst.0);
        let tcp_route = policy.route_tcp(dst.0);
        let declared_opaque = service.is_some_and(mesh_policy::ServicePort::declares_opaque);
        let inspected = if tcp_route.is_some() || declared_opaque {
            Inspected {
                detection: Detection::Opaque,
                prefix: Vec::new(),
            }
        } else {
            match inspect(&client, policy.settings().protocol_detection_timeout).await {
                Ok(i) => i,
                Err(e) => {
                    info!(error = %e, "client failed before sending its first bytes");
                    return;
                }
            }
        };
        let span = Span::current();
        span.record("proto", protocol_name(&inspected.detection));
        if let Detection::Http1(_) | Detection::H2PriorKnowledge = inspected.detection {
            forward::disarm_reset(&client);
            serve_http(client, inspected, src, dst, settings, service).await;
            return;
        }
        let decision = match &inspected.detection {
            Detection::Tls(hello) => {
                if let Some(sni) = &hello.sni {
                    span.record("sni", sni.as_str());
                }
                policy.route_tls(dst.0, hello.sni.as_deref())
            }
            _ => tcp_route,
        };
        let endpoints: Vec<SocketAddr> = match &decision {
            Some(d) => {
                span.record("route", d.route.to_string());
                match d.pick(random_u32()) {
                    Some(b) if b.is_routable() => b.endpoints.clone(),
                    _ => {
                        warn!("the route has no backend with endpoints; resetting the client");
                        reset(&client);
                        return;
                    }
                }
            }
            // No route: the original destination. For a Service that is its own endpoints.
            None => match service {
                Some(sp) if !sp.endpoints.is_empty() => sp.endpoints.clone(),
                _ => vec![dst.0],
            },
        };
        let labels = labels(service, &inspected.detection);
        let m = &settings.metrics;
        m.opened.get_or_create(&labels).inc();
        let connecting = Instant::now();
        let connected = settings
            .balancer
            .connect(
                &endpoints,
                settings.connect_timeout,
                settings.connect_attempts,
            )
            .await;
        let (mut upstream, endpoint, _lease) = match connected {
            Ok(c) => {
                m.upstream_connect
                    .get_or_create(&labels)
                    .observe(connecting.elapsed().as_secs_f64());
                c
            }
            Err(e) => {
                m.upstream_connect_errors.get_or_create(&labels).inc();
                m.closed.get_or_create(&labels).inc();
                stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "upstream connect failed; resetting the client");
                reset(&client);
                return;
            }
        };
        span.record("upstream", endpoint.to_string());
        debug!(upstream_local = ?upstream.local_addr().ok(), "forwarding");
        // The bytes read for detection go first, unchanged: a TLS session reaches the backend
        // byte for byte.
        if !inspected.prefix.is_empty()
            && let Err(e) = upstream.write_all(&inspected.prefix).await
        {
            info!(error = %e, "upstream closed before the first bytes were sent");
            reset(&client);
            return;
        }
        m.active.get_or_create(&labels).inc();
        let r = forward::forward(&client, &upstream, settings.idle_timeout, settings.splice).await;
        m.active.get_or_create(&labels).dec();
        m.closed.get_or_create(&labels).inc();
        let ms = started.elapsed().as_millis() as u64;
        let prefix = inspected.prefix.len() as u64;
        if let Ok(t) = &r {
            m.sent_bytes.get_or_create(&labels).inc_by(t.sent + prefix);
            m.received_bytes.get_or_create(&labels).inc_by(t.received);
        }
        match r {
            Ok(t) => info!(
                target: ACCESS,
                bytes_sent = t.sent + prefix,
                bytes_received = t.received,
                duration_ms = ms,
                "connection closed"
            ),
            Err(e) => info!(target: ACCESS, error = %e, duration_ms = ms, "connection ended with an error"),
        }
    }
    .instrument(span)
    .await
}
