//! Source identities and the conditions on them: who a connection that arrived through the mTLS
//! tunnel comes from ([`Identity`]), and the `principals` / `namespaces` of authorization rules
//! that match on it ([`SourceMatch`]).
//!
//! Principals are compared byte for byte, as the peer's certificate spells its SPIFFE ID: the
//! identity crate parses IDs strictly (no case folding, no percent-decoding), so one identity has
//! one spelling and a rule cannot be bypassed by another. A `*` stands for whole path segments
//! only, so that `spiffe://td/ns/prod/*` cannot also match namespace `production`.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::names;

/// The scheme every SPIFFE ID starts with.
const SCHEME: &str = "spiffe://";
/// The path segments of a Kubernetes workload's SPIFFE ID after the scheme:
/// `<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
const SEGMENTS: usize = 5;
/// What a principal looks like, for error messages.
const FORM: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>";

/// The authenticated source of a connection: the SPIFFE ID in the peer's client certificate
/// and the namespace it names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
    pub principal: String,
    /// The Kubernetes namespace of the source workload.
    pub namespace: String,
}

impl Identity {
    /// The identity a Kubernetes workload's SPIFFE ID stands for; `None` when `id` is not of the
    /// form `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>` with valid names.
    pub fn from_spiffe(id: &str) -> Option<Self> {
        PrincipalPattern::exact(id).ok()?;
        let namespace = id.strip_prefix(SCHEME)?.split('/').nth(2)?;
        Some(Identity {
            principal: id.to_owned(),
            namespace: namespace.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.principal)
    }
}

/// One entry of a rule's `principals`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalPattern {
    /// `*`: any authenticated source.
    Any,
    /// A whole SPIFFE ID.
    Exact(String),
    /// `spiffe://td/ns/shop/*`: every ID starting with this text (which ends with `/`).
    Prefix(String),
    /// `*/sa/admin`: every ID ending with this text (which starts with `/`).
    Suffix(String),
}

impl PrincipalPattern {
    /// Whether `principal` (a SPIFFE ID) matches.
    pub fn matches(&self, principal: &str) -> bool {
        match self {
            PrincipalPattern::Any => true,
            PrincipalPattern::Exact(id) => principal == id,
            PrincipalPattern::Prefix(prefix) => principal.starts_with(prefix.as_str()),
            PrincipalPattern::Suffix(suffix) => principal.ends_with(suffix.as_str()),
        }
    }

    fn exact(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix(SCHEME)
            .ok_or_else(|| format!("{text:?} is not a SPIFFE ID ({FORM})"))?;
        let segments: Vec<&str> = rest.split('/').collect();
        if segments.len() != SEGMENTS {
            return Err(format!("{text:?} is not of the form {FORM}"));
        }
        check_segments(text, &segments, 0)?;
        Ok(PrincipalPattern::Exact(text.to_owned()))
    }
}

/// Checks `segments`, which stand at positions `first..` of a workload ID's segments.
fn check_segments(text: &str, segments: &[&str], first: usize) -> Result<(), String> {
    for (position, segment) in (first..).zip(segments) {
        let problem = match position {
            0 => names::dns_subdomain(segment)
                .err()
                .map(|e| format!("trust domain: {e}")),
            1 => (*segment != "ns").then(|| format!("expected \"ns\", found {segment:?}")),
            2 => names::dns_label(segment)
                .err()
                .map(|e| format!("namespace: {e}")),
            3 => (*segment != "sa").then(|| format!("expected \"sa\", found {segment:?}")),
            _ => names::dns_subdomain(segment)
                .err()
                .map(|e| format!("service account: {e}")),
        };
        if let Some(problem) = problem {
            return Err(format!("{text:?} is not of the form {FORM}: {problem}"));
        }
    }
    Ok(())
}

impl FromStr for PrincipalPattern {
    type Err = String;

    /// `*`, a whole SPIFFE ID, a prefix of whole segments followed by `*`
    /// (`spiffe://td/ns/shop/*`) or `*` followed by a suffix of whole segments (`*/sa/admin`).
    fn from_str(text: &str) -> Result<Self, String> {
        const WHOLE: &str = "'*' may only stand for whole leading or trailing path segments \
                             (\"spiffe://td/ns/shop/*\", \"*/sa/admin\") or be the whole value";
        if text == "*" {
            return Ok(PrincipalPattern::Any);
        }
        if let Some(literal) = text.strip_suffix('*') {
            if literal.contains('*') {
                return Err(format!("{text:?}: {WHOLE}"));
            }
            let rest = literal
                .strip_prefix(SCHEME)
                .ok_or_else(|| format!("{text:?} does not start with {SCHEME:?}"))?;
            let segments: Vec<&str> = match rest {
                "" => Vec::new(),
                _ => rest
                    .strip_suffix('/')
                    .ok_or_else(|| format!("{text:?}: {WHOLE}"))?
                    .split('/')
                    .collect(),
            };
            if segments.len() >= SEGMENTS {
                return Err(format!(
                    "{text:?}: nothing follows the service account in {FORM}"
                ));
            }
            check_segments(text, &segments, 0)?;
            return Ok(PrincipalPattern::Prefix(literal.to_owned()));
        }
        if let Some(literal) = text.strip_prefix('*') {
            if literal.contains('*') {
                return Err(format!("{text:?}: {WHOLE}"));
            }
            let rest = literal
                .strip_prefix('/')
                .ok_or_else(|| format!("{text:?}: {WHOLE}"))?;
            let segments: Vec<&str> = rest.split('/').collect();
            // The trust domain cannot be part of a suffix: it follows `spiffe://`, not a `/`
            // that a `*` could stand before.
            if segments.len() >= SEGMENTS {
                return Err(format!("{text:?} is longer than the path of {FORM}"));
            }
            check_segments(text, &segments, SEGMENTS - segments.len())?;
            return Ok(PrincipalPattern::Suffix(literal.to_owned()));
        }
        if text.contains('*') {
            return Err(format!("{text:?}: {WHOLE}"));
        }
        PrincipalPattern::exact(text)
    }
}

