//! L4 authorization: writes the authorization part of a kernel plan into the maps of the
//! `authorize_tc` (TC) and `authorize` (XDP) programs (types in `mesh_common::authz`), attaches
//! one of them to each interface, reads their counters.
//!
//! Where it runs ([`hook_for`]): on a veth, at TC ingress before `capture`. An XDP program on a
//! veth, even one that only passes, takes TSO/GSO from the pod's side of the pair, so the pod's
//! traffic crosses the veth one MTU-sized segment at a time (issue 11's bench: untargeted iperf3
//! at 13 % of the rate without programs; a no-op XDP program alone does the same). At TC a GSO
//! packet is decided once. On any other device (a NIC whose driver runs XDP), XDP drops a denied
//! packet before an skb exists.
//!
//! The plan (`mesh_policy::AuthzPlan`) already holds the trie entries and the closure of rules
//! each one needs; this module gives each rule a stable counter id ([`RuleIds`]), encodes rules
//! and lists in the kernel layout, stores identical lists once and resolves interface names.
//!
//! Semantics, per packet: any matching deny -> drop; else any matching allow -> pass; else the
//! interface's default action (allow for an interface no rule set names). See
//! `mesh-ebpf/src/authz.rs` for fragments, neighbour discovery and unparsable packets.
//!
//! Reloads are atomic: [`write`] fills the inactive generation completely, flips the one-slot
//! generation array, waits for an RCU grace period (so no program run still reads the old
//! generation), then clears the old one. Write before [`attach`] so that a program replacing a
//! previous agent's starts with the rules in place.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
    programs::{SchedClassifier, Xdp},
};
use mesh_common::authz::{
    self as maps, ACTION_ALLOW, ACTION_DENY, ANY_IFINDEX, Counters, DstV4, DstV6, IfaceCounters,
    PROTO_ANY, PROTO_TCP, PROTO_UDP, RuleEntry, RuleList,
};
use mesh_policy::{
    AuthzAction, AuthzPlan, AuthzProtocol, AuthzRule, Family, InterfaceName, Prefix,
};
use tracing::info;

use super::{
    Error,
    attach::{self, Attached},
    maps::{self as m, err as map_err},
    netlink,
};

/// Name of the XDP program in the eBPF object.
pub const PROGRAM: &str = "authorize";
/// Name of the TC program in the eBPF object: the same decision at TC ingress.
pub const TC_PROGRAM: &str = "authorize_tc";

/// Where an interface's authorization runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `authorize_tc` at TC ingress, before `capture`: veths.
    Tc,
    /// `authorize` at XDP: every other device.
    Xdp,
}

/// TC for a veth (XDP there would cost the pod its TSO/GSO), XDP for other devices. An
/// interface whose kind cannot be read gets XDP, as every interface did before.
pub fn hook_for(iface: &InterfaceName) -> Hook {
    match netlink::link_kind(iface).as_deref() {
        Some("veth") => Hook::Tc,
        _ => Hook::Xdp,
    }
}
/// Waited after flipping generations when the kernel refuses `membarrier(MEMBARRIER_CMD_GLOBAL)`
/// (nohz_full); program runs take microseconds.
const GRACE_FALLBACK: Duration = Duration::from_millis(50);

/// Stable counter ids of the rules, by rule key: a rule keeps its id (and its counters) across
/// reloads; the id of a rule that left is given to the next new rule, its counters zeroed.
#[derive(Debug, Default)]
pub struct RuleIds {
    by_key: HashMap<String, u32>,
}

