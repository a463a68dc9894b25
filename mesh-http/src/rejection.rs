//! Why a client's HTTP/1 request was refused before it reached a route: each reason is a metric
//! label (`mesh_http_rejected_requests_total{reason}`) and a log field, so the set is closed and
//! every member has a stable snake_case label.

/// One reason for refusing an HTTP/1 request with `400 Bad Request` (RFC 9112). The first group
/// is found in a request head, the second in a chunked request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// A CR not followed by LF in a head.
    BareCr,
    /// A LF not preceded by CR in a head.
    BareLf,
    /// A field line starting with whitespace (obs-fold, RFC 9112 section 5.2).
    ObsFold,
    /// A field line without a colon.
    HeaderWithoutColon,
    /// A field name that is not a token (including whitespace before the colon).
    InvalidHeaderName,
    /// A control character in a field value.
    InvalidHeaderValue,
    /// More than one Content-Length field (or a list of values).
    DuplicateContentLength,
    /// A Content-Length that is not a decimal number.
    InvalidContentLength,
    /// More than one Transfer-Encoding field.
    DuplicateTransferEncoding,
    /// A Transfer-Encoding other than a single `chunked`.
    UnsupportedTransferEncoding,
    /// Both Content-Length and Transfer-Encoding (RFC 9112 section 6.3).
    ContentLengthWithTransferEncoding,
    /// An HTTP/1.1 request without a Host field (RFC 9112 section 3.2).
    MissingHost,
    /// More than one Host field.
    DuplicateHost,
    /// A Host value that is not `host [":" port]` as RFC 3986 defines it.
    InvalidHost,
    /// A chunk-size line that does not start with hex digits, or has junk after them.
    InvalidChunkSize,
    /// A chunk size that does not fit 64 bits.
    ChunkSizeOverflow,
    /// A chunk extension that is not `;name[=token|"quoted"]`, or chunk extensions beyond
    /// 8 KiB in one body.
    InvalidChunkExtension,
    /// A bare CR or LF in a chunk-size line, extension or trailer line.
    BareLineEndInChunk,
    /// Chunk data not followed by CRLF (the data is longer than its size said).
    ChunkDataWithoutCrlf,
    /// A chunk-size line longer than the head limit.
    ChunkLineTooLong,
    /// A trailer field line that is not a valid field line, or too many or too large trailers.
    InvalidTrailer,
}

impl Rejection {
    /// Every reason, in label order of the metric.
    pub const ALL: [Rejection; 21] = [
        Rejection::BareCr,
        Rejection::BareLf,
        Rejection::ObsFold,
        Rejection::HeaderWithoutColon,
        Rejection::InvalidHeaderName,
        Rejection::InvalidHeaderValue,
        Rejection::DuplicateContentLength,
        Rejection::InvalidContentLength,
        Rejection::DuplicateTransferEncoding,
        Rejection::UnsupportedTransferEncoding,
        Rejection::ContentLengthWithTransferEncoding,
        Rejection::MissingHost,
        Rejection::DuplicateHost,
        Rejection::InvalidHost,
        Rejection::InvalidChunkSize,
        Rejection::ChunkSizeOverflow,
        Rejection::InvalidChunkExtension,
        Rejection::BareLineEndInChunk,
        Rejection::ChunkDataWithoutCrlf,
        Rejection::ChunkLineTooLong,
        Rejection::InvalidTrailer,
    ];

    /// Position in [`Rejection::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::BareCr => "bare_cr",
            Rejection::BareLf => "bare_lf",
            Rejection::ObsFold => "obs_fold",
            Rejection::HeaderWithoutColon => "header_without_colon",
            Rejection::InvalidHeaderName => "invalid_header_name",
            Rejection::InvalidHeaderValue => "invalid_header_value",
            Rejection::DuplicateContentLength => "duplicate_content_length",
            Rejection::InvalidContentLength => "invalid_content_length",
            Rejection::DuplicateTransferEncoding => "duplicate_transfer_encoding",
            Rejection::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Rejection::ContentLengthWithTransferEncoding => "content_length_with_transfer_encoding",
            Rejection::MissingHost => "missing_host",
            Rejection::DuplicateHost => "duplicate_host",
            Rejection::InvalidHost => "invalid_host",
            Rejection::InvalidChunkSize => "invalid_chunk_size",
            Rejection::ChunkSizeOverflow => "chunk_size_overflow",
            Rejection::InvalidChunkExtension => "invalid_chunk_extension",
            Rejection::BareLineEndInChunk => "bare_line_end_in_chunk",
            Rejection::ChunkDataWithoutCrlf => "chunk_data_without_crlf",
            Rejection::ChunkLineTooLong => "chunk_line_too_long",
            Rejection::InvalidTrailer => "invalid_trailer",
        }
    }

    /// What was wrong, for logs, errors and the 400 body.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::BareCr => "bare CR in request head",
            Rejection::BareLf => "bare LF in request head",
            Rejection::ObsFold => "obsolete line folding",
            Rejection::HeaderWithoutColon => "header line without colon",
            Rejection::InvalidHeaderName => "invalid header name",
            Rejection::InvalidHeaderValue => "control character in header value",
            Rejection::DuplicateContentLength => "duplicate Content-Length",
            Rejection::InvalidContentLength => "invalid Content-Length",
            Rejection::DuplicateTransferEncoding => "duplicate Transfer-Encoding",
            Rejection::UnsupportedTransferEncoding => "Transfer-Encoding other than chunked",
            Rejection::ContentLengthWithTransferEncoding => {
                "both Content-Length and Transfer-Encoding"
            }
            Rejection::MissingHost => "HTTP/1.1 request without Host",
            Rejection::DuplicateHost => "more than one Host field",
            Rejection::InvalidHost => "invalid Host value",
            Rejection::InvalidChunkSize => "invalid chunk size",
            Rejection::ChunkSizeOverflow => "chunk size overflows 64 bits",
            Rejection::InvalidChunkExtension => "invalid chunk extension",
            Rejection::BareLineEndInChunk => "bare CR or LF in chunked framing",
            Rejection::ChunkDataWithoutCrlf => "chunk data not followed by CRLF",
            Rejection::ChunkLineTooLong => "chunk line too long",
            Rejection::InvalidTrailer => "invalid trailer field",
        }
    }

    /// Whether it is found in a chunked body (after the head was accepted and routed) rather
    /// than in a head.
    pub fn in_body(self) -> bool {
        self.index() >= Rejection::InvalidChunkSize.index()
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_unique_snake_case_and_indexes_round_trip() {
        let mut labels: Vec<&str> = Rejection::ALL.iter().map(|r| r.label()).collect();
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert!(
                r.label()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Rejection::ALL.len());
        assert!(!Rejection::InvalidHost.in_body());
        assert!(Rejection::InvalidChunkSize.in_body());
        assert!(Rejection::InvalidTrailer.in_body());
    }
}
