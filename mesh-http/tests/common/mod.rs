//! Loopback fixtures: echo backends like `shared/conformance/echo_backend.py`, a listener that
//! hands accepted connections to [`Proxy::serve`], policies, and small HTTP clients.
#![allow(
    clippy::unwrap_used,
    dead_code,
    reason = "test code: a panic is a failed test; not every test uses every helper"
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_http::{Config, Proxy, Resilience};
use mesh_policy::{Compiled, PolicyStore};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What an echo backend received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub version: http::Version,
}

/// A running echo backend.
#[derive(Clone)]
pub struct Echo {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// When set, answers this status instead of 200.
    pub fail_with: Arc<AtomicU32>,
}

impl Echo {
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn joined(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

fn delay_of(path: &str) -> Option<Duration> {
    let query = path.split_once('?')?.1;
    let value = query.split('&').find_map(|kv| kv.strip_prefix("delay="))?;
    if let Some(ms) = value.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    value
        .trim_end_matches('s')
        .parse::<f64>()
        .ok()
        .map(Duration::from_secs_f64)
}

async fn echo_handle(echo: Echo, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let mut headers_map = joined(&parts.headers);
    if let Some(authority) = parts.uri.authority()
        && !headers_map.contains_key("host")
    {
        headers_map.insert("host".into(), authority.as_str().to_owned());
    }
    echo.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
        version: parts.version,
    });
    let record = json!({
        "backend": echo.name,
        "port": echo.addr.port(),
        "method": parts.method.as_str(),
        "path": path,
        "headers": headers_map,
        "body_len": body.len(),
    });
    if let Some(delay) = delay_of(&path) {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::new(Full::new(Bytes::from(record.to_string())));
    let fail = echo.fail_with.load(Ordering::Relaxed);
    if fail != 0 {
        *response.status_mut() = StatusCode::from_u16(fail as u16).unwrap();
    }
    let h = response.headers_mut();
    if let Some(set) = parts.headers.get("x-echo-set-header") {
        for pair in set
            .to_str()
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once(':').unwrap_or((pair, ""));
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.trim().as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            ) {
                h.append(k, v);
            }
        }
    }
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("x-backend", echo.name.parse().unwrap());
    response
}

/// Starts an echo backend (HTTP/1.1 and h2c) on `addr`.
pub async fn echo(name: &str, addr: SocketAddr) -> Echo {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let echo = Echo {
        name: name.to_owned(),
        addr: listener.local_addr().unwrap(),
        seen: Arc::default(),
        fail_with: Arc::default(),
    };
    let server = echo.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let server = server.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(echo_handle(server, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    echo
}

/// A Service with ports 80 and 8080 (both to target port 8080) whose EndpointSlice lists
/// `endpoints` (each with port 8080).
pub fn service(name: &str, namespace: &str, vip: &str, endpoints: &[SocketAddr]) -> String {
    let addresses: Vec<String> = endpoints
        .iter()
        .map(|e| format!("\"{}\"", e.ip()))
        .collect();
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  clusterIP: {vip}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
  - {{name: http-alt, port: 8080, targetPort: 8080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports:
- {{name: http, port: 8080}}
- {{name: http-alt, port: 8080}}
endpoints:
- addresses: [{}]
  conditions: {{ready: true}}
"#,
        addresses.join(", ")
    )
}

/// An HTTPRoute attached to Service `parent` port 80 in namespace `ns`.
pub fn http_route(name: &str, ns: &str, parent: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: {parent}, port: 80}}\n{spec}"
    )
}

pub fn compile(yaml: &str) -> Compiled {
    match Compiled::from_yaml(yaml, "test.yaml") {
        Ok(c) => c,
        Err(errors) => panic!(
            "policy:\n{yaml}\nerrors:\n{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

pub fn fast_resilience() -> Resilience {
    Resilience::default()
}

/// A proxy and a loopback listener whose connections it serves as if captured for `dst`.
pub struct Harness {
    pub proxy: Proxy,
    pub policy: Arc<PolicyStore>,
    pub listen: SocketAddr,
    pub results: Results,
}

pub async fn harness(yaml: &str, dst: SocketAddr, h2: bool) -> Harness {
    harness_with(yaml, dst, h2, Config::default(), Resilience::default()).await
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

pub async fn harness_with(
    yaml: &str,
    dst: SocketAddr,
    h2: bool,
    config: Config,
    resilience: Resilience,
) -> Harness {
    init_tracing();
    let policy = Arc::new(PolicyStore::new(compile(yaml)));
    let proxy = Proxy::with_resilience(config, policy.clone(), resilience);
    let (listen, results) = serve_on(proxy.clone(), dst, h2).await;
    Harness {
        proxy,
        policy,
        listen,
        results,
    }
}

/// Results of served connections.
pub type Results = Arc<Mutex<Vec<Result<mesh_http::ConnSummary, String>>>>;

/// A loopback listener whose connections `proxy` serves as if captured for `dst`.
pub async fn serve_on(proxy: Proxy, dst: SocketAddr, h2: bool) -> (SocketAddr, Results) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen = listener.local_addr().unwrap();
    let results: Results = Arc::default();
    let record = results.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, src)) = listener.accept().await else {
                return;
            };
            let proxy = proxy.clone();
            let record = record.clone();
            tokio::spawn(async move {
                // Read some bytes first, as the agent's protocol detection does.
                let mut prefix = vec![0u8; if h2 { 24 } else { 7 }];
                let mut filled = 0;
                while filled < prefix.len() {
                    match tokio::time::timeout(
                        Duration::from_millis(200),
                        stream.read(&mut prefix[filled..]),
                    )
                    .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => return,
                        Ok(Ok(n)) => filled += n,
                        Err(_) => break,
                    }
                }
                prefix.truncate(filled);
                let result = proxy.serve(stream, prefix, src, dst, h2).await;
                record
                    .lock()
                    .unwrap()
                    .push(result.map_err(|e| e.to_string()));
            });
        }
    });
    (listen, results)
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Header the backend saw (values joined with `,`), from the echo body.
    pub fn seen_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name.to_ascii_lowercase()]
            .as_str()
            .map(str::to_owned)
    }

    pub fn backend(&self) -> Option<String> {
        self.json()["backend"].as_str().map(str::to_owned)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<String> = self
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }
}

/// One HTTP/1.1 keep-alive connection to the harness.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Self { sender }
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Answer {
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        read_answer(response).await
    }

    pub async fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send(request("GET", host, path, headers, Bytes::new()))
            .await
    }

    pub async fn raw_send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        self.sender.ready().await?;
        self.sender.send_request(request).await
    }
}

pub async fn read_answer(response: Response<Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

pub fn request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(path);
    if !host.is_empty() {
        builder = builder.header("host", host);
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(body)).unwrap()
}

/// One HTTP/2 (prior knowledge) connection to the harness.
pub struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender }
    }

    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Answer {
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        read_answer(response).await
    }
}

/// Writes raw bytes and reads until the proxy closes or 2 s pass.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Err(e)) => {
                eprintln!("raw_exchange read error: {e}");
                break;
            }
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `127.<a>.<b>.<c>:8080`.
pub fn lo(a: u8, b: u8, c: u8) -> SocketAddr {
    SocketAddr::from(([127, a, b, c], 8080))
}
