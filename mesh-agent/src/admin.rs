//! The admin HTTP server, on its own address (loopback by default): `/metrics` (OpenMetrics),
//! `/healthz`, `/readyz` (ready once the programs are attached, the listeners are in the SockMap
//! and a policy is loaded), `/config_dump` (the policy in force, as JSON) and `/status`
//! (interfaces, attach modes, map fill levels, counters).
//!
//! Whoever can reach the address can open connections to it, so every resource a client can
//! claim is bounded: at most [`MAX_CONNECTIONS`] connections at once (more are answered `503`
//! and closed), request heads of at most [`MAX_HEAD_BYTES`] (`431`), bodies of at most
//! [`MAX_BODY_BYTES`] (`413`; no endpoint takes one), a head within [`HEADER_READ_TIMEOUT`]
//! (also the longest idle time between keep-alive requests) and a body within
//! [`BODY_READ_TIMEOUT`], and a connection lives at most [`CONNECTION_LIFETIME`] before it is
//! closed between requests (and [`SHUTDOWN_GRACE`] later, whatever it is doing), so slowloris
//! heads and bodies, and readers that never read, cannot pile up.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderValue, Request, Response, StatusCode,
    header::{CONNECTION, CONTENT_TYPE},
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, info, warn};

use crate::{metrics::Metrics, policy::Store};

/// Admin connections served at once. Scrapers and probes use one or two each; the rest wait
/// for a slot no longer than a head read timeout.
pub const MAX_CONNECTIONS: usize = 32;
/// Largest request head (hyper's read buffer, whose floor is 8 KiB); larger heads get `431`.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in a request head.
pub const MAX_HEADERS: usize = 64;
/// Largest request body read; no endpoint takes one, so this only spares well-behaved clients
/// an error for an empty form.
pub const MAX_BODY_BYTES: usize = 1024;
/// Time for a complete request head, counted from the connection start or the end of the last
/// response: a slowloris head or an idle keep-alive connection is closed after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a complete request body once its head arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// After this long a connection is closed once its current response is written.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// After [`CONNECTION_LIFETIME`], the time a response may still take to be read.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Connections over [`MAX_CONNECTIONS`] being answered `503` at once; further ones are closed
/// without an answer.
const MAX_REFUSING: usize = 64;
/// What a connection over [`MAX_CONNECTIONS`] gets.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
    content-type: text/plain\r\ncontent-length: 34\r\n\r\ntoo many admin connections, retry\n";

/// Produces the `/status` document.
pub type StatusFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the handlers read.
pub struct State {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    pub policy: Store,
    pub config: serde_json::Value,
    pub status: StatusFn,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the admin server on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds now (so a port clash is a startup error) and serves in the background.
pub async fn spawn(addr: SocketAddr, state: Arc<State>) -> Result<SocketAddr, Error> {
    let listener = bind(addr)?;
    Ok(spawn_on(listener, state, addr)?.0)
}

/// Binds the admin address (blocking, non-blocking mode set): separate from serving so that a
/// handover can pass the very socket to the next agent.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
    l.set_nonblocking(true)
        .map_err(|source| Error::Bind { addr, source })?;
    Ok(l)
}

/// Serves on an already bound listener (ours, or the one a predecessor handed over); the task
/// is aborted when this agent hands over.
pub fn spawn_on(
    listener: std::net::TcpListener,
    state: Arc<State>,
    addr: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let _ = listener.set_nonblocking(true);
    let listener =
        TcpListener::from_std(listener).map_err(|source| Error::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    info!(%local, "admin server listening");
    Ok((local, tokio::spawn(accept(listener, state))))
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "admin server busy; refusing a connection");
            if let Ok(permit) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream).await;
                    drop(permit);
                });
            }
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            serve(stream, state).await;
            drop(slot);
        });
    }
}

