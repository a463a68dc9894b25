//! Which flows the `capture` program redirects to the agent, and where the agent listens.
//!
//! * `CAPTURE_V4` / `CAPTURE_V6`: LPM tries keyed by destination prefix; the value is the set of
//!   targeted destination ports ([`PortSet`]).
//! * `LISTENERS`: a SockMap holding the agent's transparent listeners ([`LISTENER_V4`],
//!   [`LISTENER_V6`]).
//! * `CAPTURE_SETTINGS`: a one-slot array with the fail mode and packet mark ([`Settings`]).

/// LPM trie of IPv4 destination prefixes.
pub const MAP_CAPTURE_V4: &str = "CAPTURE_V4";
/// LPM trie of IPv6 destination prefixes.
pub const MAP_CAPTURE_V6: &str = "CAPTURE_V6";
/// SockMap of agent listeners.
pub const MAP_LISTENERS: &str = "LISTENERS";
/// One-slot array of [`Settings`].
pub const MAP_SETTINGS: &str = "CAPTURE_SETTINGS";
/// LRU hash of the targeted flows whose SYN met a TIME_WAIT socket of the node ([`FlowKey`]).
pub const MAP_TW_SYNS: &str = "TW_SYNS";
/// Entries of `TW_SYNS`: SYNs in flight at once that reuse a closed connection's 4-tuple.
pub const MAX_TW_SYNS: u32 = 4096;
/// One-slot array (`u64`): `bpf_ktime_get_ns` of the last `TW_SYNS` insert. `steer` looks an
/// entry up only within [`TW_WINDOW_NS`] of it.
pub const MAP_TW_LAST: &str = "TW_LAST";
/// How long after an insert `steer` still looks in `TW_SYNS`. The lookup it serves happens
/// microseconds after the insert, in the same softirq on the same CPU (the TIME_WAIT socket
/// takes the SYN and asks for a listener at once); a second is ample.
pub const TW_WINDOW_NS: u64 = 1_000_000_000;

/// Prefixes per address family.
pub const MAX_PREFIXES: u32 = 16_384;
/// Port ranges per prefix.
pub const MAX_PORT_RANGES: usize = 16;
/// Slot of the IPv4 listener in `LISTENERS`.
pub const LISTENER_V4: u32 = 0;
/// Slot of the IPv6 listener in `LISTENERS`.
pub const LISTENER_V6: u32 = 1;
/// Slots in `LISTENERS`.
pub const MAX_LISTENERS: u32 = 2;

/// [`Settings::fail_mode`]: targeted packets pass untouched when no listener exists.
pub const FAIL_OPEN: u32 = 0;
/// [`Settings::fail_mode`]: targeted connections are refused (RST) when no listener exists.
pub const FAIL_CLOSED: u32 = 1;

/// An inclusive range of destination ports, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}
const _: () = assert!(core::mem::size_of::<PortRange>() == 4);

/// The targeted ports of one prefix. `count == 0` never occurs in the map; a prefix with "all
/// ports" holds the single range `0..=65535`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortSet {
    pub count: u32,
    pub ranges: [PortRange; MAX_PORT_RANGES],
}
const _: () = assert!(core::mem::size_of::<PortSet>() == 4 + 4 * MAX_PORT_RANGES);

impl PortSet {
    /// Whether `port` (host byte order) is in one of the ranges.
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        let mut i = 0;
        // A bounded loop the verifier can see through.
        while i < MAX_PORT_RANGES {
            if (i as u32) < self.count {
                let r = self.ranges[i];
                if port >= r.first && port <= r.last {
                    return true;
                }
            }
            i += 1;
        }
        false
    }
}

/// Data part of an IPv4 LPM key (the prefix length sits in aya's `Key` wrapper).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrV4 {
    pub addr_be: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<AddrV4>() == 4);

/// Data part of an IPv6 LPM key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrV6 {
    pub addr_be: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AddrV6>() == 16);

/// Capture settings, written by the agent before it attaches the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// [`FAIL_OPEN`] or [`FAIL_CLOSED`].
    pub fail_mode: u32,
    /// Mark set on every packet the agent takes (matched by the agent's `ip rule`).
    pub mark: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 8);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, with no padding (asserted).
    unsafe impl aya::Pod for PortRange {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Settings {}

    impl From<core::net::Ipv4Addr> for AddrV4 {
        fn from(a: core::net::Ipv4Addr) -> Self {
            Self {
                addr_be: a.octets(),
            }
        }
    }
    impl From<core::net::Ipv6Addr> for AddrV6 {
        fn from(a: core::net::Ipv6Addr) -> Self {
            Self {
                addr_be: a.octets(),
            }
        }
    }
}

/// A TCP flow as `capture` (TC) and `steer` (sk_lookup) both see it: the words of the kernel's
/// `struct bpf_sock_tuple` (IPv4: source, destination, then both ports in one word; IPv6: four
/// words each, then the ports; the rest zero), and the tuple's size, which tells the family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    /// 12 (IPv4) or 36 (IPv6): the tuple size the lookup helpers take.
    pub size: u32,
    pub words: [u32; 9],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// The ports word: source then destination port, each in network byte order, as laid
    /// out in memory on a little-endian CPU (the bpfel target).
    pub const fn ports(sport_be: u16, dport_be: u16) -> u32 {
        sport_be as u32 | (dport_be as u32) << 16
    }
}
