//! The scheduler: runs each task when its schedule says, never two runs of one task at once,
//! notices runs missed while the daemon was down, and records every job's outcome (log line,
//! metrics, health).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tracing::{error, info, warn};

use super::spec::Schedule;
use super::state::State;
use crate::backends::failure::without_empty_backtraces;

/// Runs a job "around" whatever else must happen with it (hooks before and after, pings): it is
/// given the job's name and the job, and must call the job once and return its result (or its
/// own error). [`plain`] just calls it.
pub type Around = Arc<dyn Fn(&str, &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> + Send + Sync>;

/// The [`Around`] that just runs the job.
pub fn plain() -> Around {
    Arc::new(|_, job| job())
}

/// Where the scheduler reads the time: the system clock, or a clock a test moves.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// What a job is given when it runs.
pub struct JobContext<'a> {
    /// Set when the daemon is stopping.
    pub stop: &'a AtomicBool,
    /// How long a running job may go on once `stop` is set.
    pub grace: Duration,
}

/// A job's work.
pub type JobFn = Box<dyn FnMut(&JobContext<'_>) -> anyhow::Result<()> + Send>;

/// One job: a name (logs, metrics, health) and its work.
pub struct Job {
    /// The job's name.
    pub name: String,
    /// Its work.
    pub run: JobFn,
}

impl Job {
    /// A job named `name` doing `run`.
    pub fn new(
        name: impl Into<String>,
        run: impl FnMut(&JobContext<'_>) -> anyhow::Result<()> + Send + 'static,
    ) -> Self {
        Job { name: name.into(), run: Box::new(run) }
    }
}

/// Jobs on one schedule, run one after another in their order each time it is due (a failing
/// job does not keep the next from running).
pub struct Task {
    /// The task's name (the key of its last due time in the state file).
    pub name: String,
    /// When it is due.
    pub schedule: Schedule,
    /// What it runs.
    pub jobs: Vec<Job>,
}

/// How the scheduler behaves.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// After downtime, run a task that was due meanwhile once at start (else wait for its next time).
    pub run_missed: bool,
    /// How long running jobs may go on once the daemon stops.
    pub grace: Duration,
    /// How often the clock is read.
    pub tick: Duration,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions { run_missed: true, grace: Duration::from_secs(20), tick: Duration::from_millis(200) }
    }
}

/// Occurrences counted as missed at most, per downtime (a `@every 1s` task down for a week).
const MISSED_CAP: u64 = 100_000;

/// A task, with its run state.
struct Slot {
    name: String,
    schedule: Schedule,
    job_names: Vec<String>,
    jobs: Arc<Mutex<Vec<Job>>>,
    running: Arc<AtomicBool>,
    /// When it is next due; `None` if never again.
    next: Option<Timestamp>,
    thread: Option<JoinHandle<()>>,
}

