//! RFC 9112 framing in process, with raw bytes over loopback: Host rules and malformed chunked
//! bodies get `400` with `Connection: close` and a reason, are counted by reason, never reach
//! the backend, and a connection whose body was left unread after a response has started is
//! closed instead.
//! Uses `127.60.0.0/16`.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::time::Duration;

use common::*;
use mesh_http::Rejection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VIP: &str = "10.96.0.1:80";

/// Sends `bytes` and reads until the proxy closes; `None` if it did not close within 5 s.
async fn until_closed(addr: std::net::SocketAddr, bytes: &[u8]) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Some(String::from_utf8_lossy(&out).into_owned()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&out).into_owned())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hosts_and_chunked_bodies_get_400_with_close() {
    let web = echo("web", lo(60, 0, 1)).await;
    let yaml = service("web", "shop", "10.96.0.1", &[web.addr]);
    let h = harness(&yaml, VIP.parse().unwrap(), false).await;
    let chunked = "POST /bad HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cases: Vec<(String, Rejection)> = vec![
        (
            "GET /bad HTTP/1.1\r\nHost: web\r\nHost: other\r\n\r\n".into(),
            Rejection::DuplicateHost,
        ),
        (
            "GET /bad HTTP/1.1\r\nHost: web\r\nHost: web\r\n\r\n".into(),
            Rejection::DuplicateHost,
        ),
        (
            "GET /bad HTTP/1.1\r\nHost: we b\r\n\r\n".into(),
            Rejection::InvalidHost,
        ),
        (
            "GET /bad HTTP/1.1\r\nHost: web/x\r\n\r\n".into(),
            Rejection::InvalidHost,
        ),
        (
            "GET /bad HTTP/1.1\r\nHost: a@web\r\n\r\n".into(),
            Rejection::InvalidHost,
        ),
        (
            "GET /bad HTTP/1.1\r\nHost: web:8o\r\n\r\n".into(),
            Rejection::InvalidHost,
        ),
        (
            "GET /bad HTTP/1.1\r\nHost: [::1\r\n\r\n".into(),
            Rejection::InvalidHost,
        ),
        (
            "GET /bad HTTP/1.1\r\nX: y\r\n\r\n".into(),
            Rejection::MissingHost,
        ),
        (
            format!("{chunked}FFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"),
            Rejection::ChunkSizeOverflow,
        ),
        (
            format!("{chunked}5\nhello\r\n0\r\n\r\n"),
            Rejection::BareLineEndInChunk,
        ),
        (
            format!("{chunked}5;a=b\nhello\r\n0\r\n\r\n"),
            Rejection::BareLineEndInChunk,
        ),
        (
            format!("{chunked}zz\r\nhello\r\n0\r\n\r\n"),
            Rejection::InvalidChunkSize,
        ),
        (
            format!("{chunked}5\r\nhelloX0\r\n\r\n"),
            Rejection::ChunkDataWithoutCrlf,
        ),
        (
            format!("{chunked}5;a=\x01\r\nhello\r\n0\r\n\r\n"),
            Rejection::InvalidChunkExtension,
        ),
        (
            format!("{chunked}0\r\nX: a\r\n folded\r\n\r\n"),
            Rejection::InvalidTrailer,
        ),
    ];
    for (raw, why) in &cases {
        let before = h.proxy.stats().snapshot().rejected_by_reason[why.index()];
        let answer = until_closed(h.listen, raw.as_bytes())
            .await
            .unwrap_or_else(|| panic!("{raw:?}: the connection stays open"));
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{raw:?} -> {answer:?}"
        );
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{raw:?} -> {answer:?}"
        );
        if why.in_body() {
            // The proxy's own answer says why.
            assert!(
                answer.ends_with(&format!("{}\n", why.reason())),
                "{answer:?}"
            );
        }
        assert_eq!(
            h.proxy.stats().snapshot().rejected_by_reason[why.index()],
            before + 1,
            "{why:?} counted"
        );
    }
    assert!(
        web.requests().is_empty(),
        "nothing reached the backend: {:?}",
        web.requests()
    );
    let snapshot = h.proxy.stats().snapshot();
    assert_eq!(snapshot.rejected_requests, cases.len() as u64);
    let results = h.results.lock().unwrap().clone();
    for (_, why) in &cases {
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(e) if e.ends_with(why.reason()))),
            "{why:?} in {results:?}"
        );
    }

    // HTTP/1.0 needs no Host; an empty Host is a valid (empty) reg-name.
    for raw in [
        "GET /ok10 HTTP/1.0\r\n\r\n",
        "GET /ok11 HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        "GET /okv6 HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n",
    ] {
        let answer = until_closed(h.listen, raw.as_bytes()).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "{raw:?} -> {answer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_after_a_good_pipelined_request_gets_its_own_400() {
    let web = echo("web", lo(60, 1, 1)).await;
    let yaml = service("web", "shop", "10.96.0.1", &[web.addr]);
    let h = harness(&yaml, VIP.parse().unwrap(), false).await;
    let answer = until_closed(
        h.listen,
        b"POST /first HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          POST /second HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let second = answer
        .find("HTTP/1.1 400")
        .unwrap_or_else(|| panic!("{answer}"));
    assert!(second > 0);
    let seen = web.requests();
    assert_eq!(seen[0].path, "/first");
    assert_eq!(&seen[0].body[..], b"abc");
    assert!(
        seen.iter().all(|s| s.path != "/second" || s.body.len() < 3),
        "the second body never arrived whole: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_after_the_response_started_closes_the_connection() {
    let web = echo("web", lo(60, 2, 1)).await;
    let yaml = service("web", "shop", "10.96.0.1", &[web.addr])
        + &http_route(
            "r",
            "shop",
            "web",
            r#"  rules:
  - filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.org, statusCode: 302}
"#,
        );
    let h = harness(&yaml, VIP.parse().unwrap(), false).await;
    let mut stream = TcpStream::connect(h.listen).await.unwrap();
    stream
        .write_all(
            b"POST /r HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        )
        .await
        .unwrap();
    // The redirect is answered without reading the body.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 302"), "{head}");
    // hyper gives up on the unread body and closes; a broken chunk sent now changes nothing.
    let _ = stream.write_all(b"zz\r\n").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the connection is closed"
    );
    assert!(
        !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
        "no second answer after the response started: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(web.requests().is_empty());
}
