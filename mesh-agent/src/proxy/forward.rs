//! Moving bytes both ways between the client's and the upstream's sockets.
//!
//! With splice(2) the bytes go socket -> pipe -> socket inside the kernel and never reach
//! userspace. Without it (or when no pipe can be had) they go through a 16 KiB buffer. Either
//! is taken from a small per-thread pool only while bytes move and given back once everything
//! read has been written, so an idle connection costs its two sockets and no more: thousands
//! of idle connections fit under the fd limit. Either way an EOF from one side becomes
//! a write shutdown on the other (half-close), and the connection ends when both directions have
//! ended, on the first error, or after `idle` without a byte in either direction.
//!
//! While bytes flow, both sockets are armed to reset on close ([`arm_reset`]): if the agent dies
//! (kill -9, OOM) the kernel closes them with a RST, so the client and the server see the
//! connection fail instead of a clean end the other peer never sent. A clean end disarms them
//! first, so a normal close is still a FIN.
use std::{
    cell::RefCell,
    io,
    net::Shutdown,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream, sync::watch, time::Instant};

/// Capacity asked for each pipe; the kernel's default is 64 KiB. A pipe holds one page
/// fragment per slot, and a socket's receive queue often holds fragments smaller than a page,
/// so a default pipe takes far less than 64 KiB of a bulk stream per splice: bigger pipes mean
/// fewer splice calls and wake-ups per byte. A pipe holds pages only while bytes sit in it (a
/// direction gives its pipe back only empty), so an idle pooled pipe costs the slot array
/// (10 KB). If the kernel refuses (over `/proc/sys/fs/pipe-max-size`, or the user's pipe
/// quota), the pipe keeps its size.
const PIPE_SIZE: usize = 1024 * 1024;
const COPY_BUF: usize = 16 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Client to upstream.
    pub sent: u64,
    /// Upstream to client.
    pub received: u64,
}

/// How forwarding stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions ended.
    Closed(Transferred),
    /// A handover asked the connection to move: each direction that had not ended stopped while
    /// it held no bytes (its pipe or buffer empty), so the sockets carry all the state.
    Paused {
        transferred: Transferred,
        sent_done: bool,
        received_done: bool,
    },
}

/// Where a moved connection resumes: the directions that had already ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resume {
    pub sent_done: bool,
    pub received_done: bool,
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

/// Forwards until both directions end, or `moving` turns true (then each direction stops at a
/// point where it holds no bytes). Both sockets stay armed to reset while forwarding (see the
/// module docs); on error they are left armed, so each peer learns the connection failed
/// instead of seeing a clean end; on a clean end they are disarmed. Paused, they stay armed:
/// the agent they move to forwards them armed too, and if it dies, its peers see a reset.
pub async fn forward(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    use_splice: bool,
    resume: Resume,
    moving: Option<watch::Receiver<bool>>,
) -> Result<Ended, Error> {
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
            resume.sent_done,
            moving.clone(),
        );
        let down = pump(
            upstream,
            client,
            use_splice,
            &touch,
            Side::Upstream,
            Side::Client,
            resume.received_done,
            moving,
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
        r = both => r.map(|((sent, up_paused), (received, down_paused))| {
            let transferred = Transferred { sent, received };
            if up_paused || down_paused {
                Ended::Paused { transferred, sent_done: !up_paused, received_done: !down_paused }
            } else {
                Ended::Closed(transferred)
            }
        }).map_err(|(side, e)| match side {
            Side::Client => Error::Downstream(e),
            Side::Upstream => Error::Upstream(e),
        }),
        () = watch => Err(Error::Idle(idle)),
    };
    if let Ok(Ended::Closed(_)) = result {
        disarm_reset(client);
        disarm_reset(upstream);
    }
    result
}

/// One direction: `(bytes, paused)`.
#[allow(clippy::too_many_arguments)]
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    use_splice: bool,
    touch: &impl Fn(),
    from_side: Side,
    to_side: Side,
    done: bool,
    mut moving: Option<watch::Receiver<bool>>,
) -> Result<(u64, bool), (Side, io::Error)> {
    if done {
        return Ok((0, false));
    }
    let r = relay(from, to, use_splice, touch, &mut moving).await;
    let (total, paused) = r.map_err(|(read, e)| (if read { from_side } else { to_side }, e))?;
    if !paused {
        // Half-close: the peer sees our EOF; the other direction keeps going.
        let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    }
    Ok((total, paused))
}

