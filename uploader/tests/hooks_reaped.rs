//! Hooks when another thread reaps every child, as `shmback run -- APP` does as PID 1 (in a
//! container): the hook's status must still be known. A test binary of its own, since the reaper
//! takes every child of the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::waitpid;
use shmback_uploader::hooks::{HookError, run_hook};

const T: Duration = Duration::from_secs(60);

#[test]
fn a_hooks_status_is_known_when_another_waiter_reaps_every_child() {
    let reaped = Arc::new(AtomicUsize::new(0));
    let count = reaped.clone();
    std::thread::spawn(move || {
        loop {
            match waitpid(None, None) {
                Err(Errno::ECHILD) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("waitpid: {e}"),
                Ok(_) => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    for _ in 0..5 {
        run_hook("post", "echo fine", &[], T).unwrap();
        let e = run_hook("post", "echo -n 'no newline'; exit 4", &[], T).unwrap_err();
        assert!(matches!(e, HookError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("exit status: 4"), "{e}");
    }
    // The reaper took the shells' statuses (most or all of them): the markers told the outcome.
    assert!(reaped.load(Ordering::Relaxed) > 0, "the reaper never got a child: the test tested nothing");
}
