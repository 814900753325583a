//! What kind of failure a backend met, whichever backend it is: the binary exits with the same
//! status for a refused key on S3, B2, Swift or a REST server (README, "Exit status").

use std::error::Error as StdError;
use std::fmt;

use super::env::MissingVariable;
use super::location::LocationError;

/// A backend failure a user acts on differently from the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The storage refused the credentials, or the local directory's permissions refuse access.
    AccessRefused,
    /// The bucket or container does not exist, or there is no repository at the location.
    Missing,
    /// The endpoint cannot be reached (no route, refused connection, timeout).
    Unreachable,
    /// TLS with the endpoint failed.
    Tls,
    /// The location or a backend variable is malformed or missing.
    Configuration,
}

impl FailureKind {
    /// The process exit status for this kind (1 stays "anything else").
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::AccessRefused => 10,
            FailureKind::Missing => 11,
            FailureKind::Unreachable => 12,
            FailureKind::Tls => 13,
            FailureKind::Configuration => 14,
        }
    }

    /// Its name as a metric label (`shmback_backend_errors_total{class}`).
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::AccessRefused => "access_refused",
            FailureKind::Missing => "missing",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Tls => "tls",
            FailureKind::Configuration => "configuration",
        }
    }
}

/// The exit statuses, for `shmback --help`.
pub const EXIT_STATUS_HELP: &str = "Exit status:
  0   success
  1   any other error
  10  access refused: the storage refused the credentials, or the local directory's permissions
  11  missing: the bucket or container does not exist, or no repository is at the location
  12  the endpoint cannot be reached
  13  TLS with the endpoint failed
  14  configuration: a malformed location, or a backend variable missing or invalid";

/// A backend failure with its kind. It shows as the error it wraps (whose message names the
/// cause and the fix), so it can sit in an error chain without repeating itself.
pub struct BackendError {
    kind: FailureKind,
    error: Box<dyn StdError + Send + Sync>,
}

impl BackendError {
    /// `error`, of kind `kind`.
    pub fn new(kind: FailureKind, error: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        BackendError { kind, error: error.into() }
    }

    /// A failure described by `message` alone.
    pub fn msg(kind: FailureKind, message: impl fmt::Display) -> Self {
        Self::new(kind, message.to_string())
    }

    /// Its kind.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendError({:?}: {:?})", self.kind, self.error)
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.error.source()
    }
}

/// The kind of the first classified failure in `error`'s chain, and the message to show for it:
/// a [`BackendError`] speaks for itself (its own message); OpenDAL's kinds and the configuration
/// errors are classified, the whole chain shown.
pub fn classify(error: &anyhow::Error) -> Option<(FailureKind, Option<String>)> {
    error.chain().find_map(|e| {
        if let Some(b) = e.downcast_ref::<BackendError>() {
            return Some((b.kind, Some(b.to_string())));
        }
        if e.is::<MissingVariable>() || e.is::<LocationError>() {
            return Some((FailureKind::Configuration, None));
        }
        let dal = e.downcast_ref::<opendal::Error>()?;
        let kind = match dal.kind() {
            opendal::ErrorKind::PermissionDenied => FailureKind::AccessRefused,
            opendal::ErrorKind::ConfigInvalid => FailureKind::Configuration,
            // An object that is not there is the repository's business; a container that is not
            // there is the user's.
            opendal::ErrorKind::NotFound if names_a_container(&dal.to_string()) => FailureKind::Missing,
            _ => return None,
        };
        Some((kind, None))
    })
}

fn names_a_container(text: &str) -> bool {
    let lower = text.to_lowercase();
    ["containernotfound", "nosuchbucket", "no such container", "bucket not found", "container not found"]
        .iter()
        .any(|s| lower.contains(s))
}

/// `text` without rustic_core's empty "Backtrace:" sections (a placeholder telling how to enable
/// backtraces, shown on every error); a real backtrace (`RUST_BACKTRACE=1`) stays.
pub fn without_empty_backtraces(text: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let empty_next =
            lines.peek().is_some_and(|n| n.starts_with("disabled backtrace") || n.starts_with("unsupported backtrace"));
        if line.trim() == "Backtrace:" && empty_next {
            lines.next();
            while out.last().is_some_and(|l| l.trim().is_empty()) {
                out.pop();
            }
            continue;
        }
        out.push(line);
    }
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.join("\n")
}

/// `e` with every cause after it (`a: b: c`): reqwest's and hyper's own messages leave out the one
/// that says what happened (e.g. "connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_own_status() {
        let kinds = [
            FailureKind::AccessRefused,
            FailureKind::Missing,
            FailureKind::Unreachable,
            FailureKind::Tls,
            FailureKind::Configuration,
        ];
        let codes: std::collections::BTreeSet<u8> = kinds.iter().map(|k| k.exit_code()).collect();
        assert_eq!(codes.len(), kinds.len());
        for k in kinds {
            assert!(EXIT_STATUS_HELP.contains(&format!("  {}  ", k.exit_code())), "{k:?} is documented");
        }
    }

    #[test]
    fn classified_through_context_and_shown_as_itself() {
        let e = anyhow::Error::new(BackendError::msg(FailureKind::Unreachable, "cannot reach h: fix it"))
            .context("opening repository x");
        assert_eq!(classify(&e), Some((FailureKind::Unreachable, Some("cannot reach h: fix it".into()))));
        let e = anyhow::Error::new(MissingVariable::new("gs", "X", "y"));
        assert_eq!(classify(&e), Some((FailureKind::Configuration, None)));
        let e = anyhow::Error::new(opendal::Error::new(opendal::ErrorKind::PermissionDenied, "403"));
        assert_eq!(classify(&e), Some((FailureKind::AccessRefused, None)));
        let e = anyhow::Error::new(opendal::Error::new(opendal::ErrorKind::NotFound, "data/ab/cd"));
        assert_eq!(classify(&e), None, "a missing object is not a missing container");
        assert_eq!(classify(&anyhow::anyhow!("other")), None);
    }

    #[test]
    fn empty_backtrace_sections_are_dropped() {
        let text = "Message:\nwrong password\n\nBacktrace:\ndisabled backtrace (set 'RUST_BACKTRACE=\"1\"' \
                    environment variable to enable)\n: caused by x\n";
        assert_eq!(without_empty_backtraces(text), "Message:\nwrong password\n: caused by x");
        let real = "boom\n\nBacktrace:\n   0: main\n";
        assert_eq!(without_empty_backtraces(real), "boom\n\nBacktrace:\n   0: main");
    }
}
