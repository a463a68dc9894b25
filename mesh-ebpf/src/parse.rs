//! Header parsing for the capture program: Ethernet, IPv4, IPv6 (walking extension headers) and
//! the TCP ports and flags. Every read goes through `bpf_skb_load_bytes`, so a short or malformed
//! packet yields `None`, never an out-of-bounds access.
use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
/// Extension headers followed before giving up (the packet then passes untouched).
const MAX_IPV6_EXT: usize = 6;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// Addresses of a TCP segment, network byte order as read from the packet.
pub enum Addrs {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

/// What the capture decision needs from a TCP segment.
pub struct Segment {
    pub addrs: Addrs,
    /// Network byte order, as in the packet.
    pub sport_be: u16,
    /// Network byte order, as in the packet.
    pub dport_be: u16,
    /// Sequence number, host byte order.
    pub seq: u32,
    pub flags: u8,
}

impl Segment {
    #[inline(always)]
    pub fn dport(&self) -> u16 {
        u16::from_be(self.dport_be)
    }
}

/// Parses a TCP segment, or `None` for anything else (other protocols, non-first fragments,
/// truncated headers, unknown IPv6 extension headers).
#[inline(always)]
pub fn tcp_segment(ctx: &TcContext) -> Option<Segment> {
    let proto: u16 = u16::from_be(ctx.load(12).ok()?);
    let (addrs, l4) = match proto {
        ETH_P_IP => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => return None,
    };
    let sport_be: u16 = ctx.load(l4).ok()?;
    let dport_be: u16 = ctx.load(l4 + 2).ok()?;
    let seq: u32 = u32::from_be(ctx.load(l4 + 4).ok()?);
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    Some(Segment {
        addrs,
        sport_be,
        dport_be,
        seq,
        flags,
    })
}

#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<(Addrs, usize)> {
    let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    // Fragment offset (13 bits) must be 0: later fragments carry no TCP header.
    let frag: u16 = u16::from_be(ctx.load(ETH_HLEN + 6).ok()?);
    if frag & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let src: [u8; 4] = ctx.load(ETH_HLEN + 12).ok()?;
    let dst: [u8; 4] = ctx.load(ETH_HLEN + 16).ok()?;
    Some((Addrs::V4 { src, dst }, ETH_HLEN + ihl))
}

#[inline(always)]
fn ipv6(ctx: &TcContext) -> Option<(Addrs, usize)> {
    let ver: u8 = ctx.load(ETH_HLEN).ok()?;
    if ver >> 4 != 6 {
        return None;
    }
    let mut next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let src: [u8; 16] = ctx.load(ETH_HLEN + 8).ok()?;
    let dst: [u8; 16] = ctx.load(ETH_HLEN + 24).ok()?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut i = 0;
    while i < MAX_IPV6_EXT {
        match next {
            IPPROTO_TCP => return Some((Addrs::V6 { src, dst }, off)),
            // Hop-by-hop, routing, destination options: length in 8-byte units, not counting
            // the first 8.
            0 | 43 | 60 => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                next = hdr[0];
                off += (hdr[1] as usize + 1) * 8;
            }
            // Fragment header: only the first fragment (offset 0) carries the TCP header.
            44 => {
                let hdr: [u8; 4] = ctx.load(off).ok()?;
                let frag_off = u16::from_be_bytes([hdr[2], hdr[3]]) >> 3;
                if frag_off != 0 {
                    return None;
                }
                next = hdr[0];
                off += 8;
            }
            // Authentication header: length in 4-byte units, not counting the first 8.
            51 => {
                let hdr: [u8; 2] = ctx.load(off).ok()?;
                next = hdr[0];
                off += (hdr[1] as usize + 2) * 4;
            }
            _ => return None,
        }
        i += 1;
    }
    None
}
