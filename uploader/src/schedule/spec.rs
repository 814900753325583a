//! Schedule expressions: what `--schedule`, `--check-schedule` and `--prune-schedule` accept, and
//! when each is next due.
//!
//! Accepted forms:
//! - a standard 5-field cron expression (`minute hour day-of-month month day-of-week`, e.g.
//!   `30 2 * * *`; lists, ranges, steps, `JAN`-`DEC`, `SUN`-`SAT`, and croner's `L`, `W`, `#`);
//!   as in Vixie cron, a restricted day-of-month and day-of-week match either;
//! - `@hourly`, `@daily`, `@weekly` (Sunday 00:00), `@monthly`, `@yearly` (or `@annually`);
//! - `@every DURATION` (e.g. `@every 6h`, `@every 90m`, `@every 1h30m`), counted from the last run;
//! - `@hourly-random`, `@daily-random`, `@weekly-random`: a fixed time in that period, drawn from
//!   the job's name and the host name, so many hosts with the same configuration spread out (and
//!   one host keeps its time across restarts).
//!
//! Cron times are wall-clock times in the zone `TZ` names (an IANA name such as `Europe/Berlin`,
//! or a POSIX TZ string), and in UTC when `TZ` is unset or empty.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

/// The forms a schedule may take, for error messages.
pub const ACCEPTED_FORMS: &str = "a 5-field cron expression (minute hour day-of-month month day-of-week, e.g. \
     \"30 2 * * *\"), @hourly, @daily, @weekly, @monthly, @yearly, @every DURATION (e.g. \"@every 6h\"), \
     @hourly-random, @daily-random or @weekly-random";

/// A schedule expression that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("schedule {expr:?}: {why}; expected {ACCEPTED_FORMS}")]
pub struct ScheduleError {
    expr: String,
    why: String,
}

impl ScheduleError {
    fn new(expr: &str, why: impl Into<String>) -> Self {
        ScheduleError { expr: expr.to_string(), why: why.into() }
    }
}

/// The period of a `@…-random` schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomPeriod {
    /// Once an hour, at a fixed minute.
    Hourly,
    /// Once a day, at a fixed hour and minute.
    Daily,
    /// Once a week, on a fixed day, hour and minute.
    Weekly,
}

/// A parsed schedule expression, not yet bound to a job (see [`Spec::bind`]).
#[derive(Clone, Debug)]
pub enum Spec {
    /// A cron expression or one of its `@` nicknames.
    Cron(Box<Cron>),
    /// `@every DURATION`.
    Every(Duration),
    /// `@hourly-random`, `@daily-random`, `@weekly-random`.
    Random(RandomPeriod),
}

impl FromStr for Spec {
    type Err = ScheduleError;

    fn from_str(expr: &str) -> Result<Self, ScheduleError> {
        let trimmed = expr.trim();
        if trimmed.is_empty() {
            return Err(ScheduleError::new(expr, "it is empty"));
        }
        let lower = trimmed.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("@every") {
            let rest = rest.trim();
            if rest.is_empty() {
                return Err(ScheduleError::new(expr, "@every needs a duration, e.g. \"@every 6h\""));
            }
            let d: SignedDuration = rest.parse().map_err(|e| {
                ScheduleError::new(expr, format!("{rest:?} is not a duration (e.g. 30s, 15m, 6h, 1h30m): {e}"))
            })?;
            if d.is_negative() || d.is_zero() {
                return Err(ScheduleError::new(expr, "the duration of @every must be more than zero"));
            }
            let d = Duration::try_from(d).map_err(|e| ScheduleError::new(expr, e.to_string()))?;
            if d < Duration::from_secs(1) {
                return Err(ScheduleError::new(expr, "the duration of @every must be at least 1s"));
            }
            return Ok(Spec::Every(d));
        }
        match lower.as_str() {
            "@hourly-random" => return Ok(Spec::Random(RandomPeriod::Hourly)),
            "@daily-random" => return Ok(Spec::Random(RandomPeriod::Daily)),
            "@weekly-random" => return Ok(Spec::Random(RandomPeriod::Weekly)),
            _ => {}
        }
        if lower.starts_with('@')
            && !matches!(lower.as_str(), "@hourly" | "@daily" | "@weekly" | "@monthly" | "@yearly" | "@annually")
        {
            return Err(ScheduleError::new(expr, format!("{trimmed} is not a known nickname")));
        }
        let fields = trimmed.split_whitespace().count();
        if !lower.starts_with('@') && fields != 5 {
            return Err(ScheduleError::new(
                expr,
                format!("a cron expression has 5 fields (no seconds, no year); this one has {fields}"),
            ));
        }
        cron(trimmed).map(|c| Spec::Cron(Box::new(c))).map_err(|why| ScheduleError::new(expr, why))
    }
}

