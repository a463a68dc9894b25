//! The data plane's kernel side.
//!
//! `capture` runs at TC ingress on the host side of a pod's veth (the pod's egress). For a TCP
//! segment whose destination prefix and port policy targets, it marks the packet (so the node's
//! policy routing delivers it locally) and assigns it to an agent socket: a SYN to the agent's
//! transparent listener, any later segment to the agent socket that already owns the flow. All
//! other traffic passes untouched. When no listener exists the configured fail mode decides.
// Built for bpfel-unknown-none by mesh-agent's build script. On the host (`cargo clippy
// --workspace`) it is an ordinary binary with an empty `main`, so the workspace checks cleanly.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod authz;
mod maps;
mod parse;
mod reset;

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_UNSPEC, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    counters::index as ctr,
    redirect::{self, AddrV4, AddrV6, FAIL_CLOSED},
};

use crate::{
    maps::{CAPTURE_V4, CAPTURE_V6, LISTENERS, SETTINGS, count},
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
    // SAFETY: tuple lives on the stack for the call; the helper returns a referenced socket or null.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut tuple,
            size as u32,
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
