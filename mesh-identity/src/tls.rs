//! rustls configurations for the node-to-node tunnel: TLS 1.3 only, ALPN `h2`, both sides
//! authenticated by SPIFFE certificates chaining to the trust bundle.
//!
//! Peers are named by SPIFFE ID, not by host name: the client checks that the server's
//! certificate carries the identity it expects (the destination workload's); the `ServerName` it
//! connects with only selects the certificate. The server requires a client certificate from the
//! same trust domain and leaves the client's identity to [`peer_id`] for authorization.
//!
//! A node's tunnel server answers for every workload on the node, and presents the certificate
//! of the one the client wants to reach (as ztunnel does): the client names that workload in the
//! SNI with [`server_name`], and [`server_config_by_sni`] resolves it back with
//! [`id_from_server_name`]. The encoding is `<serviceaccount>.<namespace>.<trust-domain>`: the
//! server knows its trust domain and strips it, the namespace is the last label left (a
//! namespace is a DNS label, without dots) and everything before it is the service account
//! (a DNS subdomain, which may have dots). So the name is reversible, and it is a valid DNS name
//! whenever it fits in 253 characters; longer identities cannot be tunneled and get
//! [`SniError::TooLong`]. [`server_config`] presents one fixed identity whatever the SNI.
//!
//! Both sides pick their certificate from [`Identities`] at each handshake, so rotations apply to
//! new connections without rebuilding a configuration.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::cert::{self, PeerIdError};
use crate::identities::Identities;
use crate::source::TrustBundle;
use crate::spiffe::{SpiffeId, TrustDomain};

/// The only application protocol of the tunnel: HTTP/2 (CONNECT streams).
pub const ALPN_H2: &[u8] = b"h2";

/// DNS names, and so TLS server names, are at most 253 characters.
const MAX_SERVER_NAME_LEN: usize = 253;

/// A tunnel TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The bundle holds no root.
    #[error("the trust bundle of {0} has no root certificate")]
    NoRoots(TrustDomain),
    /// A root certificate of the bundle is unusable as a trust anchor.
    #[error("a root certificate of the trust bundle of {trust_domain} is unusable: {reason}")]
    BadRoot {
        /// The bundle's domain.
        trust_domain: TrustDomain,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("rustls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A SPIFFE ID could not be carried in, or read back from, a TLS server name (SNI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// The encoded name is longer than a DNS name may be.
    #[error(
        "{id} does not fit in a TLS server name: \"{name}\" is {len} characters, at most {max} are allowed"
    )]
    TooLong {
        /// The identity.
        id: SpiffeId,
        /// The encoded name.
        name: String,
        /// Its length.
        len: usize,
        /// The DNS limit.
        max: usize,
    },
    /// The client sent no SNI (it connected by IP address), so no workload is named.
    #[error("the client sent no server name (SNI), so it names no workload")]
    Absent,
    /// The name does not end in the server's trust domain.
    #[error("server name \"{name}\" is not in trust domain {trust_domain}")]
    OtherTrustDomain {
        /// The SNI as sent.
        name: String,
        /// The server's domain.
        trust_domain: TrustDomain,
    },
    /// The name is not `<serviceaccount>.<namespace>.<trust-domain>` with valid parts.
    #[error("server name \"{name}\" does not name a workload: {reason}")]
    Invalid {
        /// The SNI as sent.
        name: String,
        /// Why.
        reason: String,
    },
}

