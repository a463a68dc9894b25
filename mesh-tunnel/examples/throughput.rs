//! Throughput of one tunneled stream against plain TCP, over loopback in this process:
//!
//! ```text
//! cargo run --release -p mesh-tunnel --example throughput -- [MiB] [frame sizes in KiB...]
//! ```
//!
//! Each run sends `MiB` (default 1024) through one stream to a backend that discards the bytes
//! and answers one byte when it has them all; the figure is bytes / time to that answer. The
//! tunnel is measured with the default windows (4 MiB stream, 16 MiB connection) at each DATA
//! frame size given (default 16, 64, 256 and 1024 KiB); `WINDOW_KIB` sets another stream window
//! (the connection window is then four times it). Each figure is the best of three runs:
//! the machine is shared, and the best run is the least disturbed one.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark program: a panic is a failed run"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_tunnel::{Decision, Inbound, TunnelClient, TunnelConfig, TunnelServer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;

const CHUNK: usize = 256 * 1024;
const RUNS: usize = 3;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(1024);
    let mut frames: Vec<u32> = args.map(|a| a.parse::<u32>().unwrap() * 1024).collect();
    if frames.is_empty() {
        frames = vec![16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024];
    }
    let bytes = mib * 1024 * 1024;

    let (ids, bundle, client_id, server_id) = common::identities().await;
    let sink = sink_backend().await;

    println!("one stream, {mib} MiB, loopback, best of {RUNS}");
    let plain = best(|| async { send(TcpStream::connect(sink).await.unwrap(), bytes).await }).await;
    println!(
        "plain TCP                      {:>8.0} MB/s",
        mb_per_s(bytes, plain)
    );

    for frame in frames {
        let mut config = TunnelConfig {
            max_frame_size: frame,
            ..TunnelConfig::default()
        };
        if let Some(kib) = std::env::var("WINDOW_KIB")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            config.stream_window = kib * 1024;
            config.connection_window = 4 * kib * 1024;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = listener.local_addr().unwrap();
        let handler = |inbound: Inbound| async move {
            Decision::<TcpStream>::Deliver(TcpStream::connect(inbound.dst).await.unwrap())
        };
        let server = TunnelServer::new(ids.clone(), &bundle, config.clone(), handler).unwrap();
        let serving = tokio::spawn(async move { server.serve(listener).await });
        let client = TunnelClient::new(ids.clone(), bundle.clone(), config).unwrap();
        let tunneled = best(|| async {
            let stream = client
                .connect(&client_id, &server_id, peer, sink)
                .await
                .unwrap();
            send(stream, bytes).await
        })
        .await;
        println!(
            "tunnel, frames of {:>4} KiB     {:>8.0} MB/s  ({:.0} % of plain TCP)",
            frame / 1024,
            mb_per_s(bytes, tunneled),
            100.0 * plain.as_secs_f64() / tunneled.as_secs_f64()
        );
        serving.abort();
    }
}

async fn best<F, Fut>(mut run: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Duration>,
{
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        best = best.min(run().await);
    }
    best
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// Writes `bytes`, half-closes, and waits for the sink's one-byte answer.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, bytes: usize) -> Duration {
    let chunk = vec![0x5a; CHUNK];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK);
        stream.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    stream.shutdown().await.unwrap();
    let mut done = [0u8; 1];
    stream.read_exact(&mut done).await.unwrap();
    start.elapsed()
}

/// Reads each connection to its end, then answers one byte.
async fn sink_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while tcp.read(&mut buf).await.unwrap() > 0 {}
                tcp.write_all(b"k").await.unwrap();
            });
        }
    });
    addr
}
