//! Accepting captured connections and forwarding them to their original destination.
//!
//! The capture program assigns a pod's SYN to one of the transparent listeners opened here. The
//! kernel then builds the accepted socket with the pod's real tuple, so `local_addr()` of that
//! socket is the destination the pod asked for ([`OrigDst`]).
pub mod balance;
pub mod forward;
pub mod headroom;

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::OwnedFd,
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
    sync::{Notify, mpsc, watch},
};
use tracing::{Instrument, Span, debug, field::Empty, info, info_span, warn};

use crate::{
    handover::{ConnKind, ConnState},
    metrics::{AcceptErrorLabels, TcpLabels, TcpMetrics},
    policy::Store,
    workers::{Load, Workers},
};
use balance::{Balancer, ConnectError};

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

impl Listeners {
    /// The listeners a predecessor handed over (see `handover`): the same sockets, so their
    /// accept queues and the handshakes in progress carry over.
    pub fn from_fds(v4: OwnedFd, v6: Option<OwnedFd>, port: u16) -> Result<Self, Error> {
        let adopt = |fd: OwnedFd, family: &'static str| {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(l))
                .map_err(|source| Error::Listen {
                    family,
                    port,
                    source,
                })
        };
        Ok(Listeners {
            v4: adopt(v4, "IPv4")?,
            v6: v6.map(|fd| adopt(fd, "IPv6")).transpose()?,
        })
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
    /// Where connections go when this agent hands over to a successor.
    pub handoff: Handoff,
    /// mTLS between nodes (`mesh:` in the configuration); `None`: plaintext everywhere.
    pub mesh: Option<Arc<crate::mesh::Mesh>>,
}

/// A connection leaving this agent for its successor: its state and its sockets (client, then
/// upstream for L4).
#[derive(Debug)]
pub struct Moved {
    pub state: ConnState,
    pub fds: Vec<OwnedFd>,
}

/// The handover's side of the proxy: `signal` turns true when the successor is ready; each
/// connection then stops where it holds no bytes and sends itself to `out`.
#[derive(Clone, Debug)]
pub struct Handoff {
    pub signal: watch::Receiver<bool>,
    pub out: mpsc::UnboundedSender<Moved>,
}

impl Handoff {
    /// The sender that starts the move, the handoff for [`Settings`], and the receiving end.
    pub fn new() -> (watch::Sender<bool>, Self, mpsc::UnboundedReceiver<Moved>) {
        let (tx, signal) = watch::channel(false);
        let (out, rx) = mpsc::unbounded_channel();
        (tx, Handoff { signal, out }, rx)
    }
}

/// Counts a connection as one that may still move until it moves, ends, or turns out to be one
/// that never moves (HTTP/2): the handover waits for the count to reach zero.
struct Movable<'a>(Option<&'a Stats>);

impl<'a> Movable<'a> {
    fn new(stats: &'a Stats) -> Self {
        stats.movable.fetch_add(1, Ordering::AcqRel);
        Movable(Some(stats))
    }

    fn settle(&mut self) {
        if let Some(s) = self.0.take() {
            s.movable.fetch_sub(1, Ordering::AcqRel);
            s.settled.notify_waiters();
        }
    }
}

impl Drop for Movable<'_> {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Connection counts shared by all accept loops.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub active: AtomicUsize,
    pub upstream_failures: AtomicU64,
    /// Connections that may still move to a successor (see `handover`).
    pub movable: AtomicUsize,
    drained: Notify,
    settled: Notify,
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

    /// Waits until the movable count changes (or a short while: a count that reached zero
    /// before this call is seen by the caller's next check).
    pub async fn settled(&self) {
        let _ = tokio::time::timeout(Duration::from_millis(20), self.settled.notified()).await;
    }
}

/// How long accepting pauses after a failure it cannot shed (see [`Reserve`]): long enough not
/// to spin on a full fd table, short enough that a freed fd is used soon.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// One fd kept open to be given up when the agent is out of them: at EMFILE the reserve is
/// closed, the queued connection accepted and reset at once (the client learns it was refused
/// instead of waiting in the queue), and the reserve taken again. One for all listeners.
static RESERVE: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

struct Reserve;

