//! TLS ClientHello parsing (RFC 8446 section 4.1.2; RFC 5246 for TLS 1.2 clients). The handshake
//! message is reassembled from however many handshake records carry it, then walked with
//! bounds-checked reads to pull out what routing needs: the SNI host name, the ALPN protocols, and
//! whether the client offers TLS 1.3 or Encrypted Client Hello. Cipher suites and unknown
//! extensions (GREASE included) are skipped by length, never interpreted.

use std::borrow::Cow;
use std::fmt;

mod hostname;
mod reader;

use reader::Reader;

/// The largest ClientHello handshake message accepted, 4-byte handshake header included. Real
/// ones are 200 to 2000 bytes; post-quantum key shares stay well under this.
pub const MAX_CLIENT_HELLO_LEN: usize = 16 * 1024;

/// How many record headers a ClientHello may be split over before the input budget runs out.
const MAX_RECORD_HEADERS: usize = 64;

/// The most input bytes [`parse_client_hello`] (and so [`crate::detect`]) looks at: a
/// ClientHello of [`MAX_CLIENT_HELLO_LEN`] plus room for record headers. Records that run past
/// it fail with [`ParseError::TooFragmented`], which bounds what a caller has to buffer even
/// against a client that sends one-byte records.
pub const MAX_INSPECT_LEN: usize = MAX_CLIENT_HELLO_LEN + MAX_RECORD_HEADERS * RECORD_HEADER_LEN;

/// The most ALPN protocol names kept in a [`ClientHelloSummary`]; later ones are checked for
/// well-formedness and dropped.
pub const MAX_ALPN_PROTOCOLS: usize = 16;

pub(crate) const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 section 5.1: a record carries at most 2^14 bytes of plaintext.
const MAX_FRAGMENT_LEN: usize = 1 << 14;
const RANDOM_LEN: usize = 32;
const MAX_SESSION_ID_LEN: usize = 32;

const EXT_SERVER_NAME: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;
const TLS13: u16 = 0x0304;

/// What routing needs from a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloSummary {
    /// The first `host_name` of the server_name extension, lower-cased. `None` when the client
    /// sent none, or sent something that is not a DNS host name (an IP literal, a trailing dot,
    /// characters outside letters, digits and hyphens, over 255 bytes). With ECH this is the
    /// outer, public name.
    pub sni: Option<String>,
    /// The ALPN protocol names in the client's order of preference, at most
    /// [`MAX_ALPN_PROTOCOLS`]; GREASE values and names that are not UTF-8 are left out.
    pub alpn: Vec<String>,
    /// The `legacy_version` field: 0x0303 for TLS 1.2 and 1.3 clients.
    pub legacy_version: u16,
    /// Whether supported_versions lists TLS 1.3.
    pub offers_tls13: bool,
    /// Whether the client sent an encrypted_client_hello extension (0xfe0d), in which case the
    /// real server name is encrypted and `sni` names the client-facing server.
    pub has_ech: bool,
    /// How many bytes of the input the records carrying the ClientHello occupy, record headers
    /// included: where the first record after it would start.
    pub total_len: usize,
}

/// A field of the ClientHello, as named in RFC 8446, for error context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    LegacyVersion,
    Random,
    SessionId,
    CipherSuites,
    CompressionMethods,
    Extensions,
    Extension,
    ServerName,
    Alpn,
    SupportedVersions,
}

