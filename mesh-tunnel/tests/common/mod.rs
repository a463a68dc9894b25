//! Helpers shared by the tunnel tests: a CA and identities made in memory, a tunnel server on a
//! loopback port with a recording handler, an echo backend, and a pseudo-random payload.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]
#![allow(dead_code)] // Each test file uses a different subset.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_identity::{
    FileCa, Identities, IdentitiesConfig, RootCaPem, SpiffeId, TrustBundle, TrustDomain,
};
use mesh_tunnel::{Decision, Inbound, TunnelConfig, TunnelServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const CLIENT: &str = "spiffe://cluster.local/ns/web/sa/frontend";
pub const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
/// A client identity the test handler refuses.
pub const DENIED: &str = "spiffe://cluster.local/ns/web/sa/denied";

pub fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// A fresh CA of trust domain `cluster.local`, kept in memory.
pub fn file_ca() -> FileCa {
    let domain = TrustDomain::new("cluster.local").unwrap();
    let root = RootCaPem::generate_valid_for(&domain, Duration::from_secs(30 * 24 * 3600)).unwrap();
    FileCa::from_pem(
        domain,
        root.cert_pem.as_bytes(),
        Path::new("memory/ca.crt"),
        root.key_pem.as_bytes(),
        Path::new("memory/ca.key"),
    )
    .unwrap()
}

/// Identities signed by `ca`, holding `ids`.
pub async fn identities(ca: FileCa, ids: &[&str]) -> (Identities, TrustBundle) {
    let bundle = ca.bundle();
    let identities = Identities::new(Arc::new(ca), IdentitiesConfig::default()).unwrap();
    for held in ids {
        identities.add(id(held)).await.unwrap();
    }
    (identities, bundle)
}

/// What the test handler saw.
pub type Seen = Arc<Mutex<Vec<Inbound>>>;

/// A tunnel server on a loopback port whose handler records each CONNECT, refuses the identity
/// [`DENIED`] with 403 and connects everything else to its destination.
pub struct Server {
    pub addr: SocketAddr,
    pub tunnel: TunnelServer<Handler>,
    pub seen: Seen,
    pub task: JoinHandle<()>,
}

pub type Handler = Box<
    dyn Fn(Inbound) -> std::pin::Pin<Box<dyn Future<Output = Decision<TcpStream>> + Send>>
        + Send
        + Sync,
>;

pub fn recording_handler(seen: Seen) -> Handler {
    Box::new(move |inbound: Inbound| {
        let seen = seen.clone();
        Box::pin(async move {
            seen.lock().unwrap().push(inbound.clone());
            if inbound.peer == id(DENIED) {
                return Decision::Refuse {
                    status: 403,
                    reason: format!("policy: {} may not reach {}", inbound.peer, inbound.dst),
                };
            }
            match TcpStream::connect(inbound.dst).await {
                // The agent's path: DATA frames straight to and from the socket.
                Ok(upstream) => Decision::Deliver(upstream),
                Err(e) => Decision::Refuse {
                    status: 503,
                    reason: format!("cannot connect to {}: {e}", inbound.dst),
                },
            }
        })
    })
}

impl Server {
    /// Starts a server on a new loopback port.
    pub async fn start(identities: Identities, bundle: &TrustBundle, config: TunnelConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, identities, bundle, config)
    }

    /// Starts a server on `listener`.
    pub fn start_on(
        listener: TcpListener,
        identities: Identities,
        bundle: &TrustBundle,
        config: TunnelConfig,
    ) -> Self {
        init_logging();
        let addr = listener.local_addr().unwrap();
        let seen = Seen::default();
        let tunnel =
            TunnelServer::new(identities, bundle, config, recording_handler(seen.clone())).unwrap();
        let serving = tunnel.clone();
        let task = tokio::spawn(async move { serving.serve(listener).await });
        Server {
            addr,
            tunnel,
            seen,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Inbound> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Logs to the test output when `RUST_LOG` asks for it (`RUST_LOG=mesh_tunnel=debug`).
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// An echo server on a loopback port: returns every byte, and half-closes when the client does.
pub async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                // copy() ends at EOF; shutting down then passes the half-close back.
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    addr
}

/// `len` bytes of a fixed pseudo-random sequence (xorshift), so misordered or dropped chunks
/// show as a mismatch.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` and half-closes, while reading everything that comes back until EOF.
pub async fn round_trip<S>(stream: S, data: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async {
        write.write_all(data).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::new();
        read.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("round trip timed out");
    back
}

/// Writes `data` and reads the same number of bytes back (the stream stays open).
pub async fn exchange<S>(stream: &mut S, data: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(data).await.unwrap();
    let mut back = vec![0; data.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("exchange timed out")
        .unwrap();
    back
}

/// Polls `check` every 20 ms until it holds, failing after 10 s.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