/// Waits until `from` is readable (`false`) or a handover asks the connection to move
/// (`true`). Called only where the direction holds no bytes.
async fn readable_or_moving(
    from: &TcpStream,
    moving: &mut Option<watch::Receiver<bool>>,
) -> io::Result<bool> {
    let asked = match moving.as_mut() {
        None => return from.readable().await.map(|()| false),
        Some(m) => tokio::select! {
            r = from.readable() => return r.map(|()| false),
            asked = m.wait_for(|v| *v) => asked.is_ok(),
        },
    };
    if asked {
        return Ok(true);
    }
    // The agent will never ask: stop watching.
    *moving = None;
    from.readable().await.map(|()| false)
}

/// Whether a handover has asked the connection to move, without waiting.
fn asked_to_move(moving: &Option<watch::Receiver<bool>>) -> bool {
    moving.as_ref().is_some_and(|m| *m.borrow())
}

/// Idle pipes and copy buffers kept per worker thread. A direction takes one only while bytes
/// move and gives it back once it has written everything it read, so an idle connection holds
/// its two sockets and nothing else; a burst of traffic reuses the same few pipes.
const POOL_PER_THREAD: usize = 16;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity in bytes: the most one splice moves into it.
    size: usize,
}

impl Pipe {
    /// A pooled pipe, or a new one.
    fn take() -> io::Result<Self> {
        if let Some(p) = PIPES.with(pooled) {
            return Ok(p);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Not in the fds kept free for refusing connections: the copy buffer does instead.
        if super::headroom::reached(&read) || super::headroom::reached(&write) {
            return Err(super::headroom::out_of_fds());
        }
        use nix::fcntl::{FcntlArg, fcntl};
        let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as _))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |n| n as usize);
        Ok(Pipe { read, write, size })
    }

    /// Pools an empty pipe (one still holding bytes must be dropped instead); closes it when
    /// the pool is full.
    fn give_back(self) {
        PIPES.with(|p| pool(p, self));
    }
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS
        .with(pooled)
        .unwrap_or_else(|| vec![0u8; COPY_BUF].into_boxed_slice())
}

fn give_back_buffer(buf: Box<[u8]>) {
    BUFFERS.with(|b| pool(b, buf));
}

/// The last thing put in a per-thread pool, if any.
fn pooled<T>(pool: &RefCell<Vec<T>>) -> Option<T> {
    pool.borrow_mut().pop()
}

/// Keeps `item` in a per-thread pool, or drops (closes) it when the pool is full.
fn pool<T>(pool: &RefCell<Vec<T>>, item: T) {
    let mut pool = pool.borrow_mut();
    if pool.len() < POOL_PER_THREAD {
        pool.push(item);
    }
}

/// `(bytes, paused)`, or the error tuple (`true` if the read side failed, error).
type PumpResult = Result<(u64, bool), (bool, io::Error)>;

/// How a burst of reads ended. Every one of them leaves the pipe or buffer empty.
enum Burst {
    /// `from` has nothing more to read for now.
    Drained,
    /// `from` sent EOF.
    Eof,
    /// A handover asked the connection to move.
    Moving,
}

/// One direction until EOF, an error or a move: waits for bytes holding nothing, then moves
/// them with splice through a pipe taken for the burst, or through a copy buffer if splice is
/// off or no pipe can be had (out of fds).
async fn relay(
    from: &TcpStream,
    to: &TcpStream,
    use_splice: bool,
    touch: &impl Fn(),
    moving: &mut Option<watch::Receiver<bool>>,
) -> PumpResult {
    let mut total = 0u64;
    loop {
        // Nothing held here: every byte read so far has been written.
        if readable_or_moving(from, moving)
            .await
            .map_err(|e| (true, e))?
        {
            return Ok((total, true));
        }
        let pipe = if use_splice { Pipe::take().ok() } else { None };
        let burst = match pipe {
            Some(pipe) => {
                let burst = splice_burst(from, to, &pipe, touch, moving, &mut total).await?;
                // Only an error can leave bytes in the pipe, and then it is closed.
                pipe.give_back();
                burst
            }
            None => {
                let mut buf = take_buffer();
                let burst = copy_burst(from, to, &mut buf, touch, moving, &mut total).await?;
                give_back_buffer(buf);
                burst
            }
        };
        match burst {
            Burst::Drained => {}
            Burst::Eof => return Ok((total, false)),
            Burst::Moving => return Ok((total, true)),
        }
    }
}

