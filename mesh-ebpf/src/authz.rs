//! L4 authorization programs: one decision, two hooks.
//!
//! `authorize_tc` runs at TC ingress on the host side of a pod's veth, before `capture` (so it
//! sees the pod's egress); `authorize` is the same decision at XDP, for devices whose driver runs
//! XDP before an skb exists. The agent attaches the TC one to veths: XDP on a veth, even a
//! program that only returns `XDP_PASS`, takes TSO/GSO from the pod's side of the pair, so every
//! MTU-sized segment travels alone (measured: a no-op XDP program cut a veth's iperf3 from about
//! 10 to 1.6 Gbit/s, with or without `BPF_F_XDP_HAS_FRAGS`); at TC a GSO packet is decided once.
//! Both decide each packet from the rule maps described in `mesh_common::authz`:
//!
//! 1. Non-IP frames (ARP, ...) and IPv6 neighbour discovery (router solicitation, neighbour
//!    solicitation and advertisement: IPv6's ARP) pass. So do frames whose IP header cannot be
//!    read (the stack drops them anyway).
//! 2. Two longest-prefix lookups in the active generation: `{ingress ifindex, dst}` (the
//!    interface's own rules, closed over covering prefixes, and its default action) and
//!    `{0, dst}` (rules for all interfaces). No entry in either: the interface has no rules, pass.
//! 3. Lists hold deny rules first, so the first match decides: any matching deny -> drop
//!    (`XDP_DROP`, `TC_ACT_SHOT`), else any matching allow -> pass, looking at the interface's list before the
//!    all-interfaces list for each action. The deciding rule's counters move.
//! 4. Nothing matched: the interface's default action (allow without an own entry), counted per
//!    interface (a pass only on interfaces with rules of their own).
//!
//! A rule with ports matches only TCP/UDP packets whose destination port is in its range. A
//! non-first fragment carries no ports: only port-less rules can decide it, and if none does it
//! passes (its first fragment, which has the ports, was judged; without it the datagram is never
//! reassembled). A packet whose transport header cannot be located (truncated, or an IPv6
//! extension header chain longer than `MAX_IPV6_EXT`) has no known protocol: only port-less
//! any-protocol rules can decide it, and otherwise it is dropped, so a deny rule cannot be
//! bypassed by padding the header chain.
use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    bindings::{
        TC_ACT_UNSPEC,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::generated::bpf_xdp_load_bytes,
    macros::{classifier, xdp},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use mesh_common::authz::{
    self, ACTION_ALLOW, ACTION_DENY, ANY_IFINDEX, DstV4, DstV6, GENERATION_BIT, HAS_ANY_ENTRIES,
    HAS_IFACE_ENTRIES, IfaceCounters, RuleList,
};

use crate::maps::{GENERATION, IFACE_STATS, LISTS_0, LISTS_1, RULE_STATS, V4_0, V4_1, V6_0, V6_1};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
/// Extension headers followed; a longer chain leaves the transport protocol unknown.
const MAX_IPV6_EXT: usize = 8;
const ND_ROUTER_SOLICIT: u8 = 133;
const ND_NEIGHBOUR_SOLICIT: u8 = 135;
const ND_NEIGHBOUR_ADVERT: u8 = 136;
const BPF_NOEXIST: u64 = 1;

/// Why a packet was not judged; it passes.
enum Skip {
    /// Not IPv4/IPv6, or the IP header is unreadable.
    NotIp,
    /// IPv6 neighbour discovery.
    NeighbourDiscovery,
}

/// What the rules decided.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

#[xdp]
pub fn authorize(ctx: XdpContext) -> u32 {
    match try_authorize(&ctx) {
        Ok(Verdict::Drop) => XDP_DROP,
        Ok(Verdict::Pass) | Err(Skip::NotIp | Skip::NeighbourDiscovery) => XDP_PASS,
    }
}

/// A pass is `TC_ACT_UNSPEC`: the next program on the hook (`capture`) runs.
#[classifier]
pub fn authorize_tc(ctx: TcContext) -> i32 {
    match try_authorize(&ctx) {
        Ok(Verdict::Drop) => crate::verdict::SHOT,
        Ok(Verdict::Pass) | Err(Skip::NotIp | Skip::NeighbourDiscovery) => TC_ACT_UNSPEC,
    }
}

/// A frame as the decision reads it, at either hook.
trait Frame {
    /// A `T` at `off`, or `None` past the end.
    fn load<T: Copy>(&self, off: usize) -> Option<T>;
    /// The length the rule counters add up: the frame at XDP, the whole (GSO) packet at TC.
    fn bytes(&self) -> u64;
    /// The interface the packet came in on.
    fn arrived_on(&self) -> u32;
}

impl Frame for XdpContext {
    /// Direct from the frame when its first buffer holds the bytes (always, for the headers of
    /// a frame without fragments), else through `bpf_xdp_load_bytes`: see [`crate::parse::load`]
    /// for why a helper call per field is avoided.
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        let (start, end) = (self.data(), self.data_end());
        if start + off + core::mem::size_of::<T>() <= end {
            // SAFETY: the bytes lie between data and data_end, which the verifier checks too.
            return Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
        }
        let mut v = MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes into `v` or fails.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                off as u32,
                v.as_mut_ptr() as *mut c_void,
                core::mem::size_of::<T>() as u32,
            )
        };
        if ret == 0 {
            // SAFETY: fully written by the helper.
            Some(unsafe { v.assume_init() })
        } else {
            None
        }
    }

    #[inline(always)]
    fn bytes(&self) -> u64 {
        (self.data_end() - self.data()) as u64
    }

    #[inline(always)]
    fn arrived_on(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Option<T> {
        crate::parse::load(self, off)
    }

    #[inline(always)]
    fn bytes(&self) -> u64 {
        self.len() as u64
    }

    #[inline(always)]
    fn arrived_on(&self) -> u32 {
        // SAFETY: the context is valid for the program's run; a plain field read.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
}

#[inline(always)]
fn try_authorize<F: Frame>(ctx: &F) -> Result<Verdict, Skip> {
    let pkt = packet(ctx)?;
    let ifindex = ctx.arrived_on();
    let slot = match GENERATION.get(0) {
        Some(g) => *g,
        None => 0,
    };
    let generation = slot & GENERATION_BIT;
    // A trie lookup is a helper call (about 20 ns here before any work): skipped when the
    // generation has no entry of that kind.
    let (own_wanted, any_wanted) = (slot & HAS_IFACE_ENTRIES != 0, slot & HAS_ANY_ENTRIES != 0);
    let (own, any) = if pkt.v6 != 0 {
        (
            if own_wanted {
                lookup_v6(generation, ifindex, pkt.dst)
            } else {
                None
            },
            if any_wanted {
                lookup_v6(generation, ANY_IFINDEX, pkt.dst)
            } else {
                None
            },
        )
    } else {
        let dst = [pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]];
        (
            if own_wanted {
                lookup_v4(generation, ifindex, dst)
            } else {
                None
            },
            if any_wanted {
                lookup_v4(generation, ANY_IFINDEX, dst)
            } else {
                None
            },
        )
    };
    let len = ctx.bytes();

    // Both searches return scalars: no pointer into a list survives them, so their paths do
    // not multiply downstream.
    let own_hit = match own {
        Some(l) => authz_first_match(l, &pkt),
        None => NO_MATCH,
    };
    let any_hit = match any {
        Some(l) => authz_first_match(l, &pkt),
        None => NO_MATCH,
    };
    // Deny anywhere beats allow; the interface's own list is looked at first.
    let hit = if hit_action(own_hit) == ACTION_DENY {
        own_hit
    } else if hit_action(any_hit) == ACTION_DENY || own_hit == NO_MATCH {
        any_hit
    } else {
        own_hit
    };
    if hit != NO_MATCH {
        count_rule((hit >> 8) as u32, len);
        return Ok(if hit_action(hit) == ACTION_DENY {
            Verdict::Drop
        } else {
            Verdict::Pass
        });
    }

    // Kept as nested branches: LLVM folds `own.is_none() && any.is_none()` into an OR of the
    // two pointers, which the verifier rejects.
    let (default_action, has_own) = match own {
        Some(l) => (l.default_action, true),
        None => {
            if any.is_none() {
                // The interface has no rules.
                return Ok(Verdict::Pass);
            }
            (ACTION_ALLOW, false)
        }
    };
    let verdict = fallback(&pkt, default_action);
    // An interface without rules of its own has no default action to account for: the packets
    // it lets through (most traffic, under rules that name no interface) skip the counters, a
    // hash lookup that was a third of their cost. Drops and fragments are still counted.
    if !has_own && verdict == Verdict::Pass && pkt.fragment == 0 {
        return Ok(verdict);
    }
    if let Some(c) = iface_counters(ifindex) {
        // SAFETY: per-CPU value; only this CPU touches it while the program runs.
        let c = unsafe { &mut *c };
        let slot = if pkt.fragment != 0 {
            &mut c.fragments_passed
        } else if pkt.proto_known == 0 {
            &mut c.unparsed_dropped
        } else if verdict == Verdict::Drop {
            &mut c.default_deny
        } else {
            &mut c.default_allow
        };
        slot.packets += 1;
        slot.bytes += len;
    }
    Ok(verdict)
}

