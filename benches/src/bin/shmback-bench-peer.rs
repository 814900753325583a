//! The other process of the cross-process benchmarks.
//! - `ring SEGMENT`: consumer; copies each DATA payload out, acks each COMMIT (its `entries`
//!   field carries the sequence), exits when the producer is gone.
//! - `drain SEGMENT`: an uploader stand-in for writer batches: validates every frame with the
//!   batch decoder, copies file data out, acks each committed batch; exits when the producer is gone.
//! - `pipe`: reads transfers from stdin, acks on stdout.
//! - `socket PATH`: connects to a unix socket, reads transfers, acks on it.

use std::time::Duration;

use shmback_benches::{serve_ring, serve_stream};
use shmback_proto::batch::Event;
use shmback_proto::{BatchDecoder, RingError, Segment, SegmentOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut buf = vec![0u8; 1 << 21];
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["ring", seg] => {
            let opts = SegmentOptions { capacity: None, create: false, ..SegmentOptions::default() };
            let mut c = Segment::consumer(seg, &opts).expect("attach");
            println!("ready");
            serve_ring(&mut c, &mut buf);
        }
        ["drain", seg] => {
            let opts = SegmentOptions { capacity: None, create: false, ..SegmentOptions::default() };
            let mut c = Segment::consumer(seg, &opts).expect("attach");
            let mut dec = BatchDecoder::new();
            println!("ready");
            loop {
                let f = match c.recv(Duration::from_secs(600)) {
                    Ok(f) => f,
                    Err(RingError::PeerGone { .. }) => return,
                    Err(e) => panic!("{e}"),
                };
                let frame = f.decode().expect("valid frame");
                let ack = match dec.feed(frame).expect("valid batch") {
                    Event::Data { bytes, .. } => {
                        buf[..bytes.len()].copy_from_slice(bytes);
                        std::hint::black_box(&buf);
                        None
                    }
                    Event::Commit { seq, .. } => Some(seq),
                    _ => None,
                };
                f.release();
                if let Some(seq) = ack {
                    c.publish_durable(seq, &[0; 32]);
                }
            }
        }
        ["pipe"] => {
            let (mut i, mut o) = (std::io::stdin().lock(), std::io::stdout().lock());
            while serve_stream(&mut i, &mut o, &mut buf).expect("pipe") {}
        }
        ["socket", path] => {
            let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
            let mut w = s.try_clone().unwrap();
            while serve_stream(&mut s, &mut w, &mut buf).expect("socket") {}
        }
        _ => {
            eprintln!("usage: shmback-bench-peer ring SEGMENT | pipe | socket PATH");
            std::process::exit(2);
        }
    }
}
