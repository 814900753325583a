//! OpenStack Swift (`swift:container:/prefix`) through OpenDAL. OpenDAL takes a storage URL and a
//! token only: the login is done here ([`auth`]), and the backend logs in again before the token
//! expires (a daemon outlives any token).

pub mod auth;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustic_backend::OpenDALBackend;
use rustic_core::{BytesList, FileType, Id, ReadBackend, RusticResult, WriteBackend};

use self::auth::SwiftAuth;
use super::env::Env;

/// Renew this long before the token's end (and at least this often when the end is unknown for
/// a token we fetched).
const RENEW_MARGIN: Duration = Duration::from_secs(300);
const RENEW_UNKNOWN: Duration = Duration::from_secs(50 * 60);

/// Opens `swift:container:/prefix` (logs in once now).
pub fn open(container: &str, prefix: &str, env: &Env) -> anyhow::Result<Arc<dyn WriteBackend>> {
    Ok(Arc::new(SwiftBackend::new(container, prefix, env)?))
}

/// Swift through OpenDAL, re-authenticating before the token runs out.
pub struct SwiftBackend {
    auth: SwiftAuth,
    container: String,
    prefix: String,
    env: Env,
    current: RwLock<(Arc<OpenDALBackend>, Option<Instant>)>,
}

impl SwiftBackend {
    fn new(container: &str, prefix: &str, env: &Env) -> anyhow::Result<Self> {
        let auth = SwiftAuth::from_env(env)?;
        let (container, prefix, env) = (container.to_string(), prefix.to_string(), env.clone());
        let current = RwLock::new(session(&auth, &container, &prefix, &env)?);
        Ok(Self { auth, container, prefix, env, current })
    }

    /// The current OpenDAL backend, after a new login if the token is due for renewal (one
    /// thread logs in; the others wait for its token).
    fn backend(&self) -> RusticResult<Arc<OpenDALBackend>> {
        let due = |renew_at: Option<Instant>| renew_at.is_some_and(|t| Instant::now() >= t);
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if !due(current.1) {
                return Ok(current.0.clone());
            }
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if due(current.1) {
            *current = session(&self.auth, &self.container, &self.prefix, &self.env).map_err(|e| {
                rustic_core::RusticError::new(rustic_core::ErrorKind::Backend, "renewing the Swift token failed: {why}")
                    .attach_context("why", format!("{e:#}"))
            })?;
            tracing::info!("Swift token renewed (the previous one expires within 5 minutes)");
        }
        Ok(current.0.clone())
    }
}

/// Logs in and builds the OpenDAL backend for the session; `Some(when)` to renew.
fn session(
    auth: &SwiftAuth,
    container: &str,
    prefix: &str,
    env: &Env,
) -> anyhow::Result<(Arc<OpenDALBackend>, Option<Instant>)> {
    let s = auth.login()?;
    let options = BTreeMap::from(
        [
            ("endpoint", s.storage_url.clone()),
            ("container", container.to_string()),
            ("root", format!("/{prefix}")),
            ("token", s.token.clone()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let backend = Arc::new(super::dal::open("swift", options, &format!("swift:{container}:/{prefix}"), env)?);
    let renew_at = match (auth, s.valid_for) {
        (SwiftAuth::Static { .. }, _) => None,
        (_, Some(d)) => Some(Instant::now() + d.saturating_sub(RENEW_MARGIN).min(RENEW_UNKNOWN * 24)),
        (_, None) => Some(Instant::now() + RENEW_UNKNOWN),
    };
    tracing::debug!(storage_url = %s.storage_url, "Swift token obtained");
    Ok((backend, renew_at))
}

impl ReadBackend for SwiftBackend {
    fn location(&self) -> String {
        format!("swift:{}:/{}", self.container, self.prefix)
    }
    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        self.backend()?.list_with_size(tpe)
    }
    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        self.backend()?.read_full(tpe, id)
    }
    fn read_partial(&self, tpe: FileType, id: &Id, cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        self.backend()?.read_partial(tpe, id, cacheable, offset, length)
    }
    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone();
        current.warmup_path(tpe, id)
    }
}

impl WriteBackend for SwiftBackend {
    fn create(&self) -> RusticResult<()> {
        self.backend()?.create()
    }
    fn write_bytes(&self, tpe: FileType, id: &Id, cacheable: bool, buf: BytesList) -> RusticResult<()> {
        self.backend()?.write_bytes(tpe, id, cacheable, buf)
    }
    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.backend()?.remove(tpe, id, cacheable)
    }
}