impl RuleIds {
    /// The id of each of `rules` (same order), and the ids handed out anew, whose counter slots
    /// must be zeroed before use. Ids are 1-based slots below `MAX_RULE_ID`; the plan has
    /// checked that the rules fit.
    pub fn assign(&mut self, rules: &[AuthzRule]) -> (Vec<u32>, Vec<u32>) {
        let keys: BTreeSet<&str> = rules.iter().map(|r| r.key.as_str()).collect();
        self.by_key.retain(|k, _| keys.contains(k.as_str()));
        let mut used: BTreeSet<u32> = self.by_key.values().copied().collect();
        let mut fresh = Vec::new();
        let mut next = 1u32;
        let ids = rules
            .iter()
            .map(|r| {
                if let Some(id) = self.by_key.get(&r.key) {
                    return *id;
                }
                while used.contains(&next) {
                    next += 1;
                }
                used.insert(next);
                fresh.push(next);
                self.by_key.insert(r.key.clone(), next);
                next
            })
            .collect();
        (ids, fresh)
    }
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets and bytes each rule decided, by rule id: the rules of the active rule set, and
    /// earlier rules whose counters moved.
    pub rules: BTreeMap<u32, Counters>,
    /// Packets no rule decided, by ifindex.
    pub interfaces: BTreeMap<u32, IfaceStats>,
}

/// Counters of one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceStats {
    /// The interface's name in the current network namespace, if it still exists.
    pub name: Option<String>,
    pub counters: IfaceCounters,
}

/// Network-order mask bytes of a prefix length, IPv4 in the first 4 bytes.
fn mask_bytes(len: u8) -> [u8; 16] {
    let mut m = [0u8; 16];
    for (i, b) in m.iter_mut().enumerate() {
        let bits = (len as usize).saturating_sub(i * 8).min(8);
        *b = (0xffu16 << (8 - bits)) as u8;
    }
    m
}

fn addr_bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn action(a: AuthzAction) -> u8 {
    match a {
        AuthzAction::Allow => ACTION_ALLOW,
        AuthzAction::Deny => ACTION_DENY,
    }
}

/// The kernel encoding of one rule.
fn rule_entry(r: &AuthzRule, id: u32) -> RuleEntry {
    let (src_be, src_mask_be) = match r.src {
        Some(p) => (
            maps::words(addr_bytes(p.addr())),
            maps::words(mask_bytes(p.len())),
        ),
        None => ([0; 2], [0; 2]),
    };
    let (port_first, port_last, match_ports) = match r.ports {
        Some(p) => (p.first(), p.last(), 1),
        None => (0, u16::MAX, 0),
    };
    RuleEntry {
        src_be,
        src_mask_be,
        id,
        port_first,
        port_last,
        protocol: match r.protocol {
            Some(AuthzProtocol::Tcp) => PROTO_TCP,
            Some(AuthzProtocol::Udp) => PROTO_UDP,
            None => PROTO_ANY,
        },
        action: action(r.action),
        match_ports,
        _pad: [0; 5],
    }
}

/// The bytes of a list, as a dedup key (entries past `count` are zero).
fn list_bytes(l: &RuleList) -> Vec<u8> {
    let mut v = Vec::with_capacity(size_of::<RuleList>());
    v.extend_from_slice(&l.count.to_ne_bytes());
    v.push(l.default_action);
    for r in &l.rules[..l.count as usize] {
        for w in r.src_be.iter().chain(&r.src_mask_be) {
            v.extend_from_slice(&w.to_ne_bytes());
        }
        v.extend_from_slice(&r.id.to_ne_bytes());
        v.extend_from_slice(&r.port_first.to_ne_bytes());
        v.extend_from_slice(&r.port_last.to_ne_bytes());
        v.extend_from_slice(&[r.protocol, r.action, r.match_ports]);
    }
    v
}

/// The LPM key of an IPv4 entry: all 32 ifindex bits plus the destination prefix.
fn key_v4(ifindex: u32, dst: Option<Prefix>) -> aya::maps::lpm_trie::Key<DstV4> {
    let (addr_be, len) = match dst.map(|d| (d.addr(), d.len())) {
        Some((IpAddr::V4(a), l)) => (a.octets(), l),
        _ => ([0; 4], 0),
    };
    aya::maps::lpm_trie::Key::new(32 + u32::from(len), DstV4 { ifindex, addr_be })
}

