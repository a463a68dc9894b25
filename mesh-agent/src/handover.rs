//! Zero-loss handover: an agent started while another runs with the same configuration takes
//! over its sockets instead of failing on "Address already in use".
//!
//! The running agent listens on a Unix socket whose path comes from the configuration
//! (`handover_socket`, by default derived from `bpffs_dir` and `listen_port`). The successor
//! connects and the two exchange small JSON messages over `SOCK_SEQPACKET` (one message per
//! datagram, so file descriptors passed with SCM_RIGHTS arrive with the message they belong to):
//!
//! 1. successor -> `Hello` (protocol version, binary version, pin layout version);
//! 2. running agent -> `Listeners` with the transparent listeners, the admin listener and the
//!    mTLS tunnel listener attached,
//!    or `Refused` with the reason (another protocol, another pin layout, a handover under way);
//! 3. the successor puts the *same* listening sockets in its SockMap (their accept queues and
//!    handshakes in progress carry over), installs routing idempotently, attaches its programs
//!    through the pinned links (an atomic program replacement), and becomes ready;
//! 4. successor -> `Ready`: the running agent stops accepting, leaves programs, routes and the
//!    notrack table in place, and moves its established connections (`Connections`, fds
//!    attached) until none is left that can move, then `Done`; HTTP/2 connections get GOAWAY
//!    and finish their streams in the old agent until `drain_timeout`.
//!
//! The socket and its folder are accessible to root only, and the peer's uid is checked: whoever
//! connects receives the node's listening sockets.
use std::{
    io::IoSlice,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        socket::{
            self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
            SockType, UnixAddr, sockopt,
        },
        time::TimeVal,
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use std::{
    os::fd::AsFd,
    sync::Arc,
    sync::atomic::{AtomicBool, Ordering},
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::proxy::{self, Listeners, Moved, Settings, Stats};

/// Version of the messages below. A peer with another version is refused with a message that
/// says so, never half understood.
pub const PROTOCOL: u32 = 1;
/// Largest message: a batch of moved connections' metadata.
const MAX_MESSAGE: usize = 256 * 1024;
/// File descriptors per message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 240;
/// How long a peer may take to say hello, or to answer one.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("handover socket {path}: {action}: {source}")]
    Socket {
        path: PathBuf,
        action: &'static str,
        source: Errno,
    },
    #[error(
        "the agent on {path} speaks handover protocol {theirs} (agent {version}), this agent \
         speaks {PROTOCOL}: stop it with SIGTERM (it drains its connections), then start this one"
    )]
    Protocol {
        path: PathBuf,
        theirs: u32,
        version: String,
    },
    #[error("the agent on {path} refused to hand over: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("handover peer: {0}")]
    Peer(String),
    #[error("handover peer closed the connection")]
    Closed,
    /// The peer's message names another protocol version (its layout may differ entirely).
    #[error("handover peer (agent {version}) speaks protocol {theirs}, this agent {PROTOCOL}")]
    Version { theirs: u32, version: String },
    #[error("handover: {0}")]
    Io(#[from] Errno),
}

/// What moved connections are, on the wire. Their sockets travel as attached fds, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnKind {
    /// Spliced (or copied) L4: two fds, client then upstream.
    Tcp,
    /// An idle HTTP/1.1 keep-alive connection: one fd, the client.
    Http1,
}

/// A connection's state besides its sockets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnState {
    pub kind: ConnKind,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The route that decided the upstream, if one did.
    pub route: Option<String>,
    pub upstream: Option<SocketAddr>,
    /// Metric labels of the connection.
    pub service: String,
    pub protocol: String,
    /// Bytes moved so far, client to upstream and back.
    pub sent: u64,
    pub received: u64,
    /// The client -> upstream direction has ended (EOF passed on as a write shutdown).
    pub sent_done: bool,
    /// The upstream -> client direction has ended.
    pub received_done: bool,
    /// Requests served so far (HTTP/1).
    pub requests: u64,
    /// Age of the connection when it moved.
    pub age_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello {
        protocol: u32,
        version: String,
        layout: u32,
    },
    Refused {
        reason: String,
    },
    /// fds: the IPv4 listener, the IPv6 listener if `v6`, the admin listener if `admin`, the
    /// mTLS tunnel listener if `tunnel` (absent from agents before mTLS: false).
    Listeners {
        protocol: u32,
        version: String,
        layout: u32,
        v6: bool,
        admin: bool,
        #[serde(default)]
        tunnel: bool,
    },
    Ready,
    Connections {
        conns: Vec<ConnState>,
    },
    /// Nothing more will move; `draining` connections stay with the old agent until they end or
    /// its drain deadline.
    Done {
        draining: u64,
    },
}

