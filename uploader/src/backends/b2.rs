//! Backblaze B2 (`b2:bucket[:prefix]`) through OpenDAL, with restic's variables (`B2_ACCOUNT_ID`,
//! `B2_ACCOUNT_KEY`). OpenDAL needs the bucket *id*; restic users name the bucket, so it is looked
//! up once with `b2_authorize_account` + `b2_list_buckets`.
//!
//! No B2 server runs in the tests: this path is covered by its option map and the bucket lookup
//! only. B2 through its S3-compatible endpoint (`s3:https://s3.<region>.backblazeb2.com/bucket`,
//! the `generic` S3 provider, which sends no checksum headers B2 once refused) is the tested path.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustic_core::WriteBackend;
use serde::Deserialize;

use super::env::Env;
use super::failure::{BackendError, FailureKind};

const B2_API: &str = "https://api.backblazeb2.com";

/// What the B2 backend takes from the location and the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct B2Config {
    bucket: String,
    prefix: String,
    key_id: String,
    key: String,
}

impl B2Config {
    /// Reads the application key, naming the first variable missing.
    pub fn from_env(bucket: &str, prefix: &str, env: &Env) -> anyhow::Result<Self> {
        let key_id = env.one_of("b2", &["B2_ACCOUNT_ID"], "the application key id")?;
        let key = env.one_of("b2", &["B2_ACCOUNT_KEY"], "the application key")?;
        Ok(B2Config { bucket: bucket.to_string(), prefix: prefix.to_string(), key_id, key })
    }

    /// OpenDAL's `b2` options for the bucket with id `bucket_id` (secrets: never log them).
    pub fn options(&self, bucket_id: String) -> BTreeMap<String, String> {
        [
            ("bucket", self.bucket.clone()),
            ("bucket_id", bucket_id),
            ("root", format!("/{}", self.prefix)),
            ("application_key_id", self.key_id.clone()),
            ("application_key", self.key.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Opens `b2:bucket[:prefix]` (asks B2's API for the bucket id first).
pub fn open(bucket: &str, prefix: &str, env: &Env) -> anyhow::Result<Arc<dyn WriteBackend>> {
    let config = B2Config::from_env(bucket, prefix, env)?;
    let id = bucket_id(B2_API, &config)?;
    Ok(Arc::new(super::dal::open("b2", config.options(id), &format!("b2:{bucket}:{prefix}"), env)?))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Auth {
    account_id: String,
    authorization_token: String,
    api_url: String,
    #[serde(default)]
    allowed: Option<B2Allowed>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Allowed {
    bucket_id: Option<String>,
    bucket_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Buckets {
    buckets: Vec<B2Bucket>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Bucket {
    bucket_id: String,
    bucket_name: String,
}

/// The id of the bucket `config` names.
fn bucket_id(api: &str, config: &B2Config) -> anyhow::Result<String> {
    let bucket = config.bucket.as_str();
    let client = super::dal::login_client()?;
    let unreachable =
        |e: reqwest::Error| BackendError::msg(FailureKind::Unreachable, format!("B2: cannot reach {api} ({e})"));
    let resp = client
        .get(format!("{api}/b2api/v2/b2_authorize_account"))
        .basic_auth(&config.key_id, Some(&config.key))
        .send()
        .map_err(unreachable)?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(BackendError::msg(
            FailureKind::AccessRefused,
            "B2 refused the application key (B2_ACCOUNT_ID / B2_ACCOUNT_KEY): check both, and that the key is not deleted",
        )
        .into());
    }
    let auth: B2Auth =
        resp.error_for_status().map_err(|e| anyhow::anyhow!("B2: b2_authorize_account failed: {e}"))?.json()?;
    if let Some(B2Allowed { bucket_id: Some(id), bucket_name: Some(name) }) = &auth.allowed {
        if name == bucket {
            return Ok(id.clone());
        }
        return Err(BackendError::msg(
            FailureKind::AccessRefused,
            format!("B2: the application key is restricted to bucket `{name}`, not `{bucket}`"),
        )
        .into());
    }
    let resp = client
        .post(format!("{}/b2api/v2/b2_list_buckets", auth.api_url))
        .header("Authorization", &auth.authorization_token)
        .json(&serde_json::json!({ "accountId": auth.account_id, "bucketName": bucket }))
        .send()
        .map_err(unreachable)?;
    let list: B2Buckets =
        resp.error_for_status().map_err(|e| anyhow::anyhow!("B2: b2_list_buckets failed: {e}"))?.json()?;
    Ok(pick(&list, bucket)?)
}

fn pick(list: &B2Buckets, bucket: &str) -> Result<String, BackendError> {
    list.buckets.iter().find(|b| b.bucket_name == bucket).map(|b| b.bucket_id.clone()).ok_or_else(|| {
        BackendError::msg(
            FailureKind::Missing,
            format!("B2: no bucket named `{bucket}` in this account: create it (B2 web console or `b2 bucket create`)"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b2_bucket_is_picked_by_name() {
        let list: B2Buckets = serde_json::from_str(
            r#"{"buckets":[{"bucketId":"id1","bucketName":"one","bucketType":"allPrivate"},
                           {"bucketId":"id2","bucketName":"two"}]}"#,
        )
        .unwrap();
        assert_eq!(pick(&list, "two").unwrap(), "id2");
        let e = pick(&list, "three").unwrap_err();
        assert!(e.to_string().contains("no bucket named `three`"));
        assert_eq!(e.kind(), FailureKind::Missing);
    }

    #[test]
    fn missing_variables_name_themselves() {
        let env = Env::from_pairs([("B2_ACCOUNT_ID", "id"), ("B2_ACCOUNT_KEY", "")]);
        let e = B2Config::from_env("bucket", "", &env).err().unwrap();
        assert!(e.to_string().contains("B2_ACCOUNT_KEY"), "an empty variable counts as missing: {e}");
        let env = Env::from_pairs([("B2_ACCOUNT_ID", "id"), ("B2_ACCOUNT_KEY", "k")]);
        let o = B2Config::from_env("bucket", "p", &env).unwrap().options("bid".into());
        assert_eq!((o["bucket_id"].as_str(), o["root"].as_str(), o["application_key"].as_str()), ("bid", "/p", "k"));
    }

    #[test]
    fn a_refused_key_is_access_refused() {
        // A one-shot HTTP server answering 401, as B2 does for a deleted key.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
        });
        let config =
            B2Config::from_env("b", "", &Env::from_pairs([("B2_ACCOUNT_ID", "i"), ("B2_ACCOUNT_KEY", "k")])).unwrap();
        let e = bucket_id(&api, &config).unwrap_err();
        server.join().unwrap();
        let b = e.downcast_ref::<BackendError>().expect("a classified failure");
        assert_eq!(b.kind(), FailureKind::AccessRefused);
        assert!(b.to_string().contains("B2_ACCOUNT_ID / B2_ACCOUNT_KEY"), "{b}");
    }
}