/// The LPM key of an IPv6 entry.
fn key_v6(ifindex: u32, dst: Option<Prefix>) -> aya::maps::lpm_trie::Key<DstV6> {
    let (addr_be, len) = match dst.map(|d| (d.addr(), d.len())) {
        Some((IpAddr::V6(a), l)) => (a.octets(), l),
        _ => ([0; 16], 0),
    };
    aya::maps::lpm_trie::Key::new(32 + u32::from(len), DstV6 { ifindex, addr_be })
}

/// Makes the program enforce `plan`, atomically: packets see the previous rule set or this
/// one, never a mix or nothing. `ids[i]` is the counter id of `plan.rules[i]`; counters of
/// `fresh` ids are zeroed first. Interface names are resolved in the current network namespace.
pub fn write(bpf: &mut Ebpf, plan: &AuthzPlan, ids: &[u32], fresh: &[u32]) -> Result<(), Error> {
    let mut ifindexes: BTreeMap<&InterfaceName, u32> = BTreeMap::new();
    let mut unknown = Vec::new();
    for name in plan.entries.iter().filter_map(|e| e.iface.as_ref()) {
        if ifindexes.contains_key(name) {
            continue;
        }
        match nix::net::if_::if_nametoindex(name.as_str()) {
            Ok(idx) => {
                ifindexes.insert(name, idx);
            }
            Err(_) => {
                if !unknown.contains(&name.to_string()) {
                    unknown.push(name.to_string());
                }
            }
        }
    }
    if !unknown.is_empty() {
        return Err(Error::UnknownInterfaces(unknown));
    }
    zero_counters(bpf, fresh)?;

    let active = active_generation(bpf)?;
    let next = 1 - active;
    // A failed earlier write may have left part of a generation behind.
    clear_generation(bpf, next)?;

    let mut list_ids: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut lists: Vec<(u32, RuleList)> = Vec::new();
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for e in &plan.entries {
        let mut list = RuleList {
            count: e.rules.len() as u32,
            default_action: action(e.default),
            ..Default::default()
        };
        for (slot, &i) in list.rules.iter_mut().zip(&e.rules) {
            *slot = rule_entry(&plan.rules[i], ids[i]);
        }
        let n = list_ids.len() as u32;
        let id = *list_ids.entry(list_bytes(&list)).or_insert_with(|| {
            lists.push((n, list));
            n
        });
        let ifindex = e.iface.as_ref().map_or(ANY_IFINDEX, |name| ifindexes[name]);
        match e.family {
            Family::V4 => v4.push((key_v4(ifindex, e.dst), id)),
            Family::V6 => v6.push((key_v6(ifindex, e.dst), id)),
        }
    }

    // Lists first: every trie entry of the new generation finds its list.
    {
        let name = maps::MAP_LISTS[next as usize];
        let mut lm: BpfHashMap<_, u32, RuleList> = m::get_mut(bpf, name)?;
        for (id, list) in &lists {
            lm.insert(id, list, 0).map_err(map_err(name))?;
        }
    }
    {
        let name = maps::MAP_V4[next as usize];
        let mut t: LpmTrie<_, DstV4, u32> = m::get_mut(bpf, name)?;
        for (k, id) in &v4 {
            t.insert(k, id, 0).map_err(map_err(name))?;
        }
    }
    {
        let name = maps::MAP_V6[next as usize];
        let mut t: LpmTrie<_, DstV6, u32> = m::get_mut(bpf, name)?;
        for (k, id) in &v6 {
            t.insert(k, id, 0).map_err(map_err(name))?;
        }
    }

    let mut slot = next;
    if plan.entries.iter().any(|e| e.iface.is_some()) {
        slot |= maps::HAS_IFACE_ENTRIES;
    }
    if plan.entries.iter().any(|e| e.iface.is_none()) {
        slot |= maps::HAS_ANY_ENTRIES;
    }
    generation_map(bpf)?
        .set(0, slot, 0)
        .map_err(map_err(maps::MAP_GENERATION))?;
    wait_for_readers();
    clear_generation(bpf, active)?;
    info!(
        generation = next,
        rules = plan.rules.len(),
        v4_entries = v4.len(),
        v6_entries = v6.len(),
        lists = lists.len(),
        "authorization rules applied"
    );
    Ok(())
}

