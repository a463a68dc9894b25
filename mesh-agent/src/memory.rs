//! Giving freed heap back to the kernel. Start-up parses the kernel's BTF and the policy (tens of
//! MB at the peak) and a load spike fills the workers' allocator arenas; glibc keeps what was
//! freed inside its arenas (only the top of the main heap is returned by itself), so the
//! resident size would stay at the high-water mark. `malloc_trim` returns the free pages of
//! every arena.

use std::time::Duration;

/// How often the control plane trims while the agent runs.
pub const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Returns the allocator's free pages to the kernel; a no-op off glibc.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}
