//! Why an S3 request failed: the error a user sees (with the fix where there is one), and the
//! classification of the SDK's errors into those and into "worth another attempt".

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use rustic_core::{ErrorKind, RusticError};

use crate::backends::failure::{BackendError, FailureKind};

/// Why an S3 request failed.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// 403 on credentials.
    #[error(
        "the S3 endpoint {endpoint} refused the credentials ({code}): check AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that the key may use bucket `{bucket}`"
    )]
    Credentials {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
        /// S3 error code (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied, …).
        code: String,
    },
    /// The bucket does not exist.
    #[error(
        "bucket `{bucket}` does not exist at {endpoint}: create it with the provider's tools, or run \
         `shmback init --create-bucket` where the provider allows creating buckets"
    )]
    NoSuchBucket {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
    },
    /// No connection.
    #[error("cannot reach the S3 endpoint {endpoint}: {cause}; check the address, the port and the network")]
    Unreachable {
        /// Endpoint.
        endpoint: String,
        /// What the connector said.
        cause: String,
    },
    /// TLS failed.
    #[error(
        "TLS with the S3 endpoint {endpoint} failed: {cause}; for a server without TLS write \
         s3:http://…, for a private CA add it to the system's trust store"
    )]
    Tls {
        /// Endpoint.
        endpoint: String,
        /// What the TLS layer said.
        cause: String,
    },
    /// 404 on an object.
    #[error("S3 object `{key}` not found")]
    NotFound {
        /// Key.
        key: String,
    },
    /// The server refused an upload for its checksum headers (`x-amz-checksum-*`, `x-amz-trailer`):
    /// the backend falls back to sending them only where required, and turns a refusal it cannot
    /// cure that way into [`S3Error::Other`].
    #[error("the S3 endpoint {endpoint} refused {op} `{key}` for its checksum headers ({cause})")]
    ChecksumRefused {
        /// Endpoint.
        endpoint: String,
        /// Operation.
        op: &'static str,
        /// Key.
        key: String,
        /// Status, code, message.
        cause: String,
    },
    /// Anything else.
    #[error("S3 {op} `{key}` failed: {cause}")]
    Other {
        /// Operation.
        op: &'static str,
        /// Key.
        key: String,
        /// Status, code, message.
        cause: String,
    },
}

impl S3Error {
    /// The backend-neutral kind of this error, if it is one a user acts on.
    pub fn kind(&self) -> Option<FailureKind> {
        match self {
            S3Error::Credentials { .. } => Some(FailureKind::AccessRefused),
            S3Error::NoSuchBucket { .. } => Some(FailureKind::Missing),
            S3Error::Unreachable { .. } => Some(FailureKind::Unreachable),
            S3Error::Tls { .. } => Some(FailureKind::Tls),
            S3Error::NotFound { .. } | S3Error::ChecksumRefused { .. } | S3Error::Other { .. } => None,
        }
    }

    /// The failure class, as the metrics label it (`shmback_backend_retries_total{class}`,
    /// `shmback_backend_errors_total{class}`): a [`FailureKind`]'s label, else `not_found`,
    /// `checksum_refused` or `other` (5xx, throttling, a connection dropped mid-request).
    pub fn class(&self) -> &'static str {
        match self {
            S3Error::NotFound { .. } => "not_found",
            S3Error::ChecksumRefused { .. } => "checksum_refused",
            S3Error::Other { .. } => "other",
            _ => self.kind().map_or("other", FailureKind::label),
        }
    }

    /// The process exit status for this error (README, "Exit status").
    pub fn exit_code(&self) -> u8 {
        self.kind().map_or(1, FailureKind::exit_code)
    }
}

/// A failed attempt: the error, and whether another attempt may succeed.
pub struct Failure {
    /// The error.
    pub error: S3Error,
    /// Whether retrying may help.
    pub retry: bool,
}

/// Where requests go, for the messages.
pub struct Target<'a> {
    /// The endpoint URL.
    pub endpoint: &'a str,
    /// The bucket.
    pub bucket: &'a str,
}