/// Zeroes the counter slots of ids that now belong to new rules.
fn zero_counters(bpf: &mut Ebpf, ids: &[u32]) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let name = maps::MAP_RULE_STATS;
    let cpus =
        aya::util::nr_cpus().map_err(|(_, e)| Error::Bpffs(format!("counting CPUs: {e}")))?;
    let mut arr: PerCpuArray<_, Counters> = m::get_mut(bpf, name)?;
    for id in ids {
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(|e| Error::Bpffs(format!("counter values: {e}")))?;
        arr.set(*id, zero, 0).map_err(map_err(name))?;
    }
    Ok(())
}

fn generation_map(bpf: &mut Ebpf) -> Result<Array<&mut MapData, u32>, Error> {
    let name = maps::MAP_GENERATION;
    m::get_mut(bpf, name)
}

fn active_generation(bpf: &Ebpf) -> Result<u32, Error> {
    let name = maps::MAP_GENERATION;
    let arr: Array<_, u32> =
        Array::try_from(bpf.map(name).ok_or(Error::MissingMap(name))?).map_err(map_err(name))?;
    Ok(arr.get(&0, 0).map_err(map_err(name))? & maps::GENERATION_BIT)
}

/// Empties generation `g`'s tries, then its lists.
fn clear_generation(bpf: &mut Ebpf, g: u32) -> Result<(), Error> {
    {
        let name = maps::MAP_V4[g as usize];
        let mut t: LpmTrie<_, DstV4, u32> =
            LpmTrie::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(map_err(name))?;
        let keys: Vec<_> = t.keys().filter_map(Result::ok).collect();
        for k in keys {
            t.remove(&k).map_err(map_err(name))?;
        }
    }
    {
        let name = maps::MAP_V6[g as usize];
        let mut t: LpmTrie<_, DstV6, u32> =
            LpmTrie::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(map_err(name))?;
        let keys: Vec<_> = t.keys().filter_map(Result::ok).collect();
        for k in keys {
            t.remove(&k).map_err(map_err(name))?;
        }
    }
    let name = maps::MAP_LISTS[g as usize];
    let mut m: BpfHashMap<_, u32, RuleList> =
        BpfHashMap::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?)
            .map_err(map_err(name))?;
    let keys: Vec<_> = m.keys().filter_map(Result::ok).collect();
    for k in keys {
        m.remove(&k).map_err(map_err(name))?;
    }
    Ok(())
}

/// Returns once every program run that may have read the previous generation has finished.
fn wait_for_readers() {
    // Both hooks run inside an RCU read-side section; MEMBARRIER_CMD_GLOBAL waits for an RCU grace
    // period (synchronize_rcu) on every kernel this agent supports, except with nohz_full.
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers; it only blocks.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(GRACE_FALLBACK);
    }
}

