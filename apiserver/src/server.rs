//! HTTP: the hyper service, routing of API paths to verbs, and the discovery, OpenAPI and
//! test-control endpoints.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::api::{self, ListOptions, Part, PatchKind, WriteOptions};
use crate::error::{ApiError, Result};
use crate::output::Shape;
use crate::resources::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::Store;
use crate::watch::{self, WatchOptions, WatchSettings};

pub type Body = BoxBody<Bytes, Infallible>;

/// The state every request shares.
pub struct Server {
    store: Mutex<Store>,
    watch: WatchSettings,
    address: Mutex<String>,
}

impl Server {
    pub fn new(store: Store, watch: WatchSettings) -> Arc<Self> {
        Arc::new(Server {
            store: Mutex::new(store),
            watch,
            address: Mutex::new(String::new()),
        })
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves a consistent map (writes are single inserts), so
        // carrying on is better than failing every later request.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves connections on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        if let Ok(addr) = listener.local_addr() {
            *self.address.lock().unwrap_or_else(|e| e.into_inner()) = addr.to_string();
        }
        loop {
            let (stream, peer) = listener.accept().await?;
            let server = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error_response(&ApiError::BadRequest(format!("reading body: {e}"))),
        };
        let method = parts.method.clone();
        let path = parts.uri.path().to_string();
        let query: HashMap<String, String> = parts
            .uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let accept = parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let req = Req {
            accept,
            method,
            path,
            query,
            content_type,
            body,
        };
        let resp = match self.route(&req) {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        tracing::debug!(%peer, method = %req.method, path = %req.path, status = resp.status().as_u16(), "request");
        resp
    }

