//! The tunnel client: opens CONNECT streams to peer nodes over pooled mutual-TLS HTTP/2
//! connections (see [`crate::pool`] for the pooling rules).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::Reason;
use http::{Method, Request, Uri};
use mesh_identity::tls::{client_config, peer_serial, server_name};
use mesh_identity::{Identities, SpiffeId, TrustBundle};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::Instrument;

use crate::config::{ConfigError, TunnelConfig};
use crate::error::TunnelError;
use crate::handshake::{self, Recorded};
use crate::keepalive::{self, Keepalive};
use crate::pool::{Conn, ConnShared, Key, KeyPool, Pool, Slot};
use crate::readahead::ReadAhead;
use crate::server::REFUSAL_REASON_HEADER;
use crate::stats::{HandshakeFailure, Open, TunnelStats};
use crate::stream::H2Stream;

/// Opens tunnel streams. Cheap to clone; clones share the pool and the counters.
#[derive(Clone)]
pub struct TunnelClient {
    inner: Arc<Inner>,
}

struct Inner {
    identities: Identities,
    bundle: TrustBundle,
    config: TunnelConfig,
    stats: Arc<TunnelStats>,
    pool: Pool,
    next_id: AtomicU64,
}

/// A stream that failed on a pooled connection in a way that says the connection is dead (or
/// the server did not take the stream), so it is safe to try once more on a new one.
enum OpenError {
    /// The connection that failed, to drop from the pool, and the error.
    Retryable(Arc<ConnShared>, TunnelError),
    Final(TunnelError),
}

