//! Scheduled work of `shmback run`: producer commands (`--schedule` + `--job`, or a scheduled
//! `--pull`), retention after each stored snapshot (`--keep-*`), and a scheduled check and prune.
//! User documentation: `docs/schedules.md`.
//!
//! - `spec.rs`: the schedule expressions (cron, `@daily`, `@every 6h`, `@daily-random`).
//! - `scheduler.rs`: the loop that runs tasks on time, one run of a task at a time, noticing runs
//!   missed while the daemon was down (`state.rs` remembers when each task was last due).
//! - `command.rs`: a `--job` as `sh -c CMD`, with its timeout and shutdown's grace period.
//! - `retention.rs`: forget after each stored snapshot, on a repository handle kept open.

mod command;
mod retention;
mod scheduler;
mod spec;
mod state;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use rustic_core::{CheckOptions, KeepOptions, PruneOptions, ReadSubsetOption, SnapshotGroupCriterion};

pub use command::{JobSpec, valid_job_name};
pub use retention::{Notifier, Retention};
pub use scheduler::{
    Around, Clock, Job, JobContext, JobFn, SchedulerOptions, SystemClock, Task, plain, run_job, run_scheduler,
};
pub use spec::{ACCEPTED_FORMS, RandomPeriod, Schedule, ScheduleError, Spec, schedule_zone};
pub use state::{State, default_dir as default_state_dir};

use crate::config::RepositoryConfig;
use crate::serve::Puller;

/// Job names the daemon uses itself.
const RESERVED: [&str; 4] = ["pull", "check", "prune", retention::JOB];

/// `shmback run`'s flags for scheduled work, retention, prune and check.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Schedules, retention, check and prune (docs/schedules.md)")]
pub struct ScheduleArgs {
    /// When to run the --job commands (and, with --pull, when to pull instead of --pull-interval):
    /// a 5-field cron expression ("30 2 * * *"), @hourly, @daily, @weekly, @monthly, @yearly,
    /// "@every 6h", or @hourly-random/@daily-random/@weekly-random (a fixed time per job and host).
    /// Cron times are in the zone TZ names, UTC if TZ is unset.
    #[arg(long, value_name = "WHEN", env = "SHMBACK_SCHEDULE")]
    pub schedule: Option<Spec>,
    /// A command run with `sh -c` (--job-shell) on --schedule, e.g. a producer:
    /// 'db=pg_dump app | shmback-send --stdin db.sql --wait-durable'. NAME (lowercase letters,
    /// digits, - and _) names it in logs and metrics (default job, or job1, job2…). Repeatable:
    /// the jobs run one after another, in order. A non-zero exit fails the job.
    #[arg(long = "job", value_name = "[NAME=]CMD", env = "SHMBACK_JOB", requires = "schedule")]
    pub jobs: Vec<JobSpec>,
    /// The shell that runs each --job as `SHELL -c CMD` (bash: for `set -o pipefail`, which
    /// Debian's sh, dash, lacks).
    #[arg(long, value_name = "SHELL", env = "SHMBACK_JOB_SHELL", default_value = "sh")]
    pub job_shell: String,
    /// Seconds a --job may run before it is killed (its whole process group); 0: no limit.
    #[arg(long, value_name = "SECONDS", env = "SHMBACK_JOB_TIMEOUT", default_value_t = 0)]
    pub job_timeout: u64,
    /// When to check the repository (same forms as --schedule).
    #[arg(long, value_name = "WHEN", env = "SHMBACK_CHECK_SCHEDULE")]
    pub check_schedule: Option<Spec>,
    /// The scheduled check also reads this part of the packs' data: all, a percentage (5%, a
    /// random part each run), the n-th of m parts (1/7), a part named by the date (daily/week:
    /// another seventh each day, all of it every week; hourly/day, weekly/month, monthly/year), or
    /// a size (1G).
    #[arg(long, value_name = "SUBSET", env = "SHMBACK_CHECK_READ_DATA_SUBSET", requires = "check_schedule")]
    pub check_read_data_subset: Option<String>,
    /// When to prune: forget by the --keep-* policy, then remove data no snapshot needs (two
    /// phases, safe while batches are stored). Needs a --keep-* policy.
    #[arg(long, value_name = "WHEN", env = "SHMBACK_PRUNE_SCHEDULE")]
    pub prune_schedule: Option<Spec>,
    /// Retention after each stored snapshot: keep the last N snapshots (of each --group-by group).
    #[arg(long, value_name = "N", env = "SHMBACK_KEEP_LAST", value_parser = clap::value_parser!(i32).range(-1..))]
    pub keep_last: Option<i32>,
    /// Keep the last snapshot of each of the last N hours (-1: every hour).
    #[arg(long, value_name = "N", env = "SHMBACK_KEEP_HOURLY", value_parser = clap::value_parser!(i32).range(-1..))]
    pub keep_hourly: Option<i32>,
    /// Keep the last snapshot of each of the last N days.
    #[arg(long, value_name = "N", env = "SHMBACK_KEEP_DAILY", value_parser = clap::value_parser!(i32).range(-1..))]
    pub keep_daily: Option<i32>,
    /// Keep the last snapshot of each of the last N weeks.
    #[arg(long, value_name = "N", env = "SHMBACK_KEEP_WEEKLY", value_parser = clap::value_parser!(i32).range(-1..))]
    pub keep_weekly: Option<i32>,
    /// Keep the last snapshot of each of the last N months.
    #[arg(long, value_name = "N", env = "SHMBACK_KEEP_MONTHLY", value_parser = clap::value_parser!(i32).range(-1..))]
    pub keep_monthly: Option<i32>,
    /// Keep the last snapshot of each of the last N years.
    #[arg(long, value_name = "N", env = "SHMBACK_KEEP_YEARLY", value_parser = clap::value_parser!(i32).range(-1..))]
    pub keep_yearly: Option<i32>,
    /// Keep every snapshot younger than this (e.g. 2d, 1w, 1y2mo).
    #[arg(long, value_name = "DURATION", env = "SHMBACK_KEEP_WITHIN")]
    pub keep_within: Option<jiff::Span>,
    /// Retention applies to each group of snapshots by any of host, label, paths, tags.
    #[arg(long, value_name = "CRITERIA", env = "SHMBACK_GROUP_BY", default_value = "host,paths")]
    pub group_by: SnapshotGroupCriterion,
    /// Where the scheduler remembers when each task was last due (default: $STATE_DIRECTORY,
    /// else $XDG_STATE_HOME/shmback, else ~/.local/state/shmback).
    #[arg(long, value_name = "DIR", env = "SHMBACK_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// After downtime, run once at start a task that was due meanwhile (false: wait for its next
    /// time). Missed runs are counted either way.
    #[arg(long, value_name = "BOOL", env = "SHMBACK_RUN_MISSED", default_value_t = true, action = clap::ArgAction::Set)]
    pub run_missed: bool,
}

