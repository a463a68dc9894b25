//! Connections to endpoints: a pooled HTTP/1 client (hyper-util's legacy client, pooled by the
//! endpoint `ip:port` used as URI authority), a pool of multiplexed HTTP/2 connections (one per
//! endpoint and thread, so that `:authority` can stay the client's while the TCP connection goes
//! to the endpoint), and one-off HTTP/1 connections for upgrades and `CONNECT`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::UPSTREAM_POOL_IDLE_TIMEOUT;

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
    h2: HashMap<SocketAddr, SendRequest<Body>>,
    /// Idle HTTP/1.1 connections of the fast path (`crate::h1`), newest last.
    raw: HashMap<SocketAddr, Vec<(TcpStream, Instant)>>,
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
                        reaping: false,
                    });
                    pools.len() - 1
                }
            };
            f(&mut pools[mine])
        })
    }

    /// An idle HTTP/1.1 connection to `endpoint` from this thread's pool that is still open
    /// and not idle for too long, or a new one. The flag says whether it was reused.
    pub(crate) async fn checkout(
        &self,
        endpoint: SocketAddr,
    ) -> Result<(TcpStream, bool), SendError> {
        let pooled = self.with_pools(|p| {
            let idle = p.raw.get_mut(&endpoint)?;
            while let Some((stream, since)) = idle.pop() {
                if since.elapsed() < RAW_IDLE_TIMEOUT && is_open(&stream) {
                    return Some(stream);
                }
            }
            None
        });
        match pooled {
            Some(stream) => Ok((stream, true)),
            None => Ok((self.connect(endpoint).await?, false)),
        }
    }

    /// Returns a connection whose last response was read to its end, ready for another
    /// request.
    pub(crate) fn checkin(&self, endpoint: SocketAddr, stream: TcpStream) {
        self.with_pools(|p| {
            let idle = p.raw.entry(endpoint).or_default();
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
    /// header is the caller's.
    pub(crate) async fn send_h1(
        &self,
        endpoint: SocketAddr,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
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

    async fn h2_sender(&self, endpoint: SocketAddr) -> Result<SendRequest<Body>, SendError> {
        let cached = self.with_pools(|p| p.h2.get(&endpoint).cloned());
        if let Some(sender) = cached
            && !sender.is_closed()
        {
            return Ok(sender);
        }
        let stream = self.connect(endpoint).await?;
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
            p.h2.insert(endpoint, sender.clone());
        });
        Ok(sender)
    }

    /// Sends an HTTP/2 request over the endpoint's shared connection. The URI's authority
    /// becomes `:authority`.
    pub(crate) async fn send_h2(
        &self,
        endpoint: SocketAddr,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut sender = self.h2_sender(endpoint).await?;
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
        request: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let stream = self.connect(endpoint).await?;
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
