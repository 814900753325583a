//! `shmback`: the uploader. (Work in progress: `init` and `run`; the other commands come with
//! their issue.)

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shmback_uploader::{BatchOutcome, ServeOptions, open_repo, serve};

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
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let repo = cli.repo.clone().context("no repository: set RESTIC_REPOSITORY or --repo")?;
    let pw = password(&cli)?;
    match &cli.cmd {
        Cmd::Init => {
            open_repo(&repo, &pw, true)?;
            println!("created repository {repo}");
        }
        Cmd::Run { segment } => {
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
    }
    Ok(())
}
