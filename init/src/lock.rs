//! The sync lock: one exclusive `flock(2)` on `Layout::sync_lock()` keeps syncs, highstates and
//! boots from overlapping. The kernel drops the lock when its holder exits, however it exits, so a
//! lock file left behind by a dead process never blocks anyone. The holder writes its pid into the
//! file so a waiter can say who holds it.

use crate::paths::Layout;
use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiting `acquire` retries.
const POLL: Duration = Duration::from_millis(50);

/// Exclusive lock that keeps syncs, highstates and boots from overlapping. Released on drop.
pub struct SyncLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl std::fmt::Debug for SyncLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLock")
            .field("path", &self.path)
            .finish()
    }
}

impl SyncLock {
    /// Waits up to `wait` for the lock. Creates the run folder. The error names the lock file and
    /// the pid of the process that holds it.
    pub fn acquire(layout: &Layout, wait: Duration) -> Result<SyncLock> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(lock) = Self::try_acquire(layout)? {
                return Ok(lock);
            }
            let now = Instant::now();
            if now >= deadline {
                let path = layout.sync_lock();
                let holder = match read_holder(&path) {
                    Some(pid) => format!("pid {pid}"),
                    None => "a process that has not written its pid yet".to_string(),
                };
                bail!(
                    "another sync holds the lock {} ({holder}); gave up after waiting {}. \
                     Wait for it to finish, or stop that process",
                    path.display(),
                    humantime::format_duration(wait)
                );
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }

    /// Takes the lock if it is free; `None` when another process (or another `SyncLock` in this
    /// process) holds it.
    pub fn try_acquire(layout: &Layout) -> Result<Option<SyncLock>> {
        let dir = layout.run_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = layout.sync_lock();
        // The file may be removed and recreated under us (someone cleaning /run): a lock on an
        // unlinked inode would exclude nobody, so check that the path still names our file.
        for _ in 0..10 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)
                .with_context(|| format!("opening the lock file {}", path.display()))?;
            let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
                Err((_, Errno::EINTR)) => continue,
                Err((_, e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            };
            let ours = lock
                .metadata()
                .with_context(|| format!("reading {}", path.display()))?;
            match fs::metadata(&path) {
                Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
                _ => continue,
            }
            let pid = format!("{}\n", std::process::id());
            (|| -> std::io::Result<()> {
                lock.set_len(0)?;
                lock.seek(SeekFrom::Start(0))?;
                lock.write_all(pid.as_bytes())
            })()
            .with_context(|| format!("writing our pid into {}", path.display()))?;
            return Ok(Some(SyncLock { _lock: lock, path }));
        }
        bail!(
            "the lock file {} keeps being replaced; cannot lock it",
            path.display()
        )
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid the holder wrote into the lock file, if readable.
fn read_holder(path: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_acquire_times_out_then_succeeds_after_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        let held = SyncLock::acquire(&layout, Duration::from_secs(1)).unwrap();
        assert!(layout.run_dir().is_dir());
        assert_eq!(read_holder(&layout.sync_lock()), Some(std::process::id()));

        assert!(SyncLock::try_acquire(&layout).unwrap().is_none());
        let start = Instant::now();
        let err = SyncLock::acquire(&layout, Duration::from_millis(200)).unwrap_err();
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        let msg = format!("{err:#}");
        assert!(msg.contains("another sync holds the lock"), "{msg}");
        assert!(
            msg.contains(&layout.sync_lock().display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );

        drop(held);
        let again = SyncLock::acquire(&layout, Duration::from_millis(200)).unwrap();
        assert_eq!(again.path(), layout.sync_lock());
    }

    #[test]
    fn waiter_gets_the_lock_when_the_holder_lets_go() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        let held = SyncLock::acquire(&layout, Duration::ZERO).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(held);
        });
        let asked = std::time::Instant::now();
        let got = SyncLock::acquire(&layout, Duration::from_secs(5)).unwrap();
        // It waited for the holder, not around it.
        assert!(
            asked.elapsed() >= Duration::from_millis(100),
            "got the lock after {:?}, while it was held",
            asked.elapsed()
        );
        releaser.join().unwrap();
        drop(got);
    }

    #[test]
    fn stale_lock_file_never_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path());
        // A lock file left by a long-gone process: content but no flock.
        fs::create_dir_all(layout.run_dir()).unwrap();
        fs::write(layout.sync_lock(), "999999999\n").unwrap();
        let lock = SyncLock::try_acquire(&layout)
            .unwrap()
            .expect("stale file must not block");
        assert_eq!(read_holder(&layout.sync_lock()), Some(std::process::id()));
        drop(lock);

        // A real process that held the lock and was killed: the kernel releases it.
        if std::process::Command::new("flock")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("flock(1) not installed; skipping the killed-holder half");
            return;
        }
        let mut child = std::process::Command::new("flock")
            .args(["-x", "-o"])
            .arg(layout.sync_lock())
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match SyncLock::try_acquire(&layout).unwrap() {
                None => break, // the child holds it now
                Some(l) => {
                    drop(l);
                    assert!(Instant::now() < deadline, "flock(1) never took the lock");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        SyncLock::acquire(&layout, Duration::from_secs(2)).expect("a dead holder must not block");
    }
}
