//! [`FileCa`]: a certificate source backed by a CA certificate and private key in PEM files (a
//! mounted Secret in Kubernetes). Whoever holds the key can issue any identity of the trust
//! domain, so the checks at load time are strict and name the file at fault.
//!
//! Also [`RootCaPem::generate`], a self-signed root for tests and the demo.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::cert;
use crate::source::{
    BoxFuture, CertificateRequest, CertificateSource, IssuedCertificate, SourceError, TrustBundle,
    rfc3339,
};
use crate::spiffe::TrustDomain;

/// How far in the past a leaf's notBefore is put, so that a peer whose clock runs a little behind
/// ours does not refuse a certificate that was just issued.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Serial numbers are 16 random bytes: unique without any state shared between nodes holding
/// the same CA (RFC 5280 allows up to 20 octets).
const SERIAL_LEN: usize = 16;

/// The CA files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileCaError {
    /// A file is missing or unreadable.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "CA certificate" or "CA private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{what} {path} is not usable: {reason}")]
    Invalid {
        /// "CA certificate" or "CA private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The certificate is not allowed to sign certificates.
    #[error("CA certificate {path} is not a CA certificate: {reason}")]
    NotCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key is not the one the certificate was issued for.
    #[error("CA private key {key_path} does not match the CA certificate {cert_path}")]
    KeyMismatch {
        /// The certificate file.
        cert_path: PathBuf,
        /// The key file.
        key_path: PathBuf,
    },
    /// The CA certificate is outside its validity window.
    #[error("CA certificate {path} is not valid now: valid from {not_before} to {not_after}")]
    OutsideValidity {
        /// The file.
        path: PathBuf,
        /// notBefore (RFC 3339).
        not_before: String,
        /// notAfter (RFC 3339).
        not_after: String,
    },
}

/// A CA certificate and its private key, issuing workload certificates of one trust domain.
pub struct FileCa {
    trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// The certificates after the leaf in every issued chain (the CA and its issuers but the last).
    chain_tail: Vec<CertificateDer<'static>>,
    /// The trust anchor: the last certificate of the CA file.
    root: CertificateDer<'static>,
    cert_path: PathBuf,
    not_before: SystemTime,
    not_after: SystemTime,
    rng: SystemRandom,
}