async fn splice_burst(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    touch: &impl Fn(),
    moving: &Option<watch::Receiver<bool>>,
    total: &mut u64,
) -> Result<Burst, (bool, io::Error)> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        // The pipe is empty here. Still readable after a read: this returns at once, but
        // counts against the task's budget, so a busy stream yields to the others.
        from.readable().await.map_err(|e| (true, e))?;
        if asked_to_move(moving) {
            return Ok(Burst::Moving);
        }
        let n = match from.try_io(Interest::READABLE, || {
            splice(
                from.as_fd(),
                None,
                pipe.write.as_fd(),
                None,
                pipe.size,
                flags,
            )
            .map_err(io::Error::from)
        }) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err((true, e)),
        };
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
                    *total += m as u64;
                    touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err((false, e)),
            }
        }
    }
}

async fn copy_burst(
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut [u8],
    touch: &impl Fn(),
    moving: &Option<watch::Receiver<bool>>,
    total: &mut u64,
) -> Result<Burst, (bool, io::Error)> {
    loop {
        // The buffer is empty here (see `splice_burst`).
        from.readable().await.map_err(|e| (true, e))?;
        if asked_to_move(moving) {
            return Ok(Burst::Moving);
        }
        let n = match from.try_read(buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err((true, e)),
        };
        touch();
        let mut off = 0;
        while off < n {
            to.writable().await.map_err(|e| (false, e))?;
            match to.try_write(&buf[off..n]) {
                Ok(m) => {
                    off += m;
                    *total += m as u64;
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
        tokio::task::JoinHandle<Result<Ended, Error>>,
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
        let task = tokio::spawn(async move {
            forward(
                &agent_in,
                &agent_out,
                idle,
                use_splice,
                Resume::default(),
                None,
            )
            .await
        });
        (client, server, task)
    }

    #[test]
    fn pipes_are_as_big_as_the_kernel_allows_and_know_their_size() {
        let pipe = Pipe::take().expect("a pipe");
        let real = nix::fcntl::fcntl(&pipe.write, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .expect("F_GETPIPE_SZ") as usize;
        assert_eq!(pipe.size, real);
        let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(PIPE_SIZE);
        // The kernel grants PIPE_SIZE unless its maximum is lower (or the user's pipe quota is
        // spent, which a test process does not reach).
        assert!(real >= PIPE_SIZE.min(max), "pipe of {real} bytes");
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
            Ended::Closed(Transferred {
                sent: payload.len() as u64,
                received: 6
            })
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

    /// A handover pauses forwarding with nothing held in userspace; forwarding resumed on the
    /// same sockets (as the successor does) loses and repeats no byte.
    async fn pause_and_resume(use_splice: bool) {
        let l1 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let l2 = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(l1.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (agent_in, _) = l1.accept().await.expect("accept");
        let agent_out = TcpStream::connect(l2.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (mut server, _) = l2.accept().await.expect("accept");
        let (tx, rx) = watch::channel(false);
        let idle = Duration::from_secs(10);
        let first = tokio::spawn(async move {
            let r = forward(
                &agent_in,
                &agent_out,
                idle,
                use_splice,
                Resume::default(),
                Some(rx),
            )
            .await;
            (r, agent_in, agent_out)
        });
        client.write_all(b"before").await.expect("write");
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"before");
        tx.send(true).expect("signal");
        let (r, agent_in, agent_out) = first.await.expect("join");
        assert_eq!(
            r.expect("paused"),
            Ended::Paused {
                transferred: Transferred {
                    sent: 6,
                    received: 0
                },
                sent_done: false,
                received_done: false
            }
        );
        // Bytes sent while nobody forwards wait in the kernel, as during a handover.
        client.write_all(b"during").await.expect("write");
        server.write_all(b"reply").await.expect("write");
        let second = tokio::spawn(async move {
            forward(
                &agent_in,
                &agent_out,
                idle,
                use_splice,
                Resume::default(),
                None,
            )
            .await
        });
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"during");
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).await.expect("read");
        assert_eq!(&reply, b"reply");
        drop(client);
        drop(server);
        let r = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("ends")
            .expect("join");
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test]
    async fn splice_pauses_and_resumes_without_losing_a_byte() {
        pause_and_resume(true).await;
    }

    #[tokio::test]
    async fn copy_pauses_and_resumes_without_losing_a_byte() {
        pause_and_resume(false).await;
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
