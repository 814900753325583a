//! Swift authentication, from restic's variables in restic's order: a pre-authenticated storage
//! URL and token (`OS_STORAGE_URL`/`OS_AUTH_TOKEN`), v1 (`ST_AUTH`/`ST_USER`/`ST_KEY`), Keystone v2
//! or v3 (`OS_*`, password or application credential). One function reads and checks them.

use std::time::Duration;

use anyhow::Context as _;

use crate::backends::env::{Env, MissingVariable};
use crate::backends::failure::{BackendError, FailureKind};

/// A Swift storage URL and token, and how long the token lasts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwiftSession {
    /// The account's storage URL (`…/v1/AUTH_<project>`).
    pub storage_url: String,
    /// `X-Auth-Token`.
    pub token: String,
    /// How long the token is valid for, if the server said; `None` for a token given by the user.
    pub valid_for: Option<Duration>,
}

/// How to get a Swift token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwiftAuth {
    /// `OS_STORAGE_URL` + `OS_AUTH_TOKEN`: used as given, never renewed.
    Static {
        /// Storage URL.
        storage_url: String,
        /// Token.
        token: String,
    },
    /// `ST_AUTH` + `ST_USER` + `ST_KEY`.
    V1 {
        /// `ST_AUTH`.
        url: String,
        /// `ST_USER`.
        user: String,
        /// `ST_KEY`.
        key: String,
    },
    /// Keystone v2 (`OS_AUTH_URL` ending in /v2.0, or `OS_IDENTITY_API_VERSION=2`).
    V2 {
        /// The tokens URL.
        url: String,
        /// The request body.
        body: serde_json::Value,
        /// `OS_REGION_NAME`.
        region: Option<String>,
        /// `OS_INTERFACE` (public, internal, admin).
        interface: String,
    },
    /// Keystone v3.
    V3 {
        /// The tokens URL.
        url: String,
        /// The request body.
        body: serde_json::Value,
        /// `OS_REGION_NAME`.
        region: Option<String>,
        /// `OS_INTERFACE`.
        interface: String,
    },
}

