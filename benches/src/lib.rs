//! Shared pieces of shmback's benchmarks: the length-prefixed stream protocol the pipe and
//! socketpair baselines use, so every transport moves the same bytes with the same final ack.

use std::io::{self, Read, Write};
use std::time::Duration;

use shmback_proto::{Consumer, Frame, Memory, RingError};

/// Reads one transfer from `r`: a u64 length (0 ends the session), then that many bytes copied
/// out in chunks of at most `chunk` bytes, then writes a one-byte ack to `w`.
/// Returns `Ok(false)` at the end of the session.
pub fn serve_stream(r: &mut impl Read, w: &mut impl Write, buf: &mut [u8]) -> io::Result<bool> {
    let mut len = [0u8; 8];
    if r.read_exact(&mut len).is_err() {
        return Ok(false);
    }
    let mut left = u64::from_le_bytes(len);
    if left == 0 {
        return Ok(false);
    }
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    w.write_all(&[1])?;
    w.flush()?;
    Ok(true)
}

/// Sends `iters` writes of `chunk` to `w` as one transfer and waits for the ack on `r`.
pub fn send_stream(w: &mut impl Write, r: &mut impl Read, chunk: &[u8], iters: u64) -> io::Result<()> {
    w.write_all(&(chunk.len() as u64 * iters).to_le_bytes())?;
    for _ in 0..iters {
        w.write_all(chunk)?;
    }
    w.flush()?;
    let mut ack = [0u8; 1];
    r.read_exact(&mut ack)
}

/// Serves a ring the way every benchmark receiver does: copies each DATA payload out into `buf`,
/// acks each COMMIT (its `entries` field carries the sequence to ack). Returns when the producer
/// is gone.
pub fn serve_ring<M: Memory>(c: &mut Consumer<M>, buf: &mut [u8]) {
    loop {
        let f = match c.recv(Duration::from_secs(600)) {
            Ok(f) => f,
            Err(RingError::PeerGone { .. }) => return,
            Err(e) => panic!("{e}"),
        };
        let ack = match f.decode().expect("valid frame") {
            Frame::Data(d) => {
                buf[..d.len()].copy_from_slice(d);
                std::hint::black_box(&buf);
                None
            }
            Frame::Commit { entries, .. } => Some(entries),
            other => panic!("unexpected {other:?}"),
        };
        f.release();
        if let Some(seq) = ack {
            c.publish_durable(seq, &[0; 32]);
        }
    }
}
