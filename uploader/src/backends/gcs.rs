//! Google Cloud Storage (`gs:bucket:/prefix`) through OpenDAL. The service-account JSON may be
//! given as a path (restic) or as the JSON itself (as Kubernetes secrets often hand it over); an
//! OAuth access token works too. restic also reads GOOGLE_PROJECT_ID, which only creating a bucket
//! needs; shmback never creates one, so it is not read.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use rustic_core::WriteBackend;

use super::env::Env;
use super::failure::{BackendError, FailureKind};

/// How GCS requests are authorised.
#[derive(Clone, PartialEq, Eq)]
pub enum GcsCredential {
    /// `GOOGLE_ACCESS_TOKEN`: an OAuth access token.
    Token(String),
    /// `GOOGLE_APPLICATION_CREDENTIALS` holding the JSON itself.
    Json(String),
    /// `GOOGLE_APPLICATION_CREDENTIALS` naming a JSON file.
    Path(String),
}

/// What the GCS backend takes from the location and the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct GcsConfig {
    bucket: String,
    prefix: String,
    credential: GcsCredential,
}

impl GcsConfig {
    /// Reads the credential variables (an access token wins over a service account).
    pub fn from_env(bucket: &str, prefix: &str, env: &Env) -> anyhow::Result<Self> {
        let credential = match env.get("GOOGLE_ACCESS_TOKEN") {
            Some(token) => GcsCredential::Token(token),
            None => {
                let creds = env.one_of(
                    "gs",
                    &["GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_ACCESS_TOKEN"],
                    "a service-account JSON file path, or an OAuth access token",
                )?;
                if creds.trim_start().starts_with('{') {
                    GcsCredential::Json(creds.trim().to_string())
                } else {
                    std::fs::metadata(&creds).map_err(|e| {
                        BackendError::msg(
                            FailureKind::Configuration,
                            format!("GOOGLE_APPLICATION_CREDENTIALS names {creds}, which cannot be read ({e})"),
                        )
                    })?;
                    GcsCredential::Path(creds)
                }
            }
        };
        Ok(GcsConfig { bucket: bucket.to_string(), prefix: prefix.to_string(), credential })
    }

    /// OpenDAL's `gcs` options (secrets: never log them).
    pub fn options(&self) -> BTreeMap<String, String> {
        let (key, value) = match &self.credential {
            GcsCredential::Token(t) => ("token", t.clone()),
            GcsCredential::Json(j) => ("credential", base64::engine::general_purpose::STANDARD.encode(j)),
            GcsCredential::Path(p) => ("credential_path", p.clone()),
        };
        [("bucket", self.bucket.clone()), ("root", format!("/{}", self.prefix)), (key, value)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }
}

/// Opens `gs:bucket:/prefix`.
pub fn open(bucket: &str, prefix: &str, env: &Env) -> anyhow::Result<Arc<dyn WriteBackend>> {
    let config = GcsConfig::from_env(bucket, prefix, env)?;
    Ok(Arc::new(super::dal::open("gcs", config.options(), &format!("gs:{bucket}:/{prefix}"), env)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcs_options_from_path_or_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sa.json");
        std::fs::write(&path, "{}").unwrap();
        let p = path.to_str().unwrap();
        let env = Env::from_pairs([("GOOGLE_PROJECT_ID", "proj"), ("GOOGLE_APPLICATION_CREDENTIALS", p)]);
        let o = GcsConfig::from_env("bkt", "a/b", &env).unwrap().options();
        assert_eq!(o["bucket"], "bkt");
        assert_eq!(o["root"], "/a/b");
        assert_eq!(o["credential_path"], p);

        let env = Env::from_pairs([("GOOGLE_APPLICATION_CREDENTIALS", " {\"type\":\"service_account\"}\n")]);
        let o = GcsConfig::from_env("bkt", "a/b", &env).unwrap().options();
        assert_eq!(o["credential"], "eyJ0eXBlIjoic2VydmljZV9hY2NvdW50In0=");
        assert!(!o.contains_key("credential_path"));

        let env = Env::from_pairs([("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/sa.json")]);
        let err = GcsConfig::from_env("bkt", "a/b", &env).err().unwrap().to_string();
        assert!(err.contains("GOOGLE_APPLICATION_CREDENTIALS names /nonexistent/sa.json"), "{err}");
    }

    #[test]
    fn missing_credentials_name_themselves() {
        let e = GcsConfig::from_env("b", "p", &Env::from_pairs([("GOOGLE_PROJECT_ID", "p")])).err().unwrap();
        assert!(e.to_string().contains("GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_ACCESS_TOKEN"), "{e}");
        let o = GcsConfig::from_env("b", "p", &Env::from_pairs([("GOOGLE_ACCESS_TOKEN", "t")])).unwrap().options();
        assert_eq!(o["token"], "t");
    }
}
