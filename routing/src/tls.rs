//! TLS termination: certificates chosen by SNI, replaced while the proxy runs.
//!
//! A [`CertStore`] maps server names (exact, or `*.example.com` wildcards covering one
//! label) to certificates. Its rustls resolver reads an immutable snapshot behind
//! arc-swap on every handshake, so [`CertStore::set`] rotates a certificate for new
//! handshakes at once while connections already established keep theirs: nothing is
//! dropped. A client naming no known server gets the fallback certificate if one is set,
//! else the handshake fails (`UnknownSni` policy by construction: set a fallback or not).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::{Error, Result};

/// ALPN protocols the proxy offers, best first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, Default, Clone)]
struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    fallback: Option<Arc<CertifiedKey>>,
}

impl CertSet {
    fn resolve(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return self.fallback.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return Some(c.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = self.wildcard.get(parent) {
                return Some(c.clone());
            }
        }
        self.fallback.clone()
    }
}

/// Certificates by server name, swappable at run time. Cheap to share (`Arc`).
#[derive(Debug, Default)]
pub struct CertStore {
    set: ArcSwap<CertSet>,
}

impl CertStore {
    /// An empty store: every handshake fails until a certificate is set.
    pub fn new() -> Arc<Self> {
        Arc::new(CertStore::default())
    }

    /// Serves `chain_pem` (leaf first) with `key_pem` for `server_name`, an exact name
    /// or `*.parent` for any one label under `parent`. Replaces the name's previous
    /// certificate for new handshakes; open connections are not touched.
    pub fn set(&self, server_name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<()> {
        let key = certified_key(server_name, chain_pem, key_pem)?;
        let name = server_name.to_ascii_lowercase();
        let (is_wildcard, stem) = match name.strip_prefix("*.") {
            Some(parent) => (true, parent.to_owned()),
            None => (false, name.clone()),
        };
        crate::Host::new(stem.clone()).map_err(|_| Error::invalid("TLS server name", server_name, "must be a DNS name or *.parent"))?;
        self.set.rcu(|old| {
            let mut next = CertSet::clone(old);
            if is_wildcard {
                next.wildcard.insert(stem.clone(), key.clone());
            } else {
                next.exact.insert(stem.clone(), key.clone());
            }
            next
        });
        Ok(())
    }

    /// Serves this certificate to clients whose SNI matches no name, or who send none.
    /// Without a fallback such handshakes fail.
    pub fn set_fallback(&self, chain_pem: &[u8], key_pem: &[u8]) -> Result<()> {
        let key = certified_key("fallback", chain_pem, key_pem)?;
        self.set.rcu(|old| CertSet { fallback: Some(key.clone()), ..CertSet::clone(old) });
        Ok(())
    }

    /// Stops serving `server_name`; returns whether it was set.
    pub fn remove(&self, server_name: &str) -> bool {
        let name = server_name.to_ascii_lowercase();
        let mut removed = false;
        self.set.rcu(|old| {
            let mut next = CertSet::clone(old);
            removed = match name.strip_prefix("*.") {
                Some(parent) => next.wildcard.remove(parent).is_some(),
                None => next.exact.remove(&name).is_some(),
            };
            next
        });
        removed
    }

    /// Names with a certificate (wildcards as `*.parent`), sorted.
    pub fn names(&self) -> Vec<String> {
        let set = self.set.load();
        let mut names: Vec<String> = set.exact.keys().cloned().chain(set.wildcard.keys().map(|p| format!("*.{p}"))).collect();
        names.sort();
        names
    }

    /// A rustls server configuration resolving through this store, offering HTTP/2 and
    /// HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Building from ring's default provider with its safe default versions cannot
        // fail; should a future rustls disagree, fall back to its process-wide default.
        let builder = match rustls::ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
            Ok(b) => b,
            Err(_) => rustls::ServerConfig::builder(),
        };
        let mut config = builder.with_no_client_auth().with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = self.0.set.load().resolve(hello.server_name());
        if found.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "no certificate for this server name; handshake refused");
        }
        found
    }
}

fn certified_key(name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>> {
    let bad = |reason: String| Error::invalid("TLS certificate", name, reason);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("certificate PEM unreadable: {e}")))?;
    if chain.is_empty() {
        return Err(bad("no CERTIFICATE block in the chain PEM".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(format!("private key PEM unreadable: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad(format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    // A key that does not belong to the leaf would fail every handshake later; refuse
    // it now, while the old certificate is still being served.
    certified.keys_match().map_err(|e| bad(format!("private key does not match the certificate: {e}")))?;
    Ok(Arc::new(certified))
}
