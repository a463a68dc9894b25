//! Helpers shared by the integration tests: temporary directories, CAs, handshakes over
//! loopback TCP.

#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]
#![allow(dead_code)] // Each test file uses a different subset.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_identity::{FileCa, Identities, IdentitiesConfig, RootCaPem, SpiffeId, TrustDomain};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// A directory under the system temp dir, removed on drop (also when the test panics).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mesh-identity-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

pub fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// A fresh root for `domain` and the FileCa loaded from its files (written under `dir`).
pub fn file_ca(domain: &str, dir: &Path) -> (RootCaPem, FileCa) {
    let domain = td(domain);
    let root = RootCaPem::generate_valid_for(&domain, Duration::from_secs(24 * 3600 * 30)).unwrap();
    let (cert, key) = root.write_to(dir).unwrap();
    let ca = FileCa::load(domain, &cert, &key).unwrap();
    (root, ca)
}

pub fn identities(ca: FileCa, config: IdentitiesConfig) -> Identities {
    Identities::new(Arc::new(ca), config).unwrap()
}

pub type Outcome = (
    std::io::Result<server::TlsStream<TcpStream>>,
    std::io::Result<client::TlsStream<TcpStream>>,
);

/// Runs one TLS handshake over loopback TCP and returns both ends' results.
pub async fn handshake(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
) -> Outcome {
    // The verifier checks the SPIFFE ID, not this name: an IP address sends no SNI.
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    handshake_as(server_config, client_config, name).await
}

/// [`handshake`] with the client sending `name` (as SNI when it is a DNS name).
pub async fn handshake_as(
    server_config: Arc<rustls::ServerConfig>,
    client_config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_config);
    let connector = TlsConnector::from(client_config);
    let server = async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await
    };
    let client = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(name, tcp).await
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(server, client)
    });
    outcome.await.expect("handshake timed out")
}