impl Message {
    /// How many fds travel with this message.
    fn fds(&self) -> usize {
        match self {
            Message::Listeners {
                v6, admin, tunnel, ..
            } => 1 + usize::from(*v6) + usize::from(*admin) + usize::from(*tunnel),
            Message::Connections { conns } => conns
                .iter()
                .map(|c| match c.kind {
                    ConnKind::Tcp => 2,
                    ConnKind::Http1 => 1,
                })
                .sum(),
            _ => 0,
        }
    }
}

/// One end of a handover conversation.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    pub fn send(&self, msg: &Message, fds: &[RawFd]) -> Result<(), Error> {
        let body = serde_json::to_vec(msg).map_err(|e| Error::Peer(e.to_string()))?;
        if body.len() > MAX_MESSAGE {
            return Err(Error::Peer(format!(
                "message of {} bytes exceeds {MAX_MESSAGE}",
                body.len()
            )));
        }
        let iov = [IoSlice::new(&body)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        loop {
            match socket::sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(Error::Closed),
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// The next message and its fds (owned: closed if the message is refused).
    pub fn recv(&self) -> Result<(Message, Vec<OwnedFd>), Error> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (n, fds, truncated) = loop {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            match socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => {
                    let mut fds = Vec::new();
                    for c in m.cmsgs().map_err(Error::Io)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: SCM_RIGHTS gave this process new descriptors that
                            // nothing else owns.
                            fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                        }
                    }
                    let truncated = m
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    break (m.bytes, fds, truncated);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(Error::Peer("timed out".into())),
                Err(e) => return Err(Error::Io(e)),
            }
        };
        if n == 0 {
            return Err(Error::Closed);
        }
        if truncated {
            return Err(Error::Peer("a message or its fds were truncated".into()));
        }
        // The version is read before the rest: another version's messages may not parse.
        let value: serde_json::Value = serde_json::from_slice(&buf[..n])
            .map_err(|e| Error::Peer(format!("unreadable message: {e}")))?;
        if let Some(theirs) = value.get("protocol").and_then(serde_json::Value::as_u64)
            && theirs != u64::from(PROTOCOL)
        {
            return Err(Error::Version {
                theirs: u32::try_from(theirs).unwrap_or(u32::MAX),
                version: value
                    .get("version")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
            });
        }
        let msg: Message = serde_json::from_value(value)
            .map_err(|e| Error::Peer(format!("unreadable message: {e}")))?;
        if fds.len() != msg.fds() {
            return Err(Error::Peer(format!(
                "message carries {} fds, {} expected",
                fds.len(),
                msg.fds()
            )));
        }
        Ok((msg, fds))
    }

    fn set_timeout(&self, t: Option<Duration>) -> Result<(), Error> {
        let tv = t.map_or(TimeVal::new(0, 0), |t| {
            TimeVal::new(t.as_secs() as _, t.subsec_micros() as _)
        });
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }
}

/// The sockets a predecessor handed over, and the conversation to finish with it.
pub struct Takeover {
    pub channel: Channel,
    pub v4: OwnedFd,
    pub v6: Option<OwnedFd>,
    pub admin: Option<OwnedFd>,
    /// The mTLS tunnel listener, when the predecessor has one.
    pub tunnel: Option<OwnedFd>,
    /// The predecessor's binary version.
    pub version: String,
}

fn hello() -> Message {
    Message::Hello {
        protocol: PROTOCOL,
        version: env!("CARGO_PKG_VERSION").to_string(),
        layout: crate::ebpf::PIN_LAYOUT,
    }
}

