//! The configuration commands share, as a value: the binary parses flags and variables once
//! (`main.rs`) and passes this down; nothing below reads process-wide settings. The password is
//! resolved here the way restic resolves it.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::backends::env::Env;
use crate::backends::limit::Bandwidth;
use crate::backends::location::{Location, LocationError};
use crate::backends::s3::S3Options;

/// A repository password. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password read from its source.
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// The password itself, for the key derivation.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Resolves the password from `sources` in restic's order (restic's `resolvePassword`): a
    /// file and a command exclude each other; the command's output or the file's content,
    /// whitespace-trimmed as a whole; else `RESTIC_PASSWORD`. A source that is set but fails
    /// (a file that cannot be read, a command that fails) is an error, never skipped, and an
    /// empty password is refused.
    pub fn resolve(sources: &PasswordSources) -> Result<Self, PasswordError> {
        let (password, source) = match (&sources.file, &sources.command) {
            (Some(_), Some(_)) => return Err(PasswordError::FileAndCommand),
            (None, Some(command)) => {
                (run_command(command)?, format!("the password command `{command}` printed nothing"))
            }
            (Some(file), None) => (read_file(file)?, format!("the password file {} holds nothing", file.display())),
            (None, None) => match &sources.env {
                Some(p) => (p.clone(), "RESTIC_PASSWORD is set but empty".to_string()),
                None => return Err(PasswordError::NoSource),
            },
        };
        if password.is_empty() {
            return Err(PasswordError::Empty { what: source });
        }
        Ok(Password(password))
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Where a password may come from (restic's variables, and the flags of the file and command).
#[derive(Clone, Debug, Default)]
pub struct PasswordSources {
    /// `RESTIC_PASSWORD_FILE` / `--password-file`.
    pub file: Option<PathBuf>,
    /// `RESTIC_PASSWORD_COMMAND` / `--password-command` (run with `sh -c`).
    pub command: Option<String>,
    /// `RESTIC_PASSWORD`, if set (even to the empty string, which is refused).
    pub env: Option<String>,
}

/// Why no password could be had.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// File and command both set.
    #[error(
        "both a password file and a password command are set (RESTIC_PASSWORD_FILE / RESTIC_PASSWORD_COMMAND or \
         their flags): keep one"
    )]
    FileAndCommand,
    /// The file does not exist or cannot be read.
    #[error("cannot read the password file {path}: {source}; fix RESTIC_PASSWORD_FILE (or --password-file)")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The command could not be started.
    #[error("running the password command `{command}`: {source}")]
    CommandStart {
        /// The command.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command failed.
    #[error("the password command `{command}` failed ({status}); fix RESTIC_PASSWORD_COMMAND (or --password-command)")]
    CommandFailed {
        /// The command.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The file or the command's output is not UTF-8.
    #[error("the password from {what} is not UTF-8")]
    NotUtf8 {
        /// The file or command.
        what: String,
    },
    /// An empty password.
    #[error("an empty password is not a password: {what}; put the repository's password there")]
    Empty {
        /// Which source was empty.
        what: String,
    },
    /// No source at all.
    #[error(
        "no repository password: set RESTIC_PASSWORD, RESTIC_PASSWORD_FILE or RESTIC_PASSWORD_COMMAND \
         (or --password-file / --password-command)"
    )]
    NoSource,
}

fn read_file(path: &Path) -> Result<String, PasswordError> {
    let bytes = std::fs::read(path).map_err(|source| PasswordError::File { path: path.to_path_buf(), source })?;
    let text = String::from_utf8(bytes).map_err(|_| PasswordError::NotUtf8 { what: path.display().to_string() })?;
    Ok(text.trim().to_string())
}

fn run_command(command: &str) -> Result<String, PasswordError> {
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|source| PasswordError::CommandStart { command: command.to_string(), source })?;
    if !out.status.success() {
        return Err(PasswordError::CommandFailed { command: command.to_string(), status: out.status });
    }
    let text = String::from_utf8(out.stdout).map_err(|_| PasswordError::NotUtf8 { what: format!("`{command}`") })?;
    Ok(text.trim().to_string())
}

/// Everything needed to open one repository: where it is, its password, the backend settings
/// and the environment the backends read their variables from.
#[derive(Clone, Debug)]
pub struct RepositoryConfig {
    /// Where the repository lives (restic's location syntax, parsed).
    pub location: Location,
    /// Its password.
    pub password: Password,
    /// Settings of the S3 backend (ignored by the others).
    pub s3: S3Options,
    /// The variables of the backends (credentials, endpoints), read once.
    pub env: Env,
    /// How its restic locks are taken (`--retry-lock`; `crate::locks`).
    pub locks: crate::locks::LockOptions,
    /// Bandwidth limits applied to its backend (the process's buckets, shared by clones).
    pub limits: Bandwidth,
}

impl RepositoryConfig {
    /// A repository at `location` (restic's syntax) with default backend settings and the
    /// process environment.
    pub fn new(location: &str, password: &str) -> Result<Self, LocationError> {
        Ok(RepositoryConfig {
            location: location.parse()?,
            password: Password::new(password),
            s3: S3Options::default(),
            env: Env::process(),
            locks: crate::locks::LockOptions::default(),
            limits: Bandwidth::unlimited(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(file: Option<&Path>, command: Option<&str>, env: Option<&str>) -> Result<Password, PasswordError> {
        Password::resolve(&PasswordSources {
            file: file.map(Path::to_path_buf),
            command: command.map(str::to_string),
            env: env.map(str::to_string),
        })
    }

    #[test]
    fn restic_resolution_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        // restic takes the whole file, whitespace-trimmed, not its first line.
        std::fs::write(&file, "  a\nb \n\n").unwrap();
        assert_eq!(resolve(Some(&file), None, Some("env")).unwrap().expose(), "a\nb");
        assert_eq!(resolve(None, Some("printf ' x\\n'"), Some("env")).unwrap().expose(), "x");
        assert_eq!(resolve(None, None, Some("env")).unwrap().expose(), "env");
        // A source that is set and fails is an error, even with RESTIC_PASSWORD set.
        let missing = dir.path().join("missing");
        assert!(matches!(resolve(Some(&missing), None, Some("env")), Err(PasswordError::File { .. })));
        assert!(matches!(resolve(None, Some("exit 3"), Some("env")), Err(PasswordError::CommandFailed { .. })));
        assert!(matches!(resolve(Some(&file), Some("echo x"), None), Err(PasswordError::FileAndCommand)));
        assert!(matches!(resolve(None, None, None), Err(PasswordError::NoSource)));
    }

    #[test]
    fn empty_passwords_are_refused_naming_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "\n").unwrap();
        for (got, names) in [
            (resolve(None, None, Some("")), "RESTIC_PASSWORD".to_string()),
            (resolve(Some(&file), None, None), file.display().to_string()),
            (resolve(None, Some("true"), None), "`true`".to_string()),
        ] {
            let e = got.unwrap_err().to_string();
            assert!(e.contains("an empty password is not a password") && e.contains(&names), "{e}");
        }
    }
}
