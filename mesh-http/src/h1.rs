//! HTTP/1.1 served without hyper, for the requests most traffic is made of: a head in origin
//! form, no body or a `Content-Length` body of at most [`BODY_LIMIT`], on a route without
//! mirrors. The head is parsed once (httparse) and checked by the same strict scanner as the
//! hyper path; routing, filters, header injection, endpoint picks, timeouts and retries are
//! the hyper path's own functions ([`ConnCtx::plan`] and the attempt accounting next to it).
//! The request goes out as one write on a pooled connection of this thread, and the response
//! head is edited while its body is passed through in its own framing (length, chunked or up
//! to the close). Nothing is spawned and no channel is crossed per request.
//!
//! Any other request (an upgrade, `CONNECT`, `Expect`, a chunked or large body, HTTP/1.0, a
//! head the scanner refuses, a rule with mirrors) hands the connection to hyper for the rest
//! of its life, with the bytes read so far: hyper answers it exactly as if it had served the
//! connection from the start.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::Error;
use crate::balance::InFlight;
use crate::dial::Route;
use crate::guard::{HeadScanner, Scan};
use crate::headers::{apply_modifier, strip_hop_by_hop};
use crate::io::now_ms;
use crate::proxy::{ConnCtx, Exchange, denied_by, is_idempotent};
use crate::upstream::{Body, SendError, UpstreamIo};

/// Largest request body this path buffers (it is then replayable for retries); larger ones
/// are streamed by hyper.
const BODY_LIMIT: usize = 64 * 1024;
/// Most header fields this path parses; heads with more go to hyper, which applies the
/// configured limit.
const MAX_FIELDS: usize = 64;
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Bytes read at a time.
const READ_SIZE: usize = 16 * 1024;

/// How serving ended.
pub(crate) enum End {
    /// The client closed, or the connection closed after a response.
    Closed,
    /// The connection was idle between two requests when a move was asked.
    Moved,
    /// A request this path leaves to hyper: these are the bytes read so far, its head first.
    Hyper(Vec<u8>),
}

/// A request head this path serves.
struct Head {
    method: Method,
    /// Path and query (origin form).
    pq: String,
    authority: String,
    headers: HeaderMap,
    body_len: usize,
    /// The client asked for the connection to close after this request.
    close: bool,
}

/// Parses a complete head (`raw` holds exactly the head); `None` when hyper is to serve it.
fn parse_head(raw: &Bytes) -> Option<Head> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut request = httparse::Request::new(&mut fields);
    if !matches!(request.parse(raw), Ok(httparse::Status::Complete(n)) if n == raw.len()) {
        return None;
    }
    if request.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(request.method?.as_bytes()).ok()?;
    let pq = request.path?;
    if method == Method::CONNECT || !pq.starts_with('/') {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(request.headers.len() + 6);
    let mut body_len = None;
    let mut close = false;
    let mut authority = None;
    for field in request.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return None;
        }
        let value = HeaderValue::from_maybe_shared(raw.slice_ref(field.value)).ok()?;
        if name == header::CONTENT_LENGTH {
            let len: usize = value.to_str().ok()?.parse().ok()?;
            if body_len.is_some_and(|l| l != len) || len > BODY_LIMIT {
                return None;
            }
            body_len = Some(len);
        } else if name == header::CONNECTION {
            close |= value
                .to_str()
                .ok()?
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
        } else if name == header::HOST {
            authority = Some(value.to_str().ok()?.to_owned());
        }
        headers.append(name, value);
    }
    Some(Head {
        method,
        pq: pq.to_owned(),
        authority: authority?,
        headers,
        body_len: body_len.unwrap_or(0),
        close,
    })
}

/// Appends header fields in HTTP/1 syntax.
fn put_fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Up to the end of the connection.
    Close,
}

/// An upstream response head.
struct ResponseHead {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    /// The endpoint will take another request on this connection.
    keep_alive: bool,
}