/// The identity check failed after the chain was verified; carried in rustls'
/// `CertificateError::Other` so the handshake error names the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityMismatch {
    /// The certificate has no usable SPIFFE ID.
    #[error(transparent)]
    NoId(#[from] PeerIdError),
    /// The server is not the workload the client meant to reach.
    #[error("the server presented {got}, expected {expected}")]
    WrongServer {
        /// Who the client wanted.
        expected: SpiffeId,
        /// Who answered.
        got: SpiffeId,
    },
    /// The peer's identity belongs to a trust domain other than ours (a different root that
    /// happens to be trusted must not vouch for our domain's names, nor we for its).
    #[error("the peer {got} is not in trust domain {expected}")]
    WrongTrustDomain {
        /// Our domain.
        expected: TrustDomain,
        /// The peer's identity.
        got: SpiffeId,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(bundle: &TrustBundle) -> Result<Arc<RootCertStore>, TlsError> {
    if bundle.roots.is_empty() {
        return Err(TlsError::NoRoots(bundle.trust_domain.clone()));
    }
    let mut roots = RootCertStore::empty();
    for root in &bundle.roots {
        roots.add(root.clone()).map_err(|e| TlsError::BadRoot {
            trust_domain: bundle.trust_domain.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn mismatch(e: IdentityMismatch) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The tunnel server's configuration: presents `local`'s current certificate, requires a client
/// certificate chaining to `bundle` with a SPIFFE ID of the bundle's trust domain.
pub fn server_config(
    identities: &Identities,
    local: SpiffeId,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(
        bundle,
        Arc::new(Resolver {
            identities: identities.clone(),
            id: local,
        }),
    )
}

fn build_server_config(
    bundle: &TrustBundle,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(root_store(bundle)?, provider.clone())
        .build()
        .map_err(|e| TlsError::BadRoot {
            trust_domain: bundle.trust_domain.clone(),
            reason: e.to_string(),
        })?;
    let verifier = Arc::new(SpiffeClientVerifier {
        webpki,
        trust_domain: bundle.trust_domain.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every tunnel handshake authenticates both sides with their current
    // certificates, so a renewal or a removed identity shows at the next connection, and a
    // client's identity is never restored from a ticket. Tunnels are pooled and long-lived, so
    // full handshakes are rare.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The tunnel server's configuration for a node serving many workloads: presents the current
/// certificate of the identity the client names in its SNI (see [`server_name`]), and fails the
/// handshake when the SNI is absent, malformed, of another trust domain or names an identity not
/// held in `identities`. Client certificates are checked as by [`server_config`].
pub fn server_config_by_sni(
    identities: &Identities,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(
        bundle,
        Arc::new(SniResolver {
            identities: identities.clone(),
            trust_domain: bundle.trust_domain.clone(),
        }),
    )
}

/// The TLS server name a tunnel client sends to be served `id`'s certificate:
/// `<serviceaccount>.<namespace>.<trust-domain>` (see the module documentation).
pub fn server_name(id: &SpiffeId) -> Result<ServerName<'static>, SniError> {
    let name = format!(
        "{}.{}.{}",
        id.service_account(),
        id.namespace(),
        id.trust_domain()
    );
    let too_long = |name: String| SniError::TooLong {
        id: id.clone(),
        len: name.len(),
        name,
        max: MAX_SERVER_NAME_LEN,
    };
    if name.len() > MAX_SERVER_NAME_LEN {
        return Err(too_long(name));
    }
    // Every part is a checked DNS name, so this only fails on a length rustls counts differently.
    ServerName::try_from(name.clone()).map_err(|_| too_long(name))
}

/// The identity a server name from [`server_name`] asks for, on a server of `trust_domain`.
pub fn id_from_server_name(
    name: Option<&str>,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, SniError> {
    let name = name.ok_or(SniError::Absent)?;
    let other_domain = || SniError::OtherTrustDomain {
        name: name.to_owned(),
        trust_domain: trust_domain.clone(),
    };
    let workload = name
        .strip_suffix(trust_domain.as_str())
        .and_then(|rest| rest.strip_suffix('.'))
        .ok_or_else(other_domain)?;
    let (service_account, namespace) =
        workload.rsplit_once('.').ok_or_else(|| SniError::Invalid {
            name: name.to_owned(),
            reason: "expected <serviceaccount>.<namespace>.<trust-domain>".to_owned(),
        })?;
    SpiffeId::new(trust_domain.clone(), namespace, service_account).map_err(|e| SniError::Invalid {
        name: name.to_owned(),
        reason: format!("{} {}", e.part, e.reason),
    })
}

/// The tunnel client's configuration for one connection: presents `local`'s current
/// certificate and accepts only a server certificate chaining to `bundle` that carries
/// `expected_server`.
pub fn client_config(
    identities: &Identities,
    local: SpiffeId,
    bundle: &TrustBundle,
    expected_server: SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: root_store(bundle)?,
        expected: expected_server,
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Resolver {
            identities: identities.clone(),
            id: local,
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption, as on the server side.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE ID of the peer of an established connection (client or server side); with
/// tokio-rustls: `peer_id(stream.get_ref().1)`.
pub fn peer_id(connection: &CommonState) -> Result<SpiffeId, PeerIdError> {
    let end_entity = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(PeerIdError::NoCertificate)?;
    cert::spiffe_id(end_entity)
}

/// The serial number (lowercase hex, as `openssl x509 -serial` prints it) of the peer's
/// certificate on an established connection: tells which of an identity's successive
/// certificates a peer presented.
pub fn peer_serial(connection: &CommonState) -> Result<String, PeerIdError> {
    let end_entity = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(PeerIdError::NoCertificate)?;
    let parsed = cert::parse(end_entity).map_err(PeerIdError::Malformed)?;
    Ok(cert::serial_hex(&parsed))
}

/// Hands rustls the current certificate of one identity (looked up at each handshake, so
/// rotations and removals take effect for the next connection).
#[derive(Debug)]
struct Resolver {
    identities: Identities,
    id: SpiffeId,
}

impl Resolver {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let found = self.identities.current(&self.id);
        if found.is_none() {
            tracing::warn!(id = %self.id, "no certificate held for this identity: handshake fails");
        }
        found.map(|credential| credential.certified_key().clone())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Hands rustls the current certificate of the identity named by the client's SNI.
#[derive(Debug)]
struct SniResolver {
    identities: Identities,
    trust_domain: TrustDomain,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = match id_from_server_name(client_hello.server_name(), &self.trust_domain) {
            Ok(id) => id,
            Err(error) => {
                tracing::debug!(%error, "no certificate for this server name: handshake fails");
                return None;
            }
        };
        let found = self.identities.current(&id);
        if found.is_none() {
            tracing::debug!(%id, "no certificate held for the identity in the SNI: handshake fails");
        }
        found.map(|credential| credential.certified_key().clone())
    }
}

/// webpki's client verification (chain to the bundle, clientAuth usage, validity) plus: the
/// certificate names exactly one SPIFFE ID of our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = cert::spiffe_id(end_entity).map_err(|e| mismatch(e.into()))?;
        if id.trust_domain() != &self.trust_domain {
            return Err(mismatch(IdentityMismatch::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                got: id,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Chain to the bundle with serverAuth usage (webpki), then the SPIFFE ID instead of a host name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let got = cert::spiffe_id(end_entity).map_err(|e| mismatch(e.into()))?;
        if got != self.expected {
            return Err(mismatch(IdentityMismatch::WrongServer {
                expected: self.expected.clone(),
                got,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
