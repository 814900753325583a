//! The configuration commands share, as a value: the binary parses flags and variables once
//! (`main.rs`) and passes this down; nothing below reads process-wide settings.

use std::fmt;

use crate::location::{Location, LocationError};
use crate::s3::S3Options;

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
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Everything needed to open one repository: where it is, its password, and the backend settings.
#[derive(Clone, Debug)]
pub struct RepositoryConfig {
    /// Where the repository lives (restic's location syntax, parsed).
    pub location: Location,
    /// Its password.
    pub password: Password,
    /// Settings of the S3 backend (ignored by the others).
    pub s3: S3Options,
}

impl RepositoryConfig {
    /// A repository at `location` (restic's syntax) with default backend settings.
    pub fn new(location: &str, password: &str) -> Result<Self, LocationError> {
        Ok(RepositoryConfig {
            location: location.parse()?,
            password: Password::new(password),
            s3: S3Options::default(),
        })
    }
}
