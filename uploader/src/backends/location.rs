//! Repository locations in restic's syntax: parsing, and the form shown in messages (a REST URL's
//! password masked). Parsing is separate from building a backend so every form is testable
//! without a server; this module needs nothing from the backends.

use std::fmt;
use std::path::PathBuf;

/// Where a repository lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// `/path` or `local:/path`.
    Local(PathBuf),
    /// `s3:https://host[:port]/bucket[/prefix]`, `s3:http://…`, `s3:host/bucket[/prefix]` (https).
    S3(S3Location),
    /// `gs:bucket:/prefix`.
    Gcs {
        /// Bucket.
        bucket: String,
        /// Prefix inside the bucket (no leading `/`).
        prefix: String,
    },
    /// `azure:container:/prefix`.
    Azure {
        /// Container.
        container: String,
        /// Prefix.
        prefix: String,
    },
    /// `swift:container:/prefix`.
    Swift {
        /// Container.
        container: String,
        /// Prefix.
        prefix: String,
    },
    /// `b2:bucket[:prefix]`.
    B2 {
        /// Bucket.
        bucket: String,
        /// Prefix.
        prefix: String,
    },
    /// `sftp:[user@]host:/path` or `sftp://[user@]host[:port]//path`.
    Sftp {
        /// Login, if given.
        user: Option<String>,
        /// Host.
        host: String,
        /// Port, if given.
        port: Option<u16>,
        /// Path on the server (as given: absolute, or relative to the login's home).
        path: String,
    },
    /// `rest:http(s)://[user:pass@]host:port/path`.
    Rest {
        /// The URL after `rest:`.
        url: String,
    },
    /// `rclone:remote:path`.
    Rclone {
        /// `remote:path`, handed to rclone.
        remote: String,
    },
}

/// An S3 location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    /// `http` or `https`.
    pub scheme: String,
    /// Host, with `:port` if given.
    pub host: String,
    /// Bucket.
    pub bucket: String,
    /// Prefix inside the bucket (no leading or trailing `/`; empty for the bucket's root).
    pub prefix: String,
}

impl S3Location {
    /// The endpoint URL (`scheme://host[:port]`).
    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.host)
    }

    /// Whether the endpoint is AWS itself (virtual-host addressing by default); any other endpoint
    /// gets path-style addressing by default.
    pub fn is_aws(&self) -> bool {
        let host = self.host.split(':').next().unwrap_or_default();
        host == "s3.amazonaws.com"
            || (host.starts_with("s3.") || host.starts_with("s3-")) && host.ends_with(".amazonaws.com")
    }
}

/// A location that cannot be parsed: what was given, what is wrong, and the forms that work.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "repository location `{given}`: {why}. Forms: /path, local:/path, s3:https://host[:port]/bucket[/prefix], \
s3:host/bucket[/prefix], gs:bucket:/prefix, azure:container:/prefix, swift:container:/prefix, b2:bucket[:prefix], \
sftp:user@host:/path, rest:http://host:port/path, rclone:remote:path"
)]
pub struct LocationError {
    /// The location as given.
    pub given: String,
    /// What is wrong with it.
    pub why: String,
}

fn bad(given: &str, why: impl Into<String>) -> LocationError {
    LocationError { given: given.to_string(), why: why.into() }
}

/// `name:/prefix` or `name:prefix` or `name` → (name, prefix without leading/trailing `/`).
fn split_named(
    given: &str,
    rest: &str,
    what: &str,
    prefix_sep_required: bool,
) -> Result<(String, String), LocationError> {
    let (name, prefix) = match rest.split_once(':') {
        Some((n, p)) => (n, p),
        None if !prefix_sep_required => (rest, ""),
        None => return Err(bad(given, format!("expected {what}:/prefix after the backend name"))),
    };
    if name.is_empty() {
        return Err(bad(given, format!("the {what} name is empty")));
    }
    Ok((name.to_string(), prefix.trim_matches('/').to_string()))
}

