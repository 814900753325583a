//! A child producer is SIGKILLed at random points, over many rounds, while it streams patterned
//! frames into a segment; a new child re-attaches each round. The consumer must never see a torn
//! or altered frame, must see each producer's frames in order with no gap, and must report
//! `PeerGone` promptly after each kill.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shmback_proto::{RingConfig, RingError, Role, Segment, SegmentOptions};
use shmback_tests::{Rng, frame_len, pattern};

const PEER: &str = env!("CARGO_BIN_EXE_shmback-test-peer");

#[test]
fn sigkilled_producers_never_leave_torn_frames() {
    let rounds: u64 = std::env::var("SHMBACK_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("kill test seed {seed}, {rounds} rounds");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("seg");
    let tick = Duration::from_millis(20);
    let opts = SegmentOptions {
        capacity: Some(64 << 10),
        ring: RingConfig { tick, ..RingConfig::default() },
        ..SegmentOptions::default()
    };
    let mut c = Segment::consumer(&path, &opts).unwrap();
    let mut total_frames = 0u64;
    for round in 0..rounds {
        let nonce = seed.wrapping_add(round);
        let mut child = Command::new(PEER)
            .args(["produce", path.to_str().unwrap(), &nonce.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "attached", "round {round}: child failed to attach");
        let run_for = Duration::from_micros(rng.range(100, 30_000));
        let start = Instant::now();
        let mut next = 0u64;
        let mut killed_at = None;
        loop {
            if killed_at.is_none() && start.elapsed() >= run_for {
                kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
                killed_at = Some(Instant::now());
            }
            let f = match c.recv(Duration::from_millis(if killed_at.is_some() { 5_000 } else { 1 })) {
                Ok(f) => f,
                Err(RingError::Timeout { .. }) if killed_at.is_none() => continue,
                Err(RingError::PeerGone { peer: Role::Producer }) => {
                    assert!(
                        killed_at.is_some() || child.try_wait().unwrap().is_some(),
                        "round {round}: PeerGone while alive"
                    );
                    break;
                }
                Err(e) => panic!("round {round} (seed {seed}): {e}"),
            };
            let payload = f.payload();
            assert!(payload.len() >= 16, "round {round}: frame of {} bytes", payload.len());
            let got_nonce = u64::from_le_bytes(payload[..8].try_into().unwrap());
            let n = u64::from_le_bytes(payload[8..16].try_into().unwrap());
            assert_eq!(got_nonce, nonce, "round {round} (seed {seed}): frame from another producer");
            assert_eq!(n, next, "round {round} (seed {seed}): frame {n} where {next} was due");
            assert_eq!(payload.len(), frame_len(n), "round {round}: frame {n} has the wrong length");
            assert!(payload == &pattern(nonce, n, frame_len(n))[..], "round {round} (seed {seed}): frame {n} torn");
            f.release();
            next += 1;
        }
        let gone_after = killed_at.map(|k| k.elapsed());
        child.wait().unwrap();
        if let Some(d) = gone_after {
            // Reported within a few liveness ticks (generous: the machine is shared and noisy).
            assert!(d < tick * 50, "round {round}: PeerGone {d:?} after the kill");
        }
        total_frames += next;
    }
    eprintln!("{total_frames} frames verified over {rounds} rounds");
    assert!(total_frames > rounds, "producers barely produced: {total_frames} frames in {rounds} rounds");
}