/// The verdict when no rule matched.
#[inline(always)]
fn fallback(pkt: &Packet, default_action: u8) -> Verdict {
    if pkt.fragment != 0 {
        Verdict::Pass
    } else if pkt.proto_known == 0 || default_action == ACTION_DENY {
        Verdict::Drop
    } else {
        Verdict::Pass
    }
}

/// [`authz_first_match`] found nothing.
const NO_MATCH: u64 = 0;

#[inline(always)]
fn hit_action(hit: u64) -> u8 {
    (hit & 0xff) as u8
}

/// The first rule of `list` matching `pkt`, as `id << 8 | action` (actions are never 0), or
/// [`NO_MATCH`]. Lists hold deny rules first, so the first match is the list's decision.
///
/// A global function on purpose (`no_mangle`, never inlined): the verifier checks a global
/// function once, on its own, and a call to it costs one instruction on every path that makes
/// it. Inlined, or as a static subprogram, the 16-rule loop was re-verified on every path
/// (families x generations x list combinations x packet shapes: 600k+ of the 1M budget).
#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn authz_first_match(list: *const RuleList, pkt: *const Packet) -> u64 {
    // SAFETY: null-checked; the verifier bounds both pointers to their types' sizes.
    let (Some(list), Some(pkt)) = (unsafe { list.as_ref() }, unsafe { pkt.as_ref() }) else {
        return NO_MATCH;
    };
    let mut i = 0;
    while i < authz::MAX_LIST_RULES {
        if i as u32 >= list.count {
            return NO_MATCH;
        }
        let r = &list.rules[i];
        if r.matches(
            &pkt.src,
            pkt.proto,
            pkt.proto_known,
            pkt.dport,
            pkt.has_port,
        ) {
            return ((r.id as u64) << 8) | r.action as u64;
        }
        i += 1;
    }
    NO_MATCH
}

