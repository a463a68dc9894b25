//! Limits and timeouts of the HTTP layer, and the resilience knobs (retries, retry budget,
//! outlier detection) that are not part of the agent-facing [`Config`].

use std::time::Duration;

/// Upstream TCP connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to send a complete HTTP/1 request head once it started one.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP/1 request head (request line and headers) accepted; larger heads get 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most HTTP/1 request headers accepted; more get 431.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` advertised to clients.
pub const DEFAULT_H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE` advertised to clients.
pub const DEFAULT_H2_MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// A client connection with no request in flight and no bytes moving for this long is closed
/// (gracefully: HTTP/1 closes between requests, HTTP/2 sends GOAWAY).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// HTTP/2 streams a client may reset before they are accepted (rapid-reset protection).
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2 streams we may reset because of client errors before the connection gets GOAWAY.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Largest request body buffered so that it can be mirrored.
pub const MIRROR_BODY_LIMIT: u64 = 64 * 1024;
/// Mirrored requests in flight at once, over the whole proxy; copies beyond are dropped.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;
/// Deadline of a mirrored request.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled upstream connections are closed after this long.
pub const UPSTREAM_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Settings of the HTTP layer. Every field has a `DEFAULT_*` constant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Upstream TCP connect timeout; a connect that takes longer counts as a connect failure.
    pub connect_timeout: Duration,
    /// Time a client has to finish an HTTP/1 request head, counted from its first byte (or from
    /// the connection start for the first request). On expiry the connection is closed without
    /// a response (hyper has no hook to write a 408 into a half-read head).
    pub header_read_timeout: Duration,
    /// Largest HTTP/1 request head in bytes; larger heads are answered 431.
    pub max_header_bytes: usize,
    /// Most HTTP/1 request header fields; more are answered 431.
    pub max_headers: usize,
    /// HTTP/2 concurrent streams per client connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 header list size (uncompressed) per request.
    pub h2_max_header_list_size: u32,
    /// Idle client connections (no request in flight, no bytes moving) are closed after this.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            h2_max_concurrent_streams: DEFAULT_H2_MAX_CONCURRENT_STREAMS,
            h2_max_header_list_size: DEFAULT_H2_MAX_HEADER_LIST_SIZE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Retries, retry budget and passive outlier detection. The Gateway API has no stable retry
/// field and mesh-policy exposes none, so these are node-wide; [`Resilience::default`] is what
/// the agent gets from [`crate::Proxy::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resilience {
    /// Retries per request after the first attempt. Only requests whose body is fully known
    /// (no body, or a small body buffered for mirroring) are retried: after a connect failure
    /// always, after a reset before response headers or a `retry_on_status` answer only for
    /// idempotent methods.
    pub max_retries: u32,
    /// Response statuses that are retried (idempotent requests only). Empty by default: only
    /// connect failures and resets are retried.
    pub retry_on_status: Vec<u16>,
    /// Retries may add at most this share (percent) to the request rate over the window.
    pub retry_budget_percent: u32,
    /// Retries always allowed per second of the window, whatever the request rate.
    pub retry_min_per_second: u32,
    /// Window of the retry budget.
    pub retry_budget_window: Duration,
    /// Consecutive failures (5xx answers, connect failures, resets) that eject an endpoint.
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection doubles it.
    pub base_ejection: Duration,
    /// Longest ejection time.
    pub max_ejection: Duration,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            max_retries: 2,
            retry_on_status: Vec::new(),
            retry_budget_percent: 20,
            retry_min_per_second: 3,
            retry_budget_window: Duration::from_secs(10),
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
        }
    }
}