impl fmt::Display for PrincipalPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrincipalPattern::Any => f.write_str("*"),
            PrincipalPattern::Exact(id) => f.write_str(id),
            PrincipalPattern::Prefix(prefix) => write!(f, "{prefix}*"),
            PrincipalPattern::Suffix(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl Serialize for PrincipalPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The source conditions of a rule: its `principals` and `namespaces`. Within a list any entry
/// matches (OR); the two lists combine with AND. A rule with either list matches only a
/// connection whose source identity is known (it came through the mTLS tunnel): a plaintext
/// connection has no identity, so neither an Allow nor a Deny rule with source conditions applies
/// to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceMatch {
    /// SPIFFE ID patterns (empty: any principal).
    pub principals: Vec<PrincipalPattern>,
    /// Source namespaces (empty: any namespace).
    pub namespaces: Vec<String>,
}

impl SourceMatch {
    /// Whether the rule has no source condition (then the kernel can enforce it).
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty() && self.namespaces.is_empty()
    }

    /// Whether a connection from `source` (`None`: not authenticated) satisfies the conditions.
    pub fn matches(&self, source: Option<&Identity>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(source) = source else {
            return false;
        };
        (self.principals.is_empty() || self.principals.iter().any(|p| p.matches(&source.principal)))
            && (self.namespaces.is_empty() || self.namespaces.contains(&source.namespace))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> PrincipalPattern {
        s.parse()
            .unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn refused(s: &str) -> String {
        s.parse::<PrincipalPattern>()
            .expect_err("should be refused")
    }

    #[test]
    fn wildcards_stand_for_whole_segments() {
        let id = "spiffe://cluster.local/ns/shop/sa/admin";
        for (p, yes) in [
            ("*", true),
            (id, true),
            ("spiffe://cluster.local/ns/shop/sa/adminx", false),
            ("spiffe://*", true),
            ("spiffe://cluster.local/*", true),
            ("spiffe://other.td/*", false),
            ("spiffe://cluster.local/ns/shop/*", true),
            ("spiffe://cluster.local/ns/sho/*", false),
            ("spiffe://cluster.local/ns/shop/sa/*", true),
            ("*/sa/admin", true),
            ("*/admin", true),
            ("*/dmin", false),
            ("*/ns/shop/sa/admin", true),
            ("*/ns/shop-2/sa/admin", false),
        ] {
            assert_eq!(pattern(p).matches(id), yes, "{p}");
        }
        assert_eq!(pattern("*/sa/admin").to_string(), "*/sa/admin");
        assert_eq!(
            pattern("spiffe://td/ns/a/*").to_string(),
            "spiffe://td/ns/a/*"
        );
    }

    #[test]
    fn refusals_say_why() {
        assert!(refused("spiffe://td/ns/prod*").contains("whole leading or trailing"));
        assert!(refused("*sa/admin").contains("whole leading or trailing"));
        assert!(refused("spiffe://td/*/sa/x").contains("whole leading or trailing"));
        assert!(refused("*/ns/*").contains("whole leading or trailing"));
        assert!(refused("td/ns/a/sa/b").contains("is not a SPIFFE ID"));
        assert!(refused("spiffe://td/ns/a").contains("is not of the form"));
        assert!(refused("spiffe://td/ns/A/sa/b").contains("namespace:"));
        assert!(refused("spiffe://TD/ns/a/sa/b").contains("trust domain:"));
        assert!(refused("spiffe://td/namespace/a/*").contains("expected \"ns\""));
        assert!(refused("*/x/a/sa/b").contains("expected \"ns\""));
        assert!(refused("*/sa/Admin").contains("service account:"));
        assert!(refused("spiffe://td/ns/a/sa/b/*").contains("nothing follows"));
        assert!(refused("*/td/ns/a/sa/b").contains("longer than"));
        assert!(refused("http://td/*").contains("does not start with"));
    }

    #[test]
    fn identity_from_a_workload_id() {
        let id = Identity::from_spiffe("spiffe://td/ns/shop/sa/web").expect("valid");
        assert_eq!(id.namespace, "shop");
        assert_eq!(Identity::from_spiffe("spiffe://td/ns/shop/sa/web/x"), None);
        assert_eq!(Identity::from_spiffe("spiffe://td/other"), None);
    }

    #[test]
    fn source_conditions_need_a_known_identity() {
        let web = Identity::from_spiffe("spiffe://td/ns/shop/sa/web").expect("valid");
        let none = SourceMatch::default();
        assert!(none.matches(None) && none.matches(Some(&web)));
        let by_ns = SourceMatch {
            namespaces: vec!["shop".into()],
            ..SourceMatch::default()
        };
        assert!(by_ns.matches(Some(&web)));
        assert!(!by_ns.matches(None));
        let both = SourceMatch {
            principals: vec![pattern("*/sa/admin")],
            namespaces: vec!["shop".into()],
        };
        assert!(!both.matches(Some(&web)), "AND between the lists");
        let any = SourceMatch {
            principals: vec![PrincipalPattern::Any],
            ..SourceMatch::default()
        };
        assert!(any.matches(Some(&web)) && !any.matches(None));
    }
}
