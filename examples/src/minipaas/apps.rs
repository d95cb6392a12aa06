//! Apps, their config and their secrets, in the cluster's `KeyValue` under
//! `<root>/minipaas/`:
//!
//! - `apps/<app>`: the app (its manifest text, who made it and when), created only if
//!   absent, so two `create`s of one name cannot both win;
//! - `config/<app>`: its config (environment over the manifest's), one record changed by
//!   compare-and-swap, so concurrent `config set`s never lose one another's keys;
//! - `secrets/<app>/<KEY>`: its secrets, a prefix of their own: listing apps or config
//!   never reads them, and only their names leave this module through [`Apps::secret_names`].
//!
//! Releases are not here: each is a version of the app's scheduler groups.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keelson_examples::minipaas::apps::AppsError> {
//! use std::sync::Arc;
//! use keelson_examples::minipaas::apps::Apps;
//! let apps = Apps::new(Arc::new(keelson_discovery::MemoryKv::new()), "keelson");
//! apps.create("shop", "[services.web]\nport = 8080\n", "ada").await?;
//! apps.config_set("shop", &[("GREETING".into(), "hi".into())]).await?;
//! assert_eq!(apps.config("shop").await?["GREETING"], "hi");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use keelson_discovery::{Expect, KeyValue};
use serde::{Deserialize, Serialize};

use super::manifest::{is_env_name, is_label, Manifest, ManifestError};

/// Why an app operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppsError {
    /// A bad name, key or value.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidInput {
        /// What.
        field: &'static str,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
    /// No such app.
    #[error("no app {0:?}")]
    NotFound(String),
    /// The app exists already.
    #[error("app {0:?} exists already")]
    Exists(String),
    /// The manifest is wrong.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The store failed (retryable when it was unreachable).
    #[error("cluster store: {0}")]
    Store(#[from] keelson_discovery::Error),
    /// A stored record does not parse.
    #[error("{key}: unreadable record: {reason}")]
    Corrupt {
        /// Its key.
        key: String,
        /// The parse error.
        reason: String,
    },
}

/// An app as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    /// Its name (a DNS label: it names hosts and services).
    pub name: String,
    /// Its manifest, as written.
    pub manifest: String,
    /// Who created it.
    pub created_by: String,
    /// When, in milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl App {
    /// The manifest, parsed.
    pub fn parsed(&self) -> Result<Manifest, ManifestError> {
        Manifest::parse(&format!("{}/minipaas.toml", self.name), &self.manifest)
    }
}

/// Apps in a `KeyValue`.
#[derive(Clone, Debug)]
pub struct Apps {
    kv: Arc<dyn KeyValue>,
    prefix: String,
    secrets: String,
}

/// Attempts of a compare-and-swap before giving up (each lost to another writer).
const CAS_ATTEMPTS: u32 = 20;

impl Apps {
    /// Apps under `<root>/minipaas/` of `kv`.
    pub fn new(kv: Arc<dyn KeyValue>, root: &str) -> Apps {
        // Secrets live where the node agents read them for tasks' files: the cluster
        // store's secrets, `<app>/<KEY>` (`ClusterStore::put_secret`).
        Apps { kv, prefix: format!("{}/minipaas", root.trim_end_matches('/')), secrets: format!("{}/secrets", cluster_root(root)) }
    }

    fn secret_key(&self, app: &str, key: &str) -> String {
        format!("{}/{app}/{key}", self.secrets)
    }

    fn key(&self, parts: &[&str]) -> String {
        format!("{}/{}", self.prefix, parts.join("/"))
    }

