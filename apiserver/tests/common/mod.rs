//! Test glue: runs the `mesh-apiserver` binary on a loopback port and talks HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A running server; killed on drop.
pub struct ApiServer {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl ApiServer {
    /// Starts the binary with `args` (plus `--kubeconfig` and `--state` in a temp dir).
    pub fn start(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (child, addr) = spawn(dir.path(), "127.0.0.1:0", &args);
        ApiServer {
            child,
            addr,
            dir,
            args,
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the server and starts it again on the same address and state file.
    pub fn restart(&mut self) {
        self.kill();
        let (child, addr) = spawn(self.dir.path(), &self.addr.clone(), &self.args);
        self.child = child;
        assert_eq!(addr, self.addr);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn client(&self) -> Http {
        Http {
            base: self.url(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &Path, listen: &str, args: &[String]) -> (Child, String) {
    let mut last_err = None;
    // Rebinding the port of a just-killed server can race its socket teardown: retry briefly.
    for _ in 0..50 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-apiserver"))
            .arg("--listen")
            .arg(listen)
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .arg("--state")
            .arg(dir.join("state.json"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mesh-apiserver");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address");
        if !line.trim().is_empty() {
            return (child, line.trim().to_string());
        }
        last_err = child.wait().ok();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("mesh-apiserver did not start: {last_err:?}");
}

/// A minimal HTTP client for the raw API.
#[derive(Clone)]
pub struct Http {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let resp = self.client.request(req).await.expect("send");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    }

    /// A GET with an Accept header; returns the status, the response Content-Type and the body.
    pub async fn get_accept(&self, path: &str, accept: &str) -> (u16, String, Value) {
        let req = Request::builder()
            .uri(format!("{}{}", self.base, path))
            .header("accept", accept)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = self.client.request(req).await.expect("send");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            ct,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(Method::GET, path, "application/json", "").await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(Method::POST, path, "application/json", &body.to_string())
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(Method::PUT, path, "application/json", &body.to_string())
            .await
    }

    pub async fn patch(&self, path: &str, content_type: &str, body: &Value) -> (u16, Value) {
        self.send(Method::PATCH, path, content_type, &body.to_string())
            .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(Method::DELETE, path, "application/json", "")
            .await
    }

    /// Opens a watch and returns its status and a stream of parsed events.
    pub async fn watch(&self, path: &str) -> (u16, Watch) {
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{}", self.base, path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = self.client.request(req).await.expect("send");
        let status = resp.status().as_u16();
        (
            status,
            Watch {
                body: resp.into_body(),
                buf: Vec::new(),
            },
        )
    }
}

/// The events of a watch response.
pub struct Watch {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event, or None when the server ended the stream or nothing came within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line).expect("event JSON"));
            }
            let frame = tokio::time::timeout(wait, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    /// Whether the server closed the stream within `wait` (after draining pending events).
    pub async fn ended_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match tokio::time::timeout(left, self.body.frame()).await {
                Err(_) => return false,
                Ok(None) => return true,
                Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

pub fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {v}"))
}

pub fn configmap(name: &str, labels: Value) -> Value {
    serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels}, "data": {"k": name}})
}
