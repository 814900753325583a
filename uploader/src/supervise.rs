//! `shmback run ... -- APP ARGS`: the uploader as its app's supervisor, for platforms where one
//! service is one container (Akash): the container's entrypoint runs both.
//!
//! The order of a start: the directories of `--restore-if-empty` are restored if they are empty
//! ([`crate::restore_if_empty`]); the repository is opened and the segments attached; only then
//! is APP started, so it finds its segments and its data. While APP runs, SIGTERM, SIGINT and
//! SIGHUP sent to shmback are passed on to it; APP's exit ends serving (the batch in flight gets
//! the grace period) and shmback exits with APP's status. A SIGTERM/SIGINT gives APP the grace
//! period to exit (then SIGKILL), and serving continues meanwhile, so APP may still send a last
//! batch on its way out. Serving that fails stops APP (SIGTERM, then SIGKILL after the grace
//! period) and shmback exits with the error. As PID 1, shmback reaps every process re-parented
//! to it, as an init must.
//!
//! One thread (the coordinator) owns APP and decides; the signal thread, the waiter thread and
//! the serving side only send it events.

use std::ffi::OsString;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, error, info, warn};

use crate::config::RepositoryConfig;
use crate::restore_if_empty::{RestoreIfEmpty, SnapshotFilter, restore_if_empty};

/// What to supervise, and what to prepare before it starts.
#[derive(Clone, Debug)]
pub struct Supervise {
    /// APP and its arguments (at least APP).
    pub app: Vec<OsString>,
    /// How long APP may take to exit after SIGTERM/SIGINT (or after serving failed) before it
    /// is killed.
    pub grace: Duration,
    /// Directories to restore before APP starts if they are missing or empty.
    pub restore: Vec<RestoreIfEmpty>,
    /// Which snapshots those restores may come from.
    pub filter: SnapshotFilter,
}

/// How APP ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppExit {
    /// It exited with this status.
    Code(i32),
    /// A signal (this number) killed it.
    Signal(i32),
    /// It ended, but its status could not be read (a signal nix cannot name).
    Unknown,
}

impl AppExit {
    /// The exit status a shell reports for it: the code, or 128 + the signal's number.
    pub fn status(self) -> u8 {
        match self {
            AppExit::Code(c) => (c & 0xff) as u8,
            AppExit::Signal(s) => (128 + s).clamp(0, 255) as u8,
            AppExit::Unknown => 1,
        }
    }
}

impl std::fmt::Display for AppExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppExit::Code(c) => write!(f, "exited with status {c}"),
            AppExit::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "was killed by {sig} (status {})", self.status()),
                Err(_) => write!(f, "was killed by signal {s} (status {})", self.status()),
            },
            AppExit::Unknown => f.write_str("ended with a status that could not be read"),
        }
    }
}

/// What the coordinator hears about.
#[derive(Debug)]
enum Event {
    /// shmback received this signal.
    Signal(i32),
    /// Every segment is attached: APP may start.
    Attached,
    /// APP ended.
    AppExited(AppExit),
    /// Serving returned (stopped as asked, or failed).
    ServingEnded,
}

/// Restores what `sup.restore` names if empty, serves (`serve` is given the stop flag and the
/// call to make once ready, e.g. [`serve_all`](crate::serve_all) with its segments attached) and
/// runs APP as described in the module documentation. Returns how APP ended, or `None` if a
/// SIGTERM/SIGINT came before it was started; an error if the restore or serving failed (APP is
/// then stopped, or never started) or APP could not be started.
pub fn supervise(
    config: &RepositoryConfig,
    sup: &Supervise,
    serve: impl FnOnce(&Arc<AtomicBool>, Box<dyn FnOnce() + Send>) -> anyhow::Result<()>,
) -> anyhow::Result<Option<AppExit>> {
    anyhow::ensure!(!sup.app.is_empty(), "no APP to supervise: give it after `--`");
    let (tx, rx) = channel();
    // First of all, so a SIGTERM during the restore is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing the signal handlers")?;
    let signals_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if signals_tx.send(Event::Signal(s)).is_err() {
                    break;
                }
            }
        })
        .context("starting the signal thread")?;
    let stop = Arc::new(AtomicBool::new(false));
    let coordinator = Coordinator {
        app: sup.app.clone(),
        grace: sup.grace,
        stop: stop.clone(),
        reap_all: std::process::id() == 1,
        events: tx.clone(),
    };
    let coordinator = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || coordinator.run(rx))
        .context("starting the supervisor thread")?;

    let served =
        if sup.restore.is_empty() { Ok(()) } else { restore_if_empty(config, &sup.restore, &sup.filter).map(drop) };
    // A stop asked for during the restore: neither serve nor start APP.
    let served = served.and_then(|()| {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let attached = tx.clone();
        serve(&stop, Box::new(move || drop(attached.send(Event::Attached))))
    });
    let _ = tx.send(Event::ServingEnded);
    let ended = coordinator.join().map_err(|_| anyhow::anyhow!("the supervisor thread panicked"))?;
    served?;
    ended
}