/// Parses a 5-field cron expression (or nickname) the way every schedule is parsed.
fn cron(expr: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

impl Spec {
    /// Binds the expression to one job: a `@…-random` one draws its fixed time from `job` and
    /// `host`, the same on every start.
    pub fn bind(&self, job: &str, host: &str) -> Schedule {
        let kind = match self {
            Spec::Cron(c) => Kind::Cron(c.clone()),
            Spec::Every(d) => Kind::Every(*d),
            Spec::Random(period) => {
                let h = fnv1a(format!("{job}\0{host}").as_bytes());
                let (minute, hour, weekday) = (h % 60, (h / 60) % 24, (h / 1440) % 7);
                let pattern = match period {
                    RandomPeriod::Hourly => format!("{minute} * * * *"),
                    RandomPeriod::Daily => format!("{minute} {hour} * * *"),
                    RandomPeriod::Weekly => format!("{minute} {hour} * * {weekday}"),
                };
                Kind::Cron(Box::new(cron(&pattern).expect("a pattern made of in-range numbers parses")))
            }
        };
        Schedule { kind, tz: schedule_zone() }
    }
}

/// The zone cron times are read in: `TZ` if set (and not empty), else UTC.
pub fn schedule_zone() -> TimeZone {
    match std::env::var("TZ") {
        Ok(tz) if !tz.is_empty() => TimeZone::try_system().unwrap_or_else(|e| {
            tracing::warn!("TZ={tz:?} is not a time zone jiff understands ({e}); schedules use UTC");
            TimeZone::UTC
        }),
        _ => TimeZone::UTC,
    }
}

/// 64-bit FNV-1a: a hash that stays the same across releases and platforms (std's does not
/// promise to), so a `@…-random` time survives an upgrade.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[derive(Clone, Debug)]
enum Kind {
    Cron(Box<Cron>),
    Every(Duration),
}

/// A schedule bound to a job: when it is next due.
#[derive(Clone, Debug)]
pub struct Schedule {
    kind: Kind,
    tz: TimeZone,
}

impl Schedule {
    /// The same schedule read in zone `tz` (tests; the daemon uses `TZ` or UTC).
    pub fn in_zone(mut self, tz: TimeZone) -> Self {
        self.tz = tz;
        self
    }

    /// The first time strictly after `t` at which the schedule is due; `None` if it never is
    /// again (a cron expression that matches no date, such as `0 0 30 2 *`).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match &self.kind {
            Kind::Every(d) => t.checked_add(SignedDuration::try_from(*d).ok()?).ok(),
            Kind::Cron(c) => c.find_next_occurrence(&t.to_zoned(self.tz.clone()), false).ok().map(|z| z.timestamp()),
        }
    }

    /// How many times the schedule was due after `since` up to `until` (inclusive), counting at
    /// most `cap`.
    pub fn due_between(&self, since: Timestamp, until: Timestamp, cap: u64) -> u64 {
        if let Kind::Every(d) = &self.kind {
            let span = until.duration_since(since);
            if span.is_negative() {
                return 0;
            }
            return ((span.as_nanos() as u128 / d.as_nanos().max(1)) as u64).min(cap);
        }
        let mut n = 0;
        let mut t = since;
        while n < cap {
            match self.next_after(t) {
                Some(next) if next <= until => {
                    n += 1;
                    t = next;
                }
                _ => break,
            }
        }
        n
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Every(d) => write!(f, "@every {d:?}"),
            Kind::Cron(c) => write!(f, "{} ({})", c.as_str(), self.tz.iana_name().unwrap_or("TZ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(expr: &str, after: &str) -> String {
        let s: Spec = expr.parse().unwrap();
        s.bind("job", "host").in_zone(TimeZone::UTC).next_after(ts(after)).unwrap().to_string()
    }

    #[test]
    fn cron_and_nicknames_are_due_at_their_wall_clock_times() {
        assert_eq!(next("30 2 * * *", "2026-11-30T21:45:00Z"), "2026-12-01T02:30:00Z");
        assert_eq!(next("*/15 * * * *", "2026-11-30T21:45:00Z"), "2026-11-30T22:00:00Z");
        assert_eq!(next("0 4 * * MON", "2026-11-30T21:45:00Z"), "2026-12-07T04:00:00Z");
        assert_eq!(next("@hourly", "2026-11-30T21:45:00Z"), "2026-11-30T22:00:00Z");
        assert_eq!(next("@daily", "2026-11-30T21:45:00Z"), "2026-12-01T00:00:00Z");
        assert_eq!(next("@weekly", "2026-11-30T21:45:00Z"), "2026-12-06T00:00:00Z");
        assert_eq!(next("@monthly", "2026-11-30T21:45:00Z"), "2026-12-01T00:00:00Z");
        assert_eq!(next("@yearly", "2026-11-30T21:45:00Z"), "2027-01-01T00:00:00Z");
        assert_eq!(next("@ANNUALLY", "2026-11-30T21:45:00Z"), "2027-01-01T00:00:00Z");
        // Strictly after: a time that matches is not its own next time.
        assert_eq!(next("0 22 * * *", "2026-11-30T22:00:00Z"), "2026-12-01T22:00:00Z");
    }

    #[test]
    fn every_counts_from_the_time_given() {
        assert_eq!(next("@every 6h", "2026-11-30T21:45:00Z"), "2026-12-01T03:45:00Z");
        assert_eq!(next("@every 1h30m", "2026-11-30T21:45:00Z"), "2026-11-30T23:15:00Z");
        assert_eq!(next("@every 2s", "2026-11-30T21:45:00Z"), "2026-11-30T21:45:02Z");
    }

    #[test]
    fn cron_times_follow_the_zone_across_daylight_saving() {
        let s: Spec = "30 2 * * *".parse().unwrap();
        let berlin = s.bind("j", "h").in_zone(TimeZone::get("Europe/Berlin").unwrap());
        // 02:30 Berlin is 01:30 UTC in winter (CET, +01:00) and 00:30 UTC in summer (CEST).
        assert_eq!(berlin.next_after(ts("2026-11-30T12:00:00Z")).unwrap().to_string(), "2026-12-01T01:30:00Z");
        assert_eq!(berlin.next_after(ts("2026-07-01T12:00:00Z")).unwrap().to_string(), "2026-07-02T00:30:00Z");
    }

    #[test]
    fn a_local_time_skipped_by_daylight_saving_runs_once_that_day() {
        let s: Spec = "30 2 * * *".parse().unwrap();
        let berlin = s.bind("j", "h").in_zone(TimeZone::get("Europe/Berlin").unwrap());
        // 2026-03-29 02:00-03:00 does not exist in Berlin (clocks go from 02:00 to 03:00 CEST).
        // It runs at the first time after the gap, 03:00 CEST, then at 02:30 again.
        let next = berlin.next_after(ts("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(next.to_string(), "2026-03-29T01:00:00Z");
        assert_eq!(berlin.next_after(next).unwrap().to_string(), "2026-03-30T00:30:00Z");
    }

    #[test]
    fn random_schedules_are_stable_per_job_and_host_and_spread() {
        let s: Spec = "@daily-random".parse().unwrap();
        let t = ts("2026-11-30T00:00:00Z");
        let a = s.bind("db", "host-a").in_zone(TimeZone::UTC).next_after(t).unwrap();
        let again = s.bind("db", "host-a").in_zone(TimeZone::UTC).next_after(t).unwrap();
        assert_eq!(a, again, "the same job on the same host keeps its time");
        // Once a day: the next time after that one is 24 h later.
        let b = s.bind("db", "host-a").in_zone(TimeZone::UTC).next_after(a).unwrap();
        assert_eq!(b.duration_since(a), SignedDuration::from_hours(24));
        let times: std::collections::BTreeSet<_> =
            (0..20).map(|i| s.bind("db", &format!("host-{i}")).in_zone(TimeZone::UTC).next_after(t).unwrap()).collect();
        assert!(times.len() > 10, "20 hosts got only {} distinct times: {times:?}", times.len());

        let hourly: Spec = "@hourly-random".parse().unwrap();
        let h = hourly.bind("db", "host-a").in_zone(TimeZone::UTC);
        let first = h.next_after(t).unwrap();
        assert_eq!(h.next_after(first).unwrap().duration_since(first), SignedDuration::from_hours(1));
        let weekly: Spec = "@weekly-random".parse().unwrap();
        let w = weekly.bind("db", "host-a").in_zone(TimeZone::UTC);
        let first = w.next_after(t).unwrap();
        assert_eq!(w.next_after(first).unwrap().duration_since(first), SignedDuration::from_hours(24 * 7));
    }

    #[test]
    fn bad_expressions_say_what_is_accepted() {
        for (bad, says) in [
            ("", "empty"),
            ("   ", "empty"),
            ("* * * *", "5 fields"),
            ("0 * * * * *", "5 fields"),
            ("61 * * * *", "schedule \"61 * * * *\""),
            ("* * 32 * *", "schedule"),
            ("@often", "not a known nickname"),
            ("@every", "needs a duration"),
            ("@every soon", "not a duration"),
            ("@every 0s", "more than zero"),
            ("@every 10ms", "at least 1s"),
            ("@every -5m", "more than zero"),
        ] {
            let e = bad.parse::<Spec>().expect_err(bad).to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(e.contains("@every DURATION") && e.contains("5-field cron"), "{bad:?} names the forms: {e}");
        }
    }

    #[test]
    fn an_impossible_date_is_never_due() {
        let s: Spec = "0 0 30 2 *".parse().unwrap();
        assert_eq!(s.bind("j", "h").next_after(ts("2026-01-01T00:00:00Z")), None);
    }

    #[test]
    fn missed_runs_are_counted_up_to_the_cap() {
        let s: Spec = "@hourly".parse().unwrap();
        let h = s.bind("j", "h").in_zone(TimeZone::UTC);
        assert_eq!(h.due_between(ts("2026-11-30T00:30:00Z"), ts("2026-11-30T05:00:00Z"), 100), 5);
        assert_eq!(h.due_between(ts("2026-11-30T00:30:00Z"), ts("2026-11-30T05:00:00Z"), 3), 3);
        assert_eq!(h.due_between(ts("2026-11-30T00:30:00Z"), ts("2026-11-30T00:59:00Z"), 100), 0);
        let e: Spec = "@every 10m".parse().unwrap();
        let e = e.bind("j", "h");
        assert_eq!(e.due_between(ts("2026-11-30T00:00:00Z"), ts("2026-11-30T01:00:00Z"), 100), 6);
        assert_eq!(e.due_between(ts("2026-11-30T01:00:00Z"), ts("2026-11-30T00:00:00Z"), 100), 0);
    }
}
