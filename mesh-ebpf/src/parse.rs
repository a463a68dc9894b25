//! Header parsing for the capture program: Ethernet, IPv4, IPv6 (walking extension headers) and
//! the TCP ports and flags. Every read is bounds-checked ([`load`]), so a short or malformed
//! packet yields `None`, never an out-of-bounds access.
use aya_ebpf::programs::TcContext;

/// A `T` at `off` in the packet. Read directly from the skb's linear data when it holds those
/// bytes (the headers nearly always are: a load is then one or a few instructions), else through
/// `bpf_skb_load_bytes`, which also reads paged data. A helper call per field made up most of
/// the programs' per-packet cost: ten or more calls per packet at roughly 20 ns each on this
/// class of machine (retpolines and return thunks on every call).
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + core::mem::size_of::<T>() <= end {
        // SAFETY: the bytes lie between data and data_end, which the verifier checks too.
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
    } else {
        ctx.load(off).ok()
    }
}

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
    let proto: u16 = u16::from_be(load(ctx, 12)?);
    let (addrs, l4) = match proto {
        ETH_P_IP => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => return None,
    };
    let sport_be: u16 = load(ctx, l4)?;
    let dport_be: u16 = load(ctx, l4 + 2)?;
    let seq: u32 = u32::from_be(load(ctx, l4 + 4)?);
    let flags: u8 = load(ctx, l4 + 13)?;
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
    let ver_ihl: u8 = load(ctx, ETH_HLEN)?;
    if ver_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    // Fragment offset (13 bits) must be 0: later fragments carry no TCP header.
    let frag: u16 = u16::from_be(load(ctx, ETH_HLEN + 6)?);
    if frag & 0x1fff != 0 {
        return None;
    }
    let proto: u8 = load(ctx, ETH_HLEN + 9)?;
    if proto != IPPROTO_TCP {
        return None;
    }
    let src: [u8; 4] = load(ctx, ETH_HLEN + 12)?;
    let dst: [u8; 4] = load(ctx, ETH_HLEN + 16)?;
    Some((Addrs::V4 { src, dst }, ETH_HLEN + ihl))
}

#[inline(always)]
fn ipv6(ctx: &TcContext) -> Option<(Addrs, usize)> {
    let ver: u8 = load(ctx, ETH_HLEN)?;
    if ver >> 4 != 6 {
        return None;
    }
    let mut next: u8 = load(ctx, ETH_HLEN + 6)?;
    let src: [u8; 16] = load(ctx, ETH_HLEN + 8)?;
    let dst: [u8; 16] = load(ctx, ETH_HLEN + 24)?;
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut i = 0;
    while i < MAX_IPV6_EXT {
        match next {
            IPPROTO_TCP => return Some((Addrs::V6 { src, dst }, off)),
            // Hop-by-hop, routing, destination options: length in 8-byte units, not counting
            // the first 8.
            0 | 43 | 60 => {
                let hdr: [u8; 2] = load(ctx, off)?;
                next = hdr[0];
                off += (hdr[1] as usize + 1) * 8;
            }
            // Fragment header: only the first fragment (offset 0) carries the TCP header.
            44 => {
                let hdr: [u8; 4] = load(ctx, off)?;
                let frag_off = u16::from_be_bytes([hdr[2], hdr[3]]) >> 3;
                if frag_off != 0 {
                    return None;
                }
                next = hdr[0];
                off += 8;
            }
            // Authentication header: length in 4-byte units, not counting the first 8.
            51 => {
                let hdr: [u8; 2] = load(ctx, off)?;
                next = hdr[0];
                off += (hdr[1] as usize + 2) * 4;
            }
            _ => return None,
        }
        i += 1;
    }
    None
}
