//! Reading the fields this crate cares about out of DER certificates: the SPIFFE ID in the URI
//! SAN, the validity window and the serial number. Peer certificates are untrusted input, so
//! everything here returns errors rather than panicking.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// A peer's certificate does not carry a usable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// The peer sent no certificate (the handshake did not ask for one, or has not finished).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The certificate is not valid DER X.509.
    #[error("the peer certificate does not parse: {0}")]
    Malformed(String),
    /// X509-SVIDs carry their SPIFFE ID as a URI SAN, and this one has none.
    #[error("the peer certificate has no URI subject alternative name (no SPIFFE ID)")]
    NoUriSan,
    /// The SPIFFE X509-SVID format allows exactly one URI SAN; several make the identity ambiguous.
    #[error(
        "the peer certificate has {0} URI subject alternative names; a SPIFFE certificate has exactly one"
    )]
    SeveralUriSans(usize),
    /// The URI SAN is not a SPIFFE ID of the form this mesh issues.
    #[error("the peer certificate's URI SAN is not a workload SPIFFE ID: {0}")]
    Invalid(#[from] SpiffeIdError),
}

/// The SPIFFE ID in `cert`'s single URI SAN.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerIdError> {
    let parsed = parse(cert).map_err(PeerIdError::Malformed)?;
    spiffe_id_of_parsed(&parsed)
}

pub(crate) fn spiffe_id_of_parsed(cert: &X509Certificate<'_>) -> Result<SpiffeId, PeerIdError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PeerIdError::Malformed(format!("subject alternative name: {e}")))?
        .ok_or(PeerIdError::NoUriSan)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(PeerIdError::NoUriSan)?;
    let more = uris.count();
    if more > 0 {
        return Err(PeerIdError::SeveralUriSans(more + 1));
    }
    Ok(first.parse()?)
}

/// Parses a whole DER certificate, refusing trailing bytes.
pub(crate) fn parse<'a>(der: &'a [u8]) -> Result<X509Certificate<'a>, String> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(format!("{} bytes after the certificate", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// The validity window of a certificate.
pub(crate) fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let v = cert.validity();
    (
        from_unix(v.not_before.timestamp()),
        from_unix(v.not_after.timestamp()),
    )
}

fn from_unix(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        // Before 1970: irrelevant to anything this crate issues or checks; clamp.
        Err(_) => UNIX_EPOCH,
    }
}

/// The serial number as lowercase hex, the way `openssl x509 -serial` prints it (without colons).
pub(crate) fn serial_hex(cert: &X509Certificate<'_>) -> String {
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
