//! Connections to endpoints: a pooled HTTP/1 client (hyper-util's legacy client, pooled by the
//! endpoint `ip:port` used as URI authority), a pool of multiplexed HTTP/2 connections (one per
//! endpoint and thread, so that `:authority` can stay the client's while the TCP connection goes
//! to the endpoint), and one-off HTTP/1 connections for upgrades and `CONNECT`.
//!
//! An endpoint the [`crate::Dialer`] routes another way (the mTLS tunnel) is reached through
//! its [`Route`]: the fast path's and the HTTP/2 pools then key connections by the endpoint and
//! the route's key, so that connections opened for one source identity serve no other; hyper's
//! HTTP/1 requests along a route (hyper's own pool knows only the URI
//! authority) are pooled here by the same key.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::UPSTREAM_POOL_IDLE_TIMEOUT;
use crate::dial::{BoxedIo, Route};

/// Boxed error of bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used on both sides of the proxy.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Why an upstream attempt failed before response headers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection: refused, unreachable or timed out. The request was not sent.
    #[error("connect to {endpoint}: {reason}")]
    Connect {
        endpoint: SocketAddr,
        reason: String,
    },
    /// The connection broke before response headers; the request may have been processed.
    #[error("{endpoint} reset before response headers: {reason}")]
    Reset {
        endpoint: SocketAddr,
        reason: String,
    },
    /// The endpoint answered something that is not HTTP.
    #[error("{endpoint} sent an invalid response: {reason}")]
    Protocol {
        endpoint: SocketAddr,
        reason: String,
    },
    /// The destination's agent refused the connection by its policy (the mTLS tunnel's 403):
    /// not the endpoint's fault, and not worth another endpoint of the same policy.
    #[error("connect to {endpoint}: {reason}")]
    Denied {
        endpoint: SocketAddr,
        reason: String,
    },
}

/// One HTTP/1.1 connection's request handle.
type H1Sender = hyper::client::conn::http1::SendRequest<Body>;

/// What a pooled connection is kept under: the endpoint, and the key of the route it was
/// opened along (`None`: plain TCP).
type PoolKey = (SocketAddr, Option<Arc<str>>);

fn pool_key(endpoint: SocketAddr, route: Option<&Route>) -> PoolKey {
    (endpoint, route.map(|r| r.key().clone()))
}

/// An upstream connection of the fast path: plain TCP, or opened along a [`Route`].
pub(crate) enum UpstreamIo {
    Tcp(TcpStream),
    Routed(BoxedIo),
}

