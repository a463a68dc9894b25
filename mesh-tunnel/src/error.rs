//! Errors of the tunnel client and server.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_identity::SpiffeId;
use mesh_identity::tls::{SniError, TlsError};

use crate::config::ConfigError;
use crate::stats::HandshakeFailure;

/// A tunnel stream could not be opened.
///
/// Sorted by where the failure is, so it can become a metric label ([`TunnelError::kind`]): the
/// local node (`UnknownSource`, `ServerName`, `Tls`), the peer node or the network (`Connect`,
/// `ConnectTimeout`, `Handshake`, `Http2`, `OpenTimeout`), the peer's decision (`Refused`).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// This node holds no certificate for the source identity.
    #[error("no certificate held for the source identity {src}")]
    UnknownSource {
        /// The source identity asked for.
        src: SpiffeId,
    },
    /// The destination identity cannot be put in a TLS server name.
    #[error(transparent)]
    ServerName(#[from] SniError),
    /// The client TLS configuration could not be built (an unusable trust bundle).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The TCP connection to the peer node failed.
    #[error("cannot connect to tunnel peer {peer}: {source}")]
    Connect {
        /// The peer node's tunnel address.
        peer: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TCP connection to the peer node did not complete in time.
    #[error("connecting to tunnel peer {peer} timed out after {after:?}")]
    ConnectTimeout {
        /// The peer node's tunnel address.
        peer: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// The TLS handshake with the peer failed.
    #[error(
        "TLS handshake with tunnel peer {peer} for {dst_id} (as {src}) failed ({failure}): {reason}"
    )]
    Handshake {
        /// The peer node's tunnel address.
        peer: SocketAddr,
        /// The identity we presented.
        src: SpiffeId,
        /// The identity we expected the server to present.
        dst_id: SpiffeId,
        /// The kind of failure.
        failure: HandshakeFailure,
        /// rustls' reason, with the identities when they did not match.
        reason: String,
    },
    /// The HTTP/2 connection or the CONNECT stream failed.
    #[error("HTTP/2 with tunnel peer {peer} failed: {source}")]
    Http2 {
        /// The peer node's tunnel address.
        peer: SocketAddr,
        /// h2's error.
        source: h2::Error,
    },
    /// The peer did not answer the CONNECT in time.
    #[error("tunnel peer {peer} did not answer the CONNECT to {dst} within {after:?}")]
    OpenTimeout {
        /// The peer node's tunnel address.
        peer: SocketAddr,
        /// The destination asked for.
        dst: SocketAddr,
        /// The limit.
        after: Duration,
    },
    /// The peer answered the CONNECT with something other than 200 (its policy refused, or the
    /// destination is unreachable from there).
    #[error("tunnel peer refused the connection with status {status}: {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The peer's reason, from the refusal header (empty if it gave none).
        reason: String,
    },
}

impl TunnelError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TunnelError::UnknownSource { .. } => "unknown_source",
            TunnelError::ServerName(_) => "server_name",
            TunnelError::Tls(_) => "tls_config",
            TunnelError::Connect { .. } => "connect",
            TunnelError::ConnectTimeout { .. } => "connect_timeout",
            TunnelError::Handshake { .. } => "handshake",
            TunnelError::Http2 { .. } => "http2",
            TunnelError::OpenTimeout { .. } => "open_timeout",
            TunnelError::Refused { .. } => "refused",
        }
    }
}

/// A tunnel server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS configuration could not be built (an unusable trust bundle).
    #[error(transparent)]
    Tls(#[from] TlsError),
}
