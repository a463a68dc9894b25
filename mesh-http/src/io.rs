//! The client side of a captured connection as hyper sees it: the bytes the agent already read
//! for protocol detection, then the socket; HTTP/1 bytes pass the [`HeadScanner`] on the way,
//! and every read and write marks the connection active for the idle and header timeouts.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::guard::{HeadScanner, Scan};
use crate::stats::Stats;
use std::sync::Arc;

/// Milliseconds since the first call in this process: a cheap, monotonic clock that fits an
/// atomic.
pub(crate) fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Per-connection state shared by the I/O wrapper, the request handler and the watchdog.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// Last read or write, in [`now_ms`].
    pub last_activity: AtomicU64,
    /// Start of the request head being read, `now_ms() + 1`; 0 when no head is in progress.
    pub head_started: AtomicU64,
    /// Requests whose response has not finished.
    pub active: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Why the scanner rejected a head, if it did: an index into [`REJECT_REASONS`] + 1.
    pub rejected: AtomicU64,
}

impl ConnState {
    pub(crate) fn new(h1: bool) -> Self {
        let now = now_ms();
        Self {
            last_activity: AtomicU64::new(now),
            // The first head is due from the connection start.
            head_started: AtomicU64::new(if h1 { now + 1 } else { 0 }),
            active: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    pub(crate) fn touch(&self) {
        self.last_activity.store(now_ms(), Ordering::Relaxed);
    }
}

/// The client stream: replayed prefix, then the socket.
#[derive(Debug)]
pub(crate) struct ClientIo {
    prefix: Vec<u8>,
    offset: usize,
    inner: TcpStream,
    scanner: Option<HeadScanner>,
    state: Arc<ConnState>,
    stats: Arc<Stats>,
    /// A head was rejected: only the poison is read from now on.
    rejected: bool,
}

impl ClientIo {
    pub(crate) fn new(
        inner: TcpStream,
        prefix: Vec<u8>,
        scanner: Option<HeadScanner>,
        state: Arc<ConnState>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            prefix,
            offset: 0,
            inner,
            scanner,
            state,
            stats,
            rejected: false,
        }
    }

    /// Runs the scanner over freshly read bytes. On a rejected head, returns the offset (in
    /// `fresh`) of the offending byte.
    fn inspect(&mut self, fresh: &[u8]) -> io::Result<Option<usize>> {
        let Some(scanner) = &mut self.scanner else {
            return Ok(None);
        };
        let result = scanner.scan(fresh);
        let in_head = scanner.in_head();
        let mut poison = None;
        match result {
            Scan::Clean => {}
            Scan::Reject { at, reason } => {
                poison = Some(at);
                self.rejected = true;
                self.state
                    .rejected
                    .store(reject_code(reason), Ordering::Relaxed);
                self.stats.rejected_requests.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(reason, "rejecting request head");
            }
            Scan::Fail(reason) => {
                self.stats.rejected_requests.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(reason, "broken chunked framing from client");
                return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
            }
        }
        let started = self.state.head_started.load(Ordering::Relaxed);
        if in_head && started == 0 {
            self.state
                .head_started
                .store(now_ms() + 1, Ordering::Relaxed);
        } else if !in_head && started != 0 && !self.rejected {
            self.state.head_started.store(0, Ordering::Relaxed);
        }
        Ok(poison)
    }
}

/// What replaces a rejected head from the offending byte on: NUL, which httparse refuses
/// anywhere in a head, then an empty line so that hyper's "is the head complete yet" check
/// lets httparse run at once.
const POISON: &[u8] = b"\0\n\n";

/// Reasons the scanner gives, so the connection error can name them.
pub(crate) const REJECT_REASONS: &[&str] = &[
    "bare CR in request head",
    "bare LF in request head",
    "obsolete line folding",
    "header line without colon",
    "invalid header name",
    "control character in header value",
    "duplicate Content-Length",
    "invalid Content-Length",
    "duplicate Transfer-Encoding",
    "Transfer-Encoding other than chunked",
    "both Content-Length and Transfer-Encoding",
];

fn reject_code(reason: &str) -> u64 {
    REJECT_REASONS
        .iter()
        .position(|r| *r == reason)
        .map_or(u64::MAX, |i| i as u64 + 1)
}

/// The reason stored by [`ConnState::rejected`], if any.
pub(crate) fn reject_reason(code: u64) -> Option<&'static str> {
    match code {
        0 => None,
        n => Some(
            REJECT_REASONS
                .get(usize::try_from(n - 1).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or("malformed request head"),
        ),
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let replaying = this.offset < this.prefix.len();
        if replaying {
            let n = (this.prefix.len() - this.offset).min(buf.remaining());
            buf.put_slice(&this.prefix[this.offset..this.offset + n]);
            this.offset += n;
            if this.offset == this.prefix.len() {
                this.prefix = Vec::new();
                this.offset = 0;
            }
        } else if this.rejected {
            // Nothing after a rejected head reaches hyper.
            return Poll::Ready(Ok(()));
        } else {
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        if this.rejected && replaying {
            // The replayed bytes are the poison itself.
            return Poll::Ready(Ok(()));
        }
        let fresh = &buf.filled()[before..];
        if fresh.is_empty() {
            return Poll::Ready(Ok(()));
        }
        this.state.touch();
        if let Some(at) = this.inspect(fresh)? {
            let keep = before + at;
            let room = buf.capacity() - keep;
            let now = POISON.len().min(room);
            buf.set_filled(keep);
            buf.put_slice(&POISON[..now]);
            this.prefix = POISON[now..].to_vec();
            this.offset = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
