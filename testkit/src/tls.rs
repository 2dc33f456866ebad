//! For the TLS tests: a certificate authority of the test's own with one server certificate
//! (for `127.0.0.1` and `localhost`), and a TLS-terminating proxy, which puts HTTPS in front of
//! the test's s3s-fs as a load balancer would in front of an S3-compatible store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a server certificate signed by it, written as PEM files in a temporary directory.
pub struct TestCertificates {
    dir: tempfile::TempDir,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl TestCertificates {
    pub fn generate() -> anyhow::Result<TestCertificates> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Quarry test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let dir = tempfile::Builder::new()
            .prefix("quarry-test-tls")
            .tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem())?;
        let certificates = TestCertificates {
            dir,
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
        };
        std::fs::write(certificates.server_cert(), &certificates.server_cert_pem)?;
        std::fs::write(certificates.server_key(), &certificates.server_key_pem)?;
        Ok(certificates)
    }

    /// The CA's certificate: what clients must be told to trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

/// Accepts TLS on a free port of 127.0.0.1 and forwards the decrypted bytes to `upstream`,
/// until the returned task is aborted.
pub async fn tls_proxy(
    certificates: &TestCertificates,
    upstream: SocketAddr,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let chain = vec![CertificateDer::from_pem_file(certificates.server_cert())?];
    let key = PrivateKeyDer::from_pem_file(certificates.server_key())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the test server certificate is unusable")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A failed handshake (a client that does not trust the CA) just ends the
                // connection, as a real endpoint's would.
                let Ok(mut client) = acceptor.accept(client).await else {
                    return;
                };
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Ok((addr, task))
}
