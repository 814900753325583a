//! shmback as a container's PID 1: a small init in front of the real process.
//!
//! An init must reap every orphan re-parented to it. Doing that inside the uploader itself
//! (`waitpid(-1)` on a thread) would also take the exit status of children the uploader waits for
//! on its own — hooks, scheduled jobs, the password command, the rclone and ssh processes of the
//! rclone and SFTP backends — and each of those waits would fail with ECHILD. So, as PID 1,
//! shmback starts itself again as its only child, with the same arguments, and becomes what
//! tini is: it passes SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 on to that child,
//! reaps every orphan, and exits with the child's status (128+N if signal N killed it) once it
//! has ended. The child is not PID 1 and waits only for its own children.

use std::process::{Command, ExitCode};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use signal_hook::iterator::Signals;

/// Set in the child's environment, so it does not start an init of its own (it is not PID 1,
/// but a nested PID namespace could make it one again).
const CHILD_MARK: &str = "SHMBACK_INIT_CHILD";

/// If this process is PID 1 (and not already the init's child), runs as the init described in
/// the module documentation and returns the status to exit with; else returns `None` and the
/// caller goes on as usual.
pub fn run_as_init_if_pid_1() -> Option<ExitCode> {
    if std::process::id() != 1 || std::env::var_os(CHILD_MARK).is_some() {
        return None;
    }
    Some(match init() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("shmback (as PID 1): {e:#}");
            ExitCode::from(1)
        }
    })
}

fn init() -> anyhow::Result<u8> {
    use anyhow::Context as _;
    // Handlers first: a signal between the start of the child and the handler would be lost
    // (PID 1 ignores signals it has no handler for).
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2]).context("installing the signal handlers")?;
    let exe = std::env::current_exe().context("finding shmback's own executable to start it under PID 1")?;
    let child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_MARK, "1")
        .spawn()
        .context("starting shmback under PID 1")?;
    let child = Pid::from_raw(child.id() as i32);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if let Ok(sig) = Signal::try_from(s) {
                    // ESRCH: the child has just ended; the waiter below sees it.
                    let _ = kill(child, sig);
                }
            }
        })
        .context("starting the signal thread")?;
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => return Ok(code as u8),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return Ok(128 + sig as u8),
            // An orphan reaped (or a stop/continue report, which is not asked for).
            Ok(_) | Err(Errno::EINTR) => {}
            // No child left without the child's status seen: only if it was reaped with a status
            // nix cannot read (an unknown signal).
            Err(Errno::ECHILD) => return Ok(1),
            Err(e) => return Err(e).context("waiting for children as PID 1"),
        }
    }
}
