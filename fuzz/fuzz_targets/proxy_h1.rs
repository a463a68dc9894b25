//! Drives the whole HTTP/1 server path with arbitrary client bytes: the scanner, hyper's request
//! parsing and the proxy's handler, over an in-memory pipe. The policy routes the destination
//! to a Service without endpoints, so every request that gets through is answered 503 without
//! any network. Checks that nothing panics, that the connection always ends once the client
//! has sent everything (no hang), and that what comes back is a sequence of HTTP/1.1 answers
//! whose statuses the proxy can give.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_http::{Config, Proxy};
use mesh_policy::{Compiled, PolicyStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICY: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: http, port: 80, targetPort: 8080}]
";

struct Harness {
    runtime: tokio::runtime::Runtime,
    proxy: Proxy,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let policy = Compiled::from_yaml(POLICY, "fuzz.yaml").expect("policy");
        let config = Config {
            // Small limits so that the fuzzer reaches them.
            max_header_bytes: 4096,
            max_headers: 16,
            ..Config::default()
        };
        let proxy = Proxy::new(config, Arc::new(PolicyStore::new(policy)));
        Harness { runtime, proxy }
    })
}

fuzz_target!(|data: &[u8]| {
    let h = harness();
    let src: SocketAddr = "10.0.0.2:40000".parse().expect("address");
    let dst: SocketAddr = "10.96.0.1:80".parse().expect("address");
    // The agent hands over at most its detection prefix; any split is possible.
    let split = data
        .first()
        .map_or(0, |&b| usize::from(b) % 32)
        .min(data.len());
    let (prefix, rest) = data.split_at(split);
    let output = h.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let proxy = h.proxy.clone();
        let prefix = prefix.to_vec();
        let served =
            tokio::spawn(async move { proxy.serve_io(server, prefix, src, dst, false, None).await });
        let exchange = async {
            // Written while the proxy answers, so a full pipe never blocks both sides.
            let (mut read, mut write) = tokio::io::split(&mut client);
            let writer = async {
                let _ = write.write_all(rest).await;
                let _ = write.shutdown().await;
            };
            let mut out = Vec::new();
            let reader = read.read_to_end(&mut out);
            let (_, _) = tokio::join!(writer, reader);
            out
        };
        let out = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the proxy answered and closed within 10 s of the end of input");
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the connection task ended")
            .expect("the connection task did not panic")
            .ok();
        out
    });
    // Every status line (at the start or after a line end: bodies are the proxy's own short
    // reasons, and a HEAD answer has none) carries a status the proxy or hyper can give.
    if !output.is_empty() {
        assert!(
            output.starts_with(b"HTTP/1."),
            "{:?}",
            String::from_utf8_lossy(&output)
        );
    }
    for (at, _) in output
        .windows(9)
        .enumerate()
        .filter(|(_, w)| *w == b"HTTP/1.1 ")
    {
        if at > 0 && output[at - 1] != b'\n' {
            continue;
        }
        let status = &output[at + 9..(at + 12).min(output.len())];
        assert!(
            [
                &b"100"[..],
                b"400",
                b"404",
                b"414",
                b"431",
                b"500",
                b"501",
                b"503",
                b"505"
            ]
            .contains(&status),
            "status {:?} in {:?}",
            String::from_utf8_lossy(status),
            String::from_utf8_lossy(&output)
        );
    }
});
