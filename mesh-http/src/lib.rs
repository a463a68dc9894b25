//! The HTTP layer of the Skiff data plane: serves captured client connections that the agent
//! detected as HTTP/1.x or HTTP/2 with prior knowledge (h2c, gRPC), and routes every request
//! with the Gateway API (GAMMA) policy of [`mesh_policy`].
//!
//! The agent calls [`Proxy::serve`] with the accepted socket, the bytes it already read for
//! protocol detection and the connection's original destination (a Service `VIP:port` or a
//! pod `IP:port`). For each request (each HTTP/1 request on a keep-alive connection, each HTTP/2
//! stream) the proxy takes the current policy snapshot, so long-lived connections follow
//! reloads, and then:
//!
//! 1. routes it with [`mesh_policy::Compiled::route_http`] (or `route_grpc` for gRPC over
//!    HTTP/2): no attached route forwards to the Service itself, no matching route answers 404;
//! 2. applies the rule's filters in Gateway API order: redirect (answered here), URL rewrite,
//!    request header modifier, response header modifier, request mirror; then picks a weighted
//!    backend and applies that backendRef's own filters (no usable backend answers 500);
//! 3. injects `x-request-id`, W3C `traceparent`, `x-forwarded-for`/`-proto` and the
//!    MeshPolicy's fixed headers, and removes hop-by-hop headers;
//! 4. picks an endpoint by least-request power of two choices, skipping endpoints that passive
//!    outlier detection ejected, and sends with the rule's timeouts (504), retrying connect
//!    failures and resets within a retry budget;
//! 5. streams the response back (trailers, upgrades and `CONNECT` tunnels included) and writes
//!    one access log line when it ends.
//!
//! HTTP/1.1 connections start on a fast path without hyper (`h1`) for requests in origin form
//! with no body or a small `Content-Length` body; it makes the same decisions with the same
//! functions, and hands the connection to hyper at the first request it does not take.
//!
//! HTTP/1 input passes a strict scanner first (see `guard`): ambiguous framing, malformed
//! heads and Host fields (RFC 9112) that hyper would tolerate are answered 400 with
//! `Connection: close` before any routing, and a malformed chunked body is answered 400 unless
//! a response has started. Each refusal is counted by [`Rejection`] in [`Stats`] and logged
//! once, at debug level, with its reason; the connection then ends with [`Error::Rejected`].
//!
//! Answers the proxy gives itself: 400 malformed or ambiguous request, 404 no matching
//! route, 431 head too large or too many headers (HTTP/2: header list too large), 500 no usable
//! backend, 502 the endpoint did not speak HTTP, 503 no endpoint or all ejected, connect
//! failure or reset before response headers (after retries), 504 route or backend-request
//! timeout. gRPC requests get these as trailers-only `grpc-status` answers instead. A client
//! that starts an HTTP/1 request head and does not finish it within
//! [`Config::header_read_timeout`] is disconnected without an answer (hyper offers no way to
//! write a 408 into a half-read head); an idle keep-alive connection is only subject to
//! [`Config::idle_timeout`].
#![forbid(unsafe_code)]

mod balance;
mod body;
mod config;
mod dial;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod gate;
mod guard;
mod h1;
pub mod headers;
mod io;
mod proxy;
mod rejection;
mod stats;
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_policy::PolicyStore;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::Instrument;

pub use balance::{Balancer, EndpointState, InFlight, Pick};
pub use config::{
    Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_H2_MAX_CONCURRENT_STREAMS,
    DEFAULT_H2_MAX_HEADER_LIST_SIZE, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADERS, Resilience,
};
pub use dial::{BoxedIo, Dial, Dialer, Dialing, Io, Route};
pub use rejection::Rejection;
pub use stats::{Stats, StatsSnapshot};

/// Receives one call per finished request, when its access-log line is written (for metrics
/// with route and method labels).
pub trait Observer: Send + Sync + std::fmt::Debug + 'static {
    /// One finished request.
    fn request(&self, record: &RequestRecord<'_>);
}

/// What an [`Observer`] learns about a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// The route that matched (`HTTPRoute namespace/name`), if one did.
    pub route: Option<&'a str>,
    /// The request method.
    pub method: &'a http::Method,
    /// The status sent to the client (0 if none was).
    pub status: u16,
    /// From the request head to the end of the response body.
    pub duration: std::time::Duration,
}

use crate::balance::RetryBudget;
use crate::config::{
    H2_MAX_LOCAL_ERROR_RESET_STREAMS, H2_MAX_PENDING_ACCEPT_RESET_STREAMS, MAX_MIRRORS_IN_FLIGHT,
};
use crate::guard::HeadScanner;
use crate::io::{ClientIo, ConnState, now_ms};
use crate::proxy::{ConnCtx, Shared};
use crate::upstream::Upstream;