/// Answers `503` and closes, reading what the client sent meanwhile so that the close is a FIN
/// and the answer is not lost to a reset.
async fn refuse(mut stream: TcpStream) {
    let answer = async {
        stream.write_all(BUSY).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = MAX_HEAD_BYTES;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

async fn serve(stream: TcpStream, state: Arc<State>) {
    let svc = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(respond(&state, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = tokio::time::sleep(CONNECTION_LIFETIME) => conn.as_mut().graceful_shutdown(),
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
}

/// Reads the (bounded) body, then answers.
async fn respond(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await;
    let refusal = match read {
        Ok(Ok(_)) => None,
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Some((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY_BYTES} bytes\n"),
        )),
        Ok(Err(_)) => Some((StatusCode::BAD_REQUEST, "unreadable request body\n".into())),
        Err(_) => Some((
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {BODY_READ_TIMEOUT:?}\n"),
        )),
    };
    if let Some((status, text)) = refusal {
        // The rest of the body was not read: the connection cannot carry another request.
        let mut response = reply(status, "text/plain", text);
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    handle(state, &Request::from_parts(parts, ()))
}

/// The open-file limits in force (the agent raises the soft one to the hard one at start) and
/// the fds open now: how many more connections fit.
fn open_files() -> serde_json::Value {
    use nix::sys::resource::{Resource, getrlimit};
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).ok();
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            serde_json::json!({"soft_limit": soft, "hard_limit": hard, "open": open})
        }
        Err(e) => serde_json::json!({"error": e.to_string(), "open": open}),
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    reply(StatusCode::OK, "application/json", text)
}

fn handle(state: &State, req: &Request<()>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        // Content negotiation: OpenMetrics for those who ask (Prometheus does), the classic
        // text format otherwise.
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            if openmetrics {
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    state.metrics.encode(),
                )
            } else {
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    state.metrics.encode_prometheus(),
                )
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/config_dump" => json(&serde_json::json!({
            "config": state.config,
            "policy": state.policy.current().to_json(),
        })),
        "/status" => {
            let mut s = (state.status)();
            s["ready"] = state.ready.load(Ordering::Acquire).into();
            s["open_files"] = open_files();
            json(&s)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz, /readyz, /config_dump, /status\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]
    use super::*;
    use std::time::Instant;

    async fn server() -> SocketAddr {
        let state = Arc::new(State {
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(true)),
            policy: Arc::default(),
            config: serde_json::Value::Null,
            status: Arc::new(|| serde_json::json!({})),
        });
        spawn("127.0.0.1:0".parse().unwrap(), state).await.unwrap()
    }

    /// Sends `bytes` and reads until the server closes (or 15 s pass).
    async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        read_all(&mut stream).await
    }

    async fn read_all(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }

    #[tokio::test]
    async fn oversized_heads_and_bodies_are_refused() {
        let addr = server().await;
        let ok = exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        let big = format!(
            "GET /healthz HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES * 2)
        );
        let answer = exchange(addr, big.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        let body = format!(
            "POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n{}",
            "b".repeat(MAX_BODY_BYTES + 1),
            n = MAX_BODY_BYTES + 1
        );
        let answer = exchange(addr, body.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        let chunked = format!(
            "POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            MAX_BODY_BYTES * 4,
            "c".repeat(MAX_BODY_BYTES * 4)
        );
        let answer = exchange(addr, chunked.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    #[tokio::test]
    async fn slow_heads_and_bodies_are_cut_off() {
        let addr = server().await;
        let start = Instant::now();
        // A slowloris head: a byte now and then, never the end.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        let mut closed = false;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if slow.write_all(b"X").await.is_err() {
                closed = true;
                break;
            }
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), slow.read(&mut byte)).await
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "a slowloris head is closed");
        let elapsed = start.elapsed();
        assert!(
            elapsed >= HEADER_READ_TIMEOUT && elapsed < HEADER_READ_TIMEOUT * 2,
            "{elapsed:?}"
        );
        // A body that never completes gets 408.
        let answer = exchange(
            addr,
            b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    #[tokio::test]
    async fn connections_over_the_limit_get_503_and_slots_come_back() {
        let addr = server().await;
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // Each holds a slot with a keep-alive request answered.
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            held.push(s);
        }
        let answer = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        drop(held);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