/// Parses a response head from the start of `buf`: `Ok(None)` when it is incomplete;
/// informational (1xx) heads are skipped.
fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    endpoint: SocketAddr,
) -> Result<Option<ResponseHead>, SendError> {
    let protocol = |reason: &str| SendError::Protocol {
        endpoint,
        reason: reason.to_owned(),
    };
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut response = httparse::Response::new(&mut fields);
        let len = match response.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => return Ok(None),
            Ok(httparse::Status::Partial) => return Err(protocol("response head too large")),
            Err(e) => return Err(protocol(&e.to_string())),
        };
        let code = response.code.unwrap_or(0);
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(protocol("101 to a request that asked no upgrade"));
            }
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| protocol("invalid status"))?;
        let version_11 = response.version == Some(1);
        let raw = buf.split_to(len).freeze();
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut response = httparse::Response::new(&mut fields);
        let _ = response.parse(&raw);
        let mut headers = HeaderMap::with_capacity(response.headers.len() + 4);
        let mut length: Option<u64> = None;
        let mut chunked = None;
        let mut keep_alive = version_11;
        for field in response.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| protocol("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(raw.slice_ref(field.value))
                .map_err(|_| protocol("invalid header value"))?;
            if name == header::CONTENT_LENGTH {
                let n: u64 = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| protocol("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(protocol("conflicting content-length"));
                }
                length = Some(n);
            } else if name == header::TRANSFER_ENCODING {
                let last = value
                    .to_str()
                    .unwrap_or("")
                    .rsplit(',')
                    .next()
                    .unwrap_or("");
                chunked = Some(last.trim().eq_ignore_ascii_case("chunked"));
            } else if name == header::CONNECTION
                && value
                    .to_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep_alive = false;
            }
            headers.append(name, value);
        }
        let framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::None
        } else {
            match (chunked, length) {
                (Some(true), _) => Framing::Chunked,
                (Some(false), _) | (None, None) => Framing::Close,
                (None, Some(n)) => Framing::Length(n),
            }
        };
        if matches!(framing, Framing::Chunked | Framing::Close) {
            headers.remove(header::CONTENT_LENGTH);
        }
        return Ok(Some(ResponseHead {
            status,
            headers,
            framing,
            keep_alive: keep_alive && framing != Framing::Close,
        }));
    }
}

/// Finds where a chunked body ends, to pass it through unchanged (chunk sizes, extensions
/// and trailers included) and know when the connection is free again.
#[derive(Debug, Default)]
struct ChunkedEnd {
    state: Chunk,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
}

impl ChunkedEnd {
    /// Scans the next bytes: `Ok(Some(n))` when the body ends after `n` of them.
    fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            i += 1;
            self.state = match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).unwrap_or(0);
                        self.digits += 1;
                        if self.digits > 15 {
                            return Err("chunk size too large");
                        }
                        self.size = self.size * 16 + u64::from(digit);
                        Chunk::Size
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => Chunk::Extension,
                    b'\r' if self.digits > 0 => Chunk::SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                Chunk::Extension => match b {
                    b'\r' => Chunk::SizeLf,
                    b'\n' => return Err("bare LF in chunk extension"),
                    _ => Chunk::Extension,
                },
                Chunk::SizeLf if b == b'\n' => {
                    self.digits = 0;
                    if self.size == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data
                    }
                }
                Chunk::Data => {
                    // `b` is the first data byte: take the rest of the chunk at once.
                    let rest = (self.size - 1).min((buf.len() - i) as u64);
                    i += rest as usize;
                    self.size -= rest + 1;
                    if self.size == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data
                    }
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size,
                Chunk::TrailerStart if b == b'\r' => Chunk::EndLf,
                Chunk::TrailerStart | Chunk::Trailer if b != b'\r' && b != b'\n' => Chunk::Trailer,
                Chunk::Trailer if b == b'\r' => Chunk::TrailerLf,
                Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
                Chunk::EndLf if b == b'\n' => return Ok(Some(i)),
                _ => return Err("invalid chunked framing"),
            };
        }
        Ok(None)
    }
}

/// Why passing a response body through stopped early.
enum Relay {
    /// The client went away.
    Client,
    /// The endpoint closed or broke the framing.
    Upstream(String),
}