impl std::str::FromStr for Location {
    type Err = LocationError;

    fn from_str(given: &str) -> Result<Self, LocationError> {
        if given.is_empty() {
            return Err(bad(given, "it is empty"));
        }
        if given.starts_with('/') || given.starts_with("./") || given.starts_with("../") {
            return Ok(Location::Local(PathBuf::from(given)));
        }
        let Some((kind, rest)) = given.split_once(':') else {
            // restic takes a bare relative path as a local directory.
            return Ok(Location::Local(PathBuf::from(given)));
        };
        match kind {
            "local" => {
                if rest.is_empty() {
                    return Err(bad(given, "the path after local: is empty"));
                }
                Ok(Location::Local(PathBuf::from(rest)))
            }
            "s3" => parse_s3(given, rest).map(Location::S3),
            "gs" => {
                let (bucket, prefix) = split_named(given, rest, "bucket", true)?;
                Ok(Location::Gcs { bucket, prefix })
            }
            "azure" => {
                let (container, prefix) = split_named(given, rest, "container", true)?;
                Ok(Location::Azure { container, prefix })
            }
            "swift" => {
                let (container, prefix) = split_named(given, rest, "container", true)?;
                Ok(Location::Swift { container, prefix })
            }
            "b2" => {
                let (bucket, prefix) = split_named(given, rest, "bucket", false)?;
                Ok(Location::B2 { bucket, prefix })
            }
            "sftp" => parse_sftp(given, rest),
            "rest" => {
                if !(rest.starts_with("http://") || rest.starts_with("https://")) {
                    return Err(bad(given, "rest: needs an http:// or https:// URL"));
                }
                Ok(Location::Rest { url: rest.to_string() })
            }
            "rclone" => {
                if rest.is_empty() {
                    return Err(bad(given, "rclone: needs remote:path"));
                }
                Ok(Location::Rclone { remote: rest.to_string() })
            }
            other if other.len() == 1 => Err(bad(given, "a drive letter: Windows paths are not supported")),
            other => Err(bad(given, format!("unknown backend `{other}`"))),
        }
    }
}

