//! Tunnel settings shared by client and server: HTTP/2 flow control, pooling and timeouts.

use std::time::Duration;

/// Receive window of each stream: how much one tunneled connection may have in flight. 4 MiB
/// keeps a 10 Gbit/s stream busy across a few milliseconds of round trip.
pub const DEFAULT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Receive window of a whole connection, shared by its streams: four streams at full window.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept. Measured with the `throughput` example (one stream over
/// loopback, 2 shared cores): 64 KiB did best (670 MB/s against 540 at 16 KiB, 490 at 256 KiB
/// and 390 at 1 MiB); the stream is CPU-bound (copies and AES-GCM), and bigger frames only make
/// the sender and receiver take turns in larger steps.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Streams per HTTP/2 connection before the client opens another connection (and the most the
/// server accepts at once on one connection).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// A pooled connection without streams for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Each end of a tunnel connection sends an HTTP/2 PING this often...
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...and closes the connection when the answer takes longer than this.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest TLS handshake, on either side.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the TCP connection to the peer node, and then for the answer to a CONNECT.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The smallest window HTTP/2 starts with (RFC 9113 section 6.9.2); less only slows streams.
const MIN_WINDOW: u32 = 65_535;
/// The largest window HTTP/2 can express (2^31 - 1).
const MAX_WINDOW: u32 = (1 << 31) - 1;
/// SETTINGS_MAX_FRAME_SIZE bounds (RFC 9113 section 6.5.2).
const MIN_FRAME_SIZE: u32 = 16_384;
const MAX_FRAME_SIZE: u32 = (1 << 24) - 1;

/// How tunnels are set up and sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    /// Initial receive window of each stream, bytes (65,535 to 2^31 - 1).
    pub stream_window: u32,
    /// Receive window of each connection, bytes (65,535 to 2^31 - 1, at least `stream_window`).
    pub connection_window: u32,
    /// Largest DATA frame accepted, bytes (16,384 to 2^24 - 1).
    pub max_frame_size: u32,
    /// Concurrent streams on one connection (client: before opening another; server: allowed).
    pub max_streams_per_connection: u32,
    /// Idle time after which the client closes a pooled connection that carries no stream.
    pub idle_timeout: Duration,
    /// How often each end sends a keepalive PING on a connection.
    pub keepalive_interval: Duration,
    /// How long an answer to a keepalive PING may take before the connection counts as dead
    /// and is closed (its streams fail).
    pub keepalive_timeout: Duration,
    /// Longest TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest TCP connect to a peer, and longest wait for the answer to a CONNECT.
    pub connect_timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// A tunnel setting has an unusable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tunnel config: {field} {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl TunnelConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: String| Err(ConfigError { field, reason });
        for (field, value) in [
            ("stream_window", self.stream_window),
            ("connection_window", self.connection_window),
        ] {
            if !(MIN_WINDOW..=MAX_WINDOW).contains(&value) {
                return err(
                    field,
                    format!("must be between {MIN_WINDOW} and {MAX_WINDOW} bytes, got {value}"),
                );
            }
        }
        if self.connection_window < self.stream_window {
            return err(
                "connection_window",
                format!(
                    "must not be less than stream_window ({}), got {}",
                    self.stream_window, self.connection_window
                ),
            );
        }
        if !(MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&self.max_frame_size) {
            return err(
                "max_frame_size",
                format!(
                    "must be between {MIN_FRAME_SIZE} and {MAX_FRAME_SIZE} bytes, got {}",
                    self.max_frame_size
                ),
            );
        }
        if self.max_streams_per_connection == 0 {
            return err("max_streams_per_connection", "must be at least 1".into());
        }
        for (field, value) in [
            ("idle_timeout", self.idle_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
            ("handshake_timeout", self.handshake_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return err(field, "must be more than zero".into());
            }
        }
        Ok(())
    }

    /// The HTTP/2 settings of a server connection.
    pub(crate) fn h2_server(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.max_streams_per_connection)
            // Let a stream buffer a full window, so one write can fill what the peer allows.
            .max_send_buffer_size(self.stream_window as usize);
        builder
    }

    /// The HTTP/2 settings of a client connection.
    pub(crate) fn h2_client(&self) -> h2::client::Builder {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .initial_max_send_streams(self.max_streams_per_connection as usize)
            .max_send_buffer_size(self.stream_window as usize)
            .enable_push(false);
        builder
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]
    use super::*;

    #[test]
    fn validation_names_the_field_and_reason() {
        assert!(TunnelConfig::default().validate().is_ok());
        let cases = [
            (
                TunnelConfig {
                    stream_window: 1024,
                    ..TunnelConfig::default()
                },
                "tunnel config: stream_window must be between 65535 and 2147483647 bytes, got 1024",
            ),
            (
                TunnelConfig {
                    connection_window: 1 << 20,
                    ..TunnelConfig::default()
                },
                "tunnel config: connection_window must not be less than stream_window (4194304), got 1048576",
            ),
            (
                TunnelConfig {
                    max_frame_size: 1 << 24,
                    ..TunnelConfig::default()
                },
                "tunnel config: max_frame_size must be between 16384 and 16777215 bytes, got 16777216",
            ),
            (
                TunnelConfig {
                    max_streams_per_connection: 0,
                    ..TunnelConfig::default()
                },
                "tunnel config: max_streams_per_connection must be at least 1",
            ),
            (
                TunnelConfig {
                    idle_timeout: Duration::ZERO,
                    ..TunnelConfig::default()
                },
                "tunnel config: idle_timeout must be more than zero",
            ),
        ];
        for (config, expected) in cases {
            assert_eq!(config.validate().unwrap_err().to_string(), expected);
        }
    }
}