/// Asks the agent on `path`, if one answers, for its listeners. `None`: nobody there (no file,
/// or a file left by an agent that died), start afresh.
pub fn connect(path: &Path) -> Result<Option<Takeover>, Error> {
    let err = |action| {
        move |source| Error::Socket {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    if !path.exists() {
        return Ok(None);
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("socket"))?;
    let addr = UnixAddr::new(path).map_err(err("address"))?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => {
            tracing::info!(path = %path.display(), "no agent on the handover socket (left by one that died); starting afresh");
            let _ = std::fs::remove_file(path);
            return Ok(None);
        }
        Err(e) => return Err(err("connect")(e)),
    }
    let channel = Channel { fd };
    channel.set_timeout(Some(HELLO_TIMEOUT))?;
    channel.send(&hello(), &[])?;
    let (msg, fds) = match channel.recv() {
        Err(Error::Version { theirs, version }) => {
            return Err(Error::Protocol {
                path: path.to_path_buf(),
                theirs,
                version,
            });
        }
        r => r?,
    };
    let mut fds = fds.into_iter();
    match msg {
        Message::Listeners {
            protocol,
            version,
            v6,
            admin,
            tunnel,
            ..
        } if protocol == PROTOCOL => {
            let v4 = fds.next().ok_or(Error::Closed)?;
            let v6 = if v6 { fds.next() } else { None };
            let admin = if admin { fds.next() } else { None };
            let tunnel = if tunnel { fds.next() } else { None };
            // The rest of the conversation waits on our own start, then on the old agent's
            // connections: no timeout.
            channel.set_timeout(None)?;
            Ok(Some(Takeover {
                channel,
                v4,
                v6,
                admin,
                tunnel,
                version,
            }))
        }
        Message::Refused { reason } => Err(Error::Refused {
            path: path.to_path_buf(),
            reason,
        }),
        other => Err(Error::Peer(format!(
            "unexpected answer to hello: {other:?}"
        ))),
    }
}

/// The listening end, owned by a running agent.
pub struct Server {
    path: PathBuf,
    fd: OwnedFd,
}

impl Server {
    /// Binds `path` (replacing a stale file), reachable by root only.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let err = |action| {
            move |source| Error::Socket {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err("creating its folder")(io_errno(&e)))?;
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let _ = std::fs::remove_file(path);
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err("socket"))?;
        let addr = UnixAddr::new(path).map_err(err("address"))?;
        socket::bind(fd.as_raw_fd(), &addr).map_err(err("bind"))?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        socket::listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN)).map_err(err("listen"))?;
        Ok(Server {
            path: path.to_path_buf(),
            fd,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (blocking) for a successor and answers its hello: `Ok(channel)` once the listeners
    /// went out, so the caller waits for `Ready`. A peer that is refused gets the reason and
    /// `Err` (the caller counts it and waits for the next one).
    pub fn accept(
        &self,
        listeners: &[RawFd],
        admin: Option<RawFd>,
        tunnel: Option<RawFd>,
    ) -> Result<Channel, Error> {
        let fd = loop {
            match socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(fd) => break unsafe { OwnedFd::from_raw_fd(fd) },
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(e) => {
                    return Err(Error::Socket {
                        path: self.path.clone(),
                        action: "accept",
                        source: e,
                    });
                }
            }
        };
        let channel = Channel { fd };
        // Whoever connects gets the node's listeners: only our own user may.
        let me = nix::unistd::geteuid().as_raw();
        let peer = socket::getsockopt(&channel.fd, sockopt::PeerCredentials)?;
        if peer.uid() != me {
            let reason = format!("peer uid {} is not this agent's uid {me}", peer.uid());
            let _ = channel.send(
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(Error::Peer(reason));
        }
        channel.set_timeout(Some(HELLO_TIMEOUT))?;
        let refusal = match channel.recv() {
            Err(Error::Version { theirs, .. }) => Some(format!(
                "this agent ({}) speaks handover protocol {PROTOCOL}, the new one {theirs}",
                env!("CARGO_PKG_VERSION")
            )),
            Err(e) => return Err(e),
            Ok((msg, _)) => match msg {
                Message::Hello { layout, .. } if layout != crate::ebpf::PIN_LAYOUT => {
                    Some(format!(
                        "this agent's pins have layout {}, the new agent's {layout}",
                        crate::ebpf::PIN_LAYOUT
                    ))
                }
                Message::Hello { .. } => None,
                other => Some(format!("expected hello, got {other:?}")),
            },
        };
        if let Some(reason) = refusal {
            let _ = channel.send(
                &Message::Refused {
                    reason: reason.clone(),
                },
                &[],
            );
            return Err(Error::Peer(reason));
        }
        let mut fds = listeners.to_vec();
        fds.extend(admin);
        fds.extend(tunnel);
        channel.send(
            &Message::Listeners {
                protocol: PROTOCOL,
                version: env!("CARGO_PKG_VERSION").to_string(),
                layout: crate::ebpf::PIN_LAYOUT,
                v6: listeners.len() > 1,
                admin: admin.is_some(),
                tunnel: tunnel.is_some(),
            },
            &fds,
        )?;
        // The successor loads and attaches its programs before it says ready.
        channel.set_timeout(Some(Duration::from_secs(120)))?;
        Ok(channel)
    }
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// Handover counters (`mesh_handovers_total`, `mesh_handover_connections_moved_total`).
#[derive(Debug, Default)]
pub struct Metrics {
    handovers: Family<ResultLabel, Counter>,
    moved: Family<KindLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Metrics::default());
        registry.register(
            "handovers",
            "Takeovers by a successor agent (counted by the successor when done; by this agent \
             when a successor was refused or gave up before it was ready)",
            m.handovers.clone(),
        );
        registry.register(
            "handover_connections_moved",
            "Connections this agent received from its predecessor, by kind (tcp: spliced L4; \
             http1: idle keep-alive)",
            m.moved.clone(),
        );
        m
    }

    fn handover(&self, result: &'static str) {
        self.handovers.get_or_create(&ResultLabel { result }).inc();
    }
}

