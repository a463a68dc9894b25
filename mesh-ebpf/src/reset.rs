//! Refusing a connection from TC: the pod's SYN is rewritten in place into the RST|ACK its
//! destination would send and redirected back out the interface it came in on.
//!
//! The node's own stack cannot do this: it will not send a RST from an address that is not its
//! own, and with no agent there is no socket whose transparency would allow it.
use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};

use crate::parse::{Addrs, ETH_HLEN, Segment};

const TCP_RST_ACK: u8 = 0x14;
const TCP_HLEN: usize = 20;

/// Why the RST could not be built; the caller then drops the SYN.
pub struct Failed;

/// Replaces the SYN with a RST|ACK to its sender and redirects it back to the sender.
#[inline(always)]
pub fn refuse(ctx: &TcContext, seg: &Segment) -> Result<i32, Failed> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Failed)?;
    let mut eth = [0u8; 12];
    // Destination MAC := sender's MAC; source MAC := the MAC the sender addressed.
    let mut i = 0;
    while i < 6 {
        eth[i] = macs[6 + i];
        eth[6 + i] = macs[i];
        i += 1;
    }
    let ack = seg.seq.wrapping_add(1).to_be_bytes();
    let mut tcp = [0u8; TCP_HLEN];
    tcp[0..2].copy_from_slice(&seg.dport_be.to_ne_bytes());
    tcp[2..4].copy_from_slice(&seg.sport_be.to_ne_bytes());
    tcp[8..12].copy_from_slice(&ack);
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST_ACK;

    // SAFETY: reading a field of the context the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match seg.addrs {
        Addrs::V4 { src, dst } => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(40u16).to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&dst);
            ip[16..20].copy_from_slice(&src);
            let c = fold(sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut pseudo = sum(&dst, 0);
            pseudo = sum(&src, pseudo);
            pseudo += 6 + TCP_HLEN as u32;
            let c = fold(sum(&tcp, pseudo));
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            rewrite(ctx, &eth, &ip, &tcp, ETH_HLEN + 20)?;
        }
        Addrs::V6 { src, dst } => {
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(TCP_HLEN as u16).to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&dst);
            ip[24..40].copy_from_slice(&src);
            let mut pseudo = sum(&dst, 0);
            pseudo = sum(&src, pseudo);
            pseudo += 6 + TCP_HLEN as u32;
            let c = fold(sum(&tcp, pseudo));
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            rewrite(ctx, &eth, &ip, &tcp, ETH_HLEN + 40)?;
        }
    }
    // SAFETY: plain helper call; egress redirect to the device the packet arrived on.
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(crate::verdict::REDIRECT)
}

#[inline(always)]
fn rewrite<const N: usize>(
    ctx: &TcContext,
    eth: &[u8; 12],
    ip: &[u8; N],
    tcp: &[u8; TCP_HLEN],
    l4: usize,
) -> Result<(), Failed> {
    // SAFETY: resizes the packet owned by this program invocation.
    let r = unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, (l4 + TCP_HLEN) as u32, 0) };
    if r != 0 {
        return Err(Failed);
    }
    ctx.store(0, eth, 0).map_err(|_| Failed)?;
    ctx.store(ETH_HLEN, ip, 0).map_err(|_| Failed)?;
    ctx.store(l4, tcp, 0).map_err(|_| Failed)?;
    Ok(())
}

/// Ones-complement sum of big-endian 16-bit words (even-length input).
#[inline(always)]
fn sum(b: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < b.len() {
        acc += u16::from_be_bytes([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}
