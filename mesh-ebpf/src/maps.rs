//! Map declarations. Names, sizes and value types come from `mesh-common`, which the agent shares.
use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, PerCpuArray, SockMap},
};
use mesh_common::{
    counters,
    redirect::{self, AddrV4, AddrV6, PortSet, Settings},
};

#[map(name = "CAPTURE_V4")]
pub static CAPTURE_V4: LpmTrie<AddrV4, PortSet> =
    LpmTrie::with_max_entries(redirect::MAX_PREFIXES, 0);

#[map(name = "CAPTURE_V6")]
pub static CAPTURE_V6: LpmTrie<AddrV6, PortSet> =
    LpmTrie::with_max_entries(redirect::MAX_PREFIXES, 0);

#[map(name = "LISTENERS")]
pub static LISTENERS: SockMap = SockMap::with_max_entries(redirect::MAX_LISTENERS, 0);

#[map(name = "CAPTURE_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "CAPTURE_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::MAX_ENTRIES, 0);

/// Adds one to a per-CPU counter slot.
#[inline(always)]
pub fn count(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += 1 };
    }
}
