//! Workload identities for the mesh's mutual TLS: SPIFFE IDs
//! (`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`), the short-lived certificates
//! the node holds for the identities of its pods, and the rustls configurations the node-to-node
//! tunnel uses to authenticate both ends by those identities.
//!
//! - [`SpiffeId`]: parse, validate and print identities.
//! - [`CertificateSource`]: where certificates come from; [`FileCa`] signs with a CA given as PEM
//!   files. External signers (Kubernetes CSR API, SPIFFE Workload API) fit behind the same trait.
//! - [`Identities`]: one locally generated key and certificate per identity, renewed in the
//!   background, read lock-free by handshakes.
//! - [`tls`]: server and client configurations (TLS 1.3, ALPN `h2`) and [`peer_id`].

#![forbid(unsafe_code)]

mod cert;
mod file_ca;
mod identities;
mod source;
mod spiffe;
pub mod tls;

pub use cert::{PeerIdError, spiffe_id as spiffe_id_of_certificate};
pub use file_ca::{CLOCK_SKEW_ALLOWANCE, FileCa, FileCaError, RootCaPem};
pub use identities::{
    ConfigError, Credential, DEFAULT_LIFETIME, DEFAULT_RETRY_INITIAL, DEFAULT_RETRY_MAX,
    DEFAULT_ROTATE_AT, Identities, IdentitiesConfig, IdentityError,
};
pub use source::{
    BoxFuture, CertificateRequest, CertificateSource, IssuedCertificate, SourceError, TrustBundle,
};
pub use spiffe::{Part, SpiffeId, SpiffeIdError, TrustDomain};
pub use tls::peer_id;