/// Why serving a client connection ended badly. Per-request problems (no route, upstream
/// failures, timeouts) are answered with a status and are not errors of the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client sent a request with ambiguous framing or malformed syntax; it was answered
    /// 400 (if no response had started) and the connection closed. A refused head never
    /// reached a backend; a refused chunked body was abandoned unfinished upstream.
    #[error("client {src} sent a malformed request: {reason}")]
    Rejected {
        /// Client address.
        src: SocketAddr,
        /// What was wrong.
        reason: Rejection,
    },
    /// The client did not complete a request head in time; the connection was closed.
    #[error("client {src} did not complete a request head within {timeout:?}")]
    HeaderTimeout {
        /// Client address.
        src: SocketAddr,
        /// The configured header read timeout.
        timeout: Duration,
    },
    /// The client connection failed at the HTTP level (protocol error, reset, limit).
    #[error("client {src}: {source}")]
    Downstream {
        /// Client address.
        src: SocketAddr,
        /// hyper's account.
        #[source]
        source: hyper::Error,
    },
}

/// What happened on a served connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnSummary {
    /// Requests received (HTTP/1 requests or HTTP/2 streams).
    pub requests: u64,
    /// The connection was left, idle, for another process to serve (see
    /// [`Proxy::serve_movable`]): the caller holds a copy of the socket to hand over.
    pub moved: bool,
}

/// The HTTP proxy. Cheap to clone; clones share upstream pools, endpoint health, the retry
/// budget and [`Stats`].
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