impl Field {
    /// The RFC 8446 name, also usable as a metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LegacyVersion => "legacy_version",
            Self::Random => "random",
            Self::SessionId => "legacy_session_id",
            Self::CipherSuites => "cipher_suites",
            Self::CompressionMethods => "legacy_compression_methods",
            Self::Extensions => "extensions",
            Self::Extension => "extension",
            Self::ServerName => "server_name",
            Self::Alpn => "application_layer_protocol_negotiation",
            Self::SupportedVersions => "supported_versions",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes are not (yet) a ClientHello. Apart from [`ParseError::Incomplete`], every variant is
/// final: more bytes cannot fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The bytes so far are a valid beginning; the rest of the ClientHello has not arrived.
    #[error("incomplete ClientHello: more bytes needed")]
    Incomplete,
    /// A record is not a handshake record (alert, application data, not TLS at all).
    #[error("record content type {content_type} is not handshake (22)")]
    NotHandshake { content_type: u8 },
    /// A record's version is not 3.0 to 3.4.
    #[error("record version {major}.{minor} is not TLS")]
    BadRecordVersion { major: u8, minor: u8 },
    /// A handshake record with no content, which RFC 8446 section 5.1 forbids.
    #[error("empty handshake record")]
    EmptyRecord,
    /// A record longer than TLS allows.
    #[error("record of {len} bytes exceeds the TLS maximum of {MAX_FRAGMENT_LEN}")]
    RecordTooLong { len: usize },
    /// The first handshake message is something else, such as a ServerHello.
    #[error("handshake message type {msg_type} is not ClientHello (1)")]
    NotClientHello { msg_type: u8 },
    /// The declared ClientHello length is over [`MAX_CLIENT_HELLO_LEN`].
    #[error("ClientHello of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    /// The records carrying the ClientHello run past [`MAX_INSPECT_LEN`].
    #[error("ClientHello records run past the {limit}-byte inspection limit")]
    TooFragmented { limit: usize },
    /// A length prefix points past the end of the structure that contains it.
    #[error("{field} runs past the end of its enclosing structure")]
    Truncated { field: Field },
    /// A length that the protocol does not allow for this field (odd, zero, too long).
    #[error("{field} has invalid length {len}")]
    BadLength { field: Field, len: usize },
    /// Bytes left over inside a structure whose length prefix should cover it exactly.
    #[error("{len} unexpected bytes after {field}")]
    TrailingBytes { field: Field, len: usize },
    /// An extension that this parser reads occurs twice; RFC 8446 section 4.2 forbids it and
    /// two readers could disagree on which one counts.
    #[error("extension {ext_type:#06x} occurs more than once")]
    DuplicateExtension { ext_type: u16 },
}

/// Parses the ClientHello at the start of `record_bytes`: the raw bytes of the connection,
/// starting with the first TLS record header. The ClientHello may be split over several
/// handshake records; bytes after the record that completes it are ignored.
///
/// # Errors
///
/// [`ParseError::Incomplete`] while the bytes are a valid prefix of a ClientHello; any other
/// variant as soon as they cannot be one, however many bytes follow.
pub fn parse_client_hello(record_bytes: &[u8]) -> Result<ClientHelloSummary, ParseError> {
    let (message, total_len) = reassemble(record_bytes)?;
    let mut summary = parse_message(&message)?;
    summary.total_len = total_len;
    Ok(summary)
}

/// Whether a record header starting with these version bytes can be TLS (SSL 3.0 to TLS 1.3).
/// `minor` is `None` when that byte has not arrived yet.
pub(crate) fn is_plausible_record_version(major: u8, minor: Option<u8>) -> bool {
    major == 3 && minor.is_none_or(|minor| minor <= 4)
}

/// Collects the ClientHello handshake message (header included) from the records at the start
/// of `input`, returning it with the number of input bytes those records take. Borrows when one
/// record holds the whole message, which is what real clients send.
fn reassemble(input: &[u8]) -> Result<(Cow<'_, [u8]>, usize), ParseError> {
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    let mut pos = 0;
    loop {
        if pos + RECORD_HEADER_LEN > MAX_INSPECT_LEN {
            return Err(ParseError::TooFragmented {
                limit: MAX_INSPECT_LEN,
            });
        }
        let record = input.get(pos..).unwrap_or_default();
        let fragment_len = record_header(record)?;
        let record_end = pos + RECORD_HEADER_LEN + fragment_len;
        if record_end > MAX_INSPECT_LEN {
            return Err(ParseError::TooFragmented {
                limit: MAX_INSPECT_LEN,
            });
        }
        let available = record.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let fragment = available.get(..fragment_len);
        // Look at the handshake header even in a partial record, so that a ServerHello or an
        // oversized length fails now rather than after the caller has buffered more.
        let message_len = handshake_header(message.iter().chain(fragment.unwrap_or(available)))?;
        let Some(fragment) = fragment else {
            return Err(ParseError::Incomplete);
        };
        if message.is_empty() {
            message = Cow::Borrowed(fragment);
        } else {
            let joined = message.to_mut();
            joined.reserve(message_len.unwrap_or(0).saturating_sub(joined.len()));
            joined.extend_from_slice(fragment);
        }
        pos = record_end;
        if let Some(message_len) = message_len
            && message.len() >= message_len
        {
            let message = match message {
                Cow::Borrowed(bytes) => Cow::Borrowed(bytes.get(..message_len).unwrap_or(bytes)),
                Cow::Owned(mut bytes) => {
                    bytes.truncate(message_len);
                    Cow::Owned(bytes)
                }
            };
            return Ok((message, pos));
        }
    }
}

