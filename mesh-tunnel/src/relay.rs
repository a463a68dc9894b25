//! Relaying one tunnel stream to and from a TCP connection without a buffer in between: what is
//! read from the socket becomes a DATA frame as it is, and a DATA frame received is written to
//! the socket from where h2 put it. `tokio::io::copy_bidirectional` over the stream's
//! `AsyncRead`/`AsyncWrite` would copy every byte once more each way, into its buffer and out.
//!
//! The rules are `copy_bidirectional`'s: when one side ends, the other is half-closed (END_STREAM
//! towards the peer, `shutdown(Write)` towards the socket), and the relay is done when both
//! directions are; any error ends it. Flow control is the stream's: a read from the socket takes
//! at most the send capacity h2 granted, and receive capacity is released only once the socket
//! took the bytes.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use h2::Reason;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::stream::{H2Stream, h2_error};

/// The most read from the socket for one DATA frame (h2 splits it into frames of the peer's
/// largest size) and the allocation the reads share until it is used up.
const CHUNK: usize = 256 * 1024;
/// The least room a read is given (one TLS record's worth).
const MIN_READ: usize = 16 * 1024;

/// Bytes each way: (socket to tunnel, tunnel to socket).
pub(crate) type Moved = (u64, u64);

/// Relays until both directions are done. With `idle`, gives up with `TimedOut` when no byte
/// moved either way for that long. The bytes moved are returned also after a failure.
pub(crate) async fn relay(
    stream: &mut H2Stream,
    tcp: &mut TcpStream,
    idle: Option<Duration>,
) -> (io::Result<()>, Moved) {
    let mut up = Up {
        buf: BytesMut::new(),
        done: false,
        moved: 0,
    };
    let mut down = Down {
        ended: false,
        done: false,
        moved: 0,
    };
    let mut watch = idle.map(|idle| IdleWatch {
        idle,
        sleep: Box::pin(tokio::time::sleep(idle)),
        last: 0,
    });
    let result = poll_fn(|cx| {
        if !up.done
            && let Poll::Ready(r) = up.poll(stream, tcp, cx)
        {
            r?;
        }
        if !down.done
            && let Poll::Ready(r) = down.poll(stream, tcp, cx)
        {
            r?;
        }
        if up.done && down.done {
            return Poll::Ready(Ok(()));
        }
        if let Some(watch) = watch.as_mut() {
            watch.poll(up.moved + down.moved, cx)?;
        }
        Poll::Pending
    })
    .await;
    (result, (up.moved, down.moved))
}

/// Socket to tunnel.
struct Up {
    /// Where the socket's bytes are read; each read is split off and sent as it is.
    buf: BytesMut,
    done: bool,
    moved: u64,
}

impl Up {
    fn poll(
        &mut self,
        stream: &mut H2Stream,
        tcp: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let granted = ready!(stream.poll_send_capacity(CHUNK, cx))?;
            // A new allocation when the last one is (nearly) used up, rather than a read too
            // small to be worth its frame.
            if self.buf.capacity() < MIN_READ {
                self.buf.reserve(CHUNK);
            }
            let room = granted.min(self.buf.capacity());
            ready!(tcp.poll_read_ready(cx))?;
            match tcp.try_read_buf(&mut (&mut self.buf).limit(room)) {
                Ok(0) => {
                    stream.finish()?;
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    stream.send(self.buf.split().freeze())?;
                    self.moved += n as u64;
                }
                // Readiness was stale; `poll_read_ready` waits again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Tunnel to socket.
struct Down {
    /// END_STREAM received: once the last bytes are written, the socket is half-closed.
    ended: bool,
    done: bool,
    moved: u64,
}

impl Down {
    fn poll(
        &mut self,
        stream: &mut H2Stream,
        tcp: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if stream.unread.has_remaining() {
                let n = ready!(Pin::new(&mut *tcp).poll_write(cx, &stream.unread))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                stream.consumed(n);
                self.moved += n as u64;
                continue;
            }
            if self.ended {
                ready!(Pin::new(&mut *tcp).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match ready!(stream.recv.poll_data(cx)) {
                None => self.ended = true,
                Some(Ok(data)) => stream.unread = data,
                // A peer that finished and then resets with NO_ERROR has said everything.
                Some(Err(e)) if e.is_reset() && e.reason() == Some(Reason::NO_ERROR) => {
                    self.ended = true;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
            }
        }
    }
}

/// Fails the relay when no byte moved during a whole `idle` period.
struct IdleWatch {
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Bytes moved at the start of the current period.
    last: u64,
}

impl IdleWatch {
    fn poll(&mut self, moved: u64, cx: &mut Context<'_>) -> io::Result<()> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if moved == self.last {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte moved for {:?}", self.idle),
                ));
            }
            self.last = moved;
            let next = tokio::time::Instant::now() + self.idle;
            self.sleep.as_mut().reset(next);
        }
        Ok(())
    }
}
