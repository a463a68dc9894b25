//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`, the
//! form Istio and Linkerd give a Kubernetes workload, so that a peer running either can read ours.
//! Parsing is strict (no case folding, no percent-decoding, no trailing slash, nothing after the
//! service account) because the string is compared byte for byte in authorization rules: two
//! spellings of one identity would let a rule be bypassed.

use std::fmt;
use std::str::FromStr;

/// The URI scheme of every SPIFFE ID.
const SCHEME: &str = "spiffe://";
/// DNS names are at most 253 characters (RFC 1035, without the trailing dot).
const MAX_DNS_NAME_LEN: usize = 253;
/// DNS labels, and so Kubernetes namespace names, are at most 63 characters.
const MAX_DNS_LABEL_LEN: usize = 63;

/// Which part of a SPIFFE ID an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The `spiffe://` prefix.
    Scheme,
    /// The trust domain (the URI authority).
    TrustDomain,
    /// The path: `/ns/<namespace>/sa/<serviceaccount>`.
    Path,
    /// The Kubernetes namespace.
    Namespace,
    /// The Kubernetes ServiceAccount name.
    ServiceAccount,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Scheme => "scheme",
            Part::TrustDomain => "trust domain",
            Part::Path => "path",
            Part::Namespace => "namespace",
            Part::ServiceAccount => "service account",
        })
    }
}

/// A SPIFFE ID or one of its parts was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {input:?}: {part} {reason}")]
pub struct SpiffeIdError {
    /// The whole text that was parsed (or the part given on its own).
    pub input: String,
    /// The part that is wrong.
    pub part: Part,
    /// Why, in words: "is empty", "must be lowercase ...".
    pub reason: String,
}

impl SpiffeIdError {
    fn new(input: &str, part: Part, reason: impl Into<String>) -> Self {
        SpiffeIdError {
            input: input.to_owned(),
            part,
            reason: reason.into(),
        }
    }
}

/// A trust domain: the set of identities one root of trust vouches for (`cluster.local` in a
/// default Kubernetes install). A lowercase DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Checks `name` as a trust domain: a lowercase DNS name (labels of `a-z`, `0-9` and `-`,
    /// not starting or ending with `-`, joined by dots).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        check_trust_domain(name)
            .map_err(|reason| SpiffeIdError::new(name, Part::TrustDomain, reason))?;
        Ok(TrustDomain(name.to_owned()))
    }

    /// The domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

