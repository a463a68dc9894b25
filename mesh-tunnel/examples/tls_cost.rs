//! What TLS alone costs per GB moved through the tunnel, in memory (no sockets, no HTTP/2):
//!
//! ```text
//! cargo run --release -p mesh-tunnel --example tls_cost -- [MiB]
//! ```
//!
//! A rustls client and server with the tunnel's configurations (mesh-identity's, the ring
//! provider) shake hands through buffers; then `MiB` (default 1024) of 64 KiB writes go from the
//! client to the server: the client's `write` + `write_tls` (seal into records) and the
//! server's `read_tls` + `process_new_packets` + `read` (open them and copy the plaintext out)
//! are timed apart. Each side runs on one node of a tunnel, so one GB through the tunnel costs
//! both figures once. Best of three runs.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark program: a panic is a failed run"
)]

use std::io::{Read, Write};
use std::ops::DerefMut;
use std::time::{Duration, Instant};

use mesh_identity::tls::{client_config, server_config, server_name};
use rustls::{ClientConnection, ConnectionCommon, ServerConnection};

mod common;

const WRITE: usize = 64 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(1024);
    let (ids, bundle, client_id, server_id) = common::identities().await;
    let client_cfg = client_config(&ids, client_id, &bundle, server_id.clone()).unwrap();
    let server_cfg = server_config(&ids, server_id.clone(), &bundle).unwrap();

    let mut best = (Duration::MAX, Duration::MAX);
    let mut suite = String::new();
    for _ in 0..3 {
        let mut client =
            ClientConnection::new(client_cfg.clone(), server_name(&server_id).unwrap()).unwrap();
        let mut server = ServerConnection::new(server_cfg.clone()).unwrap();
        handshake(&mut client, &mut server);
        suite = format!("{:?}", client.negotiated_cipher_suite().unwrap().suite());
        let (seal, open) = transfer(&mut client, &mut server, mib * 1024 * 1024);
        best = (best.0.min(seal), best.1.min(open));
    }
    let gb = (mib * 1024 * 1024) as f64 / 1e9;
    let per_gb = |d: Duration| d.as_secs_f64() * 1000.0 / gb;
    println!("{mib} MiB in {WRITE}-byte writes, {suite}, best of 3");
    println!(
        "seal (client: write + write_tls)            {:>7.0} ms per GB  ({:.2} GB/s)",
        per_gb(best.0),
        gb / best.0.as_secs_f64()
    );
    println!(
        "open (server: read_tls + process + read)    {:>7.0} ms per GB  ({:.2} GB/s)",
        per_gb(best.1),
        gb / best.1.as_secs_f64()
    );
}

/// Moves handshake flights between the two until neither has anything to say, then the
/// server's last words (session tickets, if any).
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) {
    let mut buf = Vec::new();
    while client.is_handshaking() || server.is_handshaking() {
        pump(client, server, &mut buf);
        pump(server, client, &mut buf);
    }
    pump(server, client, &mut buf);
}

/// Everything `from` has to send, read and processed by `to`.
fn pump<A, B, DA, DB>(from: &mut A, to: &mut B, buf: &mut Vec<u8>)
where
    A: DerefMut<Target = ConnectionCommon<DA>>,
    B: DerefMut<Target = ConnectionCommon<DB>>,
{
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        to.process_new_packets().unwrap();
    }
}

/// Sends `bytes` from client to server; (time sealing, time opening).
fn transfer(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
    bytes: usize,
) -> (Duration, Duration) {
    let data = vec![0x5au8; WRITE];
    let mut wire = Vec::with_capacity(WRITE + 1024);
    let mut out = vec![0u8; WRITE];
    let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
    let mut sent = 0;
    while sent < bytes {
        let t = Instant::now();
        client.writer().write_all(&data).unwrap();
        wire.clear();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        seal += t.elapsed();
        let t = Instant::now();
        let mut rd = &wire[..];
        let mut got = 0;
        while !rd.is_empty() {
            server.read_tls(&mut rd).unwrap();
            server.process_new_packets().unwrap();
            loop {
                match server.reader().read(&mut out) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        open += t.elapsed();
        assert_eq!(got, WRITE);
        sent += WRITE;
    }
    (seal, open)
}
