//! What the OpenDAL backends (GCS, Azure, B2, SFTP, Swift) share: building one (the option map is
//! secret, so OpenDAL's configuration errors are shown with the secrets masked), and the HTTP
//! client of the logins shmback does in front of OpenDAL (B2's bucket look-up, Swift/Keystone).

use std::collections::BTreeMap;
use std::time::Duration;

use rustic_backend::OpenDALBackend;

use super::env::Env;
use super::failure::{BackendError, FailureKind};

/// The OpenDAL `service` with `options` (values may be secrets: never log the map).
pub fn open(
    service: &str,
    options: BTreeMap<String, String>,
    shown: &str,
    env: &Env,
) -> anyhow::Result<OpenDALBackend> {
    OpenDALBackend::new(service, options).map_err(|e| {
        let why = super::failure::without_empty_backtraces(&env.redact(&e.to_string()));
        BackendError::msg(FailureKind::Configuration, format!("configuring the {service} backend for {shown}: {why}"))
            .into()
    })
}

/// The HTTP client of the logins shmback does itself.
pub fn login_client() -> reqwest::Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()
}
