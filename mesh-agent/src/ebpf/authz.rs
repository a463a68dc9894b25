//! XDP authorization: attaching the `authorize` program and writing its rule maps.
//!
//! A [`RuleSet`] is compiled into the maps described in `mesh_common::authz`:
//!
//! * Every interface a rule or a default names gets a root entry per address family
//!   (`{ifindex}/32`, any destination) holding its default action and its rules without a
//!   destination, plus one entry per destination prefix of its rules. Rules for all interfaces
//!   (`interfaces: None`) go to entries of ifindex 0, which the program looks up as well; they
//!   apply on every interface the program is attached to.
//! * The list of an entry holds the rules of that prefix and of every less specific prefix of the
//!   same scope that covers it (the closure), so the program's single longest match finds every
//!   rule that can apply. Lists hold deny rules first, then allow rules, each by id; identical
//!   lists are stored once.
//!
//! Semantics, per packet: any matching deny -> drop; else any matching allow -> pass; else the
//! interface's default action (allow for an interface no rule set names). A rule matches when its
//! source prefix, destination prefix, protocol and destination port range (if any) all match; a
//! rule with ports only matches TCP/UDP. See `mesh-ebpf/src/authz.rs` for fragments, neighbour
//! discovery and unparsable packets.
//!
//! Reloads are atomic: [`apply`] fills the inactive generation completely, flips the one-slot
//! generation array, waits for an RCU grace period (so no program run still reads the old
//! generation), then clears the old one. Call [`apply`] before [`attach`] so that a program
//! replacing a previous agent's starts with the rules in place.
//!
//! This file depends only on external crates (aya, mesh-common, nix, libc, thiserror, tracing):
//! the privileged tests compile it directly with `#[path]`.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use mesh_common::authz::{
    self as maps, ACTION_ALLOW, ACTION_DENY, ANY_IFINDEX, Counters, DstV4, DstV6, IfaceCounters,
    MAX_LIST_RULES, PROTO_ANY, PROTO_TCP, PROTO_UDP, RuleEntry, RuleList,
};
use tracing::{info, warn};

/// Name of the XDP program in the eBPF object.
pub const PROGRAM: &str = "authorize";
/// Waited after flipping generations when the kernel refuses `membarrier(MEMBARRIER_CMD_GLOBAL)`
/// (nohz_full); program runs take microseconds.
const GRACE_FALLBACK: Duration = Duration::from_millis(50);

/// Transport protocol a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Any,
}

/// What a matching rule, or an interface's default, does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// One L4 authorization rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Stable id, below [`maps::MAX_RULE_ID`]: it indexes the rule's counters.
    pub id: u32,
    /// For messages and metrics.
    pub name: String,
    /// Host-side interfaces the rule applies to; `None`: every interface.
    pub interfaces: Option<Vec<String>>,
    /// Source prefix; `None`: any source.
    pub src: Option<(IpAddr, u8)>,
    /// Destination prefix; `None`: any destination.
    pub dst: Option<(IpAddr, u8)>,
    /// Inclusive destination port range; `None`: any port, and packets without ports.
    pub ports: Option<(u16, u16)>,
    pub protocol: Protocol,
    pub action: Action,
}

/// A complete rule set: what [`apply`] makes the kernel enforce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Default action per interface; interfaces not listed default to allow.
    pub defaults: HashMap<String, Action>,
}

/// The mode an interface's program runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the driver, before an skb is allocated.
    Driver,
    /// In the stack, on the skb (the device has no native XDP).
    Generic,
    /// A previous agent's link was reused and the kernel did not say which mode it has.
    Unknown,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Driver => "driver",
            Mode::Generic => "generic",
            Mode::Unknown => "unknown",
        }
    }
}

