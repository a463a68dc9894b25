//! XDP L4 authorization: map names and key/value types.
//!
//! The `authorize` XDP program runs on the host side of a pod's veth (the pod's egress) and decides
//! every IPv4/IPv6 packet with two longest-prefix lookups, whatever the number of rules:
//!
//! * `AUTHZ_V4_<g>` / `AUTHZ_V6_<g>`: LPM tries keyed by `{ifindex, destination address}`
//!   ([`DstV4`], [`DstV6`]); the 32 ifindex bits are always part of the prefix, so a key's
//!   `prefix_len` is `32 + destination prefix length`. Ifindex [`ANY_IFINDEX`] (0) holds the rules
//!   for all interfaces. The value is the id of a [`RuleList`] in `AUTHZ_LISTS_<g>`.
//! * `AUTHZ_LISTS_<g>`: list id -> [`RuleList`], at most [`MAX_LIST_RULES`] entries, deny rules
//!   first. The list of a destination prefix also holds the rules of every less specific prefix
//!   of the same interface that covers it (userspace computes that closure), so the single
//!   longest match is enough. Every interface named by a rule set has a root entry
//!   (`prefix_len == 32`, any destination) carrying its default action.
//! * `AUTHZ_GENERATION`: one-slot array holding the active generation `g` (0 or 1, bit
//!   [`GENERATION_BIT`]) and which kinds of entries it has ([`HAS_IFACE_ENTRIES`],
//!   [`HAS_ANY_ENTRIES`]), so that a packet skips a trie lookup that cannot match. Userspace
//!   fills the inactive generation completely, flips this slot, waits for an RCU grace period,
//!   then clears the old generation: every packet sees either the old or the new rule set.
//! * `AUTHZ_RULE_STATS`: per-CPU [`Counters`] indexed by the stable rule id.
//! * `AUTHZ_IFACE_STATS`: per-CPU LRU hash of [`IfaceCounters`] keyed by ifindex (inserted by
//!   the program; the least recently used interfaces are evicted when it is full).
//!
//! Ifindexes are native-endian `u32`s: all 32 bits are always compared, so their byte order only
//! has to agree between the program and the agent, which run on the same host.

/// LPM tries of IPv4 destinations, one per generation.
pub const MAP_V4: [&str; 2] = ["AUTHZ_V4_0", "AUTHZ_V4_1"];
/// LPM tries of IPv6 destinations, one per generation.
pub const MAP_V6: [&str; 2] = ["AUTHZ_V6_0", "AUTHZ_V6_1"];
/// Rule lists (list id -> [`RuleList`]), one per generation.
pub const MAP_LISTS: [&str; 2] = ["AUTHZ_LISTS_0", "AUTHZ_LISTS_1"];
/// One-slot array: the active generation.
pub const MAP_GENERATION: &str = "AUTHZ_GENERATION";
/// Per-CPU per-rule counters.
pub const MAP_RULE_STATS: &str = "AUTHZ_RULE_STATS";
/// Per-CPU per-interface counters of packets no rule decided.
pub const MAP_IFACE_STATS: &str = "AUTHZ_IFACE_STATS";

/// Destination entries per address family and generation.
pub const MAX_PREFIXES: u32 = 16_384;
/// Distinct rule lists per generation.
pub const MAX_LISTS: u32 = 16_384;
/// Rules that can apply to one destination entry (after the closure).
pub const MAX_LIST_RULES: usize = 16;
/// Rule ids are below this (they index `AUTHZ_RULE_STATS`).
pub const MAX_RULE_ID: u32 = 4096;
/// Interfaces tracked in `AUTHZ_IFACE_STATS`.
pub const MAX_IFACES: u32 = 4096;
/// The ifindex of entries that apply to every interface.
pub const ANY_IFINDEX: u32 = 0;

/// `AUTHZ_GENERATION` bit holding the active generation.
pub const GENERATION_BIT: u32 = 1;
/// `AUTHZ_GENERATION` bit: the generation has entries of named interfaces (else the
/// `{ingress ifindex, dst}` lookup is skipped).
pub const HAS_IFACE_ENTRIES: u32 = 1 << 1;
/// `AUTHZ_GENERATION` bit: the generation has entries for all interfaces (else the
/// `{ANY_IFINDEX, dst}` lookup is skipped).
pub const HAS_ANY_ENTRIES: u32 = 1 << 2;

/// [`RuleEntry::action`] and [`RuleList::default_action`]: let the packet through.
pub const ACTION_ALLOW: u8 = 1;
/// [`RuleEntry::action`] and [`RuleList::default_action`]: drop the packet.
pub const ACTION_DENY: u8 = 2;

/// [`RuleEntry::protocol`]: any protocol.
pub const PROTO_ANY: u8 = 0;
/// [`RuleEntry::protocol`]: TCP (IP protocol number).
pub const PROTO_TCP: u8 = 6;
/// [`RuleEntry::protocol`]: UDP (IP protocol number).
pub const PROTO_UDP: u8 = 17;

