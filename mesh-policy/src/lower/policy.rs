//! MeshPolicy: capture entries, header defaults, detection timeout, authorization, mTLS modes.

use std::collections::BTreeMap;

use super::*;
use crate::{
    crd::MAX_PRINCIPALS,
    identity::{PrincipalPattern, SourceMatch},
    model::{AuthzAction, MtlsMode},
    net::{InterfaceName, PortRange, Prefix},
    settings::{AuthzRule, IdentityRule},
};

// Most authorization entries one MeshPolicy may expand to (the kernel holds 4,096 rule ids):
// the same constant bounds the CRD schema.
use crate::crd::MAX_AUTHZ_ENTRIES;

/// A MeshPolicy's `spec.authorization.rules` and `defaults`, lowered.
#[derive(Default)]
pub(super) struct LoweredAuthz {
    /// Entries without source identity conditions: what the kernel enforces.
    pub rules: Vec<AuthzRule>,
    /// Entries with `principals` or `namespaces`: checked in userspace only.
    pub identity: Vec<IdentityRule>,
    pub defaults: Vec<(InterfaceName, AuthzAction)>,
}

/// Validates a rule's `principals` and `namespaces`; `rule` names it in the errors.
fn lower_source(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    rule: &str,
    principals: &[String],
    namespaces: &[String],
) -> SourceMatch {
    let mut source = SourceMatch::default();
    for (key, len) in [
        ("principals", principals.len()),
        ("namespaces", namespaces.len()),
    ] {
        if len > MAX_PRINCIPALS {
            cx.error(
                at,
                format!("{field}.{key}"),
                format!("{len} entries; at most {MAX_PRINCIPALS} (rule {rule:?})"),
            );
        }
    }
    for (j, p) in principals.iter().enumerate() {
        match p.parse::<PrincipalPattern>() {
            Ok(pattern) => source.principals.push(pattern),
            Err(reason) => cx.error(
                at,
                format!("{field}.principals[{j}]"),
                format!("{reason} (rule {rule:?})"),
            ),
        }
    }
    for (j, n) in namespaces.iter().enumerate() {
        match names::dns_label(n) {
            Ok(()) => source.namespaces.push(n.clone()),
            Err(reason) => cx.error(
                at,
                format!("{field}.namespaces[{j}]"),
                format!("{reason}: not a namespace name (rule {rule:?})"),
            ),
        }
    }
    source
}

