//! `shmback`: the uploader and its repository commands.
//!
//! The command line as one file: clap definitions, their help examples, and the mapping of each
//! subcommand onto the library (configuration parsed once here, then passed down).

use std::ffi::OsString;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustic_core::{KeepOptions, PruneOptions, SnapshotGroupCriterion};
use shmback_proto::SegmentOptions;
use shmback_uploader::backends::env::Env;
use shmback_uploader::backends::failure::{EXIT_STATUS_HELP, classify, without_empty_backtraces};
use shmback_uploader::backends::limit::{LIMIT_EXAMPLES, LimitArgs};
use shmback_uploader::backends::s3::{Checksums, Provider, S3Options};
use shmback_uploader::config::PasswordSources;
use shmback_uploader::copy::{COPY_EXAMPLES, CopyArgs};
use shmback_uploader::hooks::{HOOK_EXAMPLES, HookArgs, Hooks};
use shmback_uploader::locks::{self, LockArgs};
use shmback_uploader::monitor::{MONITOR_EXAMPLES, MonitorArgs};
use shmback_uploader::restore_if_empty::{RestoreIfEmpty, SnapshotFilter};
use shmback_uploader::schedule::{Retention, ScheduleArgs, SystemClock, plain, run_scheduler};
use shmback_uploader::serve::{
    HttpOptions, OnBatch, Puller, bind, listen as listen_http, pull as pull_http, token_from,
};
use shmback_uploader::supervise::{Supervise, supervise};
use shmback_uploader::{BatchOutcome, Password, RepositoryConfig, ServeOptions, commands, open_repo, serve_all};

/// Back up what producers send through /dev/shm rings into a restic-format repository.
///
/// The repository and its password are given the way restic takes them (RESTIC_REPOSITORY,
/// RESTIC_PASSWORD, RESTIC_PASSWORD_FILE, RESTIC_PASSWORD_COMMAND, or the flags below; as in
/// restic, there is no flag for the password itself: it would show in `ps`); restic 0.14+ and
/// rustic read what shmback writes.
#[derive(Parser)]
#[command(name = "shmback", version, after_help = format!("{TOP_EXAMPLES}\n\n{LIMIT_EXAMPLES}\n\n{EXIT_STATUS_HELP}"))]
struct Cli {
    /// Repository: a directory, `local:PATH`, `s3:[http(s)://]host[:port]/bucket[/prefix]`,
    /// `gs:bucket:/prefix`, `azure:container:/prefix`, `swift:container:/prefix`, `b2:bucket:prefix`,
    /// `sftp:user@host:/path`, `rest:http://host:port/path` or `rclone:remote:path` (README, "Backends").
    // Its value is hidden in the help: a rest: URL may hold a password.
    #[arg(short, long, global = true, env = "RESTIC_REPOSITORY", hide_env_values = true)]
    repo: Option<String>,
    /// File holding the repository password (its content, whitespace-trimmed, as restic reads it).
    #[arg(long, global = true, env = "RESTIC_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Shell command printing the repository password (its output, whitespace-trimmed).
    #[arg(long, global = true, env = "RESTIC_PASSWORD_COMMAND", hide_env_values = true)]
    password_command: Option<String>,
    /// S3: which implementation is behind the endpoint (auto: AWS for *.amazonaws.com, else generic).
    #[arg(long, global = true, env = "SHMBACK_S3_PROVIDER", value_enum, default_value_t = Provider::Auto)]
    s3_provider: Provider,
    /// S3: region (default: AWS_REGION / AWS_DEFAULT_REGION / the profile, else us-east-1).
    #[arg(long, global = true, env = "SHMBACK_S3_REGION")]
    s3_region: Option<String>,
    /// S3: path-style addressing (the default for any endpoint but AWS).
    #[arg(long, global = true, conflicts_with = "s3_virtual_host")]
    s3_path_style: bool,
    /// S3: virtual-host addressing (the default for AWS).
    #[arg(long, global = true)]
    s3_virtual_host: bool,
    /// S3: storage class of new objects (e.g. STANDARD_IA).
    #[arg(long, global = true, env = "SHMBACK_S3_STORAGE_CLASS")]
    s3_storage_class: Option<String>,
    /// S3: pack uploads kept in flight at once (an index or snapshot waits for all of them).
    #[arg(long, global = true, env = "SHMBACK_S3_INFLIGHT", default_value_t = 4)]
    s3_inflight: usize,
    /// S3: attempts per request on 5xx, throttling, timeouts and dropped connections (backoff
    /// with jitter, 0.2 s doubling up to 20 s); 4xx answers are never retried.
    #[arg(long, global = true, env = "SHMBACK_S3_ATTEMPTS", default_value_t = 8)]
    s3_attempts: u32,
    /// S3: objects of at least this many MiB are uploaded with multipart (16 MiB parts).
    #[arg(long, global = true, env = "SHMBACK_S3_MULTIPART_MIB", default_value_t = 64)]
    s3_multipart_mib: usize,
    /// S3: CRC32 checksum headers on uploads: auto (on every upload for AWS, only where required
    /// for other providers), always (a server that refuses them switches to when-required, logged
    /// once), when-required.
    #[arg(long, global = true, env = "SHMBACK_S3_CHECKSUMS", value_enum, default_value_t = Checksums::Auto)]
    s3_checksums: Checksums,
    /// Log format on stderr: text (colours only at a terminal) or json (one object per line:
    /// timestamp, level, fields.message and the other fields, target).
    #[arg(long, global = true, env = "SHMBACK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    locks: LockArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

const TOP_EXAMPLES: &str = "Examples:
  shmback demo                                   # try it: local repository, ring, restore, figures
  export RESTIC_REPOSITORY=/backups/repo RESTIC_PASSWORD_FILE=/run/secrets/restic
  shmback init
  shmback run --segment /dev/shm/app             # the daemon
  shmback snapshots
  shmback restore latest /tmp/restore
  shmback forget --keep-daily 7 --keep-weekly 4 --prune";

const RUN_EXAMPLES: &str = "Examples:
  shmback run                                        # /dev/shm/shmback
  shmback run --segment /dev/shm/db --segment /dev/shm/media
  SHMBACK_SEGMENT=/dev/shm/db,/dev/shm/media shmback run --grace 25