/// Duplicates of the sockets this agent offers to a successor.
pub struct Offered {
    listeners: Vec<OwnedFd>,
    admin: OwnedFd,
    tunnel: Option<OwnedFd>,
}

impl Offered {
    pub fn new(
        l: &Listeners,
        admin: &std::net::TcpListener,
        tunnel: Option<&std::net::TcpListener>,
    ) -> std::io::Result<Self> {
        let mut listeners = vec![l.v4.as_fd().try_clone_to_owned()?];
        if let Some(v6) = &l.v6 {
            listeners.push(v6.as_fd().try_clone_to_owned()?);
        }
        Ok(Offered {
            listeners,
            admin: admin.as_fd().try_clone_to_owned()?,
            tunnel: tunnel.map(|t| t.as_fd().try_clone_to_owned()).transpose()?,
        })
    }
}

/// What the handover thread works with.
pub struct Hooks {
    pub settings: Arc<Settings>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    /// The agent's readiness: the predecessor is told ready only once it is set (in
    /// Kubernetes mode, once the API server's objects are synced and applied).
    pub ready: Arc<AtomicBool>,
    /// Attaches this agent's programs again after a successor failed between its attach
    /// (through the pinned links) and its ready.
    pub reclaim: Box<dyn Fn() + Send>,
    /// Runs once the predecessor is done (it released the status Lease before it moved its
    /// connections): try for the Lease now.
    pub taken_over: Box<dyn Fn() + Send>,
    /// Where moved-in connections are served, each on one worker in turn.
    pub workers: Arc<crate::workers::Workers>,
}

