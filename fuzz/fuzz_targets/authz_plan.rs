//! The authorization rule compiler (`AuthzPlan::compile`) on rules built from the fuzzer's
//! bytes: up to 40 rules over a few interfaces, prefixes of both families with every length,
//! ports and actions. Whenever it compiles, the plan must be the closure the XDP program relies
//! on: every rule index is in range and appears once per entry, deny rules come first, each
//! interface named by a rule or a default has a root entry per family carrying its default, and
//! every rule is listed in the entry of each destination prefix it covers in its scope, and in
//! no entry it cannot apply to.

#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use mesh_policy::{
    AuthzAction, AuthzPlan, AuthzProtocol, AuthzRule, Family, InterfaceName, PortRange, Prefix,
};

/// Reads bytes one at a time, zero once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

const INTERFACES: [&str; 3] = ["veth0", "veth1", "eth0"];

fn interface(b: u8) -> InterfaceName {
    INTERFACES[usize::from(b) % INTERFACES.len()]
        .parse()
        .expect("valid name")
}

/// A prefix from a small address pool (so that prefixes nest and overlap), or none.
fn prefix(bytes: &mut Bytes<'_>) -> Option<Prefix> {
    let kind = bytes.byte();
    let len = bytes.byte();
    let host = bytes.byte();
    match kind % 4 {
        0 => None,
        1 | 2 => {
            let addr = IpAddr::V4(Ipv4Addr::new(10, host % 4, host / 64, host));
            Prefix::new(addr, len % 33)
        }
        _ => {
            let addr = IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0,
                u16::from(host % 4),
                0,
                0,
                0,
                0,
                u16::from(host),
            ));
            Prefix::new(addr, len % 129)
        }
    }
}

fn family_of(p: &Prefix) -> Family {
    if p.is_ipv4() { Family::V4 } else { Family::V6 }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let count = usize::from(bytes.byte() % 41);
    let mut rules = Vec::with_capacity(count);
    for i in 0..count {
        let flags = bytes.byte();
        let interfaces = match flags % 4 {
            0 => None,
            1 => Some(Vec::new()),
            _ => Some(
                (0..1 + flags / 64)
                    .map(|_| interface(bytes.byte()))
                    .collect(),
            ),
        };
        let first = u16::from_le_bytes([bytes.byte(), bytes.byte()]);
        let span = u16::from(bytes.byte());
        rules.push(AuthzRule {
            key: format!("ns/p/r{i}"),
            rule: format!("r{i}"),
            action: if flags & 0x10 != 0 {
                AuthzAction::Deny
            } else {
                AuthzAction::Allow
            },
            interfaces,
            src: prefix(&mut bytes),
            dst: prefix(&mut bytes),
            ports: if flags & 0x20 != 0 {
                PortRange::new(first, first.saturating_add(span))
            } else {
                None
            },
            protocol: match flags / 4 % 3 {
                0 => None,
                1 => Some(AuthzProtocol::Tcp),
                _ => Some(AuthzProtocol::Udp),
            },
        });
    }
    let mut defaults = BTreeMap::new();
    for _ in 0..bytes.byte() % 3 {
        let b = bytes.byte();
        let action = if b & 0x80 != 0 {
            AuthzAction::Deny
        } else {
            AuthzAction::Allow
        };
        defaults.insert(interface(b), action);
    }
    let Ok(plan) = AuthzPlan::compile(rules.clone(), defaults.clone()) else {
        return;
    };
    assert_eq!(plan.rules, rules);
    for entry in &plan.entries {
        let mut seen = entry.rules.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            entry.rules.len(),
            "a rule listed twice: {entry:?}"
        );
        let mut deny_done = false;
        for &i in &entry.rules {
            let rule = &rules[i];
            if rule.action == AuthzAction::Allow {
                deny_done = true;
            } else {
                assert!(!deny_done, "deny after allow in {entry:?}");
            }
            // The rule is in this entry's scope and family, and covers its destination.
            match (&rule.interfaces, &entry.iface) {
                (None, None) => {}
                (Some(list), Some(iface)) => assert!(list.contains(iface), "{entry:?}"),
                _ => panic!("rule {i} in the wrong scope: {entry:?}"),
            }
            if let Some(p) = rule.src.or(rule.dst) {
                assert_eq!(family_of(&p), entry.family, "{entry:?}");
            }
            match (rule.dst, entry.dst) {
                (None, _) => {}
                (Some(_), None) => panic!("rule {i} with a destination in a root entry"),
                (Some(r), Some(d)) => assert!(r.covers(&d), "{entry:?}"),
            }
        }
        if let Some(iface) = &entry.iface {
            let want = defaults.get(iface).copied().unwrap_or(AuthzAction::Allow);
            assert_eq!(entry.default, want, "{entry:?}");
        } else {
            assert_eq!(entry.default, AuthzAction::Allow, "{entry:?}");
        }
    }
    let find = |iface: Option<&InterfaceName>, family: Family, dst: Option<Prefix>| {
        plan.entries
            .iter()
            .find(|e| e.iface.as_ref() == iface && e.family == family && e.dst == dst)
    };
    for iface in defaults.keys() {
        for family in [Family::V4, Family::V6] {
            assert!(
                find(Some(iface), family, None).is_some(),
                "no root entry for {iface}"
            );
        }
    }
    for (i, rule) in rules.iter().enumerate() {
        let scopes: Vec<Option<&InterfaceName>> = match &rule.interfaces {
            None => vec![None],
            Some(list) => list.iter().map(Some).collect(),
        };
        let families = match rule.src.or(rule.dst) {
            Some(p) => vec![family_of(&p)],
            None => vec![Family::V4, Family::V6],
        };
        for scope in scopes {
            for &family in &families {
                let entry = find(scope, family, rule.dst)
                    .unwrap_or_else(|| panic!("no entry for rule {i}: {rule:?}"));
                assert!(
                    entry.rules.contains(&i),
                    "rule {i} missing from its entry {entry:?}"
                );
                // And every more specific destination in the same scope lists it too.
                for entry in plan
                    .entries
                    .iter()
                    .filter(|e| e.iface.as_ref() == scope && e.family == family)
                {
                    if let (Some(r), Some(d)) = (rule.dst, entry.dst) {
                        if r.covers(&d) {
                            assert!(
                                entry.rules.contains(&i),
                                "rule {i} not in the closure of {entry:?}"
                            );
                        }
                    } else if rule.dst.is_none() {
                        assert!(
                            entry.rules.contains(&i),
                            "rule {i} (any destination) not in {entry:?}"
                        );
                    }
                }
            }
        }
    }
});
