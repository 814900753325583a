//! A scheduled command (`--job`): `sh -c CMD` in its own process group, its stderr passed on
//! and its last lines kept for the error, killed on `--job-timeout` or once shutdown's grace
//! period is over.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Lines of a job's stderr quoted when it fails.
const TAIL_LINES: usize = 10;
/// Bytes of one quoted stderr line (the rest is cut).
const TAIL_LINE_BYTES: usize = 400;
/// After SIGTERM, how long the job's processes have before SIGKILL.
pub const KILL_AFTER: Duration = Duration::from_secs(5);
/// How often a running job is looked at.
const POLL: Duration = Duration::from_millis(50);

/// A `--job` argument: `[NAME=]CMD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    /// The job's name (metrics, logs, health, the state file); `None` if the argument named none.
    pub name: Option<String>,
    /// The shell command.
    pub cmd: String,
}

/// Whether `s` is a job name: a lowercase letter, then lowercase letters, digits, `_` or `-`
/// (at most 64). Lowercase only, so `PGPASSWORD=x pg_dump …` stays a command.
pub fn valid_job_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl FromStr for JobSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, cmd) = match s.split_once('=') {
            Some((name, cmd)) if valid_job_name(name) => (Some(name.to_string()), cmd),
            _ => (None, s),
        };
        if cmd.trim().is_empty() {
            return Err(format!(
                "--job {s:?}: the command is empty; expected [NAME=]CMD, e.g. --job 'db=pg_dump app | shmback-send \
                 --stdin db.sql --wait-durable'"
            ));
        }
        Ok(JobSpec { name, cmd: cmd.to_string() })
    }
}

/// Runs `shell -c cmd` to its end: an error if it exits non-zero, is killed by a signal, runs past
/// `timeout`, or is still running `grace` after `stop` was set (then it is killed: SIGTERM to its
/// process group, SIGKILL [`KILL_AFTER`] later). `env` is added to its environment.
pub fn run(
    shell: &str,
    name: &str,
    cmd: &str,
    env: &[(String, OsString)],
    timeout: Option<Duration>,
    stop: &AtomicBool,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut child = Command::new(shell)
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        // Its own group: a timeout or shutdown reaches every process of a pipeline.
        .process_group(0)
        .spawn()
        .with_context(|| format!("job {name}: starting `{shell} -c` (--job-shell): is {shell} installed?"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).context("process id out of range")?);
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(stderr) = child.stderr.take() {
        let (tail, name) = (tail.clone(), name.to_string());
        // Detached: a background process of the job may keep the pipe open after the job ends.
        let _ = std::thread::Builder::new().name(format!("job:{name}")).spawn(move || pass_on(stderr, &name, &tail));
    }
    let started = Instant::now();
    let mut stop_seen: Option<Instant> = None;
    let mut killed: Option<(Instant, String)> = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let now = Instant::now();
        if killed.is_none() {
            if stop.load(Ordering::Relaxed) && stop_seen.is_none() {
                stop_seen = Some(now);
            }
            let why = if timeout.is_some_and(|t| now.duration_since(started) >= t) {
                Some(format!(
                    "it ran longer than --job-timeout ({:?}) and was killed: find out why it hangs, or raise the timeout",
                    timeout.unwrap_or_default()
                ))
            } else if stop_seen.is_some_and(|s| now.duration_since(s) >= grace) {
                Some(format!(
                    "the daemon is shutting down and the job was still running after --grace ({grace:?}), so it was killed"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                let _ = killpg(pid, Signal::SIGTERM);
                killed = Some((now, why));
            }
        } else if let Some((at, _)) = &killed
            && now.duration_since(*at) >= KILL_AFTER
        {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        std::thread::sleep(POLL);
    };
    if killed.is_some() {
        // What is left of a killed pipeline goes too.
        let _ = killpg(pid, Signal::SIGKILL);
    }
    // The stderr reader gets a moment to take in the last lines.
    std::thread::sleep(Duration::from_millis(20));
    let tail: Vec<String> = tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect();
    let quoted = if tail.is_empty() {
        " (it wrote nothing to stderr)".to_string()
    } else {
        format!("; the last lines of its stderr:\n  {}", tail.join("\n  "))
    };
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            anyhow::bail!("job {name}: its exit status could not be read ({e}), so it counts as failed{quoted}")
        }
    };
    if let Some((_, why)) = killed {
        anyhow::bail!("job {name}: {why} ({}){quoted}", describe(status));
    }
    if !status.success() {
        anyhow::bail!(
            "job {name}: the command {}{quoted}\nIn a pipeline, only the last command's status counts unless the \
             job starts with `set -o pipefail;` (with --job-shell bash: Debian's sh, dash, has no pipefail).",
            describe(status)
        );
    }
    Ok(())
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("unknown");
            format!("was killed by signal {sig} ({name})")
        }
        (None, None) => format!("ended with {status}"),
    }
}

