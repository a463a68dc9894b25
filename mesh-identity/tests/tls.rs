//! Handshakes between tunnel endpoints over loopback TCP: mutual authentication by SPIFFE ID,
//! refusal of other CAs and of the wrong server identity, rotation under a live connection.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

mod common;

use std::time::Duration;

use common::{TempDir, file_ca, handshake, handshake_as, id, identities, td};
use mesh_identity::tls::{
    ALPN_H2, IdentityMismatch, SniError, client_config, id_from_server_name, peer_serial,
    server_config, server_config_by_sni, server_name,
};
use mesh_identity::{IdentitiesConfig, peer_id};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The identity check's words inside a handshake error (rustls carries them as
/// `CertificateError::Other`).
fn identity_mismatch(err: &std::io::Error) -> String {
    let tls = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err}"));
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => other
            .0
            .downcast_ref::<IdentityMismatch>()
            .unwrap_or_else(|| panic!("not an identity mismatch: {tls}"))
            .to_string(),
        _ => panic!("not an identity mismatch: {tls}"),
    }
}

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
const CLIENT: &str = "spiffe://cluster.local/ns/web/sa/frontend";

#[tokio::test]
async fn same_ca_handshake_authenticates_both_sides() {
    let dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    let bundle = ca.bundle();
    let ids = identities(ca, IdentitiesConfig::default());
    ids.add(id(SERVER)).await.unwrap();
    ids.add(id(CLIENT)).await.unwrap();

    let server = server_config(&ids, id(SERVER), &bundle).unwrap();
    let client = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let (server, client) = handshake(server, client).await;
    let mut server = server.expect("server side of the handshake");
    let mut client = client.expect("client side of the handshake");

    // Each side sees the other's identity.
    assert_eq!(peer_id(server.get_ref().1).unwrap(), id(CLIENT));
    assert_eq!(peer_id(client.get_ref().1).unwrap(), id(SERVER));
    // TLS 1.3 and h2 negotiated.
    assert_eq!(
        client.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(client.get_ref().1.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(server.get_ref().1.alpn_protocol(), Some(ALPN_H2));

    // And bytes flow both ways.
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn server_refuses_a_client_from_another_ca() {
    let dir = TempDir::new();
    let other_dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    // Same trust domain name, different root: only the root decides.
    let (_, rogue_ca) = file_ca("cluster.local", other_dir.path());
    let bundle = ca.bundle();
    let rogue_bundle = rogue_ca.bundle();
    let ids = identities(ca, IdentitiesConfig::default());
    let rogue = identities(rogue_ca, IdentitiesConfig::default());
    ids.add(id(SERVER)).await.unwrap();
    rogue.add(id(CLIENT)).await.unwrap();

    let server = server_config(&ids, id(SERVER), &bundle).unwrap();
    // The rogue client trusts our server's CA, so only the server's check can stop it.
    let client = client_config(&rogue, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let (server, client) = handshake(server, client).await;
    let err = server.expect_err("server must refuse the client certificate");
    // The rogue root copies our root's name, so webpki tries it as the issuer and the
    // signature check fails (a root of another name would give UnknownIssuer).
    assert_eq!(err.to_string(), "invalid peer certificate: BadSignature");
    // In TLS 1.3 the client finishes before the server checks it; the refusal arrives as an
    // alert on its first read.
    if let Ok(mut client) = client {
        let mut buf = [0u8; 1];
        let read = client.read(&mut buf).await;
        assert!(
            matches!(read, Err(_) | Ok(0)),
            "client must not get data: {read:?}"
        );
    }
    drop(rogue_bundle);
}

#[tokio::test]
async fn client_refuses_a_server_from_another_ca() {
    let dir = TempDir::new();
    let other_dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    let (_, rogue_ca) = file_ca("cluster.local", other_dir.path());
    let bundle = ca.bundle();
    let rogue_bundle = rogue_ca.bundle();
    let ids = identities(ca, IdentitiesConfig::default());
    let rogue = identities(rogue_ca, IdentitiesConfig::default());
    ids.add(id(CLIENT)).await.unwrap();
    rogue.add(id(SERVER)).await.unwrap();

    // The rogue server would accept our client (it trusts our root); our client must not.
    let mut rogue_trusting_us = rogue_bundle.clone();
    rogue_trusting_us.roots = bundle.roots.clone();
    let server = server_config(&rogue, id(SERVER), &rogue_trusting_us).unwrap();
    let client = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let (server, client) = handshake(server, client).await;
    let err = client.expect_err("client must refuse the server certificate");
    // Same-named rogue root: the signature does not verify (see the test above).
    assert_eq!(err.to_string(), "invalid peer certificate: BadSignature");
    assert!(server.is_err(), "the server sees the client's alert");
}

#[tokio::test]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    let bundle = ca.bundle();
    let ids = identities(ca, IdentitiesConfig::default());
    let impostor = "spiffe://cluster.local/ns/shop/sa/payments";
    ids.add(id(impostor)).await.unwrap();
    ids.add(id(CLIENT)).await.unwrap();

    // A valid certificate of the same CA, but not the workload the client dialed.
    let server = server_config(&ids, id(impostor), &bundle).unwrap();
    let client = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let (server, client) = handshake(server, client).await;
    let err = client.expect_err("client must refuse the wrong server identity");
    assert_eq!(
        identity_mismatch(&err),
        "the server presented spiffe://cluster.local/ns/shop/sa/payments, \
         expected spiffe://cluster.local/ns/shop/sa/catalog"
    );
    assert!(server.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_of_another_trust_domain_under_a_shared_root() {
    let dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    let bundle = ca.bundle();
    let ids = identities(ca, IdentitiesConfig::default());
    ids.add(id(SERVER)).await.unwrap();

    // A server of trust domain example.org that (wrongly or deliberately) trusts our root must
    // still refuse identities of cluster.local: a root vouches for one domain only.
    let mut foreign = bundle.clone();
    foreign.trust_domain = common::td("example.org");
    ids.add(id(CLIENT)).await.unwrap();
    let server = server_config(&ids, id(SERVER), &foreign).unwrap();
    let client = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let (server, _client) = handshake(server, client).await;
    let err = server.expect_err("client of another trust domain");
    assert_eq!(
        identity_mismatch(&err),
        "the peer spiffe://cluster.local/ns/web/sa/frontend is not in trust domain example.org"
    );
}

/// A certificate renewed during a connection: the old connection keeps carrying bytes, new
/// handshakes present the new certificate.
#[tokio::test]
async fn rotation_keeps_live_connections_and_serves_the_new_certificate() {
    let dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    let bundle = ca.bundle();
    // A 4 s lifetime renewed at half: the real scheduler, on the wall clock.
    let config = IdentitiesConfig {
        lifetime: Duration::from_secs(4),
        ..IdentitiesConfig::default()
    };
    let ids = identities(ca, config);
    ids.add(id(SERVER)).await.unwrap();
    ids.add(id(CLIENT)).await.unwrap();
    let server_config = server_config(&ids, id(SERVER), &bundle).unwrap();
    let client_config = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();

    let before = ids.current(&id(SERVER)).unwrap();
    let (server, client) = handshake(server_config.clone(), client_config.clone()).await;
    let (mut old_server, mut old_client) = (server.unwrap(), client.unwrap());
    let presented = old_client.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert!(presented == before.certified_key().cert[0]);
    // Use the connection before the rotation too (a resumption ticket, if one were sent, would
    // be taken in here and let the next handshake skip the server's certificate).
    old_client.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    old_server.read_exact(&mut buf).await.unwrap();
    old_server.write_all(b"ho").await.unwrap();
    old_client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ho");

    // Wait for the renewal (due after about 2 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = ids.current(&id(SERVER)).unwrap();
        if now.serial() != before.serial() {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after.not_after() > before.not_after());

    // A new handshake presents the new certificate (a different serial).
    let (server, client) = handshake(server_config, client_config).await;
    let (new_server, new_client) = (server.unwrap(), client.unwrap());
    let presented = new_client.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert!(
        presented == after.certified_key().cert[0],
        "the new handshake must present the renewed server certificate"
    );
    assert_ne!(
        before.serial(),
        after.serial(),
        "the renewed certificate has a new serial"
    );
    // The client renewed too, and the server saw its new certificate.
    let client_now = ids.current(&id(CLIENT)).unwrap();
    let client_presented = new_server.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert!(
        client_presented == client_now.certified_key().cert[0],
        "the new handshake must present the renewed client certificate"
    );
    assert_eq!(
        mesh_identity::spiffe_id_of_certificate(&presented).unwrap(),
        id(SERVER)
    );

    // The connection made before the rotation still carries bytes both ways.
    old_client.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    old_server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    old_server.write_all(b"me too").await.unwrap();
    let mut buf = [0u8; 6];
    old_client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"me too");
}

/// A CA file holding an intermediate followed by its root: leaves are sent with the intermediate
/// and verify against the root alone.
#[tokio::test]
async fn an_intermediate_ca_chains_to_its_root() {
    let dir = TempDir::new();
    let domain = common::td("cluster.local");
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root_params = rcgen::CertificateParams::default();
    root_params.distinguished_name = rcgen::DistinguishedName::new();
    root_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "offline root");
    root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    root_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root_params, root_key);

    let intermediate_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cluster intermediate");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let intermediate = params.signed_by(&intermediate_key, &issuer).unwrap();

    let cert_path = dir.path().join("ca.crt");
    let key_path = dir.path().join("ca.key");
    std::fs::write(&cert_path, format!("{}{}", intermediate.pem(), root.pem())).unwrap();
    std::fs::write(&key_path, intermediate_key.serialize_pem()).unwrap();
    let ca = mesh_identity::FileCa::load(domain, &cert_path, &key_path).unwrap();
    let bundle = ca.bundle();
    assert!(
        bundle.roots == vec![root.der().clone()],
        "the bundle is the root only"
    );

    let ids = identities(ca, IdentitiesConfig::default());
    ids.add(id(SERVER)).await.unwrap();
    ids.add(id(CLIENT)).await.unwrap();
    let credential = ids.current(&id(SERVER)).unwrap();
    let chain = &credential.certified_key().cert;
    assert_eq!(chain.len(), 2, "leaf and intermediate");
    assert!(chain[1] == *intermediate.der());

    let server = server_config(&ids, id(SERVER), &bundle).unwrap();
    let client = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let (server, client) = handshake(server, client).await;
    assert_eq!(peer_id(server.unwrap().get_ref().1).unwrap(), id(CLIENT));
    assert_eq!(peer_id(client.unwrap().get_ref().1).unwrap(), id(SERVER));
}

fn dns_name(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_owned(),
        other => panic!("not a DNS name: {other:?}"),
    }
}

#[test]
fn server_names_encode_identities_reversibly() {
    let domain = td("cluster.local");
    let plain = id(SERVER);
    let name = server_name(&plain).unwrap();
    assert_eq!(dns_name(&name), "catalog.shop.cluster.local");
    assert_eq!(
        id_from_server_name(Some("catalog.shop.cluster.local"), &domain).unwrap(),
        plain
    );

    // A ServiceAccount may have dots; the namespace (a label) is what precedes the domain.
    let dotted = id("spiffe://cluster.local/ns/ci/sa/build.bot.v2");
    let name = dns_name(&server_name(&dotted).unwrap());
    assert_eq!(name, "build.bot.v2.ci.cluster.local");
    assert_eq!(id_from_server_name(Some(&name), &domain).unwrap(), dotted);

    let cases = [
        (
            None,
            "the client sent no server name (SNI), so it names no workload",
        ),
        (
            Some("catalog.shop.example.org"),
            "server name \"catalog.shop.example.org\" is not in trust domain cluster.local",
        ),
        (
            // The domain must be whole labels, not a suffix of one.
            Some("catalog.shopcluster.local"),
            "server name \"catalog.shopcluster.local\" is not in trust domain cluster.local",
        ),
        (
            Some("shop.cluster.local"),
            "server name \"shop.cluster.local\" does not name a workload: \
             expected <serviceaccount>.<namespace>.<trust-domain>",
        ),
        (
            Some(".shop.cluster.local"),
            "server name \".shop.cluster.local\" does not name a workload: service account is empty",
        ),
    ];
    for (name, expected) in cases {
        assert_eq!(
            id_from_server_name(name, &domain).unwrap_err().to_string(),
            expected,
            "{name:?}"
        );
    }

    // 63 + 1 + 63 + 1 + 63 + 1 + 63 = 255 characters of service account: valid as a Kubernetes
    // name only up to 253, and the SNI adds the namespace and domain.
    let label = "a".repeat(63);
    let long_sa = format!("{label}.{label}.{label}.{}", "b".repeat(50));
    let long = id(&format!("spiffe://cluster.local/ns/shop/sa/{long_sa}"));
    let err = server_name(&long).unwrap_err();
    assert!(
        matches!(
            err,
            SniError::TooLong {
                len: 261,
                max: 253,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().starts_with(&format!(
        "spiffe://cluster.local/ns/shop/sa/{long_sa} does not fit in a TLS server name"
    )));
}

/// One server configuration for a node with two workloads: each client gets the certificate of
/// the workload it names; an identity the node does not hold, or no SNI at all, gets none.
#[tokio::test]
async fn sni_server_presents_the_named_workload() {
    let dir = TempDir::new();
    let (_, ca) = file_ca("cluster.local", dir.path());
    let bundle = ca.bundle();
    let ids = identities(ca, IdentitiesConfig::default());
    let other_server = "spiffe://cluster.local/ns/shop/sa/payments";
    for held in [SERVER, other_server, CLIENT] {
        ids.add(id(held)).await.unwrap();
    }
    let server = server_config_by_sni(&ids, &bundle).unwrap();

    for wanted in [SERVER, other_server] {
        let client = client_config(&ids, id(CLIENT), &bundle, id(wanted)).unwrap();
        let name = server_name(&id(wanted)).unwrap();
        let (server_end, client_end) = handshake_as(server.clone(), client, name).await;
        let (server_end, client_end) = (server_end.unwrap(), client_end.unwrap());
        assert_eq!(peer_id(client_end.get_ref().1).unwrap(), id(wanted));
        assert_eq!(peer_id(server_end.get_ref().1).unwrap(), id(CLIENT));
        assert_eq!(
            peer_serial(client_end.get_ref().1).unwrap(),
            ids.current(&id(wanted)).unwrap().serial()
        );
        assert_eq!(
            server_end.get_ref().1.server_name(),
            Some(dns_name(&server_name(&id(wanted)).unwrap()).as_str())
        );
    }

    // Not held on this node: the server has no certificate to present and refuses.
    let absent = "spiffe://cluster.local/ns/shop/sa/inventory";
    let client = client_config(&ids, id(CLIENT), &bundle, id(absent)).unwrap();
    let name = server_name(&id(absent)).unwrap();
    let (server_end, client_end) = handshake_as(server.clone(), client, name).await;
    assert_eq!(
        server_end.unwrap_err().to_string(),
        "unexpected error: no server certificate chain resolved"
    );
    assert_eq!(
        client_end.unwrap_err().to_string(),
        "received fatal alert: AccessDenied"
    );

    // By IP address (no SNI): no workload named, no certificate.
    let client = client_config(&ids, id(CLIENT), &bundle, id(SERVER)).unwrap();
    let (server_end, client_end) = handshake(server, client).await;
    assert!(server_end.is_err());
    assert!(client_end.is_err());
}
