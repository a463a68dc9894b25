//! The [`mesh_http::Dialer`] hook, as the agent's mTLS tunnel uses it: routed upstream
//! connections are opened by the dialer, pooled by route key (a connection opened for one source
//! identity never carries another's request), and a refusal by the destination's policy is
//! answered 403 without holding the endpoint at fault.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use common::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_http::{Config, Dial, Dialer, Dialing, Proxy, Resilience, Route};
use mesh_policy::PolicyStore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

const NS: &str = "shop";
const CLIENT_A: [u8; 4] = [127, 61, 0, 10];
const CLIENT_B: [u8; 4] = [127, 61, 0, 11];
const CLIENT_DENIED: [u8; 4] = [127, 61, 0, 12];

/// What the test dialer saw: the key of each connection it opened, and every write made on a
/// routed connection with the key it was opened for.
#[derive(Debug, Default)]
struct Log {
    dials: Mutex<Vec<String>>,
    writes: Mutex<Vec<(String, Vec<u8>)>>,
}

/// Routes by the client's address, as the agent routes by the client pod's identity.
#[derive(Debug)]
struct ByClient(Arc<Log>);

impl Dialer for ByClient {
    fn route(&self, src: SocketAddr, _endpoint: SocketAddr) -> Option<Route> {
        let key = match src.ip() {
            IpAddr::V4(ip) if ip.octets() == CLIENT_A => "a",
            IpAddr::V4(ip) if ip.octets() == CLIENT_B => "b",
            IpAddr::V4(ip) if ip.octets() == CLIENT_DENIED => "denied",
            _ => return None,
        };
        Some(Route::new(
            key,
            Arc::new(TagDial {
                key: key.to_owned(),
                log: self.0.clone(),
            }),
        ))
    }
}

struct TagDial {
    key: String,
    log: Arc<Log>,
}

impl Dial for TagDial {
    fn dial(&self, endpoint: SocketAddr) -> Dialing {
        let (key, log) = (self.key.clone(), self.log.clone());
        Box::pin(async move {
            if key == "denied" {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "refused by the destination's agent: 403",
                ));
            }
            let inner = TcpStream::connect(endpoint).await?;
            log.dials.lock().unwrap().push(key.clone());
            Ok(Box::new(Tagged { inner, key, log }) as mesh_http::BoxedIo)
        })
    }
}

/// A routed connection that records what is written on it.
struct Tagged {
    inner: TcpStream,
    key: String,
    log: Arc<Log>,
}

impl AsyncRead for Tagged {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tagged {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let entry = (self.key.clone(), buf[..*n].to_vec());
            self.log.writes.lock().unwrap().push(entry);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An HTTP/1.1 (or h2c) client connection to the harness from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

struct Client(hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>);

impl Client {
    async fn new(from: [u8; 4], to: SocketAddr) -> Self {
        let stream = connect_from(from, to).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Self(sender)
    }