#[inline(always)]
fn lookup_v4(generation: u32, ifindex: u32, addr_be: [u8; 4]) -> Option<&'static RuleList> {
    let key = Key::new(64, DstV4 { ifindex, addr_be });
    let id = if generation == 0 {
        V4_0.get(&key)
    } else {
        V4_1.get(&key)
    }?;
    list(generation, *id)
}

#[inline(always)]
fn lookup_v6(generation: u32, ifindex: u32, addr_be: [u8; 16]) -> Option<&'static RuleList> {
    let key = Key::new(160, DstV6 { ifindex, addr_be });
    let id = if generation == 0 {
        V6_0.get(&key)
    } else {
        V6_1.get(&key)
    }?;
    list(generation, *id)
}

#[inline(always)]
fn list(generation: u32, id: u32) -> Option<&'static RuleList> {
    let p = if generation == 0 {
        LISTS_0.get_ptr(id)
    } else {
        LISTS_1.get_ptr(id)
    }?;
    // SAFETY: a non-preallocated hash map value stays valid for this program run (RCU); userspace
    // only rewrites the inactive generation, and clears it after a grace period.
    Some(unsafe { &*p })
}

#[inline(always)]
fn count_rule(id: u32, len: u64) {
    if let Some(c) = RULE_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; only this CPU writes it while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// This CPU's counters of `ifindex`, created on first use.
#[inline(always)]
fn iface_counters(ifindex: u32) -> Option<*mut IfaceCounters> {
    if let Some(c) = IFACE_STATS.get_ptr_mut(ifindex) {
        return Some(c);
    }
    // Another CPU may insert it first; either way the lookup below finds it.
    let _ = IFACE_STATS.insert(ifindex, IfaceCounters::default(), BPF_NOEXIST);
    IFACE_STATS.get_ptr_mut(ifindex)
}

/// What the decision needs from an IP packet. `repr(C)` without padding: the verifier wants
/// every byte of it initialised when it is passed to [`authz_first_match`].
#[repr(C)]
struct Packet {
    /// Source address as [`authz::words`] (IPv4 in the first 4 bytes, the rest zero).
    src: [u64; 2],
    /// Network order; IPv4 in the first 4 bytes.
    dst: [u8; 16],
    /// Destination port, host order.
    dport: u16,
    /// Transport protocol (IP protocol / last IPv6 next header); valid if `proto_known == 1`.
    proto: u8,
    /// 0 when the header chain could not be walked to the transport header.
    proto_known: u8,
    /// 1 when `dport` holds the TCP/UDP destination port.
    has_port: u8,
    /// 1: a non-first fragment (protocol known, no ports).
    fragment: u8,
    /// 1: IPv6.
    v6: u8,
    _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Packet>() == 40);

#[inline(always)]
fn packet<F: Frame>(ctx: &F) -> Result<Packet, Skip> {
    let ethertype = u16::from_be(ctx.load(12).ok_or(Skip::NotIp)?);
    match ethertype {
        ETH_P_IP => ipv4(ctx),
        ETH_P_IPV6 => ipv6(ctx),
        _ => Err(Skip::NotIp),
    }
}

#[inline(always)]
fn ipv4<F: Frame>(ctx: &F) -> Result<Packet, Skip> {
    let hdr: [u8; 20] = ctx.load(ETH_HLEN).ok_or(Skip::NotIp)?;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if hdr[0] >> 4 != 4 || ihl < 20 {
        return Err(Skip::NotIp);
    }
    let mut pkt = Packet {
        v6: 0,
        _pad: 0,
        src: authz::words([
            hdr[12], hdr[13], hdr[14], hdr[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]),
        dst: [0; 16],
        proto: hdr[9],
        proto_known: 1,
        has_port: 0,
        dport: 0,
        // Fragment offset (13 bits): later fragments carry no transport header.
        fragment: (u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff != 0) as u8,
    };
    pkt.dst[..4].copy_from_slice(&hdr[16..20]);
    if pkt.fragment == 0 {
        transport(ctx, &mut pkt, ETH_HLEN + ihl);
    }
    Ok(pkt)
}

#[inline(always)]
fn ipv6<F: Frame>(ctx: &F) -> Result<Packet, Skip> {
    let hdr: [u8; 8] = ctx.load(ETH_HLEN).ok_or(Skip::NotIp)?;
    if hdr[0] >> 4 != 6 {
        return Err(Skip::NotIp);
    }
    let mut pkt = Packet {
        v6: 1,
        _pad: 0,
        src: authz::words(ctx.load(ETH_HLEN + 8).ok_or(Skip::NotIp)?),
        dst: ctx.load(ETH_HLEN + 24).ok_or(Skip::NotIp)?,
        proto: 0,
        proto_known: 0,
        has_port: 0,
        dport: 0,
        fragment: 0,
    };
    let mut next = hdr[6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut i = 0;
    while i < MAX_IPV6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units, not counting
            // the first 8.
            0 | 43 | 60 => {
                let Some(ext) = ctx.load::<[u8; 2]>(off) else {
                    return Ok(pkt);
                };
                next = ext[0];
                off += (ext[1] as usize + 1) * 8;
            }
            // Fragment header: only the first fragment (offset 0) carries the transport header.
            44 => {
                let Some(ext) = ctx.load::<[u8; 4]>(off) else {
                    return Ok(pkt);
                };
                next = ext[0];
                off += 8;
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    pkt.fragment = 1;
                    pkt.proto = next;
                    pkt.proto_known = 1;
                    return Ok(pkt);
                }
            }
            // Authentication header: length in 4-byte units, not counting the first 8.
            51 => {
                let Some(ext) = ctx.load::<[u8; 2]>(off) else {
                    return Ok(pkt);
                };
                next = ext[0];
                off += (ext[1] as usize + 2) * 4;
            }
            // Anything else is the transport (or ESP / no-next-header: no ports).
            _ => {
                pkt.proto = next;
                pkt.proto_known = 1;
                if next == IPPROTO_ICMPV6 {
                    if let Some(t) = ctx.load::<u8>(off)
                        && (t == ND_ROUTER_SOLICIT
                            || t == ND_NEIGHBOUR_SOLICIT
                            || t == ND_NEIGHBOUR_ADVERT)
                    {
                        return Err(Skip::NeighbourDiscovery);
                    }
                } else {
                    transport(ctx, &mut pkt, off);
                }
                return Ok(pkt);
            }
        }
        i += 1;
    }
    // The chain is longer than we follow: protocol unknown.
    Ok(pkt)
}

/// Reads the destination port of a TCP/UDP header at `off`; a truncated one leaves the protocol
/// unknown.
#[inline(always)]
fn transport<F: Frame>(ctx: &F, pkt: &mut Packet, off: usize) {
    if pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP {
        return;
    }
    match ctx.load::<u16>(off + 2) {
        Some(p) => {
            pkt.dport = u16::from_be(p);
            pkt.has_port = 1;
        }
        None => pkt.proto_known = 0,
    }
}
