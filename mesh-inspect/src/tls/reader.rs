//! A cursor over a byte slice for the TLS presentation language (RFC 8446 section 3): fixed-width
//! big-endian integers and length-prefixed vectors. Every read checks the remaining length first
//! and fails with the field being read, so no parser built on it can read out of bounds.

use super::{Field, ParseError};

pub(super) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(super) fn take(&mut self, len: usize, field: Field) -> Result<&'a [u8], ParseError> {
        let (head, tail) = self
            .rest
            .split_at_checked(len)
            .ok_or(ParseError::Truncated { field })?;
        self.rest = tail;
        Ok(head)
    }

    pub(super) fn u8(&mut self, field: Field) -> Result<u8, ParseError> {
        let (&byte, tail) = self
            .rest
            .split_first()
            .ok_or(ParseError::Truncated { field })?;
        self.rest = tail;
        Ok(byte)
    }

    pub(super) fn u16(&mut self, field: Field) -> Result<u16, ParseError> {
        let (bytes, tail) = self
            .rest
            .split_first_chunk::<2>()
            .ok_or(ParseError::Truncated { field })?;
        self.rest = tail;
        Ok(u16::from_be_bytes(*bytes))
    }

    /// A vector with a one-byte length prefix (`opaque field<0..2^8-1>`).
    pub(super) fn vec_u8(&mut self, field: Field) -> Result<&'a [u8], ParseError> {
        let len = self.u8(field)?;
        self.take(usize::from(len), field)
    }

    /// A vector with a two-byte length prefix (`opaque field<0..2^16-1>`).
    pub(super) fn vec_u16(&mut self, field: Field) -> Result<&'a [u8], ParseError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    /// Ends a structure whose length prefix must cover exactly its contents.
    pub(super) fn finish(self, field: Field) -> Result<(), ParseError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ParseError::TrailingBytes {
                field,
                len: self.rest.len(),
            })
        }
    }
}
