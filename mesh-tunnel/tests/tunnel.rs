//! The tunnel end to end over loopback: a client and a server with identities from one CA, an
//! echo backend behind the server.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    CLIENT, DENIED, SERVER, Server, echo_backend, eventually, exchange, file_ca, id, identities,
    payload, round_trip,
};
use http::{Method, Request, StatusCode};
use mesh_identity::tls::{client_config, server_config, server_name};
use mesh_tunnel::{
    HandshakeFailure, REFUSAL_REASON_HEADER, TunnelClient, TunnelConfig, TunnelError,
};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn a_connect_stream_carries_a_mebibyte_each_way_with_half_close() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let server = Server::start(ids.clone(), &bundle, TunnelConfig::default()).await;
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids, bundle, TunnelConfig::default()).unwrap();

    let stream = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    assert_eq!(stream.server_id(), &id(SERVER));
    assert_eq!(stream.dst(), backend);

    // The client writes 1 MiB and half-closes; the backend echoes it while it arrives and
    // half-closes on EOF, so the client reads 1 MiB back and then its own EOF.
    let data = payload(MIB, 7);
    let back = round_trip(stream, &data).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echoed bytes differ from the sent ones");

    // The server saw who called and where to.
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer, id(CLIENT));
    assert_eq!(seen[0].server_id, id(SERVER));
    assert_eq!(seen[0].dst, backend);
    assert!(seen[0].src_addr.ip().is_loopback());

    let client_stats = client.stats().snapshot();
    assert_eq!(client_stats.bytes_sent, MIB as u64);
    assert_eq!(client_stats.bytes_received, MIB as u64);
    assert_eq!(client_stats.streams_opened, 1);
    assert_eq!(client_stats.handshakes_ok, 1);
    // Both halves closed cleanly: the server's relay ends and its stream gauge drops.
    let stats = server.tunnel.stats().clone();
    eventually("the server stream to end", || {
        stats.snapshot().streams_open == 0
    })
    .await;
    let server_stats = stats.snapshot();
    assert_eq!(server_stats.bytes_received, MIB as u64);
    assert_eq!(server_stats.bytes_sent, MIB as u64);
    assert_eq!(server_stats.streams_opened, 1);
    assert_eq!(
        server_stats.connections_open, 1,
        "the pooled connection stays"
    );
}

#[tokio::test]
async fn streams_between_the_same_workloads_share_one_connection() {
    let other_client = "spiffe://cluster.local/ns/web/sa/admin";
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT, other_client]).await;
    let server = Server::start(ids.clone(), &bundle, TunnelConfig::default()).await;
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids, bundle, TunnelConfig::default()).unwrap();

    // Two streams open at the same time, opened concurrently.
    let (src, dst) = (id(CLIENT), id(SERVER));
    let (a, b) = tokio::join!(
        client.connect(&src, &dst, server.addr, backend),
        client.connect(&src, &dst, server.addr, backend),
    );
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    assert_eq!(exchange(&mut a, b"first").await, b"first");
    assert_eq!(exchange(&mut b, b"second").await, b"second");
    assert_eq!(a.connection_id(), b.connection_id());
    let server_stats = server.tunnel.stats().snapshot();
    assert_eq!(server_stats.handshakes_ok, 1, "one TLS handshake");
    assert_eq!(
        server_stats.connections_opened, 1,
        "one accepted connection"
    );
    assert_eq!(server_stats.streams_open, 2);

    // Another source workload is another identity: its own connection.
    let mut c = client
        .connect(&id(other_client), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    assert_eq!(exchange(&mut c, b"third").await, b"third");
    assert_ne!(c.connection_id(), a.connection_id());
    assert_eq!(server.tunnel.stats().snapshot().connections_opened, 2);
    assert_eq!(server.seen()[2].peer, id(other_client));
    assert_eq!(client.stats().snapshot().connections_open, 2);
}