    fn route(&self, req: &Req) -> Result<Response<Body>> {
        let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
        let get = req.method == Method::GET;
        match segs.as_slice() {
            ["version"] if get => Ok(json_response(200, &version())),
            ["healthz"] | ["livez"] | ["readyz"] if get => Ok(text_response(200, "ok")),
            ["_test", "compact"] if req.method == Method::POST => {
                let rv = self.store().compact();
                Ok(json_response(
                    200,
                    &json!({"resourceVersion": rv.to_string()}),
                ))
            }
            // An empty OpenAPI v2 document (zero bytes of protobuf): kubectl's client-side
            // validation, which it falls back to for kinds the server does not serve, then finds no
            // schema and lets the request reach the "no matches for kind" error the real server
            // gives, instead of failing on a 404 here.
            ["openapi", "v2"] if get => Ok(Response::builder()
                .status(200)
                .header(
                    header::CONTENT_TYPE,
                    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                )
                .body(empty())
                .unwrap_or_else(|_| Response::new(empty()))),
            ["openapi", "v3"] if get => Ok(json_response(
                200,
                &crate::openapi::root(&self.store().registry),
            )),
            ["openapi", "v3", "api", v] if get => self.openapi_doc("", v),
            ["openapi", "v3", "apis", g, v] if get => self.openapi_doc(g, v),
            ["api"] | ["apis"] if get && wants_aggregated(&req.accept) => {
                let doc = self.store().registry.aggregated(segs == ["api"]);
                let mut resp = json_response(200, &doc);
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(AGGREGATED_CONTENT_TYPE),
                );
                resp.headers_mut()
                    .insert(header::VARY, http::HeaderValue::from_static("Accept"));
                Ok(resp)
            }
            ["api"] if get => {
                let addr = self
                    .address
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                Ok(json_response(
                    200,
                    &self.store().registry.api_versions(&addr),
                ))
            }
            ["apis"] if get => Ok(json_response(200, &self.store().registry.api_group_list())),
            ["apis", g] if get => self
                .store()
                .registry
                .api_group(g)
                .map(|d| json_response(200, &d))
                .ok_or_else(|| ApiError::NoRoute(req.path.clone())),
            ["api", v] if get => self.resource_list("", v, req),
            ["apis", g, v] if get => self.resource_list(g, v, req),
            ["api", v, rest @ ..] => self.resource("", v, rest, req),
            ["apis", g, v, rest @ ..] => self.resource(g, v, rest, req),
            _ => Err(ApiError::NoRoute(req.path.clone())),
        }
    }

    fn openapi_doc(&self, group: &str, version: &str) -> Result<Response<Body>> {
        let store = self.store();
        if store.registry.resource_list(group, version).is_none() {
            return Err(ApiError::NoRoute(format!("{group}/{version}")));
        }
        Ok(json_response(
            200,
            &crate::openapi::document(&store.registry, group, version),
        ))
    }

    fn resource_list(&self, group: &str, version: &str, req: &Req) -> Result<Response<Body>> {
        self.store()
            .registry
            .resource_list(group, version)
            .map(|d| json_response(200, &d))
            .ok_or_else(|| ApiError::NoRoute(req.path.clone()))
    }

    fn resource(
        &self,
        group: &str,
        version: &str,
        rest: &[&str],
        req: &Req,
    ) -> Result<Response<Body>> {
        let target = {
            let store = self.store();
            parse_target(&store, group, version, rest)
                .ok_or_else(|| ApiError::NoRoute(req.path.clone()))?
        };
        match (&target.name, &req.method) {
            (None, &Method::GET) => self.list_or_watch(&target, req),
            (None, &Method::POST) => {
                let body = parse_body(req, &target.rt)?;
                let opts = write_options(req)?;
                let mut store = self.store();
                let obj = api::create(&mut store, &target.rt, &target.ns, body, &opts)?;
                Ok(json_response(201, &obj))
            }
            (None, &Method::DELETE) => {
                let opts = list_options(req, &target.rt)?;
                let mut store = self.store();
                let list = api::delete_collection(&mut store, &target.rt, &target.ns, &opts)?;
                Ok(json_response(200, &list))
            }
            (Some(name), m)
                if target.sub.as_deref() == Some("scale") && target.rt.scale.is_some() =>
            {
                self.scale(&target, name, m, req)
            }
            (Some(name), m) => {
                let part = match target.sub.as_deref() {
                    None => Part::Main,
                    Some("status") if target.rt.status => Part::Status,
                    Some(_) => return Err(ApiError::NoRoute(req.path.clone())),
                };
                self.item(&target, name, part, m, req)
            }
            (None, m) => Err(ApiError::MethodNotAllowed(format!(
                "the server does not allow this method on the requested resource ({m} on a collection)"
            ))),
        }
    }

    fn item(
        &self,
        t: &Target,
        name: &str,
        part: Part,
        method: &Method,
        req: &Req,
    ) -> Result<Response<Body>> {
        let rt = &t.rt;
        match *method {
            Method::GET => {
                // As on the real server, `watch` on an item path is ignored: watches of one object
                // go through the collection with fieldSelector=metadata.name.
                let obj = api::get(&self.store(), rt, &t.ns, name)?;
                Ok(json_response(
                    200,
                    &Shape::from_accept(&req.accept).item(rt, obj),
                ))
            }
            Method::PUT => {
                let body = parse_body(req, rt)?;
                let opts = write_options(req)?;
                let mut store = self.store();
                let obj = api::update(&mut store, rt, &t.ns, name, body, part, &opts)?;
                Ok(json_response(200, &obj))
            }
            Method::PATCH => {
                let kind = PatchKind::from_content_type(&req.content_type).ok_or_else(|| {
                    ApiError::UnsupportedMediaType(format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml{}",
                        if rt.crd.is_none() { ", application/strategic-merge-patch+json" } else { "" }
                    ))
                })?;
                let mut opts = write_options(req)?;
                opts.force = flag(req, "force");
                let mut store = self.store();
                let (obj, created) =
                    api::patch(&mut store, rt, &t.ns, name, kind, &req.body, part, &opts)?;
                Ok(json_response(if created { 201 } else { 200 }, &obj))
            }
            Method::DELETE if part == Part::Main => {
                // DeleteOptions may come as a body (kubectl, kube-rs DeleteParams).
                let options: Value = if req.body.iter().all(u8::is_ascii_whitespace) {
                    json!({})
                } else {
                    serde_json::from_slice(&req.body).map_err(|e| {
                        ApiError::BadRequest(format!("error decoding DeleteOptions: {e}"))
                    })?
                };
                let dry_run = req.query.contains_key("dryRun")
                    || options["dryRun"].as_array().is_some_and(|d| !d.is_empty());
                let preconditions = api::Preconditions {
                    uid: options
                        .pointer("/preconditions/uid")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    resource_version: options
                        .pointer("/preconditions/resourceVersion")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                };
                let mut store = self.store();
                let obj = api::delete(&mut store, rt, &t.ns, name, dry_run, &preconditions)?;
                Ok(json_response(200, &obj))
            }
            ref m => Err(ApiError::MethodNotAllowed(format!(
                "the server does not allow this method on the requested resource ({m})"
            ))),
        }
    }

    fn scale(&self, t: &Target, name: &str, method: &Method, req: &Req) -> Result<Response<Body>> {
        let rt = &t.rt;
        match *method {
            Method::GET => Ok(json_response(
                200,
                &crate::scale::get(&self.store(), rt, &t.ns, name)?,
            )),
            Method::PUT => {
                let body = parse_body(req, rt)?;
                let opts = write_options(req)?;
                let scale = crate::scale::update(&mut self.store(), rt, &t.ns, name, &body, &opts)?;
                Ok(json_response(200, &scale))
            }
            Method::PATCH => {
                let kind = PatchKind::from_content_type(&req.content_type).ok_or_else(|| {
                    ApiError::UnsupportedMediaType(format!(
                        "unsupported patch type {:?}",
                        req.content_type
                    ))
                })?;
                let opts = write_options(req)?;
                let scale = crate::scale::patch(
                    &mut self.store(),
                    rt,
                    &t.ns,
                    name,
                    kind,
                    &req.body,
                    &opts,
                )?;
                Ok(json_response(200, &scale))
            }
            ref m => Err(ApiError::MethodNotAllowed(format!(
                "the server does not allow this method on the requested resource ({m})"
            ))),
        }
    }

    fn list_or_watch(&self, t: &Target, req: &Req) -> Result<Response<Body>> {
        let list = list_options(req, &t.rt)?;
        if !flag(req, "watch") {
            let doc = api::list(&self.store(), &t.rt, &t.ns, &list)?;
            return Ok(json_response(
                200,
                &Shape::from_accept(&req.accept).list(&t.rt, doc),
            ));
        }
        let timeout = match req.query.get("timeoutSeconds") {
            Some(s) => Some(Duration::from_secs(s.parse().map_err(|_| {
                ApiError::BadRequest(format!("invalid timeoutSeconds {s:?}"))
            })?)),
            None => None,
        };
        let opts = WatchOptions {
            list,
            bookmarks: flag(req, "allowWatchBookmarks"),
            timeout,
            send_initial_events: req
                .query
                .get("sendInitialEvents")
                .map(|v| v == "true" || v == "1"),
            shape: Shape::from_accept(&req.accept),
        };
        let started = {
            let store = self.store();
            watch::start(&store, t.rt.clone(), t.ns.clone(), opts, &self.watch)
        };
        match started {
            watch::Start::Error(e) => Err(e),
            watch::Start::Stream(rx) => {
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv()
                        .await
                        .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                });
                let body = BodyExt::boxed(StreamBody::new(stream));
                Ok(Response::builder()
                    .status(200)
                    .header(header::CONTENT_TYPE, "application/json")
                    .header(header::CACHE_CONTROL, "no-cache, private")
                    .body(body)
                    .unwrap_or_else(|_| Response::new(empty())))
            }
        }
    }
}

