//! Getting a package's `.crate` file: from the S3 bucket if it has a good copy, else from the
//! registry (then stored in S3 for next time). Every copy is checked against the index's sha256
//! before use; a corrupt S3 object is replaced, a corrupt download is retried.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use bytes::Bytes;
use quarry_shared::job::PackageVersion;
use quarry_shared::registry::{RegistryClient, RegistryError};
use quarry_shared::s3::CrateBucket;
use sha2::{Digest as _, Sha256};

/// Where a `.crate` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    S3,
    Registry,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The registry does not have this version: the package is broken, not Quarry.
    #[error("{0}")]
    Missing(String),
    /// Could not get a good copy; worth trying again later.
    #[error("{0}")]
    Unavailable(String),
}

pub struct Fetcher {
    bucket: CrateBucket,
    registry: RegistryClient,
    retry: ExponentialBuilder,
}

impl Fetcher {
    pub fn new(bucket: CrateBucket, registry: RegistryClient) -> Fetcher {
        Fetcher {
            bucket,
            registry,
            retry: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_times(3)
                .with_jitter(),
        }
    }

    pub async fn fetch(&self, package: &PackageVersion) -> Result<(Bytes, Source), FetchError> {
        match self.bucket.get(package).await {
            Ok(Some(bytes)) if checksum_matches(&bytes, &package.checksum) => {
                return Ok((bytes, Source::S3));
            }
            Ok(Some(_)) => tracing::warn!(%package, "S3 copy has a wrong checksum; fetching again"),
            Ok(None) => {}
            // S3 being down must not stop the run: the registry still has the file.
            Err(err) => {
                tracing::warn!(%package, error = %format!("{err:#}"), "S3 unavailable; using the registry")
            }
        }
        let bytes = (|| self.download_checked(package))
            .retry(self.retry)
            .when(|e| matches!(e, FetchError::Unavailable(_)))
            .await?;
        if let Err(err) = self.bucket.put(package, bytes.clone()).await {
            tracing::warn!(%package, error = %format!("{err:#}"), "cannot cache the crate in S3");
        }
        Ok((bytes, Source::Registry))
    }

    async fn download_checked(&self, package: &PackageVersion) -> Result<Bytes, FetchError> {
        let bytes = self
            .registry
            .download(&package.name, &package.version)
            .await
            .map_err(|err| match err {
                RegistryError::NotFound(url) => {
                    FetchError::Missing(format!("the registry has no {package} ({url})"))
                }
                other => FetchError::Unavailable(format!("cannot download {package}: {other}")),
            })?;
        if checksum_matches(&bytes, &package.checksum) {
            Ok(bytes)
        } else {
            Err(FetchError::Unavailable(format!(
                "the registry served {package} with sha256 {} but the index says {}",
                hex::encode(Sha256::digest(&bytes)),
                package.checksum
            )))
        }
    }
}

fn checksum_matches(bytes: &[u8], expected: &str) -> bool {
    hex::encode(Sha256::digest(bytes)).eq_ignore_ascii_case(expected)
}
