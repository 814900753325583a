//! `shmback-send`: send files, directories or standard input to the shmback uploader as one batch
//! (one snapshot), for producers that are shell scripts or written in other languages: through a
//! /dev/shm segment, pushed over HTTP (`--to`), or served for the uploader to pull (`--serve`).

mod serve;

use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use shmback_writer::{
    Batch, EntryMeta, HttpOptions, Labels, Outbox, OutboxOptions, Progress, SegmentOptions, WriteError,
    default_producer, token_from_env,
};

const EXAMPLES: &str = "\
Examples:
  # Back up /data (stored as data/... like restic does) and wait until the snapshot is stored:
  shmback-send --wait-durable /data

  # A consistent database dump with no temporary file anywhere:
  pg_dump mydb | shmback-send --stdin mydb.sql --tag postgres --wait-durable

  # Both in one snapshot, through a non-default segment:
  pg_dump mydb | shmback-send -s /dev/shm/app --stdin dumps/mydb.sql /etc/app

  # Push to an uploader in another service (`shmback run --listen 0.0.0.0:8700`):
  SHMBACK_TOKEN_FILE=/run/secrets/shmback shmback-send --to http://backup:8700 --wait-durable /data

  # Pull mode: let the uploader (`shmback run --pull http://app:8701`) fetch /data when it wants:
  SHMBACK_TOKEN_FILE=/run/secrets/shmback shmback-send --serve 0.0.0.0:8701 /data

Token (HTTP only): SHMBACK_TOKEN, or SHMBACK_TOKEN_FILE (the file's content, trailing newline
trimmed); not both. Without one, anyone who reaches the port is trusted.

Exit status:
  0  sent (and, with --wait-durable, stored; with --serve --once, stored)
  1  any other failure (bad segment, bad path, cannot listen, …)
  2  bad command line or settings (URL, producer name, token variables)
  3  no uploader attached within --timeout, or it left or restarted mid-batch; over HTTP, no
     attempt got through within --timeout: send again once it runs
  4  timed out waiting for the uploader
  5  the uploader rejected the batch (no snapshot; see its log)
  6  a source changed while it was read, or could not be read (batch aborted)
  7  the uploader refused the token (set SHMBACK_TOKEN/SHMBACK_TOKEN_FILE to its token)";

/// Send files, directories or standard input to the shmback uploader as one snapshot.
///
/// Paths are stored under their absolute path without the leading `/` (as restic does);
/// directories are walked (symlinks stored as links, sockets and devices skipped with a warning).
/// Nothing is buffered: files are read one at a time straight into the shared-memory ring (or
/// the HTTP body).
#[derive(Parser, Debug)]
#[command(name = "shmback-send", version, after_help = EXAMPLES)]
struct Args {
    /// Segment to send through; created (with --ring-size) if the uploader has not created it yet.
    #[arg(short, long, env = "SHMBACK_SEGMENT", default_value = "/dev/shm/shmback")]
    segment: PathBuf,

    /// Push over HTTP to the uploader at this URL (`shmback run --listen`) instead of a segment.
    #[arg(long, env = "SHMBACK_TO", value_name = "URL", conflicts_with = "serve")]
    to: Option<String>,

    /// Serve a new batch of PATHs on each `GET /v1/batch` at this address (pull mode, for
    /// `shmback run --pull`); runs until SIGTERM/SIGINT.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["stdin", "wait_durable"])]
    serve: Option<String>,

    /// With --serve: exit after the first settled outcome, with the status a push would have.
    #[arg(long, requires = "serve")]
    once: bool,

    /// Producer name over HTTP (1-128 of A-Z a-z 0-9 . _ -; default: the host name).
    #[arg(long, env = "SHMBACK_PRODUCER", value_name = "NAME")]
    producer: Option<String>,

    /// Wait until the uploader has stored the snapshot, then print its id.
    #[arg(short, long)]
    wait_durable: bool,

    /// Add standard input as a file at this snapshot path, read to its end (size unknown).
    #[arg(long, value_name = "NAME")]
    stdin: Option<String>,

    /// Snapshot tag; repeatable.
    #[arg(short, long = "tag", value_name = "TAG")]
    tags: Vec<String>,

    /// Host name recorded in the snapshot (default: the uploader's).
    #[arg(long)]
    host: Option<String>,

    /// Label KEY=VALUE recorded with the snapshot; repeatable.
    #[arg(short, long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,

    /// Seconds to wait for room in the ring, and for the durable ack.
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    timeout: u64,

    /// Ring size in bytes, used only if this command creates the segment (power of two).
    #[arg(long, value_name = "BYTES")]
    ring_size: Option<usize>,

