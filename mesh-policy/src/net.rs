//! Network value types shared by the policy, the agent's own configuration and the kernel plan:
//! one [`Prefix`], one [`PortRange`], one [`InterfaceName`] and the [`FailMode`] parser, so that
//! every path from text to the kernel maps parses, masks and merges the same way.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Serialize, Serializer};

use crate::model::{FailMode, PortSpec};

/// An IP prefix with its host bits cleared (`10.96.0.0/16`, `fd00::/64`, `10.1.2.3/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// The prefix of `addr` with `len` bits; `None` when `len` exceeds the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        (len <= max_len(addr)).then(|| Prefix {
            addr: mask(addr, len),
            len,
        })
    }

    /// The single address `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Prefix {
            addr,
            len: max_len(addr),
        }
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is the zero-length prefix (every address of its family).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this is an IPv4 prefix.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `addr` lies in this prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        addr.is_ipv4() == self.is_ipv4() && mask(addr, self.len) == self.addr
    }

    /// Whether every address of `other` lies in this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;

    /// `10.96.0.0/16`, `fd00::/64`, or a bare address (a single host). Host bits are cleared.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (like 10.96.0.0/16 or fd00::/64)"))?;
        let max = max_len(addr);
        let len = match len {
            None => max,
            Some(len) => len
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?,
        };
        Ok(Prefix {
            addr: mask(addr, len),
            len,
        })
    }
}

impl Serialize for Prefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// `addr` with the bits past `len` cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

/// An inclusive, non-empty range of TCP/UDP destination ports. Port 0 is never a destination,
/// so every range lies in 1-65535 and `*` means exactly that.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// Every port: 1-65535.
    pub const ALL: PortRange = PortRange {
        first: 1,
        last: u16::MAX,
    };

    /// `first..=last`; `None` when it is empty or includes port 0.
    pub fn new(first: u16, last: u16) -> Option<Self> {
        (first != 0 && first <= last).then_some(PortRange { first, last })
    }

    /// The single port `port` (not 0).
    pub fn single(port: u16) -> Option<Self> {
        Self::new(port, port)
    }

    /// The first port.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// The last port (inclusive).
    pub fn last(&self) -> u16 {
        self.last
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// A port as written in a policy or configuration file: a number, `"8000-8100"` or `"*"`.
    pub fn from_spec(spec: &PortSpec) -> Result<Self, String> {
        match spec {
            PortSpec::Number(n) => u16::try_from(*n)
                .ok()
                .and_then(Self::single)
                .ok_or_else(|| format!("port {n} is out of range 1-65535")),
            PortSpec::Text(text) => text.parse(),
        }
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `80`, `8000-8100`, `*` (every port).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if text == "*" {
            return Ok(Self::ALL);
        }
        let port = |p: &str| -> Result<u16, String> {
            let n: i64 = p.trim().parse().map_err(|_| {
                format!("{text:?} is not a port, a range like \"8000-8100\", or \"*\"")
            })?;
            u16::try_from(n)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {n} is out of range 1-65535"))
        };
        match text.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (port(low)?, port(high)?);
                Self::new(low, high)
                    .ok_or_else(|| format!("{text:?}: the range is empty ({low} > {high})"))
            }
            None => port(text).map(|p| PortRange { first: p, last: p }),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Sorts `ranges` and merges the ones that overlap or touch: the fewest ranges covering the same
/// ports.
pub fn merge_ranges(ranges: impl IntoIterator<Item = PortRange>) -> Vec<PortRange> {
    let mut sorted: Vec<PortRange> = ranges.into_iter().collect();
    sorted.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last)
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// A network interface name as the kernel accepts it: 1 to 15 bytes, no `/`, `:`, whitespace
/// or NUL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InterfaceName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty()
            || s.len() > 15
            || s.contains(['/', ':', '\0'])
            || s.chars().any(char::is_whitespace)
        {
            Err(format!(
                "{s:?} is not a network interface name (1 to 15 characters, no '/', ':' or spaces)"
            ))
        } else {
            Ok(InterfaceName(s.to_string()))
        }
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for InterfaceName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Serialize for InterfaceName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl FromStr for FailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            other => Err(format!(
                "{other:?} is not a fail mode (expected \"open\" or \"closed\")"
            )),
        }
    }
}

impl fmt::Display for FailMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> PortRange {
        s.parse().expect("valid range")
    }

    #[test]
    fn prefixes_parse_mask_and_cover() {
        let p: Prefix = "10.96.3.7/16".parse().expect("valid");
        assert_eq!(p.to_string(), "10.96.0.0/16");
        assert_eq!("fd00::1".parse::<Prefix>().expect("valid").len(), 128);
        assert_eq!("0.0.0.0/0".parse::<Prefix>().expect("valid").len(), 0);
        assert!(p.contains("10.96.200.1".parse().expect("ip")));
        assert!(!p.contains("10.97.0.1".parse().expect("ip")));
        assert!(!p.contains("::1".parse().expect("ip")));
        assert!(p.covers(&"10.96.1.0/24".parse().expect("valid")));
        assert!(!p.covers(&"10.0.0.0/8".parse().expect("valid")));
        for bad in ["10.0.0.0/33", "x", "fd00::/129", "10.0.0.0/-1"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        assert_eq!(
            Prefix::new("10.1.2.3".parse().expect("ip"), 8).map(|p| p.to_string()),
            Some("10.0.0.0/8".into())
        );
        assert_eq!(Prefix::new("10.1.2.3".parse().expect("ip"), 40), None);
    }

    #[test]
    fn ports_parse_the_same_everywhere() {
        assert_eq!(range("80"), PortRange::single(80).expect("port"));
        assert_eq!(range("8000-8100").to_string(), "8000-8100");
        assert_eq!(range("*"), PortRange::ALL);
        assert_eq!((PortRange::ALL.first(), PortRange::ALL.last()), (1, 65535));
        for bad in ["0", "70000", "90-80", "a", "", "0-10"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        assert!(PortRange::from_spec(&PortSpec::Number(0)).is_err());
        assert_eq!(
            PortRange::from_spec(&PortSpec::Number(443)),
            Ok(range("443"))
        );
    }

    #[test]
    fn ranges_merge_and_sort() {
        let m = merge_ranges([range("443"), range("80"), range("81-90"), range("85-100")]);
        assert_eq!(m, [range("80-100"), range("443")]);
        assert_eq!(merge_ranges([range("1-5"), range("6-9")]), [range("1-9")]);
        assert!(merge_ranges([]).is_empty());
    }

    #[test]
    fn interface_names() {
        assert!("veth1234abcd".parse::<InterfaceName>().is_ok());
        for bad in ["", "this-name-is-too-long", "a/b", "a b", "a:1"] {
            assert!(bad.parse::<InterfaceName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn fail_modes() {
        assert_eq!("closed".parse::<FailMode>(), Ok(FailMode::Closed));
        assert!("sideways".parse::<FailMode>().is_err());
        assert_eq!(FailMode::Open.to_string(), "open");
    }
}