#[tokio::test]
async fn the_stream_limit_opens_another_connection() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let config = TunnelConfig {
        max_streams_per_connection: 2,
        ..TunnelConfig::default()
    };
    let server = Server::start(ids.clone(), &bundle, config.clone()).await;
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids, bundle, config).unwrap();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = client
            .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
            .await
            .unwrap();
        assert_eq!(exchange(&mut s, b"x").await, b"x");
        streams.push(s);
    }
    assert_eq!(streams[0].connection_id(), streams[1].connection_id());
    assert_ne!(streams[1].connection_id(), streams[2].connection_id());
    assert_eq!(server.tunnel.stats().snapshot().connections_opened, 2);

    // A freed slot is reused rather than a third connection opened.
    streams.remove(0);
    let mut s = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    assert_eq!(exchange(&mut s, b"y").await, b"y");
    assert_eq!(client.stats().snapshot().connections_opened, 2);
}

#[tokio::test]
async fn the_handler_sees_the_client_identity_and_its_refusal_reaches_the_client() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT, DENIED]).await;
    let server = Server::start(ids.clone(), &bundle, TunnelConfig::default()).await;
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids.clone(), bundle, TunnelConfig::default()).unwrap();

    let err = client
        .connect(&id(DENIED), &id(SERVER), server.addr, backend)
        .await
        .unwrap_err();
    match &err {
        TunnelError::Refused { status, reason } => {
            assert_eq!(*status, 403);
            assert_eq!(
                reason,
                &format!("policy: {DENIED} may not reach {backend}"),
                "the handler's reason"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(err.kind(), "refused");
    let seen = server.seen();
    assert_eq!(seen[0].peer, id(DENIED));
    assert_eq!(
        seen[0].peer_serial,
        ids.current(&id(DENIED)).unwrap().serial(),
        "the handler knows which certificate the client presented"
    );
    assert_eq!(client.stats().snapshot().streams_refused, 1);
    assert_eq!(server.tunnel.stats().snapshot().streams_refused, 1);

    // The refusal ended one stream, not the connection: the allowed identity's stream on its
    // own connection works, and the denied one can try again on the pooled connection.
    let mut ok = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    assert_eq!(exchange(&mut ok, b"hello").await, b"hello");
    let again = client
        .connect(&id(DENIED), &id(SERVER), server.addr, backend)
        .await;
    assert!(matches!(
        again,
        Err(TunnelError::Refused { status: 403, .. })
    ));
    assert_eq!(server.tunnel.stats().snapshot().connections_opened, 2);

    // A destination the server cannot reach: the handler's 503 with its reason.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let err = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, nowhere)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TunnelError::Refused { status: 503, reason } if reason.starts_with(&format!("cannot connect to {nowhere}"))),
        "{err:?}"
    );
}

/// The node holds only `payments`; a client that wants `catalog` there gets no certificate.
/// A server that presents `payments` whatever it is asked (an impostor, or a node with a
/// fixed identity) is refused by the client, naming both identities.
#[tokio::test]
async fn a_server_without_the_expected_identity_fails_the_handshake() {
    let payments = "spiffe://cluster.local/ns/shop/sa/payments";
    let (ids, bundle) = identities(file_ca(), &[payments, CLIENT]).await;
    let server = Server::start(ids.clone(), &bundle, TunnelConfig::default()).await;
    let client = TunnelClient::new(ids.clone(), bundle.clone(), TunnelConfig::default()).unwrap();
    let backend = echo_backend().await;

    let err = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap_err();
    match &err {
        TunnelError::Handshake { failure, .. } => {
            assert_eq!(*failure, HandshakeFailure::NoCertificate)
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "TLS handshake with tunnel peer {} for {SERVER} (as {CLIENT}) failed (no_certificate): \
             the peer holds no certificate for the identity asked for (alert access_denied)",
            server.addr
        )
    );
    let stats = server.tunnel.stats().clone();
    eventually("the server to count the failure", || {
        stats
            .snapshot()
            .handshakes_failed(HandshakeFailure::NoCertificate)
            == 1
    })
    .await;
    assert_eq!(stats.snapshot().handshakes_ok, 0);
    assert!(server.seen().is_empty());

    // The impostor: a plain TLS server presenting `payments` for any SNI.
    let impostor_config = server_config(&ids, id(payments), &bundle).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(impostor_config);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let err = client
        .connect(&id(CLIENT), &id(SERVER), impostor, backend)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            TunnelError::Handshake {
                failure: HandshakeFailure::WrongIdentity,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "TLS handshake with tunnel peer {impostor} for {SERVER} (as {CLIENT}) failed \
             (wrong_identity): the server presented {payments}, expected {SERVER}"
        )
    );
    let client_stats = client.stats().snapshot();
    assert_eq!(
        client_stats.handshakes_failed(HandshakeFailure::WrongIdentity),
        1
    );
    assert_eq!(
        client_stats.handshakes_failed(HandshakeFailure::NoCertificate),
        1
    );
    assert_eq!(client_stats.connections_opened, 0);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let (ids, bundle) = identities(file_ca(), &[SERVER]).await;
    let server = Server::start(ids, &bundle, TunnelConfig::default()).await;
    let backend = echo_backend().await;

    // The rogue client has a certificate for a real identity from another CA, and trusts our
    // CA, so only the server's check can stop it.
    let (rogue_ids, _) = identities(file_ca(), &[CLIENT]).await;
    let rogue = TunnelClient::new(rogue_ids, bundle, TunnelConfig::default()).unwrap();
    let err = rogue
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap_err();
    // TLS 1.3: the client finishes first and learns of the refusal from the server's alert.
    assert!(
        matches!(
            &err,
            TunnelError::Handshake {
                failure: HandshakeFailure::BadCertificate,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("the peer refused our certificate"),
        "{err}"
    );
    let stats = server.tunnel.stats().clone();
    eventually("the server to count the failure", || {
        stats
            .snapshot()
            .handshakes_failed(HandshakeFailure::BadCertificate)
            == 1
    })
    .await;
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.handshakes_ok, 0);
    assert_eq!(snapshot.connections_opened, 0);
    assert!(server.seen().is_empty(), "no CONNECT reached the handler");
}

/// Certificates renewed while a stream is open: the stream keeps carrying bytes; the next
/// connection (after the idle one closed) presents the new certificates on both sides.
#[tokio::test]
async fn rotation_keeps_open_streams_and_new_connections_use_new_certificates() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let config = TunnelConfig {
        idle_timeout: Duration::from_millis(300),
        ..TunnelConfig::default()
    };
    let server = Server::start(ids.clone(), &bundle, config.clone()).await;
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids.clone(), bundle, config).unwrap();

    let old_server = ids.current(&id(SERVER)).unwrap();
    let old_client = ids.current(&id(CLIENT)).unwrap();
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    assert_eq!(stream.server_serial(), old_server.serial());
    assert_eq!(server.seen()[0].peer_serial, old_client.serial());
    let before = payload(64 * 1024, 1);
    assert!(exchange(&mut stream, &before).await == before);

    assert!(ids.rotate_now(&id(SERVER)));
    assert!(ids.rotate_now(&id(CLIENT)));
    eventually("both certificates to be renewed", || {
        ids.current(&id(SERVER)).unwrap().serial() != old_server.serial()
            && ids.current(&id(CLIENT)).unwrap().serial() != old_client.serial()
    })
    .await;
    let new_server = ids.current(&id(SERVER)).unwrap();
    let new_client = ids.current(&id(CLIENT)).unwrap();

    // The stream opened before the rotation still works both ways.
    let after = payload(256 * 1024, 2);
    assert!(exchange(&mut stream, &after).await == after);
    let first_connection = stream.connection_id();
    drop(stream);

    // Once idle for 300 ms the pooled connection closes; the next connect handshakes afresh.
    let stats = client.stats().clone();
    eventually("the idle connection to close", || {
        stats.snapshot().connections_open == 0
    })
    .await;
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    assert_ne!(stream.connection_id(), first_connection);
    assert_eq!(stream.server_serial(), new_server.serial());
    assert_ne!(new_server.serial(), old_server.serial());
    assert_eq!(server.seen()[1].peer_serial, new_client.serial());
    assert!(exchange(&mut stream, b"fresh").await == b"fresh");
    assert_eq!(client.stats().snapshot().connections_opened, 2);
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_server_is_replaced_transparently() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut server = Server::start_on(listener, ids.clone(), &bundle, TunnelConfig::default());
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids.clone(), bundle.clone(), TunnelConfig::default()).unwrap();

    for round in 0..3 {
        let mut stream = client
            .connect(&id(CLIENT), &id(SERVER), addr, backend)
            .await
            .unwrap();
        assert_eq!(
            exchange(&mut stream, b"ping").await,
            b"ping",
            "round {round}"
        );
    }
    assert_eq!(client.stats().snapshot().connections_opened, 1);

    // The node restarts its server: every connection it had is closed.
    server.task.abort();
    let _ = (&mut server.task).await;
    drop(server);
    let listener = TcpListener::bind(addr).await.unwrap();
    let restarted = Server::start_on(listener, ids, &bundle, TunnelConfig::default());

    // Connect right away, before or after the client noticed: the pool drops the dead
    // connection (or the failed CONNECT on it is retried) and a new one carries the stream.
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), addr, backend)
        .await
        .unwrap();
    assert_eq!(exchange(&mut stream, b"again").await, b"again");
    assert_eq!(client.stats().snapshot().connections_opened, 2);
    assert_eq!(restarted.tunnel.stats().snapshot().connections_opened, 1);
}

