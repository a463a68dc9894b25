//! The receiving end of the mTLS tunnel, for HTTP: the requests of a tunneled connection, whose
//! source identity the tunnel authenticated, checked against the MeshPolicy's HTTP deny rules
//! (those with `principals` / `namespaces` can only be decided here), and passed to the pod
//! unchanged over one upstream connection. Routing, filters, header injection and retries were
//! the sending agent's; doing them again would inject headers twice and multiply retries.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_policy::Identity;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::body::{Active, empty, full};
use crate::io::ConnState;
use crate::proxy::{Shared, run_tunnel};
use crate::upstream::{Body, BoxError};

/// The connection to the pod, opened before the first request and reopened when the pod
/// closed it.
enum Pod {
    /// Connected, no handshake yet (or none: the pod closed it, or an upgrade took it).
    Stream(Option<TcpStream>),
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// One tunneled connection's requests.
pub(crate) struct Gate {
    shared: Arc<Shared>,
    /// Who the tunnel says the client is.
    source: Option<Identity>,
    /// The tunnel's remote address (the client's node), for logs.
    src: SocketAddr,
    /// The pod.
    dst: SocketAddr,
    h2: bool,
    state: Arc<ConnState>,
    pod: Mutex<Pod>,
}

impl Gate {
    pub(crate) fn new(
        shared: Arc<Shared>,
        source: Option<Identity>,
        src: SocketAddr,
        dst: SocketAddr,
        h2: bool,
        state: Arc<ConnState>,
        pod: TcpStream,
    ) -> Self {
        Self {
            shared,
            source,
            src,
            dst,
            h2,
            state,
            pod: Mutex::new(Pod::Stream(Some(pod))),
        }
    }

    /// Serves one request: 403 when a deny rule matches it from this source, otherwise the
    /// pod's response.
    pub(crate) async fn handle(&self, mut request: Request<Incoming>) -> Response<Body> {
        let shared = &self.shared;
        self.state.requests.fetch_add(1, Ordering::Relaxed);
        self.state.active.fetch_add(1, Ordering::Relaxed);
        let active = Active(self.state.clone());
        let grpc = self.h2
            && request
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let policy = shared.policy.current();
        let path = request.uri().path().to_owned();
        let denied = policy.http_denied_by(
            self.source.as_ref(),
            request.method().as_str(),
            &path,
            |name| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            },
        );
        if let Some(rule) = denied {
            shared.stats.denied_tunneled.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                target: "mesh_agent::access",
                src = %self.src,
                src_principal = self.source.as_ref().map_or("-", |s| s.principal.as_str()),
                dst = %self.dst,
                method = %request.method(),
                path,
                rule = %rule.name,
                status = 403,
                "tunneled request denied"
            );
            return answer(StatusCode::FORBIDDEN, "denied by policy", grpc);
        }
        let upgrade = !self.h2
            && (request.method() == Method::CONNECT
                || request.headers().contains_key(header::UPGRADE));
        let client_upgrade = if upgrade {
            request.extensions_mut().remove::<OnUpgrade>()
        } else {
            None
        };
        let request = request.map(|b| b.map_err(Into::into).boxed_unsync());
        match self.send(request, upgrade).await {
            Ok(mut response) => {
                let status = response.status();
                if let Some(client_upgrade) = client_upgrade
                    && (status == StatusCode::SWITCHING_PROTOCOLS || status.is_success())
                {
                    let pod_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(run_tunnel(client_upgrade, pod_upgrade, self.src));
                }
                // The request is active until its response body ends: the idle timeout does not
                // cut a slow response.
                response.map(|inner| {
                    Held {
                        inner: inner.map_err(Into::into).boxed_unsync(),
                        _active: active,
                    }
                    .boxed_unsync()
                })
            }
            Err(error) => {
                shared.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(dst = %self.dst, %error, "tunneled request: the pod failed");
                let reason = match error {
                    PodError::Connect(_) => "upstream connect failure",
                    PodError::Http(_) => "upstream reset before response headers",
                };
                answer(StatusCode::SERVICE_UNAVAILABLE, reason, grpc)
            }
        }
    }

    /// Sends over the pod connection, opening (or reopening) it as needed.
    async fn send(
        &self,
        request: Request<Body>,
        upgrade: bool,
    ) -> Result<Response<Incoming>, PodError> {
        let mut pod = self.pod.lock().await;
        if self.h2 {
            let mut sender = match &*pod {
                Pod::H2(s) if !s.is_closed() => s.clone(),
                _ => {
                    let stream = self.stream(&mut pod).await?;
                    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(TokioIo::new(stream))
                        .await?;
                    let dst = self.dst;
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%dst, %error, "pod HTTP/2 connection ended");
                        }
                    });
                    *pod = Pod::H2(sender.clone());
                    sender
                }
            };
            // The streams of one connection run side by side: the lock is not held over them.
            drop(pod);
            sender.ready().await?;
            return Ok(sender.send_request(request).await?);
        }
        // HTTP/1: hyper serves a connection's requests one after the other, so the lock is
        // free again when the next one comes.
        let mut sender = match std::mem::replace(&mut *pod, Pod::Stream(None)) {
            Pod::H1(s) if !s.is_closed() => s,
            _ => {
                let stream = self.stream(&mut pod).await?;
                let (sender, connection) = http1::Builder::new()
                    .handshake(TokioIo::new(stream))
                    .await?;
                let dst = self.dst;
                tokio::spawn(async move {
                    if let Err(error) = connection.with_upgrades().await {
                        tracing::debug!(%dst, %error, "pod HTTP/1 connection ended");
                    }
                });
                sender
            }
        };
        sender.ready().await?;
        let response = sender.send_request(request).await;
        // After a 101 the connection is the tunnel's: a later request needs a new one.
        if !upgrade {
            *pod = Pod::H1(sender);
        }
        Ok(response?)
    }

    /// The connected stream not yet handshaken, or a new connection to the pod.
    async fn stream(&self, pod: &mut Pod) -> Result<TcpStream, PodError> {
        if let Pod::Stream(stream) = pod
            && let Some(stream) = stream.take()
        {
            return Ok(stream);
        }
        let timeout = self.shared.config.connect_timeout;
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.dst))
            .await
            .map_err(|_| {
                PodError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timed out after {timeout:?}"),
                ))
            })?
            .map_err(PodError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Why a request did not reach the pod.
#[derive(Debug, thiserror::Error)]
enum PodError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// An answer given here: text, or trailers-only for gRPC.
fn answer(status: StatusCode, reason: &'static str, grpc: bool) -> Response<Body> {
    let mut response = Response::new(empty());
    if grpc {
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let code = if status == StatusCode::FORBIDDEN {
            "7"
        } else {
            "14"
        };
        headers.insert("grpc-status", HeaderValue::from_static(code));
        headers.insert("grpc-message", HeaderValue::from_static(reason));
    } else {
        *response.status_mut() = status;
        *response.body_mut() = full(format!("{reason}\n"));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}

/// A response body that keeps its request counted as active on the connection.
struct Held {
    inner: Body,
    _active: Active,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
