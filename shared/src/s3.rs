//! The S3 bucket that caches `.crate` files near the registry.
//!
//! Objects are keyed by package name and version; their content is checked against the index's
//! sha256 by the caller (`consumer::fetch`), so a corrupt object is never trusted.

use anyhow::Context as _;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use crate::config::S3Config;
use crate::job::PackageVersion;

#[derive(Clone)]
pub struct CrateBucket {
    client: Client,
    bucket: String,
    prefix: String,
}

impl CrateBucket {
    pub fn new(config: &S3Config) -> CrateBucket {
        let credentials = Credentials::new(
            config.access_key_id.expose(),
            config.secret_access_key.expose(),
            None,
            None,
            "quarry-config",
        );
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(config.force_path_style)
            // S3-compatible servers (s3s-fs among them) reject the newer default checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        CrateBucket {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket unless it exists already.
    pub async fn ensure_exists(&self) -> anyhow::Result<()> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(
                    err.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(anyhow::Error::new(err.into_service_error()))
                .with_context(|| format!("cannot create S3 bucket {}", self.bucket)),
        }
    }

    pub fn key(&self, package: &PackageVersion) -> String {
        format!(
            "{}{}/{}-{}.crate",
            self.prefix, package.name, package.name, package.version
        )
    }

    /// The cached `.crate`, or `None` when the bucket does not have it.
    pub async fn get(&self, package: &PackageVersion) -> anyhow::Result<Option<Bytes>> {
        let key = self.key(package);
        let response = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(response) => response,
            Err(SdkError::ServiceError(err)) if err.err().is_no_such_key() => return Ok(None),
            Err(err) => {
                return Err(anyhow::Error::new(err.into_service_error()))
                    .with_context(|| format!("cannot read s3://{}/{key}", self.bucket));
            }
        };
        let body = response
            .body
            .collect()
            .await
            .with_context(|| format!("cannot read the body of s3://{}/{key}", self.bucket))?;
        Ok(Some(body.into_bytes()))
    }

    pub async fn put(&self, package: &PackageVersion, bytes: Bytes) -> anyhow::Result<()> {
        let key = self.key(package);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/gzip")
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|err| anyhow::Error::new(err.into_service_error()))
            .with_context(|| format!("cannot write s3://{}/{key}", self.bucket))?;
        Ok(())
    }

    /// Deletes every object and then the bucket. For tests and teardown, never for a live run.
    pub async fn delete_bucket_and_contents(&self) -> anyhow::Result<()> {
        loop {
            let listed = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .send()
                .await
                .map_err(|err| anyhow::Error::new(err.into_service_error()))?;
            let keys: Vec<String> = listed
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_owned))
                .collect();
            if keys.is_empty() {
                break;
            }
            for key in keys {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|err| anyhow::Error::new(err.into_service_error()))?;
            }
        }
        self.client
            .delete_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|err| anyhow::Error::new(err.into_service_error()))?;
        Ok(())
    }
}