impl std::fmt::Debug for FileCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The issuer holds the private key: never print it.
        f.debug_struct("FileCa")
            .field("trust_domain", &self.trust_domain)
            .field("cert_path", &self.cert_path)
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl FileCa {
    /// Loads the CA of `trust_domain` from `cert_path` (PEM: the CA certificate, optionally
    /// followed by its issuers up to the root) and `key_path` (PEM PKCS#8 private key).
    pub fn load(
        trust_domain: TrustDomain,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, FileCaError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| FileCaError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read("CA certificate", cert_path)?;
        let key_pem = read("CA private key", key_path)?;
        Self::from_pem(trust_domain, &cert_pem, cert_path, &key_pem, key_path)
    }

    /// Like [`FileCa::load`] with the PEM text already read; the paths only label errors.
    pub fn from_pem(
        trust_domain: TrustDomain,
        cert_pem: &[u8],
        cert_path: &Path,
        key_pem: &[u8],
        key_path: &Path,
    ) -> Result<Self, FileCaError> {
        let invalid_cert = |reason: String| FileCaError::Invalid {
            what: "CA certificate",
            path: cert_path.to_owned(),
            reason,
        };
        let invalid_key = |reason: String| FileCaError::Invalid {
            what: "CA private key",
            path: key_path.to_owned(),
            reason,
        };

        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid_cert(format!("bad PEM: {e}")))?;
        let (ca_der, root) = match (certs.first(), certs.last()) {
            (Some(first), Some(last)) => (first.clone(), last.clone()),
            _ => return Err(invalid_cert("no CERTIFICATE block found".into())),
        };
        let ca = cert::parse(&ca_der).map_err(|e| invalid_cert(format!("bad certificate: {e}")))?;

        let basic = ca
            .basic_constraints()
            .map_err(|e| invalid_cert(format!("bad basicConstraints: {e}")))?;
        let not_ca = |reason: &str| FileCaError::NotCa {
            path: cert_path.to_owned(),
            reason: reason.to_owned(),
        };
        match basic {
            Some(bc) if bc.value.ca => {}
            Some(_) => return Err(not_ca("basicConstraints has CA:FALSE")),
            None => return Err(not_ca("it has no basicConstraints extension")),
        }
        let key_usage = ca
            .key_usage()
            .map_err(|e| invalid_cert(format!("bad keyUsage: {e}")))?;
        if let Some(ku) = key_usage
            && !ku.value.key_cert_sign()
        {
            return Err(not_ca("its keyUsage lacks keyCertSign"));
        }

        let (not_before, not_after) = cert::validity(&ca);
        let now = SystemTime::now();
        if now < not_before || now > not_after {
            return Err(FileCaError::OutsideValidity {
                path: cert_path.to_owned(),
                not_before: rfc3339(not_before),
                not_after: rfc3339(not_after),
            });
        }

        let key_der = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| invalid_key(format!("no private key found: {e}")))?;
        if let PrivateKeyDer::Sec1(_) | PrivateKeyDer::Pkcs1(_) = key_der {
            return Err(invalid_key(
                "the key is in a legacy format (\"EC PRIVATE KEY\" or \"RSA PRIVATE KEY\"); \
                 convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt`"
                    .into(),
            ));
        }
        let key = KeyPair::try_from(&key_der)
            .map_err(|e| invalid_key(format!("unsupported key: {e}")))?;
        if ca.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(FileCaError::KeyMismatch {
                cert_path: cert_path.to_owned(),
                key_path: key_path.to_owned(),
            });
        }

        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| invalid_cert(format!("cannot sign with it: {e}")))?;
        // Chains sent to peers: the CA and the issuers between it and the root, not the root
        // itself (the peer has it). A single self-signed CA gives an empty tail.
        let chain_tail = if certs.len() > 1 {
            certs[..certs.len() - 1].to_vec()
        } else {
            Vec::new()
        };
        Ok(FileCa {
            trust_domain,
            issuer,
            chain_tail,
            root,
            cert_path: cert_path.to_owned(),
            not_before,
            not_after,
            rng: SystemRandom::new(),
        })
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// When the CA certificate expires: no leaf outlives it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Issues a leaf certificate (synchronously: signing is local and takes microseconds).
    pub fn issue(&self, request: &CertificateRequest) -> Result<IssuedCertificate, SourceError> {
        let id = request.id();
        if id.trust_domain() != &self.trust_domain {
            return Err(SourceError::WrongTrustDomain {
                id: id.clone(),
                ca_domain: self.trust_domain.clone(),
            });
        }
        let bad = |reason: String| SourceError::BadRequest {
            id: id.clone(),
            reason,
        };
        if request.lifetime().is_zero() {
            return Err(bad("the lifetime is zero".into()));
        }
        let csr = CertificateSigningRequestParams::from_der(request.csr()).map_err(|e| {
            bad(format!(
                "the CSR does not parse or its signature is wrong: {e}"
            ))
        })?;
        // The CSR is only trusted for its public key (its signature proves the requester holds
        // the private key); every other field is set here. It must name the same identity,
        // though, so that a CSR-based signer (the Kubernetes CSR API) sees what we certify.
        let wanted = id.to_string();
        let csr_uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri.as_str()),
                _ => None,
            })
            .collect();
        if csr_uris != [wanted.as_str()] {
            return Err(bad(format!(
                "the CSR's URI SANs {csr_uris:?} are not exactly [{wanted:?}]"
            )));
        }

        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(SourceError::CaExpired {
                path: self.cert_path.display().to_string(),
                not_after: rfc3339(self.not_after),
            });
        }
        let not_before = now
            .checked_sub(CLOCK_SKEW_ALLOWANCE)
            .unwrap_or(now)
            .max(self.not_before);
        let wanted_not_after = now
            .checked_add(request.lifetime())
            .unwrap_or(self.not_after);
        let not_after = wanted_not_after.min(self.not_after);
        if not_after < wanted_not_after {
            tracing::warn!(
                %id,
                ca_not_after = %rfc3339(self.not_after),
                "CA expires before the requested lifetime ends: certificate shortened"
            );
        }

        let mut serial = [0u8; SERIAL_LEN];
        self.rng
            .fill(&mut serial)
            .map_err(|_| SourceError::Signing {
                id: id.clone(),
                reason: "the system random generator failed".into(),
            })?;
        // Positive and non-zero, as RFC 5280 requires.
        serial[0] = (serial[0] & 0x7f) | 0x01;

        let mut params = CertificateParams::default();
        // No subject: the identity is the URI SAN alone (rcgen then marks the SAN critical, as
        // RFC 5280 requires for an empty subject).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(wanted.clone().try_into().map_err(|e| {
                bad(format!("the SPIFFE ID is not IA5: {e}"))
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;

        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| SourceError::Signing {
                id: id.clone(),
                reason: e.to_string(),
            })?;
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(leaf.der().clone());
        chain.extend(self.chain_tail.iter().cloned());
        Ok(IssuedCertificate { chain })
    }

    /// The bundle: this CA file's last certificate.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            roots: vec![self.root.clone()],
        }
    }
}

impl CertificateSource for FileCa {
    fn sign<'a>(
        &'a self,
        request: &'a CertificateRequest,
    ) -> BoxFuture<'a, Result<IssuedCertificate, SourceError>> {
        Box::pin(async move { self.issue(request) })
    }

    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, SourceError>> {
        Box::pin(async move { Ok(self.bundle()) })
    }
}

/// A self-signed root CA in PEM, for tests and the demo (production CAs come from the operator).
#[derive(Clone)]
pub struct RootCaPem {
    /// The certificate (`CERTIFICATE`).
    pub cert_pem: String,
    /// The ECDSA P-256 private key (`PRIVATE KEY`, PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for RootCaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCaPem")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl RootCaPem {
    /// A root for `trust_domain`, valid from `not_before` to `not_after`.
    pub fn generate(
        trust_domain: &TrustDomain,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Skiff mesh");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{trust_domain} root CA"));
        // A root that only vouches for its own trust domain says so in a URI SAN (the SPIFFE
        // convention), which also makes the CA easy to recognise with openssl.
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key)?;
        Ok(RootCaPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A root valid from now (less the clock-skew allowance) for `lifetime`.
    pub fn generate_valid_for(
        trust_domain: &TrustDomain,
        lifetime: Duration,
    ) -> Result<Self, rcgen::Error> {
        let now = SystemTime::now();
        Self::generate(trust_domain, now - CLOCK_SKEW_ALLOWANCE, now + lifetime)
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir` and returns their paths.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        std::fs::write(&cert_path, &self.cert_pem)?;
        let mut key = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_path)?;
        key.write_all(self.key_pem.as_bytes())?;
        Ok((cert_path, key_path))
    }
}
