//! A few fds kept free below the open-file limit.
//!
//! At the limit the agent refuses new connections at once (a reset, counted as `emfile`)
//! instead of leaving them in the accept queue. Refusing takes one fd: the kernel has to
//! accept a connection before it can reset it. If served connections, their upstream sockets
//! and pooled pipes could fill the table to the last fd, a racing allocation could take the
//! fd a refusal needs, and queued connections would then wait until their clients give up.
//!
//! So the top [`HEADROOM`] fds are not given to anything that stays: the kernel hands out the
//! lowest free fd, and an accepted socket, upstream socket or new pipe whose number falls in
//! the headroom is closed and treated as out of fds. Only transient uses remain there: the
//! refusal itself and the reserve fd of the accept loop.

use std::{
    io,
    os::fd::AsRawFd,
    sync::atomic::{AtomicI32, Ordering},
};

/// Fds kept free below the soft limit (fewer when the limit is tiny).
pub const HEADROOM: u64 = 8;

/// The first fd number in the headroom. No check until [`set_from_limit`] runs.
static CEILING: AtomicI32 = AtomicI32::new(i32::MAX);

/// Reads the open-file soft limit and sets the headroom below it. Called once, after the
/// agent has raised the soft limit.
pub fn set_from_limit() {
    use nix::sys::resource::{Resource, getrlimit};
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        CEILING.store(ceiling(soft), Ordering::Relaxed);
    }
}

fn ceiling(soft: u64) -> i32 {
    let keep = HEADROOM.min(soft / 8);
    i32::try_from(soft - keep).unwrap_or(i32::MAX)
}

/// Whether `fd` lies in the headroom: its holder must close it and give up.
pub fn reached(fd: &impl AsRawFd) -> bool {
    fd.as_raw_fd() >= CEILING.load(Ordering::Relaxed)
}

/// The error an fd in the headroom stands for.
pub fn out_of_fds() -> io::Error {
    io::Error::from_raw_os_error(nix::errno::Errno::EMFILE as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headroom_is_eight_fds_or_an_eighth_of_a_tiny_limit() {
        assert_eq!(ceiling(20_000), 19_992);
        assert_eq!(ceiling(256), 248);
        assert_eq!(ceiling(32), 28);
        assert_eq!(ceiling(u64::MAX), i32::MAX);
    }
}
