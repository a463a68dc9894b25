//! Sorting failed TLS handshakes into [`HandshakeFailure`] kinds, with words for the log and the
//! error: rustls reports identity mismatches as an opaque `CertificateError::Other`, which is
//! unwrapped here so the message names the identities.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use mesh_identity::tls::IdentityMismatch;
use rustls::{AlertDescription, CertificateError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::stats::HandshakeFailure;

/// The kind of a handshake error and a description of it.
pub(crate) fn classify(error: &io::Error) -> (HandshakeFailure, String) {
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        // Not from rustls: the socket failed or closed mid-handshake.
        return (HandshakeFailure::Protocol, error.to_string());
    };
    classify_tls(tls)
}

/// The kind and description of a rustls error.
pub(crate) fn classify_tls(tls: &rustls::Error) -> (HandshakeFailure, String) {
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => match other
            .0
            .downcast_ref::<IdentityMismatch>(
        ) {
            Some(IdentityMismatch::NoId(e)) => (HandshakeFailure::BadCertificate, e.to_string()),
            Some(mismatch) => (HandshakeFailure::WrongIdentity, mismatch.to_string()),
            None => (
                HandshakeFailure::BadCertificate,
                format!("invalid peer certificate: {}", other.0),
            ),
        },
        rustls::Error::InvalidCertificate(_) => (HandshakeFailure::BadCertificate, tls.to_string()),
        rustls::Error::NoCertificatesPresented => (
            HandshakeFailure::NoCertificate,
            "the peer presented no certificate".to_owned(),
        ),
        rustls::Error::AlertReceived(alert) => match alert {
            // Our SNI server sends this when it holds no certificate for the identity asked.
            AlertDescription::AccessDenied => (
                HandshakeFailure::NoCertificate,
                "the peer holds no certificate for the identity asked for (alert access_denied)"
                    .to_owned(),
            ),
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::DecryptError => (
                HandshakeFailure::BadCertificate,
                format!("the peer refused our certificate (alert {alert:?})"),
            ),
            AlertDescription::CertificateRequired => (
                HandshakeFailure::NoCertificate,
                "the peer requires a certificate we did not send".to_owned(),
            ),
            _ => (HandshakeFailure::Protocol, tls.to_string()),
        },
        _ => (HandshakeFailure::Protocol, tls.to_string()),
    }
}

/// The transport of a client connection, remembering the first TLS error a read returned.
///
/// In TLS 1.3 the client finishes its handshake before the server has checked the client's
/// certificate, so a refusal arrives as an alert on the first read, inside HTTP/2; h2 hands the
/// streams a copy of that I/O error without its source, so it is recorded here, below h2, for
/// the error to say what happened.
pub(crate) struct Recorded<S> {
    inner: S,
    error: Arc<OnceLock<rustls::Error>>,
}

impl<S> Recorded<S> {
    pub(crate) fn new(inner: S) -> (Self, Arc<OnceLock<rustls::Error>>) {
        let error = Arc::new(OnceLock::new());
        (
            Recorded {
                inner,
                error: error.clone(),
            },
            error,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let result = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if let Err(e) = &result
            && let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            let _ = self.error.set(tls.clone());
        }
        Poll::Ready(result)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