impl TunnelClient {
    /// A client presenting certificates of `identities` and accepting servers whose
    /// certificates chain to `bundle`.
    pub fn new(
        identities: Identities,
        bundle: TrustBundle,
        config: TunnelConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(TunnelClient {
            inner: Arc::new(Inner {
                identities,
                bundle,
                config,
                stats: Arc::default(),
                pool: Pool::default(),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// The client's counters.
    pub fn stats(&self) -> &Arc<TunnelStats> {
        &self.inner.stats
    }

    /// Opens a stream to `dst` (the original destination) through the tunnel server at `peer`
    /// (the destination node's port 15008), as workload `src`, to a server that must prove it
    /// is `dst_id`. Reuses a pooled connection for the same (`src`, `dst_id`, `peer`) when one
    /// has room; if that connection turns out dead, retries once on a new connection.
    pub async fn connect(
        &self,
        src: &SpiffeId,
        dst_id: &SpiffeId,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Result<TunnelStream, TunnelError> {
        let key = Key {
            src: src.clone(),
            dst_id: dst_id.clone(),
            peer,
            thread: std::thread::current().id(),
        };
        let span = tracing::debug_span!("tunnel_outbound", %src, %dst_id, %peer, %dst);
        self.inner.connect(key, dst).instrument(span).await
    }
}

impl Inner {
    async fn connect(
        self: &Arc<Self>,
        key: Key,
        dst: SocketAddr,
    ) -> Result<TunnelStream, TunnelError> {
        let pool = self.pool.get(&key);
        let max_streams = self.config.max_streams_per_connection as usize;
        let mut retried = false;
        loop {
            let (slot, fresh) = match pool.checkout(max_streams) {
                Some(slot) => (slot, false),
                None => {
                    let _dialing = pool.dialing.lock().await;
                    match pool.checkout(max_streams) {
                        Some(slot) => (slot, false),
                        None => (self.dial(&key, &pool).await?, true),
                    }
                }
            };
            match self.open(slot, &key, dst).await {
                Ok(stream) => return Ok(stream),
                Err(OpenError::Retryable(conn, error)) if !fresh && !retried => {
                    tracing::debug!(
                        conn = conn.id,
                        %error,
                        "pooled tunnel connection is dead; retrying on a new one"
                    );
                    pool.remove(&conn);
                    retried = true;
                }
                Err(OpenError::Retryable(conn, error)) => {
                    pool.remove(&conn);
                    return Err(error);
                }
                Err(OpenError::Final(error)) => {
                    if let TunnelError::Refused { .. } = error {
                        self.stats.stream_refused();
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Connects, authenticates and starts HTTP/2 to the key's peer; pools the connection and
    /// returns its first slot.
    async fn dial(self: &Arc<Self>, key: &Key, pool: &Arc<KeyPool>) -> Result<Slot, TunnelError> {
        let tls = self.handshake(key).await?;
        let server_serial = peer_serial(tls.get_ref().1).unwrap_or_default();
        let (tls, tls_error) = Recorded::new(tls);
        let (send, connection) = self
            .config
            .h2_client()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| TunnelError::Http2 {
                peer: key.peer,
                source,
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ConnShared::new(id, server_serial, tls_error));
        tracing::info!(conn = id, serial = %shared.server_serial, "tunnel connection established");
        let open = self.stats.connection_opened();
        tokio::spawn(
            drive(
                self.clone(),
                key.clone(),
                pool.clone(),
                shared.clone(),
                connection,
                open,
            )
            .in_current_span(),
        );
        Ok(pool.insert(Arc::new(Conn { send, shared })))
    }

    async fn handshake(&self, key: &Key) -> Result<TlsStream<ReadAhead<TcpStream>>, TunnelError> {
        if self.identities.current(&key.src).is_none() {
            return Err(TunnelError::UnknownSource {
                src: key.src.clone(),
            });
        }
        let name = server_name(&key.dst_id)?;
        let config = client_config(
            &self.identities,
            key.src.clone(),
            &self.bundle,
            key.dst_id.clone(),
        )?;
        let connect_timeout = self.config.connect_timeout;
        let tcp = match tokio::time::timeout(connect_timeout, TcpStream::connect(key.peer)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(source)) => {
                return Err(TunnelError::Connect {
                    peer: key.peer,
                    source,
                });
            }
            Err(_) => {
                return Err(TunnelError::ConnectTimeout {
                    peer: key.peer,
                    after: connect_timeout,
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        let handshake = TlsConnector::from(config).connect(name, ReadAhead::new(tcp));
        let failed = |failure: HandshakeFailure, reason: String| {
            self.stats.handshake_failed(failure);
            tracing::warn!(%failure, %reason, "tunnel handshake failed");
            TunnelError::Handshake {
                peer: key.peer,
                src: key.src.clone(),
                dst_id: key.dst_id.clone(),
                failure,
                reason,
            }
        };
        match tokio::time::timeout(self.config.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => {
                self.stats.handshake_ok();
                Ok(tls)
            }
            Ok(Err(error)) => {
                let (failure, reason) = handshake::classify(&error);
                Err(failed(failure, reason))
            }
            Err(_) => Err(failed(
                HandshakeFailure::Timeout,
                format!("no answer within {:?}", self.config.handshake_timeout),
            )),
        }
    }

    /// Sends the CONNECT on the slot's connection and waits for the answer.
    async fn open(
        &self,
        slot: Slot,
        key: &Key,
        dst: SocketAddr,
    ) -> Result<TunnelStream, OpenError> {
        let peer = key.peer;
        let mut send = slot.conn.send.clone();
        let conn = slot.conn.shared.clone();
        let http2 = |source: h2::Error| {
            // A reset the server chose (other than "not processed") is its answer; anything
            // else means the connection is gone before the stream started.
            let retryable = !(source.is_reset()
                && source.is_remote()
                && source.reason() != Some(Reason::REFUSED_STREAM));
            let alert = conn
                .tls_error
                .get()
                .filter(|e| matches!(e, rustls::Error::AlertReceived(_)))
                .map(handshake::classify_tls);
            let error = match alert {
                // TLS 1.3: the server's refusal of our certificate arrives on the first read.
                Some((failure, reason)) => {
                    self.stats.handshake_failed(failure);
                    TunnelError::Handshake {
                        peer,
                        src: key.src.clone(),
                        dst_id: key.dst_id.clone(),
                        failure,
                        reason,
                    }
                }
                None => TunnelError::Http2 { peer, source },
            };
            if retryable && !matches!(error, TunnelError::Handshake { .. }) {
                OpenError::Retryable(conn.clone(), error)
            } else {
                OpenError::Final(error)
            }
        };
        let answer = async {
            poll_fn(|cx| send.poll_ready(cx)).await.map_err(http2)?;
            let (response, send_stream) = send
                .send_request(connect_request(dst), false)
                .map_err(http2)?;
            let response = response.await.map_err(http2)?;
            Ok::<_, OpenError>((response, send_stream))
        };
        let timeout = self.config.connect_timeout;
        let (response, send_stream) = match tokio::time::timeout(timeout, answer).await {
            Ok(answer) => answer?,
            Err(_) => {
                return Err(OpenError::Final(TunnelError::OpenTimeout {
                    peer,
                    dst,
                    after: timeout,
                }));
            }
        };
        let status = response.status();
        if status != http::StatusCode::OK {
            let reason = response
                .headers()
                .get(REFUSAL_REASON_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            tracing::debug!(%status, %reason, "CONNECT refused");
            return Err(OpenError::Final(TunnelError::Refused {
                status: status.as_u16(),
                reason,
            }));
        }
        tracing::debug!(conn = slot.conn.shared.id, "CONNECT accepted");
        Ok(TunnelStream {
            io: H2Stream::new(send_stream, response.into_body(), self.stats.clone()),
            src_id: key.src.clone(),
            server_id: key.dst_id.clone(),
            server_serial: slot.conn.shared.server_serial.clone(),
            read: 0,
            written: 0,
            peer,
            dst,
            _open: self.stats.stream_opened(),
            slot,
        })
    }
}

/// `CONNECT ip:port` (authority form; IPv6 in brackets, as `SocketAddr` prints it).
fn connect_request(dst: SocketAddr) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    // A socket address always makes a valid authority.
    if let Ok(uri) = Uri::builder().authority(dst.to_string()).build() {
        *request.uri_mut() = uri;
    }
    request
}

/// Runs one connection until it fails, the server closes it, or it idles out; removes it from
/// the pool then.
async fn drive(
    client: Arc<Inner>,
    key: Key,
    pool: Arc<KeyPool>,
    shared: Arc<ConnShared>,
    mut connection: h2::client::Connection<Recorded<TlsStream<ReadAhead<TcpStream>>>, Bytes>,
    _open: Open,
) {
    let idle_timeout = client.config.idle_timeout;
    let mut keepalive = Keepalive::new(
        connection.ping_pong(),
        client.config.keepalive_interval,
        client.config.keepalive_timeout,
    );
    loop {
        let idle_deadline = shared.idle_since().map(|since| since + idle_timeout);
        tokio::select! {
            () = keepalive::dead(&mut keepalive) => {
                pool.remove(&shared);
                client.stats.keepalive_failed();
                tracing::warn!(
                    conn = shared.id,
                    timeout = ?client.config.keepalive_timeout,
                    "tunnel connection closed: the peer left a keepalive PING unanswered"
                );
                break;
            }
            result = &mut connection => {
                pool.remove(&shared);
                match result {
                    Ok(()) => tracing::info!(conn = shared.id, "tunnel connection closed"),
                    Err(error) => tracing::warn!(conn = shared.id, %error, "tunnel connection failed"),
                }
                break;
            }
            _ = sleep_until(idle_deadline) => {
                if pool.remove_if_idle(&shared, idle_timeout) {
                    tracing::info!(conn = shared.id, ?idle_timeout, "closing idle tunnel connection");
                    // The pool held the last handle to open streams; without it h2 sends GOAWAY
                    // and closes once the connection is driven a little further.
                    let _ = tokio::time::timeout(idle_timeout, &mut connection).await;
                    break;
                }
            }
            // The last stream ended: recompute the idle deadline.
            _ = shared.idle.notified() => {}
        }
    }
    client.pool.forget_if_empty(&key, &pool);
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One tunneled connection: read and write the destination's bytes; `shutdown()` half-closes
/// (END_STREAM); dropping it before both sides finished resets the stream.
pub struct TunnelStream {
    io: H2Stream,
    src_id: SpiffeId,
    server_id: SpiffeId,
    /// Payload bytes read and written so far.
    read: u64,
    written: u64,
    server_serial: Arc<str>,
    peer: SocketAddr,
    dst: SocketAddr,
    _open: Open,
    // Declared last so the stream's h2 handles drop before the slot frees the connection.
    slot: Slot,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("server_id", &self.server_id)
            .field("peer", &self.peer)
            .field("dst", &self.dst)
            .field("conn", &self.slot.conn.shared.id)
            .field("io", &self.io)
            .finish()
    }
}

impl TunnelStream {
    /// The identity this client presented (the source workload's).
    pub fn src_id(&self) -> &SpiffeId {
        &self.src_id
    }

    /// Payload bytes read out of the stream so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Payload bytes written into the stream so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The identity the server proved (the destination workload's).
    pub fn server_id(&self) -> &SpiffeId {
        &self.server_id
    }

    /// The serial number of the certificate the server presented (lowercase hex).
    pub fn server_serial(&self) -> &str {
        &self.server_serial
    }

    /// The peer node's tunnel address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The original destination carried in the CONNECT.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Relays between this stream and `tcp` until both directions are done, half-closing each
    /// side when the other ends, with no copy of the bytes in between (see [`crate::relay`]).
    /// With `idle`, fails with `TimedOut` once no byte moved either way for that long. Returns
    /// the bytes moved (from `tcp` into the tunnel, from the tunnel to `tcp`).
    pub async fn relay(
        &mut self,
        tcp: &mut TcpStream,
        idle: Option<std::time::Duration>,
    ) -> io::Result<(u64, u64)> {
        let (result, (written, read)) = crate::relay::relay(&mut self.io, tcp, idle).await;
        // What moved before a failure is counted too.
        self.written += written;
        self.read += read;
        result.map(|()| (written, read))
    }

    /// Which pooled connection carries the stream (streams with the same id share one TLS
    /// connection).
    pub fn connection_id(&self) -> u64 {
        self.slot.conn.shared.id
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written += *n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
