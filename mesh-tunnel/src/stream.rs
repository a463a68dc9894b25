//! One HTTP/2 stream as a byte stream (tokio `AsyncRead + AsyncWrite`), the way a tunneled TCP
//! connection is carried: DATA frames are the bytes, END_STREAM is a half-close
//! (`shutdown()`), RST_STREAM is a reset.
//!
//! Flow control follows the reader: receive capacity is released only as the bytes are read out,
//! so a slow reader stops the sender after one window instead of buffering without bound. A write
//! takes at most the send capacity h2 has granted the stream, so writers wait for the peer's
//! window instead of queueing in h2's buffers.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stats::TunnelStats;

/// Both directions of one CONNECT stream.
pub(crate) struct H2Stream {
    send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    /// Part of the last DATA frame the reader has not taken yet.
    pub(crate) unread: Bytes,
    /// END_STREAM sent: further writes fail.
    shut: bool,
    stats: Arc<TunnelStats>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("id", &self.send.stream_id().as_u32())
            .field("unread", &self.unread.len())
            .field("shut", &self.shut)
            .finish()
    }
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, stats: Arc<TunnelStats>) -> Self {
        H2Stream {
            send,
            recv,
            unread: Bytes::new(),
            shut: false,
            stats,
        }
    }

    /// Aborts the stream (RST_STREAM), for errors on the other side of a relay.
    pub(crate) fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }

    /// Waits until h2 grants send capacity for up to `want` bytes (never zero): what the
    /// windows and the send buffer allow.
    pub(crate) fn poll_send_capacity(
        &mut self,
        want: usize,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.shut {
            return self.poll_send_error(cx).map(Err);
        }
        self.send.reserve_capacity(want);
        loop {
            match self.send.capacity() {
                0 => match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    // The stream can no longer send (reset or closed): report why.
                    Some(Err(_)) | None => return self.poll_send_error(cx).map(Err),
                },
                n => return Poll::Ready(Ok(n)),
            }
        }
    }

    /// Queues `data`, within the capacity granted, as DATA.
    pub(crate) fn send(&mut self, data: Bytes) -> io::Result<()> {
        let n = data.len();
        self.send
            .send_data(data, false)
            .map_err(|e| send_failed(e, "the tunnel stream can no longer send"))?;
        self.stats.sent(n);
        Ok(())
    }

    /// Sends END_STREAM: the half-close of the tunneled connection.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        if self.shut {
            return Ok(());
        }
        self.send
            .send_data(Bytes::new(), true)
            .map_err(|e| send_failed(e, "the tunnel stream could not be half-closed"))?;
        self.shut = true;
        Ok(())
    }

    /// `n` bytes of `unread` left our hands: drops them and lets the peer send as many more.
    pub(crate) fn consumed(&mut self, n: usize) {
        self.unread.advance(n);
        let _ = self.recv.flow_control().release_capacity(n);
        self.stats.received(n);
    }

    /// The error to report once the send side is unusable: the peer's reset if there was one.
    fn poll_send_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.shut {
            return Poll::Ready(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of the tunnel stream",
            ));
        }
        match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => Poll::Ready(reset_error(reason)),
            Err(e) => Poll::Ready(h2_error(e)),
        }
    }
}

/// A stream reset by the peer, as the error a reset TCP connection gives.
fn reset_error(reason: Reason) -> io::Error {
    let kind = match reason {
        // The peer stopped reading (after it finished, or because its side closed).
        Reason::NO_ERROR | Reason::STREAM_CLOSED => io::ErrorKind::BrokenPipe,
        _ => io::ErrorKind::ConnectionReset,
    };
    io::Error::new(kind, format!("tunnel stream reset by the peer: {reason}"))
}

/// A failed `send_data`: the stream was reset or closed under us.
fn send_failed(e: h2::Error, what: &str) -> io::Error {
    if e.is_reset() || e.is_io() {
        h2_error(e)
    } else {
        io::Error::new(io::ErrorKind::BrokenPipe, format!("{what}: {e}"))
    }
}

pub(crate) fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::other("tunnel connection I/O error"),
        }
    } else if let Some(reason) = e.reason().filter(|_| e.is_reset()) {
        reset_error(reason)
    } else {
        io::Error::other(e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                // Only now may the peer send more: the bytes have left our hands.
                this.consumed(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                // END_STREAM: the peer half-closed.
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.unread = data,
                Some(Err(e)) => {
                    // A peer that finished and then resets with NO_ERROR has said everything.
                    if e.is_reset() && e.reason() == Some(Reason::NO_ERROR) {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(h2_error(e)));
                }
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.shut {
            return this.poll_send_error(cx).map(Err);
        }
        let granted = ready!(this.poll_send_capacity(buf.len(), cx))?;
        // Never zero: `poll_send_capacity` waits rather than report zero.
        let n = granted.min(buf.len());
        match this.send(Bytes::copy_from_slice(&buf[..n])) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => this.poll_send_error(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Ok(()));
        }
        match this.finish() {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => match ready!(this.send.poll_reset(cx)) {
                // Already closed cleanly by the peer: nothing left to shut.
                Ok(Reason::NO_ERROR) => Poll::Ready(Ok(())),
                Ok(reason) => Poll::Ready(Err(reset_error(reason))),
                Err(e) => Poll::Ready(Err(h2_error(e))),
            },
        }
    }
}
