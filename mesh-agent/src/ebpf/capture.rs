//! Writes the capture part of a kernel plan: `CAPTURE_SETTINGS` (fail mode, mark) and the
//! `CAPTURE_V4`/`CAPTURE_V6` tries (prefix -> port set). The plan is already merged and checked
//! against the map limits; this only encodes it and makes the maps hold exactly it.
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, lpm_trie::Key},
};
use mesh_common::redirect::{self, AddrV4, AddrV6, PortRange as KernelRange, PortSet, Settings};
use mesh_policy::{CaptureRule, FailMode, InterfaceName, PortRange};

use super::{Error, attach, attach::Attached, maps};

/// Attaches the capture program at TC ingress of each interface, links pinned at
/// `<pin_dir>/capture-<iface>` (see [`attach::tc`]).
pub fn attach(
    bpf: &mut Ebpf,
    interfaces: &[InterfaceName],
    pin_dir: &Path,
    tcx: bool,
) -> Result<Vec<Attached>, Error> {
    let prog = super::classifier(bpf, super::CAPTURE_PROGRAM)?;
    interfaces
        .iter()
        .map(|iface| {
            let pin = pin_dir.join(format!("capture-{iface}"));
            attach::tc(prog, attach::CAPTURE_SLOT, iface, &pin, tcx)
        })
        .collect()
}

/// Writes the fail mode and the packet mark the program applies.
pub fn write_settings(bpf: &mut Ebpf, fail_mode: FailMode, mark: u32) -> Result<(), Error> {
    let settings = Settings {
        fail_mode: match fail_mode {
            FailMode::Open => redirect::FAIL_OPEN,
            FailMode::Closed => redirect::FAIL_CLOSED,
        },
        mark,
    };
    let mut arr: Array<_, Settings> = maps::get_mut(bpf, redirect::MAP_SETTINGS)?;
    arr.set(0, settings, 0)
        .map_err(maps::err(redirect::MAP_SETTINGS))
}

/// Makes the capture tries hold exactly `rules`: new and changed prefixes are written first,
/// then prefixes that left are removed, so no destination that stays is ever uncaptured.
/// `written` is what the tries are known to hold (the rules of the last successful write): only
/// the difference is written then, so that a policy edit at 10,000 Services costs a few map
/// updates rather than reading and rewriting every prefix. Without it the tries are read.
pub fn write_rules(
    bpf: &mut Ebpf,
    rules: &[CaptureRule],
    written: Option<&[CaptureRule]>,
) -> Result<(), Error> {
    let (v4, v6) = encode(rules)?;
    let old = written.map(encode).transpose()?;
    sync(
        &mut maps::get_mut(bpf, redirect::MAP_CAPTURE_V4)?,
        redirect::MAP_CAPTURE_V4,
        &v4,
        old.as_ref().map(|o| &o.0),
        |addr_be| AddrV4 { addr_be },
    )?;
    sync(
        &mut maps::get_mut(bpf, redirect::MAP_CAPTURE_V6)?,
        redirect::MAP_CAPTURE_V6,
        &v6,
        old.as_ref().map(|o| &o.1),
        |addr_be| AddrV6 { addr_be },
    )
}

type Encoded<A> = BTreeMap<(u32, A), PortSet>;
/// The IPv4 and the IPv6 trie entries.
type ByFamily = (Encoded<[u8; 4]>, Encoded<[u8; 16]>);

/// The trie entries of `rules`, by family.
fn encode(rules: &[CaptureRule]) -> Result<ByFamily, Error> {
    let mut v4 = BTreeMap::new();
    let mut v6 = BTreeMap::new();
    for r in rules {
        let set = port_set(&r.ports).ok_or_else(|| Error::Rule {
            prefix: r.prefix,
            reason: format!(
                "{} port ranges; the plan should have refused more than {}",
                r.ports.len(),
                redirect::MAX_PORT_RANGES
            ),
        })?;
        let len = u32::from(r.prefix.len());
        match r.prefix.addr() {
            IpAddr::V4(a) => v4.insert((len, a.octets()), set),
            IpAddr::V6(a) => v6.insert((len, a.octets()), set),
        };
    }
    Ok((v4, v6))
}

fn sync<A: Copy + Ord, K: aya::Pod + HasAddr<A>>(
    trie: &mut LpmTrie<&mut MapData, K, PortSet>,
    name: &'static str,
    want: &Encoded<A>,
    written: Option<&Encoded<A>>,
    key: impl Fn(A) -> K,
) -> Result<(), Error> {
    let old: Vec<(u32, A)> = match written {
        Some(w) => w.keys().copied().collect(),
        None => trie
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data().addr()))
            .collect(),
    };
    for (&(len, addr), set) in want {
        if written.is_some_and(|w| w.get(&(len, addr)) == Some(set)) {
            continue;
        }
        trie.insert(&Key::new(len, key(addr)), set, 0)
            .map_err(maps::err(name))?;
    }
    for (len, addr) in old {
        if !want.contains_key(&(len, addr)) {
            trie.remove(&Key::new(len, key(addr)))
                .map_err(maps::err(name))?;
        }
    }
    Ok(())
}

/// The address bytes of a trie key.
pub trait HasAddr<A> {
    fn addr(&self) -> A;
}

impl HasAddr<[u8; 4]> for AddrV4 {
    fn addr(&self) -> [u8; 4] {
        self.addr_be
    }
}

impl HasAddr<[u8; 16]> for AddrV6 {
    fn addr(&self) -> [u8; 16] {
        self.addr_be
    }
}

/// The kernel encoding of merged ranges; `None` when they do not fit one entry.
fn port_set(ports: &[PortRange]) -> Option<PortSet> {
    if ports.is_empty() || ports.len() > redirect::MAX_PORT_RANGES {
        return None;
    }
    let mut set = PortSet {
        count: ports.len() as u32,
        ..Default::default()
    };
    for (slot, r) in set.ranges.iter_mut().zip(ports) {
        *slot = KernelRange {
            first: r.first(),
            last: r.last(),
        };
    }
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets_hold_the_plan_ranges() {
        let ranges: Vec<PortRange> = ["80-100", "443"]
            .iter()
            .map(|r| r.parse().expect("range"))
            .collect();
        let s = port_set(&ranges).expect("fits");
        assert_eq!(s.count, 2);
        assert_eq!(
            s.ranges[0],
            KernelRange {
                first: 80,
                last: 100
            }
        );
        assert!(s.contains(95) && s.contains(443) && !s.contains(101));
        let many: Vec<PortRange> = (1..=17u16)
            .filter_map(|p| PortRange::single(p * 10))
            .collect();
        assert!(port_set(&many).is_none());
        assert!(port_set(&[]).is_none());
    }
}