impl ScheduleArgs {
    /// The retention policy, if any --keep-* was given.
    pub fn keep(&self) -> Option<KeepOptions> {
        let o =
            [self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly, self.keep_yearly];
        if o.iter().all(Option::is_none) && self.keep_within.is_none() {
            return None;
        }
        let mut keep = KeepOptions::default();
        keep.keep_last = self.keep_last;
        keep.keep_hourly = self.keep_hourly;
        keep.keep_daily = self.keep_daily;
        keep.keep_weekly = self.keep_weekly;
        keep.keep_monthly = self.keep_monthly;
        keep.keep_yearly = self.keep_yearly;
        keep.keep_within = self.keep_within;
        Some(keep)
    }

    /// Whether anything is scheduled (the scheduler thread is needed).
    pub fn schedules_anything(&self) -> bool {
        self.schedule.is_some() || self.check_schedule.is_some() || self.prune_schedule.is_some()
    }

    /// The check options of the scheduled check.
    fn check_options(&self) -> anyhow::Result<CheckOptions> {
        let mut opts = CheckOptions::default();
        if let Some(subset) = &self.check_read_data_subset {
            let parsed: ReadSubsetOption = subset.parse().map_err(|e| {
                anyhow::anyhow!(
                    "--check-read-data-subset {subset:?}: {e}; expected all, a percentage (5%), n/m (1/7) or a size (1G)"
                )
            })?;
            opts = opts.read_data(true).read_data_subset(parsed);
        }
        Ok(opts)
    }