impl UpstreamIo {
    /// Whether an idle connection is still open: the endpoint may have closed it (its FIN, or
    /// stray bytes, make it readable).
    fn is_open(&mut self) -> bool {
        match self {
            UpstreamIo::Tcp(stream) => is_open(stream),
            UpstreamIo::Routed(io) => {
                // One poll without a task to wake: pending means nothing arrived.
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Routed(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Routed(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Routed(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Routed(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Routed(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tcp(s) => s.is_write_vectored(),
            UpstreamIo::Routed(s) => s.is_write_vectored(),
        }
    }
}

fn classify_hyper(endpoint: SocketAddr, error: &hyper::Error) -> SendError {
    let reason = error.to_string();
    if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
        SendError::Protocol { endpoint, reason }
    } else {
        SendError::Reset { endpoint, reason }
    }
}

/// Finds the innermost [`hyper::Error`] of an error chain.
fn find_hyper<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        current = e.source();
    }
    None
}

/// All upstream clients. The pools are per thread: the agent serves a connection on the
/// worker thread that accepted it, and a pooled upstream connection is driven by a task on the
/// thread that opened it, so a request only ever takes upstream connections of its own thread
/// (no cross-thread wake-up per request, no lock shared between threads).
pub(crate) struct Upstream {
    /// Tells this proxy's pools apart from other proxies' in the same thread; the pools of a
    /// dropped proxy are pruned once its marker is gone.
    id: Arc<()>,
    connect_timeout: Duration,
}

/// One thread's pools for one [`Upstream`].
struct Pools {
    owner: Weak<()>,
    h1: Client<HttpConnector, Body>,
    h2: HashMap<PoolKey, SendRequest<Body>>,
    /// Idle HTTP/1.1 connections of the fast path (`crate::h1`), newest last.
    raw: HashMap<PoolKey, Vec<(UpstreamIo, Instant)>>,
    /// HTTP/1.1 connections along a route for hyper's path, busy or idle, newest last: the
    /// legacy client's pool keys by URI authority alone, which cannot tell routes apart.
    h1_routed: HashMap<PoolKey, Vec<(H1Sender, Instant)>>,
    /// A task closes this thread's idle fast-path connections once they expire.
    reaping: bool,
}

/// How long an idle fast-path connection is kept.
const RAW_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes the expired idle connections of `owner`'s pools on this thread, every few seconds,
/// until the proxy is gone; so that connections kept for reuse do not outlive the traffic.
async fn reap(owner: Weak<()>) {
    loop {
        tokio::time::sleep(RAW_IDLE_TIMEOUT / 2).await;
        if owner.strong_count() == 0 {
            return;
        }
        let now = Instant::now();
        POOLS.with(|pools| {
            for p in pools.borrow_mut().iter_mut() {
                if std::ptr::eq(p.owner.as_ptr(), owner.as_ptr()) {
                    for idle in p.raw.values_mut() {
                        idle.retain(|(_, since)| now.duration_since(*since) < RAW_IDLE_TIMEOUT);
                    }
                    p.raw.retain(|_, idle| !idle.is_empty());
                    for kept in p.h1_routed.values_mut() {
                        kept.retain(|(s, since)| {
                            !s.is_closed() && now.duration_since(*since) < RAW_IDLE_TIMEOUT
                        });
                    }
                    p.h1_routed.retain(|_, kept| !kept.is_empty());
                }
            }
        });
    }
}

/// Idle fast-path connections kept per endpoint and thread.
const RAW_IDLE_PER_ENDPOINT: usize = 64;

thread_local! {
    static POOLS: RefCell<Vec<Pools>> = const { RefCell::new(Vec::new()) };
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Whether an idle connection is still open: the endpoint may have closed it (its FIN, or
/// stray bytes, make the socket readable; tokio answers from the readiness it already knows,
/// without a system call when nothing arrived).
fn is_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

impl Upstream {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Self {
            id: Arc::new(()),
            connect_timeout,
        }
    }

    /// Runs `f` on this thread's pools, made on first use.
    fn with_pools<T>(&self, f: impl FnOnce(&mut Pools) -> T) -> T {
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            let mine = match pools
                .iter()
                .position(|p| std::ptr::eq(p.owner.as_ptr(), Arc::as_ptr(&self.id)))
            {
                Some(i) => i,
                None => {
                    pools.retain(|p| p.owner.strong_count() > 0);
                    let mut connector = HttpConnector::new();
                    connector.set_connect_timeout(Some(self.connect_timeout));
                    connector.set_nodelay(true);
                    connector.enforce_http(true);
                    let h1 = Client::builder(TokioExecutor::new())
                        .pool_timer(TokioTimer::new())
                        .pool_idle_timeout(UPSTREAM_POOL_IDLE_TIMEOUT)
                        .pool_max_idle_per_host(64)
                        .build(connector);
                    pools.push(Pools {
                        owner: Arc::downgrade(&self.id),
                        h1,
                        h2: HashMap::new(),
                        raw: HashMap::new(),
                        h1_routed: HashMap::new(),
                        reaping: false,
                    });
                    pools.len() - 1
                }
            };
            f(&mut pools[mine])
        })
    }

    /// An idle HTTP/1.1 connection to `endpoint` (along `route`) from this thread's pool that
    /// is still open and not idle for too long, or a new one. The flag says whether it was
    /// reused.
    pub(crate) async fn checkout(
        &self,
        endpoint: SocketAddr,
        route: Option<&Route>,
    ) -> Result<(UpstreamIo, bool), SendError> {
        let key = pool_key(endpoint, route);
        let pooled = self.with_pools(|p| {
            let idle = p.raw.get_mut(&key)?;
            while let Some((mut stream, since)) = idle.pop() {
                if since.elapsed() < RAW_IDLE_TIMEOUT && stream.is_open() {
                    return Some(stream);
                }
            }
            None
        });
        match pooled {
            Some(stream) => Ok((stream, true)),
            None => Ok((self.connect_conn(endpoint, route).await?, false)),
        }
    }

    /// Returns a connection whose last response was read to its end, ready for another
    /// request; `route` is the one it was opened along.
    pub(crate) fn checkin(&self, endpoint: SocketAddr, route: Option<&Route>, stream: UpstreamIo) {
        let key = pool_key(endpoint, route);
        self.with_pools(|p| {
            let idle = p.raw.entry(key).or_default();
            let now = Instant::now();
            // Oldest first: only the head of the list can have expired.
            let expired = idle
                .iter()
                .take_while(|(_, since)| now.duration_since(*since) >= RAW_IDLE_TIMEOUT)
                .count();
            idle.drain(..expired);
            if idle.len() < RAW_IDLE_PER_ENDPOINT {
                idle.push((stream, now));
            }
            if !p.reaping {
                p.reaping = true;
                tokio::spawn(reap(p.owner.clone()));
            }
        });
    }

    /// A new connection to `endpoint`: along `route`, or plain TCP.
    pub(crate) async fn connect_conn(
        &self,
        endpoint: SocketAddr,
        route: Option<&Route>,
    ) -> Result<UpstreamIo, SendError> {
        let Some(route) = route else {
            return Ok(UpstreamIo::Tcp(self.connect(endpoint).await?));
        };
        let dialed = tokio::time::timeout(self.connect_timeout, route.dial(endpoint))
            .await
            .map_err(|_| SendError::Connect {
                endpoint,
                reason: format!("timed out after {:?}", self.connect_timeout),
            })?;
        match dialed {
            Ok(io) => Ok(UpstreamIo::Routed(io)),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(SendError::Denied {
                endpoint,
                reason: e.to_string(),
            }),
            Err(e) => Err(SendError::Connect {
                endpoint,
                reason: e.to_string(),
            }),
        }
    }

    pub(crate) async fn connect(&self, endpoint: SocketAddr) -> Result<TcpStream, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint))
            .await
            .map_err(|_| SendError::Connect {
                endpoint,
                reason: format!("timed out after {:?}", self.connect_timeout),
            })?
            .map_err(|e| SendError::Connect {
                endpoint,
                reason: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Sends an HTTP/1.1 request whose URI authority is `endpoint` (the pool key); the Host
    /// header is the caller's. Along a `route`, over a connection of its own.
    pub(crate) async fn send_h1(
        &self,
        endpoint: SocketAddr,
        route: Option<&Route>,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        if let Some(route) = route {
            return self.send_h1_routed(endpoint, route, request).await;
        }
        let client = self.with_pools(|p| p.h1.clone());
        client.request(request).await.map_err(|e| {
            if e.is_connect() {
                let reason = std::error::Error::source(&e)
                    .map_or_else(|| e.to_string(), ToString::to_string);
                SendError::Connect { endpoint, reason }
            } else {
                match find_hyper(&e) {
                    Some(h) => classify_hyper(endpoint, h),
                    None => SendError::Reset {
                        endpoint,
                        reason: e.to_string(),
                    },
                }
            }
        })
    }

    /// [`Upstream::send_h1`] along a route (the request line in origin-form, as hyper's pooled
    /// client writes it for the direct path): over a ready connection of this thread's pool for
    /// (endpoint, route key), or a new one, which then joins the pool. A connection stays
    /// listed while its response is read and is taken again once hyper says it is ready. A
    /// pooled connection that turns out closed before the request went out is replaced by a
    /// new one (the request was not sent, so any request may go again).
    async fn send_h1_routed(
        &self,
        endpoint: SocketAddr,
        route: &Route,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let key = pool_key(endpoint, Some(route));
        let pooled = self.with_pools(|p| {
            let kept = p.h1_routed.get_mut(&key)?;
            let now = Instant::now();
            kept.retain(|(s, since)| {
                !s.is_closed() && now.duration_since(*since) < RAW_IDLE_TIMEOUT
            });
            let ready = kept.iter().rposition(|(s, _)| s.is_ready())?;
            Some(kept.swap_remove(ready).0)
        });
        let reused = pooled.is_some();
        let mut sender = match pooled {
            Some(sender) => sender,
            None => self.h1_routed_connect(endpoint, route).await?,
        };
        let mut request = request;
        origin_form(&mut request);
        let mut fresh = !reused;
        loop {
            let ready = sender.ready().await;
            let sent = match ready {
                Ok(()) => sender.try_send_request(request),
                Err(_) if !fresh => {
                    // Closed while pooled; the request is still here.
                    sender = self.h1_routed_connect(endpoint, route).await?;
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(classify_hyper(endpoint, &e)),
            };
            self.keep_h1_routed(key.clone(), sender);
            match sent.await {
                Ok(response) => return Ok(response),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        request = unsent;
                        sender = self.h1_routed_connect(endpoint, route).await?;
                        fresh = true;
                    }
                    _ => return Err(classify_hyper(endpoint, e.error())),
                },
            }
        }
    }

    /// A new HTTP/1.1 connection along `route`.
    async fn h1_routed_connect(
        &self,
        endpoint: SocketAddr,
        route: &Route,
    ) -> Result<H1Sender, SendError> {
        let stream = self.connect_conn(endpoint, Some(route)).await?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| classify_hyper(endpoint, &e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%endpoint, %error, "routed upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Lists a routed HTTP/1.1 connection in this thread's pool (busy until its response ends).
    fn keep_h1_routed(&self, key: PoolKey, sender: H1Sender) {
        self.with_pools(|p| {
            let kept = p.h1_routed.entry(key).or_default();
            if kept.len() < RAW_IDLE_PER_ENDPOINT {
                kept.push((sender, Instant::now()));
            }
            if !p.reaping {
                p.reaping = true;
                tokio::spawn(reap(p.owner.clone()));
            }
        });
    }

    async fn h2_sender(
        &self,
        endpoint: SocketAddr,
        route: Option<&Route>,
    ) -> Result<SendRequest<Body>, SendError> {
        let key = pool_key(endpoint, route);
        let cached = self.with_pools(|p| p.h2.get(&key).cloned());
        if let Some(sender) = cached
            && !sender.is_closed()
        {
            return Ok(sender);
        }
        // Boxed: connecting is rare, and its state would otherwise size every request's future.
        Box::pin(self.open_h2(endpoint, route, key)).await
    }

    /// A new HTTP/2 connection to `endpoint`, pooled under `key`.
    async fn open_h2(
        &self,
        endpoint: SocketAddr,
        route: Option<&Route>,
        key: PoolKey,
    ) -> Result<SendRequest<Body>, SendError> {
        let stream = self.connect_conn(endpoint, route).await?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect {
                endpoint,
                reason: format!("HTTP/2 handshake: {e}"),
            })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%endpoint, %error, "upstream HTTP/2 connection ended");
            }
        });
        self.with_pools(|p| {
            p.h2.retain(|_, s| !s.is_closed());
            p.h2.insert(key, sender.clone());
        });
        Ok(sender)
    }

    /// Sends an HTTP/2 request over the endpoint's shared connection. The URI's authority
    /// becomes `:authority`.
    pub(crate) async fn send_h2(
        &self,
        endpoint: SocketAddr,
        route: Option<&Route>,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut sender = self.h2_sender(endpoint, route).await?;
        sender
            .ready()
            .await
            .map_err(|e| classify_hyper(endpoint, &e))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| classify_hyper(endpoint, &e))
    }

    /// Sends an upgrade or `CONNECT` request over a new HTTP/1.1 connection that is never
    /// pooled; after a 101 (or 2xx to `CONNECT`) the connection belongs to the tunnel.
    pub(crate) async fn send_upgrade(
        &self,
        endpoint: SocketAddr,
        route: Option<&Route>,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let stream = self.connect_conn(endpoint, route).await?;
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| classify_hyper(endpoint, &e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%endpoint, %error, "upstream upgrade connection ended");
            }
        });
        sender
            .send_request(request)
            .await
            .map_err(|e| classify_hyper(endpoint, &e))
    }
}

/// Puts an HTTP/1 request's target in origin-form (`/path?query`): hyper's connection-level
/// sender writes the URI as it is, and an absolute URI is what one sends to a proxy, not to an
/// origin server, whose application would see `http://10.0.0.5:8080/path` as its path. `CONNECT`
/// keeps its authority-form.
fn origin_form<B>(request: &mut Request<B>) {
    if request.method() == http::Method::CONNECT || request.uri().scheme().is_none() {
        return;
    }
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    if let Ok(uri) = target.parse() {
        *request.uri_mut() = uri;
    }
}