    /// Creates `name` with `manifest` (checked first), made by `by`.
    pub async fn create(&self, name: &str, manifest: &str, by: &str) -> Result<App, AppsError> {
        check_app_name(name)?;
        Manifest::parse(&format!("{name}/minipaas.toml"), manifest)?;
        let app = App { name: name.to_owned(), manifest: manifest.to_owned(), created_by: by.to_owned(), created_ms: now_ms() };
        match self.kv.compare_and_swap(&self.key(&["apps", name]), Expect::Absent, encode(&app), None).await {
            Ok(_) => Ok(app),
            Err(keelson_discovery::Error::VersionMismatch { .. }) => Err(AppsError::Exists(name.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// The app `name`.
    pub async fn get(&self, name: &str) -> Result<App, AppsError> {
        check_app_name(name)?;
        let key = self.key(&["apps", name]);
        let entry = self.kv.get(&key).await?.ok_or_else(|| AppsError::NotFound(name.to_owned()))?;
        decode(&key, &entry.value)
    }

    /// Every app, by name.
    pub async fn list(&self) -> Result<Vec<App>, AppsError> {
        let prefix = self.key(&["apps", ""]);
        let listed = self.kv.list(&prefix).await?;
        let mut out = Vec::with_capacity(listed.entries.len());
        for e in listed.entries {
            out.push(decode(&e.key, &e.value)?);
        }
        out.sort_by(|a: &App, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Replaces the app's manifest (checked first).
    pub async fn set_manifest(&self, name: &str, manifest: &str) -> Result<App, AppsError> {
        Manifest::parse(&format!("{name}/minipaas.toml"), manifest)?;
        let app = App { manifest: manifest.to_owned(), ..self.get(name).await? };
        self.kv.put(&self.key(&["apps", name]), encode(&app), None).await?;
        Ok(app)
    }

    /// Deletes the app, its config and its secrets; `false` if there was none. (Its
    /// running groups are the platform's to stop first.)
    pub async fn delete(&self, name: &str) -> Result<bool, AppsError> {
        check_app_name(name)?;
        let existed = self.kv.get(&self.key(&["apps", name])).await?.is_some();
        for secret in self.secret_names(name).await? {
            self.kv.delete(&self.secret_key(name, &secret)).await?;
        }
        self.kv.delete(&self.key(&["config", name])).await?;
        self.kv.delete(&self.key(&["apps", name])).await?;
        Ok(existed)
    }

    /// A new app `to` with `from`'s manifest, config and secrets.
    pub async fn clone_app(&self, from: &str, to: &str, by: &str) -> Result<App, AppsError> {
        let source = self.get(from).await?;
        let app = self.create(to, &source.manifest, by).await?;
        let config = self.config(from).await?;
        if !config.is_empty() {
            let pairs: Vec<(String, String)> = config.into_iter().collect();
            self.config_set(to, &pairs).await?;
        }
        for secret in self.secret_names(from).await? {
            if let Some(value) = self.secret(from, &secret).await? {
                self.secret_set(to, &secret, &value).await?;
            }
        }
        Ok(app)
    }

    /// The app's config.
    pub async fn config(&self, name: &str) -> Result<BTreeMap<String, String>, AppsError> {
        Ok(self.config_versioned(name).await?.0)
    }

    async fn config_versioned(&self, name: &str) -> Result<(BTreeMap<String, String>, Expect), AppsError> {
        self.get(name).await?;
        let key = self.key(&["config", name]);
        match self.kv.get(&key).await? {
            Some(e) => Ok((decode(&key, &e.value)?, Expect::Version(e.version))),
            None => Ok((BTreeMap::new(), Expect::Absent)),
        }
    }

    /// Sets `pairs` in the app's config; returns the config now.
    pub async fn config_set(&self, name: &str, pairs: &[(String, String)]) -> Result<BTreeMap<String, String>, AppsError> {
        for (k, v) in pairs {
            check_env(k, v)?;
        }
        self.change_config(name, |config| {
            for (k, v) in pairs {
                config.insert(k.clone(), v.clone());
            }
        })
        .await
    }

    /// Removes `keys` from the app's config (absent ones are fine); returns it now.
    pub async fn config_unset(&self, name: &str, keys: &[String]) -> Result<BTreeMap<String, String>, AppsError> {
        self.change_config(name, |config| {
            for k in keys {
                config.remove(k);
            }
        })
        .await
    }

    async fn change_config(
        &self,
        name: &str,
        change: impl Fn(&mut BTreeMap<String, String>),
    ) -> Result<BTreeMap<String, String>, AppsError> {
        let key = self.key(&["config", name]);
        for _ in 0..CAS_ATTEMPTS {
            let (mut config, expect) = self.config_versioned(name).await?;
            change(&mut config);
            match self.kv.compare_and_swap(&key, expect, encode(&config), None).await {
                Ok(_) => return Ok(config),
                // Another change landed since we read: apply ours to it.
                Err(keelson_discovery::Error::VersionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(AppsError::Store(keelson_discovery::Error::Unavailable {
            backend: "kv",
            reason: format!("config of {name}: {CAS_ATTEMPTS} concurrent changes in a row"),
        }))
    }

    /// Sets a secret (its value never leaves this module but through [`Apps::secrets`]).
    pub async fn secret_set(&self, name: &str, key: &str, value: &str) -> Result<(), AppsError> {
        self.get(name).await?;
        if !is_env_name(key) {
            return Err(AppsError::InvalidInput { field: "secret name", value: key.to_owned(), reason: env_rule() });
        }
        self.kv.put(&self.secret_key(name, key), value.as_bytes().to_vec(), None).await?;
        Ok(())
    }

    /// Removes a secret; `false` if there was none.
    pub async fn secret_unset(&self, name: &str, key: &str) -> Result<bool, AppsError> {
        self.get(name).await?;
        let existed = self.secret(name, key).await?.is_some();
        self.kv.delete(&self.secret_key(name, key)).await?;
        Ok(existed)
    }

    /// The names of the app's secrets (never their values).
    pub async fn secret_names(&self, name: &str) -> Result<Vec<String>, AppsError> {
        let prefix = self.secret_key(name, "");
        let mut names: Vec<String> = self.kv.list(&prefix).await?.entries.into_iter().map(|e| e.key[prefix.len()..].to_owned()).collect();
        names.sort();
        Ok(names)
    }

    async fn secret(&self, name: &str, key: &str) -> Result<Option<String>, AppsError> {
        let k = self.secret_key(name, key);
        match self.kv.get(&k).await? {
            Some(e) => String::from_utf8(e.value).map(Some).map_err(|_| AppsError::Corrupt { key: k, reason: "not UTF-8".into() }),
            None => Ok(None),
        }
    }

    /// The app's secrets with their values: for the agent that writes them into tasks'
    /// files, nothing else.
    pub async fn secrets(&self, name: &str) -> Result<BTreeMap<String, String>, AppsError> {
        let mut out = BTreeMap::new();
        for key in self.secret_names(name).await? {
            if let Some(v) = self.secret(name, &key).await? {
                out.insert(key, v);
            }
        }
        Ok(out)
    }
}

/// Where the cluster's keys live under the platform's root (as the node agents are
/// given it: `--root <root>/cluster`).
pub fn cluster_root(root: &str) -> String {
    format!("{}/cluster", root.trim_end_matches('/'))
}

fn check_app_name(name: &str) -> Result<(), AppsError> {
    if is_label(name) {
        Ok(())
    } else {
        Err(AppsError::InvalidInput {
            field: "app name",
            value: name.to_owned(),
            reason: "1 to 30 of a-z0-9- starting with a letter, not ending with -".into(),
        })
    }
}

fn env_rule() -> String {
    "A-Z, 0-9 and _, not starting with a digit".into()
}

fn check_env(key: &str, value: &str) -> Result<(), AppsError> {
    if !is_env_name(key) {
        return Err(AppsError::InvalidInput { field: "config key", value: key.to_owned(), reason: env_rule() });
    }
    if value.contains('\0') {
        return Err(AppsError::InvalidInput { field: "config value", value: key.to_owned(), reason: "contains a NUL byte".into() });
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data: serializing it cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, AppsError> {
    serde_json::from_slice(bytes).map_err(|e| AppsError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

fn now_ms() -> u64 {
    keelson_scheduler::wall_clock_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "[services.web]\nport = 8080\n";

    fn apps() -> Apps {
        Apps::new(Arc::new(keelson_discovery::MemoryKv::new()), "test")
    }

    #[tokio::test]
    async fn create_list_clone_delete() {
        let a = apps();
        a.create("shop", WEB, "ada").await.expect("create");
        assert!(matches!(a.create("shop", WEB, "bob").await, Err(AppsError::Exists(n)) if n == "shop"));
        assert!(matches!(a.create("Shop", WEB, "ada").await, Err(AppsError::InvalidInput { field: "app name", .. })));
        assert!(matches!(a.create("bad", "[services.web]\nreplicas = -1\n", "ada").await, Err(AppsError::Manifest(_))));
        a.config_set("shop", &[("A".into(), "1".into())]).await.expect("config");
        a.secret_set("shop", "DB_PASSWORD", "s3cret").await.expect("secret");
        a.clone_app("shop", "shop-staging", "ada").await.expect("clone");
        let names: Vec<String> = a.list().await.expect("list").into_iter().map(|x| x.name).collect();
        assert_eq!(names, ["shop", "shop-staging"]);
        assert_eq!(a.config("shop-staging").await.expect("config")["A"], "1");
        assert_eq!(a.secrets("shop-staging").await.expect("secrets")["DB_PASSWORD"], "s3cret");
        assert!(a.delete("shop").await.expect("delete"));
        assert!(!a.delete("shop").await.expect("again"), "already gone");
        assert!(matches!(a.get("shop").await, Err(AppsError::NotFound(_))));
        assert!(a.secret_names("shop").await.expect("names").is_empty(), "its secrets went with it");
        assert!(matches!(a.config("shop").await, Err(AppsError::NotFound(_))));
    }

    #[tokio::test]
    async fn config_changes_never_lose_each_other() {
        let a = apps();
        a.create("shop", WEB, "ada").await.expect("create");
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move { a.config_set("shop", &[(format!("K{i}"), i.to_string())]).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("join").expect("set");
        }
        assert_eq!(a.config("shop").await.expect("config").len(), 8);
        let after = a.config_unset("shop", &["K0".into(), "NOPE".into()]).await.expect("unset");
        assert_eq!(after.len(), 7);
        assert!(matches!(a.config_set("shop", &[("bad-key".into(), "x".into())]).await, Err(AppsError::InvalidInput { .. })));
    }

    #[tokio::test]
    async fn secrets_stay_out_of_the_app_and_its_config() {
        let a = apps();
        a.create("shop", WEB, "ada").await.expect("create");
        a.secret_set("shop", "TOKEN", "hunter2").await.expect("secret");
        let app = serde_json::to_string(&a.get("shop").await.expect("app")).expect("json");
        let config = serde_json::to_string(&a.config("shop").await.expect("config")).expect("json");
        assert!(!app.contains("hunter2") && !config.contains("hunter2"));
        assert_eq!(a.secret_names("shop").await.expect("names"), ["TOKEN"]);
        assert!(a.secret_unset("shop", "TOKEN").await.expect("unset"));
        assert!(!a.secret_unset("shop", "TOKEN").await.expect("again"));
        assert!(matches!(a.secret_set("nope", "TOKEN", "x").await, Err(AppsError::NotFound(_))));
    }
}