/// Owns APP: starts it, passes signals on, kills it after the grace period, and reports how it
/// ended once serving has ended too.
struct Coordinator {
    app: Vec<OsString>,
    grace: Duration,
    /// Serving's stop flag: set once APP has ended, or when asked to stop before it started.
    stop: Arc<AtomicBool>,
    /// shmback is PID 1: reap every child, not only APP.
    reap_all: bool,
    /// For the waiter thread.
    events: Sender<Event>,
}

enum App {
    NotStarted { stopping: bool },
    Running { pid: Pid, kill_at: Option<Instant> },
    Ended(AppExit),
    Failed(anyhow::Error),
}

impl Coordinator {
    fn run(self, events: Receiver<Event>) -> anyhow::Result<Option<AppExit>> {
        let mut app = App::NotStarted { stopping: false };
        let mut serving = true;
        loop {
            let kill_at = match app {
                App::Running { kill_at, .. } => kill_at,
                _ => None,
            };
            let event = match kill_at {
                Some(at) => match events.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => {
                        if let App::Running { pid, kill_at } = &mut app {
                            warn!(
                                pid = pid.as_raw(),
                                "the app did not exit within {:?} (--grace); killing it", self.grace
                            );
                            signal(*pid, Signal::SIGKILL);
                            *kill_at = None;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => unreachable!("the coordinator holds a sender"),
                },
                None => events.recv().expect("the coordinator holds a sender"),
            };
            match (&mut app, event) {
                (App::NotStarted { stopping }, Event::Signal(s)) if s == SIGTERM || s == SIGINT => {
                    info!("asked to stop before the app was started: it will not be");
                    *stopping = true;
                    self.stop.store(true, Ordering::Relaxed);
                }
                (App::NotStarted { stopping: false }, Event::Attached) => app = self.start(),
                (App::Running { pid, kill_at }, Event::Signal(s)) => {
                    if let Ok(sig) = Signal::try_from(s) {
                        info!(pid = pid.as_raw(), "passing {sig} on to the app");
                        signal(*pid, sig);
                    }
                    if (s == SIGTERM || s == SIGINT) && kill_at.is_none() {
                        *kill_at = Some(Instant::now() + self.grace);
                    }
                }
                (App::Running { .. }, Event::AppExited(how)) => {
                    if how == AppExit::Code(0) {
                        info!("the app {how}; stopping");
                    } else {
                        warn!("the app {how}; stopping");
                    }
                    self.stop.store(true, Ordering::Relaxed);
                    app = App::Ended(how);
                }
                (App::Running { pid, kill_at }, Event::ServingEnded) => {
                    serving = false;
                    warn!(pid = pid.as_raw(), "serving ended while the app runs: stopping the app (SIGTERM)");
                    signal(*pid, Signal::SIGTERM);
                    kill_at.get_or_insert_with(|| Instant::now() + self.grace);
                }
                (_, Event::ServingEnded) => serving = false,
                // Signals while serving winds down, and nothing else can happen in other states.
                _ => {}
            }
            if !serving {
                match app {
                    App::NotStarted { .. } => return Ok(None),
                    App::Ended(how) => return Ok(Some(how)),
                    App::Failed(e) => return Err(e),
                    App::Running { .. } => {}
                }
            }
        }
    }

    /// Starts APP and its waiter; on failure, stops serving.
    fn start(&self) -> App {
        let started = Command::new(&self.app[0]).args(&self.app[1..]).spawn();
        let child = match started {
            Ok(child) => child,
            Err(e) => {
                self.stop.store(true, Ordering::Relaxed);
                let app = self.app[0].to_string_lossy();
                return App::Failed(anyhow::Error::new(e).context(format!(
                    "starting the app `{app}` (after `--`): check that it exists and is executable (PATH is searched \
                     for a bare name)"
                )));
            }
        };
        let pid = Pid::from_raw(child.id() as i32);
        info!(pid = pid.as_raw(), app = %self.app[0].to_string_lossy(), "started the app");
        // The waiter reaps APP with waitpid; the `Child` handle is not waited on.
        drop(child);
        let (events, reap_all) = (self.events.clone(), self.reap_all);
        let waiter = std::thread::Builder::new().name("reaper".into()).spawn(move || wait(pid, reap_all, &events));
        if let Err(e) = waiter {
            // Without a waiter APP's end would go unnoticed: stop it rather than run blind.
            signal(pid, Signal::SIGKILL);
            self.stop.store(true, Ordering::Relaxed);
            return App::Failed(anyhow::Error::new(e).context("starting the thread that waits for the app"));
        }
        App::Running { pid, kill_at: None }
    }
}

fn signal(pid: Pid, sig: Signal) {
    // ESRCH: APP has just exited and its waiter will say so.
    if let Err(e) = kill(pid, sig)
        && e != Errno::ESRCH
    {
        error!(pid = pid.as_raw(), "sending {sig} to the app: {e}");
    }
}

/// Waits for APP (`pid`) to end and says how; as PID 1 (`reap_all`), also reaps every other
/// child, before and after APP's end, until none is left.
fn wait(pid: Pid, reap_all: bool, events: &Sender<Event>) {
    let mut app_ended = false;
    loop {
        let got = waitpid(if reap_all { None } else { Some(pid) }, None);
        let (who, how) = match got {
            Ok(WaitStatus::Exited(p, code)) => (p, AppExit::Code(code)),
            Ok(WaitStatus::Signaled(p, sig, _)) => (p, AppExit::Signal(sig as i32)),
            // Stopped and continued children are not asked for (no WUNTRACED/WCONTINUED).
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            // A child was reaped, but its status names a signal nix does not know (if APP is gone,
            // it was APP); or no child is left. Either way APP's end must be told, or the
            // supervisor would wait for it for ever.
            Err(e) => {
                let gone = e == Errno::ECHILD || kill(pid, None) == Err(Errno::ESRCH);
                if !app_ended && gone {
                    warn!(pid = pid.as_raw(), "reading the app's exit status: {e}");
                    app_ended = true;
                    let _ = events.send(Event::AppExited(AppExit::Unknown));
                }
                if e == Errno::ECHILD || !reap_all {
                    return;
                }
                continue;
            }
        };
        if who == pid {
            app_ended = true;
            let _ = events.send(Event::AppExited(how));
            if !reap_all {
                return;
            }
        } else {
            debug!(pid = who.as_raw(), "reaped an orphan ({how})");
            // It may be a scheduled job's process, whose runner waits for this status.
            let raw = match how {
                AppExit::Code(code) => (code & 0xff) << 8,
                AppExit::Signal(sig) => sig & 0x7f,
                AppExit::Unknown => continue,
            };
            crate::schedule::child_reaped(who.as_raw(), std::os::unix::process::ExitStatusExt::from_raw(raw));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_reported_as_shells_do() {
        assert_eq!(AppExit::Code(0).status(), 0);
        assert_eq!(AppExit::Code(3).status(), 3);
        assert_eq!(AppExit::Signal(15).status(), 143);
        assert_eq!(AppExit::Signal(9).status(), 137);
        assert_eq!(AppExit::Unknown.status(), 1);
        assert_eq!(AppExit::Signal(9).to_string(), "was killed by SIGKILL (status 137)");
    }
}
