//! restic's REST server protocol (rustic_backend's client), with restic's variables:
//! `RESTIC_REST_USERNAME`/`RESTIC_REST_PASSWORD`, `RESTIC_CACERT`, `RESTIC_TLS_CLIENT_CERT`; and one
//! `HEAD config` first, so a refused login or an unreachable server is named at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustic_backend::RestBackend;
use rustic_core::WriteBackend;

use super::env::Env;
use super::failure::{BackendError, FailureKind};
use super::location::redact_url;

/// What the REST backend takes from the location and the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct RestConfig {
    /// The URL, with the user and password of the variables filled in (a secret: see [`Self::shown`]).
    pub url: String,
    /// rustic_backend's TLS options (`cacert`, `tls-client-cert`): file paths.
    pub options: BTreeMap<String, String>,
}

impl RestConfig {
    /// The URL with `RESTIC_REST_USERNAME`/`RESTIC_REST_PASSWORD` filled in when it has no user of
    /// its own (restic's behaviour), and the TLS variables.
    pub fn from_env(url: &str, env: &Env) -> anyhow::Result<Self> {
        let bad_url = || BackendError::msg(FailureKind::Configuration, format!("`{}` is not a URL", redact_url(url)));
        let mut parsed = reqwest::Url::parse(url).map_err(|_| bad_url())?;
        if parsed.username().is_empty()
            && let Some(user) = env.get("RESTIC_REST_USERNAME")
        {
            let bad = || {
                BackendError::msg(
                    FailureKind::Configuration,
                    format!("cannot put RESTIC_REST_USERNAME into the URL {}", redact_url(url)),
                )
            };
            parsed.set_username(&user).map_err(|()| bad())?;
            parsed.set_password(env.get("RESTIC_REST_PASSWORD").as_deref()).map_err(|()| bad())?;
        }
        let mut options = BTreeMap::new();
        for (var, option) in [("RESTIC_CACERT", "cacert"), ("RESTIC_TLS_CLIENT_CERT", "tls-client-cert")] {
            if let Some(v) = env.get(var) {
                options.insert(option.to_string(), v);
            }
        }
        Ok(RestConfig { url: parsed.to_string(), options })
    }

    /// The URL as messages show it (password masked).
    pub fn shown(&self) -> String {
        redact_url(&self.url)
    }
}

/// Opens the REST repository at `url`, after one request that names a refused login or an
/// unreachable server.
pub fn open(url: &str, env: &Env) -> anyhow::Result<Arc<dyn WriteBackend>> {
    let config = RestConfig::from_env(url, env)?;
    preflight(&config)?;
    let backend = RestBackend::new(&config.url, config.options.clone())
        .with_context(|| format!("REST server {}", config.shown()))?;
    Ok(Arc::new(backend))
}

/// One `HEAD config` with the TLS options the backend gets: rustic's client reads a refused
/// `HEAD` as "no repository here" and retries an unreachable server for half a minute.
fn preflight(config: &RestConfig) -> anyhow::Result<()> {
    let tls = |var: &str, path: &str, what: &str| {
        BackendError::msg(FailureKind::Configuration, format!("{var}: {path} {what}"))
    };
    let mut client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
    if let Some(path) = config.options.get("cacert") {
        let pem = std::fs::read(path).map_err(|e| tls("RESTIC_CACERT", path, &format!("cannot be read ({e})")))?;
        let cert =
            reqwest::Certificate::from_pem(&pem).map_err(|_| tls("RESTIC_CACERT", path, "is not a PEM certificate"))?;
        client = client.add_root_certificate(cert);
    }
    if let Some(path) = config.options.get("tls-client-cert") {
        let var = "RESTIC_TLS_CLIENT_CERT";
        let pem = std::fs::read(path).map_err(|e| tls(var, path, &format!("cannot be read ({e})")))?;
        let id = reqwest::Identity::from_pem(&pem).map_err(|_| tls(var, path, "is not a PEM key and certificate"))?;
        client = client.identity(id);
    }
    let target = format!("{}/config", config.url.trim_end_matches('/'));
    let shown = config.shown();
    let resp = client.build()?.head(&target).send().map_err(|e| request_failure(&shown, &e))?;
    match resp.status().as_u16() {
        code @ (401 | 403) => Err(BackendError::msg(
            FailureKind::AccessRefused,
            format!(
                "REST server {shown} refused the credentials (HTTP {code}): check RESTIC_REST_USERNAME / \
                 RESTIC_REST_PASSWORD, or the user:password in the URL"
            ),
        )
        .into()),
        _ => Ok(()),
    }
}

/// A request that got no answer, classified: TLS, or no connection.
fn request_failure(shown: &str, e: &reqwest::Error) -> BackendError {
    let text = super::failure::error_chain(e);
    let lower = text.to_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        return BackendError::msg(
            FailureKind::Tls,
            format!(
                "TLS with the REST server {shown} failed ({text}); for a server without TLS write rest:http://…, \
                 for a private CA set RESTIC_CACERT"
            ),
        );
    }
    let why = if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    // No answer came back, whatever the reason: the endpoint is out of reach.
    BackendError::msg(
        FailureKind::Unreachable,
        format!("REST server {shown}: {why} ({text}); is the server running and the URL right?"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_url_takes_restic_user_and_password() {
        let env = Env::from_pairs([("RESTIC_REST_USERNAME", "backup"), ("RESTIC_REST_PASSWORD", "p@ss:w/rd")]);
        let c = RestConfig::from_env("http://127.0.0.1:8000/repo", &env).unwrap();
        assert_eq!(c.url, "http://backup:p%40ss%3Aw%2Frd@127.0.0.1:8000/repo");
        assert_eq!(c.shown(), "http://backup:***@127.0.0.1:8000/repo");
        // A user in the URL wins.
        assert_eq!(RestConfig::from_env("https://me:x@host/r", &env).unwrap().url, "https://me:x@host/r");
        let env = Env::from_pairs([("RESTIC_CACERT", "/ca.pem")]);
        assert_eq!(RestConfig::from_env("https://host/r", &env).unwrap().options["cacert"], "/ca.pem");
    }
}
