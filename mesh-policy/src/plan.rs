//! The kernel plan: everything the eBPF programs must enforce, compiled from the policy plus the
//! node's own settings into one typed value. The agent's eBPF code only writes a plan; it never
//! parses, merges or validates. Every kernel limit (`mesh_common`) is checked here, so a policy
//! that cannot fit is rejected with the entry at fault named, before any map is touched.
//!
//! ```text
//! MeshPolicy / Service VIPs ─┐
//!                            ├─ Compiled::kernel_plan ─► KernelPlan ─► agent ebpf writers
//! agent config (NodeSettings)┘    capture: prefix -> merged port ranges   CAPTURE_V4/V6
//!                                 authz:   rules + closure entries        AUTHZ_* (generation swap)
//!                                 interfaces, fail mode                   attach, CAPTURE_SETTINGS
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use mesh_common::{authz as kauthz, mtls as kmtls, redirect};
use serde::Serialize;

use crate::{
    AuthzAction, Compiled, FailMode, MtlsMode,
    compiled::CaptureRule,
    net::{InterfaceName, Prefix, merge_ranges},
    settings::AuthzRule,
};

/// The node's own part of the plan: what the agent's configuration (or, in Kubernetes mode, the
/// node's enrolled pods) adds to the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSettings {
    /// Host-side interfaces to capture on and authorize at.
    pub interfaces: Vec<InterfaceName>,
    /// Destinations captured besides those the policy implies.
    pub capture: Vec<CaptureRule>,
    /// Overrides the policy's fail mode when set.
    pub fail_mode: Option<FailMode>,
    /// With the mesh on (the agent's `mesh:`), this node's IP: the enrolled pods on it whose
    /// namespace is STRICT are refused plaintext. Without the mesh there is no tunnel to
    /// arrive through, so nothing is STRICT.
    pub mesh_node_ip: Option<IpAddr>,
}

/// What the kernel must enforce.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelPlan {
    /// What the capture program does with a targeted SYN while no listener exists.
    pub fail_mode: FailMode,
    /// Interfaces the programs are attached to, sorted, each once.
    pub interfaces: Vec<InterfaceName>,
    /// One entry per prefix, sorted by prefix, ports merged; fits `CAPTURE_V4`/`CAPTURE_V6`.
    pub capture: Vec<CaptureRule>,
    /// L4 authorization for the XDP program.
    pub authz: AuthzPlan,
    /// Addresses of this node's enrolled pods in STRICT namespaces, sorted: a connection
    /// opening that the node forwards to one of them in plaintext is dropped.
    pub strict: Vec<IpAddr>,
}

/// Why a plan cannot be built: each message names the entry at fault and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the policy does not fit the kernel maps: {}", .0.join("; "))]
pub struct PlanError(pub Vec<String>);

impl Compiled {
    /// The plan for this policy on a node with `node`'s settings.
    pub fn kernel_plan(&self, node: &NodeSettings) -> Result<KernelPlan, PlanError> {
        let mut errors = Vec::new();
        let capture = capture(self.capture().iter().chain(&node.capture), &mut errors);
        let authorization = &self.settings().authorization;
        let authz = AuthzPlan::compile(authorization.rules.clone(), authorization.defaults.clone())
            .unwrap_or_else(|e| {
                errors.extend(e);
                AuthzPlan::default()
            });
        let strict = self.strict_destinations(node.mesh_node_ip, &mut errors);
        if !errors.is_empty() {
            return Err(PlanError(errors));
        }
        let interfaces: BTreeSet<InterfaceName> = node.interfaces.iter().cloned().collect();
        Ok(KernelPlan {
            fail_mode: node.fail_mode.unwrap_or(self.settings().fail_mode),
            interfaces: interfaces.into_iter().collect(),
            capture,
            authz,
            strict,
        })
    }

