//! The environment the backends read their settings from (restic's variable names, and those of
//! Kubernetes backup operators): one type for every backend, so "empty means unset" and the
//! masking of secrets in messages are decided once.

use std::collections::BTreeMap;
use std::fmt;

/// Variables whose values are secrets: never shown in messages or logs.
const SECRETS: &[&str] = &[
    "RESTIC_REST_PASSWORD",
    "AZURE_ACCOUNT_KEY",
    "AZURE_ACCOUNT_SAS",
    "B2_ACCOUNT_KEY",
    "GOOGLE_ACCESS_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "OS_PASSWORD",
    "OS_AUTH_TOKEN",
    "OS_APPLICATION_CREDENTIAL_SECRET",
    "ST_KEY",
];

/// A snapshot of environment variables. A variable set to the empty string counts as unset (as
/// restic and Kubernetes manifests with optional secrets treat it). `Debug` shows names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// The process environment, read now (values that are not UTF-8 count as unset).
    pub fn process() -> Self {
        Self::from_pairs(std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))))
    }

    /// An environment of the given pairs (tests, and callers that configure a backend in code).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        let vars = pairs.into_iter().map(|(k, v)| (k.into(), v.into())).filter(|(_, v)| !v.is_empty()).collect();
        Env { vars }
    }

    /// The value of `key`, if set and not empty.
    pub fn get(&self, key: &str) -> Option<String> {
        self.vars.get(key).cloned()
    }

    /// The value of the first of `keys` that is set, or the error naming all of them.
    pub fn one_of(
        &self,
        backend: &'static str,
        keys: &[&'static str],
        hint: &'static str,
    ) -> Result<String, MissingVariable> {
        keys.iter().find_map(|k| self.get(k)).ok_or_else(|| MissingVariable::new(backend, keys.join(" or "), hint))
    }

    /// `text` with the value of every secret variable replaced by `***` (for messages that quote
    /// what a server or library said, which may echo a key or a SAS token).
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for value in SECRETS.iter().filter_map(|k| self.vars.get(*k)) {
            // Very short values would mask unrelated text; they are no secret worth the name anyway.
            if value.len() >= 4 {
                out = out.replace(value.as_str(), "***");
            }
        }
        out
    }
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

/// A variable a backend needs that is not set.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{backend} repositories need {need}: set it in the environment ({hint})")]
pub struct MissingVariable {
    /// The backend.
    pub backend: &'static str,
    /// The variable(s), e.g. `AZURE_ACCOUNT_KEY or AZURE_ACCOUNT_SAS`.
    pub need: String,
    /// Where the value comes from.
    pub hint: &'static str,
}

impl MissingVariable {
    /// `backend` needs `need` (one variable, or alternatives) for `hint`.
    pub fn new(backend: &'static str, need: impl Into<String>, hint: &'static str) -> Self {
        MissingVariable { backend, need: need.into(), hint }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_unset_and_secrets_are_masked() {
        let env =
            Env::from_pairs([("B2_ACCOUNT_ID", "id"), ("B2_ACCOUNT_KEY", ""), ("AZURE_ACCOUNT_KEY", "s3cr3t-key")]);
        assert_eq!(env.get("B2_ACCOUNT_ID").as_deref(), Some("id"));
        assert_eq!(env.get("B2_ACCOUNT_KEY"), None);
        let e = env.one_of("b2", &["B2_ACCOUNT_KEY"], "the application key").unwrap_err();
        assert_eq!(
            e.to_string(),
            "b2 repositories need B2_ACCOUNT_KEY: set it in the environment (the application key)"
        );
        assert_eq!(env.redact("403 for key=s3cr3t-key&x"), "403 for key=***&x");
        assert!(!format!("{env:?}").contains("s3cr3t"), "Debug shows names only");
    }
}