/// Serves the requests of an HTTP/1 connection until it closes, moves, or meets a request
/// this path leaves to hyper. Returns how it ended and the requests served.
pub(crate) async fn serve<S>(
    ctx: &ConnCtx,
    client: &mut S,
    prefix: Vec<u8>,
    moving: &mut Option<watch::Receiver<bool>>,
    resumed: bool,
) -> (u64, Result<End, Error>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut served = 0;
    let mut conn = Conn {
        ctx,
        client,
        buf: BytesMut::from(&prefix[..]),
        scanner: HeadScanner::new(
            ctx.shared.config.max_header_bytes,
            ctx.shared.config.max_headers,
        ),
        out: Vec::with_capacity(1024),
        rbuf: BytesMut::new(),
        req: Vec::new(),
        head_request: false,
    };
    // The first head is due from the connection's start, unless it moved here idle.
    let mut head_due =
        (!resumed).then(|| tokio::time::Instant::now() + ctx.shared.config.header_read_timeout);
    loop {
        let result = conn.next(&mut head_due, moving).await;
        match result {
            Ok(Some(next)) => match next {
                Next::Served { close } => {
                    served += 1;
                    if close {
                        return (served, Ok(End::Closed));
                    }
                }
                Next::End(end) => return (served, Ok(end)),
            },
            Ok(None) => return (served, Ok(End::Closed)),
            Err(error) => return (served, Err(error)),
        }
    }
}

/// What one turn of [`Conn::next`] did.
enum Next {
    Served { close: bool },
    End(End),
}