/// Validates `spec.authorization` and expands each rule into one typed entry per (source,
/// destination, port range) combination; also returns the per-interface defaults. Rules with
/// source identity conditions go to their own list (see [`crate::AuthzRuleSpec`]).
pub(super) fn lower_authorization(
    cx: &mut Cx,
    at: &At<'_>,
    policy: &str,
    spec: &MeshPolicySpec,
) -> LoweredAuthz {
    let mut lowered = LoweredAuthz::default();
    let Some(authz) = &spec.authorization else {
        return lowered;
    };
    let LoweredAuthz {
        rules: out,
        identity,
        defaults,
    } = &mut lowered;
    let mut entries = 0;
    for (name, action) in &authz.defaults {
        match name.parse::<InterfaceName>() {
            Ok(iface) => defaults.push((iface, *action)),
            Err(reason) => cx.error(at, format!("spec.authorization.defaults[{name:?}]"), reason),
        }
    }
    let mut seen = std::collections::HashSet::new();
    for (i, rule) in authz.rules.iter().enumerate() {
        let field = format!("spec.authorization.rules[{i}]");
        if let Err(reason) = names::dns_label(&rule.name) {
            cx.error(at, format!("{field}.name"), reason);
        } else if !seen.insert(rule.name.as_str()) {
            cx.error(
                at,
                format!("{field}.name"),
                format!("{:?} is used by another rule of this policy", rule.name),
            );
        }
        let mut interfaces = Vec::new();
        for (j, n) in rule.interfaces.iter().enumerate() {
            match n.parse::<InterfaceName>() {
                Ok(iface) => interfaces.push(iface),
                Err(reason) => cx.error(at, format!("{field}.interfaces[{j}]"), reason),
            }
        }
        let mut cidrs = |list: &[String], key: &str| -> Vec<Option<Prefix>> {
            if list.is_empty() {
                return vec![None];
            }
            let mut v = Vec::new();
            for (j, c) in list.iter().enumerate() {
                match c.parse::<Prefix>() {
                    Ok(n) => v.push(Some(n)),
                    Err(reason) => cx.error(at, format!("{field}.{key}[{j}]"), reason),
                }
            }
            v
        };
        let srcs = cidrs(&rule.from, "from");
        let dsts = cidrs(&rule.to, "to");
        let mut ports: Vec<Option<PortRange>> = Vec::new();
        for (j, p) in rule.ports.iter().enumerate() {
            match PortRange::from_spec(p) {
                Ok(r) => ports.push(Some(r)),
                Err(reason) => cx.error(at, format!("{field}.ports[{j}]"), reason),
            }
        }
        if rule.ports.is_empty() {
            ports.push(None);
        }
        let source = lower_source(
            cx,
            at,
            &field,
            &rule.name,
            &rule.principals,
            &rule.namespaces,
        );
        let mut combos = Vec::new();
        for src in &srcs {
            for dst in &dsts {
                if let (Some(a), Some(b)) = (src, dst)
                    && a.is_ipv4() != b.is_ipv4()
                {
                    continue;
                }
                for p in &ports {
                    combos.push((*src, *dst, *p));
                }
            }
        }
        if combos.is_empty() && !srcs.is_empty() && !dsts.is_empty() {
            cx.error(
                at,
                format!("{field}.to"),
                "no destination has the address family of any source in `from`",
            );
        }
        let many = combos.len() > 1;
        entries += combos.len();
        for (k, (src, dst, ports)) in combos.into_iter().enumerate() {
            let entry = AuthzRule {
                key: if many {
                    format!("{policy}/{}#{k}", rule.name)
                } else {
                    format!("{policy}/{}", rule.name)
                },
                rule: rule.name.clone(),
                action: rule.action,
                interfaces: (!rule.interfaces.is_empty()).then(|| interfaces.clone()),
                src,
                dst,
                ports,
                protocol: rule.protocol,
            };
            if source.is_empty() {
                out.push(entry);
            } else {
                identity.push(IdentityRule {
                    l4: entry,
                    source: source.clone(),
                });
            }
        }
    }
    if entries > MAX_AUTHZ_ENTRIES {
        cx.error(
            at,
            "spec.authorization.rules",
            format!("{entries} entries once sources, destinations and ports are combined; at most {MAX_AUTHZ_ENTRIES}"),
        );
    }
    lowered
}

/// Validates `spec.mtls`: the namespaces it names.
pub(super) fn lower_mtls(cx: &mut Cx, at: &At<'_>, spec: &MeshPolicySpec) {
    let empty = BTreeMap::<String, MtlsMode>::new();
    let namespaces = spec.mtls.as_ref().map_or(&empty, |m| &m.namespaces);
    for name in namespaces.keys() {
        if let Err(reason) = names::dns_label(name) {
            cx.error(
                at,
                format!("spec.mtls.namespaces[{name:?}]"),
                format!("{reason}: not a namespace name"),
            );
        }
    }
}

