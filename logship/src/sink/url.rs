//! Sinks named by URL, for command lines and configuration files.

use std::path::PathBuf;
use std::sync::Arc;

use super::{FileSink, HttpFormat, HttpSink, HttpSinkConfig, Sink, SyslogSink, SyslogSinkConfig, SyslogTransport};
use crate::error::{Error, Result};

/// What a sink URL does not say: TLS trust and credentials.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct SinkOptions {
    /// PEM file of the certificates to trust for `tls://` and `https://` (default: none,
    /// so a CA must be given).
    pub ca: Option<PathBuf>,
    /// The name a `tls://` server's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
    /// Bearer token for HTTP sinks (read it from a file or the environment).
    pub bearer_token: Option<String>,
}

impl std::fmt::Debug for SinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkOptions")
            .field("ca", &self.ca)
            .field("server_name", &self.server_name)
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl SinkOptions {
    /// Trusting the certificates in `ca`.
    pub fn new(ca: impl Into<PathBuf>) -> Self {
        SinkOptions { ca: Some(ca.into()), ..SinkOptions::default() }
    }
}

/// The sink a URL names:
///
/// - `tcp://host:port`: syslog RFC 5424, octet counted, over TCP;
/// - `tls://host:port`: the same over TLS (RFC 5425), trusting `tls.ca`;
/// - `udp://host:port`: syslog RFC 5424 over UDP;
/// - `file:///dir`: JSON lines, one file per service, rotated by size;
/// - `http://…` or `https://…`: NDJSON POSTed to that URL;
/// - `loki+http://host:3100/loki/api/v1/push`: Loki's push API;
/// - `elasticsearch+http://host:9200/_bulk?index=logs`: Elasticsearch's bulk API.
pub fn sink_from_url(url: &str, options: &SinkOptions) -> Result<Arc<dyn Sink>> {
    let bad = |reason: &str| Error::InvalidInput { field: "sink URL", value: url.to_owned(), reason: reason.to_owned() };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected scheme://address (tcp, tls, udp, file, http or https)"))?;
    let http = |format: HttpFormat, inner: &str| -> Result<Arc<dyn Sink>> {
        let mut config = HttpSinkConfig::new(inner, format);
        config.bearer_token = options.bearer_token.clone();
        if inner.starts_with("https://") {
            let ca = options.ca.as_ref().ok_or_else(|| bad("an https:// sink needs a CA file to trust"))?;
            config.tls = Some(client_config(ca)?);
        }
        Ok(Arc::new(HttpSink::new(config)?))
    };
    if let Some(inner) = url.strip_prefix("loki+") {
        return http(HttpFormat::Loki, inner);
    }
    if let Some(inner) = url.strip_prefix("elasticsearch+") {
        let index = inner.split_once("index=").map_or("logs", |(_, i)| i.split('&').next().unwrap_or("logs")).to_owned();
        let base = inner.split_once('?').map_or(inner, |(b, _)| b);
        return http(HttpFormat::ElasticsearchBulk { index }, base);
    }
    let address = || -> Result<String> {
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("expected host:port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad("expected host:port with a port from 1 to 65535"));
        }
        Ok(rest.trim_end_matches('/').to_owned())
    };
    Ok(match scheme {
        "tcp" => Arc::new(SyslogSink::new(SyslogSinkConfig::new(SyslogTransport::Tcp(address()?)))?),
        "udp" => Arc::new(SyslogSink::new(SyslogSinkConfig::new(SyslogTransport::Udp(address()?)))?),
        "tls" => {
            let addr = address()?;
            let host = addr.rsplit_once(':').map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned()).unwrap_or_default();
            let ca = options.ca.as_ref().ok_or_else(|| bad("a tls:// sink needs a CA file to trust"))?;
            let config = client_config(ca)?;
            let server_name = options.server_name.clone().unwrap_or(host);
            Arc::new(SyslogSink::new(SyslogSinkConfig::new(SyslogTransport::Tls { addr, server_name, config }))?)
        }
        "file" => {
            if rest.is_empty() {
                return Err(bad("expected file:///path/to/dir"));
            }
            Arc::new(FileSink::new(rest)?)
        }
        "http" | "https" => http(HttpFormat::Ndjson, url)?,
        _ => return Err(bad("unknown scheme: use tcp, tls, udp, file, http or https (loki+ and elasticsearch+ for those APIs)")),
    })
}

/// A rustls client config trusting the PEM certificates in `ca`.
pub fn client_config(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let bad = |reason: String| Error::InvalidInput { field: "TLS CA file", value: ca.display().to_string(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_named() {
        for (url, why) in [
            ("syslog.example:514", "scheme"),
            ("tcp://nohost", "host:port"),
            ("tcp://h:99999", "port"),
            ("ftp://h:1", "unknown scheme"),
            ("tls://h:6514", "CA file"),
            ("file://", "file:///"),
        ] {
            let err = sink_from_url(url, &SinkOptions::default()).expect_err(url).to_string();
            assert!(err.contains(url) && err.contains(why), "{url}: {err}");
        }
        let err = sink_from_url("tls://h:6514", &SinkOptions::new("/nonexistent/ca.pem")).expect_err("missing CA").to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let err = sink_from_url("https://h/push", &SinkOptions::default()).expect_err("no CA").to_string();
        assert!(err.contains("CA file"), "{err}");
        assert_eq!(sink_from_url("tcp://127.0.0.1:514", &SinkOptions::default()).expect("tcp").name(), "syslog");
        for url in [
            "http://127.0.0.1:9/push",
            "loki+http://127.0.0.1:3100/loki/api/v1/push",
            "elasticsearch+http://127.0.0.1:9200/_bulk?index=app",
        ] {
            assert_eq!(sink_from_url(url, &SinkOptions::default()).expect(url).name(), "http");
        }
        let secret = SinkOptions { bearer_token: Some("s3cret".into()), ..SinkOptions::default() };
        assert!(!format!("{secret:?}").contains("s3cret"));
    }
}