/// Classifies an SDK error of request `op` on `key`.
pub fn classify<E>(target: &Target<'_>, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let endpoint = target.endpoint.to_string();
    let code = e.code().unwrap_or_default().to_string();
    let text = DisplayErrorContext(&e).to_string();
    let other = |cause: String| S3Error::Other { op, key: key.to_string(), cause };
    let (error, retry) = match &e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let msg = e.message().unwrap_or_default();
            let cause = format!("HTTP {status} {code} {msg}").trim().to_string();
            match (status, code.as_str()) {
                _ if refuses_checksums(op, status, &code, msg) => {
                    (S3Error::ChecksumRefused { endpoint, op, key: key.to_string(), cause }, false)
                }
                (404, "NoSuchBucket") => (S3Error::NoSuchBucket { endpoint, bucket: target.bucket.to_string() }, false),
                (404, _) => (S3Error::NotFound { key: key.to_string() }, false),
                (401 | 403, _) => {
                    let code = if code.is_empty() { format!("HTTP {status}") } else { code.clone() };
                    (S3Error::Credentials { endpoint, bucket: target.bucket.to_string(), code }, false)
                }
                (429 | 500..=599, _) | (_, "SlowDown" | "RequestTimeout" | "InternalError") => (other(cause), true),
                _ => (other(cause), false),
            }
        }
        SdkError::DispatchFailure(d) => {
            let lower = text.to_lowercase();
            if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
                (S3Error::Tls { endpoint, cause: text }, false)
            } else if d.is_io() || d.is_timeout() || d.is_other() {
                (S3Error::Unreachable { endpoint, cause: text }, true)
            } else {
                (other(text), false)
            }
        }
        SdkError::TimeoutError(_) => (S3Error::Unreachable { endpoint, cause: format!("timed out: {text}") }, true),
        // The connection dropped mid-response, or the response was cut or garbled.
        SdkError::ResponseError(_) => (other(text), true),
        _ => (other(text), false),
    };
    Failure { error, retry }
}

/// Whether an answer to write request `op` refuses it for its checksum headers. What servers say:
/// B2 `400 InvalidArgument "Unsupported header 'x-amz-checksum-crc32'"`, MinIO and gateways without
/// trailer support `501 NotImplemented` ("a header you provided implies functionality that is not
/// implemented"), R2 `400 InvalidRequest` naming the checksum next to Content-MD5.
pub fn refuses_checksums(op: &str, status: u16, code: &str, message: &str) -> bool {
    let write = matches!(op, "put" | "upload part" | "create multipart upload" | "complete multipart upload");
    let lower = message.to_lowercase();
    let names_checksums = ["x-amz-checksum", "x-amz-trailer", "trailer", "checksum"].iter().any(|s| lower.contains(s))
        || lower.contains("unsupported header");
    write
        && match (status, code) {
            (501, _) | (_, "NotImplemented") => true,
            (400, "InvalidArgument" | "InvalidRequest" | "BadRequest" | "") => names_checksums,
            _ => false,
        }
}

/// Wraps an S3 error for rustic_core, as a [`BackendError`] when it has a kind (the binary finds
/// it in the error chain for its message and exit status).
pub fn rustic_err(e: S3Error) -> Box<RusticError> {
    let kind = match e {
        S3Error::Credentials { .. } => ErrorKind::Credentials,
        S3Error::NoSuchBucket { .. } => ErrorKind::Configuration,
        _ => ErrorKind::Backend,
    };
    match e.kind() {
        Some(k) => RusticError::with_source(kind, "S3 backend", BackendError::new(k, e)),
        None => RusticError::with_source(kind, "S3 backend", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_refusals_are_recognised_and_nothing_else() {
        let b2 = "Unsupported header 'x-amz-checksum-crc32' received for this API call.";
        assert!(refuses_checksums("put", 400, "InvalidArgument", b2));
        assert!(refuses_checksums("upload part", 400, "InvalidArgument", "Unsupported header 'x-amz-trailer'"));
        let minio = "A header you provided implies functionality that is not implemented";
        assert!(refuses_checksums("put", 501, "NotImplemented", minio));
        let r2 = "You can only specify one non-default checksum at a time (Content-MD5 and CRC32).";
        assert!(refuses_checksums("put", 400, "InvalidRequest", r2));
        // Not about checksums, or not a write.
        assert!(!refuses_checksums("put", 400, "InvalidArgument", "Invalid storage class"));
        assert!(!refuses_checksums("put", 400, "EntityTooLarge", "checksum"));
        assert!(!refuses_checksums("get", 501, "NotImplemented", minio));
        assert!(!refuses_checksums("put", 403, "AccessDenied", b2));
    }
}