/// Validates `spec.authorization.http` (L7 deny rules).
pub(super) fn lower_http_deny(
    cx: &mut Cx,
    at: &At<'_>,
    policy: &str,
    spec: &MeshPolicySpec,
) -> Vec<crate::settings::HttpDeny> {
    let mut out = Vec::new();
    let Some(authz) = &spec.authorization else {
        return out;
    };
    let mut seen = std::collections::HashSet::new();
    for (i, rule) in authz.http.iter().enumerate() {
        let field = format!("spec.authorization.http[{i}]");
        if let Err(reason) = names::dns_label(&rule.name) {
            cx.error(at, format!("{field}.name"), reason);
        } else if !seen.insert(rule.name.as_str()) {
            cx.error(
                at,
                format!("{field}.name"),
                format!(
                    "{:?} is used by another HTTP rule of this policy",
                    rule.name
                ),
            );
        }
        for (j, p) in rule.paths.iter().enumerate() {
            if !p.starts_with('/') || p.contains(['?', '#', ' ']) {
                cx.error(
                    at,
                    format!("{field}.paths[{j}]"),
                    "must start with '/' and contain no '?', '#' or spaces",
                );
            }
        }
        for (j, m) in rule.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                cx.error(
                    at,
                    format!("{field}.methods[{j}]"),
                    format!("{m:?} is not an upper-case method name"),
                );
            }
        }
        for name in rule.headers.keys() {
            if let Err(reason) = names::header_name(name) {
                cx.error(at, format!("{field}.headers[{name:?}]"), reason);
            }
        }
        let source = lower_source(
            cx,
            at,
            &field,
            &rule.name,
            &rule.principals,
            &rule.namespaces,
        );
        if rule.paths.is_empty()
            && rule.methods.is_empty()
            && rule.headers.is_empty()
            && source.is_empty()
        {
            cx.error(
                at,
                &field,
                "denies every request: give at least one of paths, methods, headers, principals, namespaces",
            );
        }
        out.push(crate::settings::HttpDeny {
            name: format!("{policy}/{}", rule.name),
            paths: rule
                .paths
                .iter()
                .map(|p| p.trim_end_matches('/').to_string())
                .collect(),
            methods: rule.methods.clone(),
            headers: rule
                .headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect(),
            source,
        });
    }
    out
}

/// Validates a MeshPolicy, appends its capture entries, returns its detection timeout.
pub(super) fn lower_mesh_policy(
    cx: &mut Cx,
    at: &At<'_>,
    spec: &MeshPolicySpec,
    capture: &mut Vec<CaptureRule>,
) -> Option<Duration> {
    for (i, entry) in spec.capture.iter().enumerate() {
        if let Some(lowered) = lower_capture(cx, at, &format!("spec.capture[{i}]"), entry) {
            capture.push(lowered);
        }
    }
    if let Some(headers) = &spec.headers {
        for (name, value) in &headers.set {
            let field = format!("spec.headers.set[{name:?}]");
            if let Err(reason) = names::header_name(name) {
                cx.error(at, &field, reason);
            } else if value.contains(['\r', '\n', '\0']) || value.len() > MAX_VALUE_LEN {
                cx.error(
                    at,
                    &field,
                    "value must be at most 4096 characters without CR, LF or NUL",
                );
            }
        }
    }
    let timeout = spec.protocol_detection_timeout.as_deref()?;
    match names::duration(timeout) {
        Ok(d) if d.is_zero() => {
            cx.error(
                at,
                "spec.protocolDetectionTimeout",
                "must be greater than 0",
            );
            None
        }
        Ok(d) => Some(d),
        Err(reason) => {
            cx.error(at, "spec.protocolDetectionTimeout", reason);
            None
        }
    }
}

pub(super) fn lower_capture(
    cx: &mut Cx,
    at: &At<'_>,
    field: &str,
    entry: &CaptureSpec,
) -> Option<CaptureRule> {
    let prefix = match entry.cidr.parse::<Prefix>() {
        Ok(prefix) => Some(prefix),
        Err(reason) => {
            cx.error(at, format!("{field}.cidr"), reason);
            None
        }
    };
    let mut ports = Vec::new();
    for (i, spec) in entry.ports.iter().enumerate() {
        match PortRange::from_spec(spec) {
            Ok(range) => ports.push(range),
            Err(reason) => cx.error(at, format!("{field}.ports[{i}]"), reason),
        }
    }
    if entry.ports.is_empty() {
        ports.push(PortRange::ALL);
    }
    let prefix = prefix?;
    (ports.len() == entry.ports.len().max(1)).then_some(CaptureRule { prefix, ports })
}