/// Checks the record header at the start of `record`, as far as it has arrived, and returns the
/// fragment length.
fn record_header(record: &[u8]) -> Result<usize, ParseError> {
    if let Some(&content_type) = record.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        return Err(ParseError::NotHandshake { content_type });
    }
    if let (Some(&major), Some(&minor)) = (record.get(1), record.get(2))
        && !is_plausible_record_version(major, Some(minor))
    {
        return Err(ParseError::BadRecordVersion { major, minor });
    }
    let Some(&[_, _, _, len_hi, len_lo]) = record.first_chunk::<RECORD_HEADER_LEN>() else {
        return Err(ParseError::Incomplete);
    };
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if len == 0 {
        return Err(ParseError::EmptyRecord);
    }
    if len > MAX_FRAGMENT_LEN {
        return Err(ParseError::RecordTooLong { len });
    }
    Ok(len)
}

/// Checks the handshake header at the start of the gathered bytes, as far as it has arrived, and
/// returns the whole message length once known.
fn handshake_header<'a>(bytes: impl Iterator<Item = &'a u8>) -> Result<Option<usize>, ParseError> {
    let mut header = [0; HANDSHAKE_HEADER_LEN];
    let mut filled = 0;
    for (slot, &byte) in header.iter_mut().zip(bytes) {
        *slot = byte;
        filled += 1;
    }
    let [msg_type, len_0, len_1, len_2] = header;
    if filled == 0 {
        return Ok(None);
    }
    if msg_type != HANDSHAKE_TYPE_CLIENT_HELLO {
        return Err(ParseError::NotClientHello { msg_type });
    }
    if filled < HANDSHAKE_HEADER_LEN {
        return Ok(None);
    }
    let body_len = usize::from(len_0) << 16 | usize::from(len_1) << 8 | usize::from(len_2);
    let len = HANDSHAKE_HEADER_LEN + body_len;
    if len > MAX_CLIENT_HELLO_LEN {
        return Err(ParseError::TooLarge {
            len,
            limit: MAX_CLIENT_HELLO_LEN,
        });
    }
    Ok(Some(len))
}

/// Parses a complete ClientHello handshake message, header included.
fn parse_message(message: &[u8]) -> Result<ClientHelloSummary, ParseError> {
    let mut hello = Reader::new(message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default());
    let legacy_version = hello.u16(Field::LegacyVersion)?;
    hello.take(RANDOM_LEN, Field::Random)?;
    let session_id = hello.vec_u8(Field::SessionId)?;
    if session_id.len() > MAX_SESSION_ID_LEN {
        return Err(ParseError::BadLength {
            field: Field::SessionId,
            len: session_id.len(),
        });
    }
    let cipher_suites = hello.vec_u16(Field::CipherSuites)?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(ParseError::BadLength {
            field: Field::CipherSuites,
            len: cipher_suites.len(),
        });
    }
    let compression_methods = hello.vec_u8(Field::CompressionMethods)?;
    if compression_methods.is_empty() {
        return Err(ParseError::BadLength {
            field: Field::CompressionMethods,
            len: 0,
        });
    }
    let mut summary = ClientHelloSummary {
        legacy_version,
        ..ClientHelloSummary::default()
    };
    // Before TLS 1.3 a ClientHello may end here, without an extensions block.
    if hello.is_empty() {
        return Ok(summary);
    }
    let extensions = hello.vec_u16(Field::Extensions)?;
    hello.finish(Field::Extensions)?;
    parse_extensions(extensions, &mut summary)?;
    Ok(summary)
}