/// Data part of an IPv4 LPM key (the prefix length sits in aya's `Key` wrapper).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DstV4 {
    /// Ingress interface, or [`ANY_IFINDEX`].
    pub ifindex: u32,
    /// Destination address; bits past the prefix are zero.
    pub addr_be: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<DstV4>() == 8);

/// Data part of an IPv6 LPM key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DstV6 {
    /// Ingress interface, or [`ANY_IFINDEX`].
    pub ifindex: u32,
    /// Destination address; bits past the prefix are zero.
    pub addr_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<DstV6>() == 20);

/// One rule as the program matches it. The destination is implied by the trie entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleEntry {
    /// Source prefix: the 16 address bytes in network order (IPv4 in the first 4, the rest
    /// zero), held as two native-endian words (see [`words`]) so the match is two 64-bit
    /// operations; masking is byte-wise, so the word byte order does not matter.
    pub src_be: [u64; 2],
    /// Mask of the source prefix, same layout (all zero: any source).
    pub src_mask_be: [u64; 2],
    /// Stable rule id: index into `AUTHZ_RULE_STATS`.
    pub id: u32,
    /// First destination port, host order (only if `match_ports == 1`).
    pub port_first: u16,
    /// Last destination port, inclusive, host order.
    pub port_last: u16,
    /// [`PROTO_ANY`], [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// [`ACTION_ALLOW`] or [`ACTION_DENY`].
    pub action: u8,
    /// 1: the rule only matches TCP/UDP packets whose destination port is in range; 0: any port
    /// and packets without ports (ICMP, non-first fragments).
    pub match_ports: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<RuleEntry>() == 48);

/// 16 network-order address bytes as the two native-endian words [`RuleEntry`] compares.
#[inline(always)]
pub fn words(b: [u8; 16]) -> [u64; 2] {
    [
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    ]
}

/// The rules that apply to one `{interface, destination prefix}` entry: deny rules first, then
/// allow rules, each by id, so the first match decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleList {
    /// Entries in use.
    pub count: u32,
    /// The interface's default: [`ACTION_ALLOW`] or [`ACTION_DENY`] (unused for [`ANY_IFINDEX`]).
    pub default_action: u8,
    pub _pad: [u8; 3],
    pub rules: [RuleEntry; MAX_LIST_RULES],
}
const _: () = assert!(core::mem::size_of::<RuleList>() == 8 + 48 * MAX_LIST_RULES);

/// Packets and bytes (frame length as XDP sees it) a rule decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 16);

/// Per-interface counters of packets no rule decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceCounters {
    /// Let through by the interface's default action (allow, or no default configured). Counted
    /// only on interfaces with rules of their own: elsewhere every packet no all-interface rule
    /// matched would be counted, at the cost of a hash lookup each.
    pub default_allow: Counters,
    /// Dropped by the interface's default action.
    pub default_deny: Counters,
    /// Non-first fragments no port-less rule decided: passed (their first fragment was judged).
    pub fragments_passed: Counters,
    /// Packets whose transport header could not be located (truncated, too many IPv6 extension
    /// headers) and that no port-less, any-protocol rule decided: dropped.
    pub unparsed_dropped: Counters,
}
const _: () = assert!(core::mem::size_of::<IfaceCounters>() == 64);

impl RuleEntry {
    /// Whether a packet from `src` ([`words`] of its source address) matches.
    /// `proto_known == 0` when the header chain could not be walked to the transport header;
    /// `has_port == 1` when `dport` (host order) is the TCP/UDP destination port.
    #[inline(always)]
    pub fn matches(
        &self,
        src: &[u64; 2],
        proto: u8,
        proto_known: u8,
        dport: u16,
        has_port: u8,
    ) -> bool {
        if self.protocol != PROTO_ANY && (proto_known == 0 || self.protocol != proto) {
            return false;
        }
        if self.match_ports != 0
            && (has_port == 0 || dport < self.port_first || dport > self.port_last)
        {
            return false;
        }
        // Two word compares, not sixteen byte compares: every compare is a branch in BPF and
        // the verifier walks each path.
        ((src[0] & self.src_mask_be[0]) ^ self.src_be[0])
            | ((src[1] & self.src_mask_be[1]) ^ self.src_be[1])
            == 0
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, with no padding (asserted).
    unsafe impl aya::Pod for DstV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DstV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RuleList {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IfaceCounters {}

    impl core::ops::AddAssign for Counters {
        fn add_assign(&mut self, o: Self) {
            self.packets += o.packets;
            self.bytes += o.bytes;
        }
    }

    impl core::ops::AddAssign for IfaceCounters {
        fn add_assign(&mut self, o: Self) {
            self.default_allow += o.default_allow;
            self.default_deny += o.default_deny;
            self.fragments_passed += o.fragments_passed;
            self.unparsed_dropped += o.unparsed_dropped;
        }
    }
}