/// A parsed resource path.
struct Target {
    rt: ResourceType,
    /// "" for cluster-scoped resources and all-namespace lists.
    ns: String,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(store: &Store, group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let find = |plural: &str| store.registry.find(group, version, plural).cloned();
    let t = |rt: ResourceType, ns: &str, name: Option<&&str>, sub: Option<&&str>| Target {
        rt,
        ns: ns.to_string(),
        name: name.map(|s| s.to_string()),
        sub: sub.map(|s| s.to_string()),
    };
    match rest {
        ["namespaces", ns, plural, more @ ..]
            if more.len() <= 2 && find(plural).is_some_and(|r| r.namespaced) =>
        {
            Some(t(find(plural)?, ns, more.first(), more.get(1)))
        }
        [plural, more @ ..] if more.len() <= 2 => {
            let rt = find(plural)?;
            if rt.namespaced && !more.is_empty() {
                return None;
            }
            Some(t(rt, "", more.first(), more.get(1)))
        }
        _ => None,
    }
}

/// A request with its body read.
struct Req {
    accept: String,
    method: Method,
    path: String,
    query: HashMap<String, String>,
    content_type: String,
    body: Bytes,
}

fn flag(req: &Req, name: &str) -> bool {
    req.query
        .get(name)
        .is_some_and(|v| v == "1" || v == "true" || v.is_empty())
}

fn parse_body(req: &Req, rt: &ResourceType) -> Result<Value> {
    if req.content_type.contains("protobuf") {
        return crate::proto::decode(&rt.kind, &req.body);
    }
    if req.content_type.contains("cbor") {
        return Err(ApiError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {})",
            req.content_type
        )));
    }
    if req.content_type.contains("yaml") {
        let text = std::str::from_utf8(&req.body)
            .map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
        return serde_yaml::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| ApiError::BadRequest(format!("error decoding JSON: {e}")))
}

