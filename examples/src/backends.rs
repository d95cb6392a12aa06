//! How the reference binaries reach etcd and Consul: one set of flags, each also read
//! from a `KEELSON_*` environment variable, shared by `edge`, `node-agent`,
//! `keelson-ctl` and `dns-catalog`.
//!
//! Secrets never go on the command line (where `ps` shows them): passwords and tokens
//! come from files (`--etcd-password-file`, `--consul-token-file`) or from the
//! environment (`KEELSON_ETCD_PASSWORD`, `KEELSON_CONSUL_TOKEN`), and the library configs
//! print them redacted. A password is only sent over TLS unless
//! `--etcd-allow-plaintext-password` says otherwise.

use std::path::PathBuf;

/// etcd endpoints, TLS and credentials.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// etcd client URLs (repeatable; comma-separated in the environment).
    #[arg(id = "etcd", long = "etcd", env = "KEELSON_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// The CA (PEM) that signed etcd's certificate: with it, endpoints are https://.
    #[arg(id = "etcd_ca", long = "etcd-ca", env = "KEELSON_ETCD_CA")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for etcd's --client-cert-auth.
    #[arg(id = "etcd_cert", long = "etcd-cert", env = "KEELSON_ETCD_CERT", requires = "etcd_key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(id = "etcd_key", long = "etcd-key", env = "KEELSON_ETCD_KEY", requires = "etcd_cert")]
    pub key: Option<PathBuf>,
    /// The name etcd's certificate must carry (default: the endpoint's host).
    #[arg(id = "etcd_server_name", long = "etcd-server-name", env = "KEELSON_ETCD_SERVER_NAME")]
    pub server_name: Option<String>,
    /// The etcd user (its password from --etcd-password-file or KEELSON_ETCD_PASSWORD).
    #[arg(id = "etcd_user", long = "etcd-user", env = "KEELSON_ETCD_USER")]
    pub user: Option<String>,
    /// A file holding the etcd user's password.
    #[arg(id = "etcd_password_file", long = "etcd-password-file", env = "KEELSON_ETCD_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Send the password to an http:// endpoint anyway (anyone on the path can read it).
    #[arg(id = "etcd_allow_plaintext_password", long = "etcd-allow-plaintext-password")]
    pub allow_plaintext_password: bool,
    /// How long a daemon waits at start for etcd to answer (booting together, say)
    /// before it gives up; a refused certificate or password ends it at once.
    /// `keelson-ctl` does not wait.
    #[arg(id = "etcd_connect_timeout", long = "etcd-connect-timeout", env = "KEELSON_ETCD_CONNECT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub connect_timeout: std::time::Duration,
}

/// Reads a secret from a file: its first line, trimmed. Names the file on error, never
/// the contents.
pub fn read_secret(flag: &str, path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim().to_owned();
    if secret.is_empty() {
        return Err(format!("{flag} {}: the file is empty", path.display()));
    }
    Ok(secret)
}

/// A secret from its file flag, else from its environment variable (an empty variable
/// counts as unset); `None` when neither is given.
#[cfg(any(feature = "etcd", feature = "consul"))]
fn secret(flag: &str, file: Option<&std::path::Path>, env: &str) -> Result<Option<String>, String> {
    match (file, std::env::var(env)) {
        (Some(path), _) => read_secret(flag, path).map(Some),
        (None, Ok(value)) if !value.is_empty() => Ok(Some(value)),
        _ => Ok(None),
    }
}

