//! `shmback`: the uploader and its repository commands.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shmback_uploader::{BatchOutcome, ServeOptions, commands, open_repo, serve};

/// Back up what producers send through /dev/shm rings into a restic-format repository.
#[derive(Parser)]
#[command(name = "shmback", version)]
struct Cli {
    /// Repository: a directory or `local:PATH`.
    #[arg(short, long, global = true, env = "RESTIC_REPOSITORY")]
    repo: Option<String>,
    /// Repository password.
    #[arg(long, global = true, env = "RESTIC_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// File holding the repository password (first line).
    #[arg(long, global = true, env = "RESTIC_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new repository.
    Init,
    /// Serve a segment: one snapshot per committed batch, until SIGTERM/SIGINT.
    Run {
        /// The segment producers send through (created if missing).
        #[arg(short, long, default_value = "/dev/shm/shmback")]
        segment: PathBuf,
    },
    /// List snapshots, oldest first.
    Snapshots {
        /// Print JSON (restic's snapshot format) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Restore SNAPSHOT[:PATH] (an id prefix or `latest`) into DEST.
    Restore {
        /// What to restore, e.g. `latest` or `1a2b3c4d:/data/db.sql`.
        spec: String,
        /// Where to put it (created if missing).
        dest: PathBuf,
    },
    /// Check the repository; with --read-data also read and verify every pack.
    Check {
        /// Read all data (slow; catches corrupted packs).
        #[arg(long)]
        read_data: bool,
    },
    /// Try the whole thing on an embedded default: a fresh local repository and segment, the
    /// uploader, `shmback-send` in a second process sending DIR twice, a verified restore.
    Demo {
        /// Directory to send (default: /usr/share/doc, or the current directory).
        dir: Option<PathBuf>,
        /// Where to keep the demo repository (default: a new directory under the temp dir).
        #[arg(long)]
        work: Option<PathBuf>,
    },
}

fn password(cli: &Cli) -> anyhow::Result<String> {
    if let Some(p) = &cli.password {
        return Ok(p.clone());
    }
    if let Some(f) = &cli.password_file {
        let s = std::fs::read_to_string(f).with_context(|| format!("reading the password file {}", f.display()))?;
        return Ok(s.lines().next().unwrap_or_default().to_string());
    }
    anyhow::bail!("no repository password: set RESTIC_PASSWORD or RESTIC_PASSWORD_FILE (or --password-file)")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,shmback_uploader=info,shmback=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Every command but the demo needs a repository and its password.
    let repo_and_password = || -> anyhow::Result<(String, String)> {
        let repo = cli.repo.clone().context("no repository: set RESTIC_REPOSITORY or --repo")?;
        Ok((repo, password(&cli)?))
    };
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
        Cmd::Init => {
            let (repo, pw) = repo_and_password()?;
            open_repo(&repo, &pw, true)?;
            println!("created repository {repo}");
        }
        Cmd::Run { segment } => {
            let (repo, pw) = repo_and_password()?;
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
            signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
            let mut r = open_repo(&repo, &pw, false)?;
            serve(&mut r, segment, &ServeOptions::default(), &stop, |o| match o {
                BatchOutcome::Stored { seq, snapshot, elapsed } => {
                    println!("batch {seq}: snapshot {} ({elapsed:?})", snapshot.id)
                }
                BatchOutcome::Rejected { seq, why, .. } => eprintln!("batch {seq} rejected: {why}"),
            })?;
        }
        Cmd::Snapshots { json } => {
            let (repo, pw) = repo_and_password()?;
            let snaps = commands::snapshots(&repo, &pw)?;
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
            let (repo, pw) = repo_and_password()?;
            commands::restore(&repo, &pw, spec, dest)?;
            println!("restored {spec} to {}", dest.display());
        }
        Cmd::Check { read_data } => {
            let (repo, pw) = repo_and_password()?;
            commands::check(&repo, &pw, *read_data)?;
            println!("no errors were found");
        }
    }
    Ok(())
}