struct Conn<'a, S> {
    ctx: &'a ConnCtx,
    client: &'a mut S,
    /// Bytes read from the client and not yet handled.
    buf: BytesMut,
    scanner: HeadScanner,
    /// Reused for every write.
    out: Vec<u8>,
    /// Reused for every upstream response.
    rbuf: BytesMut,
    /// Reused for every request sent upstream.
    req: Vec<u8>,
    /// The request being served is a HEAD: answers carry no body.
    head_request: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<'_, S> {
    /// Reads more client bytes; `Ok(false)` at the end of the stream.
    async fn read(&mut self, until: tokio::time::Instant) -> Result<bool, Timeout> {
        self.buf.reserve(READ_SIZE);
        match tokio::time::timeout_at(until, self.client.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) => Ok(n > 0),
            Ok(Err(_)) => Ok(false),
            Err(_) => Err(Timeout),
        }
    }

    /// Waits for the next head, and serves it. `Ok(None)`: the client closed or went idle.
    async fn next(
        &mut self,
        head_due: &mut Option<tokio::time::Instant>,
        moving: &mut Option<watch::Receiver<bool>>,
    ) -> Result<Option<Next>, Error> {
        let config = &self.ctx.shared.config;
        if self.buf.is_empty() {
            // Between two requests: the socket may move, or the connection go idle.
            if moving.as_ref().is_some_and(|m| *m.borrow()) {
                return Ok(Some(Next::End(End::Moved)));
            }
            let idle = tokio::time::Instant::now() + config.idle_timeout;
            let until = head_due.map_or(idle, |due| due.min(idle));
            let asked = async {
                let asked = match moving.as_mut() {
                    Some(m) => m.wait_for(|v| *v).await.is_ok(),
                    None => false,
                };
                if !asked {
                    // No one will ask any more.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                read = self.read(until) => match read {
                    Ok(true) => {}
                    Ok(false) => return Ok(None),
                    Err(Timeout) if head_due.is_some_and(|due| due <= until) => {
                        return Err(self.header_timeout());
                    }
                    Err(Timeout) => {
                        tracing::debug!("closing idle connection");
                        return Ok(None);
                    }
                },
                () = asked => return Ok(Some(Next::End(End::Moved))),
            }
            head_due
                .get_or_insert_with(|| tokio::time::Instant::now() + config.header_read_timeout);
        }
        let due = *head_due
            .get_or_insert_with(|| tokio::time::Instant::now() + config.header_read_timeout);

        // The head.
        let head_len = loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
            match httparse::Request::new(&mut fields).parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => break n,
                Ok(httparse::Status::Partial) if self.buf.len() < config.max_header_bytes => {}
                _ => return Ok(Some(self.hand_to_hyper(Bytes::new()))),
            }
            match self.read(due).await {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(Timeout) => return Err(self.header_timeout()),
            }
        };
        let raw = self.buf.split_to(head_len).freeze();
        *head_due = None;
        if self.scanner.scan(&raw) != Scan::Clean {
            // hyper's path finds the same fault and answers it.
            return Ok(Some(self.hand_to_hyper(raw)));
        }
        let Some(mut head) = parse_head(&raw) else {
            return Ok(Some(self.hand_to_hyper(raw)));
        };
        let start = Instant::now();
        self.head_request = head.method == Method::HEAD;

        // The body, whole, before anything is decided: it is small, and it must be read off
        // the connection whatever the answer.
        while self.buf.len() < head.body_len {
            let until = tokio::time::Instant::now() + config.idle_timeout;
            match self.read(until).await {
                Ok(true) => {}
                Ok(false) | Err(Timeout) => return Ok(None),
            }
        }

        let ctx = self.ctx;
        let shared = &ctx.shared;
        let policy = shared.policy.current();
        let mut exchange = ctx.exchange(
            start,
            &head.method,
            &head.headers,
            &head.authority,
            &head.pq,
        );
        let planned = if let Some(rule) = denied_by(&policy, &head.method, &head.pq, &head.headers)
        {
            tracing::debug!(rule = %rule.name, "request denied by policy");
            Err(ctx.local(&mut exchange, StatusCode::FORBIDDEN, "denied by policy"))
        } else {
            let authority = std::mem::take(&mut head.authority);
            ctx.plan(
                &policy,
                &mut exchange,
                &head.method,
                &mut head.headers,
                authority,
                &head.pq,
                false,
            )
        };
        if let Ok(plan) = &planned
            && !plan.mirrors.is_empty()
        {
            // Mirrors take a copy of the body as hyper streams it.
            return Ok(Some(self.hand_to_hyper(raw)));
        }
        let body = self.buf.split_to(head.body_len).freeze();
        if !body.is_empty() && self.scanner.scan(&body) != Scan::Clean {
            return Ok(Some(self.hand_to_hyper(raw)));
        }
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        shared.budget.request();
        exchange
            .log
            .bytes_in
            .fetch_add(body.len() as u64, Ordering::Relaxed);

        let plan = match planned {
            Ok(plan) => plan,
            Err(answer) => {
                let close = self.answer(&mut exchange, answer, head.close).await;
                return Ok(Some(Next::Served { close }));
            }
        };

        // The request as the endpoint gets it: built once, sent as is by every attempt.
        let mut request = std::mem::take(&mut self.req);
        request.clear();
        request.extend_from_slice(head.method.as_str().as_bytes());
        request.push(b' ');
        request.extend_from_slice(plan.target.as_bytes());
        request.extend_from_slice(b" HTTP/1.1\r\n");
        put_fields(&mut request, &head.headers);
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(&body);

        let endpoints = plan.endpoints.as_slice();
        let idempotent = is_idempotent(&head.method);
        let head_request = self.head_request;
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let (endpoint, state) = match ctx.pick(&mut exchange, endpoints, &tried) {
                Ok(picked) => picked,
                Err(answer) => {
                    let close = self.answer(&mut exchange, answer, head.close).await;
                    return Ok(Some(Next::Served { close }));
                }
            };
            let in_flight = InFlight::new(state.clone());
            let mut rbuf = std::mem::take(&mut self.rbuf);
            rbuf.clear();
            let route = ctx.dial_route(endpoint);
            let attempt = send(
                ctx,
                endpoint,
                route.as_ref(),
                &request,
                &mut rbuf,
                head_request,
                idempotent,
            );
            let result = match ConnCtx::attempt_deadline(&exchange, plan.backend_timeout) {
                Some(at) => match tokio::time::timeout_at(at, attempt).await {
                    Ok(result) => result,
                    Err(_) => {
                        let answer = ctx.timed_out(&mut exchange, at);
                        let close = self.answer(&mut exchange, answer, head.close).await;
                        return Ok(Some(Next::Served { close }));
                    }
                },
                None => attempt.await,
            };
            match result {
                Ok((upstream, response)) => {
                    if ctx.answered(
                        &mut exchange,
                        response.status,
                        endpoint,
                        &state,
                        endpoints,
                        idempotent,
                    ) {
                        tried.push(endpoint);
                        continue;
                    }
                    let close = self
                        .respond(
                            &mut exchange,
                            &plan.response_modifiers,
                            endpoint,
                            route.as_ref(),
                            upstream,
                            &mut rbuf,
                            response,
                            head.close,
                        )
                        .await;
                    drop(in_flight);
                    self.rbuf = rbuf;
                    self.req = request;
                    return Ok(Some(Next::Served { close }));
                }
                Err(error) => {
                    match ctx.failed(
                        &mut exchange,
                        error,
                        endpoint,
                        &state,
                        endpoints,
                        true,
                        idempotent,
                    ) {
                        Ok(()) => tried.push(endpoint),
                        Err(answer) => {
                            let close = self.answer(&mut exchange, answer, head.close).await;
                            return Ok(Some(Next::Served { close }));
                        }
                    }
                }
            }
        }
    }

    fn header_timeout(&self) -> Error {
        let shared = &self.ctx.shared;
        shared.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
        Error::HeaderTimeout {
            src: self.ctx.src,
            timeout: shared.config.header_read_timeout,
        }
    }

    /// Leaves the connection to hyper with `head` and every byte read after it.
    fn hand_to_hyper(&mut self, head: Bytes) -> Next {
        let mut bytes = Vec::with_capacity(head.len() + self.buf.len());
        bytes.extend_from_slice(&head);
        bytes.extend_from_slice(&self.buf);
        self.buf.clear();
        // hyper's watchdog times the head from now.
        self.ctx
            .state
            .head_started
            .store(now_ms() + 1, Ordering::Relaxed);
        self.ctx.state.touch();
        Next::End(End::Hyper(bytes))
    }

    /// Writes an answer the proxy gives itself (a short body), logs the request, and says
    /// whether the connection closes after it.
    async fn answer(
        &mut self,
        exchange: &mut Exchange,
        response: Response<Body>,
        close: bool,
    ) -> bool {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let status = parts.status;
        self.out.clear();
        put_status(&mut self.out, status);
        put_fields(&mut self.out, &parts.headers);
        if !parts.headers.contains_key(header::CONTENT_LENGTH) {
            self.out.extend_from_slice(b"content-length: ");
            self.out
                .extend_from_slice(body.len().to_string().as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        if close {
            self.out.extend_from_slice(b"connection: close\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        if !self.head_request {
            self.out.extend_from_slice(&body);
        }
        let written = self.client.write_all(&self.out).await.is_ok();
        self.finish(exchange, status, body.len() as u64, written);
        close || !written
    }

    /// Counts and logs a finished request.
    fn finish(&self, exchange: &mut Exchange, status: StatusCode, bytes_out: u64, complete: bool) {
        exchange.log.status = status.as_u16();
        self.ctx.shared.stats.response(status.as_u16());
        self.ctx.state.touch();
        exchange.log.emit(bytes_out, complete);
    }

    /// Sends the response head to the client, edited, and passes its body through. Returns
    /// whether the client connection closes after it.
    #[allow(clippy::too_many_arguments, reason = "the parts of one exchange")]
    async fn respond(
        &mut self,
        exchange: &mut Exchange,
        modifiers: &[&mesh_policy::HeaderModifier],
        endpoint: SocketAddr,
        route: Option<&Route>,
        mut upstream: UpstreamIo,
        rbuf: &mut BytesMut,
        mut response: ResponseHead,
        client_close: bool,
    ) -> bool {
        let framing = response.framing;
        strip_hop_by_hop(&mut response.headers, false);
        for modifier in modifiers {
            apply_modifier(modifier, &mut response.headers);
        }
        let close = client_close || framing == Framing::Close;
        self.out.clear();
        put_status(&mut self.out, response.status);
        put_fields(&mut self.out, &response.headers);
        if framing == Framing::Chunked {
            self.out
                .extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if close {
            self.out.extend_from_slice(b"connection: close\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        let relayed = match exchange.deadline {
            Some(at) => {
                match tokio::time::timeout_at(at, self.relay(&mut upstream, rbuf, framing)).await {
                    Ok(relayed) => relayed,
                    Err(_) => {
                        self.ctx
                            .shared
                            .stats
                            .timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        exchange.log.local_reason = Some("request timeout during response body");
                        Err((0, Relay::Upstream("request timeout".into())))
                    }
                }
            }
            None => self.relay(&mut upstream, rbuf, framing).await,
        };
        match relayed {
            Ok(bytes_out) => {
                if response.keep_alive && rbuf.is_empty() {
                    self.ctx.shared.upstream.checkin(endpoint, route, upstream);
                }
                self.finish(exchange, response.status, bytes_out, true);
                close
            }
            Err((bytes_out, why)) => {
                if let Relay::Upstream(reason) = &why {
                    tracing::debug!(%endpoint, reason, "response body ended early");
                }
                self.finish(exchange, response.status, bytes_out, false);
                true
            }
        }
    }

    /// Writes `self.out` (the response head) and the body, read from `rbuf` then `upstream`,
    /// to the client. Returns the body bytes written.
    async fn relay(
        &mut self,
        upstream: &mut UpstreamIo,
        rbuf: &mut BytesMut,
        framing: Framing,
    ) -> Result<u64, (u64, Relay)> {
        let mut sent = 0u64;
        let mut remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let mut chunked = ChunkedEnd::default();
        loop {
            // What is buffered, up to the end of the body.
            let (take, done) = match framing {
                Framing::None => (0, true),
                Framing::Length(_) => {
                    let take = (rbuf.len() as u64).min(remaining);
                    remaining -= take;
                    (take as usize, remaining == 0)
                }
                Framing::Chunked => match chunked.scan(rbuf) {
                    Ok(Some(end)) => (end, true),
                    Ok(None) => (rbuf.len(), false),
                    Err(why) => return Err((sent, Relay::Upstream(why.into()))),
                },
                Framing::Close => (rbuf.len(), false),
            };
            let data = rbuf.split_to(take);
            sent += take as u64;
            if self.out.is_empty() {
                if !data.is_empty() && self.client.write_all(&data).await.is_err() {
                    return Err((sent, Relay::Client));
                }
            } else {
                // The head goes out with the first bytes of the body.
                self.out.extend_from_slice(&data);
                let written = self.client.write_all(&self.out).await.is_ok();
                self.out.clear();
                if !written {
                    return Err((sent, Relay::Client));
                }
            }
            if done {
                return Ok(sent);
            }
            rbuf.reserve(READ_SIZE);
            match upstream.read_buf(rbuf).await {
                Ok(0) if framing == Framing::Close => return Ok(sent),
                Ok(0) => return Err((sent, Relay::Upstream("closed mid-body".into()))),
                Ok(_) => {}
                Err(e) => return Err((sent, Relay::Upstream(e.to_string()))),
            }
        }
    }
}

/// A read timed out.
struct Timeout;

/// Appends a status line, with the status code's canonical reason phrase.
fn put_status(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// One attempt: the request written on a pooled or new connection, and the response head
/// read back. A pooled connection that turns out closed before any answer is replaced by a
/// new one once, for idempotent requests (the endpoint closed it while idle).
async fn send(
    ctx: &ConnCtx,
    endpoint: SocketAddr,
    route: Option<&Route>,
    request: &[u8],
    rbuf: &mut BytesMut,
    head_request: bool,
    idempotent: bool,
) -> Result<(UpstreamIo, ResponseHead), SendError> {
    let upstream = &ctx.shared.upstream;
    let (mut stream, mut reused) = upstream.checkout(endpoint, route).await?;
    loop {
        rbuf.clear();
        rbuf.reserve(READ_SIZE);
        let reset = |reason: String| SendError::Reset { endpoint, reason };
        let exchanged = async {
            stream
                .write_all(request)
                .await
                .map_err(|e| reset(e.to_string()))?;
            loop {
                match stream.read_buf(rbuf).await {
                    Ok(0) => return Err(reset("closed before response headers".into())),
                    Ok(_) => {}
                    Err(e) => return Err(reset(e.to_string())),
                }
                if let Some(head) = parse_response(rbuf, head_request, endpoint)? {
                    return Ok(head);
                }
            }
        }
        .await;
        match exchanged {
            Ok(head) => return Ok((stream, head)),
            Err(SendError::Reset { .. }) if reused && idempotent && rbuf.is_empty() => {
                // A new connection, not another pooled one that may be as stale.
                stream = upstream.connect_conn(endpoint, route).await?;
                reused = false;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(input: &[u8]) -> Result<Option<usize>, &'static str> {
        ChunkedEnd::default().scan(input)
    }

    #[test]
    fn chunked_end_is_found_whole_and_bytewise() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        assert_eq!(ends(body), Ok(Some(end)));
        let mut scanner = ChunkedEnd::default();
        let mut found = None;
        for (i, b) in body.iter().enumerate() {
            if let Some(n) = scanner.scan(std::slice::from_ref(b)).unwrap_or(None) {
                found = Some(i + n);
                break;
            }
        }
        assert_eq!(found, Some(end));
        assert_eq!(ends(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(ends(b"A\r\n0123456789\r\n"), Ok(None));
    }

    #[test]
    fn broken_chunked_framing_is_an_error() {
        assert!(ends(b"zz\r\n").is_err());
        assert!(ends(b"5\r\nhelloX").is_err());
        assert!(ends(b"\r\n").is_err());
        assert!(ends(b"ffffffffffffffffff\r\n").is_err());
    }

    fn head(text: &str) -> Option<Head> {
        parse_head(&Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn simple_heads_are_served_here_others_go_hand_to_hyper() {
        let h = head("GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\r\n");
        let h = h.expect("a plain GET is served here");
        assert_eq!(
            (h.method, h.pq.as_str(), h.authority.as_str()),
            (Method::GET, "/a?b=1", "svc")
        );
        assert_eq!((h.body_len, h.close), (0, false));
        let h =
            head("POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nConnection: close\r\n\r\n");
        assert!(h.is_some_and(|h| h.body_len == 3 && h.close));
        for other in [
            "GET / HTTP/1.0\r\nHost: s\r\n\r\n",
            "GET http://s/ HTTP/1.1\r\nHost: s\r\n\r\n",
            "CONNECT s:80 HTTP/1.1\r\nHost: s:80\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: s\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 99999999\r\n\r\n",
            "GET / HTTP/1.1\r\nX: 1\r\n\r\n",
        ] {
            assert!(head(other).is_none(), "{other:?} should go to hyper");
        }
    }

    fn response(text: &str, head_request: bool) -> Result<Option<ResponseHead>, SendError> {
        let mut buf = BytesMut::from(text.as_bytes());
        parse_response(
            &mut buf,
            head_request,
            SocketAddr::from(([127, 0, 0, 1], 80)),
        )
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let framing = |text: &str, head: bool| {
            response(text, head)
                .ok()
                .flatten()
                .map(|r| (r.framing, r.keep_alive))
        };
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
            Some((Framing::Length(5), true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Some((Framing::None, true))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            Some((Framing::Chunked, true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n", false),
            Some((Framing::Close, false))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
                false
            ),
            Some((Framing::None, false))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                false
            ),
            Some((Framing::Length(0), true))
        );
        assert!(
            response(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(response("HTTP/1.1 101 Switching\r\n\r\n", false).is_err());
        assert!(matches!(response("HTTP/1.1 200 OK\r\n", false), Ok(None)));
    }
}
