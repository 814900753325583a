//! SFTP (`sftp:[user@]host:/path`, `sftp://[user@]host[:port]//path`) through OpenDAL, with key
//! authentication: `SHMBACK_SFTP_KEY` (the private key's path) and `SHMBACK_SFTP_KNOWN_HOSTS`
//! (strict, add or accept).

use std::collections::BTreeMap;
use std::sync::Arc;

use rustic_core::WriteBackend;

use super::env::Env;
use super::failure::{BackendError, FailureKind};

/// Where and how to log in, from the location and the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct SftpConfig {
    user: Option<String>,
    host: String,
    port: u16,
    path: String,
    key: Option<String>,
    known_hosts: String,
}

impl SftpConfig {
    /// Checks the path (absolute) and the variables.
    pub fn from_env(user: Option<&str>, host: &str, port: Option<u16>, path: &str, env: &Env) -> anyhow::Result<Self> {
        let user_part = user.map(|u| format!("{u}@")).unwrap_or_default();
        let config = |why: String| BackendError::msg(FailureKind::Configuration, why);
        if !path.starts_with('/') {
            return Err(config(format!(
                "sftp:{user_part}{host}:{path}: the SFTP path `{path}` is relative; give it from the root (e.g. \
                 sftp:{user_part}{host}:/home/<user>/{path}) — shmback's SFTP client does not resolve paths against \
                 the login's home as restic's does"
            ))
            .into());
        }
        let known_hosts = env.get("SHMBACK_SFTP_KNOWN_HOSTS").unwrap_or_else(|| "strict".into());
        if !["strict", "add", "accept"].contains(&known_hosts.as_str()) {
            return Err(config(format!(
                "SHMBACK_SFTP_KNOWN_HOSTS is `{known_hosts}`: use strict (default), add or accept"
            ))
            .into());
        }
        Ok(SftpConfig {
            user: user.map(str::to_string),
            host: host.to_string(),
            port: port.unwrap_or(22),
            path: path.to_string(),
            key: env.get("SHMBACK_SFTP_KEY"),
            known_hosts,
        })
    }

    /// OpenDAL's `sftp` options.
    pub fn options(&self) -> BTreeMap<String, String> {
        let user_part = self.user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        let mut o = BTreeMap::from([
            ("endpoint".to_string(), format!("ssh://{user_part}{}:{}", self.host, self.port)),
            ("root".to_string(), self.path.clone()),
            ("known_hosts_strategy".to_string(), self.known_hosts.clone()),
        ]);
        o.extend(self.user.clone().map(|u| ("user".to_string(), u)));
        o.extend(self.key.clone().map(|k| ("key".to_string(), k)));
        o
    }
}

/// Opens an SFTP location.
pub fn open(
    user: Option<&str>,
    host: &str,
    port: Option<u16>,
    path: &str,
    env: &Env,
) -> anyhow::Result<Arc<dyn WriteBackend>> {
    let config = SftpConfig::from_env(user, host, port, path, env)?;
    let shown = format!("sftp://{}{host}:{}/{path}", user.map(|u| format!("{u}@")).unwrap_or_default(), config.port);
    Ok(Arc::new(super::dal::open("sftp", config.options(), &shown, env)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sftp_options_and_relative_paths() {
        let env = Env::default();
        let o = SftpConfig::from_env(Some("bk"), "host", Some(2222), "/srv/repo", &env).unwrap().options();
        assert_eq!(o["endpoint"], "ssh://bk@host:2222");
        assert_eq!(o["root"], "/srv/repo");
        assert_eq!(o["user"], "bk");
        assert_eq!(o["known_hosts_strategy"], "strict");
        let err = SftpConfig::from_env(Some("bk"), "host", None, "repo", &env).err().unwrap().to_string();
        assert!(err.contains("relative") && err.contains("sftp:bk@host:/home/<user>/repo"), "{err}");
        let env = Env::from_pairs([("SHMBACK_SFTP_KNOWN_HOSTS", "yes")]);
        let err = SftpConfig::from_env(None, "host", None, "/r", &env).err().unwrap().to_string();
        assert!(err.contains("strict (default), add or accept"), "{err}");
    }
}