impl SwiftAuth {
    /// Reads restic's Swift variables, naming what is missing.
    pub fn from_env(env: &Env) -> Result<Self, MissingVariable> {
        let miss = |need: &str, hint| MissingVariable::new("swift", need, hint);
        if let (Some(storage_url), Some(token)) = (env.get("OS_STORAGE_URL"), env.get("OS_AUTH_TOKEN")) {
            return Ok(SwiftAuth::Static { storage_url, token });
        }
        if let Some(url) = env.get("ST_AUTH") {
            return match (env.get("ST_USER"), env.get("ST_KEY")) {
                (Some(user), Some(key)) => Ok(SwiftAuth::V1 { url, user, key }),
                _ => Err(miss("ST_USER and ST_KEY (with ST_AUTH)", "v1 authentication")),
            };
        }
        let url = env.get("OS_AUTH_URL").ok_or_else(|| {
            miss(
                "OS_AUTH_URL (Keystone), ST_AUTH/ST_USER/ST_KEY (v1) or OS_STORAGE_URL/OS_AUTH_TOKEN",
                "the OpenStack credentials of the container's project",
            )
        })?;
        let url = url.trim_end_matches('/').to_string();
        let region = env.get("OS_REGION_NAME");
        let interface = env.get("OS_INTERFACE").unwrap_or_else(|| "public".into()).trim_end_matches("URL").to_string();
        let v2 = url.ends_with("/v2.0") || env.get("OS_IDENTITY_API_VERSION").is_some_and(|v| v.starts_with('2'));
        let v3_url = if url.ends_with("/v3") { format!("{url}/auth/tokens") } else { format!("{url}/v3/auth/tokens") };
        // Application credentials (v3) carry their own user and scope.
        if !v2
            && let (Some(id), Some(secret)) =
                (env.get("OS_APPLICATION_CREDENTIAL_ID"), env.get("OS_APPLICATION_CREDENTIAL_SECRET"))
        {
            let body = serde_json::json!({ "auth": { "identity": {
                "methods": ["application_credential"],
                "application_credential": { "id": id, "secret": secret },
            }}});
            return Ok(SwiftAuth::V3 { url: v3_url, body, region, interface });
        }
        let user_keys: &[&'static str] = if v2 { &["OS_USERNAME"] } else { &["OS_USERNAME", "OS_USER_ID"] };
        env.one_of("swift", user_keys, "the Keystone user")?;
        let password = env.one_of("swift", &["OS_PASSWORD"], "the Keystone password")?;
        if v2 {
            let mut auth = serde_json::json!({ "passwordCredentials": {
                "username": env.get("OS_USERNAME"),
                "password": password,
            }});
            if let Some(t) = env.get("OS_TENANT_NAME").or_else(|| env.get("OS_PROJECT_NAME")) {
                auth["tenantName"] = t.into();
            } else if let Some(t) = env.get("OS_TENANT_ID").or_else(|| env.get("OS_PROJECT_ID")) {
                auth["tenantId"] = t.into();
            }
            let body = serde_json::json!({ "auth": auth });
            return Ok(SwiftAuth::V2 { url: format!("{url}/tokens"), body, region, interface });
        }
        let mut user = serde_json::json!({ "password": password });
        if let Some(id) = env.get("OS_USER_ID") {
            user["id"] = id.into();
        } else {
            user["name"] = env.get("OS_USERNAME").into();
            user["domain"] = domain(env.get("OS_USER_DOMAIN_ID"), env.get("OS_USER_DOMAIN_NAME"));
        }
        let identity = serde_json::json!({ "methods": ["password"], "password": { "user": user } });
        let mut auth = serde_json::json!({ "identity": identity });
        if let Some(id) = env.get("OS_PROJECT_ID").or_else(|| env.get("OS_TENANT_ID")) {
            auth["scope"] = serde_json::json!({ "project": { "id": id } });
        } else if let Some(name) = env.get("OS_PROJECT_NAME").or_else(|| env.get("OS_TENANT_NAME")) {
            let d = domain(env.get("OS_PROJECT_DOMAIN_ID"), env.get("OS_PROJECT_DOMAIN_NAME"));
            auth["scope"] = serde_json::json!({ "project": { "name": name, "domain": d } });
        }
        Ok(SwiftAuth::V3 { url: v3_url, body: serde_json::json!({ "auth": auth }), region, interface })
    }

    /// Authenticates (no network for [`SwiftAuth::Static`]).
    pub fn login(&self) -> anyhow::Result<SwiftSession> {
        let client = crate::backends::dal::login_client;
        let unreachable = |what: &str, url: &str, e: reqwest::Error| {
            BackendError::msg(FailureKind::Unreachable, format!("{what}: cannot reach {url} ({e})"))
        };
        match self {
            SwiftAuth::Static { storage_url, token } => {
                Ok(SwiftSession { storage_url: storage_url.clone(), token: token.clone(), valid_for: None })
            }
            SwiftAuth::V1 { url, user, key } => {
                let resp = client()?
                    .get(url)
                    .header("X-Auth-User", user)
                    .header("X-Auth-Key", key)
                    .send()
                    .map_err(|e| unreachable("Swift v1 authentication (ST_AUTH)", url, e))?;
                let resp = auth_status(resp, "ST_USER / ST_KEY")?;
                let h = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                Ok(SwiftSession {
                    storage_url: h("x-storage-url").context("Swift v1: no X-Storage-Url in the answer")?,
                    token: h("x-auth-token").context("Swift v1: no X-Auth-Token in the answer")?,
                    valid_for: h("x-auth-token-expires").and_then(|s| s.parse().ok()).map(Duration::from_secs),
                })
            }
            SwiftAuth::V2 { url, body, region, interface } => {
                let resp = client()?
                    .post(url)
                    .json(body)
                    .send()
                    .map_err(|e| unreachable("Keystone v2 (OS_AUTH_URL)", url, e))?;
                let answer: serde_json::Value =
                    auth_status(resp, "OS_USERNAME / OS_PASSWORD / OS_TENANT_NAME")?.json()?;
                keystone_v2_session(&answer, region.as_deref(), interface)
            }
            SwiftAuth::V3 { url, body, region, interface } => {
                let resp = client()?
                    .post(url)
                    .json(body)
                    .send()
                    .map_err(|e| unreachable("Keystone v3 (OS_AUTH_URL)", url, e))?;
                let resp = auth_status(resp, "the OS_* credentials")?;
                let token = resp
                    .headers()
                    .get("x-subject-token")
                    .and_then(|v| v.to_str().ok())
                    .context("Keystone v3: no X-Subject-Token in the answer")?
                    .to_string();
                let answer: serde_json::Value = resp.json()?;
                keystone_v3_session(token, &answer, region.as_deref(), interface)
            }
        }
    }
}

fn domain(id: Option<String>, name: Option<String>) -> serde_json::Value {
    match (id, name) {
        (Some(id), _) => serde_json::json!({ "id": id }),
        (None, Some(name)) => serde_json::json!({ "name": name }),
        (None, None) => serde_json::json!({ "id": "default" }),
    }
}

fn auth_status(resp: reqwest::blocking::Response, what: &str) -> anyhow::Result<reqwest::blocking::Response> {
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(BackendError::msg(
            FailureKind::AccessRefused,
            format!("Swift authentication refused ({status}): check {what}"),
        )
        .into());
    }
    resp.error_for_status().context("Swift authentication failed")
}