fn parse_s3(given: &str, rest: &str) -> Result<S3Location, LocationError> {
    let (scheme, rest) = if let Some(r) = rest.strip_prefix("https://") {
        ("https", r)
    } else if let Some(r) = rest.strip_prefix("http://") {
        ("http", r)
    } else if rest.contains("://") {
        return Err(bad(given, "s3: takes an http:// or https:// endpoint"));
    } else {
        ("https", rest)
    };
    let mut parts = rest.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    let bucket = parts.next().unwrap_or_default();
    let prefix = parts.next().unwrap_or_default().trim_matches('/');
    if host.is_empty() {
        return Err(bad(given, "the S3 endpoint host is empty"));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && port.parse::<u16>().is_err()
    {
        return Err(bad(given, format!("`{port}` is not a port number")));
    }
    if bucket.is_empty() {
        return Err(bad(given, "no bucket: write s3:host/bucket[/prefix]"));
    }
    // S3 bucket names: 3-63 characters of lowercase letters, digits, dots and hyphens.
    let valid = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if !valid {
        return Err(bad(given, format!("`{bucket}` is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")));
    }
    Ok(S3Location { scheme: scheme.into(), host: host.into(), bucket: bucket.into(), prefix: prefix.into() })
}

fn parse_sftp(given: &str, rest: &str) -> Result<Location, LocationError> {
    let split_user = |s: &str| match s.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h.to_string()),
        _ => (None, s.to_string()),
    };
    if let Some(url) = rest.strip_prefix("//") {
        // sftp://[user@]host[:port]//absolute/path or sftp://host/relative/path
        let (authority, path) = url.split_once('/').ok_or_else(|| bad(given, "sftp:// needs a path after the host"))?;
        let (user, hostport) = split_user(authority);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().map_err(|_| bad(given, format!("`{p}` is not a port")))?)),
            None => (hostport, None),
        };
        if host.is_empty() || path.is_empty() {
            return Err(bad(given, "sftp:// needs a host and a path"));
        }
        return Ok(Location::Sftp { user, host, port, path: path.to_string() });
    }
    let (authority, path) = rest.split_once(':').ok_or_else(|| bad(given, "expected sftp:[user@]host:/path"))?;
    let (user, host) = split_user(authority);
    if host.is_empty() || path.is_empty() {
        return Err(bad(given, "expected sftp:[user@]host:/path"));
    }
    Ok(Location::Sftp { user, host, port: None, path: path.to_string() })
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local(p) => write!(f, "local:{}", p.display()),
            Location::S3(s) if s.prefix.is_empty() => write!(f, "s3:{}/{}", s.endpoint(), s.bucket),
            Location::S3(s) => write!(f, "s3:{}/{}/{}", s.endpoint(), s.bucket, s.prefix),
            Location::Gcs { bucket, prefix } => write!(f, "gs:{bucket}:/{prefix}"),
            Location::Azure { container, prefix } => write!(f, "azure:{container}:/{prefix}"),
            Location::Swift { container, prefix } => write!(f, "swift:{container}:/{prefix}"),
            Location::B2 { bucket, prefix } => write!(f, "b2:{bucket}:{prefix}"),
            Location::Sftp { user, host, port, path } => {
                let user = user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
                match port {
                    Some(p) => write!(f, "sftp://{user}{host}:{p}/{path}"),
                    None => write!(f, "sftp:{user}{host}:{path}"),
                }
            }
            // Shown in messages and logs: a password in the URL is masked.
            Location::Rest { url } => write!(f, "rest:{}", redact_url(url)),
            Location::Rclone { remote } => write!(f, "rclone:{remote}"),
        }
    }
}

/// `given` as it may be shown in messages and logs (a REST URL's password masked).
pub fn shown(given: &str) -> String {
    match given.parse::<Location>() {
        Ok(loc) => loc.to_string(),
        Err(_) => given.to_string(),
    }
}

