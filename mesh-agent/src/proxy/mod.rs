//! Accepting captured connections and forwarding them to their original destination.
//!
//! The capture program assigns a pod's SYN to one of the transparent listeners opened here. The
//! kernel then builds the accepted socket with the pod's real tuple, so `local_addr()` of that
//! socket is the destination the pod asked for ([`OrigDst`]).
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

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Notify, watch},
};
use tracing::{Instrument, debug, info, info_span, warn};

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

async fn handle(client: TcpStream, src: ClientAddr, settings: &Settings, stats: &Stats) {
    let dst = match client.local_addr() {
        Ok(a) => OrigDst(a),
        Err(e) => {
            warn!(%src, error = %e, "no original destination");
            return;
        }
    };
    let span = info_span!("conn", %src, %dst);
    async move {
        if dst.0.port() == settings.listen_port && dst.0.ip().is_loopback() {
            warn!("connection to the listener itself, not a captured one; closing");
            return;
        }
        let started = Instant::now();
        let _ = client.set_nodelay(true);
        let upstream = match connect(dst, settings.connect_timeout).await {
            Ok(u) => u,
            Err(e) => {
                stats.upstream_failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "upstream connect failed; resetting the client");
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                return;
            }
        };
        debug!(upstream_local = ?upstream.local_addr().ok(), "forwarding");
        let r = forward::forward(&client, &upstream, settings.idle_timeout, settings.splice).await;
        let ms = started.elapsed().as_millis() as u64;
        match r {
            Ok(t) => info!(
                bytes_sent = t.sent,
                bytes_received = t.received,
                duration_ms = ms,
                "connection closed"
            ),
            Err(e) => info!(error = %e, duration_ms = ms, "connection ended with an error"),
        }
    }
    .instrument(span)
    .await
}

async fn connect(dst: OrigDst, timeout: Duration) -> std::io::Result<TcpStream> {
    let sock = if dst.0.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    sock.set_nodelay(true)?;
    match tokio::time::timeout(timeout, sock.connect(dst.0)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect timed out after {timeout:?}"),
        )),
    }
}
