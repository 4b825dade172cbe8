//! Content fingerprints: streaming sha256 of regular files, markers for everything else.

use ring::digest::{Context, SHA256};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a watched path holds, as far as "did it change" is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    /// Nothing there (or a dangling symlink).
    Absent,
    /// A folder.
    Dir,
    /// A fifo, socket or device: never opened for reading.
    Special,
    /// There but not readable (permissions, I/O error).
    Unreadable,
    /// A regular file's content.
    Sha256([u8; 32]),
}

/// Fingerprints `path`, following symlinks. Never blocks on a fifo; reads in 16 KiB chunks.
pub fn digest(path: &Path) -> Digest {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path);
    let mut file: File = match file {
        Ok(f) => f,
        Err(e) => {
            return match e.kind() {
                ErrorKind::NotFound => Digest::Absent,
                _ if e.raw_os_error() == Some(nix::libc::ENOTDIR) => Digest::Absent,
                _ if e.raw_os_error() == Some(nix::libc::ENXIO) => Digest::Special,
                _ => Digest::Unreadable,
            }
        }
    };
    let ft = match file.metadata() {
        Ok(m) => m.file_type(),
        Err(_) => return Digest::Unreadable,
    };
    if ft.is_dir() {
        return Digest::Dir;
    }
    if ft.is_fifo() || ft.is_socket() || ft.is_block_device() || ft.is_char_device() {
        return Digest::Special;
    }
    let mut hasher = Context::new(&SHA256);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Digest::Unreadable,
        }
    }
    Digest::Sha256(sha256_bytes(hasher.finish()))
}

fn sha256_bytes(d: ring::digest::Digest) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn regular_files_stream() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        let mut f = File::create(&p).unwrap();
        let chunk: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let mut whole = Context::new(&SHA256);
        for i in 0..5u8 {
            let mut c = chunk.clone();
            c[0] = i;
            f.write_all(&c).unwrap();
            whole.update(&c);
        }
        f.write_all(b"tail").unwrap();
        whole.update(b"tail");
        drop(f);
        assert_eq!(digest(&p), Digest::Sha256(sha256_bytes(whole.finish())));

        let e = dir.path().join("empty");
        File::create(&e).unwrap();
        assert_eq!(
            digest(&e),
            Digest::Sha256(sha256_bytes(ring::digest::digest(&SHA256, b"")))
        );
    }

    #[test]
    fn markers() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(digest(dir.path()), Digest::Dir);
        assert_eq!(digest(&dir.path().join("nope")), Digest::Absent);
        assert_eq!(digest(&dir.path().join("nope/deeper")), Digest::Absent);
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert_eq!(digest(&dangling), Digest::Absent);
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(digest(&fifo), Digest::Special);
        if !nix::unistd::geteuid().is_root() {
            let locked = dir.path().join("locked");
            std::fs::write(&locked, b"x").unwrap();
            std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o000))
                .unwrap();
            assert_eq!(digest(&locked), Digest::Unreadable);
        }
    }
}