/// Runs `tasks` on their schedules until `stop` is set; then running jobs get `opts.grace` (and
/// commands are killed after it), and the task threads are joined. `state` remembers when each
/// task was last due, across restarts.
pub fn run_scheduler(
    tasks: Vec<Task>,
    mut state: Option<State>,
    clock: Arc<dyn Clock>,
    around: Around,
    opts: &SchedulerOptions,
    stop: &Arc<AtomicBool>,
) {
    let now = clock.now();
    let mut slots: Vec<Slot> = tasks
        .into_iter()
        .map(|t| {
            let job_names: Vec<String> = t.jobs.iter().map(|j| j.name.clone()).collect();
            let next = first_due(&t.name, &t.schedule, &job_names, state.as_mut(), now, opts.run_missed);
            match next {
                Some(at) => info!(task = %t.name, schedule = %t.schedule, next = %at, "scheduled"),
                None => {
                    warn!(task = %t.name, schedule = %t.schedule, "the schedule is never due: the task will not run")
                }
            }
            Slot {
                name: t.name,
                schedule: t.schedule,
                job_names,
                jobs: Arc::new(Mutex::new(t.jobs)),
                running: Arc::new(AtomicBool::new(false)),
                next,
                thread: None,
            }
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let now = clock.now();
        for slot in &mut slots {
            let Some(due) = slot.next.filter(|d| *d <= now) else { continue };
            slot.next = slot.schedule.next_after(now);
            let late = slot.schedule.due_between(due, now, MISSED_CAP);
            if late > 0 {
                // The process was suspended or the clock jumped: those times passed unrun.
                count_missed(&slot.job_names, "downtime", late);
            }
            if let Some(state) = state.as_mut()
                && let Err(e) = state.set_last_due(&slot.name, now)
            {
                warn!(task = %slot.name, "{e:#}; a run missed while the daemon is down may go unnoticed");
            }
            if slot.running.load(Ordering::Acquire) {
                warn!(
                    task = %slot.name, due = %due,
                    "the previous run is still going: this run is skipped (one run of a task at a time; \
                     set --job-timeout or a less frequent schedule)"
                );
                count_missed(&slot.job_names, "overlap", 1);
                continue;
            }
            if let Some(t) = slot.thread.take() {
                let _ = t.join();
            }
            slot.running.store(true, Ordering::Release);
            let (jobs, running, around, stop, grace) =
                (slot.jobs.clone(), slot.running.clone(), around.clone(), stop.clone(), opts.grace);
            let spawned = std::thread::Builder::new().name(format!("task:{}", slot.name)).spawn(move || {
                let mut jobs = jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for job in jobs.iter_mut() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    run_job(job, &around, &stop, grace);
                }
                running.store(false, Ordering::Release);
            });
            match spawned {
                Ok(t) => slot.thread = Some(t),
                Err(e) => {
                    slot.running.store(false, Ordering::Release);
                    error!(task = %slot.name, "cannot start a thread for the task: {e}; this run is skipped");
                    count_missed(&slot.job_names, "overlap", 1);
                }
            }
        }
        std::thread::sleep(opts.tick);
    }
    // Commands are killed once the grace period is over, then have KILL_AFTER to go; in-process
    // jobs (check, prune) cannot be interrupted: past that bound they are left to the process's
    // exit (both are safe to interrupt: a check changes nothing, a prune resumes next time).
    let bound = Instant::now() + opts.grace + super::command::KILL_AFTER + Duration::from_secs(2);
    for slot in &mut slots {
        let Some(t) = slot.thread.take() else { continue };
        while !t.is_finished() && Instant::now() < bound {
            std::thread::sleep(Duration::from_millis(20));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            warn!(task = %slot.name, "still running at shutdown after the grace period; left to end with the process");
        }
    }
}

/// When a task is first due after start. A task the state file has never seen is due at its
/// next time from now (and now is recorded, so downtime before its first run is noticed). One
/// that was due while the daemon was down has those times counted as missed and, with
/// `run_missed`, runs at once.
fn first_due(
    task: &str,
    schedule: &Schedule,
    job_names: &[String],
    state: Option<&mut State>,
    now: Timestamp,
    run_missed: bool,
) -> Option<Timestamp> {
    let Some(state) = state else { return schedule.next_after(now) };
    let Some(last) = state.last_due(task) else {
        if let Err(e) = state.set_last_due(task, now) {
            warn!(task, "{e:#}; a run missed while the daemon is down may go unnoticed");
        }
        return schedule.next_after(now);
    };
    let missed = schedule.due_between(last, now, MISSED_CAP);
    if missed == 0 {
        return schedule.next_after(last);
    }
    count_missed(job_names, "downtime", missed);
    let then = schedule.next_after(last).map_or_else(String::new, |t| t.to_string());
    if run_missed {
        warn!(task, missed, first_missed = %then, "the task was due while the daemon was down: running it once now");
        Some(now)
    } else {
        warn!(task, missed, first_missed = %then, "the task was due while the daemon was down: waiting for its next time (--run-missed false)");
        if let Err(e) = state.set_last_due(task, now) {
            warn!(task, "{e:#}");
        }
        schedule.next_after(now)
    }
}

fn count_missed(job_names: &[String], reason: &'static str, n: u64) {
    for job in job_names {
        metrics::counter!("shmback_job_missed_total", "job" => job.clone(), "reason" => reason).increment(n);
    }
}

