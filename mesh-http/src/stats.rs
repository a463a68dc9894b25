//! Counters of the HTTP layer, plain atomics so that the agent's metrics collector can read
//! them at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::rejection::Rejection;

/// Monotonic counters since the [`crate::Proxy`] was built.
#[derive(Debug, Default)]
pub struct Stats {
    /// Client connections served.
    pub connections: AtomicU64,
    /// Requests received (each HTTP/1 request and each HTTP/2 stream).
    pub requests: AtomicU64,
    /// Responses by status class: index 0 for 1xx up to 4 for 5xx.
    pub responses: [AtomicU64; 5],
    /// Retries sent.
    pub retries: AtomicU64,
    /// Retries not sent because the retry budget was spent.
    pub retries_over_budget: AtomicU64,
    /// Requests answered 504 (route or backend-request timeout).
    pub timeouts: AtomicU64,
    /// Upstream attempts that failed: connect failure, reset or protocol error.
    pub upstream_errors: AtomicU64,
    /// Requests answered 503 because no endpoint could take them.
    pub no_healthy_endpoint: AtomicU64,
    /// Endpoints ejected by outlier detection.
    pub ejections: AtomicU64,
    /// Mirrored copies sent.
    pub mirrors: AtomicU64,
    /// Mirrored copies dropped (body too large or unknown, too many in flight).
    pub mirrors_skipped: AtomicU64,
    /// Requests refused with 400 for malformed or ambiguous framing, in the order of
    /// [`Rejection::ALL`] (see [`StatsSnapshot::rejections`]).
    pub rejected_requests: [AtomicU64; Rejection::ALL.len()],
    /// HTTP/1 connections closed because a request head did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// Requests answered 403 because the destination's agent refused the routed connection
    /// (the mTLS tunnel's policy decision).
    pub denied_upstream: AtomicU64,
    /// Requests that came through the mTLS tunnel and were answered 403 here by an HTTP deny
    /// rule ([`crate::Proxy::serve_tunneled`]).
    pub denied_tunneled: AtomicU64,
}

impl StatsSnapshot {
    /// Refused requests by reason, every reason listed (zero included).
    pub fn rejections(&self) -> impl Iterator<Item = (Rejection, u64)> + '_ {
        Rejection::ALL
            .iter()
            .copied()
            .zip(self.rejected_by_reason.iter().copied())
    }
}

/// A copy of [`Stats`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::connections`].
    pub connections: u64,
    /// See [`Stats::requests`].
    pub requests: u64,
    /// See [`Stats::responses`].
    pub responses: [u64; 5],
    /// See [`Stats::retries`].
    pub retries: u64,
    /// See [`Stats::retries_over_budget`].
    pub retries_over_budget: u64,
    /// See [`Stats::timeouts`].
    pub timeouts: u64,
    /// See [`Stats::upstream_errors`].
    pub upstream_errors: u64,
    /// See [`Stats::no_healthy_endpoint`].
    pub no_healthy_endpoint: u64,
    /// See [`Stats::ejections`].
    pub ejections: u64,
    /// See [`Stats::mirrors`].
    pub mirrors: u64,
    /// See [`Stats::mirrors_skipped`].
    pub mirrors_skipped: u64,
    /// Requests refused with 400 for malformed framing, all reasons together.
    pub rejected_requests: u64,
    /// The same by reason, in the order of [`Rejection::ALL`].
    pub rejected_by_reason: [u64; Rejection::ALL.len()],
    /// See [`Stats::header_timeouts`].
    pub header_timeouts: u64,
    /// See [`Stats::denied_upstream`].
    pub denied_upstream: u64,
    /// See [`Stats::denied_tunneled`].
    pub denied_tunneled: u64,
}

impl Stats {
    /// Counts a response status.
    pub(crate) fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused request.
    pub(crate) fn rejected(&self, why: Rejection) {
        if let Some(counter) = self.rejected_requests.get(why.index()) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: get(&self.connections),
            requests: get(&self.requests),
            responses: [
                get(&self.responses[0]),
                get(&self.responses[1]),
                get(&self.responses[2]),
                get(&self.responses[3]),
                get(&self.responses[4]),
            ],
            retries: get(&self.retries),
            retries_over_budget: get(&self.retries_over_budget),
            timeouts: get(&self.timeouts),
            upstream_errors: get(&self.upstream_errors),
            no_healthy_endpoint: get(&self.no_healthy_endpoint),
            ejections: get(&self.ejections),
            mirrors: get(&self.mirrors),
            mirrors_skipped: get(&self.mirrors_skipped),
            rejected_requests: self.rejected_requests.iter().map(get).sum(),
            rejected_by_reason: std::array::from_fn(|i| get(&self.rejected_requests[i])),
            header_timeouts: get(&self.header_timeouts),
            denied_upstream: get(&self.denied_upstream),
            denied_tunneled: get(&self.denied_tunneled),
        }
    }
}