/// A raw HTTP/2 client (with a valid certificate) sending what a tunnel client would not.
#[tokio::test]
async fn a_request_other_than_connect_gets_405_and_the_connection_keeps_serving() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let server = Server::start(ids.clone(), &bundle, TunnelConfig::default()).await;
    let backend = echo_backend().await;

    let config = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name(&id(SERVER)).unwrap(), tcp)
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();

    let mut request = |method: Method, uri: &str| {
        let request = Request::builder().method(method).uri(uri).body(()).unwrap();
        send.send_request(request, true).unwrap().0
    };
    let get = request(Method::GET, "https://catalog.shop/").await.unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        get.headers()[REFUSAL_REASON_HEADER],
        "only CONNECT is served here, not GET"
    );
    let by_name = request(Method::CONNECT, "catalog.shop:8080").await.unwrap();
    assert_eq!(by_name.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        by_name.headers()[REFUSAL_REASON_HEADER],
        "the CONNECT authority \"catalog.shop:8080\" is not ip:port"
    );

    // The same connection still tunnels.
    let connect = Request::builder()
        .method(Method::CONNECT)
        .uri(backend.to_string())
        .body(())
        .unwrap();
    let (response, mut body_out) = send.send_request(connect, false).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    body_out
        .send_data(Bytes::from_static(b"through"), true)
        .unwrap();
    let mut body_in = response.into_body();
    let mut echoed = Vec::new();
    while let Some(chunk) = body_in.data().await {
        let chunk = chunk.unwrap();
        body_in
            .flow_control()
            .release_capacity(chunk.len())
            .unwrap();
        echoed.extend_from_slice(&chunk);
    }
    assert_eq!(echoed, b"through");

    let stats = server.tunnel.stats().snapshot();
    assert_eq!(stats.requests_invalid, 2);
    assert_eq!(stats.streams_opened, 1);
    assert_eq!(stats.connections_opened, 1);
    assert_eq!(
        server.seen().len(),
        1,
        "only the CONNECT reached the handler"
    );
}

