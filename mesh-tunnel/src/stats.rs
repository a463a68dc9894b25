//! Counters of one tunnel endpoint (a client or a server), kept in atomics so the data path
//! never locks for them; the agent reads a [`StatsSnapshot`] at scrape time and exports it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a TLS handshake failed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer's certificate does not verify (unknown or other CA, expired, malformed, no
    /// SPIFFE ID), or the peer refused ours for that reason.
    BadCertificate,
    /// The certificate verifies but names the wrong workload or trust domain.
    WrongIdentity,
    /// A certificate is missing: the client sent none, or the server holds none for the
    /// identity the client asked for (the SNI).
    NoCertificate,
    /// The handshake did not finish in time.
    Timeout,
    /// Anything else: the connection closed or reset during the handshake, no common protocol
    /// version or ALPN, a malformed message.
    Protocol,
}

impl HandshakeFailure {
    /// Every kind, to export one series per label value.
    pub const ALL: [HandshakeFailure; 5] = [
        HandshakeFailure::BadCertificate,
        HandshakeFailure::WrongIdentity,
        HandshakeFailure::NoCertificate,
        HandshakeFailure::Timeout,
        HandshakeFailure::Protocol,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::WrongIdentity => "wrong_identity",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Protocol => "protocol",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The counters of one tunnel endpoint. Shared (`Arc`) between the endpoint and its readers.
#[derive(Debug, Default)]
pub struct TunnelStats {
    handshakes_ok: AtomicU64,
    handshakes_failed: [AtomicU64; HandshakeFailure::ALL.len()],
    connections_open: AtomicU64,
    connections_opened: AtomicU64,
    streams_open: AtomicU64,
    streams_opened: AtomicU64,
    streams_refused: AtomicU64,
    keepalive_failures: AtomicU64,
    requests_invalid: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

/// The counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// TLS handshakes that succeeded.
    pub handshakes_ok: u64,
    handshakes_failed: [u64; HandshakeFailure::ALL.len()],
    /// Tunnel (TLS + HTTP/2) connections open now.
    pub connections_open: u64,
    /// Tunnel connections opened since start.
    pub connections_opened: u64,
    /// CONNECT streams carrying bytes now.
    pub streams_open: u64,
    /// CONNECT streams established (answered 200) since start.
    pub streams_opened: u64,
    /// CONNECT requests refused (the server's handler said no; the client got a non-200 answer).
    pub streams_refused: u64,
    /// Connections closed because the peer left a keepalive PING unanswered.
    pub keepalive_failures: u64,
    /// Server: requests that were not a CONNECT to `ip:port` (answered 405 or 400).
    pub requests_invalid: u64,
    /// Payload bytes written into tunnel streams.
    pub bytes_sent: u64,
    /// Payload bytes read out of tunnel streams.
    pub bytes_received: u64,
}

impl StatsSnapshot {
    /// Failed handshakes of one kind.
    pub fn handshakes_failed(&self, kind: HandshakeFailure) -> u64 {
        self.handshakes_failed[kind.index()]
    }

    /// Failed handshakes of every kind.
    pub fn handshakes_failed_total(&self) -> u64 {
        self.handshakes_failed.iter().sum()
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl TunnelStats {
    /// Reads every counter (each one atomically; the set is not a single atomic snapshot).
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            handshakes_ok: get(&self.handshakes_ok),
            handshakes_failed: std::array::from_fn(|i| get(&self.handshakes_failed[i])),
            connections_open: get(&self.connections_open),
            connections_opened: get(&self.connections_opened),
            streams_open: get(&self.streams_open),
            streams_opened: get(&self.streams_opened),
            streams_refused: get(&self.streams_refused),
            keepalive_failures: get(&self.keepalive_failures),
            requests_invalid: get(&self.requests_invalid),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
        }
    }

    pub(crate) fn handshake_ok(&self) {
        add(&self.handshakes_ok, 1);
    }

    pub(crate) fn handshake_failed(&self, kind: HandshakeFailure) {
        add(&self.handshakes_failed[kind.index()], 1);
    }

    pub(crate) fn stream_refused(&self) {
        add(&self.streams_refused, 1);
    }

    pub(crate) fn keepalive_failed(&self) {
        add(&self.keepalive_failures, 1);
    }

    pub(crate) fn request_invalid(&self) {
        add(&self.requests_invalid, 1);
    }

    pub(crate) fn sent(&self, n: usize) {
        add(&self.bytes_sent, n as u64);
    }

    pub(crate) fn received(&self, n: usize) {
        add(&self.bytes_received, n as u64);
    }

    /// Counts a connection opened; it counts as open until the guard drops.
    pub(crate) fn connection_opened(self: &Arc<Self>) -> Open {
        add(&self.connections_opened, 1);
        Open::new(self.clone(), Gauge::Connections)
    }

    /// Counts a stream established; it counts as open until the guard drops.
    pub(crate) fn stream_opened(self: &Arc<Self>) -> Open {
        add(&self.streams_opened, 1);
        Open::new(self.clone(), Gauge::Streams)
    }

    fn gauge(&self, which: Gauge) -> &AtomicU64 {
        match which {
            Gauge::Connections => &self.connections_open,
            Gauge::Streams => &self.streams_open,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Gauge {
    Connections,
    Streams,
}

/// Holds one unit of an "open" gauge; dropping it (whatever the exit path) gives it back.
#[derive(Debug)]
pub(crate) struct Open {
    stats: Arc<TunnelStats>,
    which: Gauge,
}

impl Open {
    fn new(stats: Arc<TunnelStats>, which: Gauge) -> Self {
        stats.gauge(which).fetch_add(1, Ordering::Relaxed);
        Open { stats, which }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.stats.gauge(self.which).fetch_sub(1, Ordering::Relaxed);
    }
}
