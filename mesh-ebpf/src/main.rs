//! The data plane's kernel side.
//!
//! `capture` runs at TC ingress on the host side of a pod's veth (the pod's egress). For a TCP
//! segment whose destination prefix and port policy targets, it marks the packet (so the node's
//! policy routing delivers it locally) and assigns it to an agent socket: a SYN to the agent's
//! transparent listener, any later segment to the agent socket that already owns the flow. All
//! other traffic passes untouched. When no listener exists the configured fail mode decides.
//!
//! The object also holds `steer` (sk_lookup, below), the authorization programs (`authz`) and
//! `refuse_plaintext` (`strict`: STRICT mTLS at TC egress of the same veths).
// Built for bpfel-unknown-none by mesh-agent's build script. On the host (`cargo clippy
// --workspace`) it is an ordinary binary with an empty `main`, so the workspace checks cleanly.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod authz;
mod maps;
mod parse;
mod reset;
mod strict;

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple},
    helpers::{
        bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{classifier, sk_lookup},
    maps::lpm_trie::Key,
    programs::{SkLookupContext, TcContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    counters::index as ctr,
    redirect::{self, AddrV4, AddrV6, FAIL_CLOSED, FlowKey},
};

use crate::{
    maps::{CAPTURE_V4, CAPTURE_V6, LISTENERS, SETTINGS, TW_LAST, TW_SYNS, count},
    parse::{Addrs, Segment, TCP_ACK, TCP_SYN},
};

/// TC verdicts as `i32`; the bindings' integer types differ between the bpf and host targets.
#[allow(clippy::unnecessary_cast)]
pub mod verdict {
    use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
    pub const OK: i32 = TC_ACT_OK as i32;
    pub const SHOT: i32 = TC_ACT_SHOT as i32;
    pub const REDIRECT: i32 = TC_ACT_REDIRECT as i32;
}

/// `state` of a listening socket in `struct bpf_sock`.
const TCP_LISTEN: u32 = 10;
/// `state` of a TIME_WAIT socket.
const TCP_TIME_WAIT: u32 = 6;

/// Why a packet could not be handled; counted, then the packet passes untouched.
enum Error {
    Assign,
}

#[classifier]
pub fn capture(ctx: TcContext) -> i32 {
    match try_capture(&ctx) {
        Ok(action) => action,
        Err(Error::Assign) => {
            count(ctr::ERRORS);
            debug!(&ctx, "bpf_sk_assign failed; the packet passes untouched");
            TC_ACT_UNSPEC
        }
    }
}

#[inline(always)]
fn try_capture(ctx: &TcContext) -> Result<i32, Error> {
    count(ctr::SEEN);
    let Some(seg) = parse::tcp_segment(ctx) else {
        return Ok(TC_ACT_UNSPEC);
    };
    if !targeted(&seg) {
        return Ok(TC_ACT_UNSPEC);
    }
    count(ctr::TARGETED);
    let (mark, fail_mode) = match SETTINGS.get(0) {
        Some(s) => (s.mark, s.fail_mode),
        None => return Ok(TC_ACT_UNSPEC),
    };

    let is_syn = seg.flags & TCP_SYN != 0 && seg.flags & TCP_ACK == 0;
    if is_syn {
        let slot = match seg.addrs {
            Addrs::V4 { .. } => redirect::LISTENER_V4,
            Addrs::V6 { .. } => redirect::LISTENER_V6,
        };
        return match listener(slot) {
            Some(sk) => {
                ctx.set_mark(mark);
                // A socket that still holds this 4-tuple takes the SYN, as it would without the
                // mesh: assigned to the listener instead, the SYN's new request socket would
                // clash with it in the kernel's connection table and be dropped, again on every
                // retransmission, so a client that reuses its port within the 60 s TIME_WAIT of
                // a connection the agent closed could not connect at all. A TIME_WAIT socket
                // accepts a fresh SYN and asks for a listener; `steer` names the agent's.
                let (mut tuple, size) = sock_tuple(&seg);
                if let Some(owner) = owner(ctx, &mut tuple, size) {
                    // SAFETY: releasing the listener reference; `owner` is used instead.
                    unsafe { bpf_sk_release(sk as *mut _) };
                    // SAFETY: non-null socket from the lookup; `state` is readable.
                    if unsafe { (*owner).state } == TCP_TIME_WAIT {
                        let key = FlowKey {
                            size,
                            // SAFETY: the tuple is 36 plain bytes, zeroed, then written.
                            words: unsafe {
                                core::ptr::read_unaligned(&tuple as *const _ as *const [u32; 9])
                            },
                        };
                        let _ = TW_SYNS.insert(key, 1, 0);
                        if let Some(last) = TW_LAST.get_ptr_mut(0) {
                            // SAFETY: an array value lives as long as the map; see `TW_LAST`.
                            unsafe { *last = bpf_ktime_get_ns() };
                        }
                    }
                    assign(ctx, owner)?;
                    count(ctr::SYN_TO_EXISTING);
                    count(ctr::REDIRECTED);
                    return Ok(verdict::OK);
                }
                assign(ctx, sk)?;
                count(ctr::REDIRECTED);
                debug!(
                    ctx,
                    "targeted SYN to port {} assigned to the agent's listener",
                    u16::from_be(seg.dport_be)
                );
                Ok(verdict::OK)
            }
            None => {
                count(ctr::NO_LISTENER);
                if fail_mode == FAIL_CLOSED {
                    // One literal per branch: a string chosen at run time was copied with the
                    // longer one's length, which 6.1's verifier rightly refuses.
                    debug!(
                        ctx,
                        "targeted SYN with no agent listener: refused (fail closed)"
                    );
                    count(ctr::FAIL_CLOSED);
                    // Refused at once with a RST, not left to time out.
                    match reset::refuse(ctx, &seg) {
                        Ok(action) => Ok(action),
                        Err(reset::Failed) => {
                            count(ctr::ERRORS);
                            Ok(verdict::SHOT)
                        }
                    }
                } else {
                    debug!(
                        ctx,
                        "targeted SYN with no agent listener: passed (fail open)"
                    );
                    count(ctr::FAIL_OPEN);
                    Ok(TC_ACT_UNSPEC)
                }
            }
        };
    }

    // A later segment goes to the agent only if an agent socket owns the flow. A connection that
    // was open before capture began, or whose agent is gone, is left alone rather than reset.
    match established(ctx, &seg) {
        Some(sk) => {
            ctx.set_mark(mark);
            assign(ctx, sk)?;
            count(ctr::REDIRECTED);
            Ok(verdict::OK)
        }
        None => {
            count(ctr::PASSED_UNOWNED);
            Ok(TC_ACT_UNSPEC)
        }
    }
}

/// Whether policy targets the segment's destination prefix and port.
#[inline(always)]
fn targeted(seg: &Segment) -> bool {
    let ports = match seg.addrs {
        Addrs::V4 { dst, .. } => CAPTURE_V4.get(Key::new(32, AddrV4 { addr_be: dst })),
        Addrs::V6 { dst, .. } => CAPTURE_V6.get(Key::new(128, AddrV6 { addr_be: dst })),
    };
    match ports {
        Some(p) => p.contains(seg.dport()),
        None => false,
    }
}

/// The agent's listener in `slot`, with a reference the caller must release.
#[inline(always)]
fn listener(slot: u32) -> Option<*mut bpf_sock> {
    let key = slot;
    // SAFETY: `LISTENERS` is a SockMap; a lookup from TC returns a referenced socket or null.
    // aya-ebpf 0.2.1 has no `SockMap::get`, so the helper is called directly.
    let sk = unsafe {
        bpf_map_lookup_elem(
            &LISTENERS as *const _ as *mut core::ffi::c_void,
            &key as *const u32 as *const core::ffi::c_void,
        )
    } as *mut bpf_sock;
    if sk.is_null() { None } else { Some(sk) }
}

/// The non-listening socket of this node that owns the segment's flow, if any (referenced).
#[inline(always)]
fn established(ctx: &TcContext, seg: &Segment) -> Option<*mut bpf_sock> {
    let (mut tuple, size) = sock_tuple(seg);
    owner(ctx, &mut tuple, size)
}

/// The segment's flow as the socket lookup helpers take it, and its size.
#[inline(always)]
fn sock_tuple(seg: &Segment) -> (bpf_sock_tuple, u32) {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = match seg.addrs {
        Addrs::V4 { src, dst } => {
            // SAFETY: writing the union member that `size` says the helper will read.
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
            t.saddr = u32::from_ne_bytes(src);
            t.daddr = u32::from_ne_bytes(dst);
            t.sport = seg.sport_be;
            t.dport = seg.dport_be;
            core::mem::size_of_val(t)
        }
        Addrs::V6 { src, dst } => {
            // SAFETY: as above.
            let t = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
            t.saddr = words(src);
            t.daddr = words(dst);
            t.sport = seg.sport_be;
            t.dport = seg.dport_be;
            core::mem::size_of_val(t)
        }
    };
    (tuple, size as u32)
}

/// The non-listening socket that holds `tuple`, if any (referenced).
#[inline(always)]
fn owner(ctx: &TcContext, tuple: &mut bpf_sock_tuple, size: u32) -> Option<*mut bpf_sock> {
    // SAFETY: tuple lives on the stack for the call; the helper returns a referenced socket or null.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket returned by the lookup helper; `state` is readable on sock_common.
    if unsafe { (*sk).state } == TCP_LISTEN {
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk as *mut _) };
        return None;
    }
    Some(sk)
}