/// A URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(scheme: &str, host: &str, bucket: &str, prefix: &str) -> Location {
        Location::S3(S3Location {
            scheme: scheme.into(),
            host: host.into(),
            bucket: bucket.into(),
            prefix: prefix.into(),
        })
    }

    #[test]
    fn every_restic_form_parses() {
        let cases: Vec<(&str, Location)> = vec![
            ("/srv/restic-repo", Location::Local("/srv/restic-repo".into())),
            ("local:/srv/repo", Location::Local("/srv/repo".into())),
            ("relative/repo", Location::Local("relative/repo".into())),
            (
                "s3:https://s3.example.com:9000/bucket/some/prefix/",
                s3("https", "s3.example.com:9000", "bucket", "some/prefix"),
            ),
            ("s3:http://127.0.0.1:9000/restic", s3("http", "127.0.0.1:9000", "restic", "")),
            ("s3:s3.amazonaws.com/my-bucket", s3("https", "s3.amazonaws.com", "my-bucket", "")),
            (
                "s3:s3.us-west-2.amazonaws.com/bkt/akash/db",
                s3("https", "s3.us-west-2.amazonaws.com", "bkt", "akash/db"),
            ),
            ("s3:renterd.local:9880/backups", s3("https", "renterd.local:9880", "backups", "")),
            ("gs:my-bucket:/restic", Location::Gcs { bucket: "my-bucket".into(), prefix: "restic".into() }),
            ("gs:my-bucket:/", Location::Gcs { bucket: "my-bucket".into(), prefix: "".into() }),
            ("azure:backups:/akash/app", Location::Azure { container: "backups".into(), prefix: "akash/app".into() }),
            ("swift:cont:/path", Location::Swift { container: "cont".into(), prefix: "path".into() }),
            ("b2:bucketname:path/to/repo", Location::B2 { bucket: "bucketname".into(), prefix: "path/to/repo".into() }),
            ("b2:bucketname", Location::B2 { bucket: "bucketname".into(), prefix: "".into() }),
            (
                "sftp:user@host:/srv/restic-repo",
                Location::Sftp {
                    user: Some("user".into()),
                    host: "host".into(),
                    port: None,
                    path: "/srv/restic-repo".into(),
                },
            ),
            ("sftp:host:repo", Location::Sftp { user: None, host: "host".into(), port: None, path: "repo".into() }),
            (
                "sftp://user@[::1]:2222//srv/repo",
                Location::Sftp {
                    user: Some("user".into()),
                    host: "[::1]".into(),
                    port: Some(2222),
                    path: "/srv/repo".into(),
                },
            ),
            ("rest:http://127.0.0.1:8000/repo", Location::Rest { url: "http://127.0.0.1:8000/repo".into() }),
            ("rest:https://user:pass@host:8000/", Location::Rest { url: "https://user:pass@host:8000/".into() }),
            ("rclone:remote:path/to/repo", Location::Rclone { remote: "remote:path/to/repo".into() }),
        ];
        for (given, want) in cases {
            assert_eq!(given.parse::<Location>().as_ref(), Ok(&want), "{given}");
        }
    }

    #[test]
    fn bad_forms_say_what_is_wrong() {
        for (given, says) in [
            ("", "empty"),
            ("s3:", "host is empty"),
            ("s3:https://host", "no bucket"),
            ("s3:https://host:port/b", "not a port number"),
            ("s3:host/UPPER", "not a valid S3 bucket name"),
            ("s3:ftp://host/bucket", "http:// or https://"),
            ("gs:bucket", "bucket:/prefix"),
            ("gs::/x", "bucket name is empty"),
            ("azure:", "expected container"),
            ("sftp:hostonly", "sftp:[user@]host:/path"),
            ("rest:host:8000/x", "http:// or https://"),
            ("rclone:", "remote:path"),
            ("ftp:host/x", "unknown backend `ftp`"),
            ("C:\\repo", "Windows"),
        ] {
            let e = given.parse::<Location>().unwrap_err();
            let text = e.to_string();
            assert!(text.contains(says), "{given}: {text}");
            assert!(text.contains("Forms:"), "{given}: the error lists the forms");
        }
    }

    #[test]
    fn aws_endpoints_are_recognised() {
        let loc = |s: &str| match s.parse::<Location>().unwrap() {
            Location::S3(s) => s,
            other => panic!("{other:?}"),
        };
        assert!(loc("s3:s3.amazonaws.com/b12").is_aws());
        assert!(loc("s3:s3.eu-central-1.amazonaws.com/b12").is_aws());
        assert!(!loc("s3:http://127.0.0.1:9000/b12").is_aws());
        assert!(!loc("s3:https://gateway.storjshare.io/b12").is_aws());
        assert_eq!(loc("s3:http://127.0.0.1:9000/b12/p").endpoint(), "http://127.0.0.1:9000");
    }

    #[test]
    fn rest_passwords_are_not_shown() {
        assert_eq!(shown("rest:https://u:secret@h:8000/r"), "rest:https://u:***@h:8000/r");
        assert_eq!(shown("/srv/repo"), "local:/srv/repo");
        assert_eq!(redact_url("https://me:secret@host/r"), "https://me:***@host/r");
        assert_eq!(redact_url("https://host/r"), "https://host/r");
    }

    #[test]
    fn display_round_trips() {
        for given in
            ["local:/srv/r", "s3:http://127.0.0.1:9000/b12/p", "gs:b:/p", "b2:b:p", "rclone:r:p", "rest:http://h:1/r"]
        {
            let loc: Location = given.parse().unwrap();
            assert_eq!(loc.to_string().parse::<Location>().unwrap(), loc, "{given}");
        }
    }
}
