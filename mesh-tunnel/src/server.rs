//! The tunnel server (the node's port 15008): TLS with client certificates, then HTTP/2; each
//! stream must be a `CONNECT` to `ip:port`, which the user's [`InboundHandler`] accepts (with the
//! stream to deliver to) or refuses. An accepted stream is answered 200 and relayed both ways
//! until both sides have half-closed; an error on either side resets the other.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::Reason;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use mesh_identity::tls::{id_from_server_name, peer_serial, server_config_by_sni};
use mesh_identity::{Identities, SpiffeId, TrustBundle, TrustDomain, peer_id};
use rustls::ServerConfig;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::Instrument;

use crate::config::TunnelConfig;
use crate::error::ServerError;
use crate::handshake;
use crate::keepalive::{self, Keepalive};
use crate::readahead::ReadAhead;
use crate::stats::{HandshakeFailure, TunnelStats};
use crate::stream::H2Stream;

/// Response header carrying the handler's reason for a refusal, for the client's error and logs.
pub const REFUSAL_REASON_HEADER: &str = "mesh-refusal-reason";
/// Refusal reasons are cut to this many bytes: they are for logs, not for transfer.
const MAX_REASON_LEN: usize = 256;
/// Relay buffer per direction; large enough to fill big DATA frames in one write.
const RELAY_BUFFER: usize = 256 * 1024;
/// Pause after a failed `accept` (out of file descriptors, typically) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// One CONNECT request, for the handler to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The client workload's identity (from its verified certificate).
    pub peer: SpiffeId,
    /// The serial number of the client's certificate (lowercase hex).
    pub peer_serial: String,
    /// The identity whose certificate this server presented: the destination workload's.
    pub server_id: SpiffeId,
    /// The original destination `ip:port`, from the CONNECT authority.
    pub dst: SocketAddr,
    /// The remote address of the tunnel connection (the client node).
    pub src_addr: SocketAddr,
}

/// The handler's answer to a CONNECT.
#[derive(Debug)]
pub enum Decision<S> {
    /// Relay the tunnel stream to and from this stream.
    Accept(S),
    /// Relay the tunnel stream to and from this TCP connection (typically to `dst`): the fast
    /// path, where DATA frames are written to the socket and read from it as they are, without
    /// a relay buffer in between.
    Deliver(TcpStream),
    /// Answer with this status (4xx or 5xx; anything else becomes 500) and end the stream. The
    /// reason goes to the client in the [`REFUSAL_REASON_HEADER`] header.
    Refuse {
        /// HTTP status, e.g. 403 for a policy denial, 503 when the destination is unreachable.
        status: u16,
        /// Why, for the client's logs.
        reason: String,
    },
}

/// Decides on each CONNECT. Implemented for closures `Fn(Inbound) -> impl Future<Output =
/// Decision<S>>`.
pub trait InboundHandler: Send + Sync + 'static {
    /// What accepted streams are relayed to.
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Checks policy and connects to the destination (or not).
    fn handle(&self, inbound: Inbound) -> impl Future<Output = Decision<Self::Upstream>> + Send;
}

impl<F, Fut, S> InboundHandler for F
where
    F: Fn(Inbound) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Decision<S>> + Send,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Upstream = S;

    fn handle(&self, inbound: Inbound) -> impl Future<Output = Decision<S>> + Send {
        self(inbound)
    }
}

