//! Per-CPU packet counters kept by the `capture` TC program.
//!
//! One `PerCpuArray<u64>` indexed by [`Counter`]; the agent sums the CPUs at read time.

/// Name of the per-CPU counter array in the eBPF object.
pub const MAP_NAME: &str = "CAPTURE_COUNTERS";

/// Slots in the counter array. Indexes are stable: they are part of the map layout.
pub mod index {
    /// Every packet the program looked at.
    pub const SEEN: u32 = 0;
    /// TCP packets whose destination and port are targeted by policy.
    pub const TARGETED: u32 = 1;
    /// Targeted packets handed to an agent socket (listener or established).
    pub const REDIRECTED: u32 = 2;
    /// Targeted connection openings (SYN) found no agent listener.
    pub const NO_LISTENER: u32 = 3;
    /// Helper failures (socket assignment, malformed headers that could not be read).
    pub const ERRORS: u32 = 4;
    /// Targeted packets passed untouched because no listener exists and the fail mode is open.
    pub const FAIL_OPEN: u32 = 5;
    /// Targeted connection openings refused with a RST because no listener exists (fail mode closed).
    pub const FAIL_CLOSED: u32 = 6;
    /// Targeted packets of a connection the agent does not own (opened before capture): passed.
    pub const PASSED_UNOWNED: u32 = 7;
    /// Targeted connection openings (SYN) whose 4-tuple still had a socket on the node (most
    /// often the TIME_WAIT of a closed connection the agent ended): handed to that socket, so
    /// the kernel handles the reuse as it does without the mesh.
    pub const SYN_TO_EXISTING: u32 = 8;
}

/// Number of slots in the counter array.
pub const MAX_ENTRIES: u32 = 9;

/// Human names of the slots, in index order, for logs and metrics.
pub const NAMES: [&str; MAX_ENTRIES as usize] = [
    "seen",
    "targeted",
    "redirected",
    "no_listener",
    "errors",
    "fail_open",
    "fail_closed",
    "passed_unowned",
    "syn_to_existing",
];