/// An interface the program is attached to, its link pinned at `pin`.
#[derive(Debug)]
pub struct Attached {
    pub iface: String,
    pub mode: Mode,
    /// Whether a previous agent's link was updated in place.
    pub replaced: bool,
    pub pin: PathBuf,
    link: Option<PinnedLink>,
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid authorization rules: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("unknown interfaces in authorization rules: {}", .0.join(", "))]
    UnknownInterfaces(Vec<String>),
    #[error("XDP program {PROGRAM:?}: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("XDP program {PROGRAM:?} is missing from the eBPF object")]
    MissingProgram,
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("attaching XDP to interface {iface:?}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// Address family of a trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(a: &IpAddr) -> Family {
        match a {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    fn max_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

/// One compiled trie entry, interfaces still by name (`None`: all interfaces).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    iface: Option<String>,
    /// Destination prefix, host bits cleared; `None`: the root entry (any destination).
    dst: Option<(IpAddr, u8)>,
    family: Family,
    list: RuleList,
}

impl RuleSet {
    /// Checks everything that can be checked without the kernel: prefix lengths and families,
    /// port ranges, ids, interface names, and that the closure fits in the maps. Each message
    /// names the rule (or entry) at fault.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        self.compile().map(|_| ())
    }

    /// The trie entries of this rule set, or every problem found.
    fn compile(&self) -> Result<Vec<Entry>, Vec<String>> {
        let mut errors = Vec::new();
        let mut ids = BTreeSet::new();
        for r in &self.rules {
            let what = format!("rule {} ({})", r.id, r.name);
            if r.id >= maps::MAX_RULE_ID {
                errors.push(format!("{what}: id must be below {}", maps::MAX_RULE_ID));
            }
            if !ids.insert(r.id) {
                errors.push(format!("{what}: id {} is used by another rule", r.id));
            }
            for (field, p) in [("source", r.src), ("destination", r.dst)] {
                if let Some((addr, len)) = p
                    && len > Family::of(&addr).max_len()
                {
                    errors.push(format!(
                        "{what}: {field} prefix {addr}/{len} is longer than {} bits",
                        Family::of(&addr).max_len()
                    ));
                }
            }
            if let (Some((s, _)), Some((d, _))) = (r.src, r.dst)
                && Family::of(&s) != Family::of(&d)
            {
                errors.push(format!(
                    "{what}: source {s} and destination {d} are of different address families"
                ));
            }
            if let Some((first, last)) = r.ports
                && first > last
            {
                errors.push(format!("{what}: port range {first}-{last} is empty"));
            }
            match &r.interfaces {
                Some(list) if list.is_empty() => errors.push(format!(
                    "{what}: empty interface list (leave it out for all interfaces)"
                )),
                Some(list) => {
                    for i in list {
                        if let Err(e) = check_iface(i) {
                            errors.push(format!("{what}: {e}"));
                        }
                    }
                }
                None => {}
            }
        }
        for iface in self.defaults.keys() {
            if let Err(e) = check_iface(iface) {
                errors.push(format!("default action: {e}"));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        // Scopes: every named interface (rules or defaults), and "all interfaces".
        let mut scopes: BTreeSet<Option<&str>> = self.defaults.keys().map(|i| Some(&**i)).collect();
        for r in &self.rules {
            match &r.interfaces {
                Some(list) => scopes.extend(list.iter().map(|i| Some(&**i))),
                None => {
                    scopes.insert(None);
                }
            }
        }
        let mut entries = Vec::new();
        let mut per_family = [0usize; 2];
        for scope in scopes {
            let in_scope: Vec<&Rule> = self
                .rules
                .iter()
                .filter(|r| match (&r.interfaces, scope) {
                    (None, None) => true,
                    (Some(list), Some(i)) => list.iter().any(|l| l == i),
                    _ => false,
                })
                .collect();
            let default = match scope {
                Some(i) => self.defaults.get(i).copied().unwrap_or(Action::Allow),
                None => Action::Allow,
            };
            for family in [Family::V4, Family::V6] {
                let rules: Vec<&Rule> = in_scope
                    .iter()
                    .copied()
                    .filter(|r| rule_family(r).is_none_or(|f| f == family))
                    .collect();
                let mut dsts: BTreeSet<Option<(IpAddr, u8)>> = rules
                    .iter()
                    .map(|r| r.dst.map(|(a, l)| (mask(a, l), l)))
                    .collect();
                // An interface always has a root entry: it carries the default action.
                if scope.is_some() {
                    dsts.insert(None);
                }
                for dst in dsts {
                    let mut applying: Vec<&Rule> = rules
                        .iter()
                        .copied()
                        .filter(|r| covers(r.dst, dst))
                        .collect();
                    applying.sort_by_key(|r| (r.action != Action::Deny, r.id));
                    let scope_name = scope.unwrap_or("all interfaces");
                    if applying.len() > MAX_LIST_RULES {
                        let names: Vec<String> = applying
                            .iter()
                            .map(|r| format!("{} ({})", r.id, r.name))
                            .collect();
                        errors.push(format!(
                            "{scope_name}, destination {}: {} rules apply ({}) but at most {MAX_LIST_RULES} fit in one entry",
                            show_dst(dst, family),
                            applying.len(),
                            names.join(", ")
                        ));
                        continue;
                    }
                    per_family[family as usize] += 1;
                    entries.push(Entry {
                        iface: scope.map(str::to_string),
                        dst,
                        family,
                        list: rule_list(&applying, default),
                    });
                }
            }
        }
        for (family, n) in [Family::V4, Family::V6].iter().zip(per_family) {
            if n > maps::MAX_PREFIXES as usize {
                errors.push(format!(
                    "{n} {family:?} destination entries; at most {} fit",
                    maps::MAX_PREFIXES
                ));
            }
        }
        let lists: BTreeSet<_> = entries.iter().map(|e| list_bytes(&e.list)).collect();
        if lists.len() > maps::MAX_LISTS as usize {
            errors.push(format!(
                "{} distinct rule lists; at most {} fit",
                lists.len(),
                maps::MAX_LISTS
            ));
        }
        if errors.is_empty() {
            Ok(entries)
        } else {
            Err(errors)
        }
    }
}

fn check_iface(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name.contains(['/', ':'])
        || name.chars().any(char::is_whitespace)
    {
        Err(format!("{name:?} is not a valid interface name"))
    } else {
        Ok(())
    }
}

/// The family a rule is restricted to by its prefixes, if any.
fn rule_family(r: &Rule) -> Option<Family> {
    r.src.or(r.dst).map(|(a, _)| Family::of(&a))
}

/// Whether a rule's destination (`None`: any) covers the entry prefix `dst` (`None`: root).
fn covers(rule: Option<(IpAddr, u8)>, dst: Option<(IpAddr, u8)>) -> bool {
    match (rule, dst) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some((ra, rl)), Some((da, dl))) => {
            Family::of(&ra) == Family::of(&da) && rl <= dl && mask(da, rl) == mask(ra, rl)
        }
    }
}