/// Runs one job through `around` and records how it ended: a log line, the `shmback_job_*`
/// metrics, and the health state.
pub fn run_job(job: &mut Job, around: &Around, stop: &AtomicBool, grace: Duration) {
    let name = job.name.clone();
    let running = metrics::gauge!("shmback_job_running", "job" => name.clone());
    running.set(1.0);
    let started = Instant::now();
    info!(job = %name, "job started");
    let ctx = JobContext { stop, grace };
    let run = &mut job.run;
    let result = around(&name, &mut || run(&ctx));
    let elapsed = started.elapsed();
    running.set(0.0);
    metrics::histogram!("shmback_job_duration_seconds", "job" => name.clone()).record(elapsed.as_secs_f64());
    match &result {
        Ok(()) => {
            info!(job = %name, ?elapsed, "job succeeded");
            metrics::counter!("shmback_job_runs_total", "job" => name.clone(), "result" => "success").increment(1);
            metrics::gauge!("shmback_job_last_success_timestamp_seconds", "job" => name.clone())
                .set(Timestamp::now().as_millisecond() as f64 / 1000.0);
            crate::health::job_finished(&name, None);
        }
        Err(e) => {
            let text = without_empty_backtraces(&format!("{e:#}"));
            error!(job = %name, ?elapsed, "job failed: {text}");
            metrics::counter!("shmback_job_runs_total", "job" => name.clone(), "result" => "failure").increment(1);
            crate::health::job_finished(&name, Some(&text));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::mpsc::{Receiver, channel};

    use jiff::tz::TimeZone;

    use super::*;
    use crate::schedule::spec::Spec;

    /// A clock the test moves; it counts how often it was read.
    struct Manual(Mutex<Timestamp>, AtomicU64);

    impl Clock for Manual {
        fn now(&self) -> Timestamp {
            self.1.fetch_add(1, Ordering::SeqCst);
            *self.0.lock().unwrap()
        }
    }

    impl Manual {
        fn at(s: &str) -> Arc<Self> {
            Arc::new(Manual(Mutex::new(s.parse().unwrap()), AtomicU64::new(0)))
        }
        /// Waits until the scheduler has read the clock (it has planned its first times).
        fn wait_read(&self) {
            until("the scheduler read the clock", || self.1.load(Ordering::SeqCst) > 0);
        }
        fn advance(&self, d: jiff::SignedDuration) {
            let mut t = self.0.lock().unwrap();
            *t = t.checked_add(d).unwrap();
        }
    }

    fn schedule(expr: &str) -> Schedule {
        expr.parse::<Spec>().unwrap().bind("t", "h").in_zone(TimeZone::UTC)
    }

    fn quick() -> SchedulerOptions {
        SchedulerOptions { run_missed: true, grace: Duration::from_secs(1), tick: Duration::from_millis(5) }
    }

    /// Waits (bounded) until `f` holds.
    fn until(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(30), "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A scheduler on its own thread; stops and joins on drop.
    struct Running {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn start(tasks: Vec<Task>, state: Option<State>, clock: Arc<Manual>, around: Around) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, c) = (stop.clone(), clock.clone());
        let thread = std::thread::spawn(move || run_scheduler(tasks, state, c, around, &quick(), &s));
        clock.wait_read();
        Running { stop, thread: Some(thread) }
    }

    fn counting(name: &str, runs: &Arc<AtomicU64>) -> Job {
        let runs = runs.clone();
        Job::new(name, move |_| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }

    #[test]
    fn a_task_runs_when_its_time_comes_and_not_before() {
        let clock = Manual::at("2026-11-30T21:59:00Z");
        let runs = Arc::new(AtomicU64::new(0));
        let task = Task { name: "t".into(), schedule: schedule("@hourly"), jobs: vec![counting("j", &runs)] };
        let _s = start(vec![task], None, clock.clone(), plain());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 0, "not due before 22:00");
        clock.advance(jiff::SignedDuration::from_secs(60));
        until("the 22:00 run", || runs.load(Ordering::SeqCst) == 1);
        clock.advance(jiff::SignedDuration::from_secs(30 * 60));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "not again before 23:00");
        clock.advance(jiff::SignedDuration::from_secs(30 * 60));
        until("the 23:00 run", || runs.load(Ordering::SeqCst) == 2);
    }

    #[test]
    fn a_run_still_going_when_the_next_is_due_is_skipped() {
        let clock = Manual::at("2026-11-30T21:59:30Z");
        let (release, gate): (_, Receiver<()>) = channel();
        let gate = Mutex::new(gate);
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let job = Job::new("slow", move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            gate.lock().unwrap().recv_timeout(Duration::from_secs(30)).ok();
            Ok(())
        });
        let task = Task { name: "t".into(), schedule: schedule("* * * * *"), jobs: vec![job] };
        let _s = start(vec![task], None, clock.clone(), plain());
        clock.advance(jiff::SignedDuration::from_secs(30));
        until("the first run", || runs.load(Ordering::SeqCst) == 1);
        clock.advance(jiff::SignedDuration::from_secs(60));
        clock.advance(jiff::SignedDuration::from_secs(60));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "never two runs of one task at once");
        release.send(()).unwrap();
        // Each minute is a new due time; one comes once the slow run has ended.
        until("a run after the slow one ended", || {
            clock.advance(jiff::SignedDuration::from_secs(60));
            std::thread::sleep(Duration::from_millis(20));
            runs.load(Ordering::SeqCst) == 2
        });
        release.send(()).unwrap();
    }

    #[test]
    fn a_failing_job_does_not_keep_the_next_from_running_and_around_sees_each() {
        let clock = Manual::at("2026-11-30T21:59:59Z");
        let runs = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let around: Around = Arc::new(move |name, job| {
            let r = job();
            s2.lock().unwrap().push(format!("{name}:{}", r.is_ok()));
            r
        });
        let task = Task {
            name: "t".into(),
            schedule: schedule("@hourly"),
            jobs: vec![Job::new("bad", |_| anyhow::bail!("it broke")), counting("good", &runs)],
        };
        let _s = start(vec![task], None, clock.clone(), around);
        clock.advance(jiff::SignedDuration::from_secs(1));
        until("both jobs ran", || seen.lock().unwrap().len() == 2);
        assert_eq!(*seen.lock().unwrap(), ["bad:false", "good:true"]);
        let h = crate::health::current();
        assert_eq!(h.jobs["bad"].error.as_deref(), Some("it broke"));
        assert!(h.jobs["good"].ok);
    }

    #[test]
    fn a_run_missed_during_downtime_runs_once_at_start_unless_told_not_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::load(dir.path(), "repo").unwrap();
        state.set_last_due("t", "2026-11-30T10:00:00Z".parse().unwrap()).unwrap();
        // Down from 10:00 to 21:30: eleven hourly runs (11:00 … 21:00) were missed.
        let clock = Manual::at("2026-11-30T21:30:00Z");
        let runs = Arc::new(AtomicU64::new(0));
        let task = Task { name: "t".into(), schedule: schedule("@hourly"), jobs: vec![counting("j", &runs)] };
        let s = start(vec![task], Some(state), clock.clone(), plain());
        until("the missed run", || runs.load(Ordering::SeqCst) == 1);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "once, not eleven times");
        drop(s);
        let state = State::load(dir.path(), "repo").unwrap();
        assert_eq!(state.last_due("t"), Some("2026-11-30T21:30:00Z".parse().unwrap()), "the run was recorded");

        // Restarted at once: nothing was missed, nothing runs.
        let runs = Arc::new(AtomicU64::new(0));
        let task = Task { name: "t".into(), schedule: schedule("@hourly"), jobs: vec![counting("j", &runs)] };
        let s = start(vec![task], Some(state), clock.clone(), plain());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        drop(s);

        // With run_missed off, a missed run waits for the next time.
        let mut state = State::load(dir.path(), "repo").unwrap();
        state.set_last_due("t", "2026-11-30T10:00:00Z".parse().unwrap()).unwrap();
        let task = Task { name: "t".into(), schedule: schedule("@hourly"), jobs: vec![counting("j", &runs)] };
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, c2) = (stop.clone(), clock.clone());
        let opts = SchedulerOptions { run_missed: false, ..quick() };
        let t = std::thread::spawn(move || run_scheduler(vec![task], Some(state), c2, plain(), &opts, &s2));
        clock.wait_read();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        clock.advance(jiff::SignedDuration::from_secs(30 * 60));
        until("the 22:00 run", || runs.load(Ordering::SeqCst) == 1);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    #[test]
    fn a_task_never_seen_before_waits_for_its_time_and_its_start_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::load(dir.path(), "repo").unwrap();
        let clock = Manual::at("2026-11-30T21:30:00Z");
        let runs = Arc::new(AtomicU64::new(0));
        let task = Task { name: "t".into(), schedule: schedule("@hourly"), jobs: vec![counting("j", &runs)] };
        let s = start(vec![task], Some(state), clock.clone(), plain());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        drop(s);
        let state = State::load(dir.path(), "repo").unwrap();
        assert_eq!(state.last_due("t"), Some("2026-11-30T21:30:00Z".parse().unwrap()));
    }
}