/// Drives a hyper server connection while watching the header read and idle timeouts.
macro_rules! drive {
    ($conn:expr, $state:expr, $config:expr, $h1:expr, $src:expr, $stats:expr, $moving:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let mut moving: Option<tokio::sync::watch::Receiver<bool>> = $moving;
        let mut move_requested = false;
        let state: &ConnState = &$state;
        let header_ms = u64::try_from($config.header_read_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle_ms = u64::try_from($config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        // A head may start at any time on HTTP/1, so its timeout is polled; the idle deadline
        // only moves later with activity, so sleeping until it is enough.
        let head_tick = u64::try_from(($config.header_read_timeout / 4).as_millis())
            .unwrap_or(u64::MAX)
            .clamp(10, 1000);
        let mut shutting_down = false;
        loop {
            let sleep = {
                let now = now_ms();
                let mut next = if shutting_down {
                    u64::MAX
                } else {
                    state
                        .last_activity
                        .load(Ordering::Relaxed)
                        .saturating_add(idle_ms)
                        .max(now)
                };
                if $h1 {
                    next = next.min(now + head_tick);
                }
                if move_requested {
                    // Waiting for the gap between two requests.
                    next = now + 1;
                }
                Duration::from_millis(next.saturating_sub(now).clamp(1, 3_600_000))
            };
            let asked = async {
                match moving.as_mut() {
                    Some(m) => m.wait_for(|v| *v).await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = conn.as_mut() => break result.map(|()| false).map_err(|source| Error::Downstream { src: $src, source }),
                asked = asked, if !move_requested => {
                    if !asked {
                        // No one will ask any more.
                        moving = None;
                    } else if $h1 {
                        move_requested = true;
                    } else {
                        // HTTP/2 does not move: GOAWAY, and the streams in flight finish here.
                        tracing::debug!("handing over: GOAWAY");
                        conn.as_mut().graceful_shutdown();
                        shutting_down = true;
                        moving = None;
                    }
                }
                () = tokio::time::sleep(sleep) => {
                    let now = now_ms();
                    let active = state.active.load(Ordering::Relaxed);
                    let started = state.head_started.load(Ordering::Relaxed);
                    if $h1 && active == 0 && started != 0 && now + 1 - started >= header_ms {
                        $stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(Error::HeaderTimeout {
                            src: $src,
                            timeout: $config.header_read_timeout,
                        });
                    }
                    // Between two requests, with nothing read ahead and nothing left unwritten:
                    // hyper holds no bytes of this connection, the socket can move.
                    if move_requested
                        && !shutting_down
                        && active == 0
                        && started == 0
                        && !state.write_blocked.load(Ordering::Relaxed)
                    {
                        break Ok(true);
                    }
                    let last = state.last_activity.load(Ordering::Relaxed);
                    if !shutting_down && active == 0 && now.saturating_sub(last) >= idle_ms {
                        tracing::debug!("closing idle connection");
                        conn.as_mut().graceful_shutdown();
                        shutting_down = true;
                    }
                }
            }
        }
    }};
}

impl Proxy {
    /// A proxy with the default [`Resilience`].
    pub fn new(config: Config, policy: Arc<PolicyStore>) -> Self {
        Self::with_resilience(config, policy, Resilience::default())
    }

    /// A proxy with explicit retry and outlier-detection settings.
    pub fn with_resilience(
        config: Config,
        policy: Arc<PolicyStore>,
        resilience: Resilience,
    ) -> Self {
        let shared = Shared {
            upstream: Upstream::new(config.connect_timeout),
            budget: RetryBudget::new(&resilience),
            balancer: Balancer::new(resilience),
            config,
            policy,
            stats: Arc::new(Stats::default()),
            mirrors: Arc::new(Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            observer: None,
            dialer: None,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Adds an [`Observer`]; call before the proxy serves (clones made earlier keep none).
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.observer = Some(observer);
        }
        self
    }

    /// Adds a [`Dialer`]: upstream connections to the endpoints it routes go its way (the mTLS
    /// tunnel) instead of plain TCP. Call before the proxy serves (clones made earlier keep
    /// none).
    #[must_use]
    pub fn with_dialer(mut self, dialer: Arc<dyn Dialer>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.dialer = Some(dialer);
        }
        self
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The endpoint registry, to be shared with the agent's TCP path (one view of endpoint
    /// health and load for both).
    pub fn balancer(&self) -> Balancer {
        self.shared.balancer.clone()
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Serves one captured client connection until it closes. `prefix` holds the bytes the
    /// agent already read from `client` for protocol detection (they are replayed first). `h2`
    /// is true when the client sent the HTTP/2 prior-knowledge preface. `src` is the client
    /// address, `dst` the original destination.
    pub async fn serve(
        &self,
        client: TcpStream,
        prefix: Vec<u8>,
        src: SocketAddr,
        dst: SocketAddr,
        h2: bool,
    ) -> Result<ConnSummary, Error> {
        let _ = client.set_nodelay(true);
        self.serve_io(client, prefix, src, dst, h2, None).await
    }

    /// Serves HTTP that came through the mTLS tunnel to this node's pod `dst`, from a client
    /// whose identity the tunnel authenticated (`source`; `src` is the tunnel's remote
    /// address). Each request is checked against the policy's HTTP deny rules with that
    /// identity (403 when one matches, counted in [`Stats::denied_tunneled`]); the others go
    /// to the pod as they are, over `pod` (already connected) and, once the pod closes it, a
    /// new connection. No routing, filters or header injection: the sending agent did those.
    /// `prefix` holds the bytes already read from `client`; `h2`: they are the HTTP/2 preface.
    #[allow(clippy::too_many_arguments)]
    pub async fn serve_tunneled<S>(
        &self,
        client: S,
        prefix: Vec<u8>,
        h2: bool,
        source: Option<mesh_policy::Identity>,
        src: SocketAddr,
        dst: SocketAddr,
        pod: TcpStream,
    ) -> Result<ConnSummary, Error>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let shared = &self.shared;
        let config = &shared.config;
        let _ = pod.set_nodelay(true);
        let state = Arc::new(ConnState::new(!h2));
        let gate = Arc::new(gate::Gate::new(
            shared.clone(),
            source,
            src,
            dst,
            h2,
            state.clone(),
            pod,
        ));
        let scanner = (!h2).then(|| HeadScanner::new(config.max_header_bytes, config.max_headers));
        let io = TokioIo::new(ClientIo::new(
            client,
            prefix,
            scanner,
            state.clone(),
            shared.stats.clone(),
        ));
        let service = service_fn(move |request| {
            let gate = gate.clone();
            async move { Ok::<_, Infallible>(gate.handle(request).await) }
        });
        let watched = state.clone();
        let span = tracing::debug_span!("tunneled", %src, %dst, h2);
        let served = async move {
            if h2 {
                let builder = h2_server(config);
                drive!(
                    builder.serve_connection(io, service),
                    watched,
                    config,
                    false,
                    src,
                    shared.stats,
                    None
                )
            } else {
                let builder = h1_server(config);
                drive!(
                    builder.serve_connection(io, service).with_upgrades(),
                    watched,
                    config,
                    true,
                    src,
                    shared.stats,
                    None
                )
            }
        };
        let result = served.instrument(span).await.map(|_| ());
        let summary = ConnSummary {
            requests: state.requests.load(Ordering::Relaxed),
            moved: false,
        };
        match (result, state.rejection()) {
            (Ok(()) | Err(Error::Downstream { .. }), Some(reason)) => {
                Err(Error::Rejected { src, reason })
            }
            (Ok(()), None) => Ok(summary),
            (Err(error), _) => Err(error),
        }
    }

    /// [`Proxy::serve`] for a connection that may have to move to another process (the agent's
    /// handover): once `moving` turns true, an HTTP/1 connection ends at its next gap between
    /// requests, when hyper holds none of its bytes, and the summary says `moved` (the socket
    /// is closed here, so the caller keeps a duplicate of it to pass on); an HTTP/2 connection
    /// gets GOAWAY and its streams finish here. `resumed`: the connection moved here idle,
    /// between two requests, so no request head is due yet (the idle timeout applies, not the
    /// header timeout).
    #[allow(clippy::too_many_arguments)]
    pub async fn serve_movable(
        &self,
        client: TcpStream,
        prefix: Vec<u8>,
        src: SocketAddr,
        dst: SocketAddr,
        h2: bool,
        moving: tokio::sync::watch::Receiver<bool>,
        resumed: bool,
    ) -> Result<ConnSummary, Error> {
        let _ = client.set_nodelay(true);
        self.serve_conn(client, prefix, src, dst, h2, Some(moving), resumed)
            .await
    }

    /// [`Proxy::serve`] over any byte stream: what the fuzz targets drive, over an in-memory
    /// pipe.
    #[doc(hidden)]
    pub async fn serve_io<S>(
        &self,
        client: S,
        prefix: Vec<u8>,
        src: SocketAddr,
        dst: SocketAddr,
        h2: bool,
        moving: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<ConnSummary, Error>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        self.serve_conn(client, prefix, src, dst, h2, moving, false)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_conn<S>(
        &self,
        client: S,
        prefix: Vec<u8>,
        src: SocketAddr,
        dst: SocketAddr,
        h2: bool,
        moving: Option<tokio::sync::watch::Receiver<bool>>,
        resumed: bool,
    ) -> Result<ConnSummary, Error>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let shared = &self.shared;
        let config = &shared.config;
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(!h2 && !resumed));
        let ctx = Arc::new(ConnCtx {
            shared: shared.clone(),
            src,
            dst,
            h2,
            state: state.clone(),
        });
        let span = tracing::debug_span!("http", %src, %dst, h2);
        let mut client = client;
        let mut moving = moving;
        let mut prefix = prefix;
        // HTTP/1 starts on the fast path; hyper takes over at the first request it leaves.
        let mut fast_requests = 0;
        if !h2 {
            let (served, end) = h1::serve(&ctx, &mut client, prefix, &mut moving, resumed)
                .instrument(span.clone())
                .await;
            fast_requests = served;
            match end? {
                h1::End::Closed => {
                    return Ok(ConnSummary {
                        requests: served,
                        moved: false,
                    });
                }
                h1::End::Moved => {
                    return Ok(ConnSummary {
                        requests: served,
                        moved: true,
                    });
                }
                h1::End::Hyper(read) => prefix = read,
            }
        }
        let scanner = (!h2).then(|| HeadScanner::new(config.max_header_bytes, config.max_headers));
        let io = TokioIo::new(ClientIo::new(
            client,
            prefix,
            scanner,
            state.clone(),
            shared.stats.clone(),
        ));
        // hyper's h2 server moves each stream's future by value several times (into the
        // stream's state, into the task it spawns): it gets this small one, and the request's
        // own state machine (kilobytes) is put on the heap once, at the first poll.
        let service = service_fn(move |request| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(Box::pin(ctx.handle(request)).await) }
        });
        let watched = state.clone();
        let served = async move {
            if h2 {
                let builder = h2_server(config);
                drive!(
                    builder.serve_connection(io, service),
                    watched,
                    config,
                    false,
                    src,
                    shared.stats,
                    moving
                )
            } else {
                let builder = h1_server(config);
                drive!(
                    builder.serve_connection(io, service).with_upgrades(),
                    watched,
                    config,
                    true,
                    src,
                    shared.stats,
                    moving
                )
            }
        };
        let result = served.instrument(span).await;
        let moved = matches!(result, Ok(true));
        let result = result.map(|_| ());
        let summary = ConnSummary {
            requests: fast_requests + state.requests.load(Ordering::Relaxed),
            moved,
        };
        // A refusal is what the connection ended with, whether hyper then reported an error
        // (a poisoned head) or closed cleanly after the 400.
        match (result, state.rejection()) {
            (Ok(()) | Err(Error::Downstream { .. }), Some(reason)) => {
                Err(Error::Rejected { src, reason })
            }
            (Ok(()), None) => Ok(summary),
            (Err(error), _) => Err(error),
        }
    }
}

/// The HTTP/2 server settings of every downstream connection (captured or tunneled).
fn h2_server(config: &Config) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.h2_max_concurrent_streams)
        .max_header_list_size(config.h2_max_header_list_size)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS);
    builder
}

/// The HTTP/1 server settings of every downstream connection (captured or tunneled); the head
/// timeout is the proxy's own.
fn h1_server(config: &Config) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_headers(config.max_headers)
        .max_header_size(config.max_header_bytes)
        .keep_alive(true);
    builder
}
