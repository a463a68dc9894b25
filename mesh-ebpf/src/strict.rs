//! `refuse_plaintext`: STRICT mTLS at TC egress of a pod's host-side veth (see
//! `mesh_common::mtls`).
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use aya_log_ebpf::debug;

use crate::{
    maps::{STRICT_REFUSED, STRICT_V4, STRICT_V6},
    parse::{self, Addrs, TCP_ACK, TCP_SYN},
    verdict,
};

#[classifier]
pub fn refuse_plaintext(ctx: TcContext) -> i32 {
    let Some(seg) = parse::tcp_segment(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    if seg.flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: plain-data lookups; the values are not kept.
    let strict = unsafe {
        match seg.addrs {
            Addrs::V4 { dst, .. } => STRICT_V4.get(dst).is_some(),
            Addrs::V6 { dst, .. } => STRICT_V6.get(dst).is_some(),
        }
    };
    if !strict {
        return TC_ACT_UNSPEC;
    }
    // A socket of this node opened the connection (the agent delivering, a probe): it passes.
    // A forwarded SYN has none. A load at a constant offset from the context, as the verifier
    // requires; the pointer is only compared with null.
    // SAFETY: the context is valid for the program's run; read only.
    let sk = unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).__bindgen_anon_2.sk))
    };
    if !sk.is_null() {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: as above.
    let ifindex = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).ifindex)) };
    match STRICT_REFUSED.get_ptr_mut(ifindex) {
        // SAFETY: a per-CPU value, written only by this CPU while the program runs.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = STRICT_REFUSED.insert(ifindex, 1, 0);
        }
    }
    debug!(
        &ctx,
        "plaintext SYN to STRICT port {} refused",
        u16::from_be(seg.dport_be)
    );
    verdict::SHOT
}