impl Reserve {
    fn fill() {
        let mut r = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
        }
    }

    /// Refuses one queued connection of `listener` with a reset, using the reserve fd.
    fn shed(listener: &TcpListener) -> Shed {
        let mut r = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
        if r.take().is_none() {
            *r = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
            return Shed::NoReserve;
        }
        // The listener is non-blocking: this returns at once.
        let shed = match socket2::SockRef::from(listener).accept() {
            Ok((sock, _)) => {
                let _ = sock.set_linger(Some(Duration::ZERO));
                Shed::Refused
            }
            Err(_) => Shed::NothingQueued,
        };
        *r = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
        shed
    }
}

/// What [`Reserve::shed`] did.
#[derive(Debug, PartialEq, Eq)]
enum Shed {
    /// Accepted and reset one queued connection.
    Refused,
    /// Nothing was queued: accept fails with EMFILE whether or not a connection waits.
    NothingQueued,
    /// No reserve fd (another fd took its place, e.g. another worker's accept): cannot tell
    /// whether one waits, and none was refused.
    NoReserve,
}

fn accept_error_reason(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(n) if n == nix::errno::Errno::EMFILE as i32 => "emfile",
        Some(n) if n == nix::errno::Errno::ENFILE as i32 => "enfile",
        _ => "other",
    }
}

/// Accepts until `stop` flips, spawning one task per connection.
pub async fn serve(
    listener: TcpListener,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
    (workers, me): (Arc<Workers>, usize),
) {
    Reserve::fill();
    // Set while accept fails, so that a full fd table is logged once, not at every retry.
    let mut out_of_fds = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) if headroom::reached(&stream) => {
                    // Accepted into the headroom: refused like at EMFILE, without waiting.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                    settings
                        .metrics
                        .accept_errors
                        .get_or_create(&AcceptErrorLabels { reason: "emfile" })
                        .inc();
                    if !out_of_fds {
                        warn!("out of fds (the last {} are kept free); new connections are refused (counted in mesh_accept_errors_total) until some close", headroom::HEADROOM);
                        out_of_fds = true;
                    }
                }
                Ok((stream, peer)) => {
                    if out_of_fds {
                        info!("accepting again");
                        out_of_fds = false;
                    }
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    stats.active.fetch_add(1, Ordering::AcqRel);
                    let (settings, stats) = (settings.clone(), stats.clone());
                    // Counted before the accept loop can stop: the handover then waits for it.
                    stats.movable.fetch_add(1, Ordering::AcqRel);
                    let to = workers.place(Some(me));
                    let load = workers.count(to);
                    if to == me {
                        tokio::spawn(connection(Ok(stream), peer, settings, stats, load));
                    } else {
                        // Registered with the other worker's event loop from there.
                        let stream = stream.into_std();
                        workers.handle(to).spawn(async move {
                            let stream = stream.and_then(TcpStream::from_std);
                            connection(stream, peer, settings, stats, load).await;
                        });
                    }
                }
                Err(e) => {
                    let reason = accept_error_reason(&e);
                    // Out of fds: the connections already open keep being served, a queued
                    // one is refused at once (and counted), and with nothing queued accepting
                    // pauses briefly (no spinning: accept fails at once while the fd table is
                    // full) until a connection closes.
                    let shed = match reason {
                        "other" => Shed::NoReserve,
                        _ => Reserve::shed(&listener),
                    };
                    // Counted when a connection was refused; "no reserve" refused none: with
                    // several workers, another one's accept took the fd the reserve gave up.
                    if shed == Shed::Refused || reason == "other" {
                        settings
                            .metrics
                            .accept_errors
                            .get_or_create(&AcceptErrorLabels { reason })
                            .inc();
                    }
                    if !out_of_fds {
                        warn!(error = %e, "accept failed; new connections are refused (counted in mesh_accept_errors_total) until it succeeds again");
                        out_of_fds = true;
                    }
                    if shed != Shed::Refused {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            }
        }
    }
}

