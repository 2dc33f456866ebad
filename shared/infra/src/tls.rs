//! Whom Quarry's TLS connections trust: the system's certificate store (read through the
//! platform verifier, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`) plus, per service, the
//! certificates of an optional `ca_file` (a private CA, say, mounted from a Kubernetes Secret).
//! Certificates are always verified: there is no switch to turn that off.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// The PEM text of `file`, checked to hold at least one certificate.
pub fn read_ca_file(file: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the CA file {}", file.display()))?;
    if certificates(&pem, file)?.is_empty() {
        bail!(
            "the CA file {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
            file.display()
        );
    }
    Ok(pem)
}

fn certificates(pem: &str, file: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the CA file {} is not valid PEM", file.display()))
}

/// A rustls client configuration verifying servers against the system's store and `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let extra = match ca_file {
        Some(file) => certificates(&read_ca_file(file)?, file)?,
        None => Vec::new(),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .context("cannot load the system's certificate store")?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("the TLS provider supports no protocol version")?
        .dangerous() // rustls's name for "a verifier of one's own": this one verifies fully.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The AWS SDK's HTTPS client, trusting the system's store and `ca_file`.
pub fn s3_http_client(ca_file: &Path) -> anyhow::Result<aws_sdk_s3::config::SharedHttpClient> {
    use aws_smithy_http_client::tls;
    let trust = tls::TrustStore::default().with_pem_certificate(read_ca_file(ca_file)?);
    let context = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .with_context(|| format!("cannot use the CA file {}", ca_file.display()))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(context)
        .build_https())
}
