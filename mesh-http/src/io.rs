//! The client side of a captured connection as hyper sees it: the bytes the agent already read
//! for protocol detection, then the socket; HTTP/1 bytes pass the [`HeadScanner`] on the way,
//! and every read and write marks the connection active for the idle and header timeouts.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::guard::{HeadScanner, Scan};
use crate::rejection::Rejection;
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
    /// Why the scanner refused the stream, if it did: [`Rejection::index`] + 1.
    pub rejected: AtomicU64,
    /// The request (numbered from 1) whose chunked body was refused; 0 if none was.
    pub body_rejected: AtomicU64,
    /// The last write to the client was refused for lack of room (hyper may hold bytes it has
    /// not written): the connection is not idle enough to move to another process.
    pub write_blocked: AtomicBool,
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
            body_rejected: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
        }
    }

    pub(crate) fn touch(&self) {
        self.last_activity.store(now_ms(), Ordering::Relaxed);
    }

    /// Why the scanner refused the stream, if it did.
    pub(crate) fn rejection(&self) -> Option<Rejection> {
        let code = self.rejected.load(Ordering::Relaxed);
        let index = usize::try_from(code.checked_sub(1)?).ok()?;
        Rejection::ALL.get(index).copied()
    }

    /// Why the body of request `number` was refused, if it was.
    pub(crate) fn body_rejection(&self, number: u64) -> Option<Rejection> {
        if number == 0 || self.body_rejected.load(Ordering::Relaxed) != number {
            return None;
        }
        self.rejection()
    }
}

/// The client stream: replayed prefix, then the socket (any byte stream: the fuzz targets drive
/// the proxy over an in-memory pipe).
#[derive(Debug)]
pub(crate) struct ClientIo<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
    scanner: Option<HeadScanner>,
    state: Arc<ConnState>,
    stats: Arc<Stats>,
    /// A head was rejected: only the poison is read from now on.
    rejected: bool,
    /// A chunked body was refused: every further read fails.
    failed: Option<Rejection>,
}

impl<S> ClientIo<S> {
    pub(crate) fn new(
        inner: S,
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
            failed: None,
        }
    }

    /// Records a refusal: once per connection, since the scanner stops after one.
    fn refuse(&mut self, why: Rejection) {
        self.state
            .rejected
            .store(why.index() as u64 + 1, Ordering::Relaxed);
        self.stats.rejected(why);
        tracing::debug!(reason = why.reason(), "refusing malformed request");
    }

    /// Runs the scanner over freshly read bytes. Returns where `fresh` must be cut: at a
    /// rejected head's offending byte (to be poisoned), or before a broken chunk.
    fn inspect(&mut self, fresh: &[u8]) -> Option<Cut> {
        let scanner = self.scanner.as_mut()?;
        let result = scanner.scan(fresh);
        let in_head = scanner.in_head();
        let mut cut = None;
        match result {
            Scan::Clean => {}
            Scan::Reject { at, why } => {
                cut = Some(Cut::Poison(at));
                self.rejected = true;
                self.refuse(why);
            }
            Scan::Fail { at, why, request } => {
                cut = Some(Cut::Fail(at));
                self.failed = Some(why);
                self.state.body_rejected.store(request, Ordering::Relaxed);
                self.refuse(why);
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
        cut
    }
}

/// Where a read buffer is cut after the scanner refused something in it.
enum Cut {
    /// Replace from this offset on with [`POISON`].
    Poison(usize),
    /// Deliver only the bytes before this offset, then fail.
    Fail(usize),
}

/// What replaces a rejected head from the offending byte on: NUL, which httparse refuses
/// anywhere in a head, then an empty line so that hyper's "is the head complete yet" check
/// lets httparse run at once.
const POISON: &[u8] = b"\0\n\n";

fn framing_error(why: Rejection) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.reason())
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(why) = this.failed {
            return Poll::Ready(Err(framing_error(why)));
        }
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
        match this.inspect(fresh) {
            None => {}
            Some(Cut::Poison(at)) => {
                let keep = before + at;
                let room = buf.capacity() - keep;
                let now = POISON.len().min(room);
                buf.set_filled(keep);
                buf.put_slice(&POISON[..now]);
                this.prefix = POISON[now..].to_vec();
                this.offset = 0;
            }
            Some(Cut::Fail(at)) => {
                // The bytes before the fault are delivered so that hyper reaches it through
                // the body decoder (a body error the proxy can answer 400 to), not through the
                // head parser (which would just close). Zero bytes would read as EOF, so a
                // fault at the very start fails at once.
                this.prefix = Vec::new();
                this.offset = 0;
                if at == 0 {
                    buf.set_filled(before);
                    let why = this.failed.unwrap_or(Rejection::InvalidChunkSize);
                    return Poll::Ready(Err(framing_error(why)));
                }
                buf.set_filled(before + at);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        self.state
            .write_blocked
            .store(result.is_pending(), Ordering::Relaxed);
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
        self.state
            .write_blocked
            .store(result.is_pending(), Ordering::Relaxed);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.state
            .write_blocked
            .store(result.is_pending(), Ordering::Relaxed);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