/// Finishes taking over (when `predecessor` is set: says ready, then resumes the connections
/// it sends) and then offers this agent's sockets on `path`. The receiver yields the channel
/// of a successor that is ready: then this agent hands over ([`hand_over`]).
pub fn serve(
    path: &Path,
    predecessor: Option<Channel>,
    offered: Offered,
    hooks: Hooks,
) -> mpsc::Receiver<Channel> {
    let Hooks {
        settings,
        stats,
        metrics,
        ready,
        reclaim,
        taken_over,
        workers,
    } = hooks;
    let (tx, rx) = mpsc::channel(1);
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        if let Some(ch) = predecessor {
            while !ready.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
            }
            receive(&ch, &workers, &settings, &stats, &metrics);
            taken_over();
        }
        let server = match Server::bind(&path) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "no handover socket: a new agent will not be able to take over from this one");
                return;
            }
        };
        info!(socket = %path.display(), "handover socket ready");
        let listeners: Vec<RawFd> = offered.listeners.iter().map(AsRawFd::as_raw_fd).collect();
        loop {
            let ch = match server.accept(
                &listeners,
                Some(offered.admin.as_raw_fd()),
                offered.tunnel.as_ref().map(AsRawFd::as_raw_fd),
            ) {
                Ok(ch) => ch,
                Err(e) => {
                    metrics.handover("failed");
                    warn!(error = %e, "a successor did not take over; still serving");
                    continue;
                }
            };
            match ch.recv() {
                Ok((Message::Ready, _)) => {
                    info!("successor ready: handing over");
                    let _ = tx.blocking_send(ch);
                    return;
                }
                other => {
                    // It had the listeners and may have attached its programs through the
                    // pinned links before it failed: ours go back in place.
                    metrics.handover("failed");
                    let error = match other {
                        Ok((m, _)) => format!("expected ready, got {m:?}"),
                        Err(e) => e.to_string(),
                    };
                    warn!(%error, "a successor failed before it was ready; still serving");
                    reclaim();
                }
            }
        }
    });
    rx
}

/// The successor's side after it is ready: says so, then resumes every connection the
/// predecessor sends until `Done` (or until it goes away).
fn receive(
    ch: &Channel,
    workers: &crate::workers::Workers,
    settings: &Arc<Settings>,
    stats: &Arc<Stats>,
    metrics: &Metrics,
) {
    if let Err(e) = ch.send(&Message::Ready, &[]) {
        metrics.handover("failed");
        warn!(error = %e, "the predecessor went away before this agent said ready");
        return;
    }
    let (mut tcp, mut http1) = (0u64, 0u64);
    loop {
        match ch.recv() {
            Ok((Message::Connections { conns }, fds)) => {
                let mut fds = fds.into_iter();
                for state in conns {
                    let n = match state.kind {
                        ConnKind::Tcp => {
                            tcp += 1;
                            2
                        }
                        ConnKind::Http1 => {
                            http1 += 1;
                            1
                        }
                    };
                    metrics
                        .moved
                        .get_or_create(&KindLabel {
                            kind: match state.kind {
                                ConnKind::Tcp => "tcp",
                                ConnKind::Http1 => "http1",
                            },
                        })
                        .inc();
                    let moved = Moved {
                        state,
                        fds: fds.by_ref().take(n).collect(),
                    };
                    let to = workers.place(None);
                    let load = workers.count(to);
                    let (settings, stats) = (settings.clone(), stats.clone());
                    workers.handle(to).spawn(async move {
                        proxy::resume(moved, settings, stats).await;
                        drop(load);
                    });
                }
            }
            Ok((Message::Done { draining }, _)) => {
                metrics.handover("done");
                info!(
                    moved_tcp = tcp,
                    moved_http1 = http1,
                    draining_in_predecessor = draining,
                    "takeover complete"
                );
                return;
            }
            Ok((other, _)) => {
                metrics.handover("failed");
                warn!(message = ?other, "unexpected handover message; the predecessor keeps the rest");
                return;
            }
            Err(e) => {
                metrics.handover("failed");
                warn!(error = %e, moved_tcp = tcp, moved_http1 = http1, "the predecessor stopped before it was done");
                return;
            }
        }
    }
}