/// Assigns the packet to `sk` and releases the caller's reference either way.
#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> Result<(), Error> {
    // SAFETY: `sk` is a referenced socket from a lookup; it is released right after.
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) };
    // SAFETY: the reference was taken by the lookup that produced `sk`.
    unsafe { bpf_sk_release(sk as *mut _) };
    if ret == 0 { Ok(()) } else { Err(Error::Assign) }
}

/// `AF_INET` and `AF_INET6` in `bpf_sk_lookup.family`.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `SK_PASS`: the lookup goes on (with the socket selected, if one was).
const SK_PASS: u32 = 1;

/// Runs when the node's TCP stack looks for a listener (sk_lookup, attached to the node's network
/// namespace). It selects the agent's listener only for a flow `capture` remembered in
/// `TW_SYNS`: a targeted SYN it handed to a TIME_WAIT socket, which takes a fresh SYN and then
/// asks for a listener for the original destination, where none is bound. Every other lookup
/// passes untouched.
#[sk_lookup]
pub fn steer(ctx: SkLookupContext) -> u32 {
    // Only right after `capture` inserted something is there anything to find. This runs in
    // every listener lookup of the node, so it comes first, and a node where `capture` never
    // inserted (0) is spared the clock.
    let recent = match TW_LAST.get(0) {
        Some(0) => false,
        // SAFETY: a helper without arguments.
        Some(last) => unsafe { bpf_ktime_get_ns() }.wrapping_sub(*last) < redirect::TW_WINDOW_NS,
        None => true,
    };
    if !recent {
        return SK_PASS;
    }
    let p = ctx.lookup;
    // The verifier takes only loads at constant offsets from the context pointer: every field
    // is read on its own, volatile so that the compiler neither copies the struct nor moves
    // the pointer first.
    macro_rules! field {
        ($($f:tt)+) => {
            // SAFETY: the context is valid for the program's run; read only.
            unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*p).$($f)+)) }
        };
    }
    if field!(protocol) != 6 {
        return SK_PASS;
    }
    // The local port is in host byte order in this context, the remote one is not.
    let ports = FlowKey::ports(field!(remote_port), (field!(local_port) as u16).to_be());
    let (slot, key) = match field!(family) {
        AF_INET => (
            redirect::LISTENER_V4,
            FlowKey {
                size: 12,
                words: [
                    field!(remote_ip4),
                    field!(local_ip4),
                    ports,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ],
            },
        ),
        AF_INET6 => (
            redirect::LISTENER_V6,
            FlowKey {
                size: 36,
                words: [
                    field!(remote_ip6[0]),
                    field!(remote_ip6[1]),
                    field!(remote_ip6[2]),
                    field!(remote_ip6[3]),
                    field!(local_ip6[0]),
                    field!(local_ip6[1]),
                    field!(local_ip6[2]),
                    field!(local_ip6[3]),
                    ports,
                ],
            },
        ),
        _ => return SK_PASS,
    };
    // SAFETY: a plain-data lookup; the value is not kept.
    if unsafe { TW_SYNS.get(key) }.is_none() {
        return SK_PASS;
    }
    let _ = TW_SYNS.remove(key);
    if let Some(sk) = listener(slot) {
        // SAFETY: `sk` is a referenced listener from the SockMap, released right after.
        unsafe {
            bpf_sk_assign(ctx.lookup as *mut _, sk as *mut _, 0);
            bpf_sk_release(sk as *mut _);
        }
    }
    SK_PASS
}

#[inline(always)]
fn words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