/// The destination half-closes first (it greets and stops writing) while the client still
/// sends; then a destination that resets: the client sees the reset, not a clean end.
#[tokio::test]
async fn half_close_from_the_destination_and_resets_cross_the_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let server = Server::start(ids.clone(), &bundle, TunnelConfig::default()).await;
    let client = TunnelClient::new(ids, bundle, TunnelConfig::default()).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let greeter = listener.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"hello").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        tcp.read_to_end(&mut got).await.unwrap();
        got_tx.send(got).unwrap();
    });
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, greeter)
        .await
        .unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello", "greeting, then EOF");
    // Our direction is still open after the destination's half-close.
    let data = payload(100 * 1024, 3);
    stream.write_all(&data).await.unwrap();
    stream.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), got_rx)
        .await
        .unwrap()
        .unwrap();
    assert!(got == data, "the destination got {} bytes", got.len());

    // A destination that resets its connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resetter = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4];
        tcp.read_exact(&mut buf).await.unwrap();
        tcp.set_zero_linger().unwrap();
        drop(tcp);
    });
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, resetter)
        .await
        .unwrap();
    stream.write_all(b"boom").await.unwrap();
    let mut buf = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(
        err.to_string(),
        "tunnel stream reset by the peer: stream no longer needed"
    );
}