    /// The enrolled workloads on the node at `node_ip` whose namespace is STRICT.
    fn strict_destinations(
        &self,
        node_ip: Option<IpAddr>,
        errors: &mut Vec<String>,
    ) -> Vec<IpAddr> {
        let Some(node_ip) = node_ip else {
            return Vec::new();
        };
        let strict: BTreeSet<IpAddr> = self
            .workloads()
            .filter(|w| w.enrolled && (w.node_ip == Some(node_ip) || w.node_ips.contains(&node_ip)))
            .filter(|w| self.mtls_mode(&w.namespace) == MtlsMode::Strict)
            .flat_map(|w| w.ips.iter().map(|ip| ip.to_canonical()))
            .collect();
        let v4 = strict.iter().filter(|a| a.is_ipv4()).count();
        for (family, n) in [("IPv4", v4), ("IPv6", strict.len() - v4)] {
            if n > kmtls::MAX_STRICT as usize {
                errors.push(format!(
                    "mtls: {n} {family} addresses of STRICT pods on this node; at most {} fit",
                    kmtls::MAX_STRICT
                ));
            }
        }
        strict.into_iter().collect()
    }
}

/// Groups capture rules by prefix with merged ports, checking the map limits.
fn capture<'a>(
    rules: impl Iterator<Item = &'a CaptureRule>,
    errors: &mut Vec<String>,
) -> Vec<CaptureRule> {
    let mut by_prefix: BTreeMap<Prefix, Vec<crate::PortRange>> = BTreeMap::new();
    for r in rules {
        by_prefix
            .entry(r.prefix)
            .or_default()
            .extend(r.ports.iter().copied());
    }
    let mut out = Vec::with_capacity(by_prefix.len());
    let mut per_family = [0usize; 2];
    for (prefix, ports) in by_prefix {
        let ports = merge_ranges(ports);
        if ports.is_empty() {
            errors.push(format!("capture {prefix}: no ports"));
        } else if ports.len() > redirect::MAX_PORT_RANGES {
            errors.push(format!(
                "capture {prefix}: {} separate port ranges; at most {} fit in one entry",
                ports.len(),
                redirect::MAX_PORT_RANGES
            ));
        }
        per_family[usize::from(!prefix.is_ipv4())] += 1;
        out.push(CaptureRule { prefix, ports });
    }
    for (family, n) in ["IPv4", "IPv6"].iter().zip(per_family) {
        if n > redirect::MAX_PREFIXES as usize {
            errors.push(format!(
                "capture: {n} {family} prefixes; at most {} fit",
                redirect::MAX_PREFIXES
            ));
        }
    }
    out
}

/// Address family of an authorization entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn of(p: &Prefix) -> Family {
        if p.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// Authorization rules and the trie entries that enforce them.
///
/// Every interface a rule or a default names gets a root entry per address family (any
/// destination) holding its default action and its rules without a destination, plus one entry
/// per destination prefix of its rules. Rules for all interfaces go to entries without an
/// interface, which the program looks up as well. The rule list of an entry holds the rules of
/// that prefix and of every less specific prefix of the same scope that covers it (the
/// closure), so the program's single longest-prefix match finds every rule that can apply;
/// deny rules come first.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuthzPlan {
    /// The rules, in policy order; entries refer to them by index.
    pub rules: Vec<AuthzRule>,
    /// Action for traffic no rule matches, per interface (allow when absent).
    pub defaults: BTreeMap<InterfaceName, AuthzAction>,
    /// The trie entries.
    pub entries: Vec<AuthzEntry>,
}

/// One trie entry of an [`AuthzPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthzEntry {
    /// `None`: every interface the program is attached to.
    pub iface: Option<InterfaceName>,
    /// The entry's family.
    pub family: Family,
    /// `None`: the root entry (any destination of `family`).
    pub dst: Option<Prefix>,
    /// Indices into [`AuthzPlan::rules`] of every rule that applies, deny rules first.
    pub rules: Vec<usize>,
    /// The action when none of them matches.
    pub default: AuthzAction,
}

