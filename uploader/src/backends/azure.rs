//! Azure Blob Storage (`azure:container:/prefix`) through OpenDAL, with restic's variables
//! (`AZURE_ACCOUNT_NAME`, `AZURE_ACCOUNT_KEY` or `AZURE_ACCOUNT_SAS`, `AZURE_ENDPOINT_SUFFIX`);
//! `SHMBACK_AZURE_ENDPOINT` points it at an emulator such as Azurite.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustic_core::WriteBackend;

use super::env::Env;

/// The account's key or a SAS token.
#[derive(Clone, PartialEq, Eq)]
pub enum AzureCredential {
    /// `AZURE_ACCOUNT_KEY`.
    Key(String),
    /// `AZURE_ACCOUNT_SAS` (without a leading `?`).
    Sas(String),
}

/// What the Azure backend takes from the location and the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct AzureConfig {
    container: String,
    prefix: String,
    account: String,
    endpoint: String,
    credential: AzureCredential,
}

impl AzureConfig {
    /// Reads the account, its credential and the endpoint, naming the first variable missing.
    pub fn from_env(container: &str, prefix: &str, env: &Env) -> anyhow::Result<Self> {
        let account = env.one_of("azure", &["AZURE_ACCOUNT_NAME"], "the storage account")?;
        let credential = match env.get("AZURE_ACCOUNT_KEY") {
            Some(key) => AzureCredential::Key(key),
            None => {
                let sas =
                    env.one_of("azure", &["AZURE_ACCOUNT_KEY", "AZURE_ACCOUNT_SAS"], "the account key or a SAS token")?;
                AzureCredential::Sas(sas.trim_start_matches('?').to_string())
            }
        };
        let endpoint = env.get("SHMBACK_AZURE_ENDPOINT").unwrap_or_else(|| {
            let suffix = env.get("AZURE_ENDPOINT_SUFFIX").unwrap_or_else(|| "core.windows.net".into());
            format!("https://{account}.blob.{suffix}")
        });
        Ok(AzureConfig { container: container.to_string(), prefix: prefix.to_string(), account, endpoint, credential })
    }

    /// OpenDAL's `azblob` options (secrets: never log them).
    pub fn options(&self) -> BTreeMap<String, String> {
        let (key, value) = match &self.credential {
            AzureCredential::Key(k) => ("account_key", k.clone()),
            AzureCredential::Sas(s) => ("sas_token", s.clone()),
        };
        [
            ("endpoint", self.endpoint.clone()),
            ("container", self.container.clone()),
            ("root", format!("/{}", self.prefix)),
            ("account_name", self.account.clone()),
            (key, value),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// Opens `azure:container:/prefix`.
pub fn open(container: &str, prefix: &str, env: &Env) -> anyhow::Result<Arc<dyn WriteBackend>> {
    let config = AzureConfig::from_env(container, prefix, env)?;
    Ok(Arc::new(super::dal::open("azblob", config.options(), &format!("azure:{container}:/{prefix}"), env)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_options() {
        let env = Env::from_pairs([("AZURE_ACCOUNT_NAME", "acct"), ("AZURE_ACCOUNT_SAS", "?sv=2024&sig=x")]);
        let o = AzureConfig::from_env("backups", "akash/app", &env).unwrap().options();
        assert_eq!(o["endpoint"], "https://acct.blob.core.windows.net");
        assert_eq!(o["container"], "backups");
        assert_eq!(o["root"], "/akash/app");
        assert_eq!(o["sas_token"], "sv=2024&sig=x");
        let env = Env::from_pairs([
            ("AZURE_ACCOUNT_NAME", "acct"),
            ("AZURE_ACCOUNT_KEY", "k"),
            ("AZURE_ENDPOINT_SUFFIX", "core.chinacloudapi.cn"),
        ]);
        let o = AzureConfig::from_env("backups", "akash/app", &env).unwrap().options();
        assert_eq!(o["endpoint"], "https://acct.blob.core.chinacloudapi.cn");
        assert_eq!(o["account_key"], "k");
    }

    #[test]
    fn missing_variables_name_themselves() {
        let e = AzureConfig::from_env("c", "p", &Env::from_pairs([("AZURE_ACCOUNT_NAME", "acct")])).err().unwrap();
        assert!(e.to_string().contains("AZURE_ACCOUNT_KEY or AZURE_ACCOUNT_SAS"), "{e}");
        let e = AzureConfig::from_env("c", "p", &Env::from_pairs([("AZURE_ACCOUNT_KEY", "k")])).err().unwrap();
        assert!(e.to_string().contains("AZURE_ACCOUNT_NAME"), "{e}");
    }
}
