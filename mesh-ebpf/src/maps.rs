//! Map declarations. Names, sizes and value types come from `mesh-common`, which the agent shares.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockMap},
};
use mesh_common::{
    authz::{self, DstV4, DstV6, IfaceCounters, RuleList},
    counters, mtls,
    redirect::{self, AddrV4, AddrV6, FlowKey, PortSet, Settings},
};

#[map(name = "CAPTURE_V4")]
pub static CAPTURE_V4: LpmTrie<AddrV4, PortSet> =
    LpmTrie::with_max_entries(redirect::MAX_PREFIXES, 0);

#[map(name = "CAPTURE_V6")]
pub static CAPTURE_V6: LpmTrie<AddrV6, PortSet> =
    LpmTrie::with_max_entries(redirect::MAX_PREFIXES, 0);

#[map(name = "LISTENERS")]
pub static LISTENERS: SockMap = SockMap::with_max_entries(redirect::MAX_LISTENERS, 0);

/// Flows whose SYN `capture` handed to a TIME_WAIT socket; `steer` gives them the listener.
#[map(name = "TW_SYNS")]
pub static TW_SYNS: LruHashMap<FlowKey, u32> =
    LruHashMap::with_max_entries(redirect::MAX_TW_SYNS, 0);

/// When `capture` last inserted into `TW_SYNS` (`bpf_ktime_get_ns`). `steer` runs in every
/// listener lookup of the node's namespace (each SYN to a local address, and each
/// `bpf_skc_lookup_tcp` of `capture` that misses the established table): hashing its 40-byte key
/// for an entry that almost never exists was about a sixth of a captured SYN's cost. A plain
/// store: CPUs racing each write a time of about now, and the lookup that matters runs on the
/// CPU that wrote, right after.
#[map(name = "TW_LAST")]
pub static TW_LAST: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "CAPTURE_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "CAPTURE_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::MAX_ENTRIES, 0);

// XDP authorization (program `authorize`): two generations of the rule maps, flipped by
// `AUTHZ_GENERATION`; see `mesh_common::authz`.

#[map(name = "AUTHZ_V4_0")]
pub static V4_0: LpmTrie<DstV4, u32> = LpmTrie::with_max_entries(authz::MAX_PREFIXES, 0);
#[map(name = "AUTHZ_V4_1")]
pub static V4_1: LpmTrie<DstV4, u32> = LpmTrie::with_max_entries(authz::MAX_PREFIXES, 0);
#[map(name = "AUTHZ_V6_0")]
pub static V6_0: LpmTrie<DstV6, u32> = LpmTrie::with_max_entries(authz::MAX_PREFIXES, 0);
#[map(name = "AUTHZ_V6_1")]
pub static V6_1: LpmTrie<DstV6, u32> = LpmTrie::with_max_entries(authz::MAX_PREFIXES, 0);

/// Not preallocated: memory follows the number of distinct lists, not `MAX_LISTS`.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "AUTHZ_LISTS_0")]
pub static LISTS_0: HashMap<u32, RuleList> =
    HashMap::with_max_entries(authz::MAX_LISTS, BPF_F_NO_PREALLOC);
#[map(name = "AUTHZ_LISTS_1")]
pub static LISTS_1: HashMap<u32, RuleList> =
    HashMap::with_max_entries(authz::MAX_LISTS, BPF_F_NO_PREALLOC);

#[map(name = "AUTHZ_GENERATION")]
pub static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "AUTHZ_RULE_STATS")]
pub static RULE_STATS: PerCpuArray<authz::Counters> =
    PerCpuArray::with_max_entries(authz::MAX_RULE_ID, 0);

/// LRU: veths come and go with pods, and the counters of long-gone ifindexes make room.
#[map(name = "AUTHZ_IFACE_STATS")]
pub static IFACE_STATS: LruPerCpuHashMap<u32, IfaceCounters> =
    LruPerCpuHashMap::with_max_entries(authz::MAX_IFACES, 0);

// STRICT mTLS (program `refuse_plaintext`): destinations refused plaintext, and refusals per
// interface; see `mesh_common::mtls`.

#[map(name = "MTLS_STRICT_V4")]
pub static STRICT_V4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(mtls::MAX_STRICT, 0);
#[map(name = "MTLS_STRICT_V6")]
pub static STRICT_V6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(mtls::MAX_STRICT, 0);
#[map(name = "MTLS_REFUSED")]
pub static STRICT_REFUSED: LruPerCpuHashMap<u32, u64> =
    LruPerCpuHashMap::with_max_entries(mtls::MAX_IFACES, 0);

/// Adds one to a per-CPU counter slot.
#[inline(always)]
pub fn count(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += 1 };
    }
}
