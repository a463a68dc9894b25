//! The node-to-node tunnel of the mesh, HBONE as Istio ambient's ztunnel speaks it: each
//! connection between workloads on different nodes becomes one HTTP/2 `CONNECT` stream, whose
//! authority is the original destination `ip:port`, inside a TLS 1.3 connection to the peer
//! node's port 15008, both ends authenticated by the SPIFFE certificates of the workloads
//! ([`mesh_identity`]).
//!
//! - [`TunnelServer`] accepts tunnel connections, presents the certificate of the workload the
//!   client names in its SNI, and hands each `CONNECT` to an [`InboundHandler`] that decides
//!   (policy) and returns the stream to deliver to; bytes are then copied both ways.
//! - [`TunnelClient`] opens [`TunnelStream`]s, pooling HTTP/2 connections per
//!   (source identity, destination identity, peer node) so that connections between the same
//!   workloads share one TLS session.
//! - [`TunnelStats`] counts handshakes, connections, streams and bytes with atomics; the agent
//!   turns them into metrics, so this crate needs no metrics library.
//!
//! Flow-control windows default to 4 MiB per stream and 16 MiB per connection (ztunnel's
//! values): a stream then keeps a few milliseconds of a 10 Gbit/s link in flight.

#![forbid(unsafe_code)]

mod client;
mod config;
mod error;
mod handshake;
mod keepalive;
mod pool;
mod readahead;
mod relay;
mod server;
mod stats;
mod stream;

pub use client::{TunnelClient, TunnelStream};
pub use config::{
    ConfigError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECTION_WINDOW, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_STREAMS_PER_CONNECTION, DEFAULT_STREAM_WINDOW,
    TunnelConfig,
};
pub use error::{ServerError, TunnelError};
pub use server::{Decision, Inbound, InboundHandler, REFUSAL_REASON_HEADER, TunnelServer};
pub use stats::{HandshakeFailure, StatsSnapshot, TunnelStats};

/// The port tunnel servers listen on (ztunnel's HBONE port).
pub const TUNNEL_PORT: u16 = 15008;