/// Serves one accepted connection on the worker `load` counts it against (`stream` is an error
/// when it could not be moved there: it is closed and no more counted).
async fn connection(
    stream: std::io::Result<TcpStream>,
    peer: SocketAddr,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    _load: Load,
) {
    let movable = Movable(Some(&stats));
    match stream {
        Ok(stream) => handle(stream, ClientAddr(peer), &settings, &stats, movable).await,
        Err(e) => {
            warn!(%peer, error = %e, "moving a connection to another worker failed; it is closed")
        }
    }
    if stats.active.fetch_sub(1, Ordering::AcqRel) == 1 {
        stats.drained.notify_waiters();
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

/// An HTTP connection for the HTTP proxy: new, or moved from a predecessor.
struct HttpConn {
    client: TcpStream,
    prefix: Vec<u8>,
    h2: bool,
    labels: TcpLabels,
    src: ClientAddr,
    dst: OrigDst,
    /// Requests served before it moved here, and when it was accepted.
    requests_before: u64,
    started: Instant,
    resumed: bool,
}

/// Hands an HTTP connection to the HTTP proxy; logs and counts it like any connection. An
/// HTTP/1 connection moves to a successor at its next idle point once one is ready.
async fn serve_http(c: HttpConn, settings: &Settings, mut movable: Movable<'_>) {
    let m = &settings.metrics;
    if !c.resumed {
        m.opened.get_or_create(&c.labels).inc();
    }
    m.active.get_or_create(&c.labels).inc();
    // HTTP/2 never moves (GOAWAY instead), so the handover does not wait for it. An HTTP/1
    // connection moves as a duplicate of its socket: hyper closes its own when it stops.
    let keep = if c.h2 {
        movable.settle();
        None
    } else {
        socket2::SockRef::from(&c.client).try_clone().ok()
    };
    let signal = if keep.is_some() || c.h2 {
        settings.handoff.signal.clone()
    } else {
        // Without a duplicate it cannot move; it ends here at the drain deadline.
        movable.settle();
        watch::channel(false).1
    };
    let r = settings
        .http
        .serve_movable(
            c.client, c.prefix, c.src.0, c.dst.0, c.h2, signal, c.resumed,
        )
        .await;
    m.active.get_or_create(&c.labels).dec();
    let ms = c.started.elapsed().as_millis() as u64;
    match r {
        Ok(s) if s.moved => {
            let state = ConnState {
                kind: ConnKind::Http1,
                src: c.src.0,
                dst: c.dst.0,
                route: None,
                upstream: None,
                service: c.labels.service.clone(),
                protocol: c.labels.protocol.clone(),
                sent: 0,
                received: 0,
                sent_done: false,
                received_done: false,
                requests: c.requests_before + s.requests,
                age_ms: ms,
            };
            if let Some(fd) = keep {
                let _ = settings.handoff.out.send(Moved {
                    state,
                    fds: vec![fd.into()],
                });
                debug!(
                    requests = c.requests_before + s.requests,
                    "idle HTTP/1.1 connection moved to the new agent"
                );
            }
        }
        Ok(s) => {
            m.closed.get_or_create(&c.labels).inc();
            info!(target: ACCESS, requests = c.requests_before + s.requests, duration_ms = ms, "connection closed")
        }
        Err(e) => {
            m.closed.get_or_create(&c.labels).inc();
            info!(target: ACCESS, error = %e, duration_ms = ms, "connection ended with an error")
        }
    }
}

/// Serves a connection a predecessor handed over, from where it stopped.
pub async fn resume(moved: Moved, settings: Arc<Settings>, stats: Arc<Stats>) {
    let Moved { state, fds } = moved;
    let mut fds = fds.into_iter().map(|fd| {
        let s = std::net::TcpStream::from(fd);
        s.set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(s))
    });
    let client = match fds.next() {
        Some(Ok(c)) => c,
        _ => {
            warn!(src = %state.src, "a moved connection came without a usable client socket");
            return;
        }
    };
    stats.active.fetch_add(1, Ordering::AcqRel);
    let movable = Movable::new(&stats);
    let labels = TcpLabels {
        service: state.service.clone(),
        protocol: state.protocol.clone(),
    };
    let started = Instant::now()
        .checked_sub(Duration::from_millis(state.age_ms))
        .unwrap_or_else(Instant::now);
    let span = info_span!("conn", src = %state.src, dst = %state.dst, proto = %state.protocol, route = state.route.as_deref().unwrap_or(""), upstream = Empty, moved = true);
    async {
        match state.kind {
            ConnKind::Http1 => {
                let c = HttpConn {
                    client,
                    prefix: Vec::new(),
                    h2: false,
                    labels,
                    src: ClientAddr(state.src),
                    dst: OrigDst(state.dst),
                    requests_before: state.requests,
                    started,
                    resumed: true,
                };
                Box::pin(serve_http(c, &settings, movable)).await;
            }
            ConnKind::Tcp => {
                let Some(Ok(upstream)) = fds.next() else {
                    warn!("a moved L4 connection came without its upstream socket; resetting");
                    reset(&client);
                    return;
                };
                if let Some(u) = state.upstream {
                    Span::current().record("upstream", u.to_string());
                }
                relay(
                    Relay {
                        client,
                        upstream,
                        labels,
                        src: state.src,
                        dst: state.dst,
                        route: state.route.clone(),
                        endpoint: state.upstream,
                        base: forward::Transferred {
                            sent: state.sent,
                            received: state.received,
                        },
                        resume: forward::Resume {
                            sent_done: state.sent_done,
                            received_done: state.received_done,
                        },
                        started,
                    },
                    &settings,
                    movable,
                )
                .await;
            }
        }
    }
    .instrument(span)
    .await;
    if stats.active.fetch_sub(1, Ordering::AcqRel) == 1 {
        stats.drained.notify_waiters();
    }
}

/// An L4 connection between its connect and its end (or its move).
struct Relay {
    client: TcpStream,
    upstream: TcpStream,
    labels: TcpLabels,
    src: SocketAddr,
    dst: SocketAddr,
    route: Option<String>,
    endpoint: Option<SocketAddr>,
    /// Bytes counted before this agent (a moved connection) or before forwarding (the
    /// detection prefix).
    base: forward::Transferred,
    resume: forward::Resume,
    started: Instant,
}

/// An upstream connection: plaintext TCP, or a stream of the mTLS tunnel.
enum Upstream {
    Tcp(TcpStream),
    Tunnel(Box<mesh_tunnel::TunnelStream>),
}

/// A connection forwarded through the mTLS tunnel.
struct TunnelRelay {
    client: TcpStream,
    tunnel: Box<mesh_tunnel::TunnelStream>,
    /// The client's bytes read for detection, sent first.
    prefix: Vec<u8>,
    labels: TcpLabels,
    started: Instant,
}

/// Copies both ways between the client and its tunnel stream until both sides are done or the
/// connection idles out. Its bytes go through userspace (TLS), and it cannot move to a successor
/// agent: an upgrade lets it finish within the drain timeout.
async fn relay_tunnel(mut c: TunnelRelay, settings: &Settings) {
    use tokio::io::AsyncWriteExt;
    let m = &settings.metrics;
    let span = Span::current();
    span.record(
        "upstream",
        format!("{} (tunnel via {})", c.tunnel.dst(), c.tunnel.peer()),
    );
    if !c.prefix.is_empty()
        && let Err(e) = c.tunnel.write_all(&c.prefix).await
    {
        info!(error = %e, "tunnel closed before the first bytes were sent");
        reset(&c.client);
        m.closed.get_or_create(&c.labels).inc();
        return;
    }
    m.active.get_or_create(&c.labels).inc();
    let copied = c
        .tunnel
        .relay(&mut c.client, Some(settings.idle_timeout))
        .await;
    m.active.get_or_create(&c.labels).dec();
    m.closed.get_or_create(&c.labels).inc();
    let ms = c.started.elapsed().as_millis() as u64;
    match copied {
        Ok((sent, received)) => info!(
            target: "mesh_agent::access",
            bytes_sent = sent + c.prefix.len() as u64,
            bytes_received = received,
            duration_ms = ms,
            src_principal = %c.tunnel.src_id(),
            dst_principal = %c.tunnel.server_id(),
            "connection closed"
        ),
        Err(e) => {
            reset(&c.client);
            info!(
                target: "mesh_agent::access",
                error = %e,
                duration_ms = ms,
                src_principal = %c.tunnel.src_id(),
                dst_principal = %c.tunnel.server_id(),
                "connection failed"
            );
        }
    }
}

/// Forwards until the connection ends or moves to a successor.
async fn relay(c: Relay, settings: &Settings, _movable: Movable<'_>) {
    let m = &settings.metrics;
    m.active.get_or_create(&c.labels).inc();
    let r = forward::forward(
        &c.client,
        &c.upstream,
        settings.idle_timeout,
        settings.splice,
        c.resume,
        Some(settings.handoff.signal.clone()),
    )
    .await;
    m.active.get_or_create(&c.labels).dec();
    let ms = c.started.elapsed().as_millis() as u64;
    let (t, paused) = match &r {
        Ok(forward::Ended::Closed(t)) => (Some(*t), None),
        Ok(forward::Ended::Paused {
            transferred,
            sent_done,
            received_done,
        }) => (Some(*transferred), Some((*sent_done, *received_done))),
        Err(_) => (None, None),
    };
    let t = t.map(|t| forward::Transferred {
        sent: t.sent + c.base.sent,
        received: t.received + c.base.received,
    });
    if let Some((sent_done, received_done)) = paused {
        let t = t.unwrap_or_default();
        let state = ConnState {
            kind: ConnKind::Tcp,
            src: c.src,
            dst: c.dst,
            route: c.route,
            upstream: c.endpoint,
            service: c.labels.service.clone(),
            protocol: c.labels.protocol.clone(),
            sent: t.sent,
            received: t.received,
            sent_done: sent_done || c.resume.sent_done,
            received_done: received_done || c.resume.received_done,
            requests: 0,
            age_ms: ms,
        };
        let fds = [c.client.into_std(), c.upstream.into_std()];
        match fds {
            [Ok(client), Ok(upstream)] => {
                let _ = settings.handoff.out.send(Moved {
                    state,
                    fds: vec![client.into(), upstream.into()],
                });
                debug!(
                    bytes_sent = t.sent,
                    bytes_received = t.received,
                    "connection moved to the new agent"
                );
            }
            _ => warn!("a paused connection's sockets could not be detached; closing it"),
        }
        return;
    }
    m.closed.get_or_create(&c.labels).inc();
    if let Some(t) = &t {
        m.sent_bytes
            .get_or_create(&c.labels)
            .inc_by(t.sent - c.base.sent);
        m.received_bytes
            .get_or_create(&c.labels)
            .inc_by(t.received - c.base.received);
    }
    match (r, t) {
        (Ok(_), Some(t)) => info!(
            target: ACCESS,
            bytes_sent = t.sent,
            bytes_received = t.received,
            duration_ms = ms,
            "connection closed"
        ),
        (Err(e), _) => {
            info!(target: ACCESS, error = %e, duration_ms = ms, "connection ended with an error")
        }
        _ => {}
    }
}

/// Resets the client when it is closed (it was armed at accept; this says why it is closed).
fn reset(client: &TcpStream) {
    forward::arm_reset(client);
}

async fn handle(
    client: TcpStream,
    src: ClientAddr,
    settings: &Settings,
    stats: &Stats,
    movable: Movable<'_>,
) {
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
            // A client slow to send its first bytes must not slip past the routes and L7 rules
            // as opaque TCP to the Service's own endpoints: where the port declares a protocol
            // whose client speaks first, or carries an HTTPRoute, GRPCRoute or TLSRoute, the
            // agent waits for them as long as it lets any connection idle. The short detection
            // timeout is for ports that declare nothing and have no route.
            let timeout = if service.is_some_and(mesh_policy::ServicePort::declares_client_first)
                || policy.has_routes(dst.0)
            {
                settings.idle_timeout
            } else {
                policy.settings().protocol_detection_timeout
            };
            match Box::pin(inspect(&client, timeout)).await {
                Ok(i) => i,
                Err(e) => {
                    info!(error = %e, "client failed before sending its first bytes");
                    return;
                }
            }
        };
        let span = Span::current();
        span.record("proto", protocol_name(&inspected.detection));
        // HTTP goes to the HTTP proxy also when its endpoints are enrolled pods of other
        // nodes: its dialer (`crate::tunnel::Dialer`) takes those requests through the tunnel.
        if let Detection::Http1(_) | Detection::H2PriorKnowledge = inspected.detection {
            forward::disarm_reset(&client);
            let c = HttpConn {
                client,
                h2: matches!(inspected.detection, Detection::H2PriorKnowledge),
                labels: labels(service, &inspected.detection),
                prefix: inspected.prefix,
                src,
                dst,
                requests_before: 0,
                started,
                resumed: false,
            };
            // Boxed, as is `inspect`: a task is as large as its largest state, and every idle L4
            // connection would carry the HTTP path's and the inspection buffer's size.
            Box::pin(serve_http(c, settings, movable)).await;
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
                match d.pick() {
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
        // With mTLS, an endpoint that is an enrolled pod of another node is reached through
        // its node's tunnel; every other one in plaintext.
        let connected = settings
            .balancer
            .connect_with(&endpoints, settings.connect_attempts, |ep| {
                let mesh = settings.mesh.as_ref();
                let target = mesh.and_then(|m| m.target(&policy, src.0.ip(), ep));
                async move {
                    match (mesh, target) {
                        // Boxed: the tunnel's connect future is large, and an idle plaintext
                        // connection's task would carry its size.
                        (Some(m), Some(t)) => Box::pin(m.connect(&t, ep))
                            .await
                            .map(|s| Upstream::Tunnel(Box::new(s))),
                        _ => balance::connect(ep, settings.connect_timeout)
                            .await
                            .map(Upstream::Tcp),
                    }
                }
            })
            .await;
        let (upstream, endpoint, _lease) = match connected {
            Ok(c) => {
                m.upstream_connect
                    .get_or_create(&labels)
                    .observe(connecting.elapsed().as_secs_f64());
                c
            }
            Err(ConnectError::OutOfFds(e)) => {
                // Accepted with the last fd: refused for the same reason as at accept, and
                // counted there; the endpoints are not at fault.
                let reason = accept_error_reason(&e);
                m.accept_errors
                    .get_or_create(&AcceptErrorLabels { reason })
                    .inc();
                m.closed.get_or_create(&labels).inc();
                debug!(error = %e, "out of fds for the upstream connection; resetting the client");
                reset(&client);
                return;
            }
            Err(ConnectError::Denied(e)) => {
                // Counted by the destination's agent (mesh_tunnel_inbound_total{result="denied"}).
                m.closed.get_or_create(&labels).inc();
                info!(error = %e, "refused by the destination's agent; resetting the client");
                reset(&client);
                return;
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
        let mut upstream = match upstream {
            Upstream::Tcp(s) => s,
            Upstream::Tunnel(t) => {
                let c = TunnelRelay {
                    client,
                    tunnel: t,
                    prefix: inspected.prefix,
                    labels,
                    started,
                };
                // Boxed: an idle plaintext connection's task does not carry its size.
                Box::pin(relay_tunnel(c, settings)).await;
                return;
            }
        };
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
        relay(
            Relay {
                client,
                upstream,
                labels,
                src: src.0,
                dst: dst.0,
                route: decision.as_ref().map(|d| d.route.to_string()),
                endpoint: Some(endpoint),
                base: forward::Transferred {
                    sent: inspected.prefix.len() as u64,
                    received: 0,
                },
                resume: forward::Resume::default(),
                started,
            },
            settings,
            movable,
        )
        .await;
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let policy: Store = Arc::new(mesh_policy::PolicyStore::new(mesh_policy::Compiled::empty()));
        let (_, handoff, _) = Handoff::new();
        let http = mesh_http::Proxy::new(mesh_http::Config::default(), policy.clone());
        Settings {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            splice: true,
            listen_port: 1,
            connect_attempts: 1,
            policy,
            balancer: Arc::new(Balancer::new(http.balancer())),
            metrics: crate::metrics::Metrics::new().tcp,
            http,
            handoff,
            mesh: None,
        }
    }

    /// Every idle L4 connection keeps its task's future alive, and a future is as large as its
    /// largest state: the HTTP path and the inspection buffer are boxed so that an idle L4
    /// connection does not carry them (the goal is <= 8 KiB per idle connection in all). In a
    /// debug build the task is 2.9 KB boxed, 5.3 KB not (release builds are smaller).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, peer) = l.accept().await.expect("accept");
        let settings = settings();
        let stats = Stats::default();
        let movable = Movable::new(&stats);
        let task = handle(s, ClientAddr(peer), &settings, &stats, movable);
        let size = std::mem::size_of_val(&task);
        println!("connection task: {size} bytes");
        assert!(size <= 4096, "connection task is {size} bytes");
        drop((task, c));
    }
}
