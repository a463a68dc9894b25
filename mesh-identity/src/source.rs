//! Where certificates come from: the [`CertificateSource`] trait, its request and answer types.
//!
//! The node generates each identity's key itself and sends a certificate signing request (PKCS#10),
//! so the private key never leaves the agent's memory whatever the source. The source answers with
//! the certificate chain and, separately, the trust bundle (roots) peers are checked against.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

use crate::spiffe::{SpiffeId, TrustDomain};

/// A boxed future, so that [`CertificateSource`] stays object-safe (`Arc<dyn CertificateSource>`):
/// the agent picks the source from its configuration at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Issues workload certificates and tells which roots to trust.
///
/// Implemented now by [`FileCa`](crate::FileCa) (a CA certificate and key handed to the agent).
/// The shape is chosen so external signers fit without changing callers:
///
/// - **Kubernetes CSR API**: `sign` creates a `certificates.k8s.io/v1` CertificateSigningRequest
///   whose `spec.request` is [`CertificateRequest::csr_pem`], `signerName` the mesh's signer and
///   `expirationSeconds` the requested lifetime, then watches it until `status.certificate` is set
///   (or it is denied or fails: a [`SourceError::Refused`]). `trust_bundle` reads a
///   ClusterTrustBundle (or a ConfigMap) for the signer. The CA key then lives only with the
///   signer, not on the nodes.
/// - **SPIFFE Workload API / SPIRE**: SPIRE's agent hands out X509-SVIDs together with keys it
///   generated, and its bundle. Such a source would answer `sign` by fetching the SVID for the ID
///   (through SPIRE's Delegated Identity API, since the agent asks on behalf of workloads) and
///   would return the key it got in a field added to [`IssuedCertificate`], which
///   [`Identities`](crate::Identities) would then use instead of its own key.
///
/// Both are asynchronous and can fail for a while; [`Identities`](crate::Identities) keeps the
/// current certificate and retries with backoff, so a source only reports errors, it does not
/// retry itself.
pub trait CertificateSource: Send + Sync + 'static {
    /// Issues a certificate for `request.id()` over the public key in the request's CSR, valid
    /// for at most `request.lifetime()`.
    fn sign<'a>(
        &'a self,
        request: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<IssuedCertificate, SourceError>>;

    /// The roots peers' certificates must chain to.
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, SourceError>>;
}

/// A request for a workload certificate.
#[derive(Debug, Clone)]
pub struct CertificateRequest {
    pub(crate) id: SpiffeId,
    pub(crate) csr: CertificateSigningRequestDer<'static>,
    pub(crate) lifetime: Duration,
}

impl CertificateRequest {
    /// A request for `id` with a CSR (PKCS#10 DER, signed by the key it names and carrying `id`
    /// as its URI SAN) and the wanted lifetime.
    pub fn new(
        id: SpiffeId,
        csr: CertificateSigningRequestDer<'static>,
        lifetime: Duration,
    ) -> Self {
        CertificateRequest { id, csr, lifetime }
    }

    /// The identity to certify.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The certificate signing request (DER).
    pub fn csr(&self) -> &CertificateSigningRequestDer<'static> {
        &self.csr
    }

    /// The CSR as PEM (`CERTIFICATE REQUEST`), the form the Kubernetes CSR API takes.
    pub fn csr_pem(&self) -> String {
        pem_encode("CERTIFICATE REQUEST", self.csr.as_ref())
    }

    /// The lifetime asked for; a source may shorten it (never past its own CA's expiry).
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

/// What a source answers: the leaf certificate followed by any intermediates (not the root).
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// Leaf first, then the certificates needed to chain it to a root of the trust bundle.
    pub chain: Vec<CertificateDer<'static>>,
}

/// The roots of one trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    /// The domain these roots vouch for; peers from other domains are refused.
    pub trust_domain: TrustDomain,
    /// Root (or pinned intermediate) certificates, DER.
    pub roots: Vec<CertificateDer<'static>>,
}

/// A source could not issue a certificate or give its bundle.
///
/// Variants are sorted by who is at fault so they can become metric labels: the request
/// (`WrongTrustDomain`, `BadRequest`), the CA's state (`CaExpired`), the signer (`Refused`,
/// `Signing`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The CA only vouches for its own trust domain.
    #[error("cannot issue a certificate for {id}: this CA is for trust domain {ca_domain}")]
    WrongTrustDomain {
        /// The identity asked for.
        id: SpiffeId,
        /// The domain of the CA.
        ca_domain: TrustDomain,
    },
    /// The certificate signing request is unusable.
    #[error("certificate signing request for {id} rejected: {reason}")]
    BadRequest {
        /// The identity asked for.
        id: SpiffeId,
        /// Why.
        reason: String,
    },
    /// The CA certificate is past its notAfter: nothing it signs would be valid.
    #[error("the CA certificate {path} expired at {not_after}; replace it")]
    CaExpired {
        /// Where the CA certificate came from.
        path: String,
        /// Its notAfter (RFC 3339).
        not_after: String,
    },
    /// An external signer refused or failed the request.
    #[error("the signer refused the certificate for {id}: {reason}")]
    Refused {
        /// The identity asked for.
        id: SpiffeId,
        /// The signer's words.
        reason: String,
    },
    /// Building or signing the certificate failed locally.
    #[error("signing the certificate for {id} failed: {reason}")]
    Signing {
        /// The identity asked for.
        id: SpiffeId,
        /// Why.
        reason: String,
    },
}

/// Formats a time as RFC 3339 UTC for error messages and logs.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t}"))
}

/// PEM-encodes one DER object with LF line endings, as openssl writes it.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der.to_vec()), config)
}
