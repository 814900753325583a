//! Helper process for cross-process tests.
//! - `shmback-test-peer produce SEGMENT NONCE`: attaches to the segment and writes patterned DATA
//!   frames as fast as it can until it is killed.
//! - `shmback-test-peer create SEGMENT CAPACITY`: creates a segment; prints the error and exits 1
//!   if that fails (used inside a deliberately tiny tmpfs).

use std::time::Duration;

use shmback_proto::{FrameKind, RingConfig, Segment, SegmentOptions};
use shmback_tests::{frame_len, pattern};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, cmd, segment, nonce] = &args[..] else {
        eprintln!("usage: shmback-test-peer produce SEGMENT NONCE | create SEGMENT CAPACITY");
        std::process::exit(2);
    };
    if cmd == "create" {
        let opts = SegmentOptions { capacity: Some(nonce.parse().expect("CAPACITY")), ..SegmentOptions::default() };
        match Segment::open(segment, shmback_proto::Role::Consumer, &opts) {
            Ok(_) => println!("created"),
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
        return;
    }
    assert_eq!(cmd, "produce", "unknown command {cmd}");
    let nonce: u64 = nonce.parse().expect("NONCE is a number");
    let opts = SegmentOptions {
        capacity: None,
        create: false,
        ring: RingConfig { tick: Duration::from_millis(20), ..RingConfig::default() },
        ..SegmentOptions::default()
    };
    let mut p = Segment::producer(segment, &opts).unwrap_or_else(|e| {
        eprintln!("shmback-test-peer: {e}");
        std::process::exit(1)
    });
    println!("attached");
    for n in 0u64.. {
        let data = pattern(nonce, n, frame_len(n));
        let mut r = p.reserve(FrameKind::Data, data.len(), Duration::from_secs(30)).expect("reserve");
        // Copy in two halves so a kill often lands mid-copy.
        let half = data.len() / 2;
        r[..half].copy_from_slice(&data[..half]);
        std::hint::black_box(&mut r);
        r[half..].copy_from_slice(&data[half..]);
        r.commit();
        if n % 7 == 0 {
            p.flush();
        }
    }
}