/// The identity of a workload: its Kubernetes namespace and ServiceAccount in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds the identity of ServiceAccount `service_account` in `namespace`, checking both as
    /// Kubernetes names (a namespace is a DNS label, a ServiceAccount a DNS subdomain).
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        check_dns_label(namespace)
            .map_err(|reason| SpiffeIdError::new(namespace, Part::Namespace, reason))?;
        check_dns_subdomain(service_account)
            .map_err(|reason| SpiffeIdError::new(service_account, Part::ServiceAccount, reason))?;
        Ok(SpiffeId {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The trust domain the identity belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes ServiceAccount name.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |part, reason: &str| SpiffeIdError::new(input, part, reason);
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| err(Part::Scheme, "must be \"spiffe://\""))?;
        let (domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        check_trust_domain(domain).map_err(|reason| err(Part::TrustDomain, &reason))?;
        // Queries and fragments are forbidden in SPIFFE IDs; say so rather than report a strange
        // service account name.
        if path.contains(['?', '#']) {
            return Err(err(
                Part::Path,
                "must not contain a query ('?') or fragment ('#')",
            ));
        }
        let mut segments = path.split('/');
        // `path` starts with '/', so the first segment is the empty string before it.
        let shape = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        );
        let (namespace, service_account) = match shape {
            (Some(""), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => (ns, sa),
            _ => {
                return Err(err(
                    Part::Path,
                    "must be \"/ns/<namespace>/sa/<serviceaccount>\"",
                ));
            }
        };
        check_dns_label(namespace).map_err(|reason| err(Part::Namespace, &reason))?;
        check_dns_subdomain(service_account)
            .map_err(|reason| err(Part::ServiceAccount, &reason))?;
        Ok(SpiffeId {
            trust_domain: TrustDomain(domain.to_owned()),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

fn check_trust_domain(name: &str) -> Result<(), String> {
    if name.contains(':') {
        return Err("must not have a port".into());
    }
    if name.contains('@') {
        return Err("must not have user info".into());
    }
    check_dns_subdomain(name)
}

/// A DNS-1123 subdomain, as Kubernetes checks ServiceAccount names: lowercase labels joined by
/// dots, 253 characters at most.
fn check_dns_subdomain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return Err(format!("is longer than {MAX_DNS_NAME_LEN} characters"));
    }
    for label in name.split('.') {
        check_dns_label(label).map_err(|reason| {
            if label.is_empty() {
                "has an empty label (two dots in a row, or a dot at an end)".to_owned()
            } else if label.len() == name.len() {
                reason
            } else {
                format!("label {label:?} {reason}")
            }
        })?;
    }
    Ok(())
}

/// A DNS-1123 label, as Kubernetes checks namespace names: 1 to 63 of `a-z`, `0-9` and `-`,
/// starting and ending with a letter or digit.
fn check_dns_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("is empty".into());
    }
    if label.len() > MAX_DNS_LABEL_LEN {
        return Err(format!("is longer than {MAX_DNS_LABEL_LEN} characters"));
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "contains {bad:?}: only lowercase letters, digits and '-' are allowed"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("must start and end with a lowercase letter or digit".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]
    use super::*;

    fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        s.parse()
    }

    #[test]
    fn parses_and_prints_the_kubernetes_form() {
        let id = parse("spiffe://cluster.local/ns/shop/sa/checkout-v2").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "checkout-v2");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/shop/sa/checkout-v2"
        );

        // A ServiceAccount name may contain dots (it is a DNS subdomain), a namespace may not.
        let dotted = parse("spiffe://example.org/ns/a1/sa/build.bot").unwrap();
        assert_eq!(dotted.service_account(), "build.bot");

        let built = SpiffeId::new(
            TrustDomain::new("cluster.local").unwrap(),
            "shop",
            "checkout-v2",
        )
        .unwrap();
        assert_eq!(built, id);
    }

    #[test]
    fn rejects_bad_input_naming_the_part_and_reason() {
        let cases = [
            (
                "http://cluster.local/ns/a/sa/b",
                "scheme must be \"spiffe://\"",
            ),
            (
                "SPIFFE://cluster.local/ns/a/sa/b",
                "scheme must be \"spiffe://\"",
            ),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            (
                "spiffe://Cluster.local/ns/a/sa/b",
                "trust domain label \"Cluster\" contains 'C': only lowercase letters, digits and '-' are allowed",
            ),
            (
                "spiffe://cluster.local:443/ns/a/sa/b",
                "trust domain must not have a port",
            ),
            (
                "spiffe://me@cluster.local/ns/a/sa/b",
                "trust domain must not have user info",
            ),
            (
                "spiffe://cluster..local/ns/a/sa/b",
                "trust domain has an empty label (two dots in a row, or a dot at an end)",
            ),
            (
                "spiffe://cluster.local",
                "path must be \"/ns/<namespace>/sa/<serviceaccount>\"",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/",
                "path must be \"/ns/<namespace>/sa/<serviceaccount>\"",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/c",
                "path must be \"/ns/<namespace>/sa/<serviceaccount>\"",
            ),
            (
                "spiffe://cluster.local/sa/b/ns/a",
                "path must be \"/ns/<namespace>/sa/<serviceaccount>\"",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b?x=1",
                "path must not contain a query ('?') or fragment ('#')",
            ),
            ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
            (
                "spiffe://cluster.local/ns/Shop/sa/b",
                "namespace contains 'S': only lowercase letters, digits and '-' are allowed",
            ),
            (
                "spiffe://cluster.local/ns/a.b/sa/c",
                "namespace contains '.': only lowercase letters, digits and '-' are allowed",
            ),
            (
                "spiffe://cluster.local/ns/-a/sa/b",
                "namespace must start and end with a lowercase letter or digit",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/",
                "service account is empty",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b%20c",
                "service account contains '%': only lowercase letters, digits and '-' are allowed",
            ),
        ];
        for (input, reason) in cases {
            let err = parse(input).expect_err(input);
            assert_eq!(
                err.to_string(),
                format!("invalid SPIFFE ID {input:?}: {reason}"),
                "input {input}"
            );
        }

        let long_ns = "n".repeat(64);
        let err = parse(&format!("spiffe://td/ns/{long_ns}/sa/b")).unwrap_err();
        assert_eq!(err.part, Part::Namespace);
        assert_eq!(err.reason, "is longer than 63 characters");

        let err = SpiffeId::new(TrustDomain::new("td").unwrap(), "ok", "Bad").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid SPIFFE ID \"Bad\": service account contains 'B': only lowercase letters, digits and '-' are allowed"
        );
        let err = TrustDomain::new("").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid SPIFFE ID \"\": trust domain is empty"
        );
    }
}