/// An agent handing over to its successor: both hold the same listening socket; the old server
/// is told to stop, sends GOAWAY, finishes the stream in progress and returns, while new
/// streams reach the successor.
#[tokio::test]
async fn a_server_told_to_stop_finishes_its_streams_and_the_successor_takes_new_ones() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let successor_socket = std_listener.try_clone().unwrap();
    let old = mesh_tunnel::TunnelServer::new(
        ids.clone(),
        &bundle,
        TunnelConfig::default(),
        common::recording_handler(common::Seen::default()),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let serving = old.clone();
    let old_task = tokio::spawn(async move {
        serving
            .serve_until(TcpListener::from_std(std_listener).unwrap(), stopped)
            .await
    });
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids.clone(), bundle.clone(), TunnelConfig::default()).unwrap();
    let mut in_progress = client
        .connect(&id(CLIENT), &id(SERVER), addr, backend)
        .await
        .unwrap();
    assert_eq!(exchange(&mut in_progress, b"before").await, b"before");

    let successor = Server::start_on(
        TcpListener::from_std(successor_socket).unwrap(),
        ids,
        &bundle,
        TunnelConfig::default(),
    );
    stop.send(true).unwrap();
    // The old server's connection got GOAWAY: the stream in progress goes on.
    assert_eq!(exchange(&mut in_progress, b"during").await, b"during");
    // A new stream cannot use that connection; a new one reaches the successor.
    let mut fresh = client
        .connect(&id(CLIENT), &id(SERVER), addr, backend)
        .await
        .unwrap();
    assert_eq!(exchange(&mut fresh, b"after").await, b"after");
    assert_ne!(fresh.connection_id(), in_progress.connection_id());
    assert_eq!(successor.tunnel.stats().snapshot().connections_opened, 1);
    assert_eq!(old.stats().snapshot().connections_opened, 1);
    assert!(!old_task.is_finished(), "a stream is still open on it");

    drop(in_progress);
    tokio::time::timeout(Duration::from_secs(5), old_task)
        .await
        .expect("the old server returns once its last stream ended")
        .unwrap();
}

/// The agent's client side: a captured connection relayed into a tunnel stream with
/// `TunnelStream::relay` (no buffer in between) to a server that delivers with `Decision::Deliver`;
/// 4 MiB (a whole stream window) each way with half-close, byte counts on both ends; then a
/// relay that sees no byte for its idle time ends with `TimedOut`.
#[tokio::test]
async fn relay_carries_a_captured_connection_and_times_out_when_idle() {
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let server = Server::start(ids.clone(), &bundle, TunnelConfig::default()).await;
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids, bundle, TunnelConfig::default()).unwrap();

    // The application's connection, as the agent accepts it.
    let captured = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(captured.local_addr().unwrap())
        .await
        .unwrap();
    let (mut accepted, _) = captured.accept().await.unwrap();
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    let relay = tokio::spawn(async move {
        let moved = stream
            .relay(&mut accepted, Some(Duration::from_secs(10)))
            .await;
        (moved, stream.bytes_written(), stream.bytes_read())
    });
    let data = payload(4 * MIB, 11);
    let back = round_trip(app, &data).await;
    assert!(back == data, "{} bytes came back", back.len());
    let (moved, written, read) = relay.await.unwrap();
    assert_eq!(moved.unwrap(), (4 * MIB as u64, 4 * MIB as u64));
    assert_eq!((written, read), (4 * MIB as u64, 4 * MIB as u64));
    let stats = server.tunnel.stats().clone();
    eventually("the server stream to end", || {
        stats.snapshot().streams_open == 0
    })
    .await;
    assert_eq!(stats.snapshot().bytes_received, 4 * MIB as u64);

    // Nothing moves: the relay gives up after its idle time (and not much later).
    let app = TcpStream::connect(captured.local_addr().unwrap())
        .await
        .unwrap();
    let (mut accepted, _) = captured.accept().await.unwrap();
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), server.addr, backend)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = stream
        .relay(&mut accepted, Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(app);
}

