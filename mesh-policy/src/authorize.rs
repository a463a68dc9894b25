//! Authorization in userspace: what the receiving agent checks for a connection the kernel
//! cannot judge, because the decision depends on who the source is.
//!
//! The kernel plan holds only the rules without source identity conditions (see
//! [`crate::AuthzRuleSpec`]); it runs on the pods' host-side interfaces, on the traffic they send.
//! A connection that arrives through the mTLS tunnel carries its source's SPIFFE ID, and the
//! receiving agent decides it here against every rule, with and without identity conditions, in
//! the kernel's order: any matching Deny refuses, else any matching Allow admits, else the
//! interface's default (Allow when the connection entered on no interface or one without a
//! default). A connection from a pod of another node is thus judged twice: by the kernel on the
//! sending node (the rules it can enforce) and here on the receiving one.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::compiled::Compiled;
use crate::identity::Identity;
use crate::model::AuthzAction;
use crate::settings::HttpDeny;

/// The outcome of [`Compiled::authorize_inbound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AuthzDecision<'a> {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// The deciding rule, `namespace/policy/rule`; `None` when the default decided.
    pub rule: Option<&'a str>,
}

impl Compiled {
    /// Decides a TCP connection from `src_ip` to `dst` whose source identity is `source`
    /// (`None`: plaintext, not authenticated), which entered the node on the host-side
    /// `interface` (`None`: on none, as for a connection through the tunnel from another node;
    /// rules that name interfaces then do not apply, and the default is Allow).
    ///
    /// Rules with `principals` or `namespaces` match only when `source` is known and satisfies
    /// them; UDP-only rules never match. The cost is linear in the number of rule entries.
    pub fn authorize_inbound(
        &self,
        source: Option<&Identity>,
        src_ip: IpAddr,
        dst: SocketAddr,
        interface: Option<&str>,
    ) -> AuthzDecision<'_> {
        let authz = &self.settings().authorization;
        let matching = |action: AuthzAction| {
            let plain = authz
                .rules
                .iter()
                .filter(move |r| r.action == action && r.matches_tcp(src_ip, dst, interface));
            let by_identity = authz.identity.iter().filter(move |r| {
                r.l4.action == action && r.matches_tcp(source, src_ip, dst, interface)
            });
            plain
                .map(|r| r.name())
                .chain(by_identity.map(|r| r.l4.name()))
        };
        if let Some(rule) = matching(AuthzAction::Deny).next() {
            return AuthzDecision {
                allowed: false,
                rule: Some(rule),
            };
        }
        if let Some(rule) = matching(AuthzAction::Allow).next() {
            return AuthzDecision {
                allowed: true,
                rule: Some(rule),
            };
        }
        let default = interface
            .and_then(|i| {
                authz
                    .defaults
                    .iter()
                    .find_map(|(name, action)| (name.as_str() == i).then_some(*action))
            })
            .unwrap_or(AuthzAction::Allow);
        AuthzDecision {
            allowed: default == AuthzAction::Allow,
            rule: None,
        }
    }

    /// The MeshPolicy HTTP rule that denies a request from `source` (`None`: a plaintext
    /// client) with this method, path (without the query) and headers, if one does: the first in
    /// policy order. A rule with `principals` or `namespaces` denies only requests from a
    /// matching authenticated source.
    pub fn http_denied_by(
        &self,
        source: Option<&Identity>,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<String>,
    ) -> Option<&HttpDeny> {
        self.settings()
            .authorization
            .http
            .iter()
            .find(|rule| rule.matches_from(source, method, path, &header))
    }
}