/// Logs the job's stderr, line by line with the job's name, keeping the last lines.
fn pass_on(stderr: std::process::ChildStderr, name: &str, tail: &Mutex<VecDeque<String>>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        // Through the log, so `--log-format json` stays one object per line.
        tracing::info!(job = name, stream = "stderr", "{text}");
        let mut cut = text.to_string();
        if cut.len() > TAIL_LINE_BYTES {
            let mut end = TAIL_LINE_BYTES;
            while !cut.is_char_boundary(end) {
                end -= 1;
            }
            cut.truncate(end);
            cut.push('…');
        }
        let mut tail = tail.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(cmd: &str, timeout: Option<Duration>) -> anyhow::Result<()> {
        run("sh", "t", cmd, &[], timeout, &AtomicBool::new(false), Duration::from_secs(1))
    }

    #[test]
    fn job_arguments_name_a_job_only_with_a_lowercase_name() {
        let j: JobSpec = "db=pg_dump app | shmback-send --stdin db.sql".parse().unwrap();
        assert_eq!(j, JobSpec { name: Some("db".into()), cmd: "pg_dump app | shmback-send --stdin db.sql".into() });
        let j: JobSpec = "PGPASSWORD=x pg_dump app".parse().unwrap();
        assert_eq!(j.name, None, "an environment assignment is part of the command");
        let j: JobSpec = "tar --exclude=x /data".parse().unwrap();
        assert_eq!(j.name, None);
        assert_eq!(j.cmd, "tar --exclude=x /data");
        let e = "db=  ".parse::<JobSpec>().unwrap_err();
        assert!(e.contains("[NAME=]CMD"), "{e}");
    }

    #[test]
    fn a_command_that_succeeds_is_ok_and_its_environment_is_passed() {
        go("true", None).unwrap();
        let env = [("SHMBACK_JOB".to_string(), OsString::from("db"))];
        run("sh", "t", "test \"$SHMBACK_JOB\" = db", &env, None, &AtomicBool::new(false), Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn a_failing_command_says_its_status_and_its_last_stderr_lines() {
        let e = go("for i in $(seq 1 30); do echo line$i >&2; done; exit 3", None).unwrap_err().to_string();
        assert!(e.contains("exited with status 3"), "{e}");
        assert!(e.contains("line30") && e.contains("line21") && !e.contains("line20\n"), "{e}");
        assert!(e.contains("pipefail"), "{e}");
        let e = go("kill -9 $$", None).unwrap_err().to_string();
        assert!(e.contains("killed by signal 9 (SIGKILL)"), "{e}");
    }

    #[test]
    fn a_pipeline_fails_only_with_pipefail() {
        go("false | true", None).unwrap();
        // dash has no pipefail; bash and busybox sh do. Whichever /bin/sh is, the job must not pass
        // silently when it asks for pipefail: either the pipeline's failure or the shell's refusal.
        go("set -o pipefail; false | true", None).unwrap_err();
    }

    #[test]
    fn a_missing_shell_is_named() {
        let e = run("/nonexistent/bash", "t", "true", &[], None, &AtomicBool::new(false), Duration::from_secs(1));
        let e = format!("{:#}", e.unwrap_err());
        assert!(e.contains("--job-shell") && e.contains("/nonexistent/bash"), "{e}");
    }

    #[test]
    fn a_hung_command_is_killed_at_its_timeout_with_its_whole_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("child-alive");
        // The pipeline's first process ignores SIGTERM: it needs the SIGKILL that follows.
        let cmd = format!("(trap '' TERM; sleep 30; touch {}) | cat", marker.display());
        let e = go(&cmd, Some(Duration::from_millis(300))).unwrap_err().to_string();
        assert!(e.contains("--job-timeout"), "{e}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!marker.exists());
    }

    #[test]
    fn shutdown_gives_a_running_job_the_grace_period_then_kills_it() {
        let stop = AtomicBool::new(true);
        let e = run("sh", "t", "sleep 30", &[], None, &stop, Duration::from_millis(200)).unwrap_err().to_string();
        assert!(e.contains("shutting down") && e.contains("--grace"), "{e}");
        // A job that ends within the grace period is left to end.
        run("sh", "t", "sleep 0.2", &[], None, &stop, Duration::from_secs(10)).unwrap();
    }
}
