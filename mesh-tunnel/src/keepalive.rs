//! HTTP/2 PING keepalive on tunnel connections, both ends. A peer node that lost power, or an
//! agent that hangs, leaves a pooled connection that looks alive: TCP only notices once data
//! goes unacknowledged for many minutes, and a stream opened on it meanwhile waits for the
//! connect timeout. Every `interval` each end sends a PING; a peer that does not answer within
//! `timeout` is taken for dead and its connection closed, failing its streams at once.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::time::{Instant, Sleep};

/// The PING state of one connection.
pub(crate) struct Keepalive {
    ping_pong: PingPong,
    interval: Duration,
    timeout: Duration,
    /// Until the next PING, or until the answer is overdue while `waiting`.
    sleep: Pin<Box<Sleep>>,
    waiting: bool,
}

impl Keepalive {
    /// Keepalive on a connection whose `ping_pong` was taken (`None`: it was taken before, and
    /// the connection goes without).
    pub(crate) fn new(
        ping_pong: Option<PingPong>,
        interval: Duration,
        timeout: Duration,
    ) -> Option<Self> {
        Some(Keepalive {
            ping_pong: ping_pong?,
            interval,
            timeout,
            sleep: Box::pin(tokio::time::sleep(interval)),
            waiting: false,
        })
    }

    /// Ready once the peer left a PING unanswered for `timeout`; pending while it answers. The
    /// state lives here, so a new call resumes where the last one was (safe in a `select!`
    /// loop). A connection that fails otherwise is reported by the connection itself: then this
    /// stays pending.
    pub(crate) fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.waiting {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.waiting = false;
                        self.sleep.as_mut().reset(Instant::now() + self.interval);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Pending,
                    Poll::Pending => {}
                }
                ready!(self.sleep.as_mut().poll(cx));
                return Poll::Ready(());
            }
            ready!(self.sleep.as_mut().poll(cx));
            if self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return Poll::Pending;
            }
            self.waiting = true;
            self.sleep.as_mut().reset(Instant::now() + self.timeout);
        }
    }
}

/// [`Keepalive::poll_dead`] of an optional keepalive: pending forever without one.
pub(crate) async fn dead(keepalive: &mut Option<Keepalive>) {
    match keepalive {
        Some(k) => std::future::poll_fn(|cx| k.poll_dead(cx)).await,
        None => std::future::pending().await,
    }
}
