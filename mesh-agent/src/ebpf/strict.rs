//! STRICT mTLS in the kernel: the destinations refused plaintext (`MTLS_STRICT_V4/V6`), the
//! `refuse_plaintext` program at TC egress of each interface of the plan, and its counts per
//! interface. See `mesh_common::mtls` for what the program does.
use std::{collections::BTreeSet, net::IpAddr, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
};
use mesh_common::mtls as kmtls;
use mesh_policy::InterfaceName;

use super::{
    Error,
    attach::{self, Attached},
    maps,
};

/// Name of the program in the object.
pub const PROGRAM: &str = "refuse_plaintext";

/// Makes the STRICT maps hold exactly `addrs`: entries that left are removed first, then the
/// new ones are added, so an address that stays STRICT is never missing in between.
pub fn write(bpf: &mut Ebpf, addrs: &[IpAddr]) -> Result<(), Error> {
    let v4: BTreeSet<[u8; 4]> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: BTreeSet<[u8; 16]> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        })
        .collect();
    sync(bpf, kmtls::MAP_STRICT_V4, &v4)?;
    sync(bpf, kmtls::MAP_STRICT_V6, &v6)
}

fn sync<const N: usize>(
    bpf: &mut Ebpf,
    name: &'static str,
    want: &BTreeSet<[u8; N]>,
) -> Result<(), Error>
where
    [u8; N]: aya::Pod,
{
    let mut map: BpfHashMap<&mut MapData, [u8; N], u32> = maps::get_mut(bpf, name)?;
    let have: BTreeSet<[u8; N]> = map.keys().filter_map(Result::ok).collect();
    for gone in have.difference(want) {
        map.remove(gone).map_err(maps::err(name))?;
    }
    for key in want.difference(&have) {
        map.insert(key, 1, 0).map_err(maps::err(name))?;
    }
    Ok(())
}

/// Attaches `refuse_plaintext` at TC egress of each interface, links pinned at
/// `<pin_dir>/strict-<iface>` (see [`attach::tc`]).
pub fn attach(
    bpf: &mut Ebpf,
    interfaces: &[InterfaceName],
    pin_dir: &Path,
    tcx: bool,
) -> Result<Vec<Attached>, Error> {
    let prog = super::classifier(bpf, PROGRAM)?;
    interfaces
        .iter()
        .map(|iface| {
            let pin = pin_dir.join(format!("strict-{iface}"));
            attach::tc(prog, attach::STRICT_SLOT, iface, &pin, tcx)
        })
        .collect()
}

/// Plaintext connection openings refused, per interface name (the ifindex when the interface
/// is gone), summed over CPUs.
pub fn refused(bpf: &Ebpf) -> Result<Vec<(String, u64)>, Error> {
    let name = kmtls::MAP_REFUSED;
    let m: PerCpuHashMap<_, u32, u64> = maps::get(bpf, name)?;
    let mut out = Vec::new();
    for item in m.iter() {
        let (ifindex, per_cpu) = item.map_err(maps::err(name))?;
        let iface = nix::net::if_::if_indextoname(ifindex)
            .ok()
            .and_then(|n| n.into_string().ok())
            .unwrap_or_else(|| format!("ifindex {ifindex}"));
        out.push((iface, per_cpu.iter().sum()));
    }
    out.sort();
    Ok(out)
}
