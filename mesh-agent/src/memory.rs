//! The agent's allocator, and giving freed heap back to the kernel.
//!
//! The allocator is jemalloc (feature `jemalloc`, on by default). Under HTTP/2 every stream is a
//! task of a few KB; glibc serves those from its bins, with `malloc_consolidate` and list
//! unlinking: 13 % of the agent's samples under h2load (`_int_malloc`, `_int_free`,
//! `malloc_consolidate`, `malloc`, `unlink_chunk`, `free`), where jemalloc's per-thread caches
//! take and give back in a few instructions. Measured in `bench/README.md`: HTTP/2 requests/s
//! up by about a tenth, idle RSS up by about 1.7 MB. Two arenas (one per worker; each thread
//! caches anyway); freed pages are returned (`muzzy` off) after a second of allocator activity,
//! and [`trim`] purges everything freed at once.
//!
//! Start-up parses the kernel's BTF and the policy (tens of MB at the peak) and a load spike
//! fills the allocator: without a purge, freed pages would stay resident at the high-water
//! mark. [`trim`] runs after start-up and every [`TRIM_EVERY`].

use std::time::Duration;

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_rjem_` is the prefix of its symbols here).
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:2,dirty_decay_ms:1000,muzzy_decay_ms:0,abort_conf:true\0";

/// How often the control plane trims while the agent runs.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Returns the allocators' free pages to the kernel: jemalloc's arenas are purged (with the
/// feature), and glibc's `malloc_trim` walks its arenas in every build: jemalloc's symbols are
/// prefixed, so it does not replace `malloc`, and what glibc itself allocates (name lookups,
/// thread start-up) stays in glibc's heap.
pub fn trim() {
    #[cfg(feature = "jemalloc")]
    {
        // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's unused dirty pages, at once.
        let name = b"arena.4096.purge\0";
        // SAFETY: a NUL-terminated name of a void control; no old or new value is passed.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr().cast(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}