/// The tunnel server of a node. Cheap to clone.
pub struct TunnelServer<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for TunnelServer<H> {
    fn clone(&self) -> Self {
        TunnelServer {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<H> {
    identities: Identities,
    trust_domain: TrustDomain,
    tls: Arc<ServerConfig>,
    config: TunnelConfig,
    handler: H,
    stats: Arc<TunnelStats>,
}

/// The identities of an established tunnel connection.
#[derive(Debug)]
struct Established {
    peer: SpiffeId,
    peer_serial: String,
    server_id: SpiffeId,
}

impl<H: InboundHandler> TunnelServer<H> {
    /// A server presenting the certificates of `identities` (the workloads of this node, chosen
    /// by the client's SNI) and accepting clients whose certificates chain to `bundle`.
    pub fn new(
        identities: Identities,
        bundle: &TrustBundle,
        config: TunnelConfig,
        handler: H,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let tls = server_config_by_sni(&identities, bundle)?;
        Ok(TunnelServer {
            inner: Arc::new(Inner {
                identities,
                trust_domain: bundle.trust_domain.clone(),
                tls,
                config,
                handler,
                stats: Arc::default(),
            }),
        })
    }

    /// The server's counters.
    pub fn stats(&self) -> &Arc<TunnelStats> {
        &self.inner.stats
    }

    /// Accepts and serves tunnel connections on `listener` until the returned future is dropped;
    /// dropping it closes every connection it accepted (and their streams) at once.
    pub async fn serve(&self, listener: TcpListener) {
        let (_never, stop) = watch::channel(false);
        self.serve_until(listener, stop).await
    }

    /// Like [`TunnelServer::serve`] until `stop` turns true (or its sender goes): then the
    /// listener is closed here (a successor that holds the same socket goes on accepting), every
    /// connection is sent a GOAWAY so that its client opens new streams elsewhere while the
    /// streams in progress finish, and the future returns once no connection is left.
    pub async fn serve_until(&self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let mut connections = JoinSet::new();
        let mut listener = Some(listener);
        let for_connections = stop.clone();
        loop {
            let accept = async {
                match &listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stopped(&mut stop), if listener.is_some() => {
                    listener = None;
                    tracing::info!(
                        connections = connections.len(),
                        "tunnel server: no longer accepting; connections told to finish (GOAWAY)"
                    );
                    if connections.is_empty() {
                        return;
                    }
                }
                accepted = accept => match accepted {
                    Ok((tcp, src_addr)) => {
                        let inner = self.inner.clone();
                        let span = tracing::info_span!("tunnel_inbound", src = %src_addr);
                        let stop = for_connections.clone();
                        connections.spawn(
                            async move { inner.serve_connection(tcp, src_addr, stop).await }
                                .instrument(span),
                        );
                    }
                    Err(error) => {
                        tracing::warn!(%error, "tunnel listener: accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {
                    if listener.is_none() && connections.is_empty() {
                        return;
                    }
                }
            }
        }
    }
}

/// Returns once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

impl<H: InboundHandler> Inner<H> {
    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        src_addr: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) {
        // Tunnel streams carry interactive traffic too; do not hold back small writes.
        let _ = tcp.set_nodelay(true);
        let timeout = self.config.handshake_timeout;
        let (tls, established) = match tokio::time::timeout(timeout, self.handshake(tcp)).await {
            Ok(Ok(done)) => done,
            Ok(Err((failure, reason))) => {
                self.stats.handshake_failed(failure);
                tracing::warn!(%failure, %reason, "tunnel handshake failed");
                return;
            }
            Err(_) => {
                self.stats.handshake_failed(HandshakeFailure::Timeout);
                tracing::warn!(?timeout, "tunnel handshake timed out");
                return;
            }
        };
        self.stats.handshake_ok();
        let _open = self.stats.connection_opened();
        tracing::info!(
            peer = %established.peer,
            server_id = %established.server_id,
            "tunnel connection established"
        );

        let mut connection = match self.config.h2_server().handshake(tls).await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "tunnel connection: HTTP/2 handshake failed");
                return;
            }
        };
        let established = Arc::new(established);
        // Streams live in the connection's task set: when the server drops the connection, its
        // streams go with it.
        let mut streams = JoinSet::new();
        let mut closing = false;
        let mut keepalive = Keepalive::new(
            connection.ping_pong(),
            self.config.keepalive_interval,
            self.config.keepalive_timeout,
        );
        loop {
            tokio::select! {
                () = keepalive::dead(&mut keepalive) => {
                    self.stats.keepalive_failed();
                    tracing::warn!(
                        timeout = ?self.config.keepalive_timeout,
                        "tunnel connection closed: the client left a keepalive PING unanswered"
                    );
                    // Its streams cannot finish: end them with the connection.
                    streams.abort_all();
                    break;
                }
                _ = stopped(&mut stop), if !closing => {
                    closing = true;
                    // `accept` below then ends once the streams in progress have.
                    connection.graceful_shutdown();
                }
                request = connection.accept() => match request {
                    Some(Ok((request, respond))) => {
                        let inner = self.clone();
                        let established = established.clone();
                        let span = tracing::debug_span!(
                            "stream",
                            id = respond.stream_id().as_u32(),
                            dst = tracing::field::Empty,
                        );
                        streams.spawn(
                            async move {
                                inner
                                    .serve_stream(request, respond, &established, src_addr)
                                    .await
                            }
                            .instrument(span),
                        );
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "tunnel connection failed");
                        break;
                    }
                    None if closing => {
                        tracing::info!("tunnel connection finished after GOAWAY");
                        break;
                    }
                    None => {
                        tracing::info!("tunnel connection closed by the client");
                        break;
                    }
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        }
        // `accept` returns None only once no stream is left; after an error the streams fail
        // on their own. Either way, let them finish their clean-up.
        while streams.join_next().await.is_some() {}
    }

    /// TLS handshake, reading the SNI first so a failure for want of a certificate is counted
    /// as such and logged with the name asked for.
    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<(TlsStream<ReadAhead<TcpStream>>, Established), (HandshakeFailure, String)> {
        let start = LazyConfigAcceptor::new(Acceptor::default(), ReadAhead::new(tcp))
            .await
            .map_err(|e| handshake::classify(&e))?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        let wanted = id_from_server_name(sni.as_deref(), &self.trust_domain);
        let missing = match &wanted {
            Ok(id) if self.identities.current(id).is_none() => {
                Some(format!("no certificate held for {id} (asked for by SNI)"))
            }
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        let tls = match start.into_stream(self.tls.clone()).await {
            Ok(tls) => tls,
            // The resolver found nothing either (rustls has sent the client an alert).
            Err(_) if missing.is_some() => {
                return Err((HandshakeFailure::NoCertificate, missing.unwrap_or_default()));
            }
            Err(e) => return Err(handshake::classify(&e)),
        };
        // The SNI named an identity we hold, or the handshake could not have succeeded.
        let server_id = wanted.map_err(|e| (HandshakeFailure::NoCertificate, e.to_string()))?;
        let connection = tls.get_ref().1;
        let bad = |e: mesh_identity::PeerIdError| (HandshakeFailure::BadCertificate, e.to_string());
        let peer = peer_id(connection).map_err(bad)?;
        let peer_serial = peer_serial(connection).map_err(bad)?;
        Ok((
            tls,
            Established {
                peer,
                peer_serial,
                server_id,
            },
        ))
    }

    async fn serve_stream(
        &self,
        request: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        established: &Established,
        src_addr: SocketAddr,
    ) {
        if request.method() != Method::CONNECT {
            self.stats.request_invalid();
            tracing::debug!(method = %request.method(), "not a CONNECT: 405");
            let reason = format!("only CONNECT is served here, not {}", request.method());
            answer(&mut respond, StatusCode::METHOD_NOT_ALLOWED, &reason);
            return;
        }
        let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let dst: SocketAddr = match authority.parse() {
            Ok(dst) => dst,
            Err(_) => {
                self.stats.request_invalid();
                tracing::debug!(authority, "CONNECT authority is not ip:port: 400");
                let reason = format!("the CONNECT authority {authority:?} is not ip:port");
                answer(&mut respond, StatusCode::BAD_REQUEST, &reason);
                return;
            }
        };
        tracing::Span::current().record("dst", tracing::field::display(dst));
        let inbound = Inbound {
            peer: established.peer.clone(),
            peer_serial: established.peer_serial.clone(),
            server_id: established.server_id.clone(),
            dst,
            src_addr,
        };
        let upstream = match self.handler.handle(inbound).await {
            Decision::Accept(upstream) => Upstream::Other(upstream),
            Decision::Deliver(tcp) => Upstream::Tcp(tcp),
            Decision::Refuse { status, reason } => {
                self.stats.stream_refused();
                let status = StatusCode::from_u16(status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or_else(|| {
                        tracing::warn!(status, "handler refused with a non-error status: 500");
                        StatusCode::INTERNAL_SERVER_ERROR
                    });
                tracing::debug!(%status, %reason, "CONNECT refused");
                answer(&mut respond, status, &reason);
                return;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(error) => {
                tracing::debug!(%error, "client gone before the 200");
                return;
            }
        };
        let _open = self.stats.stream_opened();
        let mut tunnel = H2Stream::new(send, request.into_body(), self.stats.clone());
        tracing::debug!("CONNECT accepted");
        let relayed = match upstream {
            Upstream::Tcp(mut tcp) => {
                let (result, (to_client, from_client)) =
                    crate::relay::relay(&mut tunnel, &mut tcp, None).await;
                result.map(|()| (from_client, to_client))
            }
            Upstream::Other(mut other) => {
                tokio::io::copy_bidirectional_with_sizes(
                    &mut tunnel,
                    &mut other,
                    RELAY_BUFFER,
                    RELAY_BUFFER,
                )
                .await
            }
        };
        match relayed {
            Ok((from_client, to_client)) => {
                tracing::debug!(from_client, to_client, "tunnel stream done");
            }
            Err(error) => {
                // Whichever side failed, the client must not take the stream for complete.
                tunnel.reset(Reason::CANCEL);
                tracing::debug!(%error, "tunnel stream aborted");
            }
        }
    }
}

/// Where an accepted stream goes.
enum Upstream<S> {
    Tcp(TcpStream),
    Other(S),
}

/// Answers a stream with an error status and ends it.
fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode, reason: &str) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(&header_safe(reason)) {
        response.headers_mut().insert(REFUSAL_REASON_HEADER, value);
    }
    if let Err(error) = respond.send_response(response, true) {
        tracing::debug!(%error, "client gone before the refusal");
    }
}

/// Keeps a reason a valid header value: printable ASCII, bounded length.
fn header_safe(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(MAX_REASON_LEN)
        .collect()
}