fn write_options(req: &Req) -> Result<WriteOptions> {
    let strict = match req.query.get("fieldValidation").map(String::as_str) {
        None | Some("Ignore") | Some("Warn") | Some("") => false,
        Some("Strict") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "fieldValidation must be one of \"Ignore\", \"Warn\", or \"Strict\", got {other:?}"
            )));
        }
    };
    Ok(WriteOptions {
        field_manager: req
            .query
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .cloned(),
        strict,
        force: false,
        dry_run: req.query.contains_key("dryRun"),
    })
}

fn list_options(req: &Req, rt: &ResourceType) -> Result<ListOptions> {
    let q = |k: &str| req.query.get(k).cloned();
    Ok(ListOptions {
        labels: LabelSelector::parse(&q("labelSelector").unwrap_or_default())?,
        fields: FieldSelector::parse(&q("fieldSelector").unwrap_or_default(), &rt.kind)?,
        limit: match q("limit") {
            Some(l) => Some(
                l.parse()
                    .map_err(|_| ApiError::BadRequest(format!("invalid limit {l:?}")))?,
            ),
            None => None,
        },
        continue_token: q("continue"),
        resource_version: q("resourceVersion"),
        resource_version_match: q("resourceVersionMatch"),
    })
}

const AGGREGATED_CONTENT_TYPE: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Whether the Accept header asks for aggregated discovery v2 (v2beta1 alone gets the plain
/// documents, which every client also accepts).
fn wants_aggregated(accept: &str) -> bool {
    accept.split(',').any(|t| {
        let params: Vec<&str> = t.split(';').map(str::trim).collect();
        params.contains(&"g=apidiscovery.k8s.io")
            && params.contains(&"v=v2")
            && params.contains(&"as=APIGroupDiscoveryList")
    })
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0",
        "gitCommit": "mesh-apiserver",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

fn empty() -> Body {
    BodyExt::boxed(Full::new(Bytes::new()))
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut body = v.to_string();
    body.push('\n');
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(Full::new(Bytes::from(body))))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn text_response(code: u16, s: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(BodyExt::boxed(Full::new(Bytes::from(s.to_string()))))
        .unwrap_or_else(|_| Response::new(empty()))
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code(), &e.status())
}
