//! One request through the proxy: route it with the current policy, apply the rule's filters in
//! Gateway API order, pick a backend and an endpoint, send with timeouts and retries, and hand
//! the response back with its headers edited.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as HttpBody, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use mesh_policy::{
    Compiled, GrpcOutcome, GrpcRequest, HeaderModifier, HttpAction, HttpFilter, HttpOutcome,
    HttpRule, MatchedPath, Mirror, PathMatchKind, PolicyStore, RequestParts, RouteId,
    split_grpc_path,
};
use tokio::sync::Semaphore;

use crate::balance::{Balancer, EndpointState, InFlight, Pick, RetryBudget};
use crate::body::{AccessLog, Active, Counted, Logged, empty, full};
use crate::config::{Config, MIRROR_BODY_LIMIT, MIRROR_TIMEOUT};
use crate::dial::Route;
use crate::headers::{
    X_REQUEST_ID, apply_modifier, connection_has, inject, random_u32, strip_hop_by_hop,
};
use crate::io::ConnState;
use crate::stats::Stats;
use crate::upstream::{Body, SendError, Upstream};

/// Everything requests share, behind the [`crate::Proxy`]'s `Arc`.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    pub policy: Arc<PolicyStore>,
    pub upstream: Upstream,
    pub balancer: Balancer,
    pub budget: RetryBudget,
    pub stats: Arc<Stats>,
    pub mirrors: Arc<Semaphore>,
    pub observer: Option<Arc<dyn crate::Observer>>,
    /// Chooses, per attempt, a way to the endpoint other than plain TCP (the mTLS tunnel).
    pub dialer: Option<Arc<dyn crate::Dialer>>,
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct ConnCtx {
    pub shared: Arc<Shared>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub h2: bool,
    pub state: Arc<ConnState>,
}

/// Per-request state carried to the response body.
pub(crate) struct Exchange {
    pub log: AccessLog,
    pub deadline: Option<tokio::time::Instant>,
    in_flight: Option<InFlight>,
    pub grpc: bool,
    /// HTTP/2 to the upstream: only when the client spoke HTTP/2 and the request is gRPC or the
    /// Service port declares HTTP/2 (`appProtocol`); otherwise HTTP/1.1, since most backends
    /// behind a mesh speak only that.
    pub upstream_h2: bool,
}

/// What the route table says.
enum Routed<'p> {
    /// No route is attached: the Service itself (or the destination, if it is no Service).
    Direct,
    /// Routes are attached and none matches.
    NotFound,
    /// A rule matched.
    Rule {
        route: &'p RouteId,
        rule: &'p HttpRule,
        matched: Option<&'p MatchedPath>,
    },
}

/// The endpoints a request may go to.
pub(crate) enum Endpoints<'p> {
    /// A backend's or Service's endpoints, from the policy.
    Listed(&'p [SocketAddr]),
    /// No Service: the original destination itself.
    Own(SocketAddr),
}

impl Endpoints<'_> {
    pub(crate) fn as_slice(&self) -> &[SocketAddr] {
        match self {
            Endpoints::Listed(endpoints) => endpoints,
            Endpoints::Own(endpoint) => std::slice::from_ref(endpoint),
        }
    }
}

/// Where a request goes and how, decided from its head ([`ConnCtx::plan`]).
pub(crate) struct Plan<'p> {
    pub endpoints: Endpoints<'p>,
    /// Path and query for the upstream, after any rewrite.
    pub target: String,
    /// Authority for the upstream, after any hostname rewrite.
    pub authority: String,
    pub response_modifiers: Vec<&'p HeaderModifier>,
    /// The rule's mirrors, each still to sample the request by its fraction.
    pub mirrors: Vec<&'p Mirror>,
    pub backend_timeout: Option<std::time::Duration>,
}

/// The request body as far as the proxy holds it.
enum RequestBody {
    /// Fully known (empty, or buffered for mirroring): can be sent again.
    Buffered(Bytes, Option<HeaderMap>),
    /// Streamed from the client: can be sent once.
    Streaming(Option<Incoming>),
}

