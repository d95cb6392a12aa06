//! Sinks named by URL, for command lines and configuration files.

use std::path::PathBuf;
use std::sync::Arc;

use super::{FileSink, Sink, SyslogSink, SyslogSinkConfig, SyslogTransport};
use crate::error::{Error, Result};

/// TLS settings for `tls://` sinks.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct TlsFiles {
    /// PEM file of the certificates to trust (default: none, so a CA must be given).
    pub ca: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
}

impl TlsFiles {
    /// Trusting the certificates in `ca`.
    pub fn new(ca: impl Into<PathBuf>) -> Self {
        TlsFiles { ca: Some(ca.into()), server_name: None }
    }
}

/// The sink a URL names:
///
/// - `tcp://host:port`: syslog RFC 5424, octet counted, over TCP;
/// - `tls://host:port`: the same over TLS (RFC 5425), trusting `tls.ca`;
/// - `udp://host:port`: syslog RFC 5424 over UDP;
/// - `file:///dir`: JSON lines, one file per service, rotated by size.
pub fn sink_from_url(url: &str, tls: &TlsFiles) -> Result<Arc<dyn Sink>> {
    let bad = |reason: &str| Error::InvalidInput { field: "sink URL", value: url.to_owned(), reason: reason.to_owned() };
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected scheme://address (tcp, tls, udp or file)"))?;
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
            let ca = tls.ca.as_ref().ok_or_else(|| bad("a tls:// sink needs a CA file to trust"))?;
            let config = client_config(ca)?;
            let server_name = tls.server_name.clone().unwrap_or(host);
            Arc::new(SyslogSink::new(SyslogSinkConfig::new(SyslogTransport::Tls { addr, server_name, config }))?)
        }
        "file" => {
            if rest.is_empty() {
                return Err(bad("expected file:///path/to/dir"));
            }
            Arc::new(FileSink::new(rest)?)
        }
        _ => return Err(bad("unknown scheme: use tcp, tls, udp or file")),
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
            let err = sink_from_url(url, &TlsFiles::default()).expect_err(url).to_string();
            assert!(err.contains(url) && err.contains(why), "{url}: {err}");
        }
        let err = sink_from_url("tls://h:6514", &TlsFiles::new("/nonexistent/ca.pem")).expect_err("missing CA").to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert_eq!(sink_from_url("tcp://127.0.0.1:514", &TlsFiles::default()).expect("tcp").name(), "syslog");
    }
}
