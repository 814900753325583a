//! S3 configuration apart from the requests: the options, the provider profiles (where S3
//! implementations differ), and building the SDK client from them and the location.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation};

use super::retry::Backoff;
use crate::backends::location::S3Location;

/// Which S3 implementation is behind the endpoint, where providers differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// Decide from the endpoint: AWS for `*.amazonaws.com`, otherwise generic.
    #[default]
    Auto,
    /// Amazon S3: virtual-host addressing, CRC32 checksums on every upload.
    Aws,
    /// Any other S3 server (MinIO, R2, B2, Ceph, …): path-style addressing, checksum headers only
    /// where the request requires them (restic's and minio-go's behaviour): several of these
    /// servers refuse `x-amz-checksum-*` headers or trailers.
    Generic,
    /// Sia renterd's S3 gateway or s3d: path-style, no checksum headers, no suffix ranges or
    /// presigned URLs (this backend uses neither), bucket created explicitly.
    Renterd,
}

/// Whether uploads carry CRC32 checksum headers (`x-amz-checksum-crc32`, often as an
/// `x-amz-trailer`). Integrity does not rest on them: rustic hashes every pack, index and snapshot
/// it reads back (`check --read-data`, restore), so what a server stored wrongly is found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Checksums {
    /// The provider decides: on every upload for AWS, only where required for the others.
    #[default]
    Auto,
    /// On every upload, for any provider; a server that refuses them switches the process to
    /// `when-required` (logged once) and the upload is retried.
    Always,
    /// Only where a request requires them.
    WhenRequired,
}

/// S3 settings beyond the location.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// Provider profile.
    pub provider: Provider,
    /// Region (default: the AWS chain's, else `us-east-1`).
    pub region: Option<String>,
    /// Path-style (`true`) or virtual-host (`false`) addressing; `None`: path-style for any
    /// endpoint but AWS.
    pub path_style: Option<bool>,
    /// Storage class for new objects (e.g. `STANDARD_IA`).
    pub storage_class: Option<String>,
    /// Pack uploads kept in flight at once.
    pub inflight: usize,
    /// Objects at least this large are uploaded with multipart.
    pub multipart_threshold: usize,
    /// Part size of multipart uploads.
    pub part_size: usize,
    /// Attempts per request (the first included).
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt (full jitter), capped at `max_backoff`.
    pub base_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// `create()` (called by `init`) creates a missing bucket instead of failing.
    pub create_bucket: bool,
    /// Checksum headers on uploads.
    pub checksums: Checksums,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            provider: Provider::Auto,
            region: None,
            path_style: None,
            storage_class: None,
            inflight: 4,
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            max_attempts: 8,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(20),
            create_bucket: false,
            checksums: Checksums::Auto,
        }
    }
}

impl S3Options {
    /// The retry policy these options set.
    pub fn backoff(&self) -> Backoff {
        Backoff { max_attempts: self.max_attempts.max(1), base: self.base_backoff, max: self.max_backoff }
    }

    /// The provider profile for `loc` (`Auto` decided).
    pub fn provider_for(&self, loc: &S3Location) -> Provider {
        match self.provider {
            Provider::Auto if loc.is_aws() => Provider::Aws,
            Provider::Auto => Provider::Generic,
            p => p,
        }
    }

    /// Whether uploads to `loc` start with checksum headers on every upload (`true`) or only
    /// where required.
    pub fn checksums_for(&self, loc: &S3Location) -> bool {
        match self.checksums {
            Checksums::Always => true,
            Checksums::WhenRequired => false,
            Checksums::Auto => self.provider_for(loc) == Provider::Aws,
        }
    }
}

/// `client` with checksum headers only where a request requires them (the fallback when a server
/// refuses them).
pub fn without_checksums(client: &Client) -> Client {
    let conf = client.config().to_builder().request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
    Client::from_conf(conf.build())
}

/// The SDK client for `loc`: credentials and region from the AWS chain (variables, profiles,
/// instance roles), the profile's addressing and checksums, no SDK retries (ours log them).
pub fn client(rt: &tokio::runtime::Runtime, loc: &S3Location, opts: &S3Options) -> Client {
    let provider = opts.provider_for(loc);
    let path_style = opts.path_style.unwrap_or(provider != Provider::Aws);
    // A regional AWS host names its region.
    let host_region = loc
        .host
        .strip_prefix("s3.")
        .and_then(|h| h.strip_suffix(".amazonaws.com"))
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = opts.region.clone().or(host_region) {
        loader = loader.region(Region::new(r));
    }
    let shared = rt.block_on(loader.load());
    let region = shared.region().cloned().unwrap_or_else(|| Region::new("us-east-1"));
    let mut conf = aws_sdk_s3::config::Builder::from(&shared)
        .region(region)
        .force_path_style(path_style)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(120))
                .build(),
        )
        .request_checksum_calculation(if opts.checksums_for(loc) {
            RequestChecksumCalculation::WhenSupported
        } else {
            RequestChecksumCalculation::WhenRequired
        });
    if !(provider == Provider::Aws && loc.host == "s3.amazonaws.com") {
        conf = conf.endpoint_url(loc.endpoint());
    }
    Client::from_conf(conf.build())
}
