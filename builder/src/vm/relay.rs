//! `builder relay HOST:PORT`: joins its standard input and output to a TCP connection. qemu's
//! `guestfwd=...-cmd:` starts one per guest connection, which is how the guest reaches the
//! metadata emulator and git daemons on the host's loopback (a `tcp:` chardev there would carry
//! only one connection for the whole run).

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

pub fn relay(addr: &str) -> Result<()> {
    let stream =
        TcpStream::connect(addr).with_context(|| format!("relay: connecting to {addr}"))?;
    let mut upstream = stream.try_clone().context("relay: cloning the socket")?;
    let to_host = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let _ = pump(&mut stdin, &mut upstream);
        let _ = upstream.shutdown(Shutdown::Write);
    });
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let r = pump(&mut downstream, &mut stdout);
    // The guest side closes when the answer is complete; stdin may never end, so do not wait.
    drop(to_host);
    r.context("relay: copying to the guest")
}

fn pump(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}
