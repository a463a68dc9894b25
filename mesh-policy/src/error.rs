//! Error types: one [`ValidationError`] per problem found in the policy, and [`LoadError`] for
//! reading it from disk.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// One problem with one policy object, precise enough to fix without reading the code:
/// which object, which document it came from, which field, and why.
///
/// `Display` renders it on one line, e.g.
/// `HTTPRoute shop/cart (routes.yaml#3) spec.rules[0].matches[1].path.value: must start with '/'`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidationError {
    /// `Kind namespace/name`, e.g. `HTTPRoute gateway-conformance-mesh/foo`; for a document whose
    /// kind or name is unknown, whatever is known (`document`, `HTTPRoute <unnamed>`).
    pub object: String,
    /// `file.yaml#3`: the source name and the 1-based index of the YAML document.
    pub source: String,
    /// Field path in the object, e.g. `spec.rules[0].matches[1].path.value`; empty when the
    /// problem is the document as a whole.
    pub field: String,
    /// What is wrong, in one line.
    pub reason: String,
}

impl ValidationError {
    pub(crate) fn new(
        object: impl Into<String>,
        source: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            object: object.into(),
            source: source.into(),
            field: field.into(),
            // Keep Display on one line whatever the reason came from (serde messages can wrap).
            reason: reason.into().replace(['\n', '\r'], " "),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.object, self.source)?;
        if !self.field.is_empty() {
            write!(f, " {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

// Not derived with thiserror: a field called `source` would be taken for the error source.
impl std::error::Error for ValidationError {}

/// Failure to load a policy file or directory.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file or directory could not be read.
    #[error("cannot read policy {}: {error}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        error: std::io::Error,
    },
    /// The policy is larger than [`crate::MAX_POLICY_BYTES`] (a file, or the files of a
    /// directory together); it was not parsed.
    #[error(
        "policy {} is too large: {size} bytes{}, over the limit of {limit} bytes",
        path.display(),
        if *.total { " with the files before it" } else { "" }
    )]
    TooLarge {
        /// The file that went over the limit.
        path: PathBuf,
        /// Its size, or the total of the directory up to it when `total`.
        size: u64,
        /// Whether `size` counts the files of the directory before this one too.
        total: bool,
        /// The limit.
        limit: usize,
    },
    /// The policy was read but is invalid; every problem found is listed.
    #[error("{}", summarize(.0))]
    Invalid(Vec<ValidationError>),
}

impl LoadError {
    /// A short, stable label for metrics (`io`, `too_large`, `invalid`).
    pub fn label(&self) -> &'static str {
        match self {
            LoadError::Io { .. } => "io",
            LoadError::TooLarge { .. } => "too_large",
            LoadError::Invalid(_) => "invalid",
        }
    }
}

fn summarize(errors: &[ValidationError]) -> String {
    match errors {
        [] => "invalid policy".to_owned(),
        [one] => format!("invalid policy: {one}"),
        [first, rest @ ..] => format!(
            "invalid policy: {first} (and {} more error{})",
            rest.len(),
            if rest.len() == 1 { "" } else { "s" }
        ),
    }
}