/// The predecessor's side once the successor is ready (its accept loops have stopped): asks
/// every connection to move, sends them as they come until none that can move is left (or the
/// drain deadline), then `Done`, then waits for the rest (HTTP/2 after GOAWAY) until the
/// deadline.
pub async fn hand_over(
    ch: Channel,
    start: watch::Sender<bool>,
    mut moved: mpsc::UnboundedReceiver<Moved>,
    stats: &Stats,
    drain: Duration,
) {
    let began = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + drain;
    let _ = start.send(true);
    let (mut tcp, mut http1) = (0u64, 0u64);
    let mut broken = false;
    let mut queue: Vec<Moved> = Vec::new();
    loop {
        while let Ok(m) = moved.try_recv() {
            queue.push(m);
        }
        while !queue.is_empty() {
            // At most MAX_FDS fds per message, two per L4 connection.
            let batch: Vec<Moved> = queue.drain(..queue.len().min(MAX_FDS / 2)).collect();
            if broken {
                continue;
            }
            let conns: Vec<ConnState> = batch.iter().map(|m| m.state.clone()).collect();
            let fds: Vec<RawFd> = batch
                .iter()
                .flat_map(|m| m.fds.iter().map(AsRawFd::as_raw_fd))
                .collect();
            let sent =
                tokio::task::block_in_place(|| ch.send(&Message::Connections { conns }, &fds));
            match sent {
                Ok(()) => {
                    for m in &batch {
                        match m.state.kind {
                            ConnKind::Tcp => tcp += 1,
                            ConnKind::Http1 => http1 += 1,
                        }
                    }
                }
                Err(e) => {
                    // The successor is gone: what is left ends here (closing the sockets).
                    warn!(error = %e, "the successor stopped receiving connections");
                    broken = true;
                }
            }
            // Our copies close now; the ones in flight keep the connections open.
            drop(batch);
        }
        if stats.movable.load(Ordering::Acquire) == 0 && moved.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                left = stats.movable.load(Ordering::Acquire),
                "drain deadline reached before every connection could move"
            );
            break;
        }
        tokio::select! {
            m = moved.recv() => queue.extend(m),
            () = stats.settled() => {}
        }
    }
    let draining = stats.active.load(Ordering::Acquire) as u64;
    let _ = tokio::task::block_in_place(|| ch.send(&Message::Done { draining }, &[]));
    info!(
        moved_tcp = tcp,
        moved_http1 = http1,
        draining,
        took_ms = began.elapsed().as_millis() as u64,
        "connections handed over"
    );
    let left = stats
        .drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if left > 0 {
        warn!(open = left, "drain period over; closing the rest");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Channel, Channel) {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        (Channel { fd: a }, Channel { fd: b })
    }

    #[test]
    fn messages_carry_their_fds() {
        let (a, b) = pair();
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        a.send(
            &Message::Listeners {
                protocol: PROTOCOL,
                version: "x".into(),
                layout: 1,
                v6: false,
                admin: false,
                tunnel: false,
            },
            &[l.as_raw_fd()],
        )
        .expect("send");
        let (msg, fds) = b.recv().expect("recv");
        assert!(
            matches!(msg, Message::Listeners { v6: false, .. }),
            "{msg:?}"
        );
        let got = std::net::TcpListener::from(fds.into_iter().next().expect("fd"));
        assert_eq!(got.local_addr().expect("addr").port(), port);
    }

    #[test]
    fn a_message_without_its_fds_is_refused() {
        let (a, b) = pair();
        a.send(
            &Message::Listeners {
                protocol: PROTOCOL,
                version: "x".into(),
                layout: 1,
                v6: true,
                admin: false,
                tunnel: true,
            },
            &[],
        )
        .expect("send");
        let e = b.recv().expect_err("refused");
        assert!(e.to_string().contains("carries 0 fds, 3 expected"), "{e}");
    }

    /// Agents from before mTLS send no `tunnel`: they offer no tunnel listener.
    #[test]
    fn listeners_from_an_agent_before_mtls_have_no_tunnel() {
        let old = r#"{"type":"listeners","protocol":1,"version":"0.1.0","layout":1,"v6":false,"admin":true}"#;
        let msg: Message = serde_json::from_str(old).expect("parses");
        assert!(matches!(msg, Message::Listeners { tunnel: false, .. }));
        assert_eq!(msg.fds(), 2);
    }

    #[test]
    fn another_protocol_version_is_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("handover-unit-{}", std::process::id()));
        let path = dir.join("h.sock");
        let server = Server::bind(&path).expect("bind");
        let t = std::thread::spawn(move || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            server.accept(&[l.as_raw_fd()], None, None).err()
        });
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("connect");
        let c = Channel { fd };
        c.send(
            &Message::Hello {
                protocol: 99,
                version: "9.9.9".into(),
                layout: 1,
            },
            &[],
        )
        .expect("hello");
        let (msg, _) = c.recv().expect("answer");
        match msg {
            Message::Refused { reason } => {
                assert!(
                    reason.contains("speaks handover protocol 1, the new one 99"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(t.join().expect("join").is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}
