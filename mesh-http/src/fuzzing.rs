//! Entry points for the fuzz targets in `mesh-http/fuzz` (cargo feature `fuzzing`): the
//! scanner and Host syntax, which are crate-private otherwise. Not an API.

use crate::guard::{HeadScanner, Scan};
use crate::rejection::Rejection;

/// Whether `value` is a valid Host field value (see the scanner).
pub fn is_valid_host(value: &[u8]) -> bool {
    crate::guard::is_valid_host(value)
}

/// What the scanner found in a stream, offsets counted from the stream start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing wrong (possibly because scanning stopped: tunnel or oversized head).
    Clean,
    /// A head refused at the byte `at`.
    Head { at: usize, why: Rejection },
    /// A chunked body refused at the byte `at`, in request number `request`.
    Body {
        at: usize,
        why: Rejection,
        request: u64,
    },
}

/// Scans `input` as one stream that arrives in pieces ending at `cuts` (sorted, deduplicated
/// and clamped here), as reads would deliver it.
pub fn scan(input: &[u8], cuts: &[usize], max_head: usize, max_headers: usize) -> Found {
    let mut scanner = HeadScanner::new(max_head, max_headers);
    let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    ends.push(input.len());
    ends.sort_unstable();
    ends.dedup();
    let mut start = 0;
    for end in ends {
        let Some(piece) = input.get(start..end) else {
            continue;
        };
        match scanner.scan(piece) {
            Scan::Clean => {}
            Scan::Reject { at, why } => {
                return Found::Head {
                    at: start + at,
                    why,
                };
            }
            Scan::Fail { at, why, request } => {
                return Found::Body {
                    at: start + at,
                    why,
                    request,
                };
            }
        }
        start = end;
    }
    Found::Clean
}