fn pick_endpoint<'a>(
    endpoints: impl Iterator<Item = &'a serde_json::Value>,
    region: Option<&str>,
    url_of: impl Fn(&'a serde_json::Value) -> Option<&'a str>,
) -> Option<String> {
    endpoints
        .filter(|e| region.is_none_or(|r| e["region"].as_str() == Some(r) || e["region_id"].as_str() == Some(r)))
        .find_map(url_of)
        .map(str::to_string)
}

fn object_store(catalog: &serde_json::Value) -> anyhow::Result<&serde_json::Value> {
    catalog
        .as_array()
        .and_then(|c| c.iter().find(|s| s["type"] == "object-store"))
        .context("Keystone: the service catalog has no object-store (Swift) service for this project")
}

/// A Keystone v2 token answer → session.
pub fn keystone_v2_session(
    answer: &serde_json::Value,
    region: Option<&str>,
    interface: &str,
) -> anyhow::Result<SwiftSession> {
    let access = &answer["access"];
    let token = access["token"]["id"].as_str().context("Keystone v2: no access.token.id")?.to_string();
    let service = object_store(&access["serviceCatalog"])?;
    let key = format!("{interface}URL");
    let storage_url =
        pick_endpoint(service["endpoints"].as_array().into_iter().flatten(), region, |e| e[&key].as_str())
            .with_context(|| format!("Keystone v2: no {interface} object-store endpoint{}", in_region(region)))?;
    Ok(SwiftSession { storage_url, token, valid_for: valid_for(access["token"]["expires"].as_str()) })
}

/// A Keystone v3 token answer (body; the token is the `X-Subject-Token` header) → session.
pub fn keystone_v3_session(
    token: String,
    answer: &serde_json::Value,
    region: Option<&str>,
    interface: &str,
) -> anyhow::Result<SwiftSession> {
    let t = &answer["token"];
    let service = object_store(&t["catalog"])?;
    let storage_url = pick_endpoint(
        service["endpoints"].as_array().into_iter().flatten().filter(|e| e["interface"] == interface),
        region,
        |e| e["url"].as_str(),
    )
    .with_context(|| format!("Keystone v3: no {interface} object-store endpoint{}", in_region(region)))?;
    Ok(SwiftSession { storage_url, token, valid_for: valid_for(t["expires_at"].as_str()) })
}

fn in_region(region: Option<&str>) -> String {
    region.map(|r| format!(" in region {r} (OS_REGION_NAME)")).unwrap_or_default()
}

