//! `flock(2)` on an open file: the one place the local target's locks call it (the caches lent
//! to provisioning, the packages layer, each build's folder).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Takes an exclusive lock without waiting: `Ok(false)` when another open file holds one.
pub fn try_exclusive(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock(2) on a descriptor `f` owns for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Takes a shared lock, waiting for an exclusive one to go.
pub fn shared(f: &File) -> std::io::Result<()> {
    // SAFETY: as above.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