/// A handler that answers with another stream than a socket (`Decision::Accept`, the agent's
/// HTTP check): the server copies through it both ways, with half-close.
#[tokio::test]
async fn an_accepted_stream_other_than_a_socket_is_relayed_both_ways() {
    use mesh_tunnel::{Decision, Inbound, TunnelServer};
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An in-memory echo: what the tunnel writes into `near` comes back out of it.
    let handler = |_: Inbound| async {
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut read, mut write) = tokio::io::split(far);
            if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                use tokio::io::AsyncWriteExt;
                let _ = write.shutdown().await;
            }
        });
        Decision::Accept(near)
    };
    let tunnel = TunnelServer::new(ids.clone(), &bundle, TunnelConfig::default(), handler).unwrap();
    let serving = tokio::spawn(async move { tunnel.serve(listener).await });
    let client = TunnelClient::new(ids, bundle, TunnelConfig::default()).unwrap();
    let stream = client
        .connect(
            &id(CLIENT),
            &id(SERVER),
            addr,
            "127.0.0.1:9".parse().unwrap(),
        )
        .await
        .unwrap();
    let data = payload(MIB, 5);
    let back = round_trip(stream, &data).await;
    assert!(back == data, "{} bytes came back", back.len());
    serving.abort();
}

/// A TCP relay in front of a server whose connections can be frozen: they stay open but move
/// no more bytes, as with a peer agent that hangs. Connections accepted later relay normally.
struct FreezableProxy {
    addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>>,
}

impl FreezableProxy {
    async fn start(to: std::net::SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let all = frozen.clone();
        tokio::spawn(async move {
            loop {
                let (inbound, _) = listener.accept().await.unwrap();
                let outbound = TcpStream::connect(to).await.unwrap();
                let flag = Arc::new(AtomicBool::new(false));
                all.lock().unwrap().push(flag.clone());
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                for (mut from, mut to, flag) in [
                    (
                        Box::new(ir) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(ow) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        flag.clone(),
                    ),
                    (Box::new(or), Box::new(iw), flag),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if flag.load(Ordering::SeqCst) {
                                // Hold both sockets open and never answer.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown().await;
                    });
                }
            }
        });
        FreezableProxy { addr, frozen }
    }

    /// Freezes every connection accepted so far.
    fn freeze(&self) {
        for flag in self.frozen.lock().unwrap().iter() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Keepalive: PINGs answered keep an idle pooled connection; once the peer hangs (its
/// connection frozen), both ends close the connection within interval + timeout, counting it,
/// the stream on it fails instead of hanging, and the next stream to the same peer opens a new
/// connection.
#[tokio::test]
async fn an_unanswered_keepalive_ping_closes_the_connection_on_both_ends() {
    use tokio::io::AsyncReadExt;
    let config = TunnelConfig {
        keepalive_interval: Duration::from_millis(100),
        // Long enough that a loaded test machine answers in time.
        keepalive_timeout: Duration::from_secs(1),
        ..TunnelConfig::default()
    };
    let (ids, bundle) = identities(file_ca(), &[SERVER, CLIENT]).await;
    let server = Server::start(ids.clone(), &bundle, config.clone()).await;
    let proxy = FreezableProxy::start(server.addr).await;
    let backend = echo_backend().await;
    let client = TunnelClient::new(ids, bundle, config).unwrap();

    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), proxy.addr, backend)
        .await
        .unwrap();
    let data = payload(1024, 9);
    assert!(exchange(&mut stream, &data).await == data);
    // Several PING rounds on a healthy connection close nothing.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (c, s) = (client.stats().clone(), server.tunnel.stats().clone());
    assert_eq!(c.snapshot().keepalive_failures, 0);
    assert_eq!(s.snapshot().keepalive_failures, 0);
    assert_eq!(c.snapshot().connections_open, 1);
    assert!(exchange(&mut stream, &data).await == data);

    proxy.freeze();
    let frozen_at = std::time::Instant::now();
    eventually("both ends to give the connection up", || {
        c.snapshot().keepalive_failures == 1
            && c.snapshot().connections_open == 0
            && s.snapshot().keepalive_failures == 1
            && s.snapshot().connections_open == 0
    })
    .await;
    assert!(
        frozen_at.elapsed() < Duration::from_secs(5),
        "took {:?}",
        frozen_at.elapsed()
    );
    // The stream on it ends with an error rather than waiting for bytes that never come.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the stream on the dead connection still hangs");
    assert!(read.is_err(), "{read:?}");

    // The next stream to the same peer gets a new connection, which works.
    let mut stream = client
        .connect(&id(CLIENT), &id(SERVER), proxy.addr, backend)
        .await
        .unwrap();
    assert!(exchange(&mut stream, &data).await == data);
    assert_eq!(c.snapshot().connections_opened, 2);
}