/// `addr` with the bits past `len` cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - len.min(32) as u32).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - len.min(128) as u32)
                .unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
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

fn show_dst(dst: Option<(IpAddr, u8)>, family: Family) -> String {
    match dst {
        Some((a, l)) => format!("{a}/{l}"),
        None => format!("any {family:?}"),
    }
}

fn rule_list(rules: &[&Rule], default: Action) -> RuleList {
    let mut list = RuleList {
        count: rules.len() as u32,
        default_action: action(default),
        ..Default::default()
    };
    for (slot, r) in list.rules.iter_mut().zip(rules) {
        *slot = rule_entry(r);
    }
    list
}

fn action(a: Action) -> u8 {
    match a {
        Action::Allow => ACTION_ALLOW,
        Action::Deny => ACTION_DENY,
    }
}

fn rule_entry(r: &Rule) -> RuleEntry {
    let (src_be, src_mask_be) = match r.src {
        Some((a, l)) => {
            let m = mask_bytes(l);
            let mut s = addr_bytes(a);
            for (b, m) in s.iter_mut().zip(m) {
                *b &= m;
            }
            (maps::words(s), maps::words(m))
        }
        None => ([0; 2], [0; 2]),
    };
    let (port_first, port_last, match_ports) = match r.ports {
        Some((a, b)) => (a, b, 1),
        None => (0, u16::MAX, 0),
    };
    RuleEntry {
        src_be,
        src_mask_be,
        id: r.id,
        port_first,
        port_last,
        protocol: match r.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
            Protocol::Any => PROTO_ANY,
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
fn key_v4(ifindex: u32, dst: Option<(IpAddr, u8)>) -> aya::maps::lpm_trie::Key<DstV4> {
    let (addr_be, len) = match dst {
        Some((IpAddr::V4(a), l)) => (mask(IpAddr::V4(a), l), l),
        _ => (IpAddr::V4(0.into()), 0),
    };
    let IpAddr::V4(a) = addr_be else {
        unreachable!("masked IPv4 stays IPv4")
    };
    aya::maps::lpm_trie::Key::new(
        32 + len as u32,
        DstV4 {
            ifindex,
            addr_be: a.octets(),
        },
    )
}

/// The LPM key of an IPv6 entry.
fn key_v6(ifindex: u32, dst: Option<(IpAddr, u8)>) -> aya::maps::lpm_trie::Key<DstV6> {
    let (addr_be, len) = match dst {
        Some((a @ IpAddr::V6(_), l)) => (addr_bytes(mask(a, l)), l),
        _ => ([0; 16], 0),
    };
    aya::maps::lpm_trie::Key::new(32 + len as u32, DstV6 { ifindex, addr_be })
}

/// Makes the program enforce `rules`, atomically: packets see the previous rule set or this
/// one, never a mix or nothing. Interface names are resolved in the current network namespace.
pub fn apply(bpf: &mut Ebpf, rules: &RuleSet) -> Result<(), Error> {
    let entries = rules.compile().map_err(Error::Invalid)?;

    let mut ifindexes: BTreeMap<&str, u32> = BTreeMap::new();
    let mut unknown = Vec::new();
    for e in &entries {
        if let Some(name) = &e.iface
            && !ifindexes.contains_key(&**name)
        {
            match nix::net::if_::if_nametoindex(name.as_str()) {
                Ok(idx) => {
                    ifindexes.insert(name, idx);
                }
                Err(_) => {
                    if !unknown.contains(name) {
                        unknown.push(name.clone());
                    }
                }
            }
        }
    }
    if !unknown.is_empty() {
        return Err(Error::UnknownInterfaces(unknown));
    }

    let active = active_generation(bpf)?;
    let next = 1 - active;
    // A failed earlier apply may have left part of a generation behind.
    clear_generation(bpf, next)?;

    let mut list_ids: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut lists: Vec<(u32, RuleList)> = Vec::new();
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for e in &entries {
        let n = list_ids.len() as u32;
        let id = *list_ids.entry(list_bytes(&e.list)).or_insert_with(|| {
            lists.push((n, e.list));
            n
        });
        let ifindex = match &e.iface {
            Some(name) => ifindexes[&**name],
            None => ANY_IFINDEX,
        };
        match e.family {
            Family::V4 => v4.push((key_v4(ifindex, e.dst), id)),
            Family::V6 => v6.push((key_v6(ifindex, e.dst), id)),
        }
    }

    // Lists first: every trie entry of the new generation finds its list.
    {
        let name = maps::MAP_LISTS[next as usize];
        let mut m: BpfHashMap<_, u32, RuleList> =
            BpfHashMap::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(map_err(name))?;
        for (id, list) in &lists {
            m.insert(id, list, 0).map_err(map_err(name))?;
        }
    }
    {
        let name = maps::MAP_V4[next as usize];
        let mut t: LpmTrie<_, DstV4, u32> =
            LpmTrie::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(map_err(name))?;
        for (k, id) in &v4 {
            t.insert(k, id, 0).map_err(map_err(name))?;
        }
    }
    {
        let name = maps::MAP_V6[next as usize];
        let mut t: LpmTrie<_, DstV6, u32> =
            LpmTrie::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?)
                .map_err(map_err(name))?;
        for (k, id) in &v6 {
            t.insert(k, id, 0).map_err(map_err(name))?;
        }
    }

    generation_map(bpf)?
        .set(0, next, 0)
        .map_err(map_err(maps::MAP_GENERATION))?;
    wait_for_readers();
    clear_generation(bpf, active)?;
    info!(
        generation = next,
        rules = rules.rules.len(),
        v4_entries = v4.len(),
        v6_entries = v6.len(),
        lists = lists.len(),
        "authorization rules applied"
    );
    Ok(())
}

fn generation_map(bpf: &mut Ebpf) -> Result<Array<&mut MapData, u32>, Error> {
    let name = maps::MAP_GENERATION;
    Array::try_from(bpf.map_mut(name).ok_or(Error::MissingMap(name))?).map_err(map_err(name))
}

fn active_generation(bpf: &Ebpf) -> Result<u32, Error> {
    let name = maps::MAP_GENERATION;
    let arr: Array<_, u32> =
        Array::try_from(bpf.map(name).ok_or(Error::MissingMap(name))?).map_err(map_err(name))?;
    Ok(arr.get(&0, 0).map_err(map_err(name))? & 1)
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
    // XDP runs inside an RCU read-side section; MEMBARRIER_CMD_GLOBAL waits for an RCU grace
    // period (synchronize_rcu) on every kernel this agent supports, except with nohz_full.
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers; it only blocks.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if r != 0 {
        std::thread::sleep(GRACE_FALLBACK);
    }
}

/// Loads `authorize` (once) and attaches it to each interface, in driver mode when the device
/// supports it and generic mode otherwise. A link a previous agent pinned at
/// `<pin_dir>/authz-<iface>` is updated in place (no moment without a program); new links are
/// pinned there, so authorization outlives the agent.
pub fn attach(
    bpf: &mut Ebpf,
    interfaces: &[String],
    pin_dir: &Path,
) -> Result<Vec<Attached>, Error> {
    let prog: &mut Xdp = bpf
        .program_mut(PROGRAM)
        .ok_or(Error::MissingProgram)?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| Error::Pin {
        path: pin_dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::new();
    for iface in interfaces {
        let pin = pin_dir.join(format!("authz-{iface}"));
        let a = attach_one(prog, iface, &pin)?;
        info!(
            iface,
            mode = a.mode.as_str(),
            replaced = a.replaced,
            "authorization attached at XDP"
        );
        out.push(a);
    }
    Ok(out)
}

fn attach_one(prog: &mut Xdp, iface: &str, pin: &Path) -> Result<Attached, Error> {
    let attach_err = |reason: String| Error::Attach {
        iface: iface.to_string(),
        reason,
    };
    let mut replaced = None;
    if let Ok(old) = PinnedLink::from_pin(pin) {
        let old: Result<XdpLink, _> = FdLink::from(old).try_into();
        match old
            .map_err(|e| e.to_string())
            .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()))
        {
            Ok(id) => replaced = Some(id),
            Err(e) => {
                warn!(iface, error = %e, "stale pinned XDP link could not be reused; attaching anew")
            }
        }
    }
    // The old pin goes either way: its link is now ours, or dead.
    let _ = std::fs::remove_file(pin);
    let was_replaced = replaced.is_some();
    let (id, mode) = match replaced {
        Some(id) => {
            let mode = nix::net::if_::if_nametoindex(iface)
                .ok()
                .and_then(xdp_mode)
                .unwrap_or(Mode::Unknown);
            (id, mode)
        }
        None => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, Mode::Driver),
            Err(drv) => match prog.attach(iface, XdpMode::Skb) {
                Ok(id) => {
                    info!(iface, reason = %drv, "driver-mode XDP refused; using generic mode");
                    (id, Mode::Generic)
                }
                Err(skb) => {
                    return Err(attach_err(format!(
                        "driver mode: {drv}; generic mode: {skb} (does the interface exist in this network namespace?)"
                    )));
                }
            },
        },
    };
    let link = prog.take_link(id)?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| {
            attach_err(format!("not a bpf_link, cannot be pinned: {e}"))
        })?;
    let link = fd.pin(pin).map_err(|e| Error::Pin {
        path: pin.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Attached {
        iface: iface.to_string(),
        mode,
        replaced: was_replaced,
        pin: pin.to_path_buf(),
        link: Some(link),
    })
}

