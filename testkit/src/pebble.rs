//! A real ACME CA for tests: Debian's `pebble`, on free loopback ports, with its HTTPS
//! certificate from a fresh [`TestCa`] (Debian ships none), validating HTTP-01 on a
//! port the test chooses and resolving names with a DNS server the test runs.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::tls::TestCa;
use crate::tools::{free_ports, io, require, wait_for_tcp, TestkitError};

/// A running pebble; killed on drop.
#[derive(Debug)]
pub struct Pebble {
    child: Child,
    /// The ACME directory URL.
    pub directory: String,
    /// A PEM file of the CA pebble's own HTTPS certificate is signed by: what an ACME
    /// client must trust to talk to it.
    pub ca_file: PathBuf,
    management: SocketAddr,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 challenges on `http_port` of whatever address a
    /// name resolves to through `dns` (`-dnsserver`), refusing `nonce_reject` percent of
    /// good nonces (`PEBBLE_WFE_NONCEREJECT`; pebble's own default is 5), with no
    /// validation delays (`PEBBLE_VA_NOSLEEP=1`).
    pub fn start(http_port: u16, dns: SocketAddr, nonce_reject: u8) -> Result<Pebble, TestkitError> {
        let pebble = require("pebble", "pebble")?;
        let dir = tempfile::tempdir().map_err(io("creating pebble's folder"))?;
        let ca = TestCa::new("pebble test CA")?;
        let cert = ca.issue("localhost", &["localhost", "127.0.0.1"])?;
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("ca.pem"), &ca.cert_pem).map_err(io("writing pebble's CA"))?;
        std::fs::write(path("cert.pem"), &cert.chain_pem).map_err(io("writing pebble's certificate"))?;
        std::fs::write(path("key.pem"), &cert.key_pem).map_err(io("writing pebble's key"))?;
        let ports = free_ports(3)?;
        let (listen, management) = (SocketAddr::from(([127, 0, 0, 1], ports[0])), SocketAddr::from(([127, 0, 0, 1], ports[1])));
        let config = serde_json::json!({"pebble": {
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": path("cert.pem"),
            "privateKey": path("key.pem"),
            "httpPort": http_port,
            "tlsPort": ports[2],
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(path("pebble.json"), config.to_string()).map_err(io("writing pebble's config"))?;
        let log = std::fs::File::create(path("pebble.log")).map_err(io("creating pebble's log"))?;
        let child = Command::new(pebble)
            .arg("-config")
            .arg(path("pebble.json"))
            .args(["-dnsserver", &dns.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", nonce_reject.to_string())
            .stdout(log.try_clone().map_err(io("pebble's log"))?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(io("starting pebble"))?;
        let pebble = Pebble {
            child,
            directory: format!("https://127.0.0.1:{}/dir", listen.port()),
            ca_file: path("ca.pem"),
            management,
            ca,
            _dir: dir,
        };
        wait_for_tcp(listen, Duration::from_secs(20))?;
        wait_for_tcp(management, Duration::from_secs(20))?;
        Ok(pebble)
    }

    /// What pebble logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// The root certificate pebble issues under (PEM), from its management interface:
    /// what a client of a certificate it issued must trust. Pebble makes a new one at
    /// every start.
    pub fn issuing_root(&self) -> Result<String, TestkitError> {
        let fail = |detail: String| TestkitError::Failed { what: "reading pebble's issuing root".into(), detail };
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::CertificateDer::from(pem_der(&self.ca.cert_pem).ok_or_else(|| fail("bad CA PEM".into()))?);
        roots.add(ca).map_err(|e| fail(e.to_string()))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| fail(e.to_string()))?;
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(|e| fail(e.to_string()))?;
        let mut sock = std::net::TcpStream::connect(self.management).map_err(io("connecting to pebble's management port"))?;
        sock.set_read_timeout(Some(Duration::from_secs(10))).map_err(io("socket timeout"))?;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(b"GET /roots/0 HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(io("asking pebble for its root"))?;
        let mut reply = Vec::new();
        // Pebble closes without close_notify: what arrived before is the whole reply.
        let _ = tls.read_to_end(&mut reply);
        let text = String::from_utf8_lossy(&reply);
        let (_, body) = text.split_once("\r\n\r\n").ok_or_else(|| fail(format!("no body in {text:?}")))?;
        if !body.contains("BEGIN CERTIFICATE") {
            return Err(fail(format!("not a certificate: {body:?}")));
        }
        Ok(body.to_owned())
    }

    /// [`Pebble::issuing_root`] as a trust anchor for [`crate::tls::handshake`]: what a
    /// client checking the certificates this CA issues trusts.
    pub fn issuing_root_cert(&self) -> Result<crate::tls::TestCert, TestkitError> {
        let pem = self.issuing_root()?;
        let der =
            pem_der(&pem).ok_or_else(|| TestkitError::Failed { what: "reading pebble's issuing root".into(), detail: "bad PEM".into() })?;
        Ok(crate::tls::TestCert { der: der.into(), chain_pem: pem, key_pem: String::new() })
    }
}

/// The DER of the first PEM block.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok().map(|c| c.to_vec())
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
