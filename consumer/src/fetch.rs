//! Getting a `.crate` file through the cache layers: the consumer's local disk cache, then the S3
//! bucket near the registry, then the registry itself. Every copy is checked against the index's
//! sha256 before use; a corrupt cached copy is thrown away and fetched again, a corrupt download
//! is retried. A file found in a lower layer is stored in the layers above it.
//!
//! The same file asked for twice at once is fetched once: the second request waits for the first
//! and then finds it on disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable as _};
use bytes::Bytes;
use quarry_core::job::PackageVersion;
use quarry_infra::registry::{RegistryClient, RegistryError};
use quarry_infra::s3::Bucket;
use sha2::{Digest as _, Sha256};

use crate::in_flight::InFlight;
use crate::metrics::Metrics;

/// Where a `.crate` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Disk,
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
    disk: DiskCache,
    bucket: Bucket,
    registry: RegistryClient,
    retry: ExponentialBuilder,
    in_flight: InFlight,
    metrics: Arc<Metrics>,
    /// Copies into S3 still being written: off the job's path, but waited for on shutdown.
    s3_writes: tokio_util::task::TaskTracker,
}

impl Fetcher {
    pub fn new(
        disk: DiskCache,
        bucket: Bucket,
        registry: RegistryClient,
        metrics: Arc<Metrics>,
    ) -> Fetcher {
        Fetcher {
            disk,
            bucket,
            registry,
            retry: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_times(3)
                .with_jitter(),
            in_flight: Default::default(),
            metrics,
            s3_writes: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Counts how an index file was had (downloaded, revalidated, or stale from the cache).
    pub fn count_index_file(&self, how: quarry_infra::registry::IndexFetch) {
        use quarry_infra::registry::IndexFetch;
        let label = match how {
            IndexFetch::Downloaded => "downloaded",
            IndexFetch::NotModified => "not-modified",
            IndexFetch::Stale => "stale",
            IndexFetch::Fresh => "fresh",
        };
        self.metrics.index_files.with_label_values(&[label]).inc();
    }

    /// Waits for the copies into S3 still being written (when the consumer stops).
    pub async fn finish_s3_writes(&self) {
        self.s3_writes.close();
        self.s3_writes.wait().await;
    }

    /// Where the disk cache keeps `package`'s archive (there if a fetch just returned it, unless
    /// the disk was full).
    pub fn cached_file(&self, package: &PackageVersion) -> PathBuf {
        self.disk.path(package)
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    pub async fn fetch(&self, package: &PackageVersion) -> Result<(Bytes, Source), FetchError> {
        // One fetch per file at a time; whoever waited finds the file on disk afterwards.
        let fetched = {
            let _turn = self
                .in_flight
                .turn(format!("{}@{}", package.name, package.version))
                .await;
            self.fetch_through_layers(package).await
        };
        if let Ok((bytes, source)) = &fetched {
            self.metrics.fetched(*source, bytes.len());
        }
        fetched
    }

    async fn fetch_through_layers(
        &self,
        package: &PackageVersion,
    ) -> Result<(Bytes, Source), FetchError> {
        if let Some(bytes) = self.disk.get(package).await {
            return Ok((bytes, Source::Disk));
        }
        match self.bucket.get(package).await {
            Ok(Some(bytes)) if checksum_matches(&bytes, &package.checksum) => {
                self.disk.put(package, &bytes).await;
                return Ok((bytes, Source::S3));
            }
            Ok(Some(_)) => tracing::warn!(%package, "S3 copy has a wrong checksum; fetching again"),
            Ok(None) => {}
            // S3 being down must not stop the run: the registry still has the file.
            Err(err) => {
                self.metrics.s3_unavailable.inc();
                tracing::warn!(%package, error = %format!("{err:#}"), "S3 unavailable; using the registry");
            }
        }
        let bytes = (|| self.download_checked(package))
            .retry(self.retry)
            .when(|e| matches!(e, FetchError::Unavailable(_)))
            .await?;
        // The job needs the file now, not its copy in S3: that is written meanwhile.
        let (bucket, copy, cached) = (self.bucket.clone(), bytes.clone(), package.clone());
        self.s3_writes.spawn(async move {
            if let Err(err) = bucket.put(&cached, copy).await {
                tracing::warn!(package = %cached, error = %format!("{err:#}"), "cannot cache the crate in S3");
            }
        });
        self.disk.put(package, &bytes).await;
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

pub(crate) fn checksum_matches(bytes: &[u8], expected: &str) -> bool {
    hex::encode(Sha256::digest(bytes)).eq_ignore_ascii_case(expected)
}

/// The consumer's local cache of `.crate` files, bounded in size: when it grows past its limit,
/// the least recently used files are removed. Shared by the consumers of one work directory.
pub struct DiskCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes in the directory as this process last saw them plus what it added since: the
    /// directory is only listed again when this passes the limit, not on every store.
    used_bytes: std::sync::atomic::AtomicU64,
}

impl DiskCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> std::io::Result<DiskCache> {
        std::fs::create_dir_all(&dir)?;
        let used: u64 = cached_files(&dir).iter().map(|(_, size, _)| size).sum();
        Ok(DiskCache {
            dir,
            max_bytes,
            used_bytes: used.into(),
        })
    }

    fn path(&self, package: &PackageVersion) -> PathBuf {
        // The checksum in the name: a new upload under the same version is a different file.
        self.dir.join(format!(
            "{}-{}-{}.crate",
            package.name,
            package.version,
            &package.checksum[..package.checksum.len().min(16)]
        ))
    }

    /// The cached file if it is there and intact; a corrupt one is removed.
    pub async fn get(&self, package: &PackageVersion) -> Option<Bytes> {
        let path = self.path(package);
        let bytes = tokio::fs::read(&path).await.ok()?;
        if !checksum_matches(&bytes, &package.checksum) {
            tracing::warn!(path = %path.display(), "corrupt file in the disk cache; removing it");
            let _ = tokio::fs::remove_file(&path).await;
            return None;
        }
        // Recently used: eviction goes by modification time.
        if let Ok(file) = std::fs::File::options().append(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
        Some(Bytes::from(bytes))
    }

    /// Stores a verified file (written aside, then renamed: readers never see half a file);
    /// whether it could. The staged name is unique to the call: two consumers of one process
    /// (or of two containers, each its own pid 1) storing the same package at once must not
    /// write the same staged file.
    pub async fn put(&self, package: &PackageVersion, bytes: &Bytes) -> bool {
        let path = self.path(package);
        let staged = path.with_extension(format!("part.{}", uuid::Uuid::new_v4().simple()));
        let stored = async {
            tokio::fs::write(&staged, bytes).await?;
            tokio::fs::rename(&staged, &path).await
        }
        .await;
        if let Err(err) = stored {
            tracing::warn!(path = %path.display(), %err, "cannot write to the disk cache");
            let _ = tokio::fs::remove_file(&staged).await;
            return false;
        }
        use std::sync::atomic::Ordering;
        let used = self
            .used_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed)
            + bytes.len() as u64;
        if used <= self.max_bytes {
            return true;
        }
        let dir = self.dir.clone();
        let max_bytes = self.max_bytes;
        if let Ok(left) = tokio::task::spawn_blocking(move || evict(&dir, max_bytes)).await {
            self.used_bytes.store(left, Ordering::Relaxed);
        }
        true
    }
}

/// The cached files of `dir`: last use, size and path.
fn cached_files(dir: &std::path::Path) -> Vec<(SystemTime, u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let meta = entry.metadata().ok()?;
            let path = entry.path();
            if !meta.is_file() || path.extension().is_none_or(|e| e != "crate") {
                return None;
            }
            Some((meta.modified().ok()?, meta.len(), path))
        })
        .collect()
}

/// Removes the least recently used files until the directory fits in `max_bytes`; returns the
/// bytes left.
fn evict(dir: &std::path::Path, max_bytes: u64) -> u64 {
    let mut files = cached_files(dir);
    let mut total: u64 = files.iter().map(|(_, size, _)| size).sum();
    files.sort();
    for (_, size, path) in files {
        if total <= max_bytes {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= size;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(name: &str, bytes: &[u8]) -> PackageVersion {
        PackageVersion {
            name: name.into(),
            version: "1.0.0".into(),
            checksum: hex::encode(Sha256::digest(bytes)),
        }
    }

    #[tokio::test]
    async fn the_disk_cache_serves_intact_files_and_drops_corrupt_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().to_owned(), 1 << 20).unwrap();
        let a = package("a", b"aaaa");
        assert!(cache.get(&a).await.is_none());
        cache.put(&a, &Bytes::from_static(b"aaaa")).await;
        assert_eq!(cache.get(&a).await.unwrap(), Bytes::from_static(b"aaaa"));

        std::fs::write(cache.path(&a), b"tampered").unwrap();
        assert!(
            cache.get(&a).await.is_none(),
            "a corrupt file is never used"
        );
        assert!(!cache.path(&a).exists(), "and it is removed");
    }

    /// The two consumers of one process (as in the benchmark) share a work directory: storing
    /// the same package at once, both succeed and the file is whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_caches_on_one_directory_store_the_same_package_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let one = DiskCache::new(dir.path().to_owned(), 1 << 30).unwrap();
        let two = DiskCache::new(dir.path().to_owned(), 1 << 30).unwrap();
        let bytes = Bytes::from(vec![7u8; 1 << 20]);
        let a = package("a", &bytes);
        for _ in 0..50 {
            let (first, second) = tokio::join!(one.put(&a, &bytes), two.put(&a, &bytes));
            assert!(first && second, "both stored");
        }
        assert_eq!(one.get(&a).await.unwrap(), bytes);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no staged file left behind");
    }

    #[tokio::test]
    async fn the_disk_cache_evicts_the_least_recently_used_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path().to_owned(), 10).unwrap();
        let (a, b, c) = (
            package("a", b"aaaa"),
            package("b", b"bbbb"),
            package("c", b"cccc"),
        );
        cache.put(&a, &Bytes::from_static(b"aaaa")).await;
        std::thread::sleep(Duration::from_millis(20));
        cache.put(&b, &Bytes::from_static(b"bbbb")).await;
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            cache.get(&a).await.is_some(),
            "a is now the most recently used"
        );
        std::thread::sleep(Duration::from_millis(20));
        cache.put(&c, &Bytes::from_static(b"cccc")).await;
        assert!(
            cache.get(&b).await.is_none(),
            "b, least recently used, was evicted"
        );
        assert!(cache.get(&a).await.is_some());
        assert!(cache.get(&c).await.is_some());
    }
}
