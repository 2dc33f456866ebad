//! The S3 bucket near the registry: the cache of `.crate` files, the jobs' logs, and what runs
//! upload for the consumers (dependency patches, toolchain files).
//!
//! `.crate` objects are keyed by package name and version; their content is checked against the
//! index's sha256 by the caller (`consumer::fetch`), so a corrupt object is never trusted. Logs are
//! stored gzip-compressed under `<logs_prefix><run>/<job>/`, one object per recorded attempt; the
//! result row in PostgreSQL keeps the key.

use anyhow::Context as _;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use std::io::{Read as _, Write as _};

use crate::config::S3Config;
use quarry_core::job::{JobId, PackageVersion, RunId};

#[derive(Clone)]
pub struct Bucket {
    client: Client,
    bucket: String,
    prefix: String,
    logs_prefix: String,
}

impl Bucket {
    pub fn new(config: &S3Config) -> anyhow::Result<Bucket> {
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
        if let Some(ca_file) = &config.ca_file {
            builder = builder.http_client(
                crate::tls::s3_http_client(ca_file).context("cannot set up TLS for S3")?,
            );
        }
        Ok(Bucket {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            logs_prefix: config.logs_prefix.clone(),
        })
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
        self.get_object(&self.key(package)).await
    }

    pub async fn put(&self, package: &PackageVersion, bytes: Bytes) -> anyhow::Result<()> {
        self.put_object(&self.key(package), bytes, "application/gzip", None)
            .await
    }

    /// Stores a dependency-patch `.crate` uploaded with a run, by its checksum; returns its key.
    pub async fn put_patch(&self, checksum: &str, bytes: Bytes) -> anyhow::Result<String> {
        let key = format!("patches/{checksum}.crate");
        self.put_object(&key, bytes, "application/gzip", None)
            .await?;
        Ok(key)
    }

    /// An uploaded dependency-patch `.crate`, or `None` when the bucket does not have it.
    pub async fn get_patch(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        self.get_object(key).await
    }

    /// Stores a toolchain file uploaded with a run (`--toolchain-file`), by its checksum, streamed
    /// from `file`; an object of that key and size already there is kept (the same file, as the
    /// key is its checksum). Returns the key.
    pub async fn put_toolchain(
        &self,
        checksum: &str,
        file: &std::path::Path,
        bytes: u64,
    ) -> anyhow::Result<String> {
        let key = format!("toolchains/{checksum}.tar");
        if self.object_size(&key).await? == Some(bytes) {
            return Ok(key);
        }
        let body = ByteStream::from_path(file)
            .await
            .with_context(|| format!("cannot read {}", file.display()))?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|err| anyhow::Error::new(err.into_service_error()))
            .with_context(|| format!("cannot write s3://{}/{key}", self.bucket))?;
        Ok(key)
    }

    /// Streams the object `key` into the file `into` (created anew); returns the hex sha256 of
    /// what was written, or `None` when there is no such key.
    pub async fn get_to_file(
        &self,
        key: &str,
        into: &std::path::Path,
    ) -> anyhow::Result<Option<String>> {
        use sha2::{Digest as _, Sha256};
        use tokio::io::AsyncWriteExt as _;
        let Some(response) = self.get_response(key).await? else {
            return Ok(None);
        };
        let mut file = tokio::fs::File::create(into)
            .await
            .with_context(|| format!("cannot create {}", into.display()))?;
        let mut body = response.body;
        let mut hasher = Sha256::new();
        while let Some(chunk) = body
            .try_next()
            .await
            .with_context(|| format!("cannot read the body of s3://{}/{key}", self.bucket))?
        {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .with_context(|| format!("cannot write {}", into.display()))?;
        }
        file.flush().await?;
        Ok(Some(hex::encode(hasher.finalize())))
    }

    /// The size of the object `key`, or `None` when there is no such key.
    async fn object_size(&self, key: &str) -> anyhow::Result<Option<u64>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(head.content_length().unwrap_or_default().max(0) as u64)),
            Err(SdkError::ServiceError(err)) if err.err().is_not_found() => Ok(None),
            Err(err) => Err(anyhow::Error::new(err.into_service_error()))
                .with_context(|| format!("cannot look up s3://{}/{key}", self.bucket)),
        }
    }

    /// The answer to a GET of `key`, body unread, or `None` when there is no such key.
    async fn get_response(
        &self,
        key: &str,
    ) -> anyhow::Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(response) => Ok(Some(response)),
            Err(SdkError::ServiceError(err)) if err.err().is_no_such_key() => Ok(None),
            Err(err) => Err(anyhow::Error::new(err.into_service_error()))
                .with_context(|| format!("cannot read s3://{}/{key}", self.bucket)),
        }
    }

    /// An object's body, or `None` when there is no such key.
    async fn get_object(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        let Some(response) = self.get_response(key).await? else {
            return Ok(None);
        };
        let body = response
            .body
            .collect()
            .await
            .with_context(|| format!("cannot read the body of s3://{}/{key}", self.bucket))?;
        Ok(Some(body.into_bytes()))
    }

    async fn put_object(
        &self,
        key: &str,
        body: Bytes,
        content_type: &str,
        content_encoding: Option<&str>,
    ) -> anyhow::Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_content_encoding(content_encoding.map(str::to_owned))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|err| anyhow::Error::new(err.into_service_error()))
            .with_context(|| format!("cannot write s3://{}/{key}", self.bucket))?;
        Ok(())
    }

    /// A fresh key for a log of `job` of `run`: never one another attempt could have written.
    pub fn log_key(&self, run: RunId, job: JobId) -> String {
        format!(
            "{}{run}/{job}/{}.log.gz",
            self.logs_prefix,
            uuid::Uuid::new_v4().simple()
        )
    }

    /// Stores a log, gzip-compressed, under `key`.
    pub async fn put_log(&self, key: &str, log: &str) -> anyhow::Result<()> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(log.as_bytes())?;
        let compressed = Bytes::from(encoder.finish()?);
        self.put_object(key, compressed, "text/plain; charset=utf-8", Some("gzip"))
            .await
    }

    /// Reads back a log stored by `put_log`.
    pub async fn get_log(&self, key: &str) -> anyhow::Result<String> {
        let body = self
            .get_object(key)
            .await?
            .with_context(|| format!("s3://{}/{key} does not exist", self.bucket))?;
        let mut log = String::new();
        GzDecoder::new(&body[..])
            .read_to_string(&mut log)
            .with_context(|| format!("s3://{}/{key} is not a gzip-compressed log", self.bucket))?;
        Ok(log)
    }

    /// A result's whole log: the part PostgreSQL keeps (`log`: all of it, or a note of Quarry's
    /// that goes first), then the S3 object `log_key`, if any.
    pub async fn result_log(
        &self,
        log: Option<&str>,
        log_key: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut text = log.unwrap_or_default().to_owned();
        if let Some(key) = log_key {
            text.push_str(&self.get_log(key).await?);
        }
        Ok(text)
    }

    /// Removes a log (one written for a result that turned out to be a duplicate).
    pub async fn delete_log(&self, key: &str) -> anyhow::Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|err| anyhow::Error::new(err.into_service_error()))
            .with_context(|| format!("cannot delete s3://{}/{key}", self.bucket))?;
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
