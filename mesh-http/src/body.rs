//! Body wrappers: byte counting on the way in, and on the way out the request's end of life
//! (route deadline on the response body, in-flight accounting, the access log line).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;

use crate::balance::InFlight;
use crate::io::ConnState;
use crate::stats::Stats;
use crate::upstream::{Body, BoxError};

/// An empty body.
pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body with these bytes.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Counts the data bytes that pass through a body.
pub(crate) struct Counted {
    inner: Body,
    counter: Arc<AtomicU64>,
}

impl Counted {
    pub(crate) fn wrap(inner: Body, counter: Arc<AtomicU64>) -> Body {
        Self { inner, counter }.boxed_unsync()
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the access log line says about a request; filled in as the request progresses and
/// written when the response body is done (or dropped).
#[derive(Debug)]
pub(crate) struct AccessLog {
    pub start: Instant,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: &'static str,
    pub method: http::Method,
    pub authority: String,
    /// Path without the query string.
    pub path: String,
    pub route: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub status: u16,
    pub request_id: HeaderValue,
    pub retries: u32,
    pub bytes_in: Arc<AtomicU64>,
    /// Why the proxy answered itself, if it did.
    pub local_reason: Option<&'static str>,
    /// Told about every finished request (metrics).
    pub observer: Option<Arc<dyn crate::Observer>>,
}

impl AccessLog {
    pub(crate) fn emit(&self, bytes_out: u64, complete: bool) {
        let elapsed = self.start.elapsed();
        if let Some(o) = &self.observer {
            o.request(&crate::RequestRecord {
                route: self.route.as_deref(),
                method: &self.method,
                status: self.status,
                duration: elapsed,
            });
        }
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        tracing::info!(
            target: "mesh_http::access",
            src = %self.src,
            dst = %self.dst,
            proto = self.proto,
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            route = self.route.as_deref().unwrap_or("none"),
            upstream = %self.upstream.map_or_else(|| "-".to_owned(), |u| u.to_string()),
            status = self.status,
            duration_ms = (duration_ms * 1000.0).round() / 1000.0,
            request_id = %String::from_utf8_lossy(self.request_id.as_bytes()),
            retries = self.retries,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            complete,
            local = self.local_reason.unwrap_or("-"),
            "request"
        );
    }
}

/// Marks the end of a request on its connection.
#[derive(Debug)]
pub(crate) struct Active(pub Arc<ConnState>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The response body sent to the client.
pub(crate) struct Logged {
    inner: Body,
    deadline: Option<Pin<Box<Sleep>>>,
    log: AccessLog,
    bytes_out: u64,
    done: bool,
    stats: Arc<Stats>,
    _in_flight: Option<InFlight>,
    _active: Active,
}

impl Logged {
    pub(crate) fn wrap(
        inner: Body,
        deadline: Option<tokio::time::Instant>,
        log: AccessLog,
        stats: Arc<Stats>,
        in_flight: Option<InFlight>,
        active: Active,
    ) -> Body {
        Self {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            log,
            bytes_out: 0,
            done: false,
            stats,
            _in_flight: in_flight,
            _active: active,
        }
        .boxed_unsync()
    }
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Pending => {
                if let Some(deadline) = &mut this.deadline
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    this.deadline = None;
                    this.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    this.log.local_reason = Some("request timeout during response body");
                    return Poll::Ready(Some(Err("request timeout during response body".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let complete = self.done || self.inner.is_end_stream();
        self.log.emit(self.bytes_out, complete);
    }
}