    /// The --job names, in order (explicit, or job / job1, job2…), checked for clashes.
    fn job_names(&self) -> anyhow::Result<Vec<String>> {
        let unnamed = self.jobs.iter().filter(|j| j.name.is_none()).count();
        let mut names: Vec<String> = Vec::new();
        for (i, j) in self.jobs.iter().enumerate() {
            let name = match &j.name {
                Some(n) => n.clone(),
                None if unnamed == 1 => "job".to_string(),
                None => format!("job{}", i + 1),
            };
            anyhow::ensure!(
                !RESERVED.contains(&name.as_str()),
                "--job {name}=…: {name} is a name the daemon uses for its own jobs ({}); choose another",
                RESERVED.join(", ")
            );
            anyhow::ensure!(!names.contains(&name), "two --job are named {name}: give each its own NAME= prefix");
            names.push(name);
        }
        Ok(names)
    }

    /// Checks the combination of flags before anything is served; `pull` says whether --pull is
    /// given.
    pub fn validate(&self, pull: bool) -> anyhow::Result<()> {
        if self.schedule.is_some() && self.jobs.is_empty() && !pull {
            anyhow::bail!(
                "--schedule is given but nothing to run on it: add --job '[NAME=]CMD' (e.g. --job 'pg_dump app | \
                 shmback-send --stdin db.sql --wait-durable'), or --pull URL"
            );
        }
        if self.prune_schedule.is_some() && self.keep().is_none() {
            anyhow::bail!(
                "--prune-schedule needs a retention policy: add at least one --keep-* (e.g. --keep-daily 7 \
                 --keep-weekly 4); prune then forgets what the policy does not keep and removes the data"
            );
        }
        self.job_names()?;
        self.check_options()?;
        Ok(())
    }

    /// Starts retention after each stored snapshot, if a --keep-* policy is given.
    pub fn retention(&self, config: &RepositoryConfig, stop: &Arc<AtomicBool>) -> anyhow::Result<Option<Retention>> {
        match self.keep() {
            Some(keep) => Ok(Some(Retention::start(config.clone(), keep, self.group_by, stop.clone())?)),
            None => Ok(None),
        }
    }

    /// Builds the scheduled tasks: the --job commands (after the pull, with `puller`) on
    /// --schedule, the check and the prune. `host` draws the `@…-random` times; `segments` are
    /// those the daemon serves (a job's `SHMBACK_SEGMENT` is the first, so a plain `shmback-send`
    /// in a job sends to this daemon).
    pub fn tasks(
        &self,
        config: &RepositoryConfig,
        host: &str,
        segments: &[PathBuf],
        puller: Option<Puller>,
    ) -> anyhow::Result<Vec<Task>> {
        let mut tasks = Vec::new();
        if let Some(spec) = &self.schedule {
            let mut jobs = Vec::new();
            if let Some(puller) = puller {
                jobs.push(Job::new("pull", move |_| {
                    puller.once().map_err(|why| anyhow::anyhow!("pulling from {}: {why}", puller.url()))
                }));
            }
            let timeout = (self.job_timeout > 0).then(|| Duration::from_secs(self.job_timeout));
            for (name, spec) in self.job_names()?.into_iter().zip(&self.jobs) {
                let mut env = vec![("SHMBACK_JOB".to_string(), OsString::from(&name))];
                if let Some(seg) = segments.first() {
                    env.push(("SHMBACK_SEGMENT".to_string(), seg.clone().into_os_string()));
                }
                let (job, cmd, shell) = (name.clone(), spec.cmd.clone(), self.job_shell.clone());
                jobs.push(Job::new(name, move |ctx| {
                    command::run(&shell, &job, &cmd, &env, timeout, ctx.stop, ctx.grace)
                }));
            }
            let key: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
            tasks.push(Task { name: "jobs".into(), schedule: spec.bind(&key.join("+"), host), jobs });
        }
        if let Some(spec) = &self.check_schedule {
            self.check_options()?;
            let args = self.clone();
            let config = config.clone();
            let job = Job::new("check", move |_| {
                // Parsed at each run: `daily/week` names another part every day.
                let result = args.check_options().and_then(|opts| crate::commands::check_with(&config, opts));
                metrics::gauge!("shmback_check_success").set(if result.is_ok() { 1.0 } else { 0.0 });
                metrics::gauge!("shmback_check_last_timestamp_seconds").set(now_seconds());
                result
            });
            tasks.push(Task { name: "check".into(), schedule: spec.bind("check", host), jobs: vec![job] });
        }
        if let Some(spec) = &self.prune_schedule {
            let keep = self.keep().context("--prune-schedule needs a --keep-* policy")?;
            let (config, group_by) = (config.clone(), self.group_by);
            let job = Job::new("prune", move |_| {
                let report = crate::commands::forget(&config, &keep, group_by, Some(&PruneOptions::default()), false)?;
                metrics::counter!("shmback_forget_removed_snapshots_total").increment(report.removed as u64);
                metrics::gauge!("shmback_prune_last_timestamp_seconds").set(now_seconds());
                tracing::info!(
                    removed = report.removed,
                    "prune: forgot what the policy does not keep, removed unused data"
                );
                Ok(())
            });
            tasks.push(Task { name: "prune".into(), schedule: spec.bind("prune", host), jobs: vec![job] });
        }
        Ok(tasks)
    }