  # Another service pushes batches (shmback-send --to http://backup:8700 /data):
  SHMBACK_TOKEN_FILE=/run/secrets/token shmback run --listen 0.0.0.0:8700
  # Or this one pulls them from the app's service (shmback-send --serve 0.0.0.0:8701 /data):
  shmback run --pull http://app:8701 --pull-interval 3600

  # Wait up to 30 min for another process's repository lock (a restic prune) before a batch
  # fails and is resent (default 5m; docs/locks.md):
  shmback run --segment /dev/shm/app --retry-lock 30m

  # Entrypoint of one container running the app and the uploader
  # (the app sends its batches with `shmback-send -s /dev/shm/app ...`):
  shmback run --segment /dev/shm/app -- /usr/local/bin/app --port 8080
  # On a fresh lease, bring /data back from the latest snapshot before the app starts:
  shmback run --segment /dev/shm/app --restore-if-empty /data -- /usr/local/bin/app
  # Restore /var/lib/app from what was sent as /data, from snapshots tagged db only:
  shmback run --restore-if-empty /var/lib/app:data --restore-tag db -- app

  # A database dump every night at a time of its own, keeping 7 daily and 4 weekly snapshots,
  # pruning on Sundays and reading a tenth of the data in a check every Saturday (docs/schedules.md):
  shmback run --schedule @daily-random --job-timeout 3600 --job-shell bash \\
    --job 'db=set -o pipefail; pg_dump app | shmback-send --stdin db.sql --wait-durable' \\
    --keep-daily 7 --keep-weekly 4 --prune-schedule '0 3 * * SUN' \\
    --check-schedule '0 4 * * SAT' --check-read-data-subset 10%
  # Pull from the app's service every 6 hours instead of every --pull-interval:
  shmback run --pull http://app:8701 --schedule '@every 6h' --keep-last 20";

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Create a new repository.
    #[command(after_help = "Examples:
  RESTIC_REPOSITORY=/backups/repo RESTIC_PASSWORD_FILE=/run/secrets/restic shmback init
  RESTIC_REPOSITORY=s3:http://127.0.0.1:9000/backups shmback init --create-bucket")]
    Init {
        /// S3: create the bucket if it does not exist (where the provider allows it).
        #[arg(long)]
        create_bucket: bool,
    },
    /// Serve segments: one snapshot per committed batch, until SIGTERM/SIGINT (or, with
    /// `-- APP`, until APP exits).
    ///
    /// Each segment (one producer each) is served by its own thread, so a slow producer never
    /// holds up the others. On SIGTERM a batch in flight gets --grace to finish, then it is
    /// abandoned: no snapshot, the producer is told and resends later.
    ///
    /// With `-- APP ARGS`, shmback is APP's supervisor (one container running both, e.g. on
    /// Akash): APP starts once the segments exist, SIGTERM/SIGINT/SIGHUP are passed on to it, and
    /// shmback exits with APP's status (128+N if signal N killed it) once serving has stopped. On
    /// SIGTERM, APP gets --grace to exit (then SIGKILL) while serving goes on, then the batch in
    /// flight gets --grace: allow twice --grace before the platform's SIGKILL. If serving fails,
    /// APP is stopped and shmback exits with the error. As PID 1 it reaps orphaned processes.
    #[command(after_help = format!("{RUN_EXAMPLES}\n{MONITOR_EXAMPLES}\n\n{HOOK_EXAMPLES}"))]
    Run {
        /// A segment to serve (created if missing); repeatable, or comma-separated in the variable.
        /// Default /dev/shm/shmback, unless --listen or --pull is given.
        #[arg(short, long, env = "SHMBACK_SEGMENT", value_delimiter = ',')]
        segment: Vec<PathBuf>,
        /// Accept batches pushed over HTTP on this address (e.g. 0.0.0.0:8700), from
        /// `shmback-send --to`. Set a token (SHMBACK_TOKEN or --token-file) unless only trusted
        /// services can reach it.
        #[arg(long, value_name = "ADDR", env = "SHMBACK_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Batches archived at once over HTTP, all producers together (each holds the engine's
        /// working memory); one more gets 429 and is resent.
        #[arg(long, value_name = "N", env = "SHMBACK_LISTEN_MAX_BATCHES", default_value_t = 4)]
        listen_max_batches: usize,
        /// Pull batches from a producer running `shmback-send --serve` at this URL (e.g.
        /// http://app:8701): once at start, then every --pull-interval.
        #[arg(long, value_name = "URL", env = "SHMBACK_PULL")]
        pull: Option<String>,
        /// Seconds between pulls (--schedule, if given, replaces it).
        #[arg(long, value_name = "SECONDS", env = "SHMBACK_PULL_INTERVAL", default_value_t = 3600)]
        pull_interval: u64,
        /// File holding the HTTP bearer token (else the SHMBACK_TOKEN variable; no flag for the
        /// token itself, it would show in `ps`).
        #[arg(long, value_name = "FILE", env = "SHMBACK_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Seconds a batch in flight may still take after SIGTERM before it is abandoned; with
        /// `-- APP`, also the seconds APP may take to exit after SIGTERM before it is killed.
        #[arg(long, value_name = "SECONDS", default_value_t = 20)]
        grace: u64,
        /// Host name recorded in snapshots whose batch names none (default: this machine's).
        #[arg(long)]
        host: Option<String>,
        /// Ring bytes of segments this command creates (default 4 MiB; a power of two).
        #[arg(long, value_name = "BYTES")]
        ring_size: Option<usize>,
        /// Create segments mode 0660 (producer and uploader are different users of one group).
        #[arg(long)]
        group_shared: bool,
        /// Seconds a batch may go without a frame from its (live) producer before it is rejected;
        /// 0 waits for ever.
        #[arg(long, value_name = "SECONDS", env = "SHMBACK_BATCH_IDLE", default_value_t = 600)]
        batch_idle: u64,
        /// Most manifest entries one batch may have (a larger one is rejected as it arrives).
        #[arg(long, value_name = "N", env = "SHMBACK_MAX_ENTRIES", default_value_t = 5_000_000)]
        max_entries: u64,
        /// Before APP starts, if DIR is missing or empty (a fresh volume's lost+found aside),
        /// restore the latest snapshot's SNAPSHOT-PATH into it (default: DIR without its leading
        /// `/`, where `shmback-send DIR` stores it). A DIR holding anything is left alone; an
        /// empty repository restores nothing; any failure keeps APP from starting. Repeatable.
        #[arg(long, value_name = "DIR[:SNAPSHOT-PATH]", requires = "app")]
        restore_if_empty: Vec<RestoreIfEmpty>,
        /// --restore-if-empty takes the latest snapshot of this host only (default: any host; a new
        /// lease has a new host name).
        #[arg(long, value_name = "HOST", requires = "restore_if_empty")]
        restore_host: Option<String>,
        /// --restore-if-empty takes the latest snapshot carrying this tag; repeatable (all of them).
        #[arg(long, value_name = "TAG", requires = "restore_if_empty")]
        restore_tag: Vec<String>,
        #[command(flatten)]
        hooks: HookArgs,
        /// The app to supervise and its arguments, after `--`.
        #[arg(last = true, value_name = "APP")]
        app: Vec<OsString>,
        #[command(flatten)]
        monitor: MonitorArgs,
        #[command(flatten)]
        schedule: ScheduleArgs,
    },
    /// List snapshots, oldest first.
    #[command(after_help = "Examples:\n  shmback snapshots\n  shmback snapshots --json | jq '.[].id'")]
    Snapshots {
        /// Print JSON (restic's snapshot format) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Restore SNAPSHOT[:PATH] (an id prefix or `latest`) into DEST.
    #[command(after_help = "Examples:
  shmback restore latest /tmp/restore
  shmback restore 1a2b3c4d:/data/db.sql /tmp/db.sql")]
    Restore {
        /// What to restore, e.g. `latest` or `1a2b3c4d:/data/db.sql`.
        spec: String,
        /// Where to put it (created if missing).
        dest: PathBuf,
    },
    /// Check the repository; with --read-data also read and verify every pack.
    #[command(after_help = "Examples:\n  shmback check\n  shmback check --read-data")]
    Check {
        /// Read all data (slow; catches corrupted packs).
        #[arg(long)]
        read_data: bool,
    },
    /// Remove snapshots by a retention policy (restic's --keep-* options); with --prune, also
    /// remove the data no snapshot needs any more.
    ///
    /// Snapshots are grouped (by default by host and paths, as restic does) and the policy applies
    /// to each group. Pruning is two-phase, so it is safe while `shmback run` is writing: packs
    /// become unreferenced first and are deleted by a later prune after --keep-delete (23 h).
    #[command(after_help = "Examples:
  shmback forget --keep-last 10 --dry-run
  shmback forget --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --prune
  shmback forget --keep-within 30d --group-by host,tags
  shmback forget --keep-daily 7 --prune --retry-lock 1h   # wait for the batch in flight")]
    Forget {
        #[command(flatten)]
        keep: Box<KeepOptions>,
        /// Group snapshots by any of host, label, paths, tags (comma-separated).
        #[arg(long, default_value = "host,paths")]
        group_by: SnapshotGroupCriterion,
        /// Show what would be removed; remove nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Then prune: remove data that no snapshot references.
        #[arg(long)]
        prune: bool,
        #[command(flatten)]
        prune_opts: Box<PruneOptions>,
    },
    /// Copy snapshots to another repository (restic's `copy`): those not there yet, with their
    /// data, deduplicated against it; the two may have different passwords and backends.
    ///
    /// A snapshot is there already if a snapshot of the target has it as its original (or its
    /// id): running copy again copies nothing new. The target's password comes from
    /// --to-password-file, --to-password-command or SHMBACK_TO_PASSWORD; both repositories use the
    /// same backend variables (credentials) and the same --limit-* buckets.
    #[command(after_help = COPY_EXAMPLES)]
    Copy {
        #[command(flatten)]
        args: CopyArgs,
    },
    /// Repair the repository: rebuild its index from the packs, or cut lost data out of snapshots.
    #[command(after_help = REPAIR_EXAMPLES)]
    Repair {
        #[command(subcommand)]
        what: RepairCmd,
    },
    /// Remove stale repository locks (restic's `unlock`): those over 30 minutes old, or left by a
    /// process of this host that is gone; with --remove-all, every lock.
    ///
    /// shmback, like restic, writes a lock file under locks/ while it changes the repository
    /// (`shmback run` only while a batch is in flight); a crashed process leaves its lock behind.
    #[command(after_help = "Examples:
  shmback unlock                 # stale locks only: safe while other processes run
  shmback unlock --remove-all    # every lock: only when nothing else uses the repository")]
    Unlock {
        /// Remove every lock, even those of running processes.
        #[arg(long)]
        remove_all: bool,
    },
    /// Try the whole thing on an embedded default: a fresh local repository and segment, the
    /// uploader, `shmback-send` in a second process sending DIR twice, a verified restore.
    #[command(after_help = "Examples:\n  shmback demo\n  shmback demo ~/photos --work /tmp/demo")]
    Demo {
        /// Directory to send (default: /usr/share/doc, or the current directory).
        dir: Option<PathBuf>,
        /// Where to keep the demo repository (default: a new directory under the temp dir).
        #[arg(long)]
        work: Option<PathBuf>,
    },
}

/// The S3 settings the `--s3-*` flags (or their variables) give.
fn s3_options(cli: &Cli) -> S3Options {
    S3Options {
        provider: cli.s3_provider,
        region: cli.s3_region.clone(),
        path_style: if cli.s3_path_style {
            Some(true)
        } else if cli.s3_virtual_host {
            Some(false)
        } else {
            None
        },
        storage_class: cli.s3_storage_class.clone(),
        inflight: cli.s3_inflight,
        max_attempts: cli.s3_attempts.max(1),
        multipart_threshold: cli.s3_multipart_mib.max(1) << 20,
        create_bucket: matches!(cli.cmd, Cmd::Init { create_bucket: true }),
        checksums: cli.s3_checksums,
        ..S3Options::default()
    }
}

/// The repository every command but the demo works on: parsed here, once.
fn repository_config(cli: &Cli) -> anyhow::Result<RepositoryConfig> {
    let given = cli.repo.as_deref().context("no repository: set RESTIC_REPOSITORY or --repo")?;
    let sources = PasswordSources {
        file: cli.password_file.clone(),
        command: cli.password_command.clone(),
        // Set but empty counts: restic refuses an empty password rather than ignoring the variable.
        env: std::env::var_os("RESTIC_PASSWORD").map(|v| v.to_string_lossy().into_owned()),
    };
    Ok(RepositoryConfig {
        location: given.parse()?,
        password: Password::resolve(&sources)?,
        s3: s3_options(cli),
        env: Env::process(),
        locks: cli.locks.options(),
        limits: cli.limits.bandwidth(),
    })
}

const REPAIR_EXAMPLES: &str = "Examples (after `shmback check` reported damage):
  shmback repair index                          # index files lost or wrong: rebuild from the packs
  shmback repair snapshots --dry-run            # which snapshots reference lost data
  shmback repair snapshots --forget             # write repaired snapshots, remove the originals";

#[derive(Subcommand)]
enum RepairCmd {
    /// Rebuild the index from the pack files (restic's `repair index`): packs missing from the
    /// index are read and added, entries of packs that are gone are dropped.
    #[command(after_help = "Examples:\n  shmback repair index\n  shmback repair index --read-all --dry-run")]
    Index {
        /// Read every pack's header again, not only those of packs missing from the index.
        #[arg(long)]
        read_all: bool,
        /// Show what would change; write nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
    },
    /// Remove references to lost data from snapshots (restic's `repair snapshots`): a file with
    /// blobs missing from the index keeps what is left as NAME.repaired, a lost directory becomes
    /// empty; each changed snapshot is saved as a new one tagged `repaired`.
    ///
    /// Run `shmback repair index` first: only blobs missing from the index count as lost.
    #[command(after_help = "Examples:
  shmback repair snapshots --dry-run
  shmback repair snapshots --forget
  shmback repair snapshots 1a2b3c4d --suffix .damaged")]
    Snapshots {
        /// Snapshots to repair (id prefixes or `latest`; default: all).
        ids: Vec<String>,
        /// Remove the original snapshots once their repaired copies are saved.
        #[arg(long)]
        forget: bool,
        /// Suffix for the name of a file that lost data.
        #[arg(long, default_value = ".repaired")]
        suffix: String,
        /// Show what would change; write nothing.
        #[arg(short = 'n', long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    // As a container's PID 1: an init in front of the real process (reaps orphans, passes signals on).
    if let Some(code) = shmback_uploader::init::run_as_init_if_pid_1() {
        return code;
    }
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // OpenDAL's logging layer warns about every failed call, including the expected
                // "not found" when a repository is created; its retries still show (layers).
                .unwrap_or_else(|_| {
                    "warn,shmback_uploader=info,shmback=info,opendal::services=error,rustic_core::commands::repair=info"
                        .into()
                }),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        // Colours for a person at a terminal only: piped into a log, escape codes are noise.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            // A backend failure gets its own exit status whichever backend failed (README, "Exit
            // status"); a classified one speaks for itself (its message names the cause and fix).
            let (code, message) = match classify(&e) {
                Some((kind, Some(message))) => (kind.exit_code(), message),
                Some((kind, None)) => (kind.exit_code(), format!("{e:#}")),
                None => (1, format!("{e:#}")),
            };
            let message = without_empty_backtraces(&message);
            match cli.log_format {
                // A log collector reading JSON lines gets the final error as one of them.
                LogFormat::Json => tracing::error!(exit_status = code, "{message}"),
                LogFormat::Text => eprintln!("shmback: {message}"),
            }
            ExitCode::from(code)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    // `restic unlock` on this host asks whether a lock's process lives by sending it SIGHUP,
    // which would end this one (the supervisor of `run -- APP` handles SIGHUP itself).
    if !matches!(&cli.cmd, Cmd::Run { app, .. } if !app.is_empty()) {
        signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::new(AtomicBool::new(false)))?;
    }
    match &cli.cmd {
        Cmd::Demo { dir, work } => {
            let dir = dir.clone().unwrap_or_else(|| {
                let doc = PathBuf::from("/usr/share/doc");
                if doc.is_dir() { doc } else { PathBuf::from(".") }
            });
            let work = work
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join(format!("shmback-demo-{}", std::process::id())));
            shmback_uploader::demo::demo(&dir, &work)?;
        }
        Cmd::Init { .. } => {
            let config = repository_config(cli)?;
            open_repo(&config, true)?;
            println!("created repository {}", config.location);
        }
        Cmd::Run {
            segment,
            listen,
            listen_max_batches,
            pull,
            pull_interval,
            token_file,
            grace,
            host,
            ring_size,
            group_shared,
            batch_idle,
            max_entries,
            restore_if_empty,
            restore_host,
            restore_tag,
            hooks,
            app,
            monitor,
            schedule,
        } => {
            schedule.validate(pull.is_some())?;
            let config = repository_config(cli)?;
            let mut opts = ServeOptions {
                grace: Duration::from_secs(*grace),
                batch_idle: Duration::from_secs(*batch_idle),
                max_entries: *max_entries,
                ..ServeOptions::default()
            };
            if let Some(h) = host {
                opts.host = h.clone();
            }
            opts.segment =
                SegmentOptions { capacity: *ring_size, group_shared: *group_shared, ..SegmentOptions::default() };
            let segments = if segment.is_empty() && listen.is_none() && pull.is_none() {
                vec![PathBuf::from("/dev/shm/shmback")]
            } else {
                segment.clone()
            };
            let http = HttpOptions {
                token: token_from(
                    std::env::var("SHMBACK_TOKEN").ok().filter(|t| !t.is_empty()),
                    token_file.as_deref(),
                )?,
                max_batches: (*listen_max_batches).max(1),
                ..HttpOptions::default()
            };
            // Bound first: a port in use fails before anything is served (or APP started).
            let _metrics = shmback_uploader::monitor::start(monitor, &segments)?;
            let listener = listen.map(bind).transpose()?;
            let hooks = Arc::new(Hooks::new(hooks, &opts.host)?);
            let transports = Transports {
                segments,
                listener,
                pull: pull.clone(),
                every: *pull_interval,
                http,
                hooks: hooks.clone(),
                schedule: schedule.clone(),
            };
            if !app.is_empty() {
                let sup = Supervise {
                    app: app.clone(),
                    grace: opts.grace,
                    restore: restore_if_empty.clone(),
                    filter: SnapshotFilter { host: restore_host.clone(), tags: restore_tag.clone() },
                };
                let ended = supervise(&config, &sup, |stop, ready| transports.serve(&config, &opts, stop, ready));
                hooks.finish(NOTIFY_GRACE);
                let ended = ended?;
                return Ok(ended.map_or(ExitCode::SUCCESS, |how| ExitCode::from(how.status())));
            }
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
            signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
            let served = transports.serve(&config, &opts, &stop, Box::new(|| {}));
            hooks.finish(NOTIFY_GRACE);
            served?;
        }
        Cmd::Unlock { remove_all } => {
            let config = repository_config(cli)?;
            let report = commands::unlock(&config, *remove_all)?;
            for (id, lock) in &report.removed {
                println!("removed {}", locks::describe_lock(*id, lock.as_ref()));
            }
            for (id, lock) in &report.kept {
                println!("kept (not stale): {}", locks::describe_lock(*id, Some(lock)));
            }
            println!("successfully removed {} locks", report.removed.len());
        }
        Cmd::Snapshots { json } => {
            let config = repository_config(cli)?;
            let snaps = commands::snapshots(&config)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&snaps)?);
            } else {
                for s in &snaps {
                    println!("{}", commands::snapshot_line(s));
                }
                println!("{} snapshots", snaps.len());
            }
        }
        Cmd::Restore { spec, dest } => {
            let config = repository_config(cli)?;
            commands::restore(&config, spec, dest)?;
            println!("restored {spec} to {}", dest.display());
        }
        Cmd::Check { read_data } => {
            let config = repository_config(cli)?;
            commands::check(&config, *read_data)?;
            println!("no errors were found");
        }
        Cmd::Copy { args } => {
            let source = repository_config(cli)?;
            let target = args.target(&source)?;
            let report = shmback_uploader::copy::copy(&source, &target, &args.filter()?, args.init_target)?;
            if report.created_target {
                println!("created repository {}", target.location);
            }
            for s in &report.copied {
                println!("copied {}", commands::snapshot_line(s));
            }
            println!(
                "{} snapshots selected, {} already in {}, {} copied",
                report.selected,
                report.present,
                target.location,
                report.copied.len()
            );
        }
        Cmd::Repair { what: RepairCmd::Index { read_all, dry_run } } => {
            let config = repository_config(cli)?;
            let r = commands::repair_index(&config, *read_all, *dry_run)?;
            let verb = if *dry_run { "would rebuild" } else { "rebuilt" };
            println!("{verb} the index: {} index files before, {} after", r.before, r.after);
        }
        Cmd::Repair { what: RepairCmd::Snapshots { ids, forget, suffix, dry_run } } => {
            let config = repository_config(cli)?;
            let r = commands::repair_snapshots(&config, ids, suffix, *forget, *dry_run)?;
            for s in &r.written {
                println!("saved {}", commands::snapshot_line(s));
            }
            let dry = if *dry_run { " (dry run: nothing written)" } else { "" };
            println!(
                "{} snapshots checked, {} repaired snapshots saved, {} removed{dry}",
                r.checked,
                r.written.len(),
                r.removed
            );
        }
        Cmd::Forget { keep, group_by, dry_run, prune, prune_opts } => {
            let config = repository_config(cli)?;
            let prune = prune.then_some(&**prune_opts);
            let report = commands::forget(&config, keep, *group_by, prune, *dry_run)?;
            for (group, items) in &report.groups {
                println!("snapshots of {group}:");
                for commands::Verdict { snapshot: snap, keep, reasons } in items {
                    let verdict = if *keep { "keep  " } else { "remove" };
                    let why = if reasons.is_empty() { String::new() } else { format!("  ({})", reasons.join(", ")) };
                    println!("  {verdict} {}{why}", commands::snapshot_line(snap));
                }
            }
            let verb = if *dry_run { "would remove" } else { "removed" };
            println!("{verb} {} snapshots", report.removed);
            if report.pruned {
                println!("pruned: unreferenced data removed (packs of the last 23 h are only marked)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The line a stored batch prints on stdout.
fn print_outcome(from: &str, o: &BatchOutcome) {
    match o {
        BatchOutcome::Stored { seq, snapshot, elapsed } => {
            println!("{from}: batch {seq}: snapshot {} ({elapsed:.2?})", snapshot.id)
        }
        // Logged (with the reason, rate-limited against a flooding producer) by the library.
        BatchOutcome::Rejected { .. } => {}
    }
}

/// How long `shmback run` waits on exit for queued post hooks, pings and webhook calls (the
/// batch in flight has had --grace already; this stays well within a platform's kill delay).
const NOTIFY_GRACE: Duration = Duration::from_secs(5);

/// What `shmback run` serves: segments, batches pushed to its listener, batches it pulls.
struct Transports {
    segments: Vec<PathBuf>,
    listener: Option<std::net::TcpListener>,
    pull: Option<String>,
    /// Seconds between pulls.
    every: u64,
    http: HttpOptions,
    /// Post hook, pings and webhook of each settled batch.
    hooks: Arc<Hooks>,
    /// Scheduled jobs, retention, check and prune.
    schedule: ScheduleArgs,
}

impl Transports {
    /// Serves every transport, each on its own thread, until `stop` is set; the first to fail
    /// stops the others. `ready` is called once the segments are attached.
    fn serve(
        self,
        config: &RepositoryConfig,
        opts: &ServeOptions,
        stop: &Arc<AtomicBool>,
        ready: Box<dyn FnOnce() + Send>,
    ) -> anyhow::Result<()> {
        let Transports { segments, listener, pull, every, http, hooks, schedule } = self;
        // Retention runs after each stored snapshot, off the batch's path.
        let retention = schedule.retention(config, stop)?;
        let notify = retention.as_ref().map(Retention::notifier);
        let on_stored = move |o: &BatchOutcome| {
            if let (Some(n), BatchOutcome::Stored { .. }) = (&notify, o) {
                n.stored();
            }
        };
        let on_stored_http = on_stored.clone();
        let hooks_http = hooks.clone();
        let on_http: OnBatch = Arc::new(move |from, o| {
            print_outcome(from, o);
            hooks_http.batch(from, o);
            on_stored_http(o);
        });
        let prepared = (|| -> anyhow::Result<_> {
            // With --schedule, the pull is a scheduled job instead of a loop every --pull-interval.
            let (pull, puller) = match pull {
                Some(url) if schedule.schedule.is_some() => {
                    (None, Some(Puller::new(config, &url, &http, opts, stop, on_http.clone())?))
                }
                other => (other, None),
            };
            let tasks = schedule.tasks(config, &opts.host, &segments, puller)?;
            let state = if tasks.is_empty() { None } else { Some(schedule.state(&config.location.to_string())?) };
            Ok((pull, tasks, state))
        })();
        let (pull, tasks, state) = match prepared {
            Ok(p) => p,
            Err(e) => {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(r) = retention {
                    r.join();
                }
                return Err(e);
            }
        };
        let failed = |r: anyhow::Result<()>| {
            if r.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            r
        };
        let result = std::thread::scope(|scope| {
            let mut jobs = Vec::new();
            if let Some(listener) = listener {
                let (on, http) = (on_http.clone(), &http);
                jobs.push(scope.spawn(move || failed(listen_http(config, listener, http, opts, stop, on))));
            }
            if !tasks.is_empty() {
                let sched_opts = schedule.options(opts.grace);
                // Every scheduled job runs between the pre and post hooks, with its pings.
                let around = if hooks.is_empty() { plain() } else { hooks.clone().wrapper() };
                jobs.push(scope.spawn(move || {
                    run_scheduler(tasks, state, Arc::new(SystemClock), around, &sched_opts, stop);
                    Ok(())
                }));
            }
            if let Some(url) = &pull {
                let (on, http) = (on_http.clone(), &http);
                let every = Duration::from_secs(every.max(1));
                jobs.push(scope.spawn(move || failed(pull_http(config, url, every, http, opts, stop, on))));
            }
            let result = if segments.is_empty() {
                ready();
                Ok(())
            } else {
                failed(serve_all(config, &segments, opts, stop, ready, |seg: &Path, o: &BatchOutcome| {
                    let from = seg.display().to_string();
                    print_outcome(&from, o);
                    hooks.batch(&from, o);
                    on_stored(o);
                }))
            };
            jobs.into_iter().fold(result, |result, job| {
                let r = job.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a serving thread panicked")));
                result.and(r)
            })
        });
        // Serving has ended (stop set, or a failure): retention ends with it.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = retention {
            r.join();
        }
        result
    }
}
