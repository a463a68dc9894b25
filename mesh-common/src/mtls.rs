//! STRICT mTLS: map names and sizes for the `refuse_plaintext` TC program.
//!
//! `refuse_plaintext` runs at TC egress on the host side of pods' veths, where packets enter the
//! pod. A TCP connection opening (SYN without ACK) whose destination is listed in
//! `MTLS_STRICT_V4` / `MTLS_STRICT_V6` and that carries no local socket (`__sk_buff.sk` is NULL:
//! the node forwarded it from another pod or another node, in plaintext) is dropped and counted
//! in `MTLS_REFUSED` by interface. Connections the node itself opens carry their socket and pass:
//! the agent delivering what arrived through the tunnel or what it captured, and the kubelet's
//! probes.
//!
//! Keys are destination addresses in network order; the value is unused (1).

/// IPv4 destinations in STRICT mode (hash, key `[u8; 4]`).
pub const MAP_STRICT_V4: &str = "MTLS_STRICT_V4";
/// IPv6 destinations in STRICT mode (hash, key `[u8; 16]`).
pub const MAP_STRICT_V6: &str = "MTLS_STRICT_V6";
/// Per-CPU LRU hash: ifindex -> connection openings refused there.
pub const MAP_REFUSED: &str = "MTLS_REFUSED";

/// STRICT destinations per address family (the pods of one node).
pub const MAX_STRICT: u32 = 8192;
/// Interfaces tracked in `MTLS_REFUSED`.
pub const MAX_IFACES: u32 = 4096;