    /// Files and directories to send.
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// `/a/./b/../c` → `a/c`: the absolute, lexically normal form, without the root.
fn snapshot_path(p: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(p)?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(out)
}

fn exit_code(e: &WriteError) -> u8 {
    match e {
        WriteError::UploaderGone
        | WriteError::NoUploader { .. }
        | WriteError::Unreachable { .. }
        | WriteError::NotResendable { .. }
        | WriteError::Connection { .. } => 3,
        WriteError::Timeout(_) => 4,
        WriteError::Rejected { .. } | WriteError::Refused { .. } => 5,
        WriteError::Unauthorized => 7,
        WriteError::Config { .. } => 2,
        WriteError::SourceChanged { .. } | WriteError::Io { .. } => 6,
        _ => 1,
    }
}

fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.paths.is_empty() && args.stdin.is_none() {
        eprintln!("shmback-send: nothing to send: give PATHs and/or --stdin NAME (see --help)");
        return ExitCode::from(2);
    }
    if args.serve.is_some() {
        return match serve(args) {
            Ok(status) => ExitCode::from(status),
            Err(e) => {
                eprintln!("shmback-send: {e}");
                ExitCode::from(match e {
                    WriteError::Io { .. } => 1,
                    e => exit_code(&e),
                })
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmback-send: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Adds PATHs to `batch`, each at its absolute path without the leading `/`.
fn add_paths(batch: &mut Batch<'_>, paths: &[PathBuf]) -> Result<(), WriteError> {
    for p in paths {
        let snap = snapshot_path(p).map_err(|source| WriteError::Io { path: p.clone(), source })?;
        let is_dir =
            std::fs::symlink_metadata(p).map_err(|source| WriteError::Io { path: p.clone(), source })?.is_dir();
        let snap = snap.as_os_str().as_encoded_bytes().to_vec();
        if is_dir {
            batch.add_dir(&snap, p)?;
        } else {
            batch.add_path(&snap, p)?;
        }
    }
    Ok(())
}

fn http_options(producer: Option<String>) -> Result<HttpOptions, WriteError> {
    Ok(HttpOptions { token: token_from_env()?, producer: producer.unwrap_or_else(default_producer) })
}

/// `--serve`: pull mode.
fn serve(args: Args) -> Result<u8, WriteError> {
    let addr = args.serve.clone().unwrap_or_default();
    let http = http_options(args.producer.clone())?;
    if !shmback_proto::stream::valid_producer_name(&http.producer) {
        return Err(WriteError::Config {
            what: format!("producer name {:?} is not 1-128 of [A-Za-z0-9._-]: set --producer", http.producer),
        });
    }
    let timeout = Duration::from_secs(args.timeout);
    let opts = OutboxOptions {
        timeout,
        labels: Labels { host: args.host, tags: args.tags, meta: args.labels },
        ..OutboxOptions::default()
    };
    let paths = args.paths;
    let cfg = serve::Serve {
        addr,
        token: http.token,
        producer: http.producer,
        once: args.once,
        timeout,
        fill: Box::new(move |batch| {
            add_paths(batch, &paths)?;
            for (path, why) in batch.skipped() {
                eprintln!("shmback-send: skipped {}: {why}", path.display());
            }
            Ok(())
        }),
        outbox: Outbox::detached(opts),
    };
    serve::run(cfg)
        .map_err(|what| WriteError::Io { path: PathBuf::from("--serve"), source: std::io::Error::other(what) })
}

fn run(args: Args) -> Result<(), WriteError> {
    let timeout = Duration::from_secs(args.timeout);
    let opts = OutboxOptions {
        segment: SegmentOptions { capacity: args.ring_size, ..SegmentOptions::default() },
        timeout,
        labels: Labels { host: args.host, tags: args.tags, meta: args.labels },
        ..OutboxOptions::default()
    };
    let mut outbox = match &args.to {
        Some(url) => Outbox::http(url, http_options(args.producer)?, opts)?,
        None => Outbox::open(&args.segment, opts)?,
    };
    let mut batch = outbox.batch();
    add_paths(&mut batch, &args.paths)?;
    if let Some(name) = &args.stdin {
        batch.add_reader(name, None, EntryMeta { mode: 0o600, ..EntryMeta::default() }, std::io::stdin())?;
    }
    for (path, why) in batch.skipped() {
        eprintln!("shmback-send: skipped {}: {why}", path.display());
    }

    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {bytes_per_sec} {msg} [{elapsed_precise}]")
                .expect("valid template"),
        );
        b
    });
    let show = |p: &Progress| {
        if let Some(b) = &bar {
            b.set_length(p.bytes_total);
            b.set_position(p.bytes_done);
            b.set_message(format!("files {}/{}", p.files_done, p.files_total));
        }
    };
    let ticket = batch.commit_with_progress(show);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let ticket = ticket?;
    let p = ticket.progress();
    let secs = ticket.elapsed().as_secs_f64().max(1e-9);
    let mut sent = format!(
        "batch {}: {} entries, {} files, {} in {:.2} s ({}/s)",
        ticket.seq(),
        p.entries,
        p.files_total,
        human(p.bytes_done),
        secs,
        human((p.bytes_done as f64 / secs) as u64)
    );
    if p.files_unchanged > 0 {
        sent += &format!(
            ", {} files ({}) unchanged since the uploader's parent snapshot: not read",
            p.files_unchanged,
            human(p.bytes_unchanged)
        );
    }
    if args.wait_durable {
        let id = ticket.wait_durable(timeout)?;
        println!("{sent}; stored as snapshot {id}");
    } else {
        println!("{sent}; sent (the uploader stores it asynchronously; --wait-durable waits for that)");
    }
    Ok(())
}