fn valid_for(expires: Option<&str>) -> Option<Duration> {
    let at: jiff::Timestamp = expires?.parse().ok()?;
    let left = at.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn swift_takes_storage_url_v1_or_keystone() {
        let e = SwiftAuth::from_env(&env(&[])).unwrap_err();
        assert!(e.to_string().contains("OS_AUTH_URL"), "{e}");
        let e = SwiftAuth::from_env(&env(&[("ST_AUTH", "https://x/auth/v1.0"), ("ST_USER", "u")])).unwrap_err();
        assert!(e.to_string().contains("ST_USER and ST_KEY"), "{e}");
        let e = SwiftAuth::from_env(&env(&[("OS_AUTH_URL", "https://k/v3"), ("OS_USERNAME", "u")])).unwrap_err();
        assert!(e.to_string().contains("OS_PASSWORD"), "{e}");
        let e = SwiftAuth::from_env(&env(&[("OS_AUTH_URL", "https://k/v3"), ("OS_PASSWORD", "p")])).unwrap_err();
        assert!(e.to_string().contains("OS_USERNAME or OS_USER_ID"), "{e}");
    }

    #[test]
    fn swift_auth_forms() {
        let e = env(&[("OS_STORAGE_URL", "https://s/v1/AUTH_x"), ("OS_AUTH_TOKEN", "t")]);
        assert_eq!(
            SwiftAuth::from_env(&e).unwrap(),
            SwiftAuth::Static { storage_url: "https://s/v1/AUTH_x".into(), token: "t".into() }
        );
        let e = env(&[("ST_AUTH", "https://s/auth/v1.0"), ("ST_USER", "u"), ("ST_KEY", "k")]);
        assert!(matches!(SwiftAuth::from_env(&e).unwrap(), SwiftAuth::V1 { .. }));

        let e = env(&[
            ("OS_AUTH_URL", "https://ks:5000/v2.0/"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_TENANT_NAME", "t"),
            ("OS_REGION_NAME", "RegionOne"),
        ]);
        let SwiftAuth::V2 { url, body, region, interface } = SwiftAuth::from_env(&e).unwrap() else { panic!() };
        assert_eq!(url, "https://ks:5000/v2.0/tokens");
        assert_eq!(
            body,
            serde_json::json!({"auth": {"passwordCredentials": {"username": "u", "password": "p"}, "tenantName": "t"}})
        );
        assert_eq!((region.as_deref(), interface.as_str()), (Some("RegionOne"), "public"));

        let e = env(&[
            ("OS_AUTH_URL", "https://ks:5000/v3"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_NAME", "proj"),
            ("OS_PROJECT_DOMAIN_ID", "default"),
        ]);
        let SwiftAuth::V3 { url, body, .. } = SwiftAuth::from_env(&e).unwrap() else { panic!() };
        assert_eq!(url, "https://ks:5000/v3/auth/tokens");
        assert_eq!(
            body,
            serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {"name": "u", "password": "p", "domain": {"name": "Default"}}}},
                "scope": {"project": {"name": "proj", "domain": {"id": "default"}}}
            }})
        );

        let e = env(&[
            ("OS_AUTH_URL", "https://ks:5000"),
            ("OS_APPLICATION_CREDENTIAL_ID", "aid"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "sec"),
        ]);
        let SwiftAuth::V3 { url, body, .. } = SwiftAuth::from_env(&e).unwrap() else { panic!() };
        assert_eq!(url, "https://ks:5000/v3/auth/tokens");
        assert_eq!(
            body["auth"]["identity"]["application_credential"],
            serde_json::json!({"id": "aid", "secret": "sec"})
        );
    }

    #[test]
    fn keystone_catalogs() {
        // Shapes from the Keystone API reference.
        let v3 = serde_json::json!({"token": {
        "expires_at": "2999-01-01T00:00:00.000000Z",
        "catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "region": "RegionOne", "url": "https://ks"}]},
            {"type": "object-store", "endpoints": [
                {"interface": "internal", "region": "RegionOne", "url": "http://10.0.0.1/v1/AUTH_p"},
                {"interface": "public", "region": "RegionTwo", "url": "https://two/v1/AUTH_p"},
                {"interface": "public", "region": "RegionOne", "url": "https://one/v1/AUTH_p"}
            ]}
        ]}});
        let s = keystone_v3_session("tok".into(), &v3, Some("RegionOne"), "public").unwrap();
        assert_eq!((s.storage_url.as_str(), s.token.as_str()), ("https://one/v1/AUTH_p", "tok"));
        assert!(s.valid_for.unwrap() > Duration::from_secs(3600));
        let s = keystone_v3_session("tok".into(), &v3, None, "internal").unwrap();
        assert_eq!(s.storage_url, "http://10.0.0.1/v1/AUTH_p");
        let err = keystone_v3_session("t".into(), &v3, Some("RegionX"), "public").unwrap_err().to_string();
        assert!(err.contains("no public object-store endpoint in region RegionX"), "{err}");

        let v2 = serde_json::json!({"access": {
        "token": {"id": "tok2", "expires": "2999-01-01T00:00:00Z"},
        "serviceCatalog": [{"type": "object-store", "endpoints": [
            {"region": "RegionOne", "publicURL": "https://one/v1/AUTH_t", "internalURL": "http://i/v1/AUTH_t"}
        ]}]}});
        let s = keystone_v2_session(&v2, Some("RegionOne"), "public").unwrap();
        assert_eq!((s.storage_url.as_str(), s.token.as_str()), ("https://one/v1/AUTH_t", "tok2"));
        let none = serde_json::json!({"access": {"token": {"id": "t"}, "serviceCatalog": []}});
        assert!(keystone_v2_session(&none, None, "public").unwrap_err().to_string().contains("no object-store"));
    }
}