impl EtcdArgs {
    /// Whether etcd was asked for.
    pub fn is_set(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// The library config these flags describe.
    #[cfg(feature = "etcd")]
    pub fn config(&self) -> Result<keelson_discovery::EtcdConfig, String> {
        let mut config = keelson_discovery::EtcdConfig::new(self.endpoints.clone());
        if let Some(ca) = &self.ca {
            let mut tls = keelson_discovery::EtcdTls::from_files(ca, self.cert.as_deref(), self.key.as_deref())
                .map_err(|e| format!("etcd TLS: {e}"))?;
            tls.server_name = self.server_name.clone();
            config.tls = Some(tls);
        } else if self.cert.is_some() {
            return Err("--etcd-cert needs --etcd-ca (the CA that signed etcd's certificate)".into());
        }
        if let Some(user) = &self.user {
            let password = secret("--etcd-password-file", self.password_file.as_deref(), "KEELSON_ETCD_PASSWORD")?
                .ok_or("--etcd-user needs a password: --etcd-password-file or KEELSON_ETCD_PASSWORD")?;
            config.credentials = Some((user.clone(), password));
        }
        config.allow_plaintext_password = self.allow_plaintext_password;
        Ok(config)
    }

    /// Connects; the error names the cause (untrusted certificate, refused password,
    /// unreachable endpoints) for the binary to print.
    #[cfg(feature = "etcd")]
    pub async fn connect(&self) -> Result<keelson_discovery::EtcdKv, String> {
        keelson_discovery::EtcdKv::connect(self.config()?).await.map_err(|e| format!("etcd: {e}"))
    }

    /// Connects and waits until etcd answers a read, retrying what a retry can fix for
    /// up to `--etcd-connect-timeout`: what a daemon does at start, so one started
    /// before etcd (a boot, a walkthrough) does not exit.
    #[cfg(feature = "etcd")]
    pub async fn connect_waiting(&self) -> Result<keelson_discovery::EtcdKv, String> {
        use keelson_discovery::KeyValue;
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let mut pauses = keelson_discovery::retry_pauses(std::time::Duration::from_millis(200), std::time::Duration::from_secs(5));
        loop {
            let attempt = async {
                let kv = keelson_discovery::EtcdKv::connect(self.config().map_err(|e| (false, e))?)
                    .await
                    .map_err(|e| (e.is_retryable(), e.to_string()))?;
                kv.get("keelson/").await.map_err(|e| (e.is_retryable(), e.to_string()))?;
                Ok::<_, (bool, String)>(kv)
            };
            match attempt.await {
                Ok(kv) => return Ok(kv),
                Err((true, e)) if tokio::time::Instant::now() < deadline => {
                    let pause = pauses.next().unwrap_or(std::time::Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?pause, "etcd does not answer yet");
                    tokio::time::sleep(pause).await;
                }
                Err((_, e)) => return Err(format!("etcd: {e}")),
            }
        }
    }
}

/// A Consul agent, its TLS and ACL token.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConsulArgs {
    /// The Consul agent's URL (http:// or https://).
    #[arg(id = "consul", long = "consul", env = "KEELSON_CONSUL_ADDR")]
    pub address: Option<String>,
    /// The CA (PEM) that signed the agent's certificate.
    #[arg(id = "consul_ca", long = "consul-ca", env = "KEELSON_CONSUL_CA")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), for agents with verify_incoming.
    #[arg(id = "consul_cert", long = "consul-cert", env = "KEELSON_CONSUL_CERT", requires = "consul_key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --consul-cert.
    #[arg(id = "consul_key", long = "consul-key", env = "KEELSON_CONSUL_KEY", requires = "consul_cert")]
    pub consul_key: Option<PathBuf>,
    /// A file holding the ACL token (or KEELSON_CONSUL_TOKEN).
    #[arg(id = "consul_token_file", long = "consul-token-file", env = "KEELSON_CONSUL_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ConsulArgs {
    /// The library config these flags describe (`None` without --consul).
    #[cfg(feature = "consul")]
    pub fn config(&self) -> Result<Option<keelson_discovery::ConsulConfig>, String> {
        let Some(address) = &self.address else { return Ok(None) };
        let mut config = keelson_discovery::ConsulConfig::new(address.clone());
        config.ca_file = self.ca.clone();
        config.client_cert = self.cert.clone().zip(self.consul_key.clone());
        config.token = secret("--consul-token-file", self.token_file.as_deref(), "KEELSON_CONSUL_TOKEN")?;
        Ok(Some(config))
    }
}

/// Where the platform's log server is, for tools that read from it or write to it
/// (`testgrid --etcd`, `pipeline`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogdArgs {
    /// logd (`http://host:port`).
    #[arg(long, env = "KEELSON_LOGD")]
    pub logd: Option<String>,
    /// A file holding logd's bearer token.
    #[arg(long, env = "KEELSON_LOGD_TOKEN_FILE")]
    pub logd_token_file: Option<PathBuf>,
}

impl LogdArgs {
    /// The token, read from its file.
    pub fn token(&self) -> Result<Option<String>, String> {
        self.logd_token_file.as_deref().map(crate::logs_client::read_token).transpose()
    }

    /// A sink pushing to logd, if one was given.
    pub fn sink(&self) -> Result<Option<std::sync::Arc<dyn keelson_logship::Sink>>, String> {
        let Some(url) = &self.logd else { return Ok(None) };
        let mut options = keelson_logship::SinkOptions::default();
        options.bearer_token = self.token()?;
        let sink = keelson_logship::sink_from_url(&format!("{}/v1/push", url.trim_end_matches('/')), &options)
            .map_err(|e| format!("--logd: {e}"))?;
        Ok(Some(sink))
    }
}

/// Credentials for `registry` from a file whose first line is `user:password` (a file,
/// so the password is never on a command line or in a log).
#[cfg(feature = "docker")]
pub fn registry_auth_from_file(registry: &str, file: &std::path::Path) -> Result<keelson_scheduler::RegistryAuth, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (user, password) = text
        .lines()
        .next()
        .and_then(|l| l.split_once(':'))
        .ok_or_else(|| format!("{}: the first line must be user:password", file.display()))?;
    keelson_scheduler::RegistryAuth::new(registry, user, password).map_err(|e| format!("{registry}: {e}"))
}
