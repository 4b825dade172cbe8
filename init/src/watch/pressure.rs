//! Whether the CPUs were contended while a finished write was being confirmed, from the
//! kernel's pressure stall information (`/proc/pressure/cpu`, Linux 4.20+).
//!
//! A finished lone write is acted on once the queue stayed empty for a millisecond: a writer in
//! a loop writes again well within that, if it gets a CPU. On a busy machine it may not, and the
//! agent would restart its program in the middle of a burst. The "some" line's `total` counts the
//! microseconds during which at least one runnable task waited for a CPU: if the writer cannot
//! have had [`WRITER_NEEDS`] of CPU time since its close, the agent cannot tell a finished writer
//! from a preempted one, and the target waits the quiet window like a burst. Without PSI (an old
//! kernel, `psi=0`) the confirmation is trusted as it is.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// CPU time a writer in a loop needs to write again (open, write, close, rename, with margin).
pub const WRITER_NEEDS: Duration = Duration::from_micros(500);

/// A source of the "some" stall total, in microseconds.
pub trait Pressure: std::fmt::Debug {
    fn stalled_us(&mut self) -> Option<u64>;
}

/// `/proc/pressure/cpu`, kept open and read from its start each time (one pread).
#[derive(Debug)]
pub struct ProcPressure {
    file: Option<File>,
}

impl ProcPressure {
    pub fn open() -> ProcPressure {
        let file = File::open("/proc/pressure/cpu").ok();
        if file.is_none() {
            tracing::debug!("no /proc/pressure/cpu: a finished write's confirmation is trusted on a busy machine too");
        }
        ProcPressure { file }
    }
}

impl Pressure for ProcPressure {
    fn stalled_us(&mut self) -> Option<u64> {
        let f = self.file.as_ref()?;
        let mut buf = [0u8; 256];
        let n = f.read_at(&mut buf, 0).ok()?;
        some_total(&buf[..n])
    }
}

/// The `total=` of the `some` line.
pub fn some_total(text: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(text).ok()?;
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Whether a writer may have been kept from writing again: in `elapsed`, `stalled` of it had a
/// task waiting for a CPU, which may have been the writer, leaving it less than
/// [`WRITER_NEEDS`].
pub fn contended(elapsed: Duration, stalled: Duration) -> bool {
    elapsed.saturating_sub(stalled) < WRITER_NEEDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_some_total() {
        let text = b"some avg10=0.23 avg60=3.47 avg300=3.89 total=83252744\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total(text), Some(83_252_744));
        assert_eq!(some_total(b"full avg10=0.00 total=5\n"), None);
        assert_eq!(some_total(b"some avg10=0.00 total=x\n"), None);
        assert_eq!(some_total(b""), None);
    }

    #[test]
    fn the_writer_must_have_had_time_to_write_again() {
        let ms = Duration::from_millis;
        assert!(!contended(ms(1), Duration::ZERO));
        assert!(contended(ms(1), Duration::from_micros(700)));
        assert!(!contended(ms(5), ms(3)));
        assert!(contended(Duration::from_micros(300), Duration::ZERO));
    }

    #[test]
    fn reads_this_kernel_when_it_has_psi() {
        let mut p = ProcPressure::open();
        if !std::path::Path::new("/proc/pressure/cpu").exists() {
            assert_eq!(p.stalled_us(), None);
        } else if let Some(a) = p.stalled_us() {
            let b = p.stalled_us().expect("a total, read again from the start");
            assert!(b >= a);
        }
    }
}