fn buffered_body(data: &Bytes, trailers: &Option<HeaderMap>) -> Body {
    match trailers {
        None if data.is_empty() => empty(),
        None => full(data.clone()),
        Some(trailers) => {
            let trailers = trailers.clone();
            Full::new(data.clone())
                .map_err(|never| match never {})
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed_unsync()
        }
    }
}

pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The default match of a rule without a path match (gRPC rules): PathPrefix `/`.
fn catch_all() -> MatchedPath {
    MatchedPath {
        kind: PathMatchKind::PathPrefix,
        value: "/".into(),
    }
}

/// gRPC status codes for the answers the proxy gives itself.
fn grpc_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "13",
        403 => "7",
        404 => "12",
        408 | 504 => "4",
        500 => "13",
        502 | 503 => "14",
        _ => "2",
    }
}

impl ConnCtx {
    /// Serves one request. Never fails: every problem becomes a response.
    pub(crate) async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let shared = self.shared.clone();
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        // hyper serves an HTTP/1 connection's requests one after the other, so this is the
        // request's number on the connection, as the scanner counts heads.
        let number = self.state.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.state.active.fetch_add(1, Ordering::Relaxed);
        let active = Active(self.state.clone());
        shared.budget.request();

        let (parts, body) = request.into_parts();
        let authority = authority_of(&parts, self.h2);
        let pq = parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let mut exchange = self.exchange(start, &parts.method, &parts.headers, &authority, &pq);
        // The raw-head scanner stops at an Upgrade or CONNECT head (what follows may be a
        // tunnel); unless a tunnel is really set up, no further head may be read.
        let connect = parts.method == Method::CONNECT;
        let scanner_stopped = !self.h2 && (connect || parts.headers.contains_key(header::UPGRADE));
        let policy = shared.policy.current();
        exchange.upstream_h2 = self.h2
            && (exchange.grpc
                || policy
                    .service_port(self.dst)
                    .is_some_and(mesh_policy::ServicePort::declares_http2));
        let denied = denied_by(&policy, &parts.method, &pq, &parts.headers);
        let mut response = if let Some(why) = self.state.body_rejection(number) {
            // The broken body arrived with its head: nothing goes upstream.
            self.local(&mut exchange, StatusCode::BAD_REQUEST, why.reason())
        } else if let Some(rule) = denied {
            tracing::debug!(rule = %rule.name, "request denied by policy");
            self.local(&mut exchange, StatusCode::FORBIDDEN, "denied by policy")
        } else {
            self.forward(&policy, &mut exchange, parts, body, authority, pq)
                .await
        };
        if let Some(why) = self.state.body_rejection(number) {
            // The chunked body turned out malformed before the response was handed to hyper:
            // whatever the upstream attempt ended with, the client's request was at fault.
            // hyper closes the connection after it (the body could not be read to its end).
            response = self.local(&mut exchange, StatusCode::BAD_REQUEST, why.reason());
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let tunneled = response.status() == StatusCode::SWITCHING_PROTOCOLS
            || (connect && response.status().is_success());
        if scanner_stopped && !tunneled {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let status = response.status().as_u16();
        exchange.log.status = status;
        shared.stats.response(status);
        let Exchange {
            log,
            deadline,
            in_flight,
            ..
        } = exchange;
        response
            .map(|body| Logged::wrap(body, deadline, log, shared.stats.clone(), in_flight, active))
    }

    /// The state of a request that starts now; `pq` is its path and query.
    pub(crate) fn exchange(
        &self,
        start: Instant,
        method: &Method,
        headers: &HeaderMap,
        authority: &str,
        pq: &str,
    ) -> Exchange {
        Exchange {
            log: AccessLog {
                observer: self.shared.observer.clone(),
                start,
                src: self.src,
                dst: self.dst,
                proto: if self.h2 { "HTTP/2" } else { "HTTP/1.1" },
                method: method.clone(),
                authority: authority.to_owned(),
                path: pq.split('?').next().unwrap_or("/").to_owned(),
                route: None,
                upstream: None,
                status: 0,
                request_id: headers
                    .get(X_REQUEST_ID)
                    .cloned()
                    .unwrap_or_else(|| HeaderValue::from_static("-")),
                retries: 0,
                bytes_in: Arc::new(AtomicU64::new(0)),
                local_reason: None,
            },
            deadline: None,
            in_flight: None,
            grpc: self.h2 && is_grpc(headers),
            upstream_h2: false,
        }
    }

    pub(crate) fn local(
        &self,
        exchange: &mut Exchange,
        status: StatusCode,
        reason: &'static str,
    ) -> Response<Body> {
        exchange.log.local_reason = Some(reason);
        let mut response = Response::new(empty());
        if exchange.grpc {
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from_static(grpc_status(status)));
            headers.insert("grpc-message", HeaderValue::from_static(reason));
        } else {
            *response.status_mut() = status;
            *response.body_mut() = full(format!("{reason}\n"));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        response
    }

    fn route<'p>(
        &self,
        policy: &'p Compiled,
        method: &Method,
        headers: &HeaderMap,
        authority: &str,
        pq: &str,
        grpc: bool,
    ) -> Routed<'p> {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
            .collect();
        let path = pq.split('?').next().unwrap_or("/");
        if grpc && let Some((service, method)) = split_grpc_path(path) {
            let request = GrpcRequest {
                authority,
                service,
                method,
                headers: &headers,
            };
            match policy.route_grpc(self.dst, &request) {
                GrpcOutcome::Matched(d) => {
                    return Routed::Rule {
                        route: d.route,
                        rule: d.rule,
                        matched: None,
                    };
                }
                GrpcOutcome::NotFound => return Routed::NotFound,
                GrpcOutcome::NoRoutes => {}
            }
        }
        let request = RequestParts {
            method: method.as_str(),
            host: authority,
            path: pq,
            headers: &headers,
        };
        match policy.route_http(self.dst, &request) {
            HttpOutcome::NoRoutes => Routed::Direct,
            HttpOutcome::NotFound => Routed::NotFound,
            HttpOutcome::Matched(d) => Routed::Rule {
                route: d.route,
                rule: d.rule,
                matched: Some(d.path),
            },
        }
    }

    /// Decides where a request goes from its head alone: routes it, applies the rule's action
    /// (a redirect or a missing backend is answered here), picks a weighted backend, sets the
    /// deadlines on `exchange`, and edits `headers` for the upstream (hop-by-hop out, injected
    /// headers in, the request filters in route order). Shared by the hyper path and the
    /// HTTP/1 fast path (`crate::h1`).
    #[allow(
        clippy::too_many_arguments,
        clippy::result_large_err,
        reason = "the parts of one request head, borrowed from two different request types; \
                  the answer goes straight back to the caller"
    )]
    pub(crate) fn plan<'p>(
        &self,
        policy: &'p Compiled,
        exchange: &mut Exchange,
        method: &Method,
        headers: &mut HeaderMap,
        authority: String,
        pq: &str,
        upgrade: bool,
    ) -> Result<Plan<'p>, Response<Body>> {
        let connect = *method == Method::CONNECT;
        let routed = if connect {
            // CONNECT has no path to match: it goes to the Service (or destination) as is.
            Routed::Direct
        } else {
            self.route(policy, method, headers, &authority, pq, exchange.grpc)
        };
        let (rule, matched) = match routed {
            Routed::NotFound => {
                return Err(self.local(exchange, StatusCode::NOT_FOUND, "no route matched"));
            }
            Routed::Direct => (None, None),
            Routed::Rule {
                route,
                rule,
                matched,
            } => {
                exchange.log.route = Some(route.to_string());
                (Some(rule), matched)
            }
        };
        let default_match = catch_all();
        let matched = matched.unwrap_or(&default_match);

        if let Some(rule) = rule {
            match rule.action() {
                HttpAction::Redirect(redirect) => {
                    let location =
                        redirect.location("http", &authority, self.dst.port(), pq, matched);
                    let Ok(location) = HeaderValue::from_str(&location) else {
                        return Err(self.local(
                            exchange,
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "invalid redirect location",
                        ));
                    };
                    let mut response = Response::new(empty());
                    *response.status_mut() =
                        StatusCode::from_u16(redirect.status_code).unwrap_or(StatusCode::FOUND);
                    response.headers_mut().insert(header::LOCATION, location);
                    for filter in &rule.filters {
                        if let HttpFilter::ResponseHeaderModifier(m) = filter {
                            apply_modifier(m, response.headers_mut());
                        }
                    }
                    exchange.log.local_reason = Some("redirect");
                    return Err(response);
                }
                HttpAction::NoBackends => {
                    return Err(self.local(
                        exchange,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no usable backend",
                    ));
                }
                HttpAction::Forward => {}
            }
        }

        // The backend: a weighted pick among the rule's, or the Service / destination itself.
        let (endpoints, backend_filters): (Endpoints<'p>, &[HttpFilter]) = match rule {
            Some(rule) => match rule.pick() {
                // Gateway API: requests that would go to an unresolved backendRef get 500; the
                // rule's other backends keep their share.
                Some(backend) if backend.unresolved => {
                    return Err(self.local(
                        exchange,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "backendRef not resolved",
                    ));
                }
                Some(backend) => (Endpoints::Listed(&backend.endpoints), &backend.filters),
                None => {
                    return Err(self.local(
                        exchange,
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no usable backend",
                    ));
                }
            },
            None => match policy.service_port(self.dst) {
                Some(service) => (Endpoints::Listed(&service.endpoints), &[]),
                None => (Endpoints::Own(self.dst), &[]),
            },
        };

        let timeouts = rule.map(|r| r.timeouts).unwrap_or_default();
        let start = tokio::time::Instant::from_std(exchange.log.start);
        exchange.deadline = timeouts.request.filter(|d| !d.is_zero()).map(|d| start + d);
        let backend_timeout = timeouts.backend_request.filter(|d| !d.is_zero());

        // Headers: hop-by-hop out, injected headers in, then the filters in route order.
        strip_hop_by_hop(headers, upgrade && !connect);
        headers.remove(header::EXPECT);
        exchange.log.request_id = inject(headers, &policy.settings().headers, self.src.ip());
        let (mut path, query) = match pq.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q)),
            None => (pq.to_owned(), None),
        };
        let mut upstream_authority = authority;
        let mut response_modifiers: Vec<&'p HeaderModifier> = Vec::new();
        let mut mirrors: Vec<&'p Mirror> = Vec::new();
        let rule_filters = rule.map_or(&[][..], |r| r.filters.as_slice());
        for filter in rule_filters.iter().chain(backend_filters) {
            match filter {
                HttpFilter::UrlRewrite(rewrite) => {
                    if let Some(hostname) = &rewrite.hostname
                        && let Ok(value) = HeaderValue::from_str(hostname)
                    {
                        upstream_authority = hostname.clone();
                        if !self.h2 || headers.contains_key(header::HOST) {
                            headers.insert(header::HOST, value);
                        }
                    }
                    if let Some(modifier) = &rewrite.path {
                        path = modifier.apply(matched, &path);
                    }
                }
                HttpFilter::RequestHeaderModifier(m) => apply_modifier(m, headers),
                HttpFilter::ResponseHeaderModifier(m) => response_modifiers.push(m),
                HttpFilter::RequestMirror(m) => mirrors.push(m),
                HttpFilter::RequestRedirect(_) => {}
            }
        }
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        Ok(Plan {
            endpoints,
            target,
            authority: upstream_authority,
            response_modifiers,
            mirrors,
            backend_timeout,
        })
    }

    async fn forward(
        &self,
        policy: &Compiled,
        exchange: &mut Exchange,
        mut parts: Parts,
        body: Incoming,
        authority: String,
        pq: String,
    ) -> Response<Body> {
        let connect = parts.method == Method::CONNECT;
        let upgrade = !self.h2
            && (connect
                || (parts.headers.contains_key(header::UPGRADE)
                    && connection_has(&parts.headers, "upgrade")));
        let plan = match self.plan(
            policy,
            exchange,
            &parts.method,
            &mut parts.headers,
            authority,
            &pq,
            upgrade,
        ) {
            Ok(plan) => plan,
            Err(answered) => return answered,
        };
        let client_upgrade = parts.extensions.remove::<OnUpgrade>();
        let mirrors: Vec<&Mirror> = plan
            .mirrors
            .iter()
            .copied()
            .filter(|m| m.fraction.sample(random_u32()))
            .collect();

        // The body: known in full when empty or small enough to buffer for mirroring.
        let mut request_body = if body.is_end_stream() {
            RequestBody::Buffered(Bytes::new(), None)
        } else {
            RequestBody::Streaming(Some(body))
        };
        if !mirrors.is_empty() && !upgrade {
            let small = content_length(&parts.headers).is_some_and(|n| n <= MIRROR_BODY_LIMIT);
            if small
                && let RequestBody::Streaming(incoming) = &mut request_body
                && let Some(body) = incoming.take()
            {
                let collect = Limited::new(body, MIRROR_BODY_LIMIT as usize).collect();
                let collected = match exchange.deadline {
                    Some(at) => match tokio::time::timeout_at(at, collect).await {
                        Ok(result) => result,
                        Err(_) => {
                            self.shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                            return self.local(
                                exchange,
                                StatusCode::GATEWAY_TIMEOUT,
                                "request timeout",
                            );
                        }
                    },
                    None => collect.await,
                };
                match collected {
                    Ok(collected) => {
                        let trailers = collected.trailers().cloned();
                        let data = collected.to_bytes();
                        exchange
                            .log
                            .bytes_in
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        request_body = RequestBody::Buffered(data, trailers);
                    }
                    Err(error) => {
                        tracing::debug!(%error, "reading request body");
                        return self.local(
                            exchange,
                            StatusCode::BAD_REQUEST,
                            "incomplete request body",
                        );
                    }
                }
            }
            for mirror in &mirrors {
                match &request_body {
                    RequestBody::Buffered(data, trailers) => {
                        let body = buffered_body(data, trailers);
                        let h2 = exchange.upstream_h2;
                        self.mirror(mirror, &parts, &plan.target, &plan.authority, body, h2);
                    }
                    RequestBody::Streaming(_) => {
                        tracing::debug!("request body too large or unknown: not mirrored");
                        self.shared
                            .stats
                            .mirrors_skipped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }

        self.send_with_retries(
            exchange,
            &parts,
            request_body,
            plan.endpoints.as_slice(),
            &plan.target,
            &plan.authority,
            plan.backend_timeout,
            upgrade.then_some(client_upgrade).flatten(),
            upgrade,
            &plan.response_modifiers,
        )
        .await
    }

    /// Builds the request for one upstream attempt, in HTTP/2 when `h2`.
    #[allow(clippy::too_many_arguments)]
    fn upstream_request(
        &self,
        parts: &Parts,
        target: &str,
        authority: &str,
        endpoint: SocketAddr,
        upgrade: bool,
        body: Body,
        h2: bool,
    ) -> Option<Request<Body>> {
        let uri = if parts.method == Method::CONNECT {
            parts.uri.clone()
        } else if upgrade {
            // One-off connection: origin form is written as is.
            Uri::try_from(target).ok()?
        } else if h2 {
            Uri::try_from(format!("http://{authority}{target}"))
                .or_else(|_| Uri::try_from(format!("http://{endpoint}{target}")))
                .ok()?
        } else {
            Uri::try_from(format!("http://{endpoint}{target}")).ok()?
        };
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *request.headers_mut() = parts.headers.clone();
        if self.h2 && !h2 && !request.headers().contains_key(header::HOST) {
            // HTTP/2 client, HTTP/1.1 upstream: `:authority` becomes the Host header.
            let host = HeaderValue::from_str(authority).ok()?;
            request.headers_mut().insert(header::HOST, host);
        }
        Some(request)
    }

    /// How this connection's requests reach `endpoint`: the dialer's route, or plain TCP.
    pub(crate) fn dial_route(&self, endpoint: SocketAddr) -> Option<Route> {
        self.shared.dialer.as_ref()?.route(self.src, endpoint)
    }

    async fn send(
        &self,
        endpoint: SocketAddr,
        request: Request<Body>,
        upgrade: bool,
        h2: bool,
    ) -> Result<Response<Incoming>, SendError> {
        let upstream = &self.shared.upstream;
        let route = self.dial_route(endpoint);
        let route = route.as_ref();
        // The h2 path is the hot one here (HTTP/1 requests mostly take `h1`'s own path); the
        // others are boxed so that their state machines (connecting, kilobytes) do not size
        // every request's future, which is moved by value at each level.
        if upgrade {
            Box::pin(upstream.send_upgrade(endpoint, route, request)).await
        } else if h2 {
            upstream.send_h2(endpoint, route, request).await
        } else {
            Box::pin(upstream.send_h1(endpoint, route, request)).await
        }
    }

    /// Whether another attempt may be made, counting it if so.
    fn take_retry(&self, exchange: &mut Exchange) -> bool {
        let shared = &self.shared;
        if exchange.log.retries >= shared.balancer.resilience().max_retries {
            return false;
        }
        if !shared.budget.try_retry() {
            shared
                .stats
                .retries_over_budget
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        shared.stats.retries.fetch_add(1, Ordering::Relaxed);
        exchange.log.retries += 1;
        true
    }

    /// Picks the endpoint for the next attempt, or answers 503 when there is none.
    #[allow(
        clippy::result_large_err,
        reason = "the answer goes straight back to the caller, once per request"
    )]
    pub(crate) fn pick(
        &self,
        exchange: &mut Exchange,
        endpoints: &[SocketAddr],
        tried: &[SocketAddr],
    ) -> Result<(SocketAddr, Arc<EndpointState>), Response<Body>> {
        let stats = &self.shared.stats;
        let reason = match self.shared.balancer.pick(endpoints, tried) {
            Pick::Endpoint(endpoint, state) => {
                exchange.log.upstream = Some(endpoint);
                return Ok((endpoint, state));
            }
            Pick::Empty => "no endpoints",
            Pick::AllEjected => "no healthy endpoint",
        };
        stats.no_healthy_endpoint.fetch_add(1, Ordering::Relaxed);
        Err(self.local(exchange, StatusCode::SERVICE_UNAVAILABLE, reason))
    }

    /// When the next attempt must have its response headers: the backend request timeout from
    /// now, capped by the request's deadline.
    pub(crate) fn attempt_deadline(
        exchange: &Exchange,
        backend_timeout: Option<std::time::Duration>,
    ) -> Option<tokio::time::Instant> {
        match (backend_timeout, exchange.deadline) {
            (Some(t), Some(d)) => Some((tokio::time::Instant::now() + t).min(d)),
            (Some(t), None) => Some(tokio::time::Instant::now() + t),
            (None, d) => d,
        }
    }

    /// The answer when an attempt's deadline `at` passed before response headers.
    pub(crate) fn timed_out(
        &self,
        exchange: &mut Exchange,
        at: tokio::time::Instant,
    ) -> Response<Body> {
        self.shared.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        let reason = if exchange.deadline == Some(at) {
            "request timeout"
        } else {
            "backend request timeout"
        };
        self.local(exchange, StatusCode::GATEWAY_TIMEOUT, reason)
    }

    /// Accounts an attempt's response headers to its endpoint; true when the request is to be
    /// tried again elsewhere (a `retry_on_status` status, for a request that can be sent again).
    pub(crate) fn answered(
        &self,
        exchange: &mut Exchange,
        status: StatusCode,
        endpoint: SocketAddr,
        state: &EndpointState,
        endpoints: &[SocketAddr],
        retryable: bool,
    ) -> bool {
        let shared = &self.shared;
        if status.is_server_error() {
            shared
                .balancer
                .failure(endpoint, state, endpoints, &shared.stats);
        } else {
            shared.balancer.success(state);
        }
        retryable
            && shared
                .balancer
                .resilience()
                .retry_on_status
                .contains(&status.as_u16())
            && self.take_retry(exchange)
    }

    /// Accounts a failed attempt to its endpoint: `Ok` when the request is to be tried again
    /// elsewhere, otherwise the answer to give. `replayable`: the body can be sent again.
    #[allow(
        clippy::result_large_err,
        clippy::too_many_arguments,
        reason = "the answer goes straight back to the caller, once per request; the parts \
                  of one attempt"
    )]
    pub(crate) fn failed(
        &self,
        exchange: &mut Exchange,
        error: SendError,
        endpoint: SocketAddr,
        state: &EndpointState,
        endpoints: &[SocketAddr],
        replayable: bool,
        idempotent: bool,
    ) -> Result<(), Response<Body>> {
        let shared = &self.shared;
        if let SendError::Denied { .. } = &error {
            // The destination's policy, not the endpoint's health: no ejection, no retry.
            tracing::debug!(%error, "refused by the destination's agent");
            shared.stats.denied_upstream.fetch_add(1, Ordering::Relaxed);
            return Err(self.local(
                exchange,
                StatusCode::FORBIDDEN,
                "denied by the destination's policy",
            ));
        }
        shared.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
        shared
            .balancer
            .failure(endpoint, state, endpoints, &shared.stats);
        let retryable = match &error {
            SendError::Connect { .. } => replayable,
            SendError::Reset { .. } => replayable && idempotent,
            SendError::Protocol { .. } | SendError::Denied { .. } => false,
        };
        if retryable && self.take_retry(exchange) {
            tracing::debug!(%error, "retrying");
            return Ok(());
        }
        tracing::debug!(%error, "upstream failed");
        Err(match error {
            SendError::Protocol { .. } => {
                self.local(exchange, StatusCode::BAD_GATEWAY, "upstream protocol error")
            }
            SendError::Connect { .. } => self.local(
                exchange,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect failure",
            ),
            SendError::Reset { .. } => self.local(
                exchange,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream reset before response headers",
            ),
            SendError::Denied { .. } => self.local(
                exchange,
                StatusCode::FORBIDDEN,
                "denied by the destination's policy",
            ),
        })
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one call site; the parts of one request"
    )]
    async fn send_with_retries(
        &self,
        exchange: &mut Exchange,
        parts: &Parts,
        mut body: RequestBody,
        endpoints: &[SocketAddr],
        target: &str,
        authority: &str,
        backend_timeout: Option<std::time::Duration>,
        client_upgrade: Option<OnUpgrade>,
        upgrade: bool,
        response_modifiers: &[&HeaderModifier],
    ) -> Response<Body> {
        let idempotent = is_idempotent(&parts.method);
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let (endpoint, state) = match self.pick(exchange, endpoints, &tried) {
                Ok(picked) => picked,
                Err(answer) => return answer,
            };
            let (attempt_body, replayable) = match &mut body {
                RequestBody::Buffered(data, trailers) => (buffered_body(data, trailers), true),
                RequestBody::Streaming(incoming) => match incoming.take() {
                    Some(incoming) => (
                        Counted::wrap(
                            incoming.map_err(Into::into).boxed_unsync(),
                            exchange.log.bytes_in.clone(),
                        ),
                        false,
                    ),
                    None => (empty(), false),
                },
            };
            let h2 = exchange.upstream_h2;
            let Some(request) = self.upstream_request(
                parts,
                target,
                authority,
                endpoint,
                upgrade,
                attempt_body,
                h2,
            ) else {
                return self.local(exchange, StatusCode::BAD_REQUEST, "invalid request target");
            };
            let in_flight = InFlight::new(state.clone());
            let attempt_deadline = Self::attempt_deadline(exchange, backend_timeout);
            let sent = self.send(endpoint, request, upgrade, h2);
            let result = match attempt_deadline {
                Some(at) => match tokio::time::timeout_at(at, sent).await {
                    Ok(result) => result,
                    Err(_) => return self.timed_out(exchange, at),
                },
                None => sent.await,
            };
            match result {
                Ok(response) => {
                    if self.answered(
                        exchange,
                        response.status(),
                        endpoint,
                        &state,
                        endpoints,
                        replayable && idempotent,
                    ) {
                        tried.push(endpoint);
                        continue;
                    }
                    exchange.in_flight = Some(in_flight);
                    return self.respond(
                        exchange,
                        response,
                        parts.method == Method::CONNECT,
                        upgrade,
                        client_upgrade,
                        response_modifiers,
                    );
                }
                Err(error) => {
                    match self.failed(
                        exchange, error, endpoint, &state, endpoints, replayable, idempotent,
                    ) {
                        Ok(()) => tried.push(endpoint),
                        Err(answer) => return answer,
                    }
                }
            }
        }
    }

    fn respond(
        &self,
        exchange: &mut Exchange,
        mut response: Response<Incoming>,
        connect: bool,
        upgrade: bool,
        client_upgrade: Option<OnUpgrade>,
        response_modifiers: &[&HeaderModifier],
    ) -> Response<Body> {
        let status = response.status();
        let switching = status == StatusCode::SWITCHING_PROTOCOLS && !connect;
        let tunnel = upgrade && (switching || (connect && status.is_success()));
        if tunnel {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            match client_upgrade {
                Some(client_upgrade) => {
                    tokio::spawn(run_tunnel(client_upgrade, upstream_upgrade, self.src));
                }
                None => {
                    return self.local(exchange, StatusCode::BAD_GATEWAY, "upgrade not possible");
                }
            }
        }
        strip_hop_by_hop(response.headers_mut(), switching && tunnel);
        for modifier in response_modifiers {
            apply_modifier(modifier, response.headers_mut());
        }
        response.map(|body| body.map_err(Into::into).boxed_unsync())
    }

    /// Sends a copy of the request to a mirror backend, never waiting for it.
    fn mirror(
        &self,
        mirror: &Mirror,
        parts: &Parts,
        target: &str,
        authority: &str,
        body: Body,
        h2: bool,
    ) {
        let stats = &self.shared.stats;
        let endpoints = &mirror.backend.endpoints;
        if endpoints.is_empty() {
            stats.mirrors_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let endpoint = endpoints[random_u32() as usize % endpoints.len()];
        let Ok(permit) = self.shared.mirrors.clone().try_acquire_owned() else {
            stats.mirrors_skipped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(request) =
            self.upstream_request(parts, target, authority, endpoint, false, body, h2)
        else {
            return;
        };
        stats.mirrors.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.clone();
        let route = self.dial_route(endpoint);
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                let route = route.as_ref();
                let response = if h2 {
                    shared.upstream.send_h2(endpoint, route, request).await
                } else {
                    shared.upstream.send_h1(endpoint, route, request).await
                }
                .map_err(|e| e.to_string())?;
                let status = response.status();
                response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(status)
            };
            match tokio::time::timeout(MIRROR_TIMEOUT, exchange).await {
                Ok(Ok(status)) => tracing::trace!(%endpoint, %status, "mirrored"),
                Ok(Err(error)) => tracing::debug!(%endpoint, %error, "mirror failed"),
                Err(_) => tracing::debug!(%endpoint, "mirror timed out"),
            }
        });
    }
}

/// The MeshPolicy's HTTP authorization rule that denies this request, if one does.
pub(crate) fn denied_by<'p>(
    policy: &'p Compiled,
    method: &Method,
    pq: &str,
    headers: &HeaderMap,
) -> Option<&'p mesh_policy::HttpDeny> {
    let path = pq.split('?').next().unwrap_or("/");
    policy.settings().authorization.http.iter().find(|rule| {
        rule.matches(method.as_str(), path, |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
    })
}

/// Host header (HTTP/1) or `:authority` (HTTP/2), whichever the request has, preferring the
/// protocol's own.
fn authority_of(parts: &Parts, h2: bool) -> String {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let uri = parts.uri.authority().map(|a| a.as_str());
    let (first, second) = if h2 { (uri, host) } else { (host, uri) };
    first.or(second).unwrap_or_default().to_owned()
}

pub(crate) async fn run_tunnel(client: OnUpgrade, upstream: OnUpgrade, src: SocketAddr) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%src, %error, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => tracing::debug!(%src, sent, received, "tunnel closed"),
        Err(error) => tracing::debug!(%src, %error, "tunnel ended"),
    }
}