/// Attaches the authorization program [`hook_for`] picks to each interface (see [`attach::tc`]
/// with [`attach::AUTHZ_SLOT`], and [`attach::xdp`]), loading it once; links are pinned at
/// `<pin_dir>/authz-<iface>`, so authorization outlives the agent. A previous agent's link of
/// the other hook there (an XDP link on a veth, from agents before TC authorization) cannot be
/// reused: its pin is removed and the new link attached, so the old program leaves with the
/// last reference to its link. `tcx`: the kernel has TCX links (see [`attach::tc`]).
pub fn attach(
    bpf: &mut Ebpf,
    interfaces: &[InterfaceName],
    pin_dir: &Path,
    tcx: bool,
) -> Result<Vec<Attached>, Error> {
    std::fs::create_dir_all(pin_dir).map_err(|e| Error::Pin {
        path: pin_dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    interfaces
        .iter()
        .map(|iface| {
            let pin = pin_dir.join(format!("authz-{iface}"));
            match hook_for(iface) {
                Hook::Tc => attach::tc(tc_program(bpf)?, attach::AUTHZ_SLOT, iface, &pin, tcx),
                Hook::Xdp => attach::xdp(program(bpf)?, iface, &pin),
            }
        })
        .collect()
}

/// The loaded `authorize_tc` program.
pub fn tc_program(bpf: &mut Ebpf) -> Result<&mut SchedClassifier, Error> {
    super::classifier(bpf, TC_PROGRAM)
}

/// The loaded `authorize` (XDP) program.
pub fn program(bpf: &mut Ebpf) -> Result<&mut Xdp, Error> {
    let prog: &mut Xdp = bpf
        .program_mut(PROGRAM)
        .ok_or(Error::MissingProgram(PROGRAM))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    Ok(prog)
}

/// Counters summed over CPUs: every rule of the active rule set and every rule id that counted
/// packets, and every interface the program counted a default decision on.
pub fn stats(bpf: &Ebpf) -> Result<Stats, Error> {
    let g = active_generation(bpf)?;
    let mut ids = BTreeSet::new();
    {
        let name = maps::MAP_LISTS[g as usize];
        let m: BpfHashMap<_, u32, RuleList> =
            BpfHashMap::try_from(bpf.map(name).ok_or(Error::MissingMap(name))?)
                .map_err(map_err(name))?;
        for item in m.iter() {
            let (_, list) = item.map_err(map_err(name))?;
            ids.extend(list.rules.iter().take(list.count as usize).map(|r| r.id));
        }
    }
    let mut out = Stats::default();
    let name = maps::MAP_RULE_STATS;
    let arr: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(bpf.map(name).ok_or(Error::MissingMap(name))?)
            .map_err(map_err(name))?;
    // Rules removed since keep their (monotonic) counts until their id is reused.
    for (id, per_cpu) in arr.iter().enumerate() {
        let mut sum = Counters::default();
        for c in per_cpu.map_err(map_err(name))?.iter() {
            sum += *c;
        }
        let id = id as u32;
        if sum.packets != 0 || ids.contains(&id) {
            out.rules.insert(id, sum);
        }
    }
    let name = maps::MAP_IFACE_STATS;
    let m: PerCpuHashMap<_, u32, IfaceCounters> =
        PerCpuHashMap::try_from(bpf.map(name).ok_or(Error::MissingMap(name))?)
            .map_err(map_err(name))?;
    for item in m.iter() {
        let (ifindex, per_cpu) = item.map_err(map_err(name))?;
        let mut counters = IfaceCounters::default();
        for c in per_cpu.iter() {
            counters += *c;
        }
        let name = nix::net::if_::if_indextoname(ifindex)
            .ok()
            .and_then(|n| n.into_string().ok());
        out.interfaces
            .insert(ifindex, IfaceStats { name, counters });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(s: &str) -> Prefix {
        s.parse().expect("prefix")
    }

    fn rule(dst: Option<&str>, action: AuthzAction) -> AuthzRule {
        AuthzRule {
            key: "k".into(),
            rule: "r".into(),
            action,
            interfaces: None,
            src: None,
            dst: dst.map(prefix),
            ports: None,
            protocol: None,
        }
    }

    #[test]
    fn rule_entries_encode_prefix_ports_protocol() {
        let mut r = rule(Some("10.1.2.0/24"), AuthzAction::Deny);
        r.src = Some(prefix("172.16.5.9/12"));
        r.ports = mesh_policy::PortRange::new(9000, 9010);
        r.protocol = Some(AuthzProtocol::Udp);
        let e = rule_entry(&r, 7);
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[172, 16, 0, 0]);
        let mut mask = [0u8; 16];
        mask[..4].copy_from_slice(&[255, 240, 0, 0]);
        assert_eq!(
            (e.src_be, e.src_mask_be),
            (maps::words(src), maps::words(mask))
        );
        assert_eq!((e.port_first, e.port_last, e.match_ports), (9000, 9010, 1));
        assert_eq!((e.protocol, e.action, e.id), (PROTO_UDP, ACTION_DENY, 7));
        let src = |a: [u8; 4]| {
            let mut s = [0u8; 16];
            s[..4].copy_from_slice(&a);
            maps::words(s)
        };
        assert!(e.matches(&src([172, 31, 1, 1]), PROTO_UDP, 1, 9005, 1));
        assert!(!e.matches(&src([172, 32, 1, 1]), PROTO_UDP, 1, 9005, 1));
        assert!(!e.matches(&src([172, 16, 1, 1]), PROTO_TCP, 1, 9005, 1));
        assert!(!e.matches(&src([172, 16, 1, 1]), PROTO_UDP, 1, 9011, 1));
        // No port (a later fragment): a rule with ports does not match.
        assert!(!e.matches(&src([172, 16, 1, 1]), PROTO_UDP, 1, 0, 0));

        let any = rule_entry(&rule(None, AuthzAction::Allow), 8);
        assert_eq!(
            (any.match_ports, any.protocol, any.src_mask_be),
            (0, PROTO_ANY, [0; 2])
        );
        assert!(any.matches(&[7; 2], 1, 1, 0, 0));
        assert!(any.matches(&[7; 2], 0, 0, 0, 0));
        assert_eq!(mask_bytes(0), [0; 16]);
        assert_eq!(mask_bytes(128), [0xff; 16]);
        assert_eq!(mask_bytes(13)[..3], [0xff, 0xf8, 0]);
    }

    #[test]
    fn ids_are_stable_and_recycled() {
        let keyed = |k: &str| AuthzRule {
            key: k.into(),
            ..rule(None, AuthzAction::Allow)
        };
        let mut ids = RuleIds::default();
        assert_eq!(
            ids.assign(&[keyed("a"), keyed("b")]),
            (vec![1, 2], vec![1, 2])
        );
        // b keeps its id; a left, so c gets its slot (to be zeroed).
        assert_eq!(ids.assign(&[keyed("b"), keyed("c")]), (vec![2, 1], vec![1]));
        assert_eq!(ids.assign(&[keyed("c"), keyed("b")]), (vec![1, 2], vec![]));
    }

    #[test]
    fn keys_hold_the_ifindex_then_the_masked_destination() {
        let k = key_v4(7, Some(prefix("10.1.2.3/16")));
        assert_eq!(k.prefix_len(), 48);
        assert_eq!(
            k.data(),
            DstV4 {
                ifindex: 7,
                addr_be: [10, 1, 0, 0]
            }
        );
        let root = key_v4(7, None);
        assert_eq!((root.prefix_len(), root.data().addr_be), (32, [0; 4]));
        let k6 = key_v6(0, Some(prefix("fd00:201:1::2/48")));
        assert_eq!(k6.prefix_len(), 80);
        assert_eq!(
            k6.data().addr_be,
            "fd00:201:1::"
                .parse::<std::net::Ipv6Addr>()
                .expect("v6")
                .octets()
        );
        // The byte layout the kernel compares: prefix_len, then ifindex, then the address.
        assert_eq!(size_of::<aya::maps::lpm_trie::Key<DstV4>>(), 12);
        assert_eq!(size_of::<aya::maps::lpm_trie::Key<DstV6>>(), 24);
        // SAFETY: Key<DstV4> is repr(C, packed) plain data; reading its 12 bytes.
        let bytes: [u8; 12] = unsafe { std::mem::transmute(k) };
        assert_eq!(bytes[..4], 48u32.to_ne_bytes());
        assert_eq!(bytes[4..8], 7u32.to_ne_bytes());
        assert_eq!(bytes[8..], [10, 1, 0, 0]);
    }
}