fn parse_extensions(bytes: &[u8], summary: &mut ClientHelloSummary) -> Result<(), ParseError> {
    let mut extensions = Reader::new(bytes);
    let (mut seen_sni, mut seen_alpn, mut seen_versions) = (false, false, false);
    while !extensions.is_empty() {
        let ext_type = extensions.u16(Field::Extension)?;
        let data = extensions.vec_u16(Field::Extension)?;
        match ext_type {
            EXT_SERVER_NAME => {
                first_occurrence(&mut seen_sni, ext_type)?;
                summary.sni = parse_server_name(data)?;
            }
            EXT_ALPN => {
                first_occurrence(&mut seen_alpn, ext_type)?;
                summary.alpn = parse_alpn(data)?;
            }
            EXT_SUPPORTED_VERSIONS => {
                first_occurrence(&mut seen_versions, ext_type)?;
                summary.offers_tls13 = parse_supported_versions(data)?;
            }
            EXT_ENCRYPTED_CLIENT_HELLO => {
                first_occurrence(&mut summary.has_ech, ext_type)?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn first_occurrence(seen: &mut bool, ext_type: u16) -> Result<(), ParseError> {
    if std::mem::replace(seen, true) {
        Err(ParseError::DuplicateExtension { ext_type })
    } else {
        Ok(())
    }
}

/// RFC 6066 section 3: `ServerName server_name_list<1..2^16-1>`, each entry a `name_type` byte
/// and, for `host_name`, `opaque HostName<1..2^16-1>`. No other name type was ever defined, so
/// every entry is read with that layout; the first `host_name` wins.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, ParseError> {
    let mut ext = Reader::new(data);
    let list = ext.vec_u16(Field::ServerName)?;
    ext.finish(Field::ServerName)?;
    if list.is_empty() {
        return Err(ParseError::BadLength {
            field: Field::ServerName,
            len: 0,
        });
    }
    let mut entries = Reader::new(list);
    let mut host_name = None;
    while !entries.is_empty() {
        let name_type = entries.u8(Field::ServerName)?;
        let name = entries.vec_u16(Field::ServerName)?;
        if name.is_empty() {
            return Err(ParseError::BadLength {
                field: Field::ServerName,
                len: 0,
            });
        }
        if name_type == NAME_TYPE_HOST_NAME && host_name.is_none() {
            host_name = Some(name);
        }
    }
    Ok(host_name.and_then(hostname::normalize))
}

/// RFC 7301 section 3.1: `ProtocolName protocol_name_list<2..2^16-1>`, each
/// `opaque ProtocolName<1..2^8-1>`.
fn parse_alpn(data: &[u8]) -> Result<Vec<String>, ParseError> {
    let mut ext = Reader::new(data);
    let list = ext.vec_u16(Field::Alpn)?;
    ext.finish(Field::Alpn)?;
    if list.len() < 2 {
        return Err(ParseError::BadLength {
            field: Field::Alpn,
            len: list.len(),
        });
    }
    let mut names = Reader::new(list);
    let mut protocols = Vec::new();
    while !names.is_empty() {
        let name = names.vec_u8(Field::Alpn)?;
        if name.is_empty() {
            return Err(ParseError::BadLength {
                field: Field::Alpn,
                len: 0,
            });
        }
        if protocols.len() < MAX_ALPN_PROTOCOLS
            && !is_grease_alpn(name)
            && let Ok(name) = std::str::from_utf8(name)
        {
            protocols.push(name.to_owned());
        }
    }
    Ok(protocols)
}

/// RFC 8446 section 4.2.1: `ProtocolVersion versions<2..254>` in a ClientHello.
fn parse_supported_versions(data: &[u8]) -> Result<bool, ParseError> {
    let mut ext = Reader::new(data);
    let list = ext.vec_u8(Field::SupportedVersions)?;
    ext.finish(Field::SupportedVersions)?;
    if list.is_empty() || list.len() % 2 != 0 {
        return Err(ParseError::BadLength {
            field: Field::SupportedVersions,
            len: list.len(),
        });
    }
    Ok(list
        .chunks_exact(2)
        .any(|version| version == TLS13.to_be_bytes()))
}

/// RFC 8701 section 2: GREASE values are two equal bytes of the form 0x?A, and the same pairs are
/// reserved as ALPN identifiers.
fn is_grease([high, low]: [u8; 2]) -> bool {
    high == low && low & 0x0f == 0x0a
}

fn is_grease_alpn(name: &[u8]) -> bool {
    name.first_chunk::<2>()
        .is_some_and(|&pair| name.len() == 2 && is_grease(pair))
}

#[cfg(test)]
mod tests;