    async fn send(&mut self, method: &str, path: &str, who: &str, body: Bytes) -> Answer {
        self.0.ready().await.unwrap();
        let request = request(method, "web", path, &[("x-client", who)], body);
        read_answer(self.0.send_request(request).await.unwrap()).await
    }
}

fn written_by(log: &Log, key: &str, needle: &str) -> (usize, usize) {
    let writes = log.writes.lock().unwrap();
    let mine = writes
        .iter()
        .filter(|(k, w)| k == key && w.windows(needle.len()).any(|x| x == needle.as_bytes()))
        .count();
    let others = writes
        .iter()
        .filter(|(k, w)| k != key && w.windows(needle.len()).any(|x| x == needle.as_bytes()))
        .count();
    (mine, others)
}

// One thread: the proxy's pools are per thread, as on the agent's workers.
#[tokio::test(flavor = "current_thread")]
async fn routed_connections_are_pooled_per_route_and_never_shared() {
    init_tracing();
    let backend = echo("web", lo(62, 0, 1)).await;
    let yaml = service("web", NS, "10.96.0.1", &[backend.addr]);
    let log = Arc::new(Log::default());
    let policy = Arc::new(PolicyStore::new(compile(&yaml)));
    let proxy = Proxy::with_resilience(Config::default(), policy, Resilience::default())
        .with_dialer(Arc::new(ByClient(log.clone())));
    let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
    let (listen, _) = serve_on(proxy.clone(), vip, false).await;

    // Keep-alive requests of two clients, interleaved: the fast path reuses each route's
    // connection, and never the other's idle one, though the endpoint is the same.
    let mut a = Client::new(CLIENT_A, listen).await;
    let mut b = Client::new(CLIENT_B, listen).await;
    for i in 0..3 {
        let answer = a.send("GET", &format!("/a{i}"), "a", Bytes::new()).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.seen_header("x-client").as_deref(), Some("a"));
        let answer = b.send("GET", &format!("/b{i}"), "b", Bytes::new()).await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(
        *log.dials.lock().unwrap(),
        ["a", "b"],
        "one pooled connection each"
    );
    assert_eq!(written_by(&log, "a", "x-client: a"), (3, 0));
    assert_eq!(written_by(&log, "b", "x-client: b"), (3, 0));

    // A body too large for the fast path goes through hyper, whose HTTP/1 connections along a
    // route are pooled by its key as well: one new connection for both requests.
    for _ in 0..2 {
        let big = Bytes::from(vec![b'x'; 100 * 1024]);
        let answer = a.send("POST", "/big", "a", big).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.seen_header("x-client").as_deref(), Some("a"));
    }
    assert_eq!(*log.dials.lock().unwrap(), ["a", "b", "a"]);
    assert_eq!(
        written_by(&log, "b", "/big"),
        (0, 2),
        "sent on a's connections only"
    );
    // In origin-form, as to any origin server (an absolute URI is for proxies: the pod's
    // application would see `http://ip:port/big` as the path).
    assert_eq!(written_by(&log, "a", "POST /big HTTP/1.1"), (2, 0));
    assert_eq!(written_by(&log, "a", "POST http://"), (0, 0));

    // gRPC over HTTP/2 goes upstream in HTTP/2, pooled by route too.
    let (listen_h2, _) = serve_on(proxy.clone(), vip, true).await;
    let stream = connect_from(CLIENT_B, listen_h2).await;
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..2 {
        h2.ready().await.unwrap();
        let request = request(
            "POST",
            "",
            "http://web/pkg.Svc/Call",
            &[("content-type", "application/grpc"), ("x-client", "b")],
            Bytes::new(),
        );
        let answer = read_answer(h2.send_request(request).await.unwrap()).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.seen_header("x-client").as_deref(), Some("b"));
    }
    assert_eq!(
        *log.dials.lock().unwrap(),
        ["a", "b", "a", "b"],
        "one HTTP/2 connection for both gRPC calls"
    );
    let stats = proxy.stats().snapshot();
    assert_eq!(stats.upstream_errors, 0, "{stats:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_refusal_by_the_destinations_policy_is_a_403_and_no_ejection() {
    init_tracing();
    let backend = echo("web", lo(62, 0, 2)).await;
    let yaml = service("web", NS, "10.96.0.1", &[backend.addr]);
    let log = Arc::new(Log::default());
    let policy = Arc::new(PolicyStore::new(compile(&yaml)));
    // Ejection at the first failure: a refusal counted as one would take the endpoint out.
    let resilience = Resilience {
        consecutive_failures: 1,
        ..Resilience::default()
    };
    let proxy = Proxy::with_resilience(Config::default(), policy, resilience)
        .with_dialer(Arc::new(ByClient(log.clone())));
    let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
    let (listen, _) = serve_on(proxy.clone(), vip, false).await;

    let mut denied = Client::new(CLIENT_DENIED, listen).await;
    for _ in 0..3 {
        let answer = denied.send("GET", "/", "denied", Bytes::new()).await;
        assert_eq!(answer.status, 403);
        assert!(
            String::from_utf8_lossy(&answer.body).contains("denied by the destination's policy"),
            "{answer:?}"
        );
    }
    assert_eq!(backend.count(), 0, "nothing reached the endpoint");
    let stats = proxy.stats().snapshot();
    assert_eq!(stats.denied_upstream, 3, "{stats:?}");
    assert_eq!(stats.retries, 0, "a refusal is not retried: {stats:?}");
    assert_eq!(stats.ejections, 0, "{stats:?}");
    assert_eq!(stats.upstream_errors, 0, "{stats:?}");

    // The endpoint still serves the clients the destination allows.
    let mut a = Client::new(CLIENT_A, listen).await;
    assert_eq!(a.send("GET", "/", "a", Bytes::new()).await.status, 200);
    assert_eq!(backend.count(), 1);
}