/// Unpins and detaches the links (clean shutdown); interfaces are left without XDP program.
/// Every link is tried; the first failure is returned.
pub fn detach(attached: Vec<Attached>) -> Result<(), Error> {
    let mut first = None;
    for mut a in attached {
        if let Some(link) = a.link.take() {
            match link.unpin() {
                // Dropping the last reference detaches the program.
                Ok(fd) => drop(fd),
                Err(e) => {
                    warn!(iface = a.iface, error = %e, "unpinning XDP link");
                    first.get_or_insert(Error::Pin {
                        path: a.pin.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        info!(iface = a.iface, "authorization detached");
    }
    first.map_or(Ok(()), Err)
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

/// The XDP mode of the program on `ifindex`, from rtnetlink (`IFLA_XDP_ATTACHED`).
fn xdp_mode(ifindex: u32) -> Option<Mode> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    const RTM_GETLINK: u16 = 18;
    const RTM_NEWLINK: u16 = 16;
    const NLM_F_REQUEST: u16 = 1;
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    const XDP_ATTACHED_DRV: u8 = 1;
    const XDP_ATTACHED_SKB: u8 = 2;
    const NLMSG_HDRLEN: usize = 16;
    const IFINFOMSG_LEN: usize = 16;

    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .ok()?;
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + IFINFOMSG_LEN);
    req.extend_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.extend_from_slice(&[0, 0, 0, 0]); // family, pad, type
    req.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    req.extend_from_slice(&[0; 8]); // flags, change
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .ok()?;
    let mut buf = vec![0u8; 65536];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
    let buf = &buf[..n];
    let u16_at = |b: &[u8], i: usize| Some(u16::from_ne_bytes([*b.get(i)?, *b.get(i + 1)?]));
    if u16_at(buf, 4)? != RTM_NEWLINK {
        return None;
    }
    let msg_len = (u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize).min(buf.len());
    // Attributes follow the header and the ifinfomsg, each 4-byte aligned.
    let attrs = |b: &[u8], mut off: usize, end: usize, want: u16| -> Option<(usize, usize)> {
        while off + 4 <= end {
            let len = u16_at(b, off)? as usize;
            let ty = u16_at(b, off + 2)? & 0x3fff;
            if len < 4 {
                return None;
            }
            if ty == want {
                return Some((off + 4, (off + len).min(end)));
            }
            off += (len + 3) & !3;
        }
        None
    };
    let (xs, xe) = attrs(buf, NLMSG_HDRLEN + IFINFOMSG_LEN, msg_len, IFLA_XDP)?;
    let (a, _) = attrs(buf, xs, xe, IFLA_XDP_ATTACHED)?;
    match *buf.get(a)? {
        XDP_ATTACHED_DRV => Some(Mode::Driver),
        XDP_ATTACHED_SKB => Some(Mode::Generic),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: u32, dst: Option<&str>, action: Action) -> Rule {
        Rule {
            id,
            name: format!("r{id}"),
            interfaces: Some(vec!["h1".into()]),
            src: None,
            dst: dst.map(prefix),
            ports: None,
            protocol: Protocol::Any,
            action,
        }
    }

    fn prefix(s: &str) -> (IpAddr, u8) {
        let (a, l) = s.split_once('/').expect("prefix");
        (a.parse().expect("addr"), l.parse().expect("len"))
    }

    fn entry<'a>(entries: &'a [Entry], iface: Option<&str>, dst: Option<&str>) -> &'a Entry {
        entries
            .iter()
            .find(|e| {
                e.iface.as_deref() == iface
                    && e.dst == dst.map(prefix)
                    && (dst.is_some() || e.family == Family::V4)
            })
            .unwrap_or_else(|| panic!("no entry {iface:?} {dst:?} in {entries:#?}"))
    }

    fn ids(e: &Entry) -> Vec<u32> {
        e.list.rules[..e.list.count as usize]
            .iter()
            .map(|r| r.id)
            .collect()
    }

    #[test]
    fn most_specific_entry_holds_every_covering_rule_deny_first() {
        let set = RuleSet {
            rules: vec![
                rule(1, Some("10.0.0.0/8"), Action::Allow),
                rule(2, Some("10.1.0.0/16"), Action::Allow),
                rule(3, Some("10.1.2.0/24"), Action::Deny),
                rule(4, Some("192.168.0.0/16"), Action::Deny),
                rule(5, None, Action::Deny),
                rule(6, Some("fd00::/8"), Action::Allow),
            ],
            defaults: HashMap::from([("h1".to_string(), Action::Deny)]),
        };
        let e = set.compile().expect("valid");
        assert_eq!(
            ids(entry(&e, Some("h1"), Some("10.1.2.0/24"))),
            [3, 5, 1, 2]
        );
        assert_eq!(ids(entry(&e, Some("h1"), Some("10.1.0.0/16"))), [5, 1, 2]);
        assert_eq!(ids(entry(&e, Some("h1"), Some("10.0.0.0/8"))), [5, 1]);
        assert_eq!(ids(entry(&e, Some("h1"), Some("192.168.0.0/16"))), [4, 5]);
        assert_eq!(ids(entry(&e, Some("h1"), Some("fd00::/8"))), [5, 6]);
        // Root entries per family carry the default and the destination-less rules only.
        let roots: Vec<&Entry> = e.iter().filter(|e| e.dst.is_none()).collect();
        assert_eq!(roots.len(), 2);
        for r in roots {
            assert_eq!(ids(r), [5]);
            assert_eq!(r.list.default_action, ACTION_DENY);
        }
        // No entry for "all interfaces": no rule asks for it.
        assert!(e.iter().all(|e| e.iface.is_some()));
        assert_eq!(e.len(), 7);
    }

    #[test]
    fn scopes_and_families_stay_apart() {
        let mut all = rule(1, None, Action::Deny);
        all.interfaces = None;
        all.src = Some(prefix("10.9.0.0/16"));
        let mut h2 = rule(2, Some("10.0.0.0/8"), Action::Allow);
        h2.interfaces = Some(vec!["h2".into()]);
        let set = RuleSet {
            rules: vec![all, h2],
            defaults: HashMap::new(),
        };
        let e = set.compile().expect("valid");
        // The all-interfaces rule has an IPv4 source: only an IPv4 root for ifindex 0.
        let any: Vec<&Entry> = e.iter().filter(|e| e.iface.is_none()).collect();
        assert_eq!(any.len(), 1);
        assert_eq!(
            (any[0].family, any[0].dst, ids(any[0])),
            (Family::V4, None, vec![1])
        );
        // h2's entries do not repeat the all-interfaces rule: the program looks both up.
        assert_eq!(ids(entry(&e, Some("h2"), Some("10.0.0.0/8"))), [2]);
        let h2_v6_root = e
            .iter()
            .find(|e| e.iface.as_deref() == Some("h2") && e.family == Family::V6)
            .expect("v6 root");
        assert_eq!(
            (h2_v6_root.list.count, h2_v6_root.list.default_action),
            (0, ACTION_ALLOW)
        );
    }

    #[test]
    fn rule_entries_encode_prefix_ports_protocol() {
        let mut r = rule(7, Some("10.1.2.3/24"), Action::Deny);
        r.src = Some(prefix("172.16.5.9/12"));
        r.ports = Some((9000, 9010));
        r.protocol = Protocol::Udp;
        let e = rule_entry(&r);
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[172, 16, 0, 0]);
        let mut m = [0u8; 16];
        m[..4].copy_from_slice(&[255, 240, 0, 0]);
        assert_eq!(
            (e.src_be, e.src_mask_be),
            (maps::words(src), maps::words(m))
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

        let any = rule_entry(&rule(8, None, Action::Allow));
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

    #[test]
    fn validation_names_the_rule() {
        let mut bad_len = rule(1, Some("10.0.0.0/33"), Action::Allow);
        bad_len.name = "too-long".into();
        let mut bad_ports = rule(2, None, Action::Allow);
        bad_ports.ports = Some((90, 80));
        let mut mixed = rule(3, Some("fd00::/8"), Action::Allow);
        mixed.src = Some(prefix("10.0.0.0/8"));
        let dup = rule(3, None, Action::Allow);
        let big = rule(5000, None, Action::Allow);
        let mut no_ifaces = rule(6, None, Action::Allow);
        no_ifaces.interfaces = Some(vec![]);
        let set = RuleSet {
            rules: vec![bad_len, bad_ports, mixed, dup, big, no_ifaces],
            defaults: HashMap::from([("bad name".to_string(), Action::Deny)]),
        };
        let errs = set.validate().expect_err("invalid");
        let has = |s: &str| errs.iter().any(|e| e.contains(s));
        assert!(
            has("rule 1 (too-long): destination prefix 10.0.0.0/33"),
            "{errs:?}"
        );
        assert!(has("rule 2 (r2): port range 90-80 is empty"), "{errs:?}");
        assert!(
            has("rule 3 (r3): source 10.0.0.0 and destination fd00::"),
            "{errs:?}"
        );
        assert!(has("rule 3 (r3): id 3 is used by another rule"), "{errs:?}");
        assert!(has("rule 5000 (r5000): id must be below 4096"), "{errs:?}");
        assert!(has("rule 6 (r6): empty interface list"), "{errs:?}");
        assert!(
            has("\"bad name\" is not a valid interface name"),
            "{errs:?}"
        );
        assert_eq!(errs.len(), 7, "{errs:?}");
    }

    #[test]
    fn too_many_rules_on_one_entry_after_the_closure() {
        // 10 rules on /8 and 7 on /24: the /24 entry needs 17 slots.
        let rules: Vec<Rule> = (0..17)
            .map(|i| {
                let dst = if i < 10 { "10.0.0.0/8" } else { "10.1.1.0/24" };
                rule(i, Some(dst), Action::Allow)
            })
            .collect();
        let set = RuleSet {
            rules: rules.clone(),
            defaults: HashMap::new(),
        };
        let errs = set.validate().expect_err("overflow");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("h1, destination 10.1.1.0/24: 17 rules apply (0 (r0), 1 (r1)"),
            "{errs:?}"
        );
        // One fewer fits.
        let set = RuleSet {
            rules: rules[1..].to_vec(),
            defaults: HashMap::new(),
        };
        assert!(set.validate().is_ok());
    }

    #[test]
    fn identical_lists_are_shared() {
        let mut r = rule(1, Some("10.0.0.0/8"), Action::Deny);
        r.interfaces = Some(vec!["h1".into(), "h2".into()]);
        let set = RuleSet {
            rules: vec![r],
            defaults: HashMap::new(),
        };
        let e = set.compile().expect("valid");
        let distinct: BTreeSet<_> = e.iter().map(|e| list_bytes(&e.list)).collect();
        // h1 and h2: v4 root, v6 root (both empty, allow) and 10/8 -> 2 distinct lists.
        assert_eq!((e.len(), distinct.len()), (6, 2));
    }
}