impl AuthzPlan {
    /// Whether there is nothing to enforce (the XDP program need not be attached).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.defaults.is_empty()
    }

    /// Computes the entries of `rules`, checking that they fit the kernel maps; every problem
    /// found is returned, naming the rule or entry at fault.
    pub fn compile(
        rules: Vec<AuthzRule>,
        defaults: BTreeMap<InterfaceName, AuthzAction>,
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        // Rule ids are 1-based slots of the per-rule counter array.
        if rules.len() >= kauthz::MAX_RULE_ID as usize {
            errors.push(format!(
                "authorization: {} rule entries; at most {} fit",
                rules.len(),
                kauthz::MAX_RULE_ID - 1
            ));
        }
        for r in &rules {
            if let (Some(s), Some(d)) = (r.src, r.dst)
                && s.is_ipv4() != d.is_ipv4()
            {
                errors.push(format!(
                    "authorization rule {}: source {s} and destination {d} are of different address families",
                    r.key
                ));
            }
            if r.interfaces.as_ref().is_some_and(Vec::is_empty) {
                errors.push(format!(
                    "authorization rule {}: empty interface list (leave it out for all interfaces)",
                    r.key
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let mut scopes: BTreeSet<Option<&InterfaceName>> = defaults.keys().map(Some).collect();
        for r in &rules {
            match &r.interfaces {
                Some(list) => scopes.extend(list.iter().map(Some)),
                None => {
                    scopes.insert(None);
                }
            }
        }
        let mut entries = Vec::new();
        let mut per_family = [0usize; 2];
        for scope in scopes {
            let in_scope: Vec<usize> = (0..rules.len())
                .filter(|&i| match (&rules[i].interfaces, scope) {
                    (None, None) => true,
                    (Some(list), Some(iface)) => list.contains(iface),
                    _ => false,
                })
                .collect();
            let default = scope
                .and_then(|i| defaults.get(i).copied())
                .unwrap_or(AuthzAction::Allow);
            for family in [Family::V4, Family::V6] {
                let of_family: Vec<usize> = in_scope
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let r = &rules[i];
                        r.src.or(r.dst).is_none_or(|p| Family::of(&p) == family)
                    })
                    .collect();
                let mut dsts: BTreeSet<Option<Prefix>> =
                    of_family.iter().map(|&i| rules[i].dst).collect();
                // An interface always has a root entry: it carries the default action.
                if scope.is_some() {
                    dsts.insert(None);
                }
                for dst in dsts {
                    let mut applying: Vec<usize> = of_family
                        .iter()
                        .copied()
                        .filter(|&i| match (rules[i].dst, dst) {
                            (None, _) => true,
                            (Some(_), None) => false,
                            (Some(r), Some(d)) => r.covers(&d),
                        })
                        .collect();
                    applying.sort_by_key(|&i| (rules[i].action != AuthzAction::Deny, i));
                    if applying.len() > kauthz::MAX_LIST_RULES {
                        let names: Vec<&str> =
                            applying.iter().map(|&i| rules[i].key.as_str()).collect();
                        errors.push(format!(
                            "authorization on {}, destination {}: {} rules apply ({}) but at most {} fit in one entry",
                            scope.map_or("all interfaces", |i| i.as_str()),
                            dst.map_or_else(|| format!("any {family:?}"), |d| d.to_string()),
                            applying.len(),
                            names.join(", "),
                            kauthz::MAX_LIST_RULES
                        ));
                        continue;
                    }
                    per_family[family as usize] += 1;
                    entries.push(AuthzEntry {
                        iface: scope.cloned(),
                        family,
                        dst,
                        rules: applying,
                        default,
                    });
                }
            }
        }
        for (family, n) in [Family::V4, Family::V6].iter().zip(per_family) {
            if n > kauthz::MAX_PREFIXES as usize {
                errors.push(format!(
                    "authorization: {n} {family:?} destination entries; at most {} fit",
                    kauthz::MAX_PREFIXES
                ));
            }
        }
        let lists: BTreeSet<(&[usize], bool)> = entries
            .iter()
            .map(|e| (e.rules.as_slice(), e.default == AuthzAction::Deny))
            .collect();
        if lists.len() > kauthz::MAX_LISTS as usize {
            errors.push(format!(
                "authorization: {} distinct rule lists; at most {} fit",
                lists.len(),
                kauthz::MAX_LISTS
            ));
        }
        if errors.is_empty() {
            Ok(AuthzPlan {
                rules,
                defaults,
                entries,
            })
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests;
