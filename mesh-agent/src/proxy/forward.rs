//! Moving bytes both ways between the client's and the upstream's sockets.
//!
//! With splice(2) the bytes go socket -> pipe -> socket inside the kernel and never reach
//! userspace; each direction holds one pipe (two fds, no userspace buffer). Without it, each
//! direction owns one fixed 16 KiB buffer that never grows. Either way an EOF from one side becomes
//! a write shutdown on the other (half-close), and the connection ends when both directions have
//! ended, on the first error, or after `idle` without a byte in either direction.
//!
//! While bytes flow, both sockets are armed to reset on close ([`arm_reset`]): if the agent dies
//! (kill -9, OOM) the kernel closes them with a RST, so the client and the server see the
//! connection fail instead of a clean end the other peer never sent. A clean end disarms them
//! first, so a normal close is still a FIN.
use std::{
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream, time::Instant};

/// Bytes moved per splice call (the default pipe capacity).
const SPLICE_CHUNK: usize = 64 * 1024;
const COPY_BUF: usize = 16 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client to upstream.
    pub sent: u64,
    /// Upstream to client.
    pub received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("client side: {0}")]
    Downstream(io::Error),
    #[error("upstream side: {0}")]
    Upstream(io::Error),
}

/// Which socket an IO error came from, so it can be reported (and reset) on the right side.
enum Side {
    Client,
    Upstream,
}

/// Makes the kernel close `s` with a RST instead of a FIN (SO_LINGER 0), including when the
/// process dies without closing it: a half-forwarded stream must not look finished.
pub fn arm_reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Undoes [`arm_reset`]: the next close is an orderly one (FIN after the queued bytes).
pub fn disarm_reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(None);
}

/// Forwards until both directions end. Both sockets stay armed to reset while forwarding (see
/// the module docs); on error they are left armed, so each peer learns the connection failed
/// instead of seeing a clean end; on a clean end they are disarmed.
pub async fn forward(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    use_splice: bool,
) -> Result<Transferred, Error> {
    arm_reset(client);
    arm_reset(upstream);
    let last = AtomicU64::new(0);
    let start = Instant::now();
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let both = async {
        let up = pump(
            client,
            upstream,
            use_splice,
            &touch,
            Side::Client,
            Side::Upstream,
        );
        let down = pump(
            upstream,
            client,
            use_splice,
            &touch,
            Side::Upstream,
            Side::Client,
        );
        tokio::try_join!(up, down)
    };
    let watch = async {
        loop {
            let since = start
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since).await;
        }
    };
    let result = tokio::select! {
        r = both => r.map(|(sent, received)| Transferred { sent, received }).map_err(|(side, e)| match side {
            Side::Client => Error::Downstream(e),
            Side::Upstream => Error::Upstream(e),
        }),
        () = watch => Err(Error::Idle(idle)),
    };
    if result.is_ok() {
        disarm_reset(client);
        disarm_reset(upstream);
    }
    result
}

async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    use_splice: bool,
    touch: &impl Fn(),
    from_side: Side,
    to_side: Side,
) -> Result<u64, (Side, io::Error)> {
    let total = if use_splice {
        match Pipe::new() {
            Ok(pipe) => splice_loop(from, to, &pipe, touch).await,
            // Out of fds or pipes: fall back rather than fail the connection.
            Err(_) => copy_loop(from, to, touch).await,
        }
    } else {
        copy_loop(from, to, touch).await
    };
    let total = total.map_err(|(read, e)| (if read { from_side } else { to_side }, e))?;
    // Half-close: the peer sees our EOF; the other direction keeps going.
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    Ok(total)
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe { read, write })
    }
}

/// Error tuple: (`true` if the read side failed, error).
type PumpResult = Result<u64, (bool, io::Error)>;

async fn splice_loop(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    touch: &impl Fn(),
) -> PumpResult {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let mut total = 0u64;
    loop {
        let n = loop {
            from.readable().await.map_err(|e| (true, e))?;
            match from.try_io(Interest::READABLE, || {
                splice(
                    from.as_fd(),
                    None,
                    pipe.write.as_fd(),
                    None,
                    SPLICE_CHUNK,
                    flags,
                )
                .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((true, e)),
            }
        };
        if n == 0 {
            return Ok(total);
        }
        touch();
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(|e| (false, e))?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, left, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(m) => {
                    left -= m;
                    total += m as u64;
                    touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((false, e)),
            }
        }
    }
}

async fn copy_loop(from: &TcpStream, to: &TcpStream, touch: &impl Fn()) -> PumpResult {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = loop {
            from.readable().await.map_err(|e| (true, e))?;
            match from.try_read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((true, e)),
            }
        };
        if n == 0 {
            return Ok(total);
        }
        touch();
        let mut off = 0;
        while off < n {
            to.writable().await.map_err(|e| (false, e))?;
            match to.try_write(&buf[off..n]) {
                Ok(m) => {
                    off += m;
                    total += m as u64;
                    touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((false, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// client <-> [a|b] agent [c|d] <-> server over loopback; returns the ends the test drives.
    async fn chain(
        use_splice: bool,
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Result<Transferred, Error>>,
    ) {
        let l1 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let l2 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(l1.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (agent_in, _) = l1.accept().await.expect("accept");
        let agent_out = TcpStream::connect(l2.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = l2.accept().await.expect("accept");
        let task =
            tokio::spawn(async move { forward(&agent_in, &agent_out, idle, use_splice).await });
        (client, server, task)
    }

    async fn round_trip(use_splice: bool) {
        let (mut client, mut server, task) = chain(use_splice, Duration::from_secs(10)).await;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&p2).await.expect("write");
            // Half-close: the server must still be able to answer.
            client.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("server read");
        assert_eq!(got, payload);
        server.write_all(b"thanks").await.expect("answer");
        drop(server);
        assert_eq!(writer.await.expect("join"), b"thanks");
        let t = task.await.expect("join").expect("forward");
        assert_eq!(
            t,
            Transferred {
                sent: payload.len() as u64,
                received: 6
            }
        );
    }

    #[tokio::test]
    async fn splice_moves_everything_and_half_closes() {
        round_trip(true).await;
    }

    #[tokio::test]
    async fn copy_moves_everything_and_half_closes() {
        round_trip(false).await;
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let (_client, _server, task) = chain(true, Duration::from_millis(200)).await;
        let r = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends")
            .expect("join");
        assert!(matches!(r, Err(Error::Idle(_))), "{r:?}");
    }
}
