//! TLS helpers: self-signed test certificates and a verifying client handshake that
//! reports which certificate the server chose and what ALPN agreed.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use crate::tools::TestkitError;

/// A self-signed certificate with its key, as PEM and as the DER a client sees.
#[derive(Debug, Clone)]
pub struct TestCert {
    /// The certificate (PEM), which is also its whole chain.
    pub chain_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
    /// The certificate as sent in the handshake.
    pub der: CertificateDer<'static>,
}

/// A fresh self-signed certificate for `names` (`*.parent` allowed).
pub fn test_cert(names: &[&str]) -> Result<TestCert, TestkitError> {
    let key = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .map_err(|e| TestkitError::Failed { what: format!("generating a certificate for {names:?}"), detail: e.to_string() })?;
    Ok(TestCert { chain_pem: key.cert.pem(), key_pem: key.signing_key.serialize_pem(), der: key.cert.der().clone() })
}

/// A completed client handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The encrypted stream, ready for HTTP.
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// The leaf certificate the server presented.
    pub leaf: CertificateDer<'static>,
    /// The protocol ALPN settled on (`h2`, `http/1.1`), if any.
    pub alpn: Option<Vec<u8>>,
}

/// Connects to `addr` naming `sni`, offering ALPN `h2` and `http/1.1`, trusting only
/// `roots`. An `Err` is the handshake's own error (unknown name, untrusted certificate).
pub async fn handshake(addr: SocketAddr, sni: &str, roots: &[&TestCert]) -> std::io::Result<Handshake> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.der.clone()).map_err(std::io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    let stream = connector.connect(name, TcpStream::connect(addr).await?).await?;
    let (_, conn) = stream.get_ref();
    let leaf = conn.peer_certificates().and_then(|c| c.first()).cloned().ok_or_else(|| std::io::Error::other("no server certificate"))?;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    Ok(Handshake { stream, leaf, alpn })
}

/// A certificate authority for tests: issues server and client certificates it signs,
/// so a test can give one party the CA and the other a certificate (a wrong CA is just
/// another `TestCa`).
#[derive(Debug)]
pub struct TestCa {
    /// The CA's certificate (PEM): what clients and servers trust.
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> Result<TestCa, TestkitError> {
        let fail = |e: rcgen::Error| TestkitError::Failed { what: format!("creating the test CA {name}"), detail: e.to_string() };
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(fail)?;
        Ok(TestCa { cert_pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) })
    }

    /// A certificate for `names` (DNS names or IP addresses) with common name `cn`, good
    /// for both server and client authentication, signed by this CA.
    pub fn issue(&self, cn: &str, names: &[&str]) -> Result<TestCert, TestkitError> {
        let fail = |e: rcgen::Error| TestkitError::Failed { what: format!("issuing a certificate for {cn}"), detail: e.to_string() };
        let key = rcgen::KeyPair::generate().map_err(fail)?;
        let mut params = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).map_err(fail)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(fail)?;
        Ok(TestCert { chain_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() })
    }
}