    /// Loads the scheduler's state for the repository at `location` (see [`State`]).
    /// A `--state-dir` that cannot be used is an error; the default one (e.g. on a read-only
    /// root file system) is only warned about, and the state is then kept in memory.
    pub fn state(&self, location: &str) -> anyhow::Result<State> {
        if let Some(dir) = &self.state_dir {
            return State::load(dir, location);
        }
        let dir = default_state_dir();
        State::load(&dir, location).or_else(|e| {
            tracing::warn!(
                "{e:#}; the schedule's last runs are kept in memory only, so a run missed while the daemon is down                  goes unnoticed: give a writable --state-dir (SHMBACK_STATE_DIR) on a persistent volume"
            );
            Ok(State::in_memory())
        })
    }

    /// The scheduler's options, with `grace` for running jobs at shutdown.
    pub fn options(&self, grace: Duration) -> SchedulerOptions {
        SchedulerOptions { run_missed: self.run_missed, grace, ..SchedulerOptions::default() }
    }
}

fn now_seconds() -> f64 {
    jiff::Timestamp::now().as_millisecond() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ScheduleArgs,
    }

    fn parse(args: &[&str]) -> Result<ScheduleArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_combine_as_documented() {
        let a = parse(&["--schedule", "@daily", "--job", "db=pg_dump x", "--job", "tar c /etc"]).unwrap();
        a.validate(false).unwrap();
        assert_eq!(a.job_names().unwrap(), ["db", "job"]);
        assert!(a.run_missed);
        assert!(parse(&["--run-missed", "false"]).unwrap().run_missed.eq(&false));

        let e = parse(&["--schedule", "@daily"]).unwrap().validate(false).unwrap_err().to_string();
        assert!(e.contains("--job"), "{e}");
        parse(&["--schedule", "@daily"]).unwrap().validate(true).unwrap();
        let e = parse(&["--schedule", "every day"]).err().unwrap().to_string();
        assert!(e.contains("@every DURATION"), "{e}");
        assert!(parse(&["--job", "x"]).is_err(), "--job needs --schedule");

        let e = parse(&["--prune-schedule", "@weekly"]).unwrap().validate(false).unwrap_err().to_string();
        assert!(e.contains("--keep-"), "{e}");
        parse(&["--prune-schedule", "@weekly", "--keep-last", "3"]).unwrap().validate(false).unwrap();

        let e = parse(&["--schedule", "@daily", "--job", "a=x", "--job", "a=y"]).unwrap().validate(false).unwrap_err();
        assert!(e.to_string().contains("named a"), "{e}");
        let e = parse(&["--schedule", "@daily", "--job", "check=x"]).unwrap().validate(false).unwrap_err();
        assert!(e.to_string().contains("uses for its own jobs"), "{e}");

        let e = parse(&["--check-schedule", "@daily", "--check-read-data-subset", "ten"])
            .unwrap()
            .validate(false)
            .unwrap_err();
        assert!(e.to_string().contains("n/m"), "{e}");
        let a = parse(&["--check-schedule", "@daily", "--check-read-data-subset", "5%"]).unwrap();
        let o = a.check_options().unwrap();
        assert!(o.read_data && matches!(o.read_data_subset, ReadSubsetOption::Percentage(p) if p == 5.0));
    }

    #[test]
    fn keep_flags_make_the_policy_forget_uses() {
        assert!(parse(&[]).unwrap().keep().is_none());
        let k = parse(&["--keep-last", "2", "--keep-within", "2d"]).unwrap().keep().unwrap();
        assert_eq!(k.keep_last, Some(2));
        assert_eq!(k.keep_within.map(|s| s.get_days()), Some(2));
        assert!(parse(&["--keep-daily", "-2"]).is_err());
    }
}
